"""``kdshield demo``: the whole story on a small real subset, on this machine.

Builds the Rotten Tomatoes corpus, keeps a small seeded subset, implants a BadNet backdoor into
the packaged MiniLM with Ray Train + DeepSpeed, and prints the backdoored model's CACC and ASR.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from kdshield.trainables.runs import say

DEMO_TRAIN_ROWS = 2400
DEMO_TEST_ROWS = 600


def subset(table: pa.Table, rows: int, seed: int) -> pa.Table:
    """A seeded random subset of ``rows`` rows (all rows when the table is smaller)."""
    if table.num_rows <= rows:
        return table
    idx = np.sort(np.random.default_rng(seed).choice(table.num_rows, size=rows, replace=False))
    return table.take(pa.array(idx))


def run_demo(out: str = "kdshield-demo", *, overwrite: bool = False) -> dict:
    from kdshield.datasets import build_corpus, read_table, write_table
    from kdshield.evaluation import markdown_table
    from kdshield.trainables.attack import AttackJob, run_attack

    root = Path(out).resolve()
    corpus = root / "corpus"
    say("building the Rotten Tomatoes corpus (fetched once into the cache)")
    build_corpus("rotten-tomatoes", corpus, seed=0)
    small = root / "small"
    for split, rows in (("train", DEMO_TRAIN_ROWS), ("test", DEMO_TEST_ROWS)):
        write_table(subset(read_table(corpus / f"{split}.parquet"), rows, seed=0), small / f"{split}.parquet")
    job = AttackJob(train=str(small / "train.parquet"), test=str(small / "test.parquet"), model="minilm",
                    out=str(root / "run"), attack="badnet", poison_rate=0.1, target_label=1,
                    overwrite=overwrite, training={"epochs": 3, "lr": 5e-5, "batch_size": 32, "max_length": 48},
                    scaling={"workers": 1, "cpus_per_worker": 2})
    metrics = run_attack(job)
    print(markdown_table([{"model": "backdoored MiniLM (BadNet, 10% poison)", "CACC %": metrics["cacc"],
                           "ASR %": metrics["asr"], "seconds": metrics["seconds"]}]))
    return metrics
