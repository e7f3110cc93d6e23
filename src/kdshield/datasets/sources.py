"""Reading and writing dataset files in the kdshield schema.

Formats, chosen by suffix (or by layout for a directory):

* Parquet ``.parquet``;
* CSV ``.csv`` and TSV ``.tsv`` with a header row;
* JSON Lines ``.jsonl`` / ``.json`` (one object per line; a ``.json`` holding a single
  array of objects is accepted too);
* Hugging Face ``save_to_disk`` directories: a Dataset directory holds ``*.arrow`` files
  (Arrow IPC *stream* format) listed in ``state.json``; a DatasetDict directory holds
  ``dataset_dict.json`` and one Dataset directory per split, of which one must be named
  (``DIR/train``).

:func:`read_table` returns an in-memory normalised ``pyarrow.Table``;
:func:`read_dataset` validates on the driver first and then returns a ``ray.data.Dataset``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from kdshield.datasets.schema import (
    SOURCE_INDEX,
    TEXT,
    TEXT_ALIASES,
    _normalize,
    normalize_batch,
    normalize_table,
)
from kdshield.errors import InputError

if TYPE_CHECKING:
    from ray.data import Dataset

SUFFIXES = (".parquet", ".csv", ".tsv", ".jsonl", ".json")
_PARQUET_BATCH_ROWS = 65_536


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    if path.is_file() and not os.access(path, os.R_OK):
        raise InputError(f"{path}: file is not readable (permission denied)")


def _read_csv(path: Path, delimiter: str) -> pa.Table:
    text_types = {col: pa.string() for col in (TEXT, *TEXT_ALIASES)}
    return pacsv.read_csv(
        path, parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
        convert_options=pacsv.ConvertOptions(column_types=text_types))


def _read_json(path: Path) -> pa.Table:
    with open(path, "rb") as fh:
        head = fh.read(4096).lstrip()
    if head.startswith(b"["):  # one JSON array of records
        with open(path, encoding="utf-8") as fh:
            records = json.load(fh)
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise InputError(f"{path}: a JSON array must hold one object per row")
        return pa.Table.from_pylist(records)
    return pajson.read_json(path)


def _read_hf_dataset_dir(path: Path) -> pa.Table:
    """Concatenated Arrow files of a ``Dataset.save_to_disk`` directory."""
    state_file = path / "state.json"
    if state_file.exists():
        state = json.loads(state_file.read_text())
        files = [path / entry["filename"] for entry in state.get("_data_files", [])]
    else:
        files = sorted(path.glob("*.arrow"))
    if not files:
        raise InputError(f"{path}: Hugging Face dataset directory without .arrow data files")
    tables = []
    for file in files:
        if not file.is_file():
            raise InputError(f"{path}: state.json lists {file.name}, which is missing")
        try:
            with pa.memory_map(str(file)) as source:
                tables.append(pa.ipc.open_stream(source).read_all())
        except pa.ArrowInvalid:  # an IPC *file* instead of a stream
            with pa.memory_map(str(file)) as source:
                tables.append(pa.ipc.open_file(source).read_all())
    return pa.concat_tables(tables, promote_options="default")


def _read_raw(path: Path) -> pa.Table:
    """The file or directory at ``path`` as an Arrow table, not yet normalised."""
    _check_exists(path)
    if path.is_dir():
        if (path / "dataset_dict.json").exists():
            splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
            choices = ", ".join(str(path / s) for s in splits) or "none listed"
            raise InputError(f"{path}: a Hugging Face DatasetDict with splits "
                             f"{', '.join(splits) or '(none)'}; pass one split: {choices}")
        if (path / "state.json").exists() or (path / "dataset_info.json").exists():
            return _read_hf_dataset_dir(path)
        # a directory of shards (part-00000.parquet, ...: how large corpora are stored), in name order
        shards = sorted(p for p in path.iterdir()
                        if p.is_file() and p.suffix.lower() in SUFFIXES and not p.name.startswith((".", "_")))
        kinds = sorted({p.suffix.lower() for p in shards})
        if len(kinds) > 1:
            raise InputError(f"{path}: shards in several formats ({', '.join(kinds)}); keep one format per directory")
        if shards:
            return pa.concat_tables([_read_raw(p) for p in shards], promote_options="default")
        raise InputError(f"{path}: a directory without data files ({', '.join(SUFFIXES)}) that is not a Hugging "
                         "Face save_to_disk dataset (no state.json, dataset_info.json or dataset_dict.json)")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise InputError(f"{path}: unknown data format '{suffix or '(no suffix)'}'; "
                         f"expected one of {', '.join(SUFFIXES)} or a Hugging Face directory")
    try:
        if suffix == ".parquet":
            return pq.read_table(path)
        if suffix in (".csv", ".tsv"):
            return _read_csv(path, "," if suffix == ".csv" else "\t")
        return _read_json(path)
    except InputError:
        raise
    except (pa.ArrowException, OSError, ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read as {suffix[1:]}: {_first_line(exc)}") from None


def read_table(path: str | os.PathLike, *, num_labels: int | None = None) -> pa.Table:
    """The dataset at ``path`` as a normalised table (text, label, [poisoned], source_index).

    Raises :class:`InputError` for a missing, unreadable or unknown-format input and for
    anything :func:`~kdshield.datasets.schema.normalize_table` refuses.
    """
    path = Path(path)
    return normalize_table(_read_raw(path), name=str(path), num_labels=num_labels)


def write_table(table: pa.Table, path: str | os.PathLike) -> Path:
    """Write ``table`` to Parquet at ``path`` atomically, creating parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _validate_parquet(path: Path, num_labels: int | None) -> tuple[bool, list[int]]:
    """Stream-validate a Parquet file on the driver in bounded memory.

    Returns whether it carries ``source_index`` and its row-group sizes.
    """
    _check_exists(path)
    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        has_index = SOURCE_INDEX in names
        offset, seen = 0, []
        for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS):
            table = _normalize(pa.Table.from_batches([batch]), name=str(path),
                               num_labels=num_labels, row_offset=offset, check_unique=False)
            if has_index:
                seen.append(table.column(SOURCE_INDEX).to_numpy())
            offset += batch.num_rows
        sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]
    except InputError:
        raise
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path}: cannot read as parquet: {_first_line(exc)}") from None
    if offset == 0:
        raise InputError(f"{path}: the dataset is empty (no rows)")
    if has_index:
        index = np.concatenate(seen)
        if np.unique(index).size != index.size:
            raise InputError(f"{path}: column '{SOURCE_INDEX}' has duplicate values")
    return has_index, sizes


def _read_row_groups(batch: pa.Table, *, path: str, num_labels: int | None) -> pa.Table:
    """Ray Data UDF: reads the Parquet row groups named in ``batch`` (columns ``row_group``,
    ``offset``), numbering rows by file position (``source_index`` = offset + position)."""
    pf = pq.ParquetFile(path)
    tables = [_normalize(pf.read_row_group(group), name=path, num_labels=num_labels,
                         row_offset=offset, check_unique=False)
              for group, offset in zip(batch.column("row_group").to_pylist(),
                                       batch.column("offset").to_pylist())]
    return pa.concat_tables(tables)


def read_dataset(path: str | os.PathLike, *, num_labels: int | None = None) -> Dataset:
    """The dataset at ``path`` as a normalised ``ray.data.Dataset``.

    The input is validated on the driver with pyarrow first (Parquet in a streaming pass
    of bounded memory), so bad input raises :class:`InputError` before Ray does anything.
    Parquet then streams through Ray (``ray.data.read_parquet``, or one read task per row
    group when the file has no ``source_index``, so rows are still numbered by their
    position); other formats are small and go through ``ray.data.from_arrow``.
    """
    import ray.data

    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".parquet":
        has_index, sizes = _validate_parquet(path, num_labels)
        kwargs = {"name": str(path), "num_labels": num_labels}
        if has_index:
            return ray.data.read_parquet(str(path)).map_batches(
                normalize_batch, batch_format="pyarrow", fn_kwargs=kwargs)
        kwargs_rg = {"path": str(path), "num_labels": num_labels}
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int).tolist()
        groups = [{"row_group": g, "offset": o} for g, o in enumerate(offsets) if sizes[g]]
        return ray.data.from_items(groups, override_num_blocks=len(groups)).map_batches(
            _read_row_groups, batch_size=1, batch_format="pyarrow", fn_kwargs=kwargs_rg)
    return ray.data.from_arrow(read_table(path, num_labels=num_labels))
