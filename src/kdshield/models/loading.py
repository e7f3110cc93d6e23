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
from kdshield.outputs import verbose

if not verbose():  # a bar and a "LOAD REPORT" table per model load tell a user nothing they can act on
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()  # as Ray workers get it (TRANSFORMERS_VERBOSITY)

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


HEAD_INIT_SEED = 0  # see load_classifier


def _is_classifier(config) -> bool:
    return any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))


def head_problem(name_or_path: str | os.PathLike, num_labels: int) -> str | None:
    """Why the checkpoint has no trained ``num_labels``-way classification head (so that
    ``load_classifier`` would draw a fresh one), or None when it has one. Reads the config only."""
    config = load_config(name_or_path)
    if not _is_classifier(config):
        kinds = ", ".join(config.architectures or []) or "no architectures listed"
        return f"the checkpoint is not a sequence classifier ({kinds})"
    if config.num_labels != num_labels:
        return f"its classification head has {config.num_labels} labels, not {num_labels}"
    return None


def accelerator_device() -> torch.device:
    """The device this process computes on, as DeepSpeed's accelerator names it (``cuda:N`` on a
    GPU Ray gave this process, else ``cpu``): one code path for CPU and GPU, no device hard-coded."""
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def load_classifier(
    name_or_path: str | os.PathLike,
    num_labels: int,
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
    tokenizer=None,
    keep_layers: tuple[int, ...] | list[int] | None = None,
    init: str = "pretrained",
):
    """``(model, tokenizer)``: a sequence classifier with ``num_labels`` outputs.

    ``keep_layers`` (0-based transformer block indices, strictly ascending) returns a
    reduced-depth copy instead: the same architecture with only those blocks, block ``j`` of
    the copy holding the weights of block ``keep_layers[j]`` (embeddings, final norm and head
    copied too). ``init="random"`` keeps the (reduced) architecture but initialises every
    weight afresh (seeded by the torch RNG), e.g. for a student trained from scratch.

    Weights load from safetensors only, without custom code. A checkpoint without a
    classification head (a base or causal LM) gets a freshly initialised one; a classifier
    checkpoint with another number of labels gets its head replaced. Either way the new head
    is drawn from ``HEAD_INIT_SEED``, so every process loading the model gets the same head.
    For decoders, ``config.pad_token_id`` is set from the tokenizer so that pooling finds the last
    non-pad token under left or right padding.
    """
    from transformers import AutoModelForSequenceClassification

    name = os.fspath(name_or_path)
    path, config, tokenizer, replace_head = _classifier_config(name, num_labels, tokenizer)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    # A head the checkpoint lacks is initialised from a fixed seed, not from the caller's RNG:
    # every process that loads the model (Train workers, inference actors, a re-run) gets the same
    # one. The caller's RNG state is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(HEAD_INIT_SEED)
        model = _open(AutoModelForSequenceClassification, name, path, "weights", config=config,
                      dtype=dtype, use_safetensors=True, ignore_mismatched_sizes=replace_head,
                      **kwargs)
    if keep_layers is not None or init != "pretrained":
        model = reduced_copy(model, keep_layers, init=init)
    return model, tokenizer


def _classifier_config(name: str, num_labels: int, tokenizer=None):
    """``(path, config, tokenizer, replace_head)`` for loading ``name`` as a ``num_labels``-way
    classifier: the checks and the config changes both loaders make (pad token of decoders, the
    number of labels; ``replace_head``: the checkpoint's own classifier head has another size)."""
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 2:
        raise InputError(f"num_labels must be an integer >= 2, not {num_labels!r}")
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
        replace_head = _is_classifier(config)
        config.num_labels = num_labels
    return path, config, tokenizer, replace_head


def load_classifier_partitioned(name_or_path: str | os.PathLike, num_labels: int, *, ds_config: dict,
                                dtype: torch.dtype = torch.float32, attn_implementation: str | None = None):
    """``(model, tokenizer)`` as :func:`load_classifier` gives them, built under DeepSpeed's
    ``zero.Init`` with ``ds_config`` (ZeRO-3) so that every parameter is partitioned across the
    ranks as soon as it exists, each rank reading only its partitions from the safetensors
    (:mod:`kdshield.models.partitioned`). Call it on every rank of an initialised process group.

    The base model is built without initialising its weights (each rank then reads its
    partitions); a head the checkpoint lacks (or has in another size) is initialised as
    :func:`load_classifier` does it (the model's own ``_init_weights`` from ``HEAD_INIT_SEED``),
    gathered onto rank 0 and broadcast, so every rank holds the same head."""
    import deepspeed
    from transformers import AutoModelForSequenceClassification
    from transformers import initialization as hf_init
    from transformers.integrations.deepspeed import prevent_arange_dtype_change

    from kdshield.models.partitioned import checkpoint_index, fill_partitions, plan_partitioned_load

    name = os.fspath(name_or_path)
    path, config, tokenizer, _ = _classifier_config(name, num_labels)
    entries = checkpoint_index(path)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with torch.device("meta"):  # names and shapes first: a checkpoint that does not fit fails before any work
        plan_partitioned_load(AutoModelForSequenceClassification.from_config(config, **kwargs), entries)
    offload = bool(ds_config.get("zero_optimization", {}).get("offload_param"))
    # no_init_weights: every base weight is about to be read, so none is drawn; the arange guard
    # keeps the rotary buffers in fp32 under zero.Init's dtype (as transformers' own ZeRO-3 path).
    # The dtype goes through the config: zero.Init(dtype=float32) gives bf16 on a CPU accelerator
    # (DeepSpeed 0.19's _set_dtype: an operator-precedence slip), while the config's flag is read right.
    init_config = {**ds_config, "bf16": {"enabled": dtype == torch.bfloat16}}
    with hf_init.no_init_weights(), prevent_arange_dtype_change(), deepspeed.zero.Init(
            config_dict_or_path=init_config, remote_device="cpu" if offload else None):
        model = AutoModelForSequenceClassification.from_config(config, dtype=dtype, **kwargs)
    plan, fresh = plan_partitioned_load(model, entries)
    fill_partitions(model, plan)
    _init_fresh_head(model, fresh)
    return model, tokenizer


def _init_fresh_head(model, fresh: list[str]) -> None:
    """Initialise the named (ZeRO-3) parameters the checkpoint did not supply with the model's own
    ``_init_weights`` from ``HEAD_INIT_SEED``: on rank 0, broadcast to the others."""
    import deepspeed

    owners = {name.rpartition(".")[0] for name in fresh}
    modules = [m for n, m in model.named_modules() if n in owners]
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(HEAD_INIT_SEED)
        for module in modules:
            with deepspeed.zero.GatheredParameters(list(module.parameters(recurse=False)), modifier_rank=0):
                if deepspeed.comm.get_rank() == 0:
                    model._init_weights(module)


def block_list_name(model) -> str:
    """Qualified name of the ``nn.ModuleList`` holding a model's transformer blocks
    (``bert.encoder.layer``, ``model.layers`` ...): the first ModuleList with
    ``num_hidden_layers`` entries."""
    n = num_layers(model.config)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return name
    raise InputError(f"cannot find the {n} transformer blocks of a {type(model).__name__}")


def check_keep_layers(keep_layers, n_layers: int, what: str = "keep_layers") -> tuple[int, ...]:
    """``keep_layers`` as a tuple after checking it is non-empty, strictly ascending and
    within ``[0, n_layers)``; InputError otherwise."""
    keep = tuple(int(i) for i in keep_layers)
    if not keep:
        raise InputError(f"{what}: keep at least one of the {n_layers} blocks")
    bad = [i for i in keep if not 0 <= i < n_layers]
    if bad:
        raise InputError(f"{what}: block(s) {bad} do not exist; the model has blocks 0..{n_layers - 1}")
    if any(b <= a for a, b in zip(keep, keep[1:])):
        raise InputError(f"{what}: {list(keep)} must be strictly ascending")
    return keep


def reduced_copy(model, keep_layers=None, *, init: str = "pretrained"):
    """A new model of ``model``'s class keeping only the blocks ``keep_layers`` (all when None);
    weights copied from ``model`` (``init="pretrained"``) or freshly initialised (``"random"``).
    Per-layer config lists (``layer_types``) are subset to match."""
    import copy
    import re

    if init not in ("pretrained", "random"):
        raise InputError(f"init must be 'pretrained' or 'random', not {init!r}")
    n = num_layers(model.config)
    keep = check_keep_layers(range(n) if keep_layers is None else keep_layers, n)
    prefix = block_list_name(model)
    config = copy.deepcopy(model.config)
    for cfg in {id(config): config, id(config.get_text_config()): config.get_text_config()}.values():
        cfg.num_hidden_layers = len(keep)
        if isinstance(getattr(cfg, "layer_types", None), list):
            cfg.layer_types = [cfg.layer_types[i] for i in keep]
    small = type(model)(config).to(next(model.parameters()).dtype)
    if init == "pretrained":
        pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.*)$")
        new_index = {old: new for new, old in enumerate(keep)}
        state = {}
        for key, value in model.state_dict().items():
            m = pattern.match(key)
            if m is None:
                state[key] = value
            elif int(m.group(1)) in new_index:
                state[f"{prefix}.{new_index[int(m.group(1))]}.{m.group(2)}"] = value
        small.load_state_dict(state, strict=True)
    return small


def count_parameters(model_dir: str | os.PathLike) -> int:
    """Number of weights stored in a model directory's safetensors files (read from their
    headers; nothing is loaded)."""
    from safetensors import safe_open

    total = 0
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise InputError(f"model directory {os.fspath(model_dir)!r} holds no safetensors weights")
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                shape = st.get_slice(key).get_shape()
                count = 1
                for d in shape:
                    count *= int(d)
                total += count
    return total


def save_classifier(model, tokenizer, out_dir: str | os.PathLike, *, state_dict: dict | None = None,
                    max_shard_size: str | int = "2GB") -> Path:
    """Write ``model`` (safetensors + config) and ``tokenizer`` to ``out_dir``; returns it.

    ``state_dict``: the weights to write instead of the model's own (a ZeRO-3 model's, gathered
    onto one rank); files larger than ``max_shard_size`` are split into shards with an index.
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
        model.save_pretrained(tmp, state_dict=state_dict, max_shard_size=max_shard_size)
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
