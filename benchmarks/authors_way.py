"""A BeDKD job the authors' way against kdshield's default, with the saving split into its parts.

The authors' code pads every batch to a fixed length, runs the teacher at every step and starts
a trainer per stage. kdshield pads each batch to its longest row, computes a frozen teacher's
outputs once (batch inference, cached) and, for a one-worker job on a local Ray, trains every
stage in the job's own process. Four modes on one RUN (the RT BadNet cell, 3000 rows, MiniLM;
``benchmarks/bedkd.py``'s budget; 1 worker x 2 CPUs), alternated in each round of one script run:

- ``kdshield``: the defaults;
- ``+fixed padding``: ``--pad-to`` the budget's max_length (64);
- ``+live teacher``: and ``--teacher-outputs live``;
- ``authors' way``: and ``--no-in-process`` (a Ray Train worker group per stage).

Each step's extra seconds are one part's share (padding, caching, engine). Also per mode: seconds
per stage, CACC/ASR (equal within noise: the same training, only the cost differs) and padding
efficiency. Written: ``results/authors_way.json`` and ``results/authors_way.md``. Target: the
authors' way at least 4x the seconds of kdshield's default for the whole job.

    python benchmarks/authors_way.py [--rounds 1]
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
sys.path.insert(0, str(HERE))
RESULTS = HERE / "results"
MODES = {"kdshield": [], "+fixed padding": ["--pad-to", "PAD"],
         "+live teacher": ["--pad-to", "PAD", "--teacher-outputs", "live"],
         "authors' way": ["--pad-to", "PAD", "--teacher-outputs", "live", "--no-in-process"]}
SHARES = (("padding", "kdshield", "+fixed padding"), ("caching", "+fixed padding", "+live teacher"),
          ("engine", "+live teacher", "authors' way"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--work", default=str(HERE / "work" / "authors_way"))
    args = ap.parse_args()
    import bedkd
    from _cells import cell
    from fast_jobs import stage_costs

    run, _ = cell("rotten-tomatoes", "badnet", train_rows=3000, test_rows=1000, epochs=3)
    settings = bedkd.settings_for("bedkd", bedkd.BUDGET)
    sets = [a for k, v in settings.items() for a in ("--set", f"{k}={v}")]
    pad = str(settings["max_length"])
    rows = []
    for rnd in range(args.rounds):
        for mode, flags in MODES.items():
            out = Path(args.work) / f"{mode.strip('+').replace(' ', '-').replace(chr(39), '')}-{rnd}"
            cmd = [sys.executable, "-m", "kdshield.cli", "defend", "--method", "bedkd", "--run", str(run),
                   "--out", str(out), "--overwrite", "--workers", "1", "--cpus-per-worker", "2", *sets,
                   *[pad if f == "PAD" else f for f in flags]]
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, env={**os.environ, "RAY_ADDRESS": ""})
            wall = time.perf_counter() - t0
            m = json.loads((out / "metrics.json").read_text())
            rows.append({"mode": mode, "round": rnd, "wall_s": round(wall, 1), "cacc": m["cacc"], "asr": m["asr"],
                         "stage_seconds": m["stage_seconds"], "stages": stage_costs(m)})
            print(mode, rnd, rows[-1]["wall_s"], m["cacc"], m["asr"], flush=True)
    median = {mode: sorted(r["wall_s"] for r in rows if r["mode"] == mode)[args.rounds // 2] for mode in MODES}
    shares = {name: round(median[b] - median[a], 1) for name, a, b in SHARES}
    record = {"command": " ".join(["python", "benchmarks/authors_way.py", *sys.argv[1:]]), "run": str(run),
              "settings": settings, "machine": f"{os.cpu_count()} CPUs, no GPU, alone", "rows": rows,
              "median_wall_s": median, "shares_s": shares,
              "speedup_authors_over_kdshield": round(median["authors' way"] / median["kdshield"], 2)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "authors_way.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = ["# A BeDKD job the authors' way vs kdshield's default", "", f"`{record['command']}`", "",
             f"RT BadNet cell (3000 rows, MiniLM), `benchmarks/bedkd.py`'s budget, 1 worker x 2 CPUs; "
             f"{record['machine']}; modes alternated in each round.", "",
             "| mode | round | wall s | CACC % | ASR % | stages s (fixed s) | padding efficiency |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        stages = ", ".join(f"{k} {v['seconds']:.0f} ({v['fixed_seconds']:.1f})" for k, v in r["stages"].items()
                           if v["seconds"] is not None)
        pads = [v["padding_efficiency"] for v in r["stages"].values() if v["padding_efficiency"] is not None]
        lines.append(f"| {r['mode']} | {r['round']} | {r['wall_s']} | {r['cacc']:.1f} | {r['asr']:.1f} | {stages} | "
                     + (f"{min(pads):.2f}-{max(pads):.2f}" if pads else "-") + " |")
    lines += ["", "Shares of the authors' way's extra seconds (medians): "
              + ", ".join(f"{k} {v:+.0f} s" for k, v in shares.items()),
              f"Authors' way / kdshield: {record['speedup_authors_over_kdshield']}x (target >= 4)."]
    (RESULTS / "authors_way.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
