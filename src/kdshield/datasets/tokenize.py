"""Tokenisation inside the Ray Data pipeline, and dynamic padding at batch time.

:func:`tokenize_dataset` adds an *unpadded* ``{prefix}input_ids`` column (``list<int32>``,
truncated to ``max_length``, special tokens included), so one stream can carry several
tokenisations of the same text row by row (``input_ids`` for the student,
``teacher_input_ids`` for a teacher with another vocabulary). :func:`pad_collate` pads
each ``*input_ids`` column to the longest sequence of *its batch* when the training loop
iterates::

    shard.iter_torch_batches(batch_size=32, collate_fn=functools.partial(
        pad_collate, pad_ids={"input_ids": 1, "teacher_input_ids": 0}))

or, without Ray's deprecation warning for plain functions,
``collate_fn=kdshield.datasets.PadCollate({"input_ids": 1, "teacher_input_ids": 0})``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from kdshield.datasets.schema import TEXT
from kdshield.errors import InputError
from kdshield.models import load_tokenizer

if TYPE_CHECKING:
    import torch
    from ray.data import Dataset

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
HIDDEN_SEQ = "hidden_seq"
LAYER_SEQ = "layer_seq"
TOKEN_MAP = "token_map"


class _Tokenize:
    """Appends ``{prefix}input_ids`` to a batch, with the tokenizer it loaded once."""

    def __init__(self, tokenizer_path: str, max_length: int, prefix: str):
        self.tokenizer = load_tokenizer(tokenizer_path)
        self.max_length, self.column = max_length, f"{prefix}{INPUT_IDS}"

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = batch[TEXT].to_pylist()
        ids = self.tokenizer(texts, truncation=True, max_length=self.max_length,
                             padding=False)[INPUT_IDS] if texts else []
        column = pa.array(ids, pa.list_(pa.int32()))
        if self.column in batch.column_names:
            return batch.set_column(batch.schema.get_field_index(self.column), self.column,
                                    column)
        return batch.append_column(self.column, column)


def tokenize_table(table: pa.Table, tokenizer_path: str, *, max_length: int = 128, prefix: str = "",
                   batch_size: int = 256) -> list[pa.Table]:
    """``table`` plus the ``{prefix}input_ids`` column of :func:`tokenize_dataset`, computed here
    in the calling process, as blocks of ``batch_size`` rows (for ``ray.data.from_arrow``).

    For a table already in the driver's memory this is the cheap way: a Ray Data actor pool
    starts a process and loads the tokenizer (5-8 s per table on a 2-core machine) to do the
    same single-threaded work. :func:`tokenize_dataset` is for data that streams.
    """
    if max_length < 1:
        raise InputError(f"max_length must be >= 1, got {max_length}")
    tokenize = _Tokenize(str(tokenizer_path), max_length, prefix)
    return [tokenize(table.slice(start, batch_size)) for start in range(0, max(table.num_rows, 1), batch_size)]


def tokenize_dataset(ds: Dataset, tokenizer_path: str, *, max_length: int = 128, prefix: str = "",
                     batch_size: int = 256, concurrency: int | None = None,
                     num_cpus: float = 1.0) -> Dataset:
    """``ds`` plus an unpadded ``{prefix}input_ids`` column (``list<int32>``, at most
    ``max_length`` ids, special tokens included), computed by Ray Data tasks (at most
    ``concurrency`` at once; each worker process loads the tokenizer once and keeps it, so no
    actor pool has to start). The tokenizer is loaded once on the driver first, so a bad path
    fails with :class:`InputError` before any Ray work. Lower ``num_cpus`` when training workers
    already hold every CPU.
    """
    if max_length < 1:
        raise InputError(f"max_length must be >= 1, got {max_length}")
    load_tokenizer(tokenizer_path)
    return ds.map_batches(_tokenize_batch, batch_format="pyarrow", batch_size=batch_size, num_cpus=num_cpus,
                          concurrency=concurrency, fn_kwargs={"tokenizer_path": str(tokenizer_path),
                                                              "max_length": max_length, "prefix": prefix})


@functools.lru_cache(maxsize=4)
def _tokenizer_of(tokenizer_path: str, max_length: int, prefix: str) -> _Tokenize:
    return _Tokenize(tokenizer_path, max_length, prefix)


def _tokenize_batch(batch: pa.Table, *, tokenizer_path: str, max_length: int, prefix: str) -> pa.Table:
    """Ray Data UDF: :class:`_Tokenize` with the tokenizer this worker process already loaded."""
    return _tokenizer_of(tokenizer_path, max_length, prefix)(batch)


def _sequences(values) -> list[np.ndarray]:
    """A batch column of variable-length id lists as a list of 1-D arrays. Ray hands such
    columns to a collate_fn as a 1-D object array of arrays (or a 2-D array when every
    row has the same length)."""
    if isinstance(values, np.ndarray) and values.dtype != object:
        return list(np.atleast_2d(values))
    return [np.asarray(v).reshape(-1) for v in values]


def _pad(seqs: list[np.ndarray], pad_id: int, side: str, to: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    longest = max(max((s.size for s in seqs), default=0), to or 0)
    ids = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), longest), dtype=torch.long)
    for row, seq in enumerate(seqs):
        n = seq.size
        if n == 0:
            continue
        cols = slice(longest - n, longest) if side == "left" else slice(0, n)
        ids[row, cols] = torch.from_numpy(seq.astype(np.int64))
        mask[row, cols] = 1
    return ids, mask


def _is_text(values: np.ndarray) -> bool:
    if values.dtype.kind in "US":
        return True
    return values.dtype == object and len(values) > 0 and isinstance(values[0], (str, bytes))


def _to_tensor(values: np.ndarray) -> torch.Tensor:
    import torch

    if values.dtype == object:  # fixed-size lists (cached teacher outputs) arrive as arrays
        values = np.stack([np.asarray(v) for v in values])
    tensor = torch.from_numpy(np.array(values, copy=True))  # Ray's arrays are read-only
    return tensor.float() if tensor.is_floating_point() else tensor


def _matrix(value) -> np.ndarray:
    """One row of a ``*hidden_seq`` column as a 2-D ``[L_i, H]`` array (a row stored as a list
    of per-token vectors may arrive as an object array of 1-D arrays)."""
    arr = np.asarray(value)
    if arr.dtype == object:
        arr = np.stack([np.asarray(v, dtype=np.float32) for v in arr]) if arr.size else \
            np.zeros((0, 0), np.float32)
    if arr.ndim == 1 and arr.size == 0:
        arr = arr.reshape(0, 0)
    return arr


def _pad_hidden(name: str, values, lengths: list[int], longest: int,
                side: str) -> torch.Tensor:
    """Pad a ``*hidden_seq`` column (B rows of ``[L_i, H]`` floats) with zeros along the token
    axis to ``longest``, on ``side``; row i must have exactly ``lengths[i]`` positions (the
    length of its ``input_ids`` row) so each vector stays on its token."""
    import torch

    if isinstance(values, np.ndarray) and values.dtype != object and values.ndim == 3:
        rows = list(values)
    else:
        rows = [_matrix(v) for v in values]
    if len(rows) != len(lengths):
        raise InputError(f"pad_collate: column '{name}' has {len(rows)} rows, its input_ids "
                         f"column {len(lengths)}")
    widths = {r.shape[1] for r in rows if r.ndim == 2 and r.shape[0] > 0}
    if len(widths) > 1 or any(r.ndim != 2 for r in rows):
        raise InputError(f"pad_collate: column '{name}' must hold [tokens, hidden] float "
                         f"arrays of one hidden size, got shapes "
                         f"{sorted({r.shape for r in rows})}")
    width = widths.pop() if widths else 0
    out = torch.zeros((len(rows), longest, width), dtype=torch.float32)
    for i, (row, n) in enumerate(zip(rows, lengths)):
        if row.shape[0] != n:
            raise InputError(f"pad_collate: row {i} of '{name}' has {row.shape[0]} positions, "
                             f"its input_ids row {n} tokens")
        if n == 0:
            continue
        cols = slice(longest - n, longest) if side == "left" else slice(0, n)
        out[i, cols] = torch.from_numpy(np.asarray(row, dtype=np.float32))
    return out


def _pad_token_axes(name: str, values, lengths: list[int], longest: int, side: str,
                    axes: tuple[int, ...]) -> torch.Tensor:
    """Pad a column of per-token float arrays (row i: ``axes`` of length ``lengths[i]``, e.g.
    ``[K, L_i, H]`` with axes (1,) or ``[K, L_i, L_i]`` with axes (1, 2)) with zeros to
    ``longest`` along those axes, on ``side``, into one ``[B, ...]`` FloatTensor."""
    import torch

    if isinstance(values, np.ndarray) and values.dtype != object:
        rows = list(values)
    else:
        rows = [np.asarray(v, dtype=np.float32) for v in values]
    if len(rows) != len(lengths):
        raise InputError(f"pad_collate: column '{name}' has {len(rows)} rows, its input_ids "
                         f"column {len(lengths)}")
    rank = max(axes) + 1
    if any(r.ndim < rank for r in rows):
        raise InputError(f"pad_collate: column '{name}' rows must have at least {rank} axes, got "
                         f"shapes {sorted({r.shape for r in rows})}")
    fixed = {tuple(d for a, d in enumerate(r.shape) if a not in axes) for r in rows}
    if len(fixed) > 1:
        raise InputError(f"pad_collate: column '{name}' rows differ in their non-token axes: "
                         f"{sorted(fixed)}")
    shape = list(rows[0].shape) if rows else [0] * rank
    for a in axes:
        shape[a] = longest
    out = torch.zeros((len(rows), *shape), dtype=torch.float32)
    for i, (row, n) in enumerate(zip(rows, lengths)):
        if any(row.shape[a] != n for a in axes):
            raise InputError(f"pad_collate: row {i} of '{name}' has shape {row.shape}, its "
                             f"input_ids row {n} tokens")
        if n == 0:
            continue
        cols = slice(longest - n, longest) if side == "left" else slice(0, n)
        index = tuple(cols if a in axes else slice(None) for a in range(row.ndim))
        out[i][index] = torch.from_numpy(np.asarray(row, dtype=np.float32))
    return out


def _side(padding_side: Mapping[str, str] | str, name: str) -> str:
    side = padding_side if isinstance(padding_side, str) else padding_side.get(name, "right")
    if side not in ("left", "right"):
        raise InputError(f"pad_collate: padding_side for '{name}' must be "
                         f"'left' or 'right', got {side!r}")
    return side


def pad_collate(batch: Mapping[str, np.ndarray], *, pad_ids: Mapping[str, int], pad_to: int | None = None,
                padding_side: Mapping[str, str] | str = "right") -> dict[str, torch.Tensor]:
    """Collate a numpy batch from ``iter_torch_batches`` into tensors, padding dynamically.

    * every ``*input_ids`` column (B rows of lengths l_i) -> LongTensor ``(B, max l_i)``
      filled with ``pad_ids[column]``, plus ``*attention_mask`` LongTensor ``(B, max l_i)``
      with 1 on real tokens; ``padding_side`` ("right"/"left", or a dict per input_ids
      column, default right) puts the padding after or before the tokens;
    * ``label`` and other integer columns -> int64 (bool stays bool); floating columns ->
      float32; fixed-size list columns (e.g. cached teacher logits) -> stacked
      ``(B, ...)`` tensors;
    * every ``*hidden_seq`` column (per-token float vectors, e.g. a teacher's cached last
      hidden states: B rows of ``[l_i, H]``, as a 1-D object array of 2-D arrays or one 3-D
      array) -> FloatTensor ``(B, max l_i, H)``, zero-padded on the same side and to the same
      length as its ``input_ids`` column: ``{prefix}input_ids`` for ``{prefix}hidden_seq``
      when the batch has it (``teacher_hidden_seq`` follows ``teacher_input_ids``), else
      ``input_ids``. Row i must have exactly as many positions as that column's row i has
      tokens (InputError otherwise), so position j of the padded tensor is token j's vector;
    * likewise every ``*layer_seq`` column (rows ``[K, l_i, H]``, e.g. every layer's hidden
      states) -> ``(B, K, max l_i, H)`` and every ``*token_map`` column (rows
      ``[K, l_i, l_i]``, e.g. per-layer token-by-token attention maps) ->
      ``(B, K, max l_i, max l_i)``, zero-padded along their token axes;
    * text columns and incoming ``*attention_mask`` columns are dropped.
    """
    import torch

    out: dict[str, torch.Tensor] = {}
    for name, values in batch.items():
        if name.endswith(INPUT_IDS):
            if name not in pad_ids:
                raise InputError(f"pad_collate: no pad id for column '{name}'; "
                                 f"pad_ids has {', '.join(pad_ids) or 'none'}")
            ids, mask = _pad(_sequences(values), int(pad_ids[name]), _side(padding_side, name), pad_to)
            out[name] = ids
            out[name[: -len(INPUT_IDS)] + ATTENTION_MASK] = mask
        elif name.endswith((HIDDEN_SEQ, LAYER_SEQ, TOKEN_MAP)):
            suffix = next(x for x in (HIDDEN_SEQ, LAYER_SEQ, TOKEN_MAP) if name.endswith(x))
            ids_name = name[: -len(suffix)] + INPUT_IDS
            if ids_name not in batch:
                ids_name = INPUT_IDS
            if ids_name not in batch:
                raise InputError(f"pad_collate: column '{name}' needs an input_ids column to "
                                 f"align with; the batch has {', '.join(batch) or 'none'}")
            lengths = [int(s.size) for s in _sequences(batch[ids_name])]
            side = _side(padding_side, ids_name)
            longest = max(max(lengths, default=0), pad_to or 0)  # as long as its input_ids
            if suffix == HIDDEN_SEQ:
                out[name] = _pad_hidden(name, values, lengths, longest, side)
            else:
                out[name] = _pad_token_axes(name, values, lengths, longest, side,
                                            (1,) if suffix == LAYER_SEQ else (1, 2))
        elif name.endswith(ATTENTION_MASK) or _is_text(np.asarray(values)):
            continue
        else:
            tensor = _to_tensor(np.asarray(values))
            out[name] = tensor.long() if tensor.dtype in (torch.int8, torch.int16, torch.int32,
                                                          torch.uint8) else tensor
    return out
