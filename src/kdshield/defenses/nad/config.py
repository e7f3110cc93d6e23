"""Settings of ``nad`` (Neural Attention Distillation, Li et al., ICLR 2021)."""

from __future__ import annotations

from pydantic import Field, model_validator

from kdshield.config import _Settings


class NADConfig(_Settings):
    """NAD: fine-tune a copy of the suspect model on the clean data (the teacher), then distil the
    teacher's attention maps, plus CE on the clean data, into the suspect model (the student).

    The paper's networks are ResNets (5% clean data, a teacher fine-tuned 10 epochs, NAD 20
    epochs, p = 2, SGD at lr 0.01); here the networks are transformers trained with AdamW, so the
    learning rates are those of the other defenses' fine-tuning stages and the epochs a CPU budget.
    """

    n_c: int | None = Field(None, ge=1, description="clean samples per class (None: all of --clean; paper: 5%)")
    teacher_epochs: int = Field(10, ge=1, description="epochs fine-tuning the teacher on the clean data (paper: 10)")
    teacher_lr: float = Field(3e-5, gt=0, le=1, description="learning rate of the teacher's fine-tuning")
    epochs: int = Field(20, ge=1, description="attention-distillation epochs (paper: 20)")
    lr: float = Field(3e-5, gt=0, le=1, description="learning rate of the attention distillation")
    beta: float = Field(10.0, ge=0, description=(
        "weight of the attention loss against CE, the same for every distilled layer (paper: beta_k of "
        "500-5000 on the mean square of 8x8 to 32x32 maps; on the L2 distance used here a map of 64 "
        "positions at distance 0.1 gives the same pull with beta ~ 8)"))
    p: float = Field(2.0, gt=0, description="power of the activation map A = sum_channels |F|^p (paper: 2)")
    layers: list[int] | None = Field(None, description=(
        "hidden-state indices (1 = first block ... N = last) whose attention maps are distilled "
        "(default: every block; the paper: the last layer of each residual group)"))
    evaluate_teacher: bool = Field(True, description=(
        "also report CACC/ASR of the fine-tuned teacher (metrics['teacher']): NAD against fine-tuning alone"))
    batch_size: int = Field(16, ge=1, description="micro-batch size of both stages")
    max_length: int = Field(64, ge=8, le=8192, description="tokens per sample after truncation")
    seed: int = Field(0, description="seed of clean sampling and training")

    @model_validator(mode="after")
    def _check_layers(self):
        if self.layers is not None:
            if not self.layers:
                raise ValueError("layers must not be empty")
            if any(b <= a for a, b in zip(self.layers, self.layers[1:])) or self.layers[0] < 1:
                raise ValueError(f"layers must be strictly ascending block indices >= 1, got {self.layers}")
        return self
