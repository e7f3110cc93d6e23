"""RobustKD's losses (pure PyTorch): the detoxification masks and feature distillation.

A layer's *feature* is its pooled hidden state (the [CLS] position for encoders, the last real
token for decoders: the position the classifier reads), one ``[H]`` vector per sample and layer.
Batches carry ``teacher_hidden_states`` [B, N+1, H] (every hidden state of the teacher, pooled;
index 0 is the embedding output), cached once by batch inference, and ``label`` [B].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdshield.defenses.losses import StageLoss
from kdshield.models.pooling import pool

TEACHER_FEATURES = "teacher_hidden_states"


def detoxify(features: torch.Tensor, p: torch.Tensor, m: float, form: str = "additive") -> torch.Tensor:
    """Detoxified features: ``F + m p`` (additive, Eq. 7) or ``(1 - m) F + m p`` (interpolate,
    Eq. 15). ``features`` [B, K, H], ``p`` [K, H] (broadcast over the batch) -> [B, K, H]."""
    if form == "additive":
        return features + m * p
    if form == "interpolate":
        return (1.0 - m) * features + m * p
    raise ValueError(f"detox must be 'additive' or 'interpolate', got {form!r}")


def feature_variance(features: torch.Tensor) -> torch.Tensor:
    """``Var(F)`` of Eq. 8 per layer: the (population) variance of each sample's feature values
    over the hidden dimension, averaged over the batch. ``features`` [B, K, H] -> [K]."""
    return features.float().var(dim=-1, unbiased=False).mean(dim=0)


class Detox(torch.nn.Module):
    """The learned masks ``p`` [K, H] (one per chosen teacher layer) and the frozen teacher head
    ``B`` that classifies the last detoxified feature."""

    def __init__(self, p_init: torch.Tensor, m: float, form: str, head: torch.nn.Module):
        super().__init__()
        if p_init.ndim != 2:
            raise ValueError(f"p_init must be [layers, hidden], got {tuple(p_init.shape)}")
        if m < 0:
            raise ValueError(f"m must be >= 0, got {m}")
        self.p = torch.nn.Parameter(p_init.detach().clone().float())
        self.m, self.form = float(m), form
        self.head = head.requires_grad_(False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[B, K, H] -> detoxified [B, K, H]."""
        return detoxify(features, self.p, self.m, self.form)


class DetoxLoss(StageLoss):
    """The mask loss ``var_weight * sum_k Var(F'_k) + ce_weight * CE(B(F'_K), y)``
    (Eq. 8-10; the same variance term on every chosen layer, the paper's "the loss functions
    across these layers are identical"; CE on the last, the one the classifier reads).

    Reads ``batch["teacher_hidden_states"]`` [B, N+1, H] at ``layers`` (K indices, the last
    one N) and ``batch["label"]`` [B]; ``outputs`` is unused (the stage has no model: only the
    masks train). Logs ``var`` (sum over layers), ``ce``, ``acc`` (of B on F'_K, percent).
    """

    def __init__(self, detox: Detox, layers: list[int], *, var_weight: float = 1.0, ce_weight: float = 1.0):
        if len(layers) != detox.p.shape[0]:
            raise ValueError(f"{len(layers)} layers but {detox.p.shape[0]} masks")
        self.module, self.layers = detox, list(layers)
        self.var_weight, self.ce_weight = float(var_weight), float(ce_weight)

    def __repr__(self) -> str:
        return f"DetoxLoss(layers={self.layers}, m={self.module.m}, form={self.module.form!r})"

    def __call__(self, outputs, batch):
        feats = batch[TEACHER_FEATURES][:, self.layers].float()  # [B, K, H]
        detoxed = self.module(feats)
        var = feature_variance(detoxed).sum()
        logits = self.module.head(detoxed[:, -1])
        labels = batch["label"].to(logits.device)
        ce = F.cross_entropy(logits.float(), labels)
        loss = self.var_weight * var + self.ce_weight * ce
        acc = 100.0 * (logits.argmax(-1) == labels).float().mean()
        return loss, {"var": float(var.detach()), "ce": float(ce.detach()), "acc": float(acc)}


class Connectors(torch.nn.Module):
    """Linear maps from the student's width to the teacher's, one per distilled layer pair
    (identity-initialised when the widths agree), and the frozen detoxification (``p`` as a
    buffer; none for plain feature distillation)."""

    def __init__(self, n_pairs: int, student_width: int, teacher_width: int, *,
                 p: torch.Tensor | None = None, m: float = 0.0, form: str = "additive"):
        super().__init__()
        self.maps = torch.nn.ModuleList(torch.nn.Linear(student_width, teacher_width) for _ in range(n_pairs))
        if student_width == teacher_width:
            with torch.no_grad():
                for lin in self.maps:
                    lin.weight.copy_(torch.eye(teacher_width))
                    lin.bias.zero_()
        if p is not None and tuple(p.shape) != (n_pairs, teacher_width):
            raise ValueError(f"p must be [{n_pairs}, {teacher_width}], got {tuple(p.shape)}")
        self.register_buffer("p", p.detach().clone().float() if p is not None else torch.zeros(n_pairs, teacher_width))
        self.detox = p is not None
        self.m, self.form = float(m), form

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``student`` [B, K, Hs], ``teacher`` [B, K, Ht] -> (projected student [B, K, Ht],
        target [B, K, Ht]: the detoxified teacher feature, or the teacher's own)."""
        projected = torch.stack([lin(student[:, k]) for k, lin in enumerate(self.maps)], 1)
        target = detoxify(teacher.float(), self.p, self.m, self.form) if self.detox else teacher.float()
        return projected, target.detach()


class FeatureKDLoss(StageLoss):
    """``feature_weight * sum_k MSE(C_k(pool(h_s^{s_k})), T_k) + ce_weight * CE(logits, y)``.

    ``h_s`` = ``outputs.hidden_states`` (N_s+1 tensors [B, L, Hs]) pooled by ``family``
    (:func:`kdshield.models.pooling.pool`) at ``student_layers``; ``C_k`` the connectors; ``T_k``
    the teacher's ``batch["teacher_hidden_states"]`` [B, N+1, Ht] at ``teacher_layers``,
    detoxified with the learned masks for RobustKD (:class:`Connectors` with ``p``) or as they
    are for plain feature distillation. MSE is the mean over batch and width. Logs ``feat``,
    ``ce``.
    """

    needs_hidden_states = True

    def __init__(self, connectors: Connectors, teacher_layers: list[int], student_layers: list[int],
                 family: str, *, feature_weight: float = 1.0, ce_weight: float = 1.0):
        if not (len(teacher_layers) == len(student_layers) == len(connectors.maps)):
            raise ValueError(f"{len(teacher_layers)} teacher layers, {len(student_layers)} student layers and "
                             f"{len(connectors.maps)} connectors must agree")
        self.module, self.family = connectors, family
        self.teacher_layers, self.student_layers = list(teacher_layers), list(student_layers)
        self.feature_weight, self.ce_weight = float(feature_weight), float(ce_weight)

    def __repr__(self) -> str:
        return (f"FeatureKDLoss(teacher_layers={self.teacher_layers}, student_layers={self.student_layers}, "
                f"detox={self.module.detox})")

    def __call__(self, outputs, batch):


        mask = batch["attention_mask"]
        states = outputs.hidden_states
        student = torch.stack([pool(states[i], mask, self.family) for i in self.student_layers], 1)
        teacher = batch[TEACHER_FEATURES][:, self.teacher_layers].to(student.device)
        projected, target = self.module(student.float(), teacher)
        feat = ((projected - target) ** 2).mean(dim=(0, 2)).sum()
        logits = outputs.logits.float()
        ce = F.cross_entropy(logits, batch["label"].to(logits.device))
        loss = self.feature_weight * feat + self.ce_weight * ce
        return loss, {"feat": float(feat.detach()), "ce": float(ce.detach())}
