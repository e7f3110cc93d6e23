"""Backdoor implantation on real data: BadNet into MiniLM on Rotten Tomatoes.

Trains the same model twice through the same engine, once on the clean training set and once
through ``kdshield attack`` (10% dirty-label BadNet poisoning), and reports CACC and ASR of both.
Target (issue 2): the backdoored model reaches ASR >= 90% with CACC within 2 points of clean.

    python benchmarks/attack.py [--train-rows N] [--epochs E]   # writes benchmarks/results/attack.{json,md}
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-rows", type=int, default=4000, help="training subset size (0: all)")
    ap.add_argument("--test-rows", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--work", default=str(HERE / "work" / "attack"))
    args = ap.parse_args()

    from kdshield.cluster import connect
    from kdshield.config import ScalingSettings, TrainSettings
    from kdshield.datasets import build_corpus, read_table, write_table
    from kdshield.defenses.losses import CrossEntropy
    from kdshield.demo import subset
    from kdshield.evaluation import markdown_table
    from kdshield.models import load_tokenizer, resolve_model
    from kdshield.trainables.attack import AttackJob, run_attack, tokenized_stream
    from kdshield.trainables.engine import run_stage
    from kdshield.trainables.inference import evaluate
    from kdshield.defenses.stage import ModelSpec, Phase, Stage

    work = Path(args.work)
    build_corpus("rotten-tomatoes", work / "corpus", seed=0)
    train, test = read_table(work / "corpus/train.parquet"), read_table(work / "corpus/test.parquet")
    if args.train_rows:
        train = subset(train, args.train_rows, seed=0)
    test = subset(test, args.test_rows, seed=0)
    write_table(train, work / "data/train.parquet")
    write_table(test, work / "data/test.parquet")
    training = TrainSettings(epochs=args.epochs, lr=5e-5, batch_size=32, max_length=64)
    scaling = ScalingSettings(workers=1, cpus_per_worker=2)

    job = AttackJob(train=str(work / "data/train.parquet"), test=str(work / "data/test.parquet"), model="minilm",
                    out=str(work / "run"), attack="badnet", poison_rate=0.1, target_label=1, overwrite=True,
                    training=training, scaling=scaling)
    backdoored = run_attack(job)

    # The same model, engine and settings on the clean training split of the same run.
    run = Path(job.out)
    model_dir = resolve_model("minilm")
    tok = load_tokenizer(model_dir)
    connect()
    clean_train = read_table(run / "data/train.parquet")
    clean_train = clean_train.filter(clean_train.column("poisoned").to_numpy(zero_copy_only=False) == False)  # noqa: E712
    stage = Stage(name="clean", model=ModelSpec(source=str(model_dir), num_labels=2),
                  phases=(Phase("train", CrossEntropy()),), train=training,
                  pad_ids={"input_ids": tok.pad_token_id})
    t0 = time.perf_counter()
    result = run_stage(stage, {"train": tokenized_stream(clean_train, model_dir, training.max_length)}, scaling,
                       storage=work / "ray-clean")
    clean = evaluate(str(result.model_dir), 2,
                     clean_test=tokenized_stream(read_table(run / "data/test.parquet"), model_dir, training.max_length),
                     triggered_test=tokenized_stream(read_table(run / "data/test_triggered.parquet"), model_dir,
                                                     training.max_length),
                     target_label=1, pad_ids={"input_ids": tok.pad_token_id})
    clean["seconds"] = time.perf_counter() - t0

    rows = [
        {"model": "MiniLM, clean training", "train rows": clean_train.num_rows, "CACC %": clean["cacc"],
         "ASR %": clean["asr"], "seconds": clean["seconds"]},
        {"model": "MiniLM, BadNet 10% dirty-label",
         "train rows": json.loads((run / "attack.json").read_text())["rows"]["train"],
         "CACC %": backdoored["cacc"], "ASR %": backdoored["asr"], "seconds": backdoored["seconds"]},
    ]
    gap = clean["cacc"] - backdoored["cacc"]
    verdict = (f"ASR {backdoored['asr']:.1f}% (target >= 90%), CACC gap {gap:+.1f} points (target <= 2): "
               + ("met" if backdoored["asr"] >= 90 and gap <= 2 else "MISSED"))
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "attack.json").write_text(json.dumps({"args": vars(args), "clean": clean, "backdoored": {
        k: v for k, v in backdoored.items() if k != "config"}, "verdict": verdict}, indent=2, default=str))
    table = markdown_table(rows)
    (out / "attack.md").write_text(
        "# Backdoor implantation: Rotten Tomatoes, MiniLM-L6, BadNet trigger\n\n"
        f"`python benchmarks/attack.py --train-rows {args.train_rows} --epochs {args.epochs}` "
        f"(test subset {args.test_rows} rows; 1 Ray Train worker x 2 CPUs, DeepSpeed ZeRO-0, fp32)\n\n"
        f"{table}\n\n{verdict}\n")
    print(table)
    print(verdict)


if __name__ == "__main__":
    main()
