"""BeDKD on SmolLM2-135M with every copy of the suspect trained whole against ``--lora 16``
(adapters on one frozen base): each stage's peak RSS, the whole job's, seconds, CACC and ASR.

The cell is W2SDefense's development cell (``benchmarks/w2s.py``; built here if missing):
SmolLM2-135M backdoored with the authors' sentence trigger, dirty-label, 1000 training rows
(the defender's clean data: the RUN's 200-row dev split), 400 test rows. Both runs share one
budget (``BUDGET``), one after the other, each in its own process (a peak RSS never goes down),
on one worker with 2 CPUs.
Written: ``results/lora_memory.json`` and ``results/lora_memory.md``. Target: the job's peak
at least 2x lower with ``--lora 16``.

    python benchmarks/lora_memory.py [--lora 16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
RESULTS = HERE / "results"
BUDGET = {"n_c": 80, "n_c_dmm": 80, "dmm_epochs": 5, "akd_cycles": 3, "batch_size": 16, "max_length": 64,
          "target_frr": 0.1}
SCALING = {"workers": 1, "cpus_per_worker": 2}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lora", type=int, default=16)
    ap.add_argument("--work", default=str(HERE / "work" / "lora_memory"))
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # a child: one mode (0: full)
    args = ap.parse_args()
    from search import build_cell

    run = build_cell("w2s", "rotten-tomatoes/w2s-sentence")
    if args.one is not None:
        return one_mode(run, args.one or None, Path(args.work))
    rows = []
    for lora in (0, args.lora):  # each in its own process: a process's peak RSS never goes down
        subprocess.run([sys.executable, __file__, "--work", args.work, "--one", str(lora)], check=True)
        rows.append(json.loads((Path(args.work) / f"row-{lora}.json").read_text()))
        print(rows[-1], flush=True)
    ratio = rows[0]["peak_rss_mb"] / rows[1]["peak_rss_mb"]
    record = {"command": " ".join(["python", "benchmarks/lora_memory.py", *sys.argv[1:]]), "run": str(run),
              "budget": BUDGET, "scaling": SCALING, "machine": f"{os.cpu_count()} CPUs, no GPU",
              "rows": rows, "peak_ratio_full_over_lora": round(ratio, 2)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lora_memory.json").write_text(json.dumps(record, indent=2) + "\n")
    stages = sorted({s for r in rows for s in r["stage_peak_rss_mb"]})
    lines = ["# BeDKD on SmolLM2-135M: every copy trained whole vs LoRA adapters on one frozen base", "",
             f"`{record['command']}`", "",
             f"Cell: RT, W2SDefense's sentence trigger, dirty-label (benchmarks/w2s.py); budget `{json.dumps(BUDGET)}`; "
             f"1 worker x 2 CPUs ({record['machine']}). Peak RSS per stage (the training process, MB).", "",
             "| mode | CACC % | ASR % | no-trigger ASR % | seconds | " + " | ".join(f"{s} peak MB" for s in stages) + " |",
             "|---|---|---|---|---|" + "---|" * len(stages)]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['cacc']:.1f} | {r['asr']:.1f} | {r['asr_no_trigger']:.1f} | {r['seconds']} | "
                     + " | ".join(str(round(r["stage_peak_rss_mb"].get(s, 0))) for s in stages) + " |")
    lines += ["", f"Job peak, full / LoRA: {ratio:.2f}x (target >= 2)."]
    (RESULTS / "lora_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def one_mode(run: Path, lora: int | None, work: Path) -> None:
    from kdshield.trainables.defend import DefendJob, run_defend

    name = f"lora {lora}" if lora else "full"
    m = run_defend(DefendJob(method="bedkd", run=str(run), out=str(work / name.replace(" ", "-")),
                             params=BUDGET, lora=lora, scaling=SCALING))
    row = {"mode": name, "cacc": m["cacc"], "asr": m["asr"], "asr_no_trigger": m.get("asr_no_trigger"),
           "seconds": round(m["seconds"]), "stage_peak_rss_mb": m["stage_peak_rss_mb"],
           "peak_rss_mb": round(max(m["stage_peak_rss_mb"].values()))}
    (work / f"row-{lora or 0}.json").write_text(json.dumps(row))


if __name__ == "__main__":
    main()
