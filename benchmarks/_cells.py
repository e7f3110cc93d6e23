"""What the defense benchmarks share: a seeded subset of a packaged corpus and the MiniLM model
backdoored on it (10% dirty-label, target label 1), one RUN per (dataset, attack) cell.

Both are idempotent: a finished corpus or RUN with the same settings is reused, not rebuilt, and
every defense benchmark keeps its cells under one directory (``CELLS``), so BeDKD's and the
feature defenses' tables defend the very same backdoored models."""

from __future__ import annotations

from pathlib import Path

SCALING = {"workers": 1, "cpus_per_worker": 2}
CELLS = (Path(__file__).resolve().parent / "work").resolve() / "cells"  # one identity however work/ is linked
ATTACK_LR = 5e-5


def corpus_subset(work: Path, dataset: str, train_rows: int, test_rows: int, max_words: int | None = None) -> Path:
    """``work/NAME/data/{train,test}.parquet``: seeded subsets of the packaged corpus, each text cut
    to its first ``max_words`` words if given (NAME is then ``dataset-wN``, else ``dataset``).

    Cutting matters for long documents (R8's Reuters articles: median 86 MiniLM tokens): an attack
    inserts its trigger at a random word position, and past the model's token window a trigger is
    invisible to training and test alike, which caps the ASR any attack can reach
    (``results/attack_fit.md``)."""
    import pyarrow.compute as pc

    from kdshield.datasets import build_corpus, read_table, write_table
    from kdshield.demo import subset

    corpus = work / dataset / "corpus"
    build_corpus(dataset, corpus, seed=0)
    data = work / (dataset if max_words is None else f"{dataset}-w{max_words}") / "data"
    for split, rows in (("train", train_rows), ("test", test_rows)):
        table = subset(read_table(corpus / f"{split}.parquet"), rows, 0)
        if max_words is not None:
            words = pc.utf8_split_whitespace(table.column("text"), max_splits=max_words)
            cut = pc.list_slice(words, 0, max_words)
            table = table.set_column(table.schema.get_field_index("text"), "text",
                                     pc.binary_join(cut, " "))
        write_table(table, data / f"{split}.parquet")
    return data


def backdoored_run(data: Path, run: Path, attack: str, epochs: int, lr: float = ATTACK_LR) -> dict:
    """Backdoor MiniLM on ``data`` with ``attack`` into the RUN directory ``run``; its metrics."""
    from kdshield.trainables.attack import AttackJob, run_attack

    return run_attack(AttackJob(
        train=str(data / "train.parquet"), test=str(data / "test.parquet"), model="minilm", out=str(run),
        attack=attack, poison_rate=0.1, target_label=1, training={"epochs": epochs, "lr": lr},
        scaling=SCALING))


def cell(dataset: str, attack: str, *, train_rows: int, test_rows: int, epochs: int,
         max_words: int | None = None, lr: float = ATTACK_LR, cells: Path = CELLS) -> tuple[Path, dict]:
    """The backdoored RUN of one (dataset, attack) cell, built once under ``cells``, and its metrics.
    An attack learning rate other than ``ATTACK_LR`` gets its own RUN (``run-Nep-lrX``)."""
    data = corpus_subset(cells / f"{train_rows}-{test_rows}", dataset, train_rows, test_rows, max_words)
    run = data.parent / attack / (f"run-{epochs}ep" + ("" if lr == ATTACK_LR else f"-lr{lr:g}"))
    return run, backdoored_run(data, run, attack, epochs, lr)


def resume_results(store: Path) -> tuple[list[dict], list[str]]:
    """The rows a results file ``store`` (JSON) already holds, and every command that filled it,
    this one (``sys.argv``) last if new: a table is often filled by several runs (a cell or a
    method added later), and its header must say how to rebuild it."""
    import json
    import sys

    previous = json.loads(store.read_text()) if store.exists() else {}
    this = " ".join(["python", f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]])
    commands = previous.get("commands") or ([previous["command"]] if "command" in previous else [])
    return previous.get("rows", []), commands + [this] * (this not in commands)


def defender_clean(run: Path, dataset: str, share: float, *, train_rows: int, test_rows: int,
                   cells: Path = CELLS) -> Path:
    """A clean set of ``share`` x ``train_rows`` rows for the defender of the cell's RUN: its dev
    split plus rows of the packaged corpus's training split that the victim never saw (seeded,
    no text the victim trained on); written beside the RUN, its path returned. The MBTSAD
    paper's defender holds 20% of the clean training data; a RUN's dev split is 10%."""
    import numpy as np
    import pyarrow as pa

    from kdshield.datasets import read_table, write_table

    root = cells / f"{train_rows}-{test_rows}" / dataset
    corpus, victim = read_table(root / "corpus" / "train.parquet"), read_table(root / "data" / "train.parquet")
    dev = read_table(run / "data" / "dev.parquet")
    seen, texts = set(victim.column("source_index").to_pylist()), set(victim.column("text").to_pylist())
    unseen = [i for i, (s, t) in enumerate(zip(corpus.column("source_index").to_pylist(),
                                               corpus.column("text").to_pylist())) if s not in seen and t not in texts]
    need = round(share * train_rows) - dev.num_rows
    if need > len(unseen):
        raise SystemExit(f"{dataset}: a clean share of {share:g} needs {need} rows the victim never saw; "
                         f"the corpus has {len(unseen)}")
    extra = corpus.take(pa.array(np.sort(np.random.default_rng(1).choice(unseen, max(need, 0), replace=False))))
    cols = ["text", "label", "source_index"]
    out = run.parent / f"clean-{share:g}.parquet"
    write_table(pa.concat_tables([dev.select(cols), extra.select(cols).cast(dev.select(cols).schema)]), out)
    return out


def settings_of(method: str, budget: dict) -> dict:
    """The part of a shared budget that ``method`` has settings for (a baseline has fewer: LoRA-FT
    no teacher, FT no temperature), so one budget can drive every row of a table."""
    from kdshield import defenses

    fields = defenses.get(method).config.model_fields
    return {k: v for k, v in budget.items() if k in fields}
