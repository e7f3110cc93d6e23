"""BeDKD's identification step (Eq. 4) and the labels it works with (numpy only).

:func:`mepd` is the mean absolute difference of the suspect model's and the DMM's class
probabilities; a suspect training sample is called poisoned when its MEPD is below ``gamma``
(:func:`identify`), fixed or calibrated from clean data to a target FRR (:func:`calibrate_gamma`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch


def flip_labels(labels: np.ndarray | torch.Tensor, num_labels: int) -> np.ndarray | torch.Tensor:
    """The DMM's wrong labels: binary ``y' = 1 - y``; multi-class the cyclic
    ``y' = (y + 1) mod C`` (the authors' code). Same type, shape and dtype as ``labels``."""
    if num_labels < 2:
        raise ValueError(f"flip_labels needs at least 2 classes, got {num_labels}")
    bad = (labels < 0) | (labels >= num_labels)
    if bool(bad.any()):
        raise ValueError(f"flip_labels: labels outside [0, {num_labels})")
    if num_labels == 2:
        return 1 - labels
    return (labels + 1) % num_labels


def majority_label(preds) -> int:
    """The most frequent label in ``preds`` (ties go to the smaller label)."""
    preds = np.asarray(preds).reshape(-1)
    if preds.size == 0:
        raise ValueError("majority_label of no predictions")
    if (preds < 0).any():
        raise ValueError("majority_label: negative labels")
    return int(np.bincount(preds.astype(np.int64)).argmax())


def suspected_target(preds, clean_labels) -> int:
    """The label the suspect model over-predicts on its training set: the largest excess of its
    share of ``preds`` over its share of the defender's ``clean_labels`` (ties: the smaller label).

    Dirty-label poisoning adds about poison_rate x N predictions of the target. On balanced data the
    target is then also the majority label, which is what the authors' code takes; on imbalanced
    data it need not be: on R8 the majority is 'earn' (47% of the articles), and restricting the
    candidates to it made every identified sample clean (``benchmarks/results/bedkd_r8.md``).
    """
    preds = np.asarray(preds).reshape(-1).astype(np.int64)
    clean_labels = np.asarray(clean_labels).reshape(-1).astype(np.int64)
    if preds.size == 0 or clean_labels.size == 0:
        raise ValueError("suspected_target needs predictions and clean labels")
    if (preds < 0).any() or (clean_labels < 0).any():
        raise ValueError("suspected_target: negative labels")
    n = int(max(preds.max(), clean_labels.max())) + 1
    excess = np.bincount(preds, minlength=n) / preds.size - np.bincount(clean_labels, minlength=n) / clean_labels.size
    return int(excess.argmax())


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits`` [N, C] (numerically stable), float64."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _probabilities(name: str, p: np.ndarray) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"mepd: {name} must be [N, C], got shape {p.shape}")
    if p.size and ((p < -1e-6).any() or not np.allclose(p.sum(-1), 1.0, atol=1e-3)):
        raise ValueError(f"mepd: {name} rows are not probability distributions "
                         "(logits? apply softmax() first)")
    return p


def mepd(p_teacher: np.ndarray, p_dmm: np.ndarray) -> np.ndarray:
    """Mean error of probability distributions (Eq. 4): ``mean_y |p_teacher(y) - p_dmm(y)|``.

    ``p_teacher``, ``p_dmm``: class probabilities [N, C] (convert logits with
    :func:`softmax`). Returns [N] float64 in [0, 2 / C].
    """
    pt, pd = _probabilities("p_teacher", p_teacher), _probabilities("p_dmm", p_dmm)
    if pt.shape != pd.shape:
        raise ValueError(f"mepd: p_teacher {pt.shape} and p_dmm {pd.shape} differ in shape")
    return np.abs(pt - pd).mean(axis=-1)


def calibrate_gamma(mepd_clean: np.ndarray, target_frr: float) -> float:
    """The MEPD threshold whose FRR on the clean samples ``mepd_clean`` is ``target_frr``.

    A sample is flagged when ``MEPD < gamma`` (strict). With the clean values sorted
    ``v_1 <= ... <= v_n`` and ``k = floor(target_frr * n)`` (the number of clean samples
    allowed to be flagged), gamma is ``v_{k+1}``: exactly the k smallest values lie below it,
    so the FRR is exactly ``k / n`` (= target_frr when ``target_frr * n`` is an integer).
    Ties: values equal to ``v_{k+1}`` are not flagged, so when ties straddle the k-th place
    fewer are flagged: the FRR on the calibration set never exceeds ``target_frr`` and is the
    largest achievable that does not. ``k = 0`` gives ``v_1`` (nothing flagged).
    """
    values = np.sort(np.asarray(mepd_clean, dtype=np.float64).reshape(-1))
    if values.size == 0:
        raise ValueError("calibrate_gamma needs at least one clean MEPD value")
    if not np.isfinite(values).all():
        raise ValueError("calibrate_gamma: clean MEPD values must be finite")
    if not 0.0 < target_frr < 1.0:
        raise ValueError(f"target_frr must be in (0, 1), got {target_frr}")
    k = math.floor(target_frr * values.size + 1e-9)  # 0.29 * 100 = 28.999...
    return float(values[min(k, values.size - 1)])


def identify(mepd: np.ndarray, preds: np.ndarray, *, gamma: float, n_p: int,
             target_label: int | None, selection: str = "smallest", seed: int = 0,
             confidence: np.ndarray | None = None) -> np.ndarray:
    """Indices of the samples called poisoned, ascending (int64).

    A sample qualifies when ``mepd < gamma`` and, unless ``target_label`` is None, the
    poisoned model predicts it as ``target_label`` (``preds == target_label``). At most
    ``n_p`` qualifying samples are kept, chosen by ``selection``:

    * ``"confident"``: the largest ``confidence`` [N] (ties: lower index); see
      :func:`backdoor_confidence`, the value run_bedkd passes;
    * ``"smallest"``: the smallest MEPD (ties: lower index);
    * ``"random"``: a uniform sample drawn with ``seed``.

    Why "confident" exists: MEPD is also small where *both* models are unsure (p close to
    1/C in each), i.e. on ambiguous clean samples, and "smallest" picks those first. A
    backdoored sample is one where the DMM kept the poisoned model's verdict *with its
    confidence*, so among the candidates the ones both models are surest about are the
    poisoned ones (measured: the precision columns of benchmarks/results/bedkd.md).
    """
    values = np.asarray(mepd, dtype=np.float64).reshape(-1)
    preds = np.asarray(preds).reshape(-1)
    if preds.shape != values.shape:
        raise ValueError(f"identify: {values.size} MEPD values but {preds.size} predictions")
    if n_p < 0:
        raise ValueError(f"n_p must be >= 0, got {n_p}")
    keep = values < gamma
    if target_label is not None:
        keep &= preds == target_label
    idx = np.flatnonzero(keep)
    if selection == "confident":
        if confidence is None:
            raise ValueError("identify: selection='confident' needs the confidence values")
        conf = np.asarray(confidence, dtype=np.float64).reshape(-1)
        if conf.shape != values.shape:
            raise ValueError(f"identify: {values.size} MEPD values but {conf.size} confidence values")
        idx = idx[np.argsort(-conf[idx], kind="stable")[:n_p]]
    elif selection == "smallest":
        idx = idx[np.argsort(values[idx], kind="stable")[:n_p]]
    elif selection == "random":
        idx = np.random.default_rng(seed).permutation(idx)[:n_p]
    else:
        raise ValueError(f"selection must be 'confident', 'smallest' or 'random', got {selection!r}")
    return np.sort(idx).astype(np.int64)


def backdoor_confidence(p_teacher: np.ndarray, p_dmm: np.ndarray) -> np.ndarray:
    """``min(p_teacher[i, y_i], p_dmm[i, y_i])`` with ``y_i`` the teacher's predicted label:
    how sure *both* models are of the poisoned model's verdict. [N, C] probabilities -> [N]."""
    pt, pd = _probabilities("p_teacher", p_teacher), _probabilities("p_dmm", p_dmm)
    if pt.shape != pd.shape:
        raise ValueError(f"backdoor_confidence: p_teacher {pt.shape} and p_dmm {pd.shape} differ in shape")
    y = pt.argmax(-1)[:, None]
    return np.minimum(np.take_along_axis(pt, y, 1), np.take_along_axis(pd, y, 1))[:, 0]


def plot_mepd_histogram(mepd: np.ndarray, poisoned: np.ndarray | None, gamma: float,
                        path: str | Path) -> Path:
    """Write a PNG histogram of ``mepd`` [N] to ``path``: clean and poisoned samples
    separately when the ground truth ``poisoned`` [N] (bool) is given, one histogram
    otherwise, with a vertical line at ``gamma``. Returns the path."""
    # matplotlib is heavy and only needed for this picture
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    values = np.asarray(mepd, dtype=np.float64).reshape(-1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    hi = max(float(values.max()) if values.size else 0.0, float(gamma)) * 1.05 or 1.0
    bins = np.linspace(0.0, hi, 41)
    if poisoned is None:
        ax.hist(values, bins=bins, color="tab:blue", alpha=0.8, label=f"samples (n={values.size})")
    else:
        flags = np.asarray(poisoned, dtype=bool).reshape(-1)
        if flags.shape != values.shape:
            raise ValueError(f"plot_mepd_histogram: {values.size} MEPD values but "
                             f"{flags.size} ground-truth flags")
        ax.hist(values[~flags], bins=bins, color="tab:blue", alpha=0.6,
                label=f"clean (n={int((~flags).sum())})")
        ax.hist(values[flags], bins=bins, color="tab:red", alpha=0.6,
                label=f"poisoned (n={int(flags.sum())})")
    ax.axvline(gamma, color="black", linestyle="--", label=f"gamma = {gamma:.3g}")
    ax.set_xlabel("MEPD = mean_y |p_teacher(y) - p_DMM(y)|")
    ax.set_ylabel("samples")
    ax.set_title("BeDKD: MEPD of the training set (below gamma: poisoned)", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path
