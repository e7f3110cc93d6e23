"""BeDKD's Table 1/2 shape on real data with MiniLM: No defense / FT / KD / BeDKD.

For every (dataset, attack) cell: backdoor MiniLM with ``kdshield attack`` (10% dirty-label,
target 1), then run each defense with the same budget through ``kdshield defend``. Results are
appended cell by cell to ``benchmarks/results/bedkd.json`` and rendered to ``bedkd.md``, so an
interrupted run keeps what it finished (re-running skips finished rows).

Target (issue 3): BeDKD brings ASR from >= 90% to <= 5% with CACC at most 2 points below the
backdoored model.

    python benchmarks/bedkd.py [--datasets rotten-tomatoes cr r8] [--attacks badnet addsent]
                               [--methods ft kd bedkd] [--train-rows 3000] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

# Scaled-down budget for a 2-core CPU machine (the authors': n_c 320/class, 50 AKD cycles,
# DMM 80/class x 20 epochs); every value can be overridden with --set.
BUDGET = {"n_c_dmm": 80, "n_c": 80, "n_p": 32, "dmm_epochs": 20, "akd_cycles": 10, "punish_passes": 5,
          "batch_size": 16, "max_length": 64}
# Method rows that are BeDKD with one setting changed (the bounded/unbounded punish comparison).
# `bedkd-30c`: three times the AKD cycles, to see whether a cell's remaining ASR is the budget's.
# `bedkd-np160-1pass`: five times the punished samples in one pass each, i.e. the same number of
# punish steps as the default (32 x 5 passes), to see whether the punished share limits unlearning;
# `-nc150` adds a trust set of 150 clean rows per class (default 80), to see whether more trust
# distillation wins back the clean accuracy the larger punished set costs.
# `bedkd-m2`: the bounded punish hinges at twice the distance (punish_margin 2: CE and KL up to
# 2 log C), to test whether the bound's early saturation on binary cells leaves the ASR behind.
VARIANTS = {"bedkd-unbounded": ("bedkd", {"punish": "unbounded"}),
            "bedkd-1pass": ("bedkd", {"punish_passes": 1}),
            "bedkd-30c": ("bedkd", {"akd_cycles": 30}),
            "bedkd-np160-1pass": ("bedkd", {"n_p": 160, "punish_passes": 1}),
            "bedkd-np160-1pass-nc150": ("bedkd", {"n_p": 160, "punish_passes": 1, "n_c": 150}),
            "bedkd-m2": ("bedkd", {"punish_margin": 2.0})}


# ft and kd get the AKD share of the budget under their own names, so the rows compare one budget
BASELINE_NAMES = {"n_c": "n_c", "akd_cycles": "epochs", "akd_lr": "lr", "batch_size": "batch_size",
                  "max_length": "max_length", "seed": "seed"}
KD_NAMES = {**BASELINE_NAMES, "lam": "lam", "akd_temperature": "temperature"}


def settings_for(method: str, budget: dict) -> dict:
    """The budget (BeDKD's settings) in ``method``'s own settings: ft and kd train like AKD."""
    names = {"ft": BASELINE_NAMES, "kd": KD_NAMES}.get(method)
    return dict(budget) if names is None else {names[k]: v for k, v in budget.items() if k in names}


def punish_activity(metrics: dict) -> str | None:
    """The share (%) of the punish loss's hinge terms still below their bound in the first, third
    and last AKD cycle, "a/b/c": where it reaches ~0 the punished samples are past the bound and
    the remaining cycles are trust distillation only (None: no bounded punish stage)."""
    active = [e["punish/active"] for e in metrics.get("history", {}).get("akd", []) if "punish/active" in e]
    if not active:
        return None
    return "/".join(f"{100 * a:.1f}" for a in (active[0], active[min(2, len(active) - 1)], active[-1]))


def render(rows: list[dict], budget: dict, commands: list[str]) -> str:
    from kdshield.evaluation import markdown_table

    cols = ["dataset", "attack", "method", "CACC %", "ASR %", "no-trigger ASR %", "FAR %", "FRR %", "identified", "precision %",
            "prec. smallest %", "prec. random %", "punish active % (cycle 1/3/last)", "seconds"]
    verdicts = []
    by_cell: dict[tuple, dict] = {}
    for r in rows:
        by_cell.setdefault((r["dataset"], r["attack"]), {})[r["method"]] = r
    for (ds, atk), cell in by_cell.items():
        base, ours = cell.get("none"), cell.get("bedkd")
        if base and base["ASR %"] < 90:  # the target presumes a backdoor at >= 90% to start from
            verdicts.append(f"- {ds} / {atk}: the attack implanted its backdoor only to ASR {base['ASR %']:.1f} (< 90)"
                            + (f"; BeDKD {ours['ASR %']:.1f} at CACC {ours['CACC %']:.1f} (from {base['CACC %']:.1f})"
                               if ours else "") + "; not a test of the target: see results/attack_fit.md")
        elif base and ours:
            ok = base["ASR %"] >= 90 and ours["ASR %"] <= 5 and base["CACC %"] - ours["CACC %"] <= 2
            verdicts.append(f"- {ds} / {atk}: ASR {base['ASR %']:.1f} -> {ours['ASR %']:.1f}, CACC "
                            f"{base['CACC %']:.1f} -> {ours['CACC %']:.1f}: {'met' if ok else 'MISSED'}"
                            + (f" (the same rows without the trigger: {ours['no-trigger ASR %']:.1f})"
                               if ours.get("no-trigger ASR %") is not None else ""))
    return ("# BeDKD on real data (MiniLM-L6): No defense / FT / KD / BeDKD\n\n"
            + "".join(f"`{c}`\n\n" for c in commands)
            + f"Defense budget (all methods): "
            f"`{json.dumps(budget)}`; poison rate 10% dirty-label, target label 1; FAR/FRR are the MEPD "
            "threshold's errors on the whole suspect training set, `identified` the samples kept for "
            "punishment (at most n_p) and `precision` the share of them that were really poisoned "
            "(selection `confident`, the default; the `prec.` columns: what the `smallest` MEPD and a "
            "`random` draw would have kept); `punish active` the share of the bounded punish loss's "
            "hinge terms not yet past their bound (0: the punished samples no longer pull); `no-trigger ASR` "
            "the ASR rows without their trigger predicted as the target (rows from before the column: "
            "`results/class_recall_*.md`). Variants: " + ", ".join(
                f"`{k}` = bedkd with `{json.dumps(v[1])}`" for k, v in VARIANTS.items()) + ".\n\n"
            + markdown_table(rows, cols) + "\n\nTarget: ASR >= 90% before, <= 5% after, CACC drop <= 2 points.\n\n"
            + "\n".join(verdicts) + "\n")


def main() -> None:
    from _cells import ATTACK_LR, SCALING, cell, resume_results

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["rotten-tomatoes", "cr", "r8"])
    ap.add_argument("--attacks", nargs="+", default=["badnet", "addsent"])
    ap.add_argument("--methods", nargs="+", default=["ft", "kd", "bedkd"])
    ap.add_argument("--train-rows", type=int, default=3000)
    ap.add_argument("--test-rows", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=3, help="attack training epochs")
    ap.add_argument("--attack-lr", type=float, default=ATTACK_LR, help="attack learning rate")
    ap.add_argument("--max-words", type=int, default=None,
                    help="cut every text to its first N words (rows then name the dataset DATASET-wN)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--work", default=str(HERE / "work" / "bedkd"))
    ap.add_argument("--tag", default="bedkd", help="results file name")
    args = ap.parse_args()

    from kdshield.config import parse_assignments
    from kdshield.trainables.defend import DefendJob, run_defend

    budget = {**BUDGET, **parse_assignments(args.set)}
    RESULTS.mkdir(exist_ok=True)
    store = RESULTS / f"{args.tag}.json"
    rows, commands = resume_results(store)
    done = {(r["dataset"], r["attack"], r["method"]) for r in rows}
    work = Path(args.work)
    for r in rows:  # rows from before the column: read it from the defense's output if still there
        saved = work / r["dataset"] / r["attack"] / r["method"] / "metrics.json"
        if r["method"] != "none" and r.get("punish active % (cycle 1/3/last)") is None and saved.is_file():
            r["punish active % (cycle 1/3/last)"] = punish_activity(json.loads(saved.read_text()))

    def save():
        store.write_text(json.dumps({"commands": commands, "budget": budget, "args": vars(args), "rows": rows},
                                    indent=2))
        (RESULTS / f"{args.tag}.md").write_text(render(rows, budget, commands))

    for source in args.datasets:
        dataset = source if args.max_words is None else f"{source}-w{args.max_words}"
        for attack in args.attacks:
            run, metrics = cell(source, attack, train_rows=args.train_rows, test_rows=args.test_rows,
                                epochs=args.epochs, max_words=args.max_words, lr=args.attack_lr)
            if (dataset, attack, "none") not in done:
                rows.append({"dataset": dataset, "attack": attack, "method": "none", "CACC %": metrics["cacc"],
                             "ASR %": metrics["asr"], "no-trigger ASR %": metrics.get("asr_no_trigger"),
                             "seconds": metrics["seconds"]})
                save()
            for method in args.methods:
                if (dataset, attack, method) in done:
                    continue
                base, extra = VARIANTS.get(method, (method, {}))
                m = run_defend(DefendJob(method=base, run=str(run), out=str(work / dataset / attack / method),
                                         overwrite=True, params=settings_for(base, {**budget, **extra}),
                                         scaling=SCALING))
                rows.append({"dataset": dataset, "attack": attack, "method": method, "CACC %": m["cacc"],
                             "ASR %": m["asr"], "no-trigger ASR %": m.get("asr_no_trigger"), "FAR %": m.get("far"), "FRR %": m.get("frr"),
                             "identified": m.get("n_identified"), "precision %": m.get("identified_precision"),
                             "prec. smallest %": m.get("precision_smallest"), "prec. random %": m.get("precision_random"),
                             "punish active % (cycle 1/3/last)": punish_activity(m), "seconds": m["seconds"]})
                save()
                print(render(rows, budget, commands), flush=True)


if __name__ == "__main__":
    main()
