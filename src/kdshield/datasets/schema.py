"""The one table schema every kdshield dataset is normalised to.

A normalised table is Arrow with, in this order:

===============  ==========  ===========================================================
column           type        meaning
===============  ==========  ===========================================================
``text``         string      the input text (never null; may be empty)
``label``        int64       class id in ``[0, num_labels)``
``poisoned``     bool        optional ground truth of a benchmark (scores FAR/FRR only)
``source_index`` int64       stable row id, unique and >= 0; ``0..n-1`` when a file
                             does not carry one
===============  ==========  ===========================================================

``sentence`` is accepted as an alias of ``text`` (the BeDKD code's format); every other
column is dropped. Everything wrong raises :class:`~kdshield.errors.InputError` with a
message that starts with the ``name`` of the input (usually its file path).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kdshield.errors import InputError

TEXT = "text"
LABEL = "label"
POISONED = "poisoned"
SOURCE_INDEX = "source_index"
TEXT_ALIASES = ("sentence",)

SCHEMA = pa.schema([(TEXT, pa.string()), (LABEL, pa.int64()), (POISONED, pa.bool_()),
                    (SOURCE_INDEX, pa.int64())])
"""Types of all columns; ``poisoned`` is the only optional one."""


def _first_true(mask: pa.ChunkedArray | pa.Array) -> int:
    """Index of the first true (non-null) entry of a boolean array."""
    return int(np.flatnonzero(np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool))[0])


def _text_column(table: pa.Table, name: str, base: int = 0) -> pa.ChunkedArray:
    for candidate in (TEXT, *TEXT_ALIASES):
        if candidate in table.column_names:
            col = table.column(candidate)
            break
    else:
        raise InputError(f"{name}: no '{TEXT}' column (or its alias 'sentence'); "
                         f"columns are {', '.join(table.column_names) or 'none'}")
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    if col.null_count:
        raise InputError(f"{name}: column '{TEXT}' has {col.null_count} null value(s), "
                         f"first at row {base + _first_true(pc.is_null(col))}")
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)
            or pa.types.is_null(col.type)):  # null type: an empty column of unknown type
        raise InputError(f"{name}: column '{TEXT}' must hold strings, not {col.type}")
    return col.cast(pa.string())


def _integer_column(col: pa.ChunkedArray, column: str, name: str, base: int = 0) -> pa.ChunkedArray:
    """``col`` as int64, refusing nulls, fractional floats and non-integer strings (rows in messages
    numbered from ``base``: the column's first row in the whole input)."""
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    if col.null_count:
        raise InputError(f"{name}: column '{column}' has {col.null_count} null value(s), "
                         f"first at row {base + _first_true(pc.is_null(col))}")
    t = col.type
    if pa.types.is_integer(t) or pa.types.is_boolean(t) or pa.types.is_null(t):
        return col.cast(pa.int64())
    if pa.types.is_floating(t):
        bad = pc.invert(pc.and_(pc.is_finite(col), pc.equal(col, pc.floor(col))))
        if pc.any(bad).as_py():
            row = _first_true(bad)
            raise InputError(f"{name}: column '{column}' must hold integers; "
                             f"row {base + row} holds {col[row].as_py()!r}")
        return col.cast(pa.int64())
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        trimmed = pc.utf8_trim_whitespace(col)
        bad = pc.invert(pc.match_substring_regex(trimmed, r"^[+-]?[0-9]+$"))
        if pc.any(bad).as_py():
            row = _first_true(bad)
            raise InputError(f"{name}: column '{column}' must hold integers; "
                             f"row {base + row} holds {col[row].as_py()!r}")
        return trimmed.cast(pa.int64())
    raise InputError(f"{name}: column '{column}' must hold integers, not {t}")


def _poisoned_column(col: pa.ChunkedArray, name: str, base: int = 0) -> pa.ChunkedArray:
    if pa.types.is_boolean(col.type):
        if col.null_count:
            raise InputError(f"{name}: column '{POISONED}' has {col.null_count} null value(s)")
        return col
    as_int = _integer_column(col, POISONED, name, base)
    if len(as_int) and not pc.all(pc.is_in(as_int, pa.array([0, 1]))).as_py():
        raise InputError(f"{name}: column '{POISONED}' must be boolean (or 0/1)")
    return as_int.cast(pa.bool_())


def _normalize(table: pa.Table, *, name: str, num_labels: int | None, row_offset: int | None,
               check_unique: bool) -> pa.Table:
    """Shared body of :func:`normalize_table` and :func:`normalize_batch`.

    ``row_offset`` is the global position of the table's first row, used to number rows
    when ``source_index`` is missing; ``None`` makes a missing ``source_index`` an error.
    """
    if not isinstance(table, pa.Table):
        raise InputError(f"{name}: expected a pyarrow.Table, got {type(table).__name__}")
    if num_labels is not None and num_labels < 1:
        raise InputError(f"{name}: num_labels must be >= 1, got {num_labels}")
    if LABEL not in table.column_names:
        _text_column(table, name)  # report a missing text column first, it is the likelier typo
        raise InputError(f"{name}: no '{LABEL}' column; "
                         f"columns are {', '.join(table.column_names)}")
    base = row_offset or 0
    text = _text_column(table, name, base)
    label = _integer_column(table.column(LABEL), LABEL, name, base)
    if len(label):
        low, high = pc.min(label).as_py(), pc.max(label).as_py()
        if low < 0:
            raise InputError(f"{name}: label {low} is negative (row {base + _first_true(pc.less(label, 0))}); "
                             "labels must be in [0, num_labels)")
        if num_labels is not None and high >= num_labels:
            raise InputError(f"{name}: label {high} is out of range for {num_labels} labels "
                             f"(row {base + _first_true(pc.greater_equal(label, num_labels))}; "
                             f"labels must be in [0, {num_labels}))")
    arrays, fields = [text, label], [SCHEMA.field(TEXT), SCHEMA.field(LABEL)]
    if POISONED in table.column_names:
        arrays.append(_poisoned_column(table.column(POISONED), name, base))
        fields.append(SCHEMA.field(POISONED))
    if SOURCE_INDEX in table.column_names:
        index = _integer_column(table.column(SOURCE_INDEX), SOURCE_INDEX, name, base)
        if len(index) and pc.min(index).as_py() < 0:
            raise InputError(f"{name}: column '{SOURCE_INDEX}' must be >= 0")
        if check_unique and pc.count_distinct(index).as_py() != len(index):
            raise InputError(f"{name}: column '{SOURCE_INDEX}' has duplicate values")
    elif row_offset is None:
        raise InputError(f"{name}: no '{SOURCE_INDEX}' column; a batch cannot number its "
                         "rows, normalise the whole table (or read it with read_dataset)")
    else:
        index = pa.chunked_array([pa.array(np.arange(row_offset, row_offset + table.num_rows,
                                                     dtype=np.int64))])
    arrays.append(index)
    fields.append(SCHEMA.field(SOURCE_INDEX))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def normalize_table(table: pa.Table, *, name: str, num_labels: int | None = None) -> pa.Table:
    """``table`` in the kdshield schema (see the module docstring).

    ``name`` names the input in error messages (a file path). With ``num_labels`` given,
    labels must lie in ``[0, num_labels)``; otherwise only ``>= 0``. Refuses an empty
    table, a missing ``text``/``label`` column, null texts, and labels that are null, not
    integers (``"1"`` and ``1.0`` are integers, ``"a"`` and ``1.5`` are not) or out of
    range. A missing ``source_index`` becomes ``0..n-1``; an existing one must be unique.
    """
    if isinstance(table, pa.Table) and table.num_rows == 0:
        raise InputError(f"{name}: the dataset is empty (no rows)")
    return _normalize(table, name=name, num_labels=num_labels, row_offset=0, check_unique=True)


def normalize_batch(batch: pa.Table, *, name: str = "dataset",
                    num_labels: int | None = None) -> pa.Table:
    """One batch in the kdshield schema, for ``ds.map_batches(normalize_batch,
    batch_format="pyarrow", fn_kwargs={"name": ..., "num_labels": ...})``.

    Same rules as :func:`normalize_table`, except that an empty batch is fine and the
    batch must already carry ``source_index`` (a batch does not know its global row
    positions, so numbering it ``0..n-1`` would silently collide with other batches).
    """
    return _normalize(batch, name=name, num_labels=num_labels, row_offset=None,
                      check_unique=False)


def num_labels_of(table: pa.Table) -> int:
    """``max(label) + 1`` of a normalised table (the number of classes it implies)."""
    if table.num_rows == 0:
        raise InputError("cannot infer the number of labels of an empty table")
    return int(pc.max(table.column(LABEL)).as_py()) + 1
