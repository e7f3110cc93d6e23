"""Behaviour unchanged by the redesign (issue 18): re-run one committed cell per existing defense
with the new code, the same RUN (rebuilt from the same seeds: the attack reproduces its committed
CACC/ASR exactly), the same budget and seeds, and put the new CACC/ASR next to the committed row.

    python benchmarks/redesign_check.py [--only bedkd mbtsad ...]

Writes ``results/redesign_check.{json,md}``; a finished check is kept (re-running skips it).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

# (method, dataset, attack, results file that holds the committed row, its row key, budget family)
CHECKS = [
    ("bedkd", "rotten-tomatoes", "badnet", "bedkd_np", "bedkd", "bedkd"),
    ("ft", "cr", "badnet", "bedkd", "ft", "bedkd"),
    ("kd", "cr", "badnet", "bedkd", "kd", "bedkd"),
    ("robustkd", "cr", "badnet", "feature_defenses", "robustkd", "robustkd"),
    ("feature-kd", "cr", "badnet", "feature_defenses", "feature-kd", "robustkd"),
    ("mbtsad", "cr", "badnet", "feature_defenses", "mbtsad", "mbtsad"),
]


def committed(results: str, dataset: str, attack: str, key: str) -> dict:
    rows = json.loads((RESULTS / f"{results}.json").read_text())["rows"]
    return next(r for r in rows if r["dataset"] == dataset and r["attack"] == attack
                and (r.get("key") or r.get("method")) == key)


def render(rows: list[dict]) -> str:
    from kdshield.evaluation import markdown_table

    return ("# The redesign changed no result (issue 18)\n\n`python benchmarks/redesign_check.py`\n\n"
            "Each row: one committed cell per defense re-run after the move to `defenses/<name>/` (same RUN, "
            "rebuilt by `_cells.cell` from the same seeds and reproducing the committed attack row exactly; same "
            "budget as the committed table, same seeds). `same` is exact equality of the rounded percentages.\n\n"
            + markdown_table(rows, ["method", "dataset", "attack", "committed in", "committed CACC %",
                                    "committed ASR %", "CACC % now", "ASR % now", "same", "seconds now"]) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", default=None)
    args = ap.parse_args()

    import kdshield
    import bedkd
    import feature_defenses
    from _cells import SCALING, cell, settings_of

    store = RESULTS / "redesign_check.json"
    rows = json.loads(store.read_text())["rows"] if store.exists() else []
    done = {r["method"] for r in rows}
    for method, dataset, attack, results, key, family in CHECKS:
        if method in done or (args.only and method not in args.only):
            continue
        run, attack_metrics = cell(dataset, attack, train_rows=3000, test_rows=1000, epochs=3)
        before = committed(results, dataset, attack, key)
        base = committed(results, dataset, attack, "none")
        if round(base["CACC %"], 1) != round(attack_metrics["cacc"], 1) or \
                round(base["ASR %"], 1) != round(attack_metrics["asr"], 1):
            raise SystemExit(f"{dataset}/{attack}: the RUN ({attack_metrics['cacc']:.1f}/{attack_metrics['asr']:.1f}) "
                             f"is not the committed cell ({base['CACC %']:.1f}/{base['ASR %']:.1f})")
        budget = (bedkd.settings_for(method, bedkd.BUDGET) if family == "bedkd"
                  else settings_of(method, feature_defenses.BUDGET[family]))
        m = kdshield.defend(method, run=str(run), out=str(HERE / "work" / "redesign_check" / method),
                            overwrite=True, settings=budget, scaling=SCALING)
        same = (round(m["cacc"], 1), round(m["asr"], 1)) == (round(before["CACC %"], 1), round(before["ASR %"], 1))
        rows.append({"method": method, "dataset": dataset, "attack": attack, "committed in": f"{results}.md",
                     "committed CACC %": before["CACC %"], "committed ASR %": before["ASR %"],
                     "CACC % now": m["cacc"], "ASR % now": m["asr"], "same": "yes" if same else "NO",
                     "seconds now": m["seconds"]})
        store.write_text(json.dumps({"rows": rows}, indent=2))
        (RESULTS / "redesign_check.md").write_text(render(rows))
        print(render(rows), flush=True)


if __name__ == "__main__":
    main()
