"""What a frozen model can hand to a loss: its outputs on a padded batch, and what caching them costs.

Batch inference (:mod:`kdshield.trainables.inference`) stores these as columns of a stream; a
live teacher inside the training loop computes them per batch. Both call :func:`model_outputs`.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch

from kdshield.models.attention import attention_enhancement, tap_attentions
from kdshield.models.pooling import pool

OUTPUTS = ("logits", "pooled", "hidden_states", "hidden_seq", "layer_seq", "ae_token_map")
#: Outputs that are one entry per token (unpadded per row in cached columns).
TOKEN_OUTPUTS = ("hidden_seq", "layer_seq", "ae_token_map")


def model_outputs(model, ids, mask, outputs: tuple[str, ...], family: str) -> dict[str, Any]:
    """A frozen model's outputs on one padded batch, as float32 tensors padded like ``ids``
    (``ids``, ``mask`` [B, L]); the keys are the names in ``outputs``:

    * ``logits`` [B, C];
    * ``pooled`` [B, H]: the last hidden state at [CLS] (encoders) or the last real token;
    * ``hidden_states`` [B, N+1, H]: every hidden state (embeddings, then each of the N
      blocks), pooled that way;
    * ``hidden_seq`` [B, L, H]: the last hidden state of every token (zero on padding);
    * ``layer_seq`` [B, N+1, L, H]: every hidden state of every token (zero on padding);
    * ``ae_token_map`` [B, N, L, L]: per block, MBTSAD's attention enhancement
      ``sum_heads a^2`` of the softmax attention (zero on padded rows and columns). Needs a
      model loaded with ``attn_implementation="eager"``; each block's map is reduced over
      heads as soon as the block has run (:func:`kdshield.models.attention.tap_attentions`).

    Run it under ``torch.no_grad()`` or ``torch.inference_mode()``.
    """
    unknown = set(outputs) - set(OUTPUTS)
    if unknown:
        raise ValueError(f"unknown outputs {sorted(unknown)}; choose from {OUTPUTS}")
    need_hidden = any(o in outputs for o in ("pooled", "hidden_states", "hidden_seq", "layer_seq"))
    maps: list[torch.Tensor] = []
    tap = (tap_attentions(model, lambda layer, probs: maps.append(attention_enhancement(probs)))
           if "ae_token_map" in outputs else contextlib.nullcontext())
    with tap:
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=need_hidden)
    m = mask.to(torch.float32)
    result: dict[str, Any] = {}
    if "logits" in outputs:
        result["logits"] = out.logits.float()
    if "pooled" in outputs:
        result["pooled"] = pool(out.hidden_states[-1], mask, family).float()
    if "hidden_states" in outputs:
        result["hidden_states"] = torch.stack([pool(h, mask, family) for h in out.hidden_states], 1).float()
    if "hidden_seq" in outputs:
        result["hidden_seq"] = out.hidden_states[-1].float() * m[:, :, None]
    if "layer_seq" in outputs:
        result["layer_seq"] = torch.stack(out.hidden_states, 1).float() * m[:, None, :, None]
    if "ae_token_map" in outputs:
        result["ae_token_map"] = torch.stack(maps, 1) * (m[:, None, :, None] * m[:, None, None, :])
    return result


def cache_bytes(lengths, outputs: tuple[str, ...], *, layers: int, hidden: int, num_labels: int) -> int:
    """Bytes (float32) that caching ``outputs`` costs for rows of token counts ``lengths``."""
    lengths = np.asarray(lengths, dtype=np.int64)
    per = {"logits": np.full_like(lengths, num_labels), "pooled": np.full_like(lengths, hidden),
           "hidden_states": np.full_like(lengths, (layers + 1) * hidden), "hidden_seq": lengths * hidden,
           "layer_seq": (layers + 1) * lengths * hidden, "ae_token_map": layers * lengths ** 2}
    return int(4 * sum(int(per[o].sum()) for o in outputs))


