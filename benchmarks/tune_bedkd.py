"""Hyperparameter search for BeDKD on real data: TPE + ASHA + shared work vs plain random search.

Two searches of ``--num-samples`` trials (>= 24) on one RUN (MiniLM, Rotten Tomatoes, BadNet 10%,
built here with ``kdshield data build`` + ``kdshield attack`` unless ``--run`` is given):

- ``smart``: ``kdshield tune`` with TPE, ASHA and the content-hashed stage cache;
- ``random``: Optuna's RandomSampler, no early stopping, ``--no-shared-work``.

Both optimise the same objective (``--objective``, default the trigger-free defender score).
Measured, written to ``benchmarks/results/tune_bedkd.{json,md}``:

- trial-seconds (the sum of every trial's wall time, stopped ones included, in completion order)
  each search needs until a finished trial is within 1 point of the best objective value found by
  either search, and their ratio (target: random needs >= 2x the compute);
- the best trial against the paper-default configuration (``kdshield defend`` at the same budget):
  ASR at equal or better CACC;
- the Spearman rank correlation of the defender score with the true ASR across finished trials.

    python benchmarks/tune_bedkd.py [--run RUN] [--num-samples 24] [--set key=value ...]
    python benchmarks/tune_bedkd.py --tiny      # tiny-bert, synthetic RUN, 2 trials each: a smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
# The budget every trial (and the paper-default run) gets, scaled down for a 2-core CPU machine.
BUDGET = {"n_c_dmm": 40, "batch_size": 16, "max_length": 64}
TINY_SPACE = {"method": "bedkd",
              "params": {"lam": {"type": "float", "low": 0.2, "high": 0.8},
                         "akd_cycles": {"type": "int", "low": 1, "high": 2},
                         "akd_temperature": {"type": "float", "low": 1.0, "high": 4.0, "log": True}},
              "fixed": {"alpha": 0.3, "dmm_temperature": 1.5, "dmm_epochs": 1, "dmm_lr": 1.0e-3, "n_c": 8,
                        "n_c_dmm": 4, "n_p": 4, "gamma": 0.5, "akd_lr": 1.0e-3, "batch_size": 8, "max_length": 16}}


def kdshield(*args: str) -> None:
    env = dict(os.environ)
    env.setdefault("RAY_ADDRESS", "local")
    subprocess.run([sys.executable, "-m", "kdshield.cli", *args], check=True, env=env)


def build_run(work: Path, train_rows: int) -> Path:
    run = work / "run-rt-badnet"
    if (run / "attack.json").is_file():
        return run
    data = work / "rt"
    if not (data / "train.parquet").is_file():
        kdshield("data", "build", "rotten-tomatoes", "--out", str(data))
    train = data / "train.parquet"
    if train_rows:
        import pyarrow.parquet as pq

        table = pq.read_table(train)
        pq.write_table(table.slice(0, min(train_rows, table.num_rows)), data / "train_small.parquet")
        train = data / "train_small.parquet"
    kdshield("attack", "--train", str(train), "--test", str(data / "test.parquet"), "--model", "minilm",
             "--attack", "badnet", "--poison-rate", "0.1", "--epochs", "3", "--out", str(run))
    return run


def build_tiny_run(work: Path) -> Path:
    from kdshield.datasets.toy import write_toy_run

    run = work / "run-tiny"
    if (run / "attack.json").is_file():
        return run
    return write_toy_run(run, "tiny-bert", metrics={"cacc": 50.0, "asr": 50.0})


def trials_timeline(out: Path, metric: str) -> list[dict]:
    """Every trial (stopped ones too) in completion order: its wall seconds and final metric (or None)."""
    rows = []
    for progress in (out / "tune").glob("run_trial_*/result.json"):
        reports = [json.loads(line) for line in progress.read_text().splitlines() if line.strip()]
        if not reports:
            continue
        last = reports[-1]
        rows.append({"trial": last.get("trial_id"), "seconds": float(last.get("time_total_s", 0.0)),
                     "ended": float(last.get("timestamp", 0)),
                     "value": last.get(metric) if last.get("final") == 1 else None})
    return sorted(rows, key=lambda r: r["ended"])


def seconds_to_reach(timeline: list[dict], target: float, mode: str) -> float:
    spent = 0.0
    for row in timeline:
        spent += row["seconds"]
        v = row["value"]
        if v is not None and (v >= target if mode == "max" else v <= target):
            return spent
    return math.inf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", help="an existing RUN (default: build RT + MiniLM + BadNet 10%)")
    ap.add_argument("--work", default=str(HERE / ".work-tune"))
    ap.add_argument("--num-samples", type=int, default=24)
    ap.add_argument("--objective", default="defender", choices=["defender", "asr", "cacc"])
    ap.add_argument("--train-rows", type=int, default=3000)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--tiny", action="store_true", help="smoke test: tiny-bert, synthetic RUN, 2 trials each")
    args = ap.parse_args()

    from kdshield.evaluation.tune_report import write_report
    from kdshield.trainables.tune import OBJECTIVES

    work = Path(args.work) / ("tiny" if args.tiny else "real")
    work.mkdir(parents=True, exist_ok=True)
    run = Path(args.run) if args.run else (build_tiny_run(work) if args.tiny else build_run(work, args.train_rows))
    n = 2 if args.tiny else args.num_samples
    common = ["--method", "bedkd", "--run", str(run), "--num-samples", str(n), "--objective", args.objective]
    sets = [] if args.tiny else [f"{k}={v}" for k, v in BUDGET.items()] + args.set
    if args.tiny:
        space = work / "space.yaml"
        space.write_text(yaml.safe_dump(TINY_SPACE))
        common += ["--space", str(space), "--probe-n", "4", "--val-fraction", "0.25", "--max-concurrent", "1",
                   "--grace-period", "1"]
    for s in sets:
        common += ["--set", s]
    metric, mode = OBJECTIVES[args.objective][0][0], OBJECTIVES[args.objective][1][0]
    searches = {"smart": ["--sampler", "tpe", "--scheduler", "asha"],
                "random": ["--sampler", "random", "--scheduler", "none", "--no-shared-work"]}
    wall = {}
    for name, extra in searches.items():
        out = work / f"search-{name}"
        t0 = time.perf_counter()
        if not (out / "summary.json").is_file():
            kdshield("tune", *common, *extra, *(["--resume"] if (out / "tune.json").is_file() else []),
                     "--out", str(out))
        wall[name] = time.perf_counter() - t0
    timelines = {name: trials_timeline(work / f"search-{name}", metric) for name in searches}
    values = [r["value"] for t in timelines.values() for r in t if r["value"] is not None]
    best = max(values) if mode == "max" else min(values)
    target = best - 1.0 if mode == "max" else best + 1.0
    reach = {name: seconds_to_reach(t, target, mode) for name, t in timelines.items()}
    ratio = reach["random"] / reach["smart"] if math.isfinite(reach["smart"]) and reach["smart"] > 0 else math.nan
    report = write_report([str(work / f"search-{name}") for name in searches], out=str(work / "report"))
    rho = json.loads((work / "report" / "report.json").read_text())["spearman_defender_vs_asr"]

    # the paper-default configuration at the same budget
    default_out = work / "paper-default"
    if not (default_out / "metrics.json").is_file():
        clean = work / "search-smart" / "shared" / "clean_train.parquet"
        kdshield("defend", "--method", "bedkd", "--run", str(run), "--clean", str(clean),
                 *[a for s in sets for a in ("--set", s)], "--out", str(default_out))
    default = json.loads((default_out / "metrics.json").read_text())
    finished = json.loads((work / "report" / "report.json").read_text())["trials"]
    done = [r for r in finished if r["status"] == "finished" and r.get("asr") is not None]
    at_cacc = [r for r in done if r["cacc"] >= default["cacc"]]
    best_trial = min(at_cacc, key=lambda r: r["asr"]) if at_cacc else None

    result = {"tiny": args.tiny, "num_samples": n, "objective": args.objective, "best_value": best,
              "target": target, "trial_seconds_to_target": reach, "ratio_random_over_smart": ratio,
              "search_wall_seconds": wall, "spearman_defender_vs_asr": rho,
              "paper_default": {"cacc": default["cacc"], "asr": default.get("asr")},
              "best_at_equal_or_better_cacc": best_trial and {k: best_trial.get(k) for k in
                                                              ("search", "trial", "cacc", "asr", "params")},
              "timelines": timelines}
    RESULTS.mkdir(exist_ok=True)
    stem = "tune_bedkd_tiny" if args.tiny else "tune_bedkd"
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    md = [f"# BeDKD hyperparameter search: TPE + ASHA + shared work vs random search ({'TINY smoke test' if args.tiny else 'real data'})",
          "", f"RUN `{run}`; {n} trials per search; objective `{args.objective}` ({metric}, {mode}).", "",
          "| search | trial-seconds to within 1 point of the best | search wall seconds |", "|---|---|---|"]
    for name in searches:
        md.append(f"| {name} | {reach[name]:.0f} | {wall[name]:.0f} |")
    md += ["", f"Ratio random / smart: {ratio:.2f} (target >= 2).",
           f"Spearman(defender score, true ASR) over finished trials: {rho:.3f}.",
           f"Paper-default BeDKD at the same budget: CACC {default['cacc']:.1f}, ASR {default.get('asr', float('nan')):.1f}.",
           ("Best trial at equal or better CACC: " + json.dumps(result["best_at_equal_or_better_cacc"], default=str))
           if best_trial else "No trial reached the paper default's CACC.", "",
           f"Full tables and plots: `{work / 'report'}`.", ""]
    (RESULTS / f"{stem}.md").write_text("\n".join(md))
    print("\n".join(md))
    del report


if __name__ == "__main__":
    main()
