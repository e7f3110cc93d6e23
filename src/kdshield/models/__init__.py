"""Model presets and safe loading: safetensors only, never a model's own code.

>>> model, tokenizer = load_classifier("tiny-llama", num_labels=2)   # doctest: +SKIP
"""

from kdshield.models.loading import (
    check_safe_weights,
    describe,
    hidden_size,
    load_classifier,
    load_config,
    load_tokenizer,
    model_family,
    num_layers,
    save_classifier,
)
from kdshield.models.presets import PRESETS, Preset, resolve_model

__all__ = [
    "PRESETS",
    "Preset",
    "check_safe_weights",
    "describe",
    "hidden_size",
    "load_classifier",
    "load_config",
    "load_tokenizer",
    "model_family",
    "num_layers",
    "resolve_model",
    "save_classifier",
]
