"""Stage losses: pure PyTorch, no Ray.

A stage loss is a callable ``loss(outputs, batch) -> (scalar, logs)`` where ``outputs`` is the
Hugging Face model output of the batch and ``batch`` the padded tensors from the data stream
(``input_ids``, ``attention_mask``, ``label`` and any cached teacher columns). Class attributes
tell the engine which extra outputs the forward pass must return, so nothing is computed that
no loss reads.

Two optional hooks let a loss go beyond ``outputs``:

* ``module``: an ``nn.Module`` of the loss's own trainable parameters (connectors, masks ...).
  The engine trains it together with the stage's model (same optimizer, same DeepSpeed
  engine, same checkpoints) and exports its state as safetensors with the stage's result.
  Call its submodules (their ``forward``) rather than reading raw parameters, so ZeRO-3 can
  gather them.
* ``capture(model, batch)``: a context manager wrapped around the forward pass, for losses
  that need intermediate values (e.g. per-layer attention maps reduced as soon as each layer
  produces them, instead of keeping all of them until the loss runs).
"""

from __future__ import annotations

import abc
import contextlib

import torch
import torch.nn.functional as F


class StageLoss(abc.ABC):
    """Base of all stage losses."""

    needs_hidden_states: bool = False
    needs_attentions: bool = False
    module: torch.nn.Module | None = None

    def capture(self, model, batch: dict[str, torch.Tensor]):
        """Context manager around the forward pass of ``model`` on ``batch`` (default: nothing)."""
        return contextlib.nullcontext()

    @abc.abstractmethod
    def __call__(self, outputs, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """The scalar to minimise and a few named floats to log."""

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class CrossEntropy(StageLoss):
    """Plain supervised loss: mean cross-entropy of ``outputs.logits`` [B, C] against ``label`` [B]."""

    def __call__(self, outputs, batch):
        loss = F.cross_entropy(outputs.logits.float(), batch["label"])
        return loss, {"ce": loss.detach().item()}
