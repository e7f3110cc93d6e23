"""A content-hashed cache of shared work: stages, teacher outputs, logits, tokenised streams.

Trials of a search (and repeated jobs) often repeat work whose inputs are identical: BeDKD's
DMM stage for trials that differ only in AKD settings, the frozen teacher's outputs on the same
clean subset, the suspect model's logits on the whole training set. :class:`StageCache` keys
every such piece of work by a hash of *everything it depends on* and stores its result under
``ROOT/<kind>/<key>`` so that any process (every Tune trial runs in its own) finds it:

- **stage** (:meth:`StageCache.stage`): the key is the stage spec (content hash of the model
  it starts from, the fingerprints of its streams, each phase's stream and loss (every
  attribute, and the content of the loss's own module: :func:`describe_loss`), the training
  settings, padding, the scaling knobs that change numerics: workers, ZeRO, bf16). Stored: the
  trained HF directory, the losses' trained modules, a LoRA adapter, and the epoch history.
  Per-epoch evaluations (``Stage.evals``) are not part of the key: they observe, they do not
  train.
- **teacher** (:meth:`StageCache.teacher`): a stream plus a frozen model's output columns
  (Parquet, Ray's tensor columns round-trip), keyed by stream fingerprint + model hash.
- **logits** (:meth:`StageCache.logits`): a model's logits on a stream (``.npy``, no pickle).
- **stream** (:meth:`StageCache.stream`): tokenised streams are keyed by the table's content
  and the tokenizer; within one process they are built once (re-reading them from disk costs
  as much as tokenising again, so they are not stored).

A model directory's hash is the hash of its files (memoised per path), except that a stage's
output is known by its stage key. A stream's fingerprint is registered when the cache builds
it; any other Ray Dataset is fingerprinted by hashing its Arrow content. Concurrent processes
computing the same key serialise on a file lock: the second one waits and then hits.

Every lookup counts a hit or a miss (:attr:`StageCache.counts`, written to ``metrics.json``
by ``run_defend``) and is appended to ``ROOT/events.jsonl``, so a search can prove what it
skipped.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from kdshield.defenses.stage import ModelSpec, Phase
from kdshield.trainables.engine import StageResult

VERSION = "kdshield-stage-cache-2"  # 2: losses described by content
KINDS = ("stage", "teacher", "logits", "stream")


def _digest(*parts: Any) -> str:
    blob = json.dumps([VERSION, *parts], sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def _tensor_bytes(t) -> bytes:
    import torch

    flat = t.detach().cpu().contiguous().reshape(-1)
    return f"{t.dtype}{tuple(t.shape)}".encode() + flat.view(torch.uint8).numpy().tobytes()


def module_hash(module) -> str:
    """Hash of a module's structure, plain attributes (a mask threshold, a form) and every
    parameter and buffer: what a loss's own module (masks initialised from data, connectors, a
    projection head) contributes to a stage's result, which its repr does not show."""
    h = hashlib.sha256(repr(module).encode())
    for name, sub in module.named_modules():
        plain = {k: repr(v) for k, v in vars(sub).items() if not k.startswith("_") and k != "training"}
        h.update(json.dumps([name, plain], sort_keys=True).encode())
    for name, tensor in module.state_dict().items():
        h.update(name.encode() + _tensor_bytes(tensor))
    return h.hexdigest()[:32]


def describe_loss(loss) -> dict[str, Any]:
    """A stage loss by everything that sets its numbers: its type, every public attribute (its
    weights, temperatures, layers) and its own module's content (:func:`module_hash`), so two
    stages share a cache entry only when their losses compute the same thing."""
    import torch

    out: dict[str, Any] = {"type": f"{type(loss).__module__}.{type(loss).__qualname__}"}
    for key, value in sorted(vars(loss).items()):
        if key.startswith("_"):
            continue  # per-call scratch state (e.g. captured attention maps)
        if isinstance(value, torch.nn.Module):
            out[key] = module_hash(value)
        elif isinstance(value, torch.Tensor):
            out[key] = hashlib.sha256(_tensor_bytes(value)).hexdigest()[:32]
        else:
            out[key] = repr(value)
    return out


def table_fingerprint(table: pa.Table) -> str:
    """Hash of an Arrow table's content (schema metadata and chunking ignored)."""
    table = table.replace_schema_metadata(None).combine_chunks()
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return hashlib.sha256(sink.getvalue()).hexdigest()[:32]


def dir_hash(path: str | Path) -> str:
    """Hash of every file (relative name + bytes) under ``path``; of the name for a hub id."""
    root = Path(path)
    if not root.is_dir():
        return _digest("name", str(path))
    h = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(file.relative_to(root)).encode() + b"\0")
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:32]


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _publish(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(final)


class StageCache:
    """Content-hashed results of shared work under ``root`` (see the module docstring)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.counts = {kind: {"hits": 0, "misses": 0} for kind in KINDS}
        self.saved_seconds = 0.0  # what the hit stages had cost when they were computed
        self._fingerprints: dict[int, tuple[Any, str]] = {}
        self._model_hashes: dict[tuple, str] = {}
        self._streams: dict[str, Any] = {}

    # -- bookkeeping ----------------------------------------------------------------------
    def _count(self, kind: str, key: str, hit: bool, **extra) -> None:
        self.counts[kind]["hits" if hit else "misses"] += 1
        event = {"kind": kind, "key": key, "hit": hit, "pid": os.getpid(), "time": time.time(), **extra}
        with open(self.root / "events.jsonl", "a") as f:
            f.write(json.dumps(event, default=str) + "\n")

    def remember(self, ds, fingerprint: str):
        """Register ``fingerprint`` as the content hash of the Ray Dataset ``ds``; returns ``ds``."""
        self._fingerprints[id(ds)] = (ds, fingerprint)
        return ds

    def fingerprint(self, ds) -> str:
        """The registered fingerprint of ``ds``, else the hash of its Arrow content."""
        known = self._fingerprints.get(id(ds))
        if known is not None and known[0] is ds:
            return known[1]
        import ray

        tables = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
        fp = table_fingerprint(pa.concat_tables(tables)) if tables else _digest("empty", str(ds.schema()))
        self.remember(ds, fp)
        return fp

    def model_hash(self, path: str | Path) -> str:
        p = Path(path)
        stat = p.stat() if p.exists() else None
        memo = (str(p.resolve()) if stat else str(path), stat.st_mtime_ns if stat else 0)
        if memo not in self._model_hashes:
            self._model_hashes[memo] = dir_hash(p)
        return self._model_hashes[memo]

    def _known_model(self, path: Path, key: str) -> None:
        stat = path.stat()
        self._model_hashes[(str(path.resolve()), stat.st_mtime_ns)] = _digest("stage-output", key)

    def summary(self) -> dict[str, Any]:
        return {**{k: dict(v) for k, v in self.counts.items()}, "saved_seconds": self.saved_seconds,
                "root": str(self.root)}

    # -- tokenised streams (in-process) ---------------------------------------------------
    def stream(self, table: pa.Table, tokenizer_dir: str, max_length: int, build: Callable[[], Any],
               prefix: str = ""):
        key = _digest("stream", table_fingerprint(table), self.model_hash(tokenizer_dir), max_length, prefix)
        hit = key in self._streams
        if not hit:
            self._streams[key] = self.remember(build(), key)
        self._count("stream", key, hit)
        return self._streams[key]

    # -- teacher outputs --------------------------------------------------------------------
    def teacher(self, stream, teacher_dir: str, spec: dict[str, Any], build: Callable[[], Any]):
        """``build()`` (stream + teacher columns, materialised) once per content; Parquet on disk."""
        import ray.data

        key = _digest("teacher", self.fingerprint(stream), self.model_hash(teacher_dir), spec)
        final = self.root / "teacher" / key
        with _locked(final):
            hit = final.is_dir()
            if hit:
                ds = ray.data.read_parquet(str(final)).materialize()
            else:
                ds = build()
                tmp = final.with_name(f".{key}.tmp-{os.getpid()}")
                shutil.rmtree(tmp, ignore_errors=True)
                ds.write_parquet(str(tmp))
                _publish(tmp, final)
        self._count("teacher", key, hit)
        return self.remember(ds, key)

    # -- logits -----------------------------------------------------------------------------
    def logits(self, stream, model_dir: str, spec: dict[str, Any], build: Callable[[], np.ndarray]) -> np.ndarray:
        key = _digest("logits", self.fingerprint(stream), self.model_hash(model_dir), spec)
        final = self.root / "logits" / f"{key}.npy"
        with _locked(final):
            hit = final.is_file()
            if hit:
                out = np.load(final, allow_pickle=False)
            else:
                out = np.asarray(build())
                tmp = final.with_name(f".{key}.tmp-{os.getpid()}.npy")
                np.save(tmp, out, allow_pickle=False)
                os.replace(tmp, final)
        self._count("logits", key, hit)
        return out

    # -- stages -----------------------------------------------------------------------------
    def _describe(self, value) -> Any:
        """A JSON-able description of a stage field: model specs by content hash, losses by repr."""
        import dataclasses

        if isinstance(value, ModelSpec):
            return {**{f.name: repr(getattr(value, f.name)) for f in dataclasses.fields(value)},
                    "source": self.model_hash(value.source)}
        if isinstance(value, Phase):
            return [value.stream, value.label, describe_loss(value.loss)]
        if hasattr(value, "model_dump"):
            return value.model_dump(mode="json")
        if isinstance(value, (list, tuple)):
            return [self._describe(v) for v in value]
        if isinstance(value, dict):
            return {str(k): self._describe(v) for k, v in sorted(value.items())}
        return repr(value)

    def stage_key(self, stage, streams: dict[str, Any], scaling) -> str:
        """Hash of every field of ``stage`` except ``evals``, its trained streams' fingerprints and
        the scaling knobs that change numerics (workers, ZeRO, bf16)."""
        import dataclasses

        spec = {f.name: self._describe(getattr(stage, f.name)) for f in dataclasses.fields(stage)
                if f.name not in ("evals", "name")
                and not (f.name == "pad_to" and stage.pad_to is None)}  # keys from before pad_to stay valid
        trained = sorted({p.stream for p in stage.phases})
        return _digest("stage", spec, {name: self.fingerprint(streams[name]) for name in trained},
                       {"workers": scaling.workers, "zero": scaling.zero, "bf16": scaling.bf16,
                        # keys written before grad_accum existed stay valid at its default
                        **({"grad_accum": scaling.grad_accum} if scaling.grad_accum != 1 else {})})

    def stage(self, stage, streams: dict[str, Any], scaling, run: Callable[[], Any]):
        """The :class:`~kdshield.trainables.engine.StageResult` of ``stage``: ``run()`` once per key."""
        import dataclasses

        key = self.stage_key(stage, streams, scaling)
        final = self.root / "stage" / key
        with _locked(final):
            hit = (final / "result.json").is_file()
            if not hit:
                result = run()
                tmp = final.with_name(f".{key}.tmp-{os.getpid()}")
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                if result.model_dir is not None:
                    shutil.copytree(result.model_dir, tmp / "model")
                extras = getattr(result, "extras_path", None)
                if extras is not None:
                    shutil.copy2(extras, tmp / Path(extras).name)
                adapter = getattr(result, "adapter_dir", None)
                if adapter is not None:
                    shutil.copytree(adapter, tmp / "adapter")
                (tmp / "result.json").write_text(json.dumps(
                    {"stage": stage.name, "metrics": result.metrics, "history": result.history,
                     "seconds": result.seconds, "has_model": result.model_dir is not None,
                     "extras": Path(extras).name if extras is not None else None,
                     "has_adapter": adapter is not None}, default=str))
                _publish(tmp, final)
                template = result
            record = json.loads((final / "result.json").read_text())
        if hit:
            template = StageResult(model_dir=None, metrics={}, history=[], seconds=0.0, checkpoint_path=final)
            self.saved_seconds += float(record["seconds"])
        model_dir = final / "model" if record["has_model"] else None
        if model_dir is not None:
            self._known_model(model_dir, key)
        changes = {"model_dir": model_dir, "metrics": record["metrics"], "history": record["history"],
                   "seconds": 0.0 if hit else record["seconds"], "checkpoint_path": final}
        fields = {f.name for f in dataclasses.fields(template)}
        if record.get("extras") and "extras_path" in fields:
            changes["extras_path"] = final / record["extras"]
        if record.get("has_adapter") and "adapter_dir" in fields:
            changes["adapter_dir"] = final / "adapter"
        self._count("stage", key, hit, stage=stage.name, seconds=record["seconds"])
        return dataclasses.replace(template, **changes)


def read_events(root: str | Path) -> list[dict[str, Any]]:
    """Every lookup recorded under ``root`` (all processes), oldest first."""
    path = Path(root) / "events.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
