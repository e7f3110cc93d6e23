"""The context every defense recipe runs in: :class:`JobContext` implements
:class:`kdshield.defenses.base.Context` on Ray Train + DeepSpeed + Ray Data.

Streams are materialised Ray Datasets of tokenised rows; frozen teachers' outputs are computed
once by Ray Data batch inference and travel as ``teacher_*`` columns; every stage of every
recipe runs through :meth:`JobContext.train` on the one engine, so a caller's hooks (a tune
trial's stage cache, per-epoch evaluation, named resumable runs, Ray Train callbacks) apply to
all of them without a recipe knowing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import ray
import ray.data
from ray.data.block import BlockAccessor

from kdshield.config import TrainSettings
from kdshield.datasets import tokenize_dataset
from kdshield.defenses.base import Inputs
from kdshield.defenses.stage import EpochEval, ModelSpec, Phase, Stage
from kdshield.models import load_tokenizer
from kdshield.trainables.attack import tokenized_stream
from kdshield.trainables.engine import run_stage, trains_in_process
from kdshield.trainables.hooks import DefenseHooks
from kdshield.trainables.inference import LocalScorer, evaluate, predict, stream_columns
from kdshield.outputs import say


class JobContext:
    """One defend job's runtime: its inputs, typed config, staging directory and services."""

    def __init__(self, job, inputs: Inputs, config, work: Path, hooks: DefenseHooks | None = None):
        self.job, self.inputs, self.config, self.work = job, inputs, config, work
        self.hooks = hooks or DefenseHooks()
        self.workers = job.scaling.workers
        self.live_teachers = job.teacher_outputs == "live"
        # frozen models score in this process when the job trains in it (else: Ray Data actors)
        self.scorer = (LocalScorer(inputs.num_labels, threads=int(job.scaling.cpus_per_worker))
                       if trains_in_process(job.scaling) else None)
        tok = load_tokenizer(inputs.model_dir)
        # every tokenisation this job makes: its pad id and padding side, by input-ids column
        self.pad_ids = {"input_ids": tok.pad_token_id}
        self.padding_side = {"input_ids": getattr(config, "padding_side", tok.padding_side)}
        self.stage_seconds: dict[str, float] = {}
        self.history: dict[str, list] = {}
        self.stage_peak_rss_mb: dict[str, float] = {}
        self.stage_memory_mb: dict[str, dict] = {}

    # -- streams --------------------------------------------------------------------------
    def _tokenizer(self, tokenizer: str, prefix: str) -> None:
        tok = load_tokenizer(tokenizer)
        self.pad_ids.setdefault(f"{prefix}input_ids", tok.pad_token_id)
        self.padding_side.setdefault(f"{prefix}input_ids", tok.padding_side)

    def stream(self, table: pa.Table, *, tokenizer: str | None = None, prefix: str = ""):
        tokenizer = tokenizer or self.inputs.model_dir
        self._tokenizer(tokenizer, prefix)

        def build():
            return tokenized_stream(table, tokenizer, self.config.max_length, prefix=prefix)

        cache = self.hooks.cache
        return cache.stream(table, tokenizer, self.config.max_length, build, prefix) if cache else build()

    def retokenize(self, stream, tokenizer: str, *, prefix: str):
        self._tokenizer(tokenizer, prefix)
        return tokenize_dataset(stream, tokenizer, max_length=self.config.max_length, prefix=prefix).materialize()

    def map(self, stream, fn: Callable[..., dict], **kwargs: Any):
        return stream.map_batches(fn, batch_format="numpy", fn_kwargs=kwargs).materialize()

    def columns(self, stream, names: list[str]) -> dict[str, np.ndarray]:
        return stream_columns(stream, names)

    # -- frozen models --------------------------------------------------------------------
    def _predict_kwargs(self, input_prefix: str) -> dict[str, Any]:
        key = f"{input_prefix}input_ids"
        return {"input_key": key, "pad_ids": {key: self.pad_ids[key]}, "padding_side": self.padding_side[key],
                "cpus_per_actor": self.job.scaling.cpus_per_worker,
                "gpus_per_actor": self.job.scaling.gpus_per_worker}  # inference runs where training does

    def teacher(self, stream, model_dir: str, outputs: tuple[str, ...], *, input_prefix: str = "",
                attn_implementation: str | None = None):
        kwargs = self._predict_kwargs(input_prefix)
        with self.timed("teacher_cache"):
            def build():
                if self.scorer is not None:
                    return self._with_outputs(stream, model_dir, tuple(outputs), kwargs, attn_implementation)
                return predict(stream, model_dir, self.inputs.num_labels, outputs=tuple(outputs), prefix="teacher_",
                               attn_implementation=attn_implementation, **kwargs).materialize()

            cache = self.hooks.cache
            spec = {"outputs": list(outputs), "pad": kwargs["pad_ids"], "side": kwargs["padding_side"],
                    "input_key": kwargs["input_key"], "attn": attn_implementation,
                    "num_labels": self.inputs.num_labels}
            return cache.teacher(stream, model_dir, spec, build) if cache else build()

    def predict(self, stream, model_dir: str, outputs: tuple[str, ...] = ("logits",), *,
                input_prefix: str = "") -> dict[str, np.ndarray]:
        kwargs = self._predict_kwargs(input_prefix)

        def build() -> dict[str, np.ndarray]:
            if self.scorer is not None:
                key = kwargs["input_key"]
                cols = self.scorer.score(self.columns(stream, [key])[key], model_dir, tuple(outputs),
                                         pad_id=kwargs["pad_ids"][key], padding_side=kwargs["padding_side"])
            else:
                out = predict(stream, model_dir, self.inputs.num_labels, outputs=tuple(outputs), **kwargs)
                cols = self.columns(out, list(outputs))
            return {k: np.stack(list(v)) if v.dtype == object else v for k, v in cols.items()}

        cache = self.hooks.cache
        if cache is None or tuple(outputs) != ("logits",):
            return build()
        spec = {"pad": kwargs["pad_ids"], "side": kwargs["padding_side"], "input_key": kwargs["input_key"],
                "num_labels": self.inputs.num_labels}
        return {"logits": cache.logits(stream, model_dir, spec, lambda: build()["logits"])}

    def evaluate(self, model_dir: str) -> dict[str, float]:
        i = self.inputs
        triggered = self.stream(i.triggered) if i.triggered is not None and i.target_label is not None else None
        kwargs = self._predict_kwargs("")
        kwargs.pop("input_key")
        return evaluate(model_dir, i.num_labels, clean_test=self.stream(i.test), triggered_test=triggered,
                        target_label=i.target_label, scorer=self.scorer, **kwargs)

    def _with_outputs(self, stream, model_dir: str, outputs: tuple[str, ...], kwargs: dict, attn: str | None):
        """``stream`` (rows in its order) with ``teacher_*`` columns scored in this process."""
        key = kwargs["input_key"]
        table = pa.concat_tables(ray.get(stream.to_arrow_refs()))
        cols = self.scorer.score(table.column(key).to_numpy(zero_copy_only=False), model_dir, outputs,
                                 pad_id=kwargs["pad_ids"][key], padding_side=kwargs["padding_side"],
                                 attn_implementation=attn)
        block = BlockAccessor.batch_to_block({f"teacher_{name}": value for name, value in cols.items()})
        for name in block.column_names:
            table = table.append_column(block.schema.field(name), block.column(name))
        return ray.data.from_arrow(table)

    # -- stages ---------------------------------------------------------------------------
    def train(self, name: str, model: ModelSpec | None, phases: list[Phase], streams: dict[str, Any], *,
              epochs: int, lr: float, batch_size: int | None = None, pad_ids: dict | None = None,
              padding_side: Any = None, live_teacher: ModelSpec | None = None,
              live_outputs: tuple[str, ...] = ("logits", "hidden_seq")):
        """Every stage of every recipe runs here, on the one engine, so the caller's hooks apply to
        all of them: per-epoch evaluation of the stages that train the defended model, the shared
        stage cache, named resumable runs and Ray Train callbacks. Records the stage's seconds,
        history and peak memory; returns its :class:`~kdshield.trainables.engine.StageResult`."""
        c, hooks = self.config, self.hooks
        model = model.as_adapter(self.job.lora) if model is not None else None  # --lora R
        stage = Stage(name=name, model=model, phases=tuple(phases),
                      pad_ids=self.pad_ids if pad_ids is None else pad_ids,
                      padding_side=self.padding_side if padding_side is None else padding_side,
                      train=TrainSettings(epochs=epochs, lr=lr, batch_size=batch_size or c.batch_size,
                                          max_length=c.max_length, warmup_ratio=0.0, seed=c.seed),
                      live_teacher=live_teacher, live_teacher_outputs=tuple(live_outputs), pad_to=self.job.pad_to)
        say(f"stage {stage.name}: {stage.train.epochs} epoch(s) over "
            f"{', '.join(f'{k} ({v.count()} rows)' for k, v in streams.items())}")
        if stage.name in hooks.eval_stages and hooks.eval_streams and stage.model is not None:
            stage = dataclasses.replace(stage, evals=tuple(EpochEval(s) for s in hooks.eval_streams))
            streams = {**streams, **hooks.eval_streams}

        def run():
            if hooks.stage_runs is not None:  # named, resumable runs (a retried Tune trial resumes them)
                return hooks.stage_runs.run(stage, streams, self.job.scaling, callbacks=hooks.callbacks,
                                            on_report=hooks.on_report)
            return run_stage(stage, streams, self.job.scaling, storage=self.work / "ray", callbacks=hooks.callbacks,
                             on_report=hooks.on_report)

        if self.scorer is not None:
            self.scorer.release()  # the models it scored with make room for the stage (outputs stay memoised)
        result = hooks.cache.stage(stage, streams, self.job.scaling, run) if hooks.cache else run()
        self.stage_seconds[name] = result.seconds
        self.history[name] = result.history
        self._record_memory(name, result.history)
        return result

    def _record_memory(self, name: str, history: list[dict]) -> None:
        peaks = [h["peak_rss_mb"] for h in history if h.get("peak_rss_mb") is not None]
        if peaks:
            self.stage_peak_rss_mb[name] = max(peaks)
        memory: dict[str, Any] = {}  # per worker (MB): whole process, training only, after init
        for key in ("peak_rss_mb_per_rank", "train_peak_rss_mb_per_rank", "rss_after_init_mb_per_rank"):
            rows = [h.get(key) for h in history if h.get(key)]
            if rows:
                memory[key] = [max((r[k] for r in rows if r[k] is not None), default=None)
                               for k in range(len(rows[0]))]
        self.stage_memory_mb[name] = memory

    # -- bookkeeping ----------------------------------------------------------------------
    @contextlib.contextmanager
    def timed(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.stage_seconds[name] = self.stage_seconds.get(name, 0.0) + time.perf_counter() - t0

    def say(self, message: str) -> None:
        say(message)

    def record(self) -> dict[str, Any]:
        """What the job's metrics.json gets from its context."""
        record = {"stage_seconds": self.stage_seconds, "history": self.history,
                  "stage_peak_rss_mb": self.stage_peak_rss_mb, "stage_memory_mb": self.stage_memory_mb}
        if self.scorer is not None:  # rows each frozen model ran, and rows it handed out
            record["inference_rows"] = {"scored": dict(self.scorer.rows_scored), "served": dict(self.scorer.rows_served)}
        return record
