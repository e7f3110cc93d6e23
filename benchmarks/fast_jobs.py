"""Fixed costs paid once (issue 19): the same jobs on the code before the issue and on this checkout,
alternated, in one run of this script.

    python benchmarks/fast_jobs.py [--before a61e5fd] [--jobs demo tune bedkd] [--rounds 1]

Jobs, each run as a separate process (``kdshield`` from ``--before``'s worktree, created under
``work/fast_jobs/before``, or from this checkout's ``src``):

- ``bedkd``: BeDKD on the RT BadNet benchmark cell (3000 training rows, the BeDKD benchmark budget of
  ``benchmarks/bedkd.py``), 1 worker x 2 CPUs as every benchmark cell;
- ``demo``: ``kdshield demo`` as a new user runs it;
- ``tune``: one BeDKD trial of ``kdshield tune`` (probe included, seed 0, no early stopping) on the
  demo's RUN.

Per job and version: wall seconds, CACC/ASR, each stage's seconds, its summed epoch seconds and the
difference (the stage's fixed cost), the inference and teacher-cache seconds, and the training
batches' padding efficiency where the version reports it. Writes ``results/fast_jobs.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
WORK = HERE / "work" / "fast_jobs"


def source_tree(commit: str) -> Path:
    """The ``src`` of ``commit`` (a detached worktree, made once)."""
    tree = WORK / "before"
    if not (tree / "src" / "kdshield").is_dir():
        WORK.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--force", "--detach", str(tree), commit],
                       check=True)
    head = subprocess.run(["git", "-C", str(tree), "rev-parse", "HEAD"], check=True, capture_output=True,
                          text=True).stdout.strip()
    if not head.startswith(commit):
        raise SystemExit(f"{tree} is at {head[:12]}, not {commit}; remove it and re-run")
    return tree / "src"


def kdshield(src: Path, args: list[str], log: Path) -> float:
    """Run the ``kdshield`` command line of the package in ``src``; returns its wall seconds."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    code = ("import sys, kdshield, kdshield.cli as c; assert kdshield.__file__.startswith(sys.argv[1]), "
            "kdshield.__file__; sys.exit(c.main(sys.argv[2:]))")
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-c", code, str(src), *args], env=env, stdout=f,
                              stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"kdshield {' '.join(args[:2])} from {src} failed (exit {proc.returncode}); see {log}")
    return seconds


def stage_costs(metrics: dict) -> dict:
    """Per trained stage: seconds, summed epoch seconds, their difference; and the padding efficiency."""
    out = {}
    for name, history in metrics.get("history", {}).items():
        total = metrics.get("stage_seconds", {}).get(name)
        epochs = sum(float(h.get("epoch_seconds", 0.0)) for h in history)
        pads = [v for h in history for k, v in h.items() if k.endswith("/padding_efficiency")]
        out[name] = {"seconds": total, "epoch_seconds": epochs,
                     "fixed_seconds": None if total is None else total - epochs,
                     "padding_efficiency": sum(pads) / len(pads) if pads else None}
    return out


def bedkd_job(src: Path, out: Path, log: Path) -> dict:
    sys.path.insert(0, str(HERE))
    import bedkd
    from _cells import cell

    run, _ = cell("rotten-tomatoes", "badnet", train_rows=3000, test_rows=1000, epochs=3)
    sets = [a for k, v in bedkd.settings_for("bedkd", bedkd.BUDGET).items() for a in ("--set", f"{k}={v}")]
    wall = kdshield(src, ["defend", "--method", "bedkd", "--run", str(run), "--out", str(out), "--overwrite",
                          "--workers", "1", "--cpus-per-worker", "2", *sets], log)
    m = json.loads((out / "metrics.json").read_text())
    return {"wall_s": wall, "cacc": m["cacc"], "asr": m["asr"], "stage_seconds": m["stage_seconds"],
            "stages": stage_costs(m), "inference_rows": m.get("inference_rows")}


def demo_job(src: Path, out: Path, log: Path) -> dict:
    wall = kdshield(src, ["demo", "--out", str(out), "--overwrite"], log)
    attack = json.loads((out / "run" / "metrics.json").read_text())
    m = json.loads((out / "bedkd" / "metrics.json").read_text())
    return {"wall_s": wall, "attack_cacc": attack["cacc"], "attack_asr": attack["asr"], "attack_s": attack["seconds"],
            "cacc": m["cacc"], "asr": m["asr"], "defense_s": m["seconds"], "stage_seconds": m["stage_seconds"],
            "stages": stage_costs(m), "identified": m.get("n_identified"),
            "precision": m.get("identified_precision")}


def tune_job(src: Path, out: Path, log: Path) -> dict:
    """One BeDKD tune trial (its probe included) on the demo's RUN (made by the ``demo`` job, which
    runs first), seed 0: both versions sample the same settings from the same space."""
    import shutil

    run = WORK / "demo-before" / "run"
    if not (run / "metrics.json").is_file():
        raise SystemExit(f"{run}: run the demo job first (--jobs demo tune)")
    shutil.rmtree(out, ignore_errors=True)
    wall = kdshield(src, ["tune", "--method", "bedkd", "--run", str(run), "--num-samples", "1", "--scheduler", "none",
                          "--seed", "0", "--out", str(out)], log)
    trial = json.loads(next((out / "trials").glob("*/result.json")).read_text())
    m = json.loads(next((out / "trials").glob("*/defend/metrics.json")).read_text())
    return {"wall_s": wall, "trial_s": trial["report"]["trial_seconds"] if "report" in trial else trial.get("trial_seconds"),
            "params": trial.get("params"), "cacc": m["cacc"], "asr": m["asr"], "stage_seconds": m["stage_seconds"],
            "stages": stage_costs(m)}


JOBS = {"demo": demo_job, "tune": tune_job, "bedkd": bedkd_job}


def render(store: dict) -> str:
    from kdshield.evaluation import markdown_table

    rows = []
    for r in store["runs"]:
        stages = ", ".join(f"{k} {v['seconds']:.0f} ({v['fixed_seconds']:.1f} fixed)" for k, v in r["stages"].items()
                           if v["seconds"] is not None)
        other = ", ".join(f"{k} {v:.0f}" for k, v in r["stage_seconds"].items() if k not in r["stages"])
        pads = [v["padding_efficiency"] for v in r["stages"].values() if v["padding_efficiency"] is not None]
        rows.append({"job": r["job"], "code": r["code"], "round": r["round"], "wall s": r["wall_s"],
                     "CACC %": r["cacc"], "ASR %": r["asr"], "stages s (fixed s)": stages, "other s": other,
                     "padding efficiency": f"{min(pads):.2f}-{max(pads):.2f}" if pads else "-"})
    lines = ["# Fixed costs paid once (issue 19)", "",
             f"`python benchmarks/fast_jobs.py --before {store['before']} --jobs {' '.join(store['jobs'])} "
             f"--rounds {store['rounds']}` on this project's 2-core CPU machine, alone; before and after alternated "
             "in one run. `before`: commit " + store["before"] + " (the state before the issue); `after`: "
             + store["after"] + ". BeDKD: the RT BadNet cell (3000 rows), `benchmarks/bedkd.py`'s budget, 1 worker x "
             "2 CPUs. Demo: `kdshield demo` (its own settings). A stage's fixed cost: its seconds minus its summed "
             "epoch seconds. Padding efficiency: real tokens / padded tokens of the training batches (reported "
             "by the engine since this issue).", "", markdown_table(rows), ""]
    for job in store["jobs"]:
        walls = {code: [r["wall_s"] for r in store["runs"] if r["job"] == job and r["code"] == code]
                 for code in ("before", "after")}
        if walls["before"] and walls["after"]:
            before, after = sorted(walls["before"])[len(walls["before"]) // 2], sorted(walls["after"])[len(walls["after"]) // 2]
            lines.append(f"- {job}: {before:.0f} s -> {after:.0f} s, {before / after:.2f}x faster")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", default="a61e5fd")
    ap.add_argument("--jobs", nargs="+", default=list(JOBS), choices=list(JOBS))
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--tag", default="fast_jobs")
    ap.add_argument("--codes", nargs="+", default=["before", "after"], choices=["before", "after"],
                    help="which code to run (a ratio needs both)")
    args = ap.parse_args()
    after = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], check=True, capture_output=True,
                           text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "src"], capture_output=True,
                           text=True).stdout.strip()
    sources = {"before": source_tree(args.before) if "before" in args.codes else None, "after": ROOT / "src"}
    store = {"before": args.before, "after": after + (" + uncommitted changes" if dirty else ""),
             "jobs": args.jobs, "rounds": args.rounds, "runs": []}
    for round_ in range(args.rounds):
        for job in args.jobs:
            for code in [c for c in (("before", "after") if round_ % 2 == 0 else ("after", "before"))
                         if c in args.codes]:
                out = WORK / f"{job}-{code}"
                print(f"{job} on {code} (round {round_ + 1})", flush=True)
                result = JOBS[job](sources[code], out, WORK / f"{job}-{code}-{round_}.log")
                store["runs"].append({"job": job, "code": code, "round": round_ + 1, **result})
                RESULTS.mkdir(exist_ok=True)
                (RESULTS / f"{args.tag}.json").write_text(json.dumps(store, indent=2, default=str))
                (RESULTS / f"{args.tag}.md").write_text(render(store))
                print(render(store), flush=True)


if __name__ == "__main__":
    main()
