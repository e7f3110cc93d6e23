"""The training engine through real Ray Train workers running DeepSpeed (2 workers, gloo, CPU)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from kdshield.config import ScalingSettings, TrainSettings
from kdshield.defenses.losses import CrossEntropy
from kdshield.trainables.engine import run_stage
from kdshield.defenses.stage import ModelSpec, Phase, Stage

pytestmark = pytest.mark.ray

WORDS = "the a movie film plot actor scene story music long short quite very really".split()


def keyword_table(n: int, seed: int = 0) -> pa.Table:
    """A learnable task: label 1 iff the text contains 'excellent'."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for i in range(n):
        words = list(rng.choice(WORDS, size=rng.integers(4, 10)))
        label = i % 2
        if label:
            words.insert(int(rng.integers(0, len(words) + 1)), "excellent")
        texts.append(" ".join(words))
        labels.append(label)
    return pa.table({"text": texts, "label": pa.array(labels, pa.int64()),
                     "source_index": pa.array(np.arange(n), pa.int64())})


@pytest.fixture(scope="module")
def tiny_stream(ray_local):
    from kdshield.models import load_tokenizer, resolve_model
    from kdshield.trainables.attack import tokenized_stream

    model_dir = resolve_model("tiny-bert")
    tok = load_tokenizer(model_dir)
    return model_dir, tok, tokenized_stream(keyword_table(768), model_dir, 16)


def make_stage(model_dir, tok, epochs: int, lr: float = 2e-3) -> Stage:
    return Stage(name="t", model=ModelSpec(source=str(model_dir), num_labels=2),
                 phases=(Phase("train", CrossEntropy()),),
                 train=TrainSettings(epochs=epochs, lr=lr, batch_size=16, max_length=16, warmup_ratio=0.0,
                                     checkpoint_interval_s=0),
                 pad_ids={"input_ids": tok.pad_token_id}, padding_side="right")


def accuracy(model_dir: Path, tok) -> float:
    from transformers import AutoModelForSequenceClassification

    table = keyword_table(64, seed=1)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)  # a plain HF directory
    enc = tok(table.column("text").to_pylist(), padding=True, return_tensors="pt")
    with torch.no_grad():
        preds = model(**enc).logits.argmax(-1).numpy()
    return float(np.mean(preds == table.column("label").to_numpy()))


@pytest.mark.parametrize("scaling", [
    {"zero": 3},  # ZeRO 2: test_killed_worker_resumes_from_checkpoint learns and exports under it
    # ZeRO 1 with two micro-batches per step (half the optimizer steps: twice the epochs),
    # activations recomputed, bf16 on the CPU
    {"zero": 1, "grad_accum": 2, "gradient_checkpointing": True, "bf16": True, "epochs": 8}],
    ids=["zero3", "zero1-large"])
def test_two_workers_learn_and_export(scaling, tiny_stream, tmp_path):
    model_dir, tok, stream = tiny_stream
    scaling = dict(scaling)
    epochs = scaling.pop("epochs", 4)
    result = run_stage(make_stage(model_dir, tok, epochs=epochs), {"train": stream},
                       ScalingSettings(workers=2, **scaling), storage=tmp_path)
    losses = [h["train/loss"] for h in result.history]
    assert len(losses) == epochs
    assert result.history[-1]["device_per_rank"] == ["cpu", "cpu"]
    assert losses[-1] < 0.7 * losses[0], losses
    assert (result.model_dir / "model.safetensors").is_file()
    assert not list(result.model_dir.glob("*.bin"))
    assert accuracy(result.model_dir, tok) >= 0.9
    assert accuracy(Path(model_dir), tok) < 0.9  # the untrained model cannot do it


def test_killed_worker_resumes_from_checkpoint(tiny_stream, tmp_path):
    """SIGKILL one worker once it has passed two checkpoints; the run restarts from one, finishes,
    learns and exports (ZeRO 2, 2 workers)."""
    model_dir, tok, stream = tiny_stream
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    storage = tmp_path / "storage"
    killed: list[int] = []

    def killer():
        deadline = time.time() + 240
        while time.time() < deadline and not killed:
            pid_file = pid_dir / "rank1.pid"
            try:
                pid, epoch = map(int, pid_file.read_text().split())
            except (FileNotFoundError, ValueError):  # not written yet, or mid-write
                pid, epoch = 0, 0
            if epoch >= 2:  # epochs 1 and 2 were reported with their checkpoints
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.2)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    result = run_stage(make_stage(model_dir, tok, epochs=4), {"train": stream},
                       ScalingSettings(workers=2, zero=2, max_failures=2), storage=storage,
                       pid_dir=str(pid_dir))
    thread.join(timeout=5)
    assert killed, "the worker was never killed"
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4]
    assert result.metrics["start_epoch"] >= 1  # the last attempt started from a checkpoint
    assert int((pid_dir / "rank1.pid").read_text().split()[0]) != killed[0]  # a new process finished it
    assert (result.model_dir / "model.safetensors").is_file() and not list(result.model_dir.glob("*.bin"))
    assert accuracy(result.model_dir, tok) >= 0.9


def test_one_local_cpu_worker_trains_in_process_and_learns(tiny_stream, tmp_path):
    """The default for one CPU worker on a local Ray: the same loop in this process, no Ray Train run,
    all its threads for the stage; the model learns and the run leaves its checkpoints."""
    from kdshield.trainables.engine import LATEST_FILE, trains_in_process

    model_dir, tok, stream = tiny_stream
    scaling = ScalingSettings(workers=1, cpus_per_worker=2)
    assert trains_in_process(scaling)
    assert not trains_in_process(ScalingSettings(workers=1, in_process=False))
    assert not trains_in_process(ScalingSettings(workers=2))
    threads = torch.get_num_threads()
    seen = []
    result = run_stage(make_stage(model_dir, tok, epochs=3), {"train": stream}, scaling, storage=tmp_path,
                       run_name="local", on_report=lambda name, m: seen.append((name, m["epoch"])))
    assert seen == [("local", 1), ("local", 2), ("local", 3)]
    assert torch.get_num_threads() == threads  # the stage's thread count does not outlive it
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert result.history[-1]["device_per_rank"] == ["cpu"]  # the accelerator's device (cuda:N on a GPU)
    assert result.checkpoint_path.parent == tmp_path / "local"
    assert (tmp_path / "local" / LATEST_FILE).is_file()
    assert sorted(p.name for p in (tmp_path / "local").glob("checkpoint_*")) == ["checkpoint_000002",
                                                                                 "checkpoint_000003"]
    assert not list(tmp_path.glob("**/checkpoint_manager_snapshot.json"))  # no Ray Train run
    assert accuracy(result.model_dir, tok) >= 0.9


def test_an_in_process_stage_that_died_resumes_from_its_checkpoint(tiny_stream, tmp_path):
    """A job (a retried Tune trial) whose process died mid-stage picks the stage up at its last
    checkpoint: a report hook that raises after epoch 2 stands in for the death."""
    from kdshield.trainables.stage_runs import StageRuns, read_attempts

    model_dir, tok, stream = tiny_stream
    scaling = ScalingSettings(workers=1, cpus_per_worker=2)
    runs = StageRuns(tmp_path)
    stage = make_stage(model_dir, tok, epochs=4)

    def die_after_two(name, metrics):
        if metrics["epoch"] == 2:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        runs.run(stage, {"train": stream}, scaling, on_report=die_after_two)
    again = StageRuns(tmp_path).run(stage, {"train": stream}, scaling)
    assert [h["epoch"] for h in again.history] == [1, 2, 3, 4]
    assert again.metrics["start_epoch"] == 2
    assert [a["checkpoint"] for a in read_attempts(tmp_path / "attempts.jsonl")] == [None, "checkpoint_000002"]
    assert accuracy(again.model_dir, tok) >= 0.9
    finished = StageRuns(tmp_path).run(stage, {"train": stream}, scaling)  # nothing left to train
    assert finished.model_dir == again.model_dir


def test_the_cpu_engine_skips_deepspeeds_shared_memory_op_build(monkeypatch):
    """DeepSpeed's CPU backend would g++-compile its shared-memory all-reduce op (tens of seconds
    on a fresh machine) at every engine start that finds no cached build; training never calls it."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from deepspeed.comm.torch import build_shm_op

    from kdshield.trainables.engine import _skip_shm_comm_build

    if get_accelerator().device_name() != "cpu":
        pytest.skip("DeepSpeed's accelerator here is not the CPU one")
    monkeypatch.setattr(deepspeed.ops, "__compatible_ops__", {"deepspeed_shm_comm": True}, raising=False)
    _skip_shm_comm_build()
    assert build_shm_op() is None


def test_a_checkpoint_resumes_only_with_the_files_its_manifest_lists(tmp_path):
    """Resuming unpickles optimizer state, so a checkpoint is read only when every file in it is
    one the engine wrote, unchanged: a changed byte, a foreign file, a missing file or a missing
    manifest is refused with one line before anything is loaded."""
    from kdshield.errors import InputError
    from kdshield.trainables.engine import verify_manifest, write_manifest

    ckpt = tmp_path / "checkpoint_000002"
    (ckpt / "ds").mkdir(parents=True)
    (ckpt / "ds" / "optim_states.pt").write_bytes(b"rank0 state")
    (ckpt / "kdshield_state.json").write_text("{}")
    with pytest.raises(InputError, match="no kdshield manifest"):
        verify_manifest(ckpt)
    write_manifest(ckpt, rank=0)
    verify_manifest(ckpt)
    (ckpt / "ds" / "rank1.pt").write_bytes(b"rank1 state")  # another rank's file, in its own manifest
    write_manifest(ckpt, rank=1)
    verify_manifest(ckpt)

    (ckpt / "ds" / "optim_states.pt").write_bytes(b"rank0 statf")
    with pytest.raises(InputError, match="optim_states.pt: changed since the checkpoint was saved"):
        verify_manifest(ckpt)
    (ckpt / "ds" / "optim_states.pt").write_bytes(b"rank0 state")
    (ckpt / "ds" / "evil.pt").write_bytes(b"cos\nsystem\n")
    with pytest.raises(InputError, match="evil.pt: a file no manifest lists"):
        verify_manifest(ckpt)
    (ckpt / "ds" / "evil.pt").unlink()
    (ckpt / "kdshield_state.json").unlink()
    with pytest.raises(InputError, match="kdshield_state.json: listed in the manifest but missing"):
        verify_manifest(ckpt)


def test_a_tampered_in_process_checkpoint_is_refused_before_it_is_loaded(tiny_stream, tmp_path):
    from kdshield.errors import InputError
    from kdshield.trainables.stage_runs import StageRuns

    model_dir, tok, stream = tiny_stream
    scaling = ScalingSettings(workers=1, cpus_per_worker=2)
    stage = make_stage(model_dir, tok, epochs=3)

    def die_after_two(name, metrics):
        if metrics["epoch"] == 2:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        StageRuns(tmp_path).run(stage, {"train": stream}, scaling, on_report=die_after_two)
    ckpt = next(tmp_path.glob("*/checkpoint_000002"))
    victim = next(p for p in sorted((ckpt / "ds").rglob("*")) if p.is_file())
    victim.write_bytes(victim.read_bytes() + b"\0")
    with pytest.raises(InputError, match="changed since the checkpoint was saved"):
        StageRuns(tmp_path).run(stage, {"train": stream}, scaling)
