"""MBTSAD's loss: attention transfer + CE + hidden-state MSE (Eq. 1-7), pure PyTorch.

Batches: ``input_ids``, ``attention_mask`` [B, L], ``label`` [B], and the teacher's outputs
``teacher_ae_token_map`` [B, N, L, L] (per block, ``sum_heads a^2`` of its softmax attention)
and ``teacher_layer_seq`` [B, N+1, L, H] (embedding output and every block's hidden states),
cached by batch inference or computed live.

Memory of the attention term: ``output_attentions=True`` would have the model collect all N
layers' ``[B, heads, L, L]`` tensors and hand them over at the end, and stacking them for the
loss copies them again. :class:`MBTSADLoss` instead taps each block's attention as the block
produces it (:func:`kdshield.models.attention.tap_attentions`), reduces it over heads at
once and keeps only the per-sample loss term (plus the ``[B, L, L]`` tensors autograd needs),
so no extra ``[B, heads, L, L]`` tensor outlives its block (see benchmarks/mbtsad_memory.py).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from kdshield.defenses.losses import StageLoss, map_distance, masked_mse
from kdshield.models.attention import attention_enhancement, tap_attentions

TEACHER_AE = "teacher_ae_token_map"
TEACHER_LAYERS = "teacher_layer_seq"


def attention_transfer(ae_student: torch.Tensor, ae_teacher: torch.Tensor,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
    """MBTSAD's AT (Eq. 4) per sample: :func:`~kdshield.defenses.losses.map_distance` of the two
    attention-enhancement maps [B, L, L] (:func:`kdshield.models.attention.attention_enhancement`),
    restricted by ``mask`` [B, L] (1 = real token) to real query rows and key columns. Returns
    [B], each in [0, 2]."""
    pair = None if mask is None else mask[:, :, None] * mask[:, None, :]
    return map_distance(ae_student, ae_teacher, pair)


class MBTSADLoss(StageLoss):
    """``L_a + alpha * L_cls + beta * L_h`` (MBTSAD Eq. 1).

    * ``L_a = mean_b sum_n AT(a_t^n, a_s^n)`` over the N blocks (Eq. 2-4,
      :func:`attention_transfer`), from the student's attention probabilities, tapped block by
      block during the forward (:meth:`capture`; the model must use eager attention), and
      ``batch["teacher_ae_token_map"]`` [B, N, L, L];
    * ``L_cls = CE(outputs.logits [B, C], batch["label"] [B])`` (Eq. 7);
    * ``L_h = sum_{n=0}^{N} MSE(h_t^n, h_s^n)`` over the embedding output and every block
      (Eq. 5-6, :func:`~kdshield.defenses.losses.masked_mse`), from ``outputs.hidden_states`` (N+1 tensors [B, L, H]) and
      ``batch["teacher_layer_seq"]`` [B, N+1, L, H].

    ``attention=False`` drops L_a, ``beta=0`` drops L_h (then neither teacher column is
    read). Logs ``att``, ``ce``, ``hid``.
    """

    def __init__(self, alpha: float = 1.0, beta: float = 1.0, *, attention: bool = True,
                 eval_attention: bool = False):
        if alpha < 0 or beta < 0:
            raise ValueError(f"alpha and beta must be >= 0, got {alpha}, {beta}")
        self.alpha, self.beta, self.attention = float(alpha), float(beta), bool(attention)
        self.eval_attention = bool(eval_attention)  # the student in eval mode: its maps without dropout
        self.needs_hidden_states = self.beta > 0
        self._terms: list[torch.Tensor] = []

    def __getstate__(self):
        return {k: v for k, v in vars(self).items() if k != "_terms"}

    def __setstate__(self, state):
        vars(self).update(state)
        self._terms = []

    def __repr__(self) -> str:
        return (f"MBTSADLoss(alpha={self.alpha}, beta={self.beta}, attention={self.attention}"
                + (", eval_attention=True)" if self.eval_attention else ")"))

    def capture(self, model, batch):
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

        return tap_attentions(model, on_layer, eval_mode=self.eval_attention)

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
            hid = sum(masked_mse(h, teacher[:, n], batch["attention_mask"]) for n, h in enumerate(states))
        loss = att + self.alpha * ce + self.beta * hid
        return loss, {"att": float(att.detach()), "ce": float(ce.detach()), "hid": float(hid.detach())}
