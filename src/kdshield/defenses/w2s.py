"""W2SDefense: a weak clean teacher guides a LoRA-tuned poisoned LLM to unlearn its backdoor
(pure PyTorch; ../shared/papers/w2sdefense.md, the authors' code defaults in
../shared/papers/README.md).

1. **Teacher** (Sec. 3.1, Eq. 4-5): a small encoder (default ``minilm``; BERT-base in the paper)
   fully fine-tuned on the clean data, with a linear projection ``g`` from its width d_t to the
   student's d_s. ``projection="joint"`` (the paper: ``g`` sits between the encoder's last
   [CLS] state and a classifier, all trained by cross-entropy, :class:`ProjectedHead` and
   :class:`TeacherLoss`); ``projection="fitted"``: the teacher is trained alone and ``g`` is fitted
   afterwards by ridge regression from its clean features to the *suspect student's* clean
   features (:func:`fit_projection`), so the target lives in the student's own feature space.
2. **Student** (Sec. 3.3, Eq. 14): the poisoned decoder as a sequence classifier with a LoRA
   adapter, trained on the clean data with :class:`W2SLoss`
   ``alpha CE(z_s, y) + beta T^2 KL(softmax(z_t/T) || softmax(z_s/T)) + gamma MSE(g(h_t), pool(h_s))``.
   ``h_s`` is pooled at the last non-pad token (the one the decoder's classifier reads) under
   left or right padding; the authors' code compared the projected [CLS] with the student's
   unpooled states instead (a broadcast over tokens).

The teacher is frozen during step 2, so its projected features and logits are computed once by
batch inference and streamed as ``teacher_feature`` [d_s] and ``teacher_logits`` [C] columns.

``lora-ft`` (the papers' "LoRA" baseline, which leaves the backdoor in) is step 2 with
``beta = gamma = 0``: CE only, same adapter, same budget (:class:`W2SConfig` serves both).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from kdshield.config import _Settings
from kdshield.defenses.losses import StageLoss

TEACHER_FEATURE = "teacher_feature"
TEACHER_LOGITS = "teacher_logits"
TEACHER_PREFIX = "teacher_"

#: The authors' loss weights (alpha, beta, gamma) per attack kind.
AUTHORS_WEIGHTS: dict[str, tuple[float, float, float]] = {
    "word": (5.0, 0.001, 0.001),
    "sentence": (3.0, 0.01, 0.001),
    "syntactic": (1.0, 0.035, 0.002),
}


class W2SConfig(_Settings):
    """W2SDefense (and ``lora-ft``) settings. Defaults: the authors' code (Llama-3-8B, BERT-base
    teacher) where they carry over; where they do not, scaled, and said so per field."""

    # -- teacher (stage 1)
    teacher: str = Field("minilm", description=(
        "the weak teacher: a preset or local model directory, fully fine-tuned on the clean data "
        "(paper: BERT-base); or a finished W2S teacher directory (holding w2s_projection.safetensors, "
        "e.g. OUT/teacher of an earlier run), used as it is"))
    projection: Literal["joint", "fitted"] = Field("joint", description=(
        "joint: g trained with the teacher through a classifier on g's output (the paper's Eq. 4-5); "
        "fitted: teacher trained alone, then g fitted by ridge regression onto the suspect student's "
        "clean features"))
    ridge: float = Field(1e-2, ge=0, description="fitted projection: ridge penalty (times the feature variance)")
    teacher_epochs: int = Field(5, ge=1, description="teacher epochs (authors: 5)")
    teacher_lr: float = Field(5e-5, gt=0, le=1, description=(
        "teacher learning rate (authors: 2e-5 for BERT-base; 5e-5 for the 6-layer MiniLM default)"))
    teacher_batch_size: int = Field(32, ge=1, description="teacher batch size (authors: 32)")
    evaluate_teacher: bool = Field(True, description="report the teacher's CACC/ASR (one inference pass)")
    # -- student (stage 2)
    lora_r: int | None = Field(None, ge=1, description=(
        "LoRA rank; None: the authors' r = 512 at hidden 4096 scaled to the student, the largest power "
        "of two <= hidden / 8 (SmolLM2-135M: 64; hidden 4096: 512)"))
    lora_alpha: float | None = Field(None, gt=0, description="LoRA alpha; None: = rank (authors: 512 = r)")
    lora_dropout: float = Field(0.1, ge=0, lt=1, description="LoRA dropout (authors: 0.1)")
    target_modules: list[str] = Field(["q_proj", "v_proj"], min_length=1, description=(
        "modules adapted by LoRA (authors: peft's default for Llama/Qwen2, q_proj and v_proj)"))
    train_head: bool = Field(True, description=(
        "train a copy of the classification head with the adapter (peft SEQ_CLS, as the authors' code)"))
    epochs: int = Field(5, ge=1, description="student epochs (authors: 5)")
    lr: float = Field(2e-4, gt=0, le=1, description="student learning rate (authors: 2e-4, AdamW)")
    batch_size: int = Field(32, ge=1, description="micro-batch size per worker (authors: 32)")
    temperature: float = Field(2.0, gt=0, description="distillation temperature T (authors: 2)")
    weights: Literal["word", "sentence", "syntactic"] = Field("word", description=(
        "the authors' (alpha, beta, gamma) for this attack kind: word 5/0.001/0.001, sentence "
        "3/0.01/0.001, syntactic 1/0.035/0.002; alpha/beta/gamma override each"))
    alpha: float | None = Field(None, ge=0, description="weight of CE (None: from `weights`)")
    beta: float | None = Field(None, ge=0, description="weight of T^2 KL (None: from `weights`)")
    gamma: float | None = Field(None, ge=0, description="weight of the feature MSE (None: from `weights`)")
    padding_side: Literal["left", "right"] = Field("left", description="student padding (authors: left)")
    # -- data
    n_c: int | None = Field(None, ge=1, description="clean samples per class (None: all of --clean)")
    max_length: int = Field(64, ge=8, le=8192, description="tokens per sample, both tokenizers (authors: 128)")
    seed: int = Field(0, description="seed of clean sampling and training")

    @model_validator(mode="after")
    def _check(self):
        if self.loss_weights == (0.0, 0.0, 0.0):
            raise ValueError("alpha, beta and gamma are all 0: the student would learn nothing")
        return self

    @property
    def loss_weights(self) -> tuple[float, float, float]:
        """The resolved (alpha, beta, gamma)."""
        a, b, g = AUTHORS_WEIGHTS[self.weights]
        return (float(self.alpha if self.alpha is not None else a), float(self.beta if self.beta is not None else b),
                float(self.gamma if self.gamma is not None else g))


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 KL(softmax(t/T) || softmax(s/T))``, summed over classes, mean over the batch
    (Hinton's scaling: the soft term's gradients keep their size as T changes).
    ``student_logits``, ``teacher_logits`` [B, C] -> scalar."""
    t = float(temperature)
    kl = F.kl_div(F.log_softmax(student_logits.float() / t, dim=-1),
                  F.log_softmax(teacher_logits.float() / t, dim=-1), reduction="batchmean", log_target=True)
    return kl * t * t


class W2SLoss(StageLoss):
    """The student's loss (Eq. 14):
    ``alpha CE(z_s, y) + beta T^2 KL(z_t || z_s) + gamma MSE(f_t, pool(h_s))``.

    * ``z_s = outputs.logits`` [B, C]; ``y = batch["label"]`` [B];
    * ``z_t = batch["teacher_logits"]`` [B, C] (:func:`distill_kl`);
    * ``f_t = batch["teacher_feature"]`` [B, d_s]: the teacher's projected feature ``g(h_t)``;
      ``h_s = outputs.hidden_states[-1]`` [B, L, d_s] pooled by ``family`` (decoders: the last
      position where ``batch["attention_mask"]`` is 1, so left and right padding agree); MSE is
      the mean over batch and width.

    Terms with weight 0 are not computed (``lora-ft`` is ``beta = gamma = 0``). Logs ``ce`` and,
    where computed, ``kl`` (the T^2-scaled term) and ``fa``.
    """

    def __init__(self, alpha: float, beta: float, gamma: float, temperature: float = 2.0,
                 family: str = "decoder"):
        for name, value in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.alpha, self.beta, self.gamma = float(alpha), float(beta), float(gamma)
        self.temperature, self.family = float(temperature), family
        self.needs_hidden_states = self.gamma > 0

    def terms(self, outputs, batch) -> dict[str, torch.Tensor]:
        from kdshield.models.pooling import pool

        logits = outputs.logits.float()
        out = {"ce": F.cross_entropy(logits, batch["label"].to(logits.device))}
        if self.beta > 0:
            out["kl"] = distill_kl(logits, batch[TEACHER_LOGITS].to(logits.device), self.temperature)
        if self.gamma > 0:
            pooled = pool(outputs.hidden_states[-1], batch["attention_mask"].to(logits.device), self.family)
            out["fa"] = F.mse_loss(pooled.float(), batch[TEACHER_FEATURE].to(logits.device).float())
        return out

    def __call__(self, outputs, batch):
        t = self.terms(outputs, batch)
        loss = self.alpha * t["ce"]
        if "kl" in t:
            loss = loss + self.beta * t["kl"]
        if "fa" in t:
            loss = loss + self.gamma * t["fa"]
        return loss, {k: float(v.detach()) for k, v in t.items()}


class ProjectedHead(torch.nn.Module):
    """The teacher's extra linear layer ``g`` (Eq. 4: d_t -> d_s) and, for the joint
    projection, a classifier on ``g``'s output (d_s -> C) that makes cross-entropy train ``g``."""

    def __init__(self, teacher_width: int, student_width: int, num_labels: int):
        super().__init__()
        self.proj = torch.nn.Linear(teacher_width, student_width)
        self.classifier = torch.nn.Linear(student_width, num_labels)

    def forward(self, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, d_t] -> (projected [B, d_s], logits [B, C])."""
        projected = self.proj(feature)
        return projected, self.classifier(projected)


class TeacherLoss(StageLoss):
    """The teacher's loss with the joint projection: ``CE(z_t, y) + CE(c(g(h_t)), y)``.

    ``z_t = outputs.logits`` [B, C] (the encoder's own head, so the exported teacher is an
    ordinary classifier too); ``h_t`` = ``outputs.hidden_states[-1]`` [B, L, d_t] pooled by
    ``family`` (encoders: [CLS]) with ``batch[f"{prefix}attention_mask"]``; ``g``, ``c`` =
    :class:`ProjectedHead` (this loss's own module, trained with the teacher). The student is
    distilled from the projected path (``g(h_t)`` and ``c(g(h_t))``). Logs ``ce``, ``ce_proj``,
    ``acc_proj`` (percent).
    """

    needs_hidden_states = True

    def __init__(self, head: ProjectedHead, family: str = "encoder", prefix: str = TEACHER_PREFIX):
        self.module, self.family, self.prefix = head, family, prefix

    def __repr__(self) -> str:
        return f"TeacherLoss(proj={tuple(self.module.proj.weight.shape)}, family={self.family!r})"

    def __call__(self, outputs, batch):
        from kdshield.models.pooling import pool

        logits = outputs.logits.float()
        labels = batch["label"].to(logits.device)
        feature = pool(outputs.hidden_states[-1], batch[f"{self.prefix}attention_mask"].to(logits.device),
                       self.family)
        _, proj_logits = self.module(feature)
        ce, ce_proj = F.cross_entropy(logits, labels), F.cross_entropy(proj_logits.float(), labels)
        acc = 100.0 * (proj_logits.argmax(-1) == labels).float().mean()
        return ce + ce_proj, {"ce": float(ce.detach()), "ce_proj": float(ce_proj.detach()), "acc_proj": float(acc)}


def fit_projection(teacher: np.ndarray, student: np.ndarray, ridge: float = 1e-2) -> tuple[np.ndarray, np.ndarray]:
    """Ridge regression of the student's features on the teacher's: ``(W [d_s, d_t], b [d_s])``
    minimising ``|X W^T + b - Y|^2 + lam |W|^2`` with ``lam = ridge * N * mean var(X)``
    (scale-free). ``teacher`` X [N, d_t], ``student`` Y [N, d_s]."""
    x = np.asarray(teacher, dtype=np.float64)
    y = np.asarray(student, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y) or not len(x):
        raise ValueError(f"need [N, d_t] and [N, d_s] features, got {x.shape} and {y.shape}")
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    lam = ridge * len(x) * float(xc.var(0).mean() or 1.0)
    w = np.linalg.solve(xc.T @ xc + lam * np.eye(x.shape[1]), xc.T @ yc).T  # [d_s, d_t]
    return w.astype(np.float32), (my - w @ mx).astype(np.float32)


def project(features: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """``features`` [N, d_t] -> ``features W^T + b`` [N, d_s] (float32)."""
    return (np.asarray(features, np.float32) @ np.asarray(weight, np.float32).T + bias).astype(np.float32)
