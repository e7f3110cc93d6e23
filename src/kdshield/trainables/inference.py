"""Batch inference with Ray Data: predictions for evaluation, cached outputs of frozen teachers.

A frozen model's outputs do not change during a stage, so they are computed once here, as new
columns of the stream (``{prefix}logits`` [C], ``{prefix}pooled`` [H], ...), and the training
engine reads them next to the inputs instead of running the teacher at every step.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kdshield.evaluation import asr, cacc

OUTPUTS = ("logits", "pooled", "hidden_states", "hidden_seq")


class BatchPredictor:
    """A Ray Data actor holding one model; adds its outputs as columns to each batch.

    ``outputs`` chooses among ``logits`` (float32 [C]), ``pooled`` (float32 [H]: the last hidden
    state at [CLS] or at the last non-pad token) and ``hidden_states`` (float32 [layers+1, H]:
    every layer's pooled state) and ``hidden_seq`` (float32 [L_i, H]: the last hidden state of every
    real token of the row, unpadded, re-padded per batch by pad_collate). Columns are prefixed with ``prefix``; ``input_key`` names the
    token-id column to read (``{input_key}`` and its padding come from pad_collate).
    """

    def __init__(self, model_dir: str, num_labels: int, *, outputs: tuple[str, ...] = ("logits",),
                 prefix: str = "", input_key: str = "input_ids", pad_ids: dict[str, int] | None = None,
                 padding_side: str = "right", threads: int = 1):
        import torch

        from kdshield.models import load_classifier, model_family

        unknown = set(outputs) - set(OUTPUTS)
        if unknown:
            raise ValueError(f"unknown outputs {sorted(unknown)}; choose from {OUTPUTS}")
        torch.set_num_threads(max(1, threads))
        self.model, _ = load_classifier(model_dir, num_labels)
        self.model.eval()
        self.family = model_family(self.model.config)
        self.outputs, self.prefix, self.input_key = outputs, prefix, input_key
        self.pad_ids, self.padding_side = pad_ids or {}, padding_side

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        from kdshield.datasets import pad_collate
        from kdshield.models.pooling import pool

        tensors = pad_collate({self.input_key: batch[self.input_key]}, pad_ids=self.pad_ids,
                              padding_side=self.padding_side)
        mask_key = self.input_key.replace("input_ids", "attention_mask")
        ids, mask = tensors[self.input_key], tensors[mask_key]
        need_hidden = any(o in self.outputs for o in ("pooled", "hidden_states", "hidden_seq"))
        with torch.inference_mode():
            out = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=need_hidden)
        result = dict(batch)
        if "logits" in self.outputs:
            result[f"{self.prefix}logits"] = out.logits.float().numpy()
        if "pooled" in self.outputs:
            result[f"{self.prefix}pooled"] = pool(out.hidden_states[-1], mask, self.family).float().numpy()
        if "hidden_states" in self.outputs:
            layers = torch.stack([pool(h, mask, self.family) for h in out.hidden_states], dim=1)
            result[f"{self.prefix}hidden_states"] = layers.float().numpy()
        if "hidden_seq" in self.outputs:
            last, keep = out.hidden_states[-1].float(), mask.bool()
            rows = [last[i][keep[i]].numpy() for i in range(last.shape[0])]
            column = np.empty(len(rows), dtype=object)
            column[:] = rows
            result[f"{self.prefix}hidden_seq"] = column
        return result


def predict(ds, model_dir: str, num_labels: int, *, outputs: tuple[str, ...] = ("logits",),
            prefix: str = "", input_key: str = "input_ids", pad_ids: dict[str, int] | None = None,
            padding_side: str = "right", batch_size: int = 64, concurrency: int = 1,
            cpus_per_actor: float = 1.0, gpus_per_actor: float = 0.0):
    """``ds`` (tokenised) with the model's outputs added as columns, by Ray Data actors."""
    import ray.data

    return ds.map_batches(
        BatchPredictor,
        fn_constructor_kwargs={"model_dir": str(model_dir), "num_labels": num_labels, "outputs": tuple(outputs),
                               "prefix": prefix, "input_key": input_key, "pad_ids": pad_ids,
                               "padding_side": padding_side, "threads": int(cpus_per_actor)},
        batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=cpus_per_actor, num_gpus=gpus_per_actor or None)


def predict_logits(ds, model_dir: str, num_labels: int, *, with_labels: bool = False, **kwargs):
    """Logits [N, C] for every row of the tokenised ``ds``, in ``source_index`` order
    (and the rows' labels [N] too with ``with_labels``)."""
    columns = ["source_index", "logits"] + (["label"] if with_labels else [])
    out = predict(ds, model_dir, num_labels, **kwargs).select_columns(columns)
    parts = list(out.iter_batches(batch_size=None, batch_format="numpy"))
    order = np.argsort(np.concatenate([p["source_index"] for p in parts]), kind="stable")
    logits = np.concatenate([np.asarray(p["logits"]) for p in parts])[order]
    if not with_labels:
        return logits
    return logits, np.concatenate([p["label"] for p in parts])[order]


def evaluate(model_dir: str, num_labels: int, *, clean_test, triggered_test=None,
             target_label: int | None = None, **kwargs) -> dict[str, float]:
    """``{"cacc": ..., "asr": ...}`` in percent (ASR only with a triggered test set)."""
    logits, labels = predict_logits(clean_test, model_dir, num_labels, with_labels=True, **kwargs)
    metrics = {"cacc": cacc(logits.argmax(-1), labels)}
    if triggered_test is not None:
        t_logits, t_labels = predict_logits(triggered_test, model_dir, num_labels, with_labels=True, **kwargs)
        metrics["asr"] = asr(t_logits.argmax(-1), t_labels, target_label)
    return metrics
