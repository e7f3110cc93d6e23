"""Settings of ``ts-ft`` (MBTSAD's first step alone) and ``mbtsad``.

Defaults are the paper's where it gives them (N = 3 copies, max(10, 0.3 n) split tokens,
lr 2e-5 / 5e-4); epochs and the loss weights are not given ("until convergence",
"adaptively set for each attack"): the defaults here are a small CPU budget and equal weights.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kdshield.config import _Settings


class TSFTConfig(_Settings):
    """TS-FT: retrain a copy of the suspect model on token-split clean data."""

    copies: int = Field(3, ge=1, description="token-split copies N of every clean sample (paper: 3)")
    split_ratio: float = Field(0.3, gt=0, le=1, description=(
        "a text of n tokens gets max(split_min_tokens, floor(split_ratio * n)) split tokens (paper: 0.3)"))
    split_min_tokens: int = Field(10, ge=0, description="the floor of that count (paper: 10)")
    n_c: int | None = Field(None, ge=1, description=(
        "clean samples per class drawn from the defender's clean set (None: all of it; the paper's "
        "defender holds 20% of the clean training data)"))
    retrain_epochs: int = Field(3, ge=1, description="TS-FT epochs over the token-split set")
    retrain_lr: float = Field(2e-5, gt=0, le=1, description="TS-FT learning rate (paper: 2e-5)")
    batch_size: int = Field(16, ge=1, description="micro-batch size of every stage")
    max_length: int = Field(128, ge=8, le=8192, description=(
        "tokens per sample after truncation (split tokens make texts longer)"))
    seed: int = Field(0, description="seed of clean sampling, token splitting and training")


class MBTSADConfig(TSFTConfig):
    """MBTSAD: TS-FT, then attention distillation into the suspect model."""

    distill_epochs: int = Field(3, ge=1, description="attention-distillation epochs over the token-split set")
    distill_lr: float = Field(5e-4, gt=0, le=1, description="attention-distillation learning rate (paper: 5e-4)")
    alpha: float = Field(1.0, ge=0, description="weight of L_cls, the cross-entropy on labels (Eq. 1)")
    beta: float = Field(1.0, ge=0, description="weight of L_h, the hidden-state MSE (Eq. 1)")
    ablation: Literal["none", "no-att", "no-hid", "cd"] = Field("none", description=(
        "Table IV's ablations: no-att drops L_a, no-hid drops L_h, cd keeps only L_cls"))
    student_attention: Literal["train", "eval"] = Field("train", description=(
        "train: the student distils in training mode, its attention maps taken after dropout (the "
        "authors' code); eval: it runs in eval mode (no dropout), so its maps are taken as the cached "
        "teacher's are"))
    teacher_cache_limit_mb: float = Field(2048.0, ge=0, description=(
        "cache the teacher's attention maps and hidden states (computed once by batch inference) "
        "only when they take at most this much (float32); above it the teacher runs live at every "
        "step instead (memory for compute; --teacher-outputs live forces it)"))
    evaluate_teacher: bool = Field(True, description="also report CACC/ASR of the TS-FT model (metrics['ts_ft'])")

    @property
    def use_attention(self) -> bool:
        return self.ablation in ("none", "no-hid")

    @property
    def hidden_weight(self) -> float:
        return self.beta if self.ablation in ("none", "no-att") else 0.0
