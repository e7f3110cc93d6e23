"""NAD (Neural Attention Distillation) on the committed cells, MiniLM: No defense / the fine-tuned
teacher alone (the FT comparison of the NAD paper) / NAD.

For every (dataset, attack) cell (the same backdoored RUNs as bedkd.py and feature_defenses.py:
3,000 training rows, 10% dirty-label, target 1), run ``nad`` with the budget below on the RUN's dev
split (10% of the training rows) as the defender's clean data. Results are appended cell by cell to
``benchmarks/results/{tag}.json`` and rendered to ``{tag}.md``; re-running skips finished rows.

    python benchmarks/nad.py [--datasets rotten-tomatoes cr] [--attacks badnet addsent] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

# The paper: teacher 10 epochs, NAD 20 epochs on 5% clean data; scaled for a 2-core CPU machine.
BUDGET = {"teacher_epochs": 5, "epochs": 10, "batch_size": 16, "max_length": 64}


def render(rows: list[dict], budget: dict, commands: list[str]) -> str:
    from kdshield.evaluation import markdown_table

    cols = ["dataset", "attack", "method", "CACC %", "ASR %", "no-trigger ASR %", "seconds", "stage seconds"]
    by_cell: dict[tuple, dict] = {}
    for r in rows:
        by_cell.setdefault((r["dataset"], r["attack"]), {})[r["method"]] = r
    verdicts = []
    for (ds, atk), cell in by_cell.items():
        base, teacher, nad = cell.get("none"), cell.get("fine-tuned teacher"), cell.get("nad")
        if base and nad:
            verdicts.append(f"- {ds} / {atk}: ASR {base['ASR %']:.1f} -> {nad['ASR %']:.1f} "
                            f"(fine-tuning alone: {teacher['ASR %']:.1f}), CACC {base['CACC %']:.1f} -> "
                            f"{nad['CACC %']:.1f}" if teacher else "")
    return ("# NAD on real data (MiniLM-L6)\n\n" + "".join(f"`{c}`\n\n" for c in commands)
            + f"Budget: `{json.dumps(budget)}` (NADConfig's other settings at their defaults: beta 10, p 2, every "
              "block distilled, lr 3e-5); poison rate 10% dirty-label, target label 1; the defender's clean data is "
              "the RUN's dev split (300 rows). `fine-tuned teacher`: NAD's first stage evaluated on its own. "
              "`seconds`: the whole defend job on a 2-core CPU machine, 1 worker x 2 CPUs.\n\n"
            + markdown_table(rows, cols) + "\n\n" + "\n".join(v for v in verdicts if v) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["rotten-tomatoes", "cr"])
    ap.add_argument("--attacks", nargs="+", default=["badnet", "addsent"])
    ap.add_argument("--train-rows", type=int, default=3000)
    ap.add_argument("--test-rows", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=3, help="attack (victim training) epochs")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--work", default=str(HERE / "work" / "nad"))
    ap.add_argument("--tag", default="nad", help="results file name")
    args = ap.parse_args()

    import kdshield
    from kdshield.config import parse_assignments
    from _cells import SCALING, cell, resume_results

    budget = {**BUDGET, **parse_assignments(args.set)}
    RESULTS.mkdir(exist_ok=True)
    store = RESULTS / f"{args.tag}.json"
    rows, commands = resume_results(store)
    done = {(r["dataset"], r["attack"], r["method"]) for r in rows}

    def save():
        store.write_text(json.dumps({"commands": commands, "budget": budget, "rows": rows}, indent=2))
        (RESULTS / f"{args.tag}.md").write_text(render(rows, budget, commands))

    def row(dataset, attack, method, m):
        return {"dataset": dataset, "attack": attack, "method": method, "CACC %": m["cacc"], "ASR %": m.get("asr"),
                "no-trigger ASR %": m.get("asr_no_trigger"), "seconds": m.get("seconds"),
                "stage seconds": ", ".join(f"{k} {v:.0f}" for k, v in m.get("stage_seconds", {}).items())}

    for dataset in args.datasets:
        for attack in args.attacks:
            run, metrics = cell(dataset, attack, train_rows=args.train_rows, test_rows=args.test_rows,
                                epochs=args.epochs)
            if (dataset, attack, "none") not in done:
                rows.append(row(dataset, attack, "none", metrics))
            if (dataset, attack, "nad") in done:
                continue
            m = kdshield.defend("nad", run=str(run), out=str(Path(args.work) / dataset / attack), overwrite=True,
                                settings=budget, scaling=SCALING)
            rows.append(row(dataset, attack, "fine-tuned teacher", {**m["teacher"], "seconds": None}))
            rows.append(row(dataset, attack, "nad", m))
            save()
            print(render(rows, budget, commands), flush=True)


if __name__ == "__main__":
    main()
