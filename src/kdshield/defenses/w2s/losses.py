"""W2SDefense's losses (pure PyTorch): the student's CE + T^2 KL + feature MSE, the teacher's
projected head and loss, and the ridge-fitted projection.

The teacher is frozen while the student trains, so its projected features and logits are
computed once by batch inference and streamed as ``teacher_feature`` [d_s] and
``teacher_logits`` [C] columns.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from kdshield.defenses.losses import StageLoss, kl_at_temperature
from kdshield.models.pooling import pool

TEACHER_FEATURE = "teacher_feature"
TEACHER_LOGITS = "teacher_logits"
TEACHER_PREFIX = "teacher_"


class W2SLoss(StageLoss):
    """The student's loss (Eq. 14):
    ``alpha CE(z_s, y) + beta T^2 KL(z_t || z_s) + gamma MSE(f_t, pool(h_s))``.

    * ``z_s = outputs.logits`` [B, C]; ``y = batch["label"]`` [B];
    * ``z_t = batch["teacher_logits"]`` [B, C] (:func:`~kdshield.defenses.losses.kl_at_temperature`, Hinton's T^2 scaling);
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
        logits = outputs.logits.float()
        out = {"ce": F.cross_entropy(logits, batch["label"].to(logits.device))}
        if self.beta > 0:
            out["kl"] = kl_at_temperature(logits, batch[TEACHER_LOGITS], self.temperature, hinton_scale=True)
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
