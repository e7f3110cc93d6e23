"""Stage losses and the loss pieces several defenses share: pure PyTorch, no Ray.

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

Shared pieces (each defense's own losses build on them): :func:`kl_at_temperature`,
:func:`masked_sq_error` / :func:`masked_mse`, :func:`activation_map` and
:func:`map_distance` (attention maps, MBTSAD and NAD), :func:`seeded` (a seeded RNG fork for
modules that must start the same in every run).
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterator

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


def kl_at_temperature(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, *,
                      per_sample: bool = False, hinton_scale: bool = False) -> torch.Tensor:
    """``KL(softmax(t / T) || softmax(s / T))`` summed over classes: the batch mean (or ``[B]``
    with ``per_sample``), times ``T^2`` with ``hinton_scale`` (the soft term's gradients then keep
    their size as T changes). ``student_logits``, ``teacher_logits`` [B, C]."""
    t = float(temperature)
    if not t > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_t = F.log_softmax(teacher_logits.to(student_logits.device).float() / t, dim=-1)
    if per_sample:
        kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    else:
        kl = F.kl_div(log_s, log_t, reduction="batchmean", log_target=True)
    return kl * t * t if hinton_scale else kl


def masked_sq_error(student: torch.Tensor, teacher: torch.Tensor,
                    mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample sum of squared errors over real tokens and the per-sample element count.
    ``student``, ``teacher``: [B, L, H]; ``mask``: [B, L] (1 = real token) -> ([B], [B])."""
    if student.shape != teacher.shape:
        raise ValueError(f"student hidden states {tuple(student.shape)} and teacher's "
                         f"{tuple(teacher.shape)} differ in shape")
    m = mask.to(student.device, torch.float32).unsqueeze(-1)  # [B, L, 1]
    sq = ((student.float() - teacher.to(student.device).float()) ** 2 * m).sum(dim=(1, 2))  # [B]
    count = m.sum(dim=(1, 2)) * student.shape[-1]  # [B]
    return sq, count


def masked_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MSE over the real tokens and the hidden size: [B, L, H] twice, ``mask`` [B, L] -> scalar."""
    sq, count = masked_sq_error(student, teacher, mask)
    return sq.sum() / count.sum().clamp_min(1.0)


def activation_map(features: torch.Tensor, p: float = 2.0, *, dim: int = -1) -> torch.Tensor:
    """An attention map in the sense of attention transfer (Zagoruyko & Komodakis; NAD): the sum
    of ``|features| ** p`` over the channel axis ``dim``. Hidden states [B, L, H] -> [B, L];
    attention probabilities [B, heads, L, L] with ``dim=1`` -> [B, L, L]."""
    return features.float().abs().pow(p).sum(dim=dim)


def map_distance(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None,
                 eps: float = 1e-12) -> torch.Tensor:
    """``|| A_t / ||A_t||_2 - A_s / ||A_s||_2 ||_2`` per sample, the norms over the whole map.

    ``student``, ``teacher``: maps [B, ...] of one shape; ``mask`` (broadcastable to them, 1 = a
    real position) zeroes padding first. Returns [B], each in [0, 2] (0 when one map is a
    positive multiple of the other)."""
    if student.shape != teacher.shape:
        raise ValueError(f"maps differ in shape: student {tuple(student.shape)}, teacher {tuple(teacher.shape)}")
    s, t = student.float(), teacher.to(student.device).float()
    if mask is not None:
        m = mask.to(s.device, torch.float32)
        s, t = s * m, t * m
    s, t = s.flatten(1), t.flatten(1)
    s = s / s.norm(dim=1, keepdim=True).clamp_min(eps)
    t = t / t.norm(dim=1, keepdim=True).clamp_min(eps)
    return (t - s).norm(dim=1)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Inside: torch's CPU RNG seeded with ``seed``; outside, its state is as before (a module
    built inside starts the same in every run without disturbing anyone else's draws)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
