"""MBTSAD: token splitting + attention distillation (pure PyTorch part).

The paper (../shared/papers/mbtsad.md; no public code) defends a backdoored classifier M_b
with a small clean set D_c in two steps:

1. **TS-FT**: every clean sample yields ``copies`` (N = 3) token-split variants
   (:mod:`kdshield.datasets.augment`), giving D_a; a copy of M_b is retrained on D_a with
   cross-entropy (lr 2e-5), giving M_p.
2. **Attention distillation**: the student is the original M_b, the frozen teacher M_p, on D_a
   (lr 5e-4), with ``L_a + alpha * L_cls + beta * L_h`` (:class:`MBTSADLoss`, Eq. 1-7).

Batches: ``input_ids``, ``attention_mask`` [B, L], ``label`` [B], and the teacher's outputs
``teacher_ae_token_map`` [B, N, L, L] (per block, ``sum_heads a^2`` of its softmax attention)
and ``teacher_layer_seq`` [B, N+1, L, H] (embedding output and every block's hidden states),
cached by batch inference or computed live (:func:`kdshield.trainables.inference.model_outputs`).

Memory of the attention term: ``output_attentions=True`` would have the model collect all N
layers' ``[B, heads, L, L]`` tensors and hand them over at the end, and stacking them for the
loss copies them again. :class:`MBTSADLoss` instead taps each block's attention as the block
produces it (:func:`kdshield.models.attention.tap_attentions`), reduces it over heads at
once and keeps only the per-sample loss term (plus the ``[B, L, L]`` tensors autograd needs),
so no extra ``[B, heads, L, L]`` tensor outlives its block (see benchmarks/mbtsad_memory.py).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from kdshield.config import _Settings
from kdshield.defenses.losses import StageLoss
from kdshield.models.attention import attention_enhancement, tap_attentions

TEACHER_AE = "teacher_ae_token_map"
TEACHER_LAYERS = "teacher_layer_seq"


class MBTSADConfig(_Settings):
    """MBTSAD settings (also those of the ``ts-ft`` baseline, its first step alone).

    Defaults are the paper's where it gives them (N = 3 copies, max(10, 0.3 n) split tokens,
    lr 2e-5 / 5e-4); epochs and the loss weights are not given ("until convergence",
    "adaptively set for each attack"): the defaults here are a small CPU budget and equal
    weights.
    """

    copies: int = Field(3, ge=1, description="token-split copies N of every clean sample (paper: 3)")
    split_ratio: float = Field(0.3, gt=0, le=1, description=(
        "a text of n tokens gets max(split_min_tokens, floor(split_ratio * n)) split tokens (paper: 0.3)"))
    split_min_tokens: int = Field(10, ge=0, description="the floor of that count (paper: 10)")
    n_c: int | None = Field(None, ge=1, description=(
        "clean samples per class drawn from the defender's clean set (None: all of it; the paper's "
        "defender holds 20% of the clean training data)"))
    retrain_epochs: int = Field(3, ge=1, description="TS-FT epochs over the token-split set")
    retrain_lr: float = Field(2e-5, gt=0, le=1, description="TS-FT learning rate (paper: 2e-5)")
    distill_epochs: int = Field(3, ge=1, description="attention-distillation epochs over the token-split set")
    distill_lr: float = Field(5e-4, gt=0, le=1, description="attention-distillation learning rate (paper: 5e-4)")
    alpha: float = Field(1.0, ge=0, description="weight of L_cls, the cross-entropy on labels (Eq. 1)")
    beta: float = Field(1.0, ge=0, description="weight of L_h, the hidden-state MSE (Eq. 1)")
    ablation: Literal["none", "no-att", "no-hid", "cd"] = Field("none", description=(
        "Table IV's ablations: no-att drops L_a, no-hid drops L_h, cd keeps only L_cls"))
    teacher_cache_limit_mb: float = Field(2048.0, ge=0, description=(
        "cache the teacher's attention maps and hidden states (computed once by batch inference) "
        "only when they take at most this much (float32); above it the teacher runs live at every "
        "step instead (memory for compute; --teacher-outputs live forces it)"))
    evaluate_teacher: bool = Field(True, description="also report CACC/ASR of the TS-FT model (metrics['ts_ft'])")
    batch_size: int = Field(16, ge=1, description="micro-batch size of both stages")
    max_length: int = Field(128, ge=8, le=8192, description=(
        "tokens per sample after truncation (split tokens make texts longer)"))
    seed: int = Field(0, description="seed of clean sampling, token splitting and training")

    @property
    def use_attention(self) -> bool:
        return self.ablation in ("none", "no-hid")

    @property
    def hidden_weight(self) -> float:
        return self.beta if self.ablation in ("none", "no-att") else 0.0


def attention_transfer(ae_student: torch.Tensor, ae_teacher: torch.Tensor,
                       mask: torch.Tensor | None = None, eps: float = 1e-12) -> torch.Tensor:
    """MBTSAD's AT (Eq. 4) per sample:
    ``|| AE_t / ||AE_t||_2  -  AE_s / ||AE_s||_2 ||_2`` with the L2 norms over the whole
    ``L x L`` map.

    ``ae_student``, ``ae_teacher``: [B, L, L] attention-enhancement maps
    (:func:`kdshield.models.attention.attention_enhancement`); ``mask`` [B, L] (1 = real
    token) restricts both maps to real query rows and key columns. Returns [B], each in
    [0, 2] (0 when one map is a positive multiple of the other).
    """
    if ae_student.shape != ae_teacher.shape:
        raise ValueError(f"attention maps differ in shape: student {tuple(ae_student.shape)}, "
                         f"teacher {tuple(ae_teacher.shape)}")
    s, t = ae_student.float(), ae_teacher.to(ae_student.device).float()
    if mask is not None:
        m = mask.to(s.device, torch.float32)
        pair = m[:, :, None] * m[:, None, :]
        s, t = s * pair, t * pair
    s, t = s.flatten(1), t.flatten(1)
    s = s / s.norm(dim=1, keepdim=True).clamp_min(eps)
    t = t / t.norm(dim=1, keepdim=True).clamp_min(eps)
    return (t - s).norm(dim=1)


def hidden_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MSE of one layer's hidden states over real tokens: ``student``, ``teacher`` [B, L, H],
    ``mask`` [B, L] -> scalar (mean over the real tokens and the hidden size)."""
    if student.shape != teacher.shape:
        raise ValueError(f"hidden states differ in shape: student {tuple(student.shape)}, "
                         f"teacher {tuple(teacher.shape)}")
    m = mask.to(student.device, torch.float32)[:, :, None]
    sq = ((student.float() - teacher.to(student.device).float()) ** 2 * m).sum()
    return sq / (m.sum() * student.shape[-1]).clamp_min(1.0)


class MBTSADLoss(StageLoss):
    """``L_a + alpha * L_cls + beta * L_h`` (MBTSAD Eq. 1).

    * ``L_a = mean_b sum_n AT(a_t^n, a_s^n)`` over the N blocks (Eq. 2-4,
      :func:`attention_transfer`), from the student's attention probabilities, tapped block by
      block during the forward (:meth:`capture`; the model must use eager attention), and
      ``batch["teacher_ae_token_map"]`` [B, N, L, L];
    * ``L_cls = CE(outputs.logits [B, C], batch["label"] [B])`` (Eq. 7);
    * ``L_h = sum_{n=0}^{N} MSE(h_t^n, h_s^n)`` over the embedding output and every block
      (Eq. 5-6, :func:`hidden_mse`), from ``outputs.hidden_states`` (N+1 tensors [B, L, H]) and
      ``batch["teacher_layer_seq"]`` [B, N+1, L, H].

    ``attention=False`` drops L_a, ``beta=0`` drops L_h (then neither teacher column is
    read). Logs ``att``, ``ce``, ``hid``.
    """

    def __init__(self, alpha: float = 1.0, beta: float = 1.0, *, attention: bool = True):
        if alpha < 0 or beta < 0:
            raise ValueError(f"alpha and beta must be >= 0, got {alpha}, {beta}")
        self.alpha, self.beta, self.attention = float(alpha), float(beta), bool(attention)
        self.needs_hidden_states = self.beta > 0
        self._terms: list[torch.Tensor] = []

    def __getstate__(self):
        return {k: v for k, v in vars(self).items() if k != "_terms"}

    def __setstate__(self, state):
        vars(self).update(state)
        self._terms = []

    def __repr__(self) -> str:
        return f"MBTSADLoss(alpha={self.alpha}, beta={self.beta}, attention={self.attention})"

    def capture(self, model, batch):
        import contextlib

        self._terms = []
        if not self.attention:
            return contextlib.nullcontext()
        teacher, mask = batch[TEACHER_AE], batch["attention_mask"]

        def on_layer(layer: int, probs: torch.Tensor) -> None:
            if layer >= teacher.shape[1]:
                raise ValueError(f"the student has more attention layers than the teacher's "
                                 f"{teacher.shape[1]} maps")
            # reduce over heads now: only [B, L, L] (and the [B] term) outlive this block
            self._terms.append(attention_transfer(attention_enhancement(probs), teacher[:, layer], mask))

        return tap_attentions(model, on_layer)

    def __call__(self, outputs, batch):
        logits = outputs.logits.float()
        ce = F.cross_entropy(logits, batch["label"].to(logits.device))
        zero = logits.new_zeros(())
        att = zero
        if self.attention:
            if not self._terms:
                raise RuntimeError("MBTSADLoss: no attention was tapped (is capture() around the forward?)")
            if len(self._terms) != batch[TEACHER_AE].shape[1]:
                raise ValueError(f"student tapped {len(self._terms)} attention layers, teacher has "
                                 f"{batch[TEACHER_AE].shape[1]}")
            att = torch.stack(self._terms, 1).sum(1).mean()
        self._terms = []
        hid = zero
        if self.beta > 0:
            teacher = batch[TEACHER_LAYERS]
            states = outputs.hidden_states
            if len(states) != teacher.shape[1]:
                raise ValueError(f"student has {len(states)} hidden states, teacher {teacher.shape[1]}")
            hid = sum(hidden_mse(h, teacher[:, n], batch["attention_mask"]) for n, h in enumerate(states))
        loss = att + self.alpha * ce + self.beta * hid
        return loss, {"att": float(att.detach()), "ce": float(ce.detach()), "hid": float(hid.detach())}
