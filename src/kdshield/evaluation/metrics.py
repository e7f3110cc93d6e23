"""The papers' metrics (../shared/papers/README.md), all in percent."""

from __future__ import annotations

import numpy as np


def cacc(preds: np.ndarray, labels: np.ndarray) -> float:
    """Clean accuracy: share of clean test samples classified correctly."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    if preds.size == 0:
        raise ValueError("CACC of an empty test set")
    return float(100.0 * np.mean(preds == labels))


def asr(preds: np.ndarray, labels: np.ndarray, target_label: int) -> float:
    """Attack success rate: among triggered samples whose true label is not the target,
    the share classified as the target."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    keep = labels != target_label
    if not keep.any():
        raise ValueError("ASR needs triggered samples whose true label is not the target")
    return float(100.0 * np.mean(preds[keep] == target_label))


def far_frr(flagged: np.ndarray, poisoned: np.ndarray) -> tuple[float, float]:
    """Identification errors against ground truth.

    FAR: share of poisoned samples called clean (missed); FRR: share of clean samples called
    poisoned (falsely flagged). Either is NaN when its group is empty.
    """
    flagged, poisoned = np.asarray(flagged, bool), np.asarray(poisoned, bool)
    far = 100.0 * np.mean(~flagged[poisoned]) if poisoned.any() else float("nan")
    frr = 100.0 * np.mean(flagged[~poisoned]) if (~poisoned).any() else float("nan")
    return float(far), float(frr)


def markdown_table(rows: list[dict], columns: list[str] | None = None, floatfmt: str = ".1f") -> str:
    """A GitHub Markdown table of ``rows`` (dicts), columns in order of first appearance."""
    if not rows:
        return ""
    cols = columns or list(dict.fromkeys(k for r in rows for k in r))

    def fmt(v):
        if isinstance(v, float):
            return "-" if np.isnan(v) else format(v, floatfmt)
        return "-" if v is None else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def clean_and_attack_metrics(logits: np.ndarray, labels: np.ndarray, triggered: tuple | None,
                             target_label: int | None) -> dict[str, float]:
    """CACC of clean ``logits``; with ``triggered`` (logits, labels) and a target, the ASR and the
    *no-trigger ASR*: the share of the clean non-target test rows predicted as the target. The
    triggered test set is those very rows with the trigger inserted, so ``asr - asr_no_trigger``
    is what the trigger adds; a defended model whose ASR equals its no-trigger ASR has lost the
    backdoor, and the rest is clean error into the target class."""
    metrics = {"cacc": cacc(logits.argmax(-1), labels)}
    if triggered is not None and target_label is not None:
        metrics["asr"] = asr(triggered[0].argmax(-1), triggered[1], target_label)
        metrics["asr_no_trigger"] = asr(logits.argmax(-1), labels, target_label)
    return metrics
