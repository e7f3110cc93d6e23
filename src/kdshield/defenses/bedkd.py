"""BeDKD: Directional Mapping Module + Adversarial Knowledge Distillation (pure PyTorch part).

The paper (../shared/papers/bedkd.md) defends a poisoned classifier f* in three steps:

1. **DMM** (Eq. 1-3): a copy of f* is distilled from the frozen f* on ``n_c_dmm`` clean
   samples per class whose labels are *flipped* (:func:`flip_labels`), with
   ``alpha * CE(flipped) + (1 - alpha) * (KL_T + MSE of last hidden states)``
   (:class:`DistillLoss`). The flipped labels destroy the clean mapping while the soft terms
   keep the backdoor mapping, so f* and the DMM disagree on clean inputs and agree on
   triggered ones.
2. **Identification** (Eq. 4): :func:`mepd` is the mean absolute difference of the two
   models' class probabilities; a suspect training sample is called poisoned when its MEPD is
   below ``gamma`` (:func:`identify`), fixed or calibrated from clean data to a target FRR
   (:func:`calibrate_gamma`).
3. **AKD** (Eq. 5-7): a student initialised from f* alternates *trust* distillation on clean
   data (:class:`DistillLoss` with ``lam``) and *punish* distillation on the identified
   poisoned samples (:class:`PunishLoss`).

Batches are the padded tensors of :func:`kdshield.datasets.pad_collate`: ``input_ids``,
``attention_mask`` [B, L], ``label`` [B], and the frozen teacher's cached outputs
``teacher_logits`` [B, C] and ``teacher_hidden_seq`` [B, L, H] (padded like ``input_ids``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field, model_validator

from kdshield.config import _Settings
from kdshield.defenses.losses import StageLoss

TEACHER_LOGITS = "teacher_logits"
TEACHER_HIDDEN = "teacher_hidden_seq"


# ----------------------------------------------------------------------------- settings

class BeDKDConfig(_Settings):
    """BeDKD settings; defaults are those of the authors' public code (papers/README.md)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    alpha: float = Field(0.3, ge=0, le=1, description=(
        "DMM loss weight: alpha * CE(flipped labels) + (1 - alpha) * (KL + MSE) (Eq. 3)"))
    lam: float = Field(0.3, ge=0, le=1, description=(
        "AKD loss weight lambda: lam * CE + (1 - lam) * (KL + MSE) for trust and punish "
        "distillation (Eq. 5-6)"))
    dmm_temperature: float = Field(1.5, gt=0, description="softmax temperature T of the DMM KL term")
    akd_temperature: float = Field(2.5, gt=0, description="softmax temperature T of the AKD KL terms")
    gamma: float | None = Field(0.1, gt=0, le=1, description=(
        "MEPD threshold: a sample with MEPD < gamma is called poisoned (Eq. 4); None when "
        "target_frr calibrates it"))
    target_frr: float | None = Field(None, gt=0, lt=1, description=(
        "instead of a fixed gamma: the FRR wanted on held-out clean data; gamma becomes the "
        "target_frr quantile of their MEPD (giving target_frr alone clears the default gamma)"))
    n_c_dmm: int = Field(80, ge=1, description="clean samples per class (labels flipped) for the DMM")
    n_c: int = Field(320, ge=1, description="clean samples per class for AKD trust distillation")
    n_p: int = Field(32, ge=1, description=(
        "at most this many identified poisoned samples (chosen by `selection`) for punish "
        "distillation. More remove more of a backdoor (R8 BadNet: ASR 48.1 with 32, 0.0 with "
        "160 in one pass each) but also teach the student to avoid the target class, which "
        "costs clean accuracy where that class is large (binary RT BadNet: CACC -5.5); "
        "benchmarks/results/bedkd_r8_badnet.md, bedkd_np.md"))
    dmm_epochs: int = Field(20, ge=1, description="DMM distillation epochs")
    akd_cycles: int = Field(50, ge=1, description=(
        "AKD epochs; each is one trust pass over the clean set and punish_passes passes over "
        "the identified poisoned set"))
    punish_passes: int = Field(5, ge=1, le=100, description=(
        "punish passes over the identified samples per AKD cycle (the paper: 1; default 5). With "
        "n_p much smaller than the clean set, one pass is a few optimizer steps against dozens "
        "of trust steps and the trust passes undo them; more passes rebalance the cycle "
        "(benchmarks/results/bedkd.md, RT BadNet: ASR 40.8 with 1 pass, 21.5 with 5)"))
    dmm_lr: float = Field(3e-5, gt=0, le=1, description="Adam learning rate of the DMM stage")
    akd_lr: float = Field(3e-5, gt=0, le=1, description="Adam learning rate of the AKD stage")
    batch_size: int = Field(16, ge=1, description="micro-batch size of both stages")
    max_length: int = Field(64, ge=8, le=8192, description="tokens per sample after truncation")
    punish: Literal["bounded", "unbounded"] = Field("bounded", description=(
        "punish loss: 'unbounded' is the paper's -(trust loss) (Eq. 6, the authors' code), "
        "which can diverge; 'bounded' (default) hinges every term at punish_margin so ascent "
        "stops once the student is as far from the teacher as an uninformative model"))
    punish_margin: float = Field(1.0, gt=0, description=(
        "bounded punish: CE and KL ascend up to punish_margin * log(C), the relative hidden "
        "MSE up to punish_margin"))
    selection: Literal["confident", "smallest", "random"] = Field("confident", description=(
        "which n_p of the candidates (MEPD < gamma, predicted as the target) are punished: "
        "'confident' (default) those both models give the highest probability of their "
        "predicted label (min of the two), 'smallest' the smallest MEPD, 'random' a seeded draw. "
        "The paper only says 'MEPD < gamma'; benchmarks/results/bedkd.md gives the "
        "precision of each"))
    require_target_prediction: bool = Field(True, description=(
        "identified samples must also be predicted as the suspected target label: the label the "
        "poisoned model predicts on the suspect training set more often than it occurs in the "
        "clean data (the authors' code takes the majority label, which is the same on balanced "
        "data; see suspected_target)"))
    seed: int = Field(0, description="seed of clean-subset sampling and training")

    @model_validator(mode="before")
    @classmethod
    def _target_frr_replaces_default_gamma(cls, data):
        if isinstance(data, dict) and data.get("target_frr") is not None and "gamma" not in data:
            data = {**data, "gamma": None}
        return data

    @model_validator(mode="after")
    def _one_threshold(self):
        if (self.gamma is None) == (self.target_frr is None):
            raise ValueError(
                "set exactly one of gamma (a fixed MEPD threshold) and target_frr (calibrate "
                f"gamma on clean data); got gamma={self.gamma!r}, target_frr={self.target_frr!r}"
                " - with target_frr, set gamma to null")
        return self


# ----------------------------------------------------------------------------- labels

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


# ----------------------------------------------------------------------------- losses

def _masked_sq_error(student: torch.Tensor, teacher: torch.Tensor,
                     mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample sum of squared errors over real tokens and the per-sample element count.
    ``student``, ``teacher``: [B, L, H]; ``mask``: [B, L] (1 = real token)."""
    if student.shape != teacher.shape:
        raise ValueError(f"student hidden states {tuple(student.shape)} and "
                         f"{TEACHER_HIDDEN} {tuple(teacher.shape)} differ in shape")
    m = mask.to(student.device, torch.float32).unsqueeze(-1)  # [B, L, 1]
    sq = ((student.float() - teacher.float()) ** 2 * m).sum(dim=(1, 2))  # [B]
    count = m.sum(dim=(1, 2)) * student.shape[-1]  # [B]
    return sq, count


def _check_weight(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def _check_temperature(value: float) -> None:
    if not value > 0:
        raise ValueError(f"temperature must be > 0, got {value}")


class DistillLoss(StageLoss):
    """Hard + soft distillation from a frozen teacher (BeDKD Eq. 1-3 and 5).

    ``alpha * CE(s, y) + (1 - alpha) * (KL + MSE)`` with

    * ``s = outputs.logits`` [B, C], ``y = batch["label"]`` [B] (the flipped labels for the
      DMM, the true labels for AKD trust distillation, where ``alpha`` is lambda);
    * ``KL = KL(softmax(t / T) || softmax(s / T))`` with ``t = batch["teacher_logits"]``
      [B, C], summed over classes and averaged over the batch ("batchmean"), *without* the
      usual T^2 factor, as in the authors' code. (Eq. 2 writes the soft cross-entropy
      ``-sum p_t log p_s``; it differs from KL by the teacher's entropy, a constant, so the
      gradients are the same and KL reads 0 at a perfect match.)
    * ``MSE`` between the student's last hidden states ``outputs.hidden_states[-1]`` [B, L, H]
      and ``batch["teacher_hidden_seq"]`` [B, L, H], averaged over the real tokens
      (``batch["attention_mask"]`` [B, L] is 1) and the hidden size; padding is ignored
      (the authors' code pads to a fixed length and averages over padding too).

    Logs ``ce``, ``kl``, ``mse``.
    """

    needs_hidden_states = True

    def __init__(self, alpha: float, temperature: float):
        _check_weight("alpha", alpha)
        _check_temperature(temperature)
        self.alpha, self.temperature = float(alpha), float(temperature)

    def terms(self, outputs, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The batch-mean ``(ce, kl, mse)`` scalars."""
        logits = outputs.logits.float()
        teacher = batch[TEACHER_LOGITS].to(logits.device).float()
        t = self.temperature
        ce = F.cross_entropy(logits, batch["label"].to(logits.device))
        kl = F.kl_div(F.log_softmax(logits / t, dim=-1), F.log_softmax(teacher / t, dim=-1),
                      reduction="batchmean", log_target=True)
        sq, count = _masked_sq_error(outputs.hidden_states[-1],
                                     batch[TEACHER_HIDDEN].to(logits.device),
                                     batch["attention_mask"])
        mse = sq.sum() / count.sum().clamp_min(1.0)
        return ce, kl, mse

    def __call__(self, outputs, batch):
        ce, kl, mse = self.terms(outputs, batch)
        loss = self.alpha * ce + (1.0 - self.alpha) * (kl + mse)
        return loss, {"ce": ce.detach().item(), "kl": kl.detach().item(),
                      "mse": mse.detach().item()}


class PunishLoss(StageLoss):
    """Punish distillation on identified poisoned samples (BeDKD Eq. 6).

    ``batch["label"]`` [B] is the label the poisoned teacher predicts for each sample (the
    target label); ``outputs``/``batch`` otherwise as in :class:`DistillLoss`. ``C`` is the
    number of classes (``outputs.logits.shape[-1]``).

    ``mode="unbounded"`` is the paper's and the authors' code's form, the negated trust loss
    ``-(lam * CE + (1 - lam) * (KL + MSE))`` with the batch-mean terms of :class:`DistillLoss`.
    It is unbounded below: minimising it drives p_student(target) to 0, the tempered outputs
    and the last hidden states arbitrarily far from the teacher's, so long punishing can
    wreck the clean mapping the trust passes keep (it diverges).

    ``mode="bounded"`` (the default) hinges each term *per sample* at the distance an
    uninformative model would have from the teacher, scaled by ``margin`` (m)::

        lam * relu(m log C - CE_i) + (1 - lam) * (relu(m log C - KL_i) + relu(m - rMSE_i))

    averaged over the batch, where ``CE_i = -log p_s(y_i)``, ``KL_i = KL_T(teacher_i ||
    student_i)`` and ``rMSE_i`` is sample i's hidden MSE over real tokens divided by the
    mean square of the teacher's hidden states (scale-free). Why these bounds: with m = 1,

    * ``CE_i >= log C``  <=>  ``p_s(target) <= 1/C``: the target label is no likelier than chance;
    * ``KL_i >= log C``: for a confident teacher ``KL(p_t || uniform) = log C - H(p_t)`` is
      about ``log C``, so the student is at least as far from the teacher as a uniform guess;
    * ``rMSE_i >= 1``: the hidden states are at least as far from the teacher's as the zero
      (information-free) representation is.

    Properties: each hinge is >= 0, so the loss is bounded below by 0 (reached when every
    sample is past every bound) and cannot diverge; the gradient of a term is exactly zero
    once the sample is past its bound, so punishing stops instead of overshooting; at the
    teacher's own outputs (KL = rMSE = 0, CE = -log p_t(target) < log C) the CE hinge is active
    with gradient ``lam * (p - onehot(y)) / B`` on the logits, pushing p(target) down (the KL
    and MSE terms, like their unbounded versions, have zero gradient exactly at the teacher
    and take over as soon as the student moves). Hence ``lam > 0`` is needed to leave the
    teacher's point. Logs ``ce``, ``kl``, ``mse`` (batch means, as in the trust loss) and, when
    bounded, ``active`` (share of hinge terms not yet past their bound).
    """

    needs_hidden_states = True

    def __init__(self, lam: float, temperature: float,
                 mode: Literal["bounded", "unbounded"] = "bounded", margin: float = 1.0):
        _check_weight("lam", lam)
        _check_temperature(temperature)
        if mode not in ("bounded", "unbounded"):
            raise ValueError(f"mode must be 'bounded' or 'unbounded', got {mode!r}")
        if not margin > 0:
            raise ValueError(f"margin must be > 0, got {margin}")
        self.lam, self.temperature, self.mode, self.margin = (
            float(lam), float(temperature), mode, float(margin))

    def __call__(self, outputs, batch):
        if self.mode == "unbounded":
            ce, kl, mse = DistillLoss(self.lam, self.temperature).terms(outputs, batch)
            loss = -(self.lam * ce + (1.0 - self.lam) * (kl + mse))
            return loss, {"ce": ce.detach().item(), "kl": kl.detach().item(),
                          "mse": mse.detach().item()}

        logits = outputs.logits.float()
        teacher = batch[TEACHER_LOGITS].to(logits.device).float()
        t, lam = self.temperature, self.lam
        ce = F.cross_entropy(logits, batch["label"].to(logits.device), reduction="none")  # [B]
        log_t = F.log_softmax(teacher / t, dim=-1)
        kl = (log_t.exp() * (log_t - F.log_softmax(logits / t, dim=-1))).sum(-1)  # [B]
        student_h = outputs.hidden_states[-1]
        teacher_h = batch[TEACHER_HIDDEN].to(logits.device)
        sq, count = _masked_sq_error(student_h, teacher_h, batch["attention_mask"])  # [B]
        energy, _ = _masked_sq_error(torch.zeros_like(teacher_h, dtype=torch.float32),
                                     teacher_h, batch["attention_mask"])
        mse = sq / count.clamp_min(1.0)
        rmse = sq / energy.clamp_min(1e-12)

        bound = self.margin * math.log(logits.shape[-1])
        h_ce, h_kl, h_mse = F.relu(bound - ce), F.relu(bound - kl), F.relu(self.margin - rmse)
        loss = (lam * h_ce + (1.0 - lam) * (h_kl + h_mse)).mean()
        active = torch.cat([h_ce > 0, h_kl > 0, h_mse > 0]).float().mean()
        return loss, {"ce": ce.mean().detach().item(), "kl": kl.mean().detach().item(),
                      "mse": (sq.sum() / count.sum().clamp_min(1.0)).detach().item(),
                      "active": active.item()}


# ----------------------------------------------------------------------------- identification

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
    ax.set_title("BeDKD: MEPD of the suspect training set (MEPD < gamma: poisoned)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path
