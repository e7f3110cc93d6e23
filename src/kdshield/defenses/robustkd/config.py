"""Settings of ``feature-kd`` (the student and feature distillation alone, the paper's FKD
baseline) and ``robustkd`` (the same plus the detoxification masks).

Defaults: the paper's for the mask (m 0.2, 40 epochs, lr 1e-3, all layers); distillation epochs
scaled down from its 300 (CIFAR, students from scratch) for a student copied from the
teacher's blocks.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from kdshield.config import _Settings


class FeatureKDConfig(_Settings):
    """Feature distillation of the suspect model (teacher) into a smaller student."""

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
    feature_weight: float = Field(1.0, ge=0, description="weight of the feature MSE in distillation")
    ce_weight: float = Field(1.0, ge=0, description="weight of CE on labels in distillation")
    distill_epochs: int = Field(10, ge=1, description="feature-distillation epochs (paper: 300, from scratch)")
    distill_lr: float = Field(5e-5, gt=0, le=1, description="feature-distillation learning rate")
    n_c: int | None = Field(None, ge=1, description="clean samples per class (None: all of --clean)")
    batch_size: int = Field(32, ge=1, description="micro-batch size of every stage")
    max_length: int = Field(64, ge=8, le=8192, description="tokens per sample after truncation")
    seed: int = Field(0, description="seed of clean sampling, student init and training")

    @model_validator(mode="after")
    def _check_layers(self):
        for name in ("student_layers", "teacher_layers", "student_feature_layers"):
            value = getattr(self, name)
            if value is not None:
                if not value:
                    raise ValueError(f"{name} must not be empty")
                if any(b <= a for a, b in zip(value, value[1:])):
                    raise ValueError(f"{name} must be strictly ascending, got {value}")
        if self.student_layers is not None and self.student != "copy":
            raise ValueError("student_layers applies to student=copy only")
        return self


class RobustKDConfig(FeatureKDConfig):
    """RobustKD: detoxification masks optimised over the teacher's features, then feature
    distillation of the detoxified features."""

    m: float = Field(0.2, ge=0, description="mask threshold m (paper: 0.2 default, 0.1 best)")
    detox: Literal["additive", "interpolate"] = Field("additive", description=(
        "additive: F' = F + m p (paper Eq. 7, better in its Fig. 5); interpolate: F' = (1-m) F + m p "
        "(Eq. 15, the authors' code)"))
    var_weight: float = Field(1.0, ge=0, description="weight of L_f = Var(F') in the mask loss (Eq. 10)")
    mask_ce_weight: float = Field(1.0, ge=0, description="weight of CE(B(F'_last), y) in the mask loss (Eq. 10)")
    mask_epochs: int = Field(40, ge=1, description="mask optimisation epochs (paper: 40)")
    mask_lr: float = Field(1e-3, gt=0, le=1, description="mask learning rate (paper: 1e-3)")

    @model_validator(mode="after")
    def _check_mask(self):
        if self.detox == "interpolate" and self.m > 1:
            raise ValueError(f"detox=interpolate needs m in [0, 1], got m={self.m}")
        if self.var_weight == 0 and self.mask_ce_weight == 0:
            raise ValueError("var_weight and mask_ce_weight are both 0: the mask would learn nothing")
        return self
