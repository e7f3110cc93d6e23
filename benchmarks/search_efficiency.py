"""What the smart search buys: TPE + ASHA + shared stages against plain random search, in compute.

On one cell (default: the development cell of ``search.py``, one method at its search budget):

- ``smart``: ``kdshield tune`` with TPE, ASHA and the content-hashed stage cache, once per seed
  (``--seeds``), each with a cache of its own (no search reuses another's stages);
- ``random``: Optuna's RandomSampler, no early stopping, ``--no-shared-work``, once.

Measured: the compute (trial CPU-seconds: each trial's wall seconds x the CPUs it holds, stopped
trials included, in the order the trials ended) until a finished trial's objective is within
``--tolerance`` of the best value any search found. The tolerance may not be finer than the
objective's resolution on the held-out validation set (100 / its rows, stated in the output).
Random search's compute is its expectation over ``--permutations`` random orders of its trials
(the order of a random search is itself random); the smart search's is the mean over its seeds.
``compute_ratio`` = random / smart (target: >= 2). Written to
``benchmarks/results/search/efficiency.{json,md}``.

    python benchmarks/search_efficiency.py [--method bedkd] [--seeds 0 1 2] [--num-samples 16]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from search import BUDGETS, RESULTS, kdshield  # noqa: E402


def timeline(search: Path, cpus: float) -> list[dict]:
    """Every trial of a search in the order it ended: CPU-seconds spent and its final objective (None: stopped)."""
    rows = []
    for path in (search / "tune").glob("run_trial_*/result.json"):
        reports = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if reports:
            last = reports[-1]
            rows.append({"ended": float(last["timestamp"]), "cpu_seconds": cpus * float(last["time_total_s"]),
                         "value": last.get("defender_score") if last.get("final") == 1 else None})
    return sorted(rows, key=lambda r: r["ended"])


def compute_to_reach(rows: list[dict], target: float) -> float:
    spent = 0.0
    for row in rows:
        spent += row["cpu_seconds"]
        if row["value"] is not None and row["value"] >= target:
            return spent
    return math.inf


def main() -> None:
    from _cells import cell

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="bedkd", choices=sorted(BUDGETS))
    ap.add_argument("--dev", default="rotten-tomatoes/badnet")
    ap.add_argument("--num-samples", type=int, default=16)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--tolerance", type=float, default=2.0, help="points of the defender score")
    ap.add_argument("--permutations", type=int, default=10000)
    ap.add_argument("--work", default=str(HERE / "work" / "efficiency"))
    args = ap.parse_args()

    dataset, attack = args.dev.split("/")
    run, _ = cell(dataset, attack, train_rows=3000, test_rows=1000, epochs=3)
    work = Path(args.work) / args.method
    common = ["tune", "--method", args.method, "--run", str(run), "--num-samples", str(args.num_samples),
              "--max-concurrent", "2", *[a for k, v in BUDGETS[args.method].items() for a in ("--set", f"{k}={v}")]]
    searches = {f"smart-{seed}": ["--sampler", "tpe", "--scheduler", "asha", "--seed", str(seed)]
                for seed in args.seeds}
    searches["random"] = ["--sampler", "random", "--scheduler", "none", "--no-shared-work", "--seed", "0"]
    for name, extra in searches.items():
        out = work / name
        if not (out / "summary.json").is_file():
            kdshield(*common, *extra, *(["--resume"] if (out / "tune.json").is_file() else []), "--out", str(out))
    cpus = 1.0  # one worker x 1 CPU per trial (the tune default)
    lines = {name: timeline(work / name, cpus) for name in searches}
    values = [r["value"] for rows in lines.values() for r in rows if r["value"] is not None]
    best = max(values)
    n_val = json.loads((work / "random" / "shared" / "probe.json").read_text())["n_val"]
    resolution = 100.0 / n_val
    if args.tolerance < resolution:
        raise SystemExit(f"--tolerance {args.tolerance} is finer than the validation set's resolution "
                         f"({resolution:.2f} points: {n_val} rows)")
    target = best - args.tolerance
    smart = [compute_to_reach(lines[n], target) for n in searches if n.startswith("smart")]
    rng = np.random.default_rng(0)
    random_rows = lines["random"]
    draws = [compute_to_reach([random_rows[i] for i in rng.permutation(len(random_rows))], target)
             for _ in range(args.permutations)]
    reached = [d for d in draws if math.isfinite(d)]
    expected_random = float(np.mean(reached)) if len(reached) == len(draws) else math.inf
    smart_mean = float(np.mean(smart)) if all(math.isfinite(s) for s in smart) else math.inf
    result = {"method": args.method, "cell": args.dev, "num_samples": args.num_samples, "best_value": best,
              "tolerance": args.tolerance, "validation_rows": n_val, "resolution": resolution, "target": target,
              "smart_cpu_seconds": dict(zip([n for n in searches if n.startswith("smart")], smart)),
              "smart_mean_cpu_seconds": smart_mean, "random_expected_cpu_seconds": expected_random,
              "random_orders_reaching": len(reached) / len(draws),
              "compute_ratio": expected_random / smart_mean if smart_mean and math.isfinite(smart_mean) else math.nan,
              "timelines": lines}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "efficiency.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [f"# Search efficiency: {args.method} on {args.dev}", "",
          f"`python benchmarks/search_efficiency.py {' '.join(sys.argv[1:])}`", "",
          f"{args.num_samples} trials per search, 2 at a time, 1 CPU each. Best defender score of any search "
          f"{best:.2f}; target: within {args.tolerance} points (the validation set has {n_val} rows: resolution "
          f"{resolution:.2f} points).", "", "| search | trial CPU-seconds to the target |", "|---|---|"]
    md += [f"| {n} | {s:.0f} |" for n, s in result["smart_cpu_seconds"].items()]
    md += [f"| random (expected over {args.permutations} orders; {100 * result['random_orders_reaching']:.0f}% "
           f"reach it) | {expected_random:.0f} |", "", f"compute_ratio (random / smart mean): "
           f"{result['compute_ratio']:.2f} (target >= 2)", ""]
    (RESULTS / "efficiency.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
