"""Loading a model straight into its ZeRO-3 partitions: each rank reads only its share.

Loading a model whole and letting DeepSpeed partition it afterwards costs every worker one full
copy of the weights; transformers' ``from_pretrained`` under ``deepspeed.zero.Init`` reads and
gathers every weight through rank 0 (``benchmarks/results/zero3_memory.md``). Here the model is
built under ``zero.Init`` (each parameter partitioned as soon as its module exists, from its
initialisation) and then every rank fills its own partition of every weight with one positioned
read of exactly those bytes of the safetensors file: a ZeRO-3 partition is a contiguous range
of the flattened tensor, and safetensors stores each tensor contiguously in row-major order. No
file is memory-mapped (mapped pages would count against the worker), nothing is unpickled, and
no rank ever holds more than one weight's partition in transit.

The parameters of the base model (``model.base_model_prefix``) must all be in the checkpoint with
their shapes; the task head may be missing or have another shape (a base model, or another number
of labels): :func:`kdshield.models.load_classifier_partitioned` then initialises it on rank 0 and
broadcasts it.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from kdshield.errors import InputError

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_MAX_HEADER = 100 * 2**20  # the format's own limit on the JSON header


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies in a safetensors file: its absolute byte offset, dtype and shape."""

    file: Path
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def read_header(path: str | os.PathLike) -> dict[str, TensorEntry]:
    """Every tensor of one safetensors file, from its JSON header (no tensor data is read)."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise InputError(f"{path}: not a safetensors file (shorter than its header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER:
            raise InputError(f"{path}: not a safetensors file (header of {n} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise InputError(f"{path}: not a safetensors file (unreadable header: {err})") from None
    entries = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(meta.get("dtype"))
        if dtype is None:
            raise InputError(f"{path}: tensor {name!r} has dtype {meta.get('dtype')!r}, which kdshield does not read")
        begin, _ = meta["data_offsets"]
        entries[name] = TensorEntry(path, 8 + n + int(begin), dtype, tuple(int(d) for d in meta["shape"]))
    return entries


def checkpoint_index(model_dir: str | os.PathLike) -> dict[str, TensorEntry]:
    """Every tensor of a model directory's safetensors weights (sharded or not), by name."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({model_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    entries: dict[str, TensorEntry] = {}
    for f in files:
        entries.update(read_header(f))
    return entries


def read_range(entry: TensorEntry, start: int, count: int) -> torch.Tensor:
    """Elements ``[start, start + count)`` of the flattened tensor, read with one positioned read."""
    if start < 0 or count < 0 or start + count > entry.numel:
        raise ValueError(f"elements [{start}, {start + count}) of a tensor of {entry.numel}")
    size = torch.empty((), dtype=entry.dtype).element_size()
    buf = bytearray(count * size)
    with open(entry.file, "rb", buffering=0) as f:
        got = os.preadv(f.fileno(), [buf], entry.offset + start * size) if count else 0
    if got != len(buf):
        raise InputError(f"{entry.file}: truncated safetensors file")
    return torch.frombuffer(buf, dtype=entry.dtype) if count else torch.empty(0, dtype=entry.dtype)


def checkpoint_key(name: str, prefix: str, entries: dict) -> str | None:
    """The checkpoint's name for model parameter ``name``: itself, or without / with the base
    model's prefix (a base checkpoint saved without the task wrapper, or the reverse)."""
    for key in (name, name.removeprefix(f"{prefix}."), f"{prefix}.{name}"):
        if key in entries:
            return key
    return None


def plan_partitioned_load(model: torch.nn.Module, entries: dict[str, TensorEntry]) -> tuple[dict, list[str]]:
    """``({parameter or buffer name: checkpoint entry}, [head parameters left as initialised])``.

    ``model`` may live on the meta device. Raises :class:`InputError` when a parameter of the base
    model is missing from the checkpoint or has another shape there."""
    prefix = model.base_model_prefix
    plan, fresh = {}, []
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        shape = tuple(getattr(tensor, "ds_shape", tensor.shape))
        key = checkpoint_key(name, prefix, entries)
        if key is not None and entries[key].shape == shape:
            plan[name] = entries[key]
            continue
        in_base = name.startswith(f"{prefix}.")
        if not isinstance(tensor, torch.nn.Parameter):
            continue  # a buffer the checkpoint lacks keeps its constructed value (rotary frequencies ...)
        if in_base:
            found = f"shape {list(entries[key].shape)} in the checkpoint" if key else "not in the checkpoint"
            raise InputError(f"cannot load {name} (shape {list(shape)}) into partitions: {found}")
        fresh.append(name)
    return plan, fresh


def fill_partitions(model: torch.nn.Module, plan: dict[str, TensorEntry]) -> None:
    """Copy every planned tensor into ``model``: a ZeRO-3 parameter's local partition from its
    byte range, anything else (buffers, parameters DeepSpeed does not manage) whole."""
    import deepspeed.comm as dist

    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    with torch.no_grad():
        for name, entry in plan.items():
            tensor = tensors[name]
            local = getattr(tensor, "ds_tensor", None)
            if local is None:
                tensor.copy_(read_range(entry, 0, entry.numel).view(entry.shape))
                continue
            part = local.numel()  # ceil(numel / world): the last rank's partition ends in padding
            start = part * dist.get_rank(group=tensor.ds_process_group)
            count = max(0, min(part, entry.numel - start))
            local.zero_()
            if count:
                local[:count].copy_(read_range(entry, start, count))
