"""Model presets and safe loading: safetensors only, never a model's own code.

>>> model, tokenizer = load_classifier("tiny-llama", num_labels=2)   # doctest: +SKIP
"""

from kdshield.models.loading import (
    accelerator_device,
    block_list_name,
    check_keep_layers,
    check_safe_weights,
    count_parameters,
    describe,
    head_problem,
    hidden_size,
    load_classifier,
    load_classifier_partitioned,
    load_config,
    load_tokenizer,
    model_family,
    num_layers,
    reduced_copy,
    save_classifier,
)
from kdshield.models.presets import PRESETS, Preset, resolve_model

__all__ = [
    "accelerator_device",
    "PRESETS",
    "Preset",
    "block_list_name",
    "check_keep_layers",
    "check_safe_weights",
    "count_parameters",
    "describe",
    "head_problem",
    "hidden_size",
    "load_classifier",
    "load_classifier_partitioned",
    "load_config",
    "load_tokenizer",
    "model_family",
    "num_layers",
    "reduced_copy",
    "resolve_model",
    "save_classifier",
]
