"""Batch inference with Ray Data: predictions for evaluation, cached outputs of frozen teachers.

A frozen model's outputs do not change during a stage, so they are computed once here, as new
columns of the stream (``{prefix}logits`` [C], ``{prefix}pooled`` [H], ...), and the training
engine reads them next to the inputs instead of running the teacher at every step.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kdshield.datasets import pad_collate
from kdshield.evaluation.metrics import clean_and_attack_metrics
from kdshield.models import load_classifier, model_family
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
        self.model.eval()
        self.family = model_family(self.model.config)
        self.outputs, self.prefix, self.input_key = outputs, prefix, input_key
        self.pad_ids, self.padding_side = pad_ids or {}, padding_side

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        tensors = pad_collate({self.input_key: batch[self.input_key]}, pad_ids=self.pad_ids,
                              padding_side=self.padding_side)
        mask_key = self.input_key.replace("input_ids", "attention_mask")
        ids, mask = tensors[self.input_key], tensors[mask_key]
        with torch.inference_mode():
            out = model_outputs(self.model, ids, mask, self.outputs, self.family)
        result = dict(batch)
        keep = mask.bool()
        for name, value in out.items():
            if name not in TOKEN_OUTPUTS:
                result[f"{self.prefix}{name}"] = value.numpy()
                continue
            rows = []
            for i in range(value.shape[0]):
                k = keep[i]
                if name == "hidden_seq":
                    rows.append(value[i][k].numpy())
                elif name == "layer_seq":
                    rows.append(value[i][:, k].numpy())
                else:
                    rows.append(value[i][:, k][:, :, k].numpy())
            column = np.empty(len(rows), dtype=object)
            column[:] = rows
            result[f"{self.prefix}{name}"] = column
        return result


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
    """``{"cacc": ..., "asr": ..., "asr_no_trigger": ...}`` in percent (the ASRs only with a
    triggered test set); see :func:`clean_and_attack_metrics`."""
    logits, labels = predict_logits(clean_test, model_dir, num_labels, with_labels=True, **kwargs)
    triggered = None
    if triggered_test is not None:
        triggered = predict_logits(triggered_test, model_dir, num_labels, with_labels=True, **kwargs)
    return clean_and_attack_metrics(logits, labels, triggered, target_label)
