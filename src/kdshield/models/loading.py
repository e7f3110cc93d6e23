"""Loading and saving sequence classifiers, safely.

Suspect models are the input this project exists for, so loading follows three rules:
weights come from safetensors only (a directory holding only pickle weights is refused before
anything is opened), ``trust_remote_code`` is always False (a model's own Python code is never
run), and every problem with the input becomes one :class:`~kdshield.errors.InputError` line.

Decoder-only models classify from the hidden state of their last non-pad token. transformers
finds that token as the rightmost position whose id differs from ``config.pad_token_id``, which
works for left and right padding alike, so :func:`load_classifier` always sets
``config.pad_token_id`` on decoders (to eos when the tokenizer has no pad token). Caveat of
pad = eos: an eos token written inside a text is also skipped by that rule.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from kdshield.errors import InputError
from kdshield.models.presets import resolve_model

#: Suffixes of weight files that are Python pickles (loading one can execute code).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
#: Weight formats kdshield does not read at all.
OTHER_WEIGHT_SUFFIXES = (".h5", ".msgpack", ".gguf", ".onnx")


def check_safe_weights(model_dir: str | os.PathLike) -> None:
    """Refuse a local model directory unless it holds safetensors weights.

    Raises :class:`InputError` when the directory holds only pickle weights
    (``pytorch_model.bin``, ``*.pt``, ``*.pth``, ``*.ckpt``, ``*.pkl``) or no weights at all.
    Other pickles next to safetensors weights (``training_args.bin``) are harmless: they are
    never opened.
    """
    path = Path(model_dir)
    if not path.is_dir():
        raise InputError(f"model directory {str(path)!r} does not exist")
    files = sorted(p.name for p in path.iterdir() if p.is_file())
    if any(f.endswith(".safetensors") for f in files):
        return
    pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise InputError(
            f"model directory {str(path)!r} holds only pickle weights ({', '.join(pickles)}); "
            "kdshield loads safetensors only: convert it in a trusted environment")
    others = [f for f in files if f.endswith(OTHER_WEIGHT_SUFFIXES)]
    found = f"only {', '.join(others)}" if others else "no weights"
    raise InputError(f"model directory {str(path)!r} holds {found}; "
                     "kdshield needs *.safetensors weights")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _open(loader: Any, name: str, path: str, what: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained(path, trust_remote_code=False, ...)``, errors as InputError."""
    try:
        return loader.from_pretrained(path, trust_remote_code=False, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        if isinstance(err, InputError):
            raise
        raise InputError(f"cannot load the {what} of model {name!r}: {_first_line(err)}") from err


def _local_model_dir(name: str, path: str) -> bool:
    """True for a local directory; it must then be a Hugging Face model directory."""
    if not os.path.isdir(path):
        return False
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise InputError(f"model directory {name!r} has no config.json: "
                         "not a Hugging Face model directory")
    return True


def load_config(name_or_path: str | os.PathLike):
    """The model's ``PretrainedConfig``, never running custom code."""
    name = os.fspath(name_or_path)
    return _config(name, resolve_model(name))


def _config(name: str, path: str):
    from transformers import AutoConfig

    local = _local_model_dir(name, path)
    try:
        return _open(AutoConfig, name, path, "config")
    except InputError as err:
        if local and "auto_map" in Path(path, "config.json").read_text(errors="replace"):
            raise InputError(f"model {name!r} needs its own Python code (auto_map in config.json) "
                             "and kdshield never runs a model's code") from err
        raise


def model_family(config) -> str:
    """``"decoder"`` for decoder-only causal LMs (Llama, Qwen2, GPT-2 ...), else ``"encoder"``.

    Decoders pool their last non-pad token and need ``pad_token_id``; everything else
    (bidirectional encoders, and encoder-decoders, which pool their own way) is ``"encoder"``.
    """
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if getattr(config, "is_encoder_decoder", False):
        return "encoder"
    model_type = config.get_text_config().model_type
    causal = model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    masked = model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    return "decoder" if causal and not masked else "encoder"


def hidden_size(config) -> int:
    """Width of the hidden states (``n_embd``, ``dim`` ... are mapped by transformers)."""
    return int(config.get_text_config().hidden_size)


def num_layers(config) -> int:
    """Number of transformer blocks."""
    return int(config.get_text_config().num_hidden_layers)


def load_tokenizer(name_or_path: str | os.PathLike, *, padding_side: str | None = None):
    """The model's tokenizer (no custom code); pad token set to eos when it has none."""
    from transformers import AutoTokenizer

    if padding_side not in (None, "left", "right"):
        raise InputError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
    name = os.fspath(name_or_path)
    path = resolve_model(name)
    _local_model_dir(name, path)
    tokenizer = _open(AutoTokenizer, name, path, "tokenizer")
    _ensure_pad_token(tokenizer, name)
    if padding_side is not None:
        tokenizer.padding_side = padding_side
    return tokenizer


def _ensure_pad_token(tokenizer, name: str) -> None:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise InputError(f"the tokenizer of model {name!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token


def load_classifier(
    name_or_path: str | os.PathLike,
    num_labels: int,
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
    tokenizer=None,
):
    """``(model, tokenizer)``: a sequence classifier with ``num_labels`` outputs.

    Weights load from safetensors only, without custom code. A checkpoint without a
    classification head (a base or causal LM) gets a freshly initialised one; a classifier
    checkpoint with another number of labels gets its head replaced. For decoders,
    ``config.pad_token_id`` is set from the tokenizer so that pooling finds the last
    non-pad token under left or right padding.
    """
    from transformers import AutoModelForSequenceClassification

    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 2:
        raise InputError(f"num_labels must be an integer >= 2, not {num_labels!r}")
    name = os.fspath(name_or_path)
    path = resolve_model(name)
    if _local_model_dir(name, path):
        check_safe_weights(path)
    config = _config(name, path)
    if tokenizer is None:
        tokenizer = load_tokenizer(path)
    else:
        _ensure_pad_token(tokenizer, name)
    text_config = config.get_text_config()
    vocab = getattr(text_config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise InputError(f"the tokenizer for model {name!r} has {len(tokenizer)} tokens but the "
                         f"model's vocabulary holds only {vocab}")
    if model_family(config) == "decoder":
        text_config.pad_token_id = tokenizer.pad_token_id
        config.pad_token_id = tokenizer.pad_token_id

    replace_head = False
    if config.num_labels != num_labels:
        replace_head = any(a.endswith("ForSequenceClassification")
                           for a in (config.architectures or []))
        config.num_labels = num_labels
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = _open(AutoModelForSequenceClassification, name, path, "weights", config=config,
                  dtype=dtype, use_safetensors=True, ignore_mismatched_sizes=replace_head,
                  **kwargs)
    return model, tokenizer


def save_classifier(model, tokenizer, out_dir: str | os.PathLike) -> Path:
    """Write ``model`` (safetensors + config) and ``tokenizer`` to ``out_dir``; returns it.

    The result loads with ``AutoModelForSequenceClassification.from_pretrained(out_dir)``.
    Files are written to a sibling temporary directory first, and ``out_dir`` (replaced as a
    whole if it exists) only ever holds a complete model.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"output {str(out)!r} exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    old = out.parent / f"{tmp.name}-old"
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if not any(tmp.glob("*.safetensors")):
            raise RuntimeError(f"save_pretrained wrote no safetensors weights into {tmp}")
        if out.exists():
            out.rename(old)
        try:
            tmp.rename(out)
        except OSError:
            if old.exists():
                old.rename(out)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return out


def describe(name_or_path: str | os.PathLike) -> dict:
    """Family, size and shape of a model, read from its config without loading weights.

    Returns ``{"name", "path", "model_type", "family", "params", "layers", "hidden",
    "vocab_size"}``; ``params`` counts the backbone (no task head), built on the meta device.
    """
    from transformers import AutoModel

    name = os.fspath(name_or_path)
    path = resolve_model(name)
    config = _config(name, path)
    with torch.device("meta"):
        backbone = AutoModel.from_config(config, trust_remote_code=False)
    text_config = config.get_text_config()
    return {
        "name": name,
        "path": path,
        "model_type": text_config.model_type,
        "family": model_family(config),
        "params": sum(p.numel() for p in backbone.parameters()),
        "layers": num_layers(config),
        "hidden": hidden_size(config),
        "vocab_size": getattr(text_config, "vocab_size", None),
    }
