"""A real search per defense: ``kdshield tune`` on a development cell, judged against the truth.

For one method, on the development cell (default: Rotten Tomatoes, BadNet 10%, MiniLM-L6, the
3000/1000-row RUN the other defense benchmarks defend) and one unseen cell no search used
(default: CR, BadNet):

1. ``kdshield tune`` with the trigger-free ``defender`` objective (TPE + ASHA + shared stages),
   the packaged search space with the budget below fixed for every trial;
2. the paper defaults (the method's config defaults at the same budget) on the development
   cell, trained on the same clean subset the trials trained on;
3. the best trial by the objective (not by ASR) and the paper defaults re-run on the unseen cell;
   (every search here shares one stage cache, ``WORK/cache``: the defender probe's DMM on the
   development cell, identical for every method, trains once);
4. ``kdshield report`` of the search.

Written to ``benchmarks/results/search/<method>/``: ``summary.json`` (exactly the keys
``trials, objective, objective_rank_agreement, default, best, best_in_hindsight,
unseen_cell``), ``study.db`` (the Optuna study), ``report/`` (the report's tables, plots and
``best.yaml``), ``search.md`` / ``search.json`` (size, budget, commands, seconds, the trials).

    python benchmarks/search.py --method bedkd [--num-samples 16] [--set key=value ...]
    python benchmarks/search.py --method bedkd --objective canary   # -> results/search/bedkd-canary/

With ``--objective canary`` the trials defend the canaried suspect (the defender's own second
backdoor planted first); ``best`` is then its settings re-run on the real suspect of the
development cell, and every trial carries both trigger-free scores, so ``search.json`` gives the
rank agreement of each with the true ASR over the very same trials.

Every step is reused when its output exists (a cut-off run continues where it stopped).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
RESULTS = HERE / "results" / "search"

# What every trial (and both default runs) gets fixed, sized so that a 16-trial search fits in
# 75 minutes on a 2-core CPU machine (two trials at a time, one thread each). Settings the
# packaged space searches and the budget fixes are taken out of the search (``--set``).
BUDGETS = {
    # the DMM: one temperature and epoch count, so the two alphas make the only two DMM stages
    "bedkd": {"n_c_dmm": 80, "n_c": 80, "dmm_epochs": 20, "dmm_temperature": 1.5, "dmm_lr": 3e-5,
              "akd_cycles": 10, "batch_size": 16, "max_length": 64},
    # the teacher (a fine-tuned copy) at fixed settings: one teacher stage shared by every trial
    "nad": {"teacher_epochs": 5, "teacher_lr": 3e-5, "evaluate_teacher": False, "batch_size": 16, "max_length": 64},
    "robustkd": {"mask_epochs": 40, "batch_size": 32, "max_length": 64},
    "mbtsad": {"copies": 3, "retrain_epochs": 3, "batch_size": 16, "max_length": 64},
}
# Search settings beyond the defaults, per method. MBTSAD's distillation epoch takes ~3 min per trial
# here (720 token-split rows, attention maps of every layer): ASHA judges after one epoch, or 16 trials
# of up to 10 epochs would not fit the 75 minutes.
TUNE_ARGS = {"mbtsad": ["--grace-period", "1"],
             # W2S: an epoch of the SmolLM2 student takes ~130 s per trial here (two at a time, one thread
             # each), and with ASHA judging after two epochs two trials took 11-13 minutes
             "w2s": ["--grace-period", "1"]}
# W2SDefense's development cell is its own (benchmarks/w2s.py): SmolLM2-135M backdoored with the
# authors' sentence trigger, dirty-label, 1000 training rows (200 of them the defender's dev split),
# 400 test rows; its student is a LoRA adapter on the suspect, its teacher a MiniLM trained once
# (teacher knobs fixed: every trial shares it). The authors' loss weights for a sentence trigger.
BUDGETS["w2s"] = {"batch_size": 16, "max_length": 64, "teacher_epochs": 5, "teacher_batch_size": 32,
                  "teacher_lr": 5e-5, "weights": "sentence", "evaluate_teacher": False}
CELLS = {"w2s": ("rotten-tomatoes/w2s-sentence", "cr/w2s-sentence")}  # others: RT / CR BadNet, MiniLM
SUMMARY_KEYS = ("trials", "objective", "objective_rank_agreement", "default", "best", "best_in_hindsight",
                "unseen_cell")
SCALING = {"workers": 1, "cpus_per_worker": 2}  # the default and unseen-cell runs: one job alone


def kdshield(*args: str) -> None:
    env = dict(os.environ)
    env.setdefault("RAY_ADDRESS", "local")
    subprocess.run([sys.executable, "-m", "kdshield.cli", *args], check=True, env=env)


def outcome(metrics: dict) -> dict:
    return {"asr": metrics.get("asr"), "cacc": metrics.get("cacc"), "asr_no_trigger": metrics.get("asr_no_trigger")}


SCORES = {"defender": "defender_score", "canary": "canary_score"}


def trials(search: Path) -> list[dict]:
    """Every finished trial: sampled settings, its trigger-free scores and the truth (ASR, CACC,
    no-trigger ASR)."""
    rows = []
    for path in sorted((search / "trials").glob("*/result.json")):
        r = json.loads(path.read_text())
        m = json.loads((path.parent / "defend" / "metrics.json").read_text())
        rows.append({"trial_id": r["trial_id"], "sampled": r["sampled"], "params": r["params"],
                     **{k: r["report"][k] for k in SCORES.values() if k in r["report"]},
                     "seconds": r["report"]["trial_seconds"], **outcome(m)})
    return rows


def last_epoch_estimates(search: Path) -> list[dict]:
    """Every trial's last per-epoch report (stopped trials included): its trigger-free scores and the
    ASR estimated on a triggered sample of the test set (``--report-asr``)."""
    rows = []
    for path in sorted((search / "tune").glob("run_trial_*/result.json")):
        epochs = [r for r in map(json.loads, path.read_text().splitlines()) if r.get("final") == 0 and "asr" in r]
        if epochs:
            rows.append(epochs[-1])
    return rows


def build_cell(method: str, spec: str) -> Path:
    """The RUN of a ``DATASET/ATTACK`` cell: for w2s, SmolLM2 backdoored as benchmarks/w2s.py does it
    (the same directories, so either script reuses the other's RUNs); else the MiniLM cell."""
    from _cells import cell, corpus_subset

    dataset, attack = spec.split("/")
    if method != "w2s":
        return cell(dataset, attack, train_rows=3000, test_rows=1000, epochs=3)[0]
    from w2s import ATTACK, attack_run

    work = HERE / "work" / "w2s" / "1000-400"
    run = work / dataset / f"{attack}-dirty-0.1" / "run"
    attack_run(corpus_subset(work, dataset, 1000, 400), run, attack, "dirty", 0.1, 0.2, ATTACK)
    return run


def defend(method: str, run: Path, out: Path, params: dict, clean: Path | None = None) -> dict:
    from kdshield.trainables.defend import DefendJob, run_defend

    return run_defend(DefendJob(method=method, run=str(run), out=str(out), params=params, overwrite=False,
                                clean=str(clean) if clean else None, scaling=SCALING))


def main() -> None:
    from kdshield.config import parse_assignments
    from kdshield.evaluation.tune_report import spearman

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", required=True, choices=sorted(BUDGETS))
    ap.add_argument("--dev", help="DATASET/ATTACK of the development cell (default rotten-tomatoes/badnet; "
                                  "w2s: rotten-tomatoes/w2s-sentence)")
    ap.add_argument("--unseen", help="DATASET/ATTACK of the unseen cell (default cr/badnet; w2s: cr/w2s-sentence)")
    ap.add_argument("--objective", choices=sorted(SCORES), default="defender")
    ap.add_argument("--num-samples", type=int, default=16)
    ap.add_argument("--max-concurrent", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more fixed settings")
    ap.add_argument("--tune-arg", action="append", default=[], help="passed to kdshield tune as is")
    ap.add_argument("--work", default=str(HERE / "work" / "search"))
    args = ap.parse_args()

    cells = CELLS.get(args.method, ("rotten-tomatoes/badnet", "cr/badnet"))
    args.dev, args.unseen = args.dev or cells[0], args.unseen or cells[1]
    budget = {**BUDGETS[args.method], **parse_assignments(args.set)}
    name = args.method + ("" if args.objective == "defender" else f"-{args.objective}")
    work = Path(args.work) / name
    dest = RESULTS / name
    score = SCORES[args.objective]
    dest.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    runs = {}
    for which, spec in (("dev", args.dev), ("unseen", args.unseen)):
        runs[which] = build_cell(args.method, spec)
    search = work / "tune"
    command = ["tune", "--method", args.method, "--run", str(runs["dev"]), "--num-samples", str(args.num_samples),
               "--max-concurrent", str(args.max_concurrent), "--objective", args.objective, "--report-asr",
               "--out", str(search), "--cache", str(Path(args.work) / "cache"),
               *TUNE_ARGS.get(args.method, []), *args.tune_arg]
    for k, v in budget.items():
        command += ["--set", f"{k}={v}"]
    t0 = time.perf_counter()
    if not (search / "summary.json").is_file():
        kdshield(*command, *(["--resume"] if (search / "tune.json").is_file() else []))
    seconds["search"] = time.perf_counter() - t0
    rows, estimates = trials(search), last_epoch_estimates(search)
    if not rows:
        raise SystemExit(f"{search}: no finished trial")
    best = max(rows, key=lambda r: r[score])

    clean_train = search / "shared" / "clean_train.parquet"  # what the trials trained on
    t0 = time.perf_counter()
    default_dev = defend(args.method, runs["dev"], work / "default-dev", budget, clean_train)
    seconds["default_dev"] = time.perf_counter() - t0
    best_dev = {k: best[k] for k in ("asr", "cacc", "asr_no_trigger")}
    if args.objective == "canary":  # the trials defended the canaried suspect: the real one with the same settings
        t0 = time.perf_counter()
        best_dev = outcome(defend(args.method, runs["dev"], work / "best-dev", best["params"], clean_train))
        seconds["best_dev"] = time.perf_counter() - t0
    # from the trials' own truth (with --objective canary: the canaried suspect's, as the trials defended it)
    ok = [r for r in rows if r["cacc"] >= default_dev["cacc"] - 2.0] or rows
    hindsight = min(ok, key=lambda r: r["asr"])
    unseen = {}
    for which, params in (("default", budget), ("tuned", best["params"])):
        t0 = time.perf_counter()
        unseen[which] = defend(args.method, runs["unseen"], work / f"{which}-unseen", params)
        seconds[f"{which}_unseen"] = time.perf_counter() - t0

    summary = {
        "trials": len(rows),
        "objective": args.objective,
        "objective_rank_agreement": spearman([r[score] for r in rows], [-r["asr"] for r in rows]),
        "default": outcome(default_dev),
        "best": best_dev,
        "best_in_hindsight": {k: hindsight[k] for k in ("asr", "cacc", "asr_no_trigger")},
        "unseen_cell": {"cell": args.unseen, **{n: {"asr": m["asr"], "cacc": m["cacc"]} for n, m in unseen.items()}},
    }
    assert tuple(summary) == SUMMARY_KEYS
    (dest / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    shutil.copy2(search / "study.db", dest / "study.db")
    kdshield("report", str(search), "--out", str(dest / "report"))
    size = {"dev_cell": (f"{args.dev}: SmolLM2-135M, 1000 training rows (10% poisoned, dirty-label, target 1), "
                         "400 test rows, attack 2 epochs; the defender's clean data is the RUN's dev split (200 "
                         "rows)" if args.method == "w2s" else
                         f"{args.dev}: MiniLM-L6, 3000 training rows (10% poisoned, target 1), 1000 test rows, "
                         "attack 3 epochs; the defender's clean data is the RUN's dev split (300 rows)")
                        + ", 80% of it for training and 20% held out for the objective",
            "budget": budget, "num_samples": args.num_samples, "max_concurrent": args.max_concurrent,
            "machine": f"{os.cpu_count()} CPUs, one thread per trial"}
    record = {"command": " ".join(["python", "benchmarks/search.py", *sys.argv[1:]]),
              "tune_command": "kdshield " + " ".join(command), **size, "seconds": seconds,
              "best_trial": best["trial_id"], "best_params": best["params"],
              "rank_agreement": {k: spearman([r.get(k, float("nan")) for r in rows], [-r["asr"] for r in rows])
                                 for k in SCORES.values()},
              "rank_agreement_every_trial_last_epoch": {
                  k: spearman([r.get(k, float("nan")) for r in estimates], [-r["asr"] for r in estimates])
                  for k in SCORES.values()},
              "trials_with_estimates": len(estimates),
              "hindsight_trial": hindsight["trial_id"], "trials": rows,
              "unseen": {n: outcome(m) for n, m in unseen.items()}}
    (dest / "search.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    (dest / "search.md").write_text(render(name, summary, record))
    print((dest / "search.md").read_text())


def render(name: str, summary: dict, record: dict) -> str:
    def row(name, m):
        nt = m.get("asr_no_trigger")
        return f"| {name} | {m['asr']:.1f} | {m['cacc']:.1f} | {'-' if nt is None else f'{nt:.1f}'} |"

    s = summary
    lines = [f"# Search: {name} on {record['dev_cell'].split(':')[0]}", "", f"`{record['command']}`", "",
             f"- development cell: {record['dev_cell']}",
             f"- budget (fixed for every trial and both default runs): `{json.dumps(record['budget'])}`",
             f"- {record['num_samples']} trials, {record['max_concurrent']} at a time ({record['machine']}); "
             f"{s['trials']} finished (the rest stopped by ASHA); search {record['seconds']['search'] / 60:.1f} min",
             f"- objective: {s['objective']}; Spearman with -ASR over the finished trials: "
             + ", ".join(f"{k} {v:.3f}" for k, v in record["rank_agreement"].items() if v == v)
             + (" (the trials defended the canaried suspect; their ASR is the real backdoor's in it)"
                if s["objective"] == "canary" else ""),
             f"- every trial at its last epoch report ({record['trials_with_estimates']} trials, ASR estimated on a "
             "triggered sample of the test set): "
             + (", ".join(f"{k} {v:.3f}" for k, v in record["rank_agreement_every_trial_last_epoch"].items() if v == v)
                or "not measured (the search ran without --report-asr)"), "",
             "| development cell | ASR % | CACC % | no-trigger ASR % |", "|---|---|---|---|",
             row("paper defaults", s["default"]), row("best by the objective", s["best"]),
             row("best in hindsight (lowest ASR, CACC drop <= 2)", s["best_in_hindsight"]), "",
             f"| unseen cell ({s['unseen_cell']['cell']}) | ASR % | CACC % | no-trigger ASR % |", "|---|---|---|---|",
             row("paper defaults", record["unseen"]["default"]), row("tuned (best by the objective)",
                                                                     record["unseen"]["tuned"]), "",
             f"Best trial `{record['best_trial']}`: `{json.dumps(record['best_params'])}`", "",
             "| trial | defender score | canary score | ASR % | CACC % | no-trigger ASR % | seconds |",
             "|---|---|---|---|---|---|---|"]
    key = SCORES[s["objective"]]
    for r in sorted(record["trials"], key=lambda r: -r[key]):
        canary = r.get("canary_score")
        lines.append(f"| {r['trial_id']} | {r['defender_score']:.1f} | {'-' if canary is None else f'{canary:.1f}'} | "
                     f"{r['asr']:.1f} | {r['cacc']:.1f} | {r['asr_no_trigger']:.1f} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
