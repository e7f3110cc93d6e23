"""Reading attention probabilities layer by layer, as the forward pass produces them.

``output_attentions=True`` makes a Hugging Face model collect every layer's softmax attention
``[B, heads, L, L]`` and return them all at the end, so a loss that reads them holds all
layers' full tensors at once (on top of what autograd saves). :func:`tap_attentions` instead
calls a function on each layer's attention the moment that layer has computed it, so the
caller can reduce it (e.g. sum over heads) and keep only the reduction.

Attention probabilities exist only with an attention implementation that materialises them:
load the model with ``attn_implementation="eager"``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch


def _attention_class(model) -> tuple[type, int]:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft (LoRA) model's own
    for m in (model, getattr(model, "base_model", None), inner, getattr(inner, "base_model", None)):
        spec = getattr(type(m), "_can_record_outputs", None) or {}
        target = spec.get("attentions")
        if target is None:
            continue
        if isinstance(target, type):
            return target, 1
        return target.target_class, int(getattr(target, "index", 1) or 1)
    raise ValueError(f"{type(model).__name__} does not say which modules compute its attentions")


@contextlib.contextmanager
def tap_attentions(model, fn: Callable[[int, torch.Tensor], None], *, eval_mode: bool = False) -> Iterator[None]:
    """Within the block, every forward of ``model`` calls ``fn(layer, probs)`` as soon as block
    ``layer`` (0-based) has computed its attention probabilities ``probs`` [B, heads, L, L]
    (the softmax outputs, after attention dropout in training mode, as transformers returns
    them). ``eval_mode``: the model runs in eval mode within the block (no dropout anywhere;
    gradients still flow), so its maps are taken as a frozen model's are. Raises RuntimeError from the forward when the model was not loaded
    with an implementation that returns them (``attn_implementation="eager"``)."""
    cls, index = _attention_class(model)
    modules = [m for m in model.modules() if type(m) is cls]
    mode = model.training
    handles = []

    def make_hook(layer: int):
        def hook(module, args, output):
            probs = output[index] if isinstance(output, (tuple, list)) and len(output) > index else None
            if probs is None:
                raise RuntimeError("attention probabilities are not available: load the model with "
                                   "attn_implementation='eager'")
            fn(layer, probs)
        return hook

    try:
        for i, m in enumerate(modules):
            handles.append(m.register_forward_hook(make_hook(i)))
        if eval_mode:
            model.train(False)
        yield
    finally:
        for h in handles:
            h.remove()
        model.train(mode)


def attention_enhancement(probs: torch.Tensor) -> torch.Tensor:
    """MBTSAD's Attention Enhancement (Eq. 3): ``AE(a) = sum_heads |a|^2``.

    ``probs`` [..., heads, L, L] -> [..., L, L] (float32)."""
    return probs.float().pow(2).sum(dim=-3)
