"""``kdshield demo``: the whole story on a small real subset, on this machine.

Builds the Rotten Tomatoes corpus, keeps a small seeded subset, implants a BadNet backdoor into
the packaged MiniLM with Ray Train + DeepSpeed, defends it with BeDKD, and prints a before/after
table (CACC, ASR, FAR, FRR, seconds) and writes it as a PNG bar chart.

``--out`` is a workspace of outputs that are each staged and published whole (the corpus, the
subset's files, the RUN, the defense, the chart), not one directory published at the end: a
demo cut off after its five-minute attack resumes from the published RUN instead of redoing it.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pyarrow as pa

import kdshield
from kdshield import defenses
from kdshield.datasets import build_corpus, read_table, write_table
from kdshield.evaluation import markdown_table
from kdshield.outputs import check_writable, say

DEMO_TRAIN_ROWS = 1600
DEMO_TEST_ROWS = 500
DEMO_MAX_LENGTH = 40  # tokens (most snippets are shorter); batches pad to the cap, so it sets the cost
# The authors' DMM budget (n_c 80/class, 20 epochs): with 12 epochs the poisoned samples' MEPD sat at
# 0.12-0.17, above the default gamma 0.1, and nothing poisoned was identified (benchmarks/results/demo.md).
DEMO_BEDKD = {"n_c_dmm": 80, "n_c": 80, "n_p": 32, "dmm_epochs": 20, "akd_cycles": 6, "punish_passes": 4,
              "max_length": DEMO_MAX_LENGTH}


def subset(table: pa.Table, rows: int, seed: int) -> pa.Table:
    """A seeded random subset of ``rows`` rows (all rows when the table is smaller)."""
    if table.num_rows <= rows:
        return table
    idx = np.sort(np.random.default_rng(seed).choice(table.num_rows, size=rows, replace=False))
    return table.take(pa.array(idx))


def bar_chart(rows: list[dict], path: Path) -> Path:
    """Before/after CACC, ASR and no-trigger ASR as grouped bars (PNG)."""
    # matplotlib is heavy and only needed for this picture
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.8))
    ax = fig.add_subplot()
    series = (("CACC %", "tab:blue"), ("ASR %", "tab:red"), ("no-trigger ASR %", "tab:orange"))
    width = 0.8 / len(series)
    xs = np.arange(len(rows))
    for k, (metric, color) in enumerate(series):
        values = [r.get(metric) or 0.0 for r in rows]
        bars = ax.bar(xs + (k - (len(series) - 1) / 2) * width, values, width, label=metric.replace(" %", ""),
                      color=color)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(xs, [r["model"] for r in rows])
    ax.set_ylim(0, 118)
    ax.set_ylabel("percent")
    ax.set_title("BadNet backdoor in MiniLM, before and after BeDKD", fontsize=10)
    ax.legend(loc="upper right", fontsize=8, ncols=3)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    partial.write_bytes(png.getvalue())
    os.replace(partial, path)  # readers see the old chart or the new one
    return path


def run_demo(out: str = "kdshield-demo", *, overwrite: bool = False) -> dict:
    defenses.get("bedkd").parse(DEMO_BEDKD)  # its settings hold before minutes of attack training are spent
    root = Path(out).resolve()
    check_writable(root)  # an unwritable --out fails now, not after minutes of work
    corpus = root / "corpus"
    say("building the Rotten Tomatoes corpus (fetched once into the cache)")
    build_corpus("rotten-tomatoes", corpus, seed=0)
    small = root / "small"
    for split, rows in (("train", DEMO_TRAIN_ROWS), ("test", DEMO_TEST_ROWS)):
        write_table(subset(read_table(corpus / f"{split}.parquet"), rows, seed=0), small / f"{split}.parquet")
    scaling = {"workers": 1, "cpus_per_worker": 2}
    attack = kdshield.attack(
        train=str(small / "train.parquet"), test=str(small / "test.parquet"), model="minilm", out=str(root / "run"),
        attack="badnet", poison_rate=0.1, target_label=1, overwrite=overwrite, scaling=scaling,
        training={"epochs": 3, "lr": 1e-4, "batch_size": 32, "max_length": DEMO_MAX_LENGTH})
    defended = kdshield.defend("bedkd", run=str(root / "run"), out=str(root / "bedkd"), settings=DEMO_BEDKD,
                               overwrite=overwrite, scaling=scaling)
    # no-trigger ASR: the ASR rows without their trigger; ASR minus it is what the trigger adds
    rows = [{"model": "backdoored MiniLM", "CACC %": attack["cacc"], "ASR %": attack["asr"],
             "no-trigger ASR %": attack.get("asr_no_trigger"), "FAR %": None, "FRR %": None,
             "seconds": attack["seconds"]},
            {"model": "after BeDKD", "CACC %": defended["cacc"], "ASR %": defended["asr"],
             "no-trigger ASR %": defended.get("asr_no_trigger"), "FAR %": defended.get("far"),
             "FRR %": defended.get("frr"), "seconds": defended["seconds"]}]
    chart = bar_chart(rows, root / "demo.png")
    print(markdown_table(rows))
    print(f"defended model: {root / 'bedkd' / 'model'}; chart: {chart}; MEPD histogram: {root / 'bedkd' / 'mepd.png'}")
    return {"attack": attack, "bedkd": defended}
