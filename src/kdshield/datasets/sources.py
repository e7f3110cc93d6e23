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

:func:`iter_raw_batches` reads any of them one bounded batch at a time; :func:`scan_input`
validates and normalises an input in that one streaming pass and spools it as Parquet shards
(the driver keeps only labels and row ids); :func:`read_table` returns the normalised input as one
in-memory ``pyarrow.Table``; :func:`read_dataset` validates on the driver first and then returns a
``ray.data.Dataset``.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from kdshield.datasets.schema import (
    LABEL,
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


def _read_json_array(path: Path) -> pa.Table:
    """A ``.json`` file holding one JSON array of records (one document: read whole)."""
    with open(path, encoding="utf-8") as fh:
        records = json.load(fh)
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise InputError(f"{path}: a JSON array must hold one object per row")
    return pa.Table.from_pylist(records)


def _hf_arrow_files(path: Path) -> list[Path]:
    """The Arrow files of a ``Dataset.save_to_disk`` directory, in the order state.json lists them."""
    state_file = path / "state.json"
    if state_file.exists():
        state = json.loads(state_file.read_text())
        files = [path / entry["filename"] for entry in state.get("_data_files", [])]
    else:
        files = sorted(path.glob("*.arrow"))
    if not files:
        raise InputError(f"{path}: Hugging Face dataset directory without .arrow data files")
    for file in files:
        if not file.is_file():
            raise InputError(f"{path}: state.json lists {file.name}, which is missing")
    return files


def _check_dataset_dict(path: Path) -> None:
    if (path / "dataset_dict.json").exists():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        choices = ", ".join(str(path / s) for s in splits) or "none listed"
        raise InputError(f"{path}: a Hugging Face DatasetDict with splits "
                         f"{', '.join(splits) or '(none)'}; pass one split: {choices}")


def _is_hf_dataset_dir(path: Path) -> bool:
    return (path / "state.json").exists() or (path / "dataset_info.json").exists()


def natural_order(path: Path) -> list:
    """Sort key of a shard's file name with its numbers compared as numbers (part-2 before part-10)."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", path.name)]


def _shards(path: Path) -> list[Path]:
    """The data files of a directory of shards (part-00000.parquet, ...: how large corpora are
    stored), in natural name order, all of one format."""
    shards = sorted((p for p in path.iterdir()
                     if p.is_file() and p.suffix.lower() in SUFFIXES and not p.name.startswith((".", "_"))),
                    key=natural_order)
    kinds = sorted({p.suffix.lower() for p in shards})
    if len(kinds) > 1:
        raise InputError(f"{path}: shards in several formats ({', '.join(kinds)}); keep one format per directory")
    if not shards:
        raise InputError(f"{path}: a directory without data files ({', '.join(SUFFIXES)}) that is not a Hugging "
                         "Face save_to_disk dataset (no state.json, dataset_info.json or dataset_dict.json)")
    return shards


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise InputError(f"{path}: unknown data format '{suffix or '(no suffix)'}'; "
                         f"expected one of {', '.join(SUFFIXES)} or a Hugging Face directory")
    return suffix


def _read_raw(path: Path) -> pa.Table:
    """The file or directory at ``path`` as one Arrow table, not yet normalised: the batches of
    :func:`iter_raw_batches` put together (no rows at all: an empty table of the schema)."""
    tables = [table for _, table in iter_raw_batches(path)]
    if not tables:
        return pa.table({TEXT: pa.array([], pa.string()), LABEL: pa.array([], pa.int64())})
    return pa.concat_tables(tables, promote_options="default")


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


# ----------------------------------------------------------------------------- streaming

_SCAN_BATCH_ROWS = _PARQUET_BATCH_ROWS
_SCAN_BLOCK_BYTES = 16 << 20
SPOOL_SHARD_ROWS = 262_144


def iter_raw_batches(path: str | os.PathLike) -> Iterator[tuple[Path, pa.Table]]:
    """The input at ``path`` as ``(file, batch)`` pairs of raw (not yet normalised) rows, one
    bounded batch at a time, in row order: Parquet row batches, CSV/TSV and JSON Lines blocks,
    a Hugging Face directory's record batches; a directory of shards shard by shard. (A
    ``.json`` file holding one JSON array is one document and is read whole: store large data
    as JSON Lines.)"""
    path = Path(path)
    _check_exists(path)
    if path.is_dir():
        _check_dataset_dict(path)
        if _is_hf_dataset_dir(path):
            for file in _hf_arrow_files(path):
                yield from _arrow_file_batches(file)
        else:
            for shard in _shards(path):
                yield from iter_raw_batches(shard)
        return
    suffix = _suffix(path)
    try:
        if suffix == ".parquet":
            batches = pq.ParquetFile(path).iter_batches(batch_size=_SCAN_BATCH_ROWS)
        elif suffix in (".csv", ".tsv"):
            batches = pacsv.open_csv(
                path, read_options=pacsv.ReadOptions(block_size=_SCAN_BLOCK_BYTES),
                parse_options=pacsv.ParseOptions(delimiter="," if suffix == ".csv" else "\t",
                                                 newlines_in_values=True),
                convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in (TEXT, *TEXT_ALIASES)}))
        else:
            with open(path, "rb") as fh:
                whole = fh.read(4096).lstrip().startswith(b"[")
            batches = ([_read_json_array(path)] if whole else
                       pajson.open_json(path, read_options=pajson.ReadOptions(block_size=_SCAN_BLOCK_BYTES)))
        for batch in batches:
            yield path, batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
    except (pa.ArrowException, OSError, ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read as {suffix[1:]}: {_first_line(exc)}") from None


def _arrow_file_batches(file: Path) -> Iterator[tuple[Path, pa.Table]]:
    try:
        with pa.memory_map(str(file)) as source:
            try:
                reader = pa.ipc.open_stream(source)
                batches = iter(reader)
            except pa.ArrowInvalid:  # an IPC *file* instead of a stream
                reader = pa.ipc.open_file(source)
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            for batch in batches:
                yield file, pa.Table.from_batches([batch])
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{file}: cannot read as Arrow: {_first_line(exc)}") from None


@dataclass
class ScannedInput:
    """An input read once in bounded memory (:func:`scan_input`): normalised into Parquet shards
    under ``spool``, every row with its ``source_index``, plus the only per-row values a job keeps
    on the driver: its labels and source indices (16 bytes a row, no text)."""

    name: str
    spool: Path
    labels: np.ndarray
    source_index: np.ndarray

    @property
    def rows(self) -> int:
        return int(self.labels.size)

    def num_labels(self) -> int:
        return int(self.labels.max()) + 1

    def check_labels(self, num_labels: int) -> None:
        """Every label in ``[0, num_labels)``; else one line naming the first row that is not."""
        bad = np.flatnonzero(self.labels >= num_labels)
        if bad.size:
            raise InputError(f"{self.name}: label {int(self.labels[bad[0]])} is out of range for {num_labels} labels "
                             f"(row {int(bad[0])}; labels must be in [0, {num_labels}))")

    def files(self) -> list[str]:
        return [str(p) for p in sorted(self.spool.glob("part-*.parquet"), key=natural_order)]

    def table(self) -> pa.Table:
        """All rows, in this process (for inputs known to be small)."""
        return pa.concat_tables(pq.read_table(f) for f in self.files())

    def dataset(self) -> Dataset:
        """The rows as a lazily read, order-keeping ``ray.data.Dataset`` (read on the cluster)."""
        import ray.data

        return ray.data.read_parquet(self.files())


def scan_input(path: str | os.PathLike, spool: str | os.PathLike, *, num_labels: int | None = None,
               shard_rows: int = SPOOL_SHARD_ROWS) -> ScannedInput:
    """Validate and normalise the input at ``path`` in one streaming pass of bounded memory,
    writing it as Parquet shards of at most ``shard_rows`` rows to the directory ``spool``.

    The first bad row fails it with one :class:`InputError` line naming the file and the row
    (rows count from the input's first row; for a directory of shards, from its first shard).
    Rows without a ``source_index`` get their position in the whole input, as :func:`read_table`
    numbers them.
    """
    path, spool = Path(path), Path(spool)
    spool.mkdir(parents=True, exist_ok=True)
    labels, index, offset, schema = [], [], 0, None
    writer, written = None, 0
    try:
        for file, raw in iter_raw_batches(path):
            if raw.num_rows == 0:
                continue
            table = _normalize(raw, name=str(file), num_labels=num_labels, row_offset=offset, check_unique=False)
            if schema is None:
                schema = table.schema
            elif table.schema != schema:
                raise InputError(f"{file}: columns {', '.join(table.schema.names)} from row {offset} on differ from "
                                 f"the input's first rows ({', '.join(schema.names)})")
            if writer is None or written >= shard_rows:
                if writer is not None:
                    writer.close()
                writer, written = pq.ParquetWriter(spool / f"part-{offset:012d}.parquet", schema), 0
            writer.write_table(table)
            written += table.num_rows
            labels.append(table.column(LABEL).to_numpy())
            index.append(table.column(SOURCE_INDEX).to_numpy())
            offset += raw.num_rows
    finally:
        if writer is not None:
            writer.close()
    if offset == 0:
        raise InputError(f"{path}: the dataset is empty (no rows)")
    source_index = np.concatenate(index)
    ordered = np.sort(source_index)
    dup = np.flatnonzero(ordered[1:] == ordered[:-1])
    if dup.size:
        raise InputError(f"{path}: column '{SOURCE_INDEX}' has duplicate values (first: {int(ordered[dup[0]])})")
    return ScannedInput(str(path), spool, np.concatenate(labels), source_index)


def _keep_rows(batch: pa.Table, *, keep: np.ndarray) -> pa.Table:
    """Ray Data UDF: the rows of ``batch`` whose ``source_index`` is in the sorted array ``keep``."""
    index = batch.column(SOURCE_INDEX).to_numpy()
    pos = np.clip(np.searchsorted(keep, index), 0, max(len(keep) - 1, 0))
    return batch.filter(pa.array(keep[pos] == index if len(keep) else np.zeros(len(index), bool)))


def select_rows(ds: Dataset, source_index) -> Dataset:
    """``ds`` restricted to the rows whose ``source_index`` is listed (order kept), as a Ray Data
    transform: the list goes to the read tasks (8 bytes a row), the rows never through the driver."""
    keep = np.unique(np.asarray(source_index, dtype=np.int64))
    return ds.map_batches(_keep_rows, batch_format="pyarrow", fn_kwargs={"keep": keep})
