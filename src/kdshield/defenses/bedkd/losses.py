"""BeDKD's losses (Eq. 1-3, 5-6): trust distillation and the (bounded) punish distillation.

Batches are the padded tensors of :func:`kdshield.datasets.pad_collate`: ``input_ids``,
``attention_mask`` [B, L], ``label`` [B], and the frozen teacher's cached outputs
``teacher_logits`` [B, C] and ``teacher_hidden_seq`` [B, L, H] (padded like ``input_ids``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from kdshield.defenses.losses import StageLoss, kl_at_temperature, masked_mse, masked_sq_error

TEACHER_LOGITS = "teacher_logits"
TEACHER_HIDDEN = "teacher_hidden_seq"
#: what the frozen teacher's batch inference must add to a stream for these losses
TEACHER_OUTPUTS = ("logits", "hidden_seq")


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
        kl = kl_at_temperature(logits, teacher, t)
        mse = masked_mse(outputs.hidden_states[-1], batch[TEACHER_HIDDEN], batch["attention_mask"])
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
        kl = kl_at_temperature(logits, teacher, t, per_sample=True)  # [B]
        student_h = outputs.hidden_states[-1]
        teacher_h = batch[TEACHER_HIDDEN].to(logits.device)
        sq, count = masked_sq_error(student_h, teacher_h, batch["attention_mask"])  # [B]
        energy, _ = masked_sq_error(torch.zeros_like(teacher_h, dtype=torch.float32),
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


