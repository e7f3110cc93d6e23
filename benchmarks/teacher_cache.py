"""What caching the frozen teacher saves: BeDKD with teacher outputs precomputed once by Ray Data
batch inference (``teacher_outputs=cached``, the default) against the same pipeline running the
teacher inside the training loop at every step (``teacher_outputs=live``), in one run.

    python benchmarks/teacher_cache.py --run RUN [--set key=value ...]   # writes results/teacher_cache.{json,md}

RUN is a directory from ``kdshield attack``: e.g. ``kdshield-demo/run`` after ``kdshield demo``,
or benchmarks/work/attack/run from attack.py.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUDGET = {"n_c_dmm": 40, "n_c": 64, "n_p": 32, "dmm_epochs": 10, "akd_cycles": 10}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=str(HERE / "work" / "attack" / "run"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--work", default=str(HERE / "work" / "teacher_cache"))
    args = ap.parse_args()

    from kdshield.config import parse_assignments
    from kdshield.evaluation import markdown_table
    from kdshield.trainables.defend import DefendJob, run_defend

    params = {**BUDGET, **parse_assignments(args.set)}
    results = {}
    for mode in ("live", "cached"):
        m = run_defend(DefendJob(method="bedkd", run=args.run, out=str(Path(args.work) / mode), overwrite=True,
                                 teacher_outputs=mode, params=params, scaling={"workers": 1, "cpus_per_worker": 2}))
        s = m["stage_seconds"]
        results[mode] = {"dmm s": s["dmm"], "akd s": s["akd"], "teacher cache s": s.get("teacher_cache", 0.0),
                         "total s": m["seconds"], "CACC %": m["cacc"], "ASR %": m["asr"]}
    live, cached = results["live"], results["cached"]
    ratios = {
        "akd": live["akd s"] / cached["akd s"],
        "dmm+akd incl. caching": (live["dmm s"] + live["akd s"])
        / (cached["dmm s"] + cached["akd s"] + cached["teacher cache s"]),
        "total": live["total s"] / cached["total s"],
    }
    rows = [{"teacher outputs": k, **v} for k, v in results.items()]
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "teacher_cache.json").write_text(json.dumps({"params": params, "results": results, "ratios": ratios},
                                                       indent=2))
    attack = json.loads((Path(args.run) / "attack.json").read_text())
    text = ("# Teacher caching: BeDKD with cached vs live teacher outputs\n\n"
            f"`python benchmarks/teacher_cache.py --run {args.run}`: {attack['config']['model']} backdoored by "
            f"{attack['config']['attack']} (RUN rows {json.dumps(attack['rows'])}, max length "
            f"{attack['config']['training']['max_length']}), 1 worker x 2 CPUs, "
            f"settings `{json.dumps(params)}`; stage seconds are Ray Train fits (worker start included).\n\n"
            + markdown_table(rows) + "\n\n"
            + "\n".join(f"- live / cached, {k}: {v:.2f}x" for k, v in ratios.items()) + "\n")
    (out / "teacher_cache.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
