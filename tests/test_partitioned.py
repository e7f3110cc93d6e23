"""ZeRO-3 partitioned loading: each rank reads only its share, and the model is the same."""

from __future__ import annotations

import os
import socket

import pytest
import torch
from safetensors.torch import save_file

from kdshield.errors import InputError
from kdshield.models.partitioned import checkpoint_index, plan_partitioned_load, read_header, read_range


def test_a_range_of_a_tensor_is_read_from_its_bytes_in_the_file(tmp_path):
    tensors = {"a": torch.arange(24, dtype=torch.float32).reshape(4, 6),
               "b": torch.randn(7, 3).to(torch.bfloat16), "c": torch.arange(5, dtype=torch.int64)}
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    entries = checkpoint_index(tmp_path)
    assert {k: (e.dtype, e.shape) for k, e in entries.items()} == {k: (v.dtype, tuple(v.shape))
                                                                   for k, v in tensors.items()}
    for name, tensor in tensors.items():
        flat = tensor.flatten()
        for start, count in ((0, flat.numel()), (1, 3), (flat.numel() - 2, 2), (1, 0)):
            assert torch.equal(read_range(entries[name], start, count), flat[start:start + count])
        with pytest.raises(ValueError):  # never into the next tensor's bytes
            read_range(entries[name], flat.numel() - 1, 2)


def test_sharded_weights_are_found_through_their_index(tmp_path):
    save_file({"x.weight": torch.ones(2, 2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"y.weight": torch.zeros(3)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(
        '{"metadata": {}, "weight_map": {"x.weight": "model-00001-of-00002.safetensors", '
        '"y.weight": "model-00002-of-00002.safetensors"}}')
    entries = checkpoint_index(tmp_path)
    assert entries["x.weight"].shape == (2, 2) and entries["y.weight"].shape == (3,)
    assert torch.equal(read_range(entries["y.weight"], 0, 3), torch.zeros(3))


def test_a_file_that_is_not_safetensors_is_refused_in_one_line(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes((2**40).to_bytes(8, "little") + b"{}")
    with pytest.raises(InputError, match="not a safetensors file") as err:
        read_header(bad)
    assert "\n" not in str(err.value)


def test_a_checkpoint_missing_a_base_weight_is_refused_and_a_missing_head_is_not(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from kdshield.models import load_config, resolve_model

    path = resolve_model("tiny-llama")  # a causal LM: no classification head in its checkpoint
    config = load_config(path)
    config.num_labels = 2
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    entries = checkpoint_index(path)
    plan, fresh = plan_partitioned_load(model, entries)
    assert fresh == ["score.weight"] and "model.embed_tokens.weight" in plan
    del entries["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(InputError, match=r"model.layers.1.mlp.up_proj.weight .*not in the checkpoint"):
        plan_partitioned_load(model, entries)


def _rank(rank: int, world: int, port: int, models: list[tuple[str, str]], results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    try:
        import deepspeed

        from kdshield.models import load_classifier, load_classifier_partitioned

        deepspeed.init_distributed(dist_backend="gloo")
        out = {}
        for path, dtype_name in models:
            dtype = getattr(torch, dtype_name)
            config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
            model, _ = load_classifier_partitioned(path, 2, ds_config=config, dtype=dtype)
            local = sum(p.ds_tensor.numel() for p in model.parameters())
            share = sum(-(-p.ds_numel // world) for p in model.parameters())  # ceil: the last one padded
            reference = load_classifier(path, 2, dtype=dtype)[0]
            whole = {**dict(reference.named_parameters()), **dict(reference.named_buffers())}
            with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
                out[path] = {"differ": [n for n, p in [*model.named_parameters(), *model.named_buffers()]
                                        if p.dtype != whole[n].dtype or not torch.equal(p.data, whole[n].data)]
                             + [n for n, p in model.named_parameters() if p.dtype != dtype],
                             "local": local, "share": share}
        results.put((rank, out))
    except BaseException as err:  # the parent reports it instead of waiting for a rank that died
        results.put((rank, repr(err)))


def test_each_rank_loads_its_partitions_and_the_model_is_the_one_loaded_whole():
    """Two ranks (gloo): every parameter, gathered, and every buffer equals the whole model's (a
    fresh head too: the same seeded draw), in the requested dtype, while each rank held only its
    partitions."""
    import torch.multiprocessing as mp

    from kdshield.models import resolve_model

    models = [(resolve_model("tiny-llama"), "bfloat16"), (resolve_model("tiny-bert"), "float32")]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, 2, port, models, results)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    for rank, out in got.items():
        assert isinstance(out, dict), f"rank {rank}: {out}"
        for path, result in out.items():
            assert result["differ"] == [], (rank, path)
            assert result["local"] == result["share"], (rank, path)  # its partitions only
