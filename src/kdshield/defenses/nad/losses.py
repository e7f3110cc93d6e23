"""NAD's loss (pure PyTorch): CE on the clean labels plus the attention-distillation term.

An attention map of a layer is ``A = sum_channels |F|^p`` (:func:`~kdshield.defenses.losses.activation_map`):
for a transformer block, F is its output hidden states [L, H], so A is one value per token [L]
(the paper's spatial positions are tokens here, its channels the hidden size). The NAD loss
(Li et al., Eq. 2) is ``sum_k || A_T^k / ||A_T^k||_2 - A_S^k / ||A_S^k||_2 ||_2`` over the
distilled layers k (:func:`~kdshield.defenses.losses.map_distance`, padding left out).

Batches: ``input_ids``, ``attention_mask`` [B, L], ``label`` [B], and the teacher's
``teacher_layer_seq`` [B, N+1, L, H] (every hidden state of every token, cached by batch
inference or computed live).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdshield.defenses.losses import StageLoss, activation_map, map_distance

TEACHER_LAYERS = "teacher_layer_seq"
TEACHER_OUTPUTS = ("layer_seq",)


class NADLoss(StageLoss):
    """``CE(logits, y) + beta * mean_b sum_k map_distance(A_S^k, A_T^k)`` (NAD, Eq. 3).

    ``outputs.hidden_states`` (N+1 tensors [B, L, H]) and ``batch["teacher_layer_seq"]``
    [B, N+1, L, H] at hidden-state indices ``layers``; maps ``A = sum_H |h|^p`` [B, L] over
    the real tokens (``batch["attention_mask"]``). Logs ``ce`` and ``at`` (the summed distance).
    """

    needs_hidden_states = True

    def __init__(self, beta: float, layers: list[int], p: float = 2.0):
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        if not layers:
            raise ValueError("NADLoss needs at least one layer")
        if p <= 0:
            raise ValueError(f"p must be > 0, got {p}")
        self.beta, self.layers, self.p = float(beta), list(layers), float(p)

    def __call__(self, outputs, batch):
        logits = outputs.logits.float()
        ce = F.cross_entropy(logits, batch["label"].to(logits.device))
        teacher, mask = batch[TEACHER_LAYERS], batch["attention_mask"]
        states = outputs.hidden_states
        if len(states) != teacher.shape[1]:
            raise ValueError(f"student has {len(states)} hidden states, teacher {teacher.shape[1]}")
        at = torch.stack([map_distance(activation_map(states[k], self.p), activation_map(teacher[:, k], self.p), mask)
                          for k in self.layers], 1).sum(1).mean()
        return ce + self.beta * at, {"ce": float(ce.detach()), "at": float(at.detach())}
