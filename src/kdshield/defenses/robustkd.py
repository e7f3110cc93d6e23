"""RobustKD: feature-variance detoxification for distilling a backdoored teacher (pure PyTorch).

The paper (../shared/papers/robustkd.md; the authors' code is for images) compresses a
possibly backdoored teacher into a smaller student in two steps:

1. **Feature detoxification** (Sec. 4.2): for each chosen teacher layer, the detoxified
   feature is ``F' = F + m * p`` (Eq. 7, the default: ``detox="additive"``) or
   ``F' = (1 - m) * F + m * p`` (Eq. 15, the authors' code: ``detox="interpolate"``), where
   ``p`` is a learned tensor the size of ``F``, initialised from the mean clean feature, and
   ``m`` the mask threshold (0.2 default, 0.1 best in the paper). The masks are optimised with
   ``L_t = L_ce + L_f`` (Eq. 8-10): ``L_f = Var(F')`` and ``L_ce = CE(B(F'_last), y)`` with
   ``B`` the teacher's own (frozen) classifier head (:class:`DetoxLoss`).
2. **Feature distillation** (Sec. 4.3): the student learns the detoxified features of all
   chosen layers through linear connectors (student width -> teacher width), plus CE on the
   labels (:class:`FeatureKDLoss`); without masks this is plain feature distillation, which
   the paper shows carries the backdoor over.

Porting to text transformers: a layer's *feature* is its pooled hidden state (the [CLS]
position for encoders, the last real token for decoders: the position the classifier reads),
one ``[H]`` vector per sample and layer. A per-token mask would have no meaning across texts of
different lengths, and the pooled feature is what ``B`` classifies. ``Var`` is the variance of
a sample's feature values (over the hidden dimension), averaged over the batch: the paper's
observation is that a backdoored model's features vary more *within* an example.

Batches carry ``teacher_hidden_states`` [B, N+1, H] (every hidden state of the teacher,
pooled; index 0 is the embedding output), cached once by batch inference, and ``label`` [B].
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from kdshield.config import _Settings
from kdshield.defenses.losses import StageLoss

TEACHER_FEATURES = "teacher_hidden_states"


class RobustKDConfig(_Settings):
    """RobustKD settings (also those of the ``feature-kd`` baseline: the same student and
    distillation without masks). Defaults: the paper's for the mask (m 0.2, 40 epochs, lr 1e-3,
    all layers); distillation epochs scaled down from its 300 (CIFAR, students from scratch)
    for a student copied from the teacher's blocks."""

    student: str = Field("copy", description=(
        "'copy': a reduced-depth copy of the teacher's architecture (student_layers); or a model "
        "preset / local directory (e.g. tiny-bert) that shares the teacher's tokenizer"))
    student_layers: list[int] | None = Field(None, description=(
        "for student=copy: the teacher's blocks (0-based) the student keeps, ascending; default "
        "every other block, ending with the last (6 blocks -> [1, 3, 5])"))
    student_init: Literal["pretrained", "random"] = Field("pretrained", description=(
        "student weights: copied from the teacher (pretrained; the kept blocks, embeddings and head) "
        "or freshly initialised (random: a student trained from scratch, as in the paper)"))
    teacher_layers: list[int] | None = Field(None, description=(
        "teacher hidden-state indices (1 = first block ... N = last) detoxified and distilled; must "
        "end with N, whose feature the classifier reads. Default: one per student block (for a copy, "
        "the blocks it was copied from; else evenly spaced)"))
    student_feature_layers: list[int] | None = Field(None, description=(
        "the student's hidden-state indices paired with teacher_layers (default: its last "
        "len(teacher_layers) blocks)"))
    m: float = Field(0.2, ge=0, description="mask threshold m (paper: 0.2 default, 0.1 best)")
    detox: Literal["additive", "interpolate"] = Field("additive", description=(
        "additive: F' = F + m p (paper Eq. 7, better in its Fig. 5); interpolate: F' = (1-m) F + m p "
        "(Eq. 15, the authors' code)"))
    var_weight: float = Field(1.0, ge=0, description="weight of L_f = Var(F') in the mask loss (Eq. 10)")
    mask_ce_weight: float = Field(1.0, ge=0, description="weight of CE(B(F'_last), y) in the mask loss (Eq. 10)")
    mask_epochs: int = Field(40, ge=1, description="mask optimisation epochs (paper: 40)")
    mask_lr: float = Field(1e-3, gt=0, le=1, description="mask learning rate (paper: 1e-3)")
    feature_weight: float = Field(1.0, ge=0, description="weight of the feature MSE in distillation")
    ce_weight: float = Field(1.0, ge=0, description="weight of CE on labels in distillation")
    distill_epochs: int = Field(10, ge=1, description="feature-distillation epochs (paper: 300, from scratch)")
    distill_lr: float = Field(5e-5, gt=0, le=1, description="feature-distillation learning rate")
    n_c: int | None = Field(None, ge=1, description="clean samples per class (None: all of --clean)")
    batch_size: int = Field(32, ge=1, description="micro-batch size of both stages")
    max_length: int = Field(64, ge=8, le=8192, description="tokens per sample after truncation")
    seed: int = Field(0, description="seed of clean sampling, student init and training")

    @model_validator(mode="after")
    def _check(self):
        if self.detox == "interpolate" and self.m > 1:
            raise ValueError(f"detox=interpolate needs m in [0, 1], got m={self.m}")
        for name in ("student_layers", "teacher_layers", "student_feature_layers"):
            value = getattr(self, name)
            if value is not None:
                if not value:
                    raise ValueError(f"{name} must not be empty")
                if any(b <= a for a, b in zip(value, value[1:])):
                    raise ValueError(f"{name} must be strictly ascending, got {value}")
        if self.student_layers is not None and self.student != "copy":
            raise ValueError("student_layers applies to student=copy only")
        if self.var_weight == 0 and self.mask_ce_weight == 0:
            raise ValueError("var_weight and mask_ce_weight are both 0: the mask would learn nothing")
        return self


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
        from kdshield.models.pooling import pool

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
