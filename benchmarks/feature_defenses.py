"""MBTSAD's and RobustKD's tables on real data with MiniLM: No defense / TS-FT / MBTSAD /
RobustKD / plain feature KD, per dataset x attack, with seconds and peak memory per stage.

For every (dataset, attack) cell: backdoor MiniLM with ``kdshield attack`` (10% dirty-label,
target 1; the defender's clean data is the RUN's dev split, 10% of the training rows), then run
each defense through ``kdshield defend``. The TS-FT row is MBTSAD's first stage, evaluated on
its own (``metrics["ts_ft"]``), unless ``ts-ft`` is also asked for as a method. Results are
appended cell by cell to ``benchmarks/results/{tag}.json`` and rendered to ``{tag}.md``, so an
interrupted run keeps what it finished (re-running skips finished rows).

Targets (issue 5, from the papers): MBTSAD ASR <= 15% with CACC at most 2 points below the
backdoored model; RobustKD ASR <= 10% with CACC within 4 points of plain feature distillation
(which the RobustKD paper shows carries the backdoor over).

    python benchmarks/feature_defenses.py [--datasets rotten-tomatoes cr] [--attacks badnet addsent]
        [--methods mbtsad robustkd feature-kd] [--train-rows 3000] [--set mbtsad.distill_lr=1e-4 ...]
        [--smoke]   # one cell, a tiny budget: proves the pipeline, not the method
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

# Scaled-down budgets for a 2-core CPU machine; every value can be overridden with
# --set mbtsad.KEY=VALUE (also ts-ft) or --set robustkd.KEY=VALUE (also feature-kd).
BUDGET = {
    "mbtsad": {"copies": 3, "retrain_epochs": 3, "distill_epochs": 3, "batch_size": 16, "max_length": 96},
    "robustkd": {"mask_epochs": 40, "distill_epochs": 10, "batch_size": 32, "max_length": 64},
}
SMOKE = {
    "mbtsad": {"copies": 1, "retrain_epochs": 1, "distill_epochs": 1, "batch_size": 16, "max_length": 48,
               "n_c": 24},
    "robustkd": {"mask_epochs": 5, "distill_epochs": 1, "batch_size": 32, "max_length": 48, "n_c": 24},
}
# Rows that are a method with settings changed (the papers' ablations of what a miss may come
# from); "clean_share" is not a setting: the defender gets that share of the training rows as
# clean data (the RUN's dev split, 10%, plus corpus rows the victim never saw; _cells.defender_clean).
VARIANTS = {"robustkd-m0.1": ("robustkd", {"m": 0.1}),
            "robustkd-lf": ("robustkd", {"mask_ce_weight": 0.0}),
            "mbtsad-clean20": ("mbtsad", {"clean_share": 0.2}),
            # the paper trains its student from scratch; kdshield's default copies the teacher's kept blocks
            "robustkd-scratch": ("robustkd", {"student_init": "random"}),
            "robustkd-scratch-30ep": ("robustkd", {"student_init": "random", "distill_epochs": 30}),
            # the authors' student distils in training mode, against the teacher's maps taken in eval mode
            "mbtsad-eval": ("mbtsad", {"student_attention": "eval"})}
FAMILY = {"ts-ft": "mbtsad", "mbtsad": "mbtsad", "robustkd": "robustkd", "feature-kd": "robustkd",
          **{k: v[0] for k, v in VARIANTS.items()}}
LABELS = {"none": "No defense", "ts-ft": "TS-FT", "mbtsad": "MBTSAD", "robustkd": "RobustKD",
          "feature-kd": "plain feature KD", "mbtsad-eval": "MBTSAD, student in eval mode (maps as the teacher's)", "robustkd-m0.1": "RobustKD, m 0.1 (the paper's best)",
          "robustkd-lf": "RobustKD, mask loss Var only (no CE)", "mbtsad-clean20": "MBTSAD, 20% clean data (the paper's)",
          "robustkd-scratch": "RobustKD, student from scratch (the paper's)",
          "robustkd-scratch-30ep": "RobustKD, student from scratch, 30 distillation epochs"}


def _stages(m: dict) -> tuple[str, str]:
    secs = m.get("stage_seconds", {})
    peaks = m.get("stage_peak_rss_mb", {})
    return (", ".join(f"{k} {v:.0f}" for k, v in secs.items()),
            ", ".join(f"{k} {v:.0f}" for k, v in peaks.items()))


def row(dataset: str, attack: str, method: str, m: dict) -> dict:
    secs, peaks = _stages(m)
    out = {"dataset": dataset, "attack": attack, "method": LABELS[method], "key": method, "CACC %": m["cacc"],
           "ASR %": m.get("asr"), "seconds": m.get("seconds"), "stage seconds": secs, "stage peak RSS MB": peaks}
    if "compression" in m:
        out["compression"] = round(m["compression"], 3)
    if "mask" in m:  # last chosen layer's Var(F'): raw teacher / p at its initial value / trained mask
        v = m["mask"]
        out["last-layer Var"] = " / ".join(f"{v[k][-1]:.3f}" if k in v else "-"
                                           for k in ("var_before", "var_init", "var_after"))
    return out


def render(rows: list[dict], budget: dict, commands: list[str], smoke: bool) -> str:
    from kdshield.evaluation import markdown_table

    cols = ["dataset", "attack", "method", "CACC %", "ASR %", "compression", "last-layer Var", "seconds",
            "stage seconds", "stage peak RSS MB"]
    by_cell: dict[tuple, dict] = {}
    for r in rows:
        by_cell.setdefault((r["dataset"], r["attack"]), {})[r["key"]] = r
    verdicts = []
    for (ds, atk), cell in by_cell.items():
        base, mb, rk, fk = (cell.get(k) for k in ("none", "mbtsad", "robustkd", "feature-kd"))
        if base and mb:
            ok = mb["ASR %"] <= 15 and base["CACC %"] - mb["CACC %"] <= 2
            verdicts.append(f"- {ds} / {atk} MBTSAD: ASR {base['ASR %']:.1f} -> {mb['ASR %']:.1f}, CACC "
                            f"{base['CACC %']:.1f} -> {mb['CACC %']:.1f}: {'met' if ok else 'MISSED'}")
        if rk and fk:
            ok = rk["ASR %"] <= 10 and fk["CACC %"] - rk["CACC %"] <= 4
            verdicts.append(f"- {ds} / {atk} RobustKD: ASR {rk['ASR %']:.1f} (plain feature KD {fk['ASR %']:.1f}), "
                            f"CACC {rk['CACC %']:.1f} vs {fk['CACC %']:.1f}: {'met' if ok else 'MISSED'}")
    title = "# MBTSAD and RobustKD on real data (MiniLM-L6)"
    if smoke:
        title += " -- REDUCED SMOKE RUN (tiny budget: proves the pipeline runs, says nothing about the methods)"
    return (f"{title}\n\n" + "".join(f"`{c}`\n\n" for c in commands) + "Budgets: "
            f"`{json.dumps(budget)}`; poison rate 10% dirty-label, target label 1; the defender's clean data "
            "is the RUN's dev split. `stage seconds` / `stage peak RSS MB`: per stage (peak RSS of rank 0's Ray "
            "Train worker process; teacher caching and evaluation run in Ray Data actors and are timed, "
            "not measured for memory). `last-layer Var`: RobustKD's Var(F') of the last chosen teacher layer on "
            "the clean data, raw / with p at its initial value (the mean clean feature) / after the mask stage.\n\n"
            + markdown_table(rows, cols)
            + "\n\nTargets: MBTSAD ASR <= 15% with CACC drop <= 2 points; RobustKD ASR <= 10% with CACC within "
              "4 points of plain feature KD.\n\n" + "\n".join(verdicts) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["rotten-tomatoes", "cr"])
    ap.add_argument("--attacks", nargs="+", default=["badnet", "addsent"])
    ap.add_argument("--methods", nargs="+", default=["mbtsad", "robustkd", "feature-kd"],
                    choices=sorted(FAMILY))
    ap.add_argument("--train-rows", type=int, default=3000)
    ap.add_argument("--test-rows", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=3, help="attack (victim training) epochs")
    ap.add_argument("--set", action="append", default=[], metavar="FAMILY.KEY=VALUE")
    ap.add_argument("--smoke", action="store_true", help="one cell, tiny budget and data (a pipeline check)")
    ap.add_argument("--work", default=str(HERE / "work" / "feature_defenses"))
    ap.add_argument("--tag", default=None, help="results file name (default feature_defenses, or ..._smoke)")
    args = ap.parse_args()
    tag = args.tag or ("feature_defenses_smoke" if args.smoke else "feature_defenses")
    if args.smoke:
        args.datasets, args.attacks = args.datasets[:1], args.attacks[:1]

    from kdshield.config import parse_assignments
    from _cells import SCALING, cell, defender_clean, resume_results
    from kdshield.trainables.defend import DefendJob, run_defend

    budget = {k: dict(v) for k, v in (SMOKE if args.smoke else BUDGET).items()}
    for key, value in parse_assignments(args.set).items():
        family, _, name = key.partition(".")
        if family not in budget or not name:
            raise SystemExit(f"--set {key}: expected mbtsad.KEY=VALUE or robustkd.KEY=VALUE")
        budget[family][name] = value
    RESULTS.mkdir(exist_ok=True)
    store = RESULTS / f"{tag}.json"
    rows, commands = resume_results(store)
    done = {(r["dataset"], r["attack"], r["key"]) for r in rows}
    work = Path(args.work) / tag

    def save():
        store.write_text(json.dumps({"commands": commands, "budget": budget, "args": vars(args), "rows": rows},
                                    indent=2))
        (RESULTS / f"{tag}.md").write_text(render(rows, budget, commands, args.smoke))

    scaling = SCALING
    for dataset in args.datasets:
        for attack in args.attacks:
            run, metrics = cell(dataset, attack, train_rows=args.train_rows, test_rows=args.test_rows,
                                epochs=args.epochs)
            if (dataset, attack, "none") not in done:
                rows.append(row(dataset, attack, "none", metrics))
                save()
            for method in args.methods:
                if (dataset, attack, method) in done:
                    continue
                base, extra = VARIANTS.get(method, (method, {}))
                extra = dict(extra)
                share = extra.pop("clean_share", None)
                clean = None if share is None else str(defender_clean(
                    run, dataset, share, train_rows=args.train_rows, test_rows=args.test_rows))
                m = run_defend(DefendJob(method=base, run=str(run), clean=clean,
                                         out=str(work / dataset / attack / method), overwrite=True,
                                         params={**budget[FAMILY[method]], **extra}, scaling=scaling))
                if method == "mbtsad" and "ts_ft" in m and "ts-ft" not in args.methods \
                        and (dataset, attack, "ts-ft") not in done:
                    ts = {**m["ts_ft"], "seconds": m["stage_seconds"].get("ts_ft"),
                          "stage_seconds": {"ts_ft": m["stage_seconds"].get("ts_ft", 0.0)},
                          "stage_peak_rss_mb": {k: v for k, v in m.get("stage_peak_rss_mb", {}).items()
                                                if k == "ts_ft"}}
                    rows.append(row(dataset, attack, "ts-ft", ts))
                rows.append(row(dataset, attack, method, m))
                save()
                print(render(rows, budget, commands, args.smoke), flush=True)


if __name__ == "__main__":
    main()
