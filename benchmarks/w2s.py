"""W2SDefense's table on real data with SmolLM2-135M (LLaMA architecture): No defense / LoRA-FT /
W2SDefense (joint projection, the default) / W2SDefense with the fitted projection, per dataset x
trigger, with ASR, CACC, seconds and peak memory.

For every (dataset, trigger) cell: a seeded subset of the corpus; ``kdshield attack`` backdoors
``smollm2-135m`` by full-parameter fine-tuning with one of the authors' triggers (``w2s-word``:
"mn", ``w2s-sentence``: "I watched this 3D movie"), clean-label (the authors') or dirty-label
(``--label-mode``); the defender's clean data is the RUN's dev split (``--dev-fraction`` of the
training rows). Then every method runs through ``kdshield defend`` with one budget (``BUDGET``;
the W2S loss weights are the authors' for the trigger kind unless overridden). Results are
appended row by row to ``benchmarks/results/{tag}.json`` and rendered to ``{tag}.md``; an
interrupted run keeps what it finished and re-running skips finished rows.

Target (issue 4): W2SDefense ASR <= 10% with CACC within 1 point of LoRA-FT; LoRA-FT's ASR stays high.

    python benchmarks/w2s.py [--datasets rotten-tomatoes cr] [--triggers w2s-word w2s-sentence]
        [--methods lora-ft w2s w2s-fitted w2s-fa] [--label-mode dirty|clean] [--train-rows 1000]
        [--set gamma=1.0 ...] [--tag w2s]
        [--smoke]   # one cell, a tiny budget: proves the pipeline, not the method
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

SCALING = {"workers": 1, "cpus_per_worker": 2}
# Scaled-down budget for a 2-core CPU machine (the authors': 5 student epochs over all of SST-2 at
# batch 32, r = 512 on Llama-3-8B); LoRA rank: W2SConfig's scaled default (64 for SmolLM2's 576).
BUDGET = {"epochs": 3, "lr": 2e-4, "batch_size": 16, "max_length": 64, "teacher_epochs": 5,
          "teacher_batch_size": 32, "teacher_lr": 5e-5}
ATTACK = {"epochs": 2, "lr": 3e-5, "batch_size": 16, "max_length": 64}
SMOKE_BUDGET = {"epochs": 1, "batch_size": 8, "max_length": 24, "teacher_epochs": 1, "teacher_batch_size": 16}
SMOKE_ATTACK = {"epochs": 1, "lr": 3e-5, "batch_size": 8, "max_length": 24}
VARIANTS = {"w2s-fitted": ("w2s", {"projection": "fitted"}),
            # the authors' gamma = 0.001 weighs a feature MSE of ~3 (SmolLM2's pooled features) at 0.3% of
            # 5 CE: with a budget of a few hundred steps the alignment may do nothing; this row weighs it as CE
            "w2s-fa": ("w2s", {"alpha": 1.0, "beta": 1.0, "gamma": 1.0})}
WEIGHTS = {"w2s-word": "word", "w2s-sentence": "sentence"}
LABELS = {"none": "No defense", "lora-ft": "LoRA-FT", "w2s": "W2SDefense", "w2s-fitted": "W2SDefense (fitted g)",
          "w2s-fa": "W2SDefense (1/1/1 weights)"}


def attack_run(data: Path, run: Path, trigger: str, label_mode: str, poison_rate: float, dev_fraction: float,
               training: dict) -> dict:
    from kdshield.trainables.attack import AttackJob, run_attack

    return run_attack(AttackJob(
        train=str(data / "train.parquet"), test=str(data / "test.parquet"), model="smollm2-135m", out=str(run),
        trigger_preset=trigger, clean_label=label_mode == "clean", poison_rate=poison_rate, target_label=1,
        dev_fraction=dev_fraction, training=training, scaling=SCALING))


def _peak(m: dict) -> float | None:
    """The largest per-worker RSS of any stage (MB)."""
    peaks = [v for stage in m.get("stage_memory_mb", {}).values() for v in stage.get("peak_rss_mb_per_rank", [])
             if v is not None]
    return round(max(peaks)) if peaks else None


def _history_peak(m: dict) -> float | None:
    """The attack's training peak (its metrics carry the engine's per-epoch history)."""
    hist = m.get("history")
    peaks = [h.get("peak_rss_mb") for h in hist if h.get("peak_rss_mb")] if isinstance(hist, list) else []
    return round(max(peaks)) if peaks else None


def row(dataset: str, trigger: str, mode: str, method: str, m: dict) -> dict:
    teacher = m.get("teacher", {})
    out = {"dataset": dataset, "trigger": trigger, "labels": mode, "method": LABELS[method], "key": method,
           "CACC %": m["cacc"], "ASR %": m.get("asr"), "seconds": round(m.get("seconds", 0)),
           "peak RSS MB": _peak(m) or _history_peak(m)}
    if teacher:
        out["teacher CACC %"], out["teacher ASR %"] = teacher.get("cacc"), teacher.get("asr")
    if m.get("stage_seconds"):
        out["stage seconds"] = ", ".join(f"{k} {v:.0f}" for k, v in m["stage_seconds"].items())
    return out


def render(rows: list[dict], meta: dict) -> str:
    from kdshield.evaluation import markdown_table

    cols = ["dataset", "trigger", "labels", "method", "CACC %", "ASR %", "teacher CACC %", "teacher ASR %",
            "seconds", "stage seconds", "peak RSS MB"]
    verdicts = []
    cells: dict[tuple, dict] = {}
    for r in rows:
        cells.setdefault((r["dataset"], r["trigger"], r["labels"]), {})[r["key"]] = r
    for (ds, trig, mode), cell in cells.items():
        base, lora = cell.get("none"), cell.get("lora-ft")
        for key, ours in cell.items():
            if not (lora and key.startswith("w2s")):
                continue
            ok = ours["ASR %"] <= 10 and abs(lora["CACC %"] - ours["CACC %"]) <= 1 and lora["ASR %"] >= 50
            verdicts.append(f"- {ds} / {trig} ({mode}-label), {LABELS[key]}: ASR "
                            f"{base['ASR %'] if base else float('nan'):.1f} (backdoored) -> LoRA-FT {lora['ASR %']:.1f} "
                            f"/ {ours['ASR %']:.1f}; CACC LoRA-FT {lora['CACC %']:.1f} vs {ours['CACC %']:.1f}: "
                            f"{'met' if ok else 'MISSED'}")
    return ("# W2SDefense on real data (SmolLM2-135M student, MiniLM-L6 teacher)\n\n"
            + "".join(f"`{c}`\n\n" for c in meta["commands"])
            + f"Budget: attack `{json.dumps(meta['attack'])}` "
            f"(full-parameter fine-tuning, poison rate {meta['poison_rate']}, target label 1); defenses "
            f"`{json.dumps(meta['budget'])}` on the RUN's dev split ({meta['dev_fraction']:.0%} of "
            f"{meta['train_rows']} training rows), LoRA r/alpha/dropout W2SConfig's defaults (r 64, alpha 64, "
            "dropout 0.1 on q_proj, v_proj + head); W2S loss weights: the authors' for the trigger kind "
            "(word 5/0.001/0.001, sentence 3/0.01/0.001) unless set in the budget. `seconds`: the whole "
            "defend job on a shared 2-core CPU machine, 1 worker x 2 CPUs (upper bounds); peak RSS: the "
            "largest worker process.\n\n"
            + markdown_table(rows, cols)
            + "\n\nTarget: W2SDefense ASR <= 10% with CACC within 1 point of LoRA-FT; LoRA-FT ASR stays high.\n\n"
            + "\n".join(verdicts) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["rotten-tomatoes"])
    ap.add_argument("--triggers", nargs="+", default=["w2s-word", "w2s-sentence"], choices=sorted(WEIGHTS))
    ap.add_argument("--methods", nargs="+", default=["lora-ft", "w2s", "w2s-fitted"])
    ap.add_argument("--label-mode", choices=["clean", "dirty"], default="dirty")
    ap.add_argument("--poison-rate", type=float, default=0.1)
    ap.add_argument("--train-rows", type=int, default=1000)
    ap.add_argument("--test-rows", type=int, default=400)
    ap.add_argument("--dev-fraction", type=float, default=0.2)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a defense setting")
    ap.add_argument("--attack-set", action="append", default=[], metavar="KEY=VALUE", help="an attack training setting")
    ap.add_argument("--smoke", action="store_true", help="one cell, a tiny budget (pipeline check)")
    ap.add_argument("--work", default=str(HERE / "work" / "w2s"))
    ap.add_argument("--tag", default=None, help="results file name (default w2s, or w2s_smoke)")
    args = ap.parse_args()

    import sys

    sys.path.insert(0, str(HERE))
    from _cells import corpus_subset, resume_results, settings_of

    from kdshield.config import parse_assignments
    from kdshield.trainables.defend import DefendJob, run_defend

    if args.smoke:
        args.datasets, args.triggers = args.datasets[:1], args.triggers[:1]
        args.train_rows, args.test_rows = min(args.train_rows, 120), min(args.test_rows, 40)
    tag = args.tag or ("w2s_smoke" if args.smoke else "w2s")
    budget = {**BUDGET, **(SMOKE_BUDGET if args.smoke else {}), **parse_assignments(args.set)}
    attack = {**(SMOKE_ATTACK if args.smoke else ATTACK), **parse_assignments(args.attack_set)}
    meta = {"budget": budget, "attack": attack,
            "poison_rate": args.poison_rate, "dev_fraction": args.dev_fraction, "train_rows": args.train_rows}
    RESULTS.mkdir(exist_ok=True)
    store = RESULTS / f"{tag}.json"
    rows, meta["commands"] = resume_results(store)
    done = {(r["dataset"], r["trigger"], r["labels"], r["key"]) for r in rows}
    work = Path(args.work) / ("smoke" if args.smoke else f"{args.train_rows}-{args.test_rows}")

    def save():
        store.write_text(json.dumps({**meta, "args": vars(args), "rows": rows}, indent=2))
        (RESULTS / f"{tag}.md").write_text(render(rows, meta))

    for dataset in args.datasets:
        data = corpus_subset(work, dataset, args.train_rows, args.test_rows)
        for trigger in args.triggers:
            cell = work / dataset / f"{trigger}-{args.label_mode}-{args.poison_rate}"
            t0 = time.perf_counter()
            m = attack_run(data, cell / "run", trigger, args.label_mode, args.poison_rate, args.dev_fraction, attack)
            if (dataset, trigger, args.label_mode, "none") not in done:
                m.setdefault("seconds", time.perf_counter() - t0)
                rows.append(row(dataset, trigger, args.label_mode, "none", m))
                save()
            for method in args.methods:
                if (dataset, trigger, args.label_mode, method) in done:
                    continue
                base, extra = VARIANTS.get(method, (method, {}))
                params = {**budget, **extra}
                if base == "w2s":
                    params.setdefault("weights", WEIGHTS[trigger])
                m = run_defend(DefendJob(method=base, run=str(cell / "run"), out=str(cell / method), overwrite=True,
                                         params=settings_of(base, params), scaling=SCALING))
                rows.append(row(dataset, trigger, args.label_mode, method, m))
                save()
                print(render(rows, meta), flush=True)


if __name__ == "__main__":
    main()
