"""Sequence pooling shared by losses and batch inference."""

from __future__ import annotations

import torch


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last non-pad position of every row of ``attention_mask`` [B, L] -> [B].

    Correct for right padding (``1 1 1 0 0``), left padding (``0 0 1 1 1``) and no padding.
    """
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(dim=-1)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, family: str) -> torch.Tensor:
    """One vector per sequence from ``hidden`` [B, L, H] -> [B, H].

    Encoders (BERT family) use the first ([CLS]) position; decoders the last non-pad token,
    the one that has attended to the whole text.
    """
    if family == "encoder":
        return hidden[:, 0]
    if family == "decoder":
        idx = last_token_index(attention_mask)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
    raise ValueError(f"unknown model family {family!r}")
