"""What the smart search buys: TPE + ASHA + shared stages against plain random search, in compute.

On one cell (default: the development cell of ``search.py``, one method at its search budget):

- ``smart``: ``kdshield tune`` with TPE, ASHA and the content-hashed stage cache, once per seed
  (``--seeds``), each with a cache of its own (no search reuses another's stages);
- ``random``: Optuna's RandomSampler, no early stopping, ``--no-shared-work``, once.

Measured: the compute (trial CPU-seconds: each trial's wall seconds x the CPUs it holds, stopped
trials included, in the order the trials ended) until a finished trial's objective is within a
tolerance of the best value any search found; a search that never gets there is charged all it
spent. Tolerances: ``--tolerance`` (points) and the defender score's standard error at the best
trial (binomial over the held-out and the flagged rows: closer scores are not told apart by the
data the objective sees), the headline; none may be finer than the held-out set's resolution
(100 / its rows). Random search's compute is its expectation over ``--permutations`` random orders
of its trials (the order of a random search is itself random); the smart search's is the mean over
its seeds. ``compute_ratio`` = random / smart (target: >= 2). Written to
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
            final = last.get("final") == 1
            rows.append({"ended": float(last["timestamp"]), "cpu_seconds": cpus * float(last["time_total_s"]),
                         "value": last.get("defender_score") if final else None,
                         "val_acc": last.get("val_cacc") if final else None,
                         "flagged_agreement": last.get("flagged_agreement") if final else None})
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
    ap.add_argument("--tolerance", type=float, nargs="+", default=[2.0, 4.0, 8.0],
                    help="points of the defender score (the score's standard error at the best trial is added)")
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
    finals = [r for rows in lines.values() for r in rows if r["value"] is not None]
    best = max(finals, key=lambda r: r["value"])
    probe = json.loads((work / "random" / "shared" / "probe.json").read_text())
    n_val, n_flagged = probe["n_val"], probe["n_flagged"]
    resolution = 100.0 / n_val
    # the defender score's standard error at the best trial (binomial, held-out rows and flagged rows):
    # two scores closer than this are not told apart by the data the objective sees
    v, f = best["val_acc"] / 100, best["flagged_agreement"] / 100
    standard_error = 100 * math.sqrt(v * (1 - v) / n_val + f * (1 - f) / n_flagged)
    tolerances = sorted({*args.tolerance, round(standard_error, 2)})
    too_fine = [t for t in tolerances if t < resolution]
    if too_fine:
        raise SystemExit(f"--tolerance {too_fine[0]} is finer than the validation set's resolution "
                         f"({resolution:.2f} points: {n_val} rows)")
    rng = np.random.default_rng(0)
    random_rows = lines["random"]
    orders = [[random_rows[i] for i in rng.permutation(len(random_rows))] for _ in range(args.permutations)]
    smart_names = [n for n in searches if n.startswith("smart")]
    by_tolerance = []
    for tol in tolerances:
        target = best["value"] - tol
        smart = {n: compute_to_reach(lines[n], target) for n in smart_names}
        draws = [compute_to_reach(order, target) for order in orders]
        reached = [d for d in draws if math.isfinite(d)]
        # a search that never reaches the target is charged all it spent (a lower bound on its cost)
        charged = {n: c if math.isfinite(c) else sum(r["cpu_seconds"] for r in lines[n]) for n, c in smart.items()}
        random_expected = float(np.mean([d if math.isfinite(d) else sum(r["cpu_seconds"] for r in random_rows)
                                         for d in draws]))
        smart_mean = float(np.mean(list(charged.values())))
        by_tolerance.append({"tolerance": tol, "target": target,
                             "smart_cpu_seconds": {n: c if math.isfinite(c) else None for n, c in smart.items()},
                             "smart_reached": sum(math.isfinite(c) for c in smart.values()),
                             "smart_mean_cpu_seconds": smart_mean, "random_expected_cpu_seconds": random_expected,
                             "random_orders_reaching": len(reached) / len(draws),
                             "compute_ratio": random_expected / smart_mean})
    headline = next(r for r in by_tolerance if r["tolerance"] == round(standard_error, 2))
    totals = {n: sum(r["cpu_seconds"] for r in rows) for n, rows in lines.items()}
    result = {"method": args.method, "cell": args.dev, "num_samples": args.num_samples, "seeds": args.seeds,
              "best_value": best["value"], "validation_rows": n_val, "flagged_rows": n_flagged,
              "resolution": resolution, "standard_error_at_best": standard_error,
              "tolerance": headline["tolerance"], "compute_ratio": headline["compute_ratio"],
              "by_tolerance": by_tolerance, "search_cpu_seconds": totals,
              "best_per_search": {n: max((r["value"] for r in rows if r["value"] is not None), default=None)
                                  for n, rows in lines.items()},
              "timelines": lines}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "efficiency.json").write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    md = [f"# Search efficiency: {args.method} on {args.dev}", "",
          f"`python benchmarks/search_efficiency.py {' '.join(sys.argv[1:])}`", "",
          f"{args.num_samples} trials per search, 2 at a time, 1 CPU each; smart: TPE + ASHA + shared stages, "
          f"seeds {', '.join(map(str, args.seeds))}; random: Optuna's random sampler, no early stopping, no shared "
          f"stages. Compute: trial CPU-seconds in the order trials ended until a finished trial is within the "
          f"tolerance of the best defender score any search found ({best['value']:.2f}); a search that never gets "
          f"there is charged all it spent (a lower bound). The validation set has {n_val} rows (resolution "
          f"{resolution:.2f} points), the flagged set {n_flagged}; the score's standard error at the best trial is "
          f"{standard_error:.2f} points, the headline tolerance.", "",
          "| search | best defender score | trial CPU-seconds in all |", "|---|---|---|"]
    md += [f"| {n} | {result['best_per_search'][n]:.2f} | {totals[n]:.0f} |" for n in lines]
    md += ["", "| tolerance (points) | smart: CPU-seconds to the target per seed | smart mean | random expected "
           "(share of orders reaching it) | compute_ratio (random / smart) |", "|---|---|---|---|---|"]
    for r in by_tolerance:
        seeds = " / ".join("never" if c is None else f"{c:.0f}" for c in r["smart_cpu_seconds"].values())
        md.append(f"| {r['tolerance']:.2f}{' (standard error)' if r is headline else ''} | {seeds} | "
                  f"{r['smart_mean_cpu_seconds']:.0f} | {r['random_expected_cpu_seconds']:.0f} "
                  f"({100 * r['random_orders_reaching']:.0f}%) | {r['compute_ratio']:.2f} |")
    md += ["", f"compute_ratio at the standard error: {result['compute_ratio']:.2f} (target >= 2)", ""]
    (RESULTS / "efficiency.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
