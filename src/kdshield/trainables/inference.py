"""Batch inference with Ray Data: predictions for evaluation, cached outputs of frozen teachers.

A frozen model's outputs do not change during a stage, so they are computed once here, as new
columns of the stream (``{prefix}logits`` [C], ``{prefix}pooled`` [H], ...), and the training
engine reads them next to the inputs instead of running the teacher at every step.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from kdshield.datasets import pad_collate
from kdshield.evaluation.metrics import clean_and_attack_metrics
from kdshield.models import accelerator_device, load_classifier, model_family
from kdshield.models.outputs import OUTPUTS, TOKEN_OUTPUTS, model_outputs


class BatchPredictor:
    """A Ray Data actor holding one model; adds its outputs as columns to each batch.

    ``outputs`` chooses among the outputs of :func:`model_outputs`: ``logits`` (float32 [C]),
    ``pooled`` ([H]), ``hidden_states`` ([layers+1, H]: every layer's pooled state) and the
    per-token ones, stored unpadded (only the row's real tokens) and re-padded per batch by
    pad_collate: ``hidden_seq`` ([L_i, H]), ``layer_seq`` ([layers+1, L_i, H]) and
    ``ae_token_map`` ([layers, L_i, L_i]; loads the model with eager attention). Columns are
    prefixed with ``prefix``; ``input_key`` names the token-id column to read (``{input_key}``
    and its padding come from pad_collate).

    Cost of caching (float32, per row of L_i tokens, N layers, width H): ``hidden_seq``
    4 L_i H bytes, ``layer_seq`` 4 (N+1) L_i H, ``ae_token_map`` 4 N L_i^2
    (:func:`cache_bytes`); e.g. MiniLM (N 6, H 384) at 48 tokens: 74 KB, 516 KB and 55 KB.
    """

    def __init__(self, model_dir: str, num_labels: int, *, outputs: tuple[str, ...] = ("logits",),
                 prefix: str = "", input_key: str = "input_ids", pad_ids: dict[str, int] | None = None,
                 padding_side: str = "right", threads: int = 1, attn_implementation: str | None = None):
        import torch

        unknown = set(outputs) - set(OUTPUTS)
        if unknown:
            raise ValueError(f"unknown outputs {sorted(unknown)}; choose from {OUTPUTS}")
        if "ae_token_map" in outputs:
            attn_implementation = "eager"
        torch.set_num_threads(max(1, threads))
        self.model, _ = load_classifier(model_dir, num_labels, attn_implementation=attn_implementation)
        self.model.to(accelerator_device()).eval()  # a GPU when the pool was given one
        self.family = model_family(self.model.config)
        self.outputs, self.prefix, self.input_key = outputs, prefix, input_key
        self.pad_ids, self.padding_side = pad_ids or {}, padding_side

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        rows = _run_model(self.model, self.family, batch[self.input_key], self.outputs,
                          pad_id=self.pad_ids[self.input_key], padding_side=self.padding_side)
        result = dict(batch)
        for name, values in rows.items():
            result[f"{self.prefix}{name}"] = _column(values, name)
        return result


def _run_model(model, family: str, ids: Sequence[np.ndarray], outputs: tuple[str, ...], *, pad_id: int,
               padding_side: str) -> dict[str, list[np.ndarray]]:
    """One padded batch of token-id rows through ``model``: every output, row by row (per-token
    outputs cut to the row's real tokens)."""
    import torch

    column = np.empty(len(ids), dtype=object)
    column[:] = list(ids)
    tensors = pad_collate({"input_ids": column}, pad_ids={"input_ids": pad_id}, padding_side=padding_side)
    mask = tensors["attention_mask"]
    device = next(model.parameters()).device
    with torch.inference_mode():
        out = model_outputs(model, tensors["input_ids"].to(device), mask.to(device), outputs, family)
    out = {name: value.float().cpu() for name, value in out.items()}
    keep = mask.bool()
    rows: dict[str, list[np.ndarray]] = {}
    for name, value in out.items():
        if name not in TOKEN_OUTPUTS:
            rows[name] = list(value.numpy())
        elif name == "hidden_seq":
            rows[name] = [value[i][keep[i]].numpy() for i in range(value.shape[0])]
        elif name == "layer_seq":
            rows[name] = [value[i][:, keep[i]].numpy() for i in range(value.shape[0])]
        else:
            rows[name] = [value[i][:, keep[i]][:, :, keep[i]].numpy() for i in range(value.shape[0])]
    return rows


def _column(values: list[np.ndarray], name: str) -> np.ndarray:
    """Rows of one output as a column: stacked when every row has one shape, else an object array."""
    if name not in TOKEN_OUTPUTS:
        return np.stack(values) if values else np.zeros((0,), dtype=np.float32)
    column = np.empty(len(values), dtype=object)
    column[:] = values
    return column


class _TerminalProgress:
    """A one-line progress bar on stderr, drawn only when a person watches a terminal (never in a
    log file) and the work is long enough to be worth one (``total`` >= ``min_total`` rows)."""

    def __init__(self, label: str, total: int, *, min_total: int = 1000, stream=None):
        import sys

        self.stream = stream or sys.stderr
        self.label, self.total, self.done = label, total, 0
        self.on = total >= min_total and self.stream.isatty()

    def update(self, n: int) -> None:
        self.done += n
        if self.on:
            width = 30
            filled = int(width * self.done / max(1, self.total))
            self.stream.write(f"\rkdshield: {self.label} [{'#' * filled}{'.' * (width - filled)}] "
                              f"{self.done}/{self.total}")
            self.stream.flush()

    def close(self) -> None:
        if self.on:
            self.stream.write("\n")
            self.stream.flush()


class LocalScorer:
    """Frozen models' outputs computed in this process, for jobs whose tables it holds anyway.

    No actor pool is started per call: each model is loaded once (the last ``keep_models``
    stay loaded) and scores each distinct row once per job. Outputs are memoised by the row's
    token ids (its content: not its label, not its position), so one text in the DMM set, the
    trust set and the training set is scored once, and every later use takes its slice.
    Batches are length-sorted, so a batch pads to rows of about its own length. Torch runs on
    ``threads`` threads while scoring. ``rows_scored``/``rows_served`` count, per model, the
    rows actually run and the rows handed out.
    """

    def __init__(self, num_labels: int, *, threads: int, batch_size: int = 64, keep_models: int = 2):
        self.num_labels, self.threads, self.batch_size, self.keep_models = num_labels, threads, batch_size, keep_models
        self._models: OrderedDict[tuple, tuple[Any, str]] = OrderedDict()
        self._memo: dict[tuple, dict[bytes, dict[str, np.ndarray]]] = {}
        self.rows_scored: Counter[str] = Counter()
        self.rows_served: Counter[str] = Counter()

    def _model(self, model_dir: str, attn: str | None):
        key = (model_dir, attn)
        if key not in self._models:
            model, _ = load_classifier(model_dir, self.num_labels, attn_implementation=attn)
            self._models[key] = (model.to(accelerator_device()).eval(), model_family(model.config))
            while len(self._models) > self.keep_models:
                self._models.popitem(last=False)
        self._models.move_to_end(key)
        return self._models[key]

    def release(self) -> None:
        """Unload every model; their outputs stay memoised. A training stage calls this first, so
        the frozen copies scored before it (the suspect, a DMM) do not sit beside the model it trains."""
        import gc

        self._models.clear()
        gc.collect()

    def score(self, ids: Sequence[np.ndarray], model_dir: str, outputs: tuple[str, ...], *, pad_id: int,
              padding_side: str = "right", attn_implementation: str | None = None) -> dict[str, np.ndarray]:
        """``outputs`` of ``model_dir`` for every row of ``ids`` (token-id arrays), in their order:
        stacked arrays, per-token outputs as object arrays of the rows' arrays."""
        import torch

        unknown = set(outputs) - set(OUTPUTS)
        if unknown:
            raise ValueError(f"unknown outputs {sorted(unknown)}; choose from {OUTPUTS}")
        model_dir = str(model_dir)
        attn = "eager" if "ae_token_map" in outputs else attn_implementation
        memo = self._memo.setdefault((model_dir, attn, pad_id, padding_side), {})
        keys = [np.asarray(row, dtype=np.int64).tobytes() for row in ids]
        todo = sorted({k for k in keys if not set(outputs) <= memo.get(k, {}).keys()}, key=len)
        if todo:
            model, family = self._model(model_dir, attn)
            threads = torch.get_num_threads()
            torch.set_num_threads(max(1, self.threads))
            bar = _TerminalProgress(f"scoring {len(todo)} rows with {Path(model_dir).name}", len(todo))
            try:
                for start in range(0, len(todo), self.batch_size):
                    chunk = todo[start:start + self.batch_size]
                    rows = _run_model(model, family, [np.frombuffer(k, dtype=np.int64) for k in chunk], outputs,
                                      pad_id=pad_id, padding_side=padding_side)
                    for i, k in enumerate(chunk):
                        memo.setdefault(k, {}).update({name: values[i] for name, values in rows.items()})
                    bar.update(len(chunk))
            finally:
                bar.close()
                torch.set_num_threads(threads)
            self.rows_scored[model_dir] += len(todo)
        self.rows_served[model_dir] += len(keys)
        return {name: _column([memo[k][name] for k in keys], name) for name in outputs}


def predict(ds, model_dir: str, num_labels: int, *, outputs: tuple[str, ...] = ("logits",),
            prefix: str = "", input_key: str = "input_ids", pad_ids: dict[str, int] | None = None,
            padding_side: str = "right", batch_size: int = 64, concurrency: int = 1,
            cpus_per_actor: float = 1.0, gpus_per_actor: float = 0.0, attn_implementation: str | None = None):
    """``ds`` (tokenised) with the model's outputs added as columns, by Ray Data actors."""
    import ray.data

    return ds.map_batches(
        BatchPredictor,
        fn_constructor_kwargs={"model_dir": str(model_dir), "num_labels": num_labels, "outputs": tuple(outputs),
                               "prefix": prefix, "input_key": input_key, "pad_ids": pad_ids,
                               "padding_side": padding_side, "threads": int(cpus_per_actor),
                               "attn_implementation": attn_implementation},
        batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=cpus_per_actor, num_gpus=gpus_per_actor or None)


def stream_columns(ds, names: list[str]) -> dict[str, np.ndarray]:
    """Columns ``names`` of every row of the Ray Dataset ``ds``, in ``source_index`` order."""
    keep = ["source_index", *[n for n in names if n != "source_index"]]
    parts = list(ds.select_columns(keep).iter_batches(batch_size=None, batch_format="numpy"))
    order = np.argsort(np.concatenate([p["source_index"] for p in parts]), kind="stable")
    return {n: np.concatenate([np.asarray(p[n]) for p in parts])[order] for n in names}


def predict_logits(ds, model_dir: str, num_labels: int, *, with_labels: bool = False,
                   scorer: LocalScorer | None = None, **kwargs):
    """Logits [N, C] for every row of the tokenised ``ds``, in ``source_index`` order
    (and the rows' labels [N] too with ``with_labels``); by ``scorer`` in this process when
    given, else by Ray Data actors."""
    names = ["logits"] + (["label"] if with_labels else [])
    if scorer is not None:
        cols = stream_columns(ds, ["input_ids"] + names[1:])
        cols["logits"] = scorer.score(cols["input_ids"], model_dir, ("logits",), pad_id=kwargs["pad_ids"]["input_ids"],
                                      padding_side=kwargs.get("padding_side", "right"))["logits"]
    else:
        cols = stream_columns(predict(ds, model_dir, num_labels, **kwargs), names)
    return (cols["logits"], cols["label"]) if with_labels else cols["logits"]


def evaluate(model_dir: str, num_labels: int, *, clean_test, triggered_test=None,
             target_label: int | None = None, **kwargs) -> dict[str, float]:
    """``{"cacc": ..., "asr": ..., "asr_no_trigger": ...}`` in percent (the ASRs only with a
    triggered test set); see :func:`clean_and_attack_metrics`."""
    logits, labels = predict_logits(clean_test, model_dir, num_labels, with_labels=True, **kwargs)
    triggered = None
    if triggered_test is not None:
        triggered = predict_logits(triggered_test, model_dir, num_labels, with_labels=True, **kwargs)
    return clean_and_attack_metrics(logits, labels, triggered, target_label)
