"""Settings of ``lora-ft`` (the LoRA adapter trained by CE alone) and ``w2s`` (W2SDefense).

Defaults: the authors' code (Llama-3-8B, BERT-base teacher) where they carry over; where they
do not, scaled, and said so per field.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from kdshield.config import _Settings

#: The authors' loss weights (alpha, beta, gamma) per attack kind.
AUTHORS_WEIGHTS: dict[str, tuple[float, float, float]] = {
    "word": (5.0, 0.001, 0.001),
    "sentence": (3.0, 0.01, 0.001),
    "syntactic": (1.0, 0.035, 0.002),
}


class LoraFTConfig(_Settings):
    """A LoRA adapter on the frozen suspect decoder, trained on the clean data (the papers' "LoRA" row)."""

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
    padding_side: Literal["left", "right"] = Field("left", description="student padding (authors: left)")
    n_c: int | None = Field(None, ge=1, description="clean samples per class (None: all of --clean)")
    max_length: int = Field(64, ge=8, le=8192, description="tokens per sample, both tokenizers (authors: 128)")
    seed: int = Field(0, description="seed of clean sampling and training")


class W2SConfig(LoraFTConfig):
    """W2SDefense: a weak clean teacher (and its projection) guides the LoRA student."""

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
    # -- student's distillation terms (stage 2)
    temperature: float = Field(2.0, gt=0, description="distillation temperature T (authors: 2)")
    weights: Literal["word", "sentence", "syntactic"] = Field("word", description=(
        "the authors' (alpha, beta, gamma) for this attack kind: word 5/0.001/0.001, sentence "
        "3/0.01/0.001, syntactic 1/0.035/0.002; alpha/beta/gamma override each"))
    alpha: float | None = Field(None, ge=0, description="weight of CE (None: from `weights`)")
    beta: float | None = Field(None, ge=0, description="weight of T^2 KL (None: from `weights`)")
    gamma: float | None = Field(None, ge=0, description="weight of the feature MSE (None: from `weights`)")

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
