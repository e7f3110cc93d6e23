"""Training throughput: kdshield's engine (Ray Train + DeepSpeed) against a bare PyTorch loop.

Both train the packaged MiniLM on the same Rotten Tomatoes samples with the same batch size,
sequence length, dynamic padding, optimiser and thread count (2, the machine's cores), in one
run of this script. Reported: steady-state samples/s (epochs after the first) and the ratio.
Target (issue 2): engine >= 0.85x the bare loop.

    python benchmarks/throughput.py [--rows 1024] [--epochs 3]   # writes benchmarks/results/throughput.{json,md}
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def bare_loop(model_dir: str, texts: list[str], labels: np.ndarray, *, epochs: int, batch_size: int,
              max_length: int, lr: float, threads: int) -> list[float]:
    """Samples/s of each epoch of a plain single-process PyTorch training loop."""
    import torch

    from kdshield.models import load_classifier

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, tok = load_classifier(model_dir, 2)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)  # as the engine
    ids = tok(texts, truncation=True, max_length=max_length)["input_ids"]
    rates = []
    rng = np.random.default_rng(0)
    for _ in range(epochs):
        order = rng.permutation(len(ids))
        t0 = time.perf_counter()
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            enc = tok.pad({"input_ids": [ids[i] for i in rows]}, return_tensors="pt")
            out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
            loss = torch.nn.functional.cross_entropy(out.logits, torch.as_tensor(labels[rows]))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        rates.append(len(order) / (time.perf_counter() - t0))
        print(f"bare loop epoch: {rates[-1]:.1f} samples/s", flush=True)
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=48)
    ap.add_argument("--work", default=str(HERE / "work" / "throughput"))
    args = ap.parse_args()

    from kdshield.cluster import connect
    from kdshield.config import ScalingSettings, TrainSettings
    from kdshield.datasets import build_corpus, read_table
    from kdshield.defenses.losses import CrossEntropy
    from kdshield.demo import subset
    from kdshield.evaluation import markdown_table
    from kdshield.models import load_tokenizer, resolve_model
    from kdshield.trainables.attack import tokenized_stream
    from kdshield.trainables.engine import run_stage
    from kdshield.defenses.stage import ModelSpec, Phase, Stage

    work = Path(args.work)
    build_corpus("rotten-tomatoes", work / "corpus", seed=0)
    table = subset(read_table(work / "corpus/train.parquet"), args.rows, seed=0)
    model_dir = resolve_model("minilm")
    threads = 2
    lr = 5e-5

    bare = bare_loop(model_dir, table.column("text").to_pylist(), table.column("label").to_numpy(),
                     epochs=args.epochs, batch_size=args.batch_size, max_length=args.max_length, lr=lr,
                     threads=threads)

    connect()
    tok = load_tokenizer(model_dir)
    stage = Stage(name="throughput", model=ModelSpec(source=str(model_dir), num_labels=2),
                  phases=(Phase("train", CrossEntropy()),),
                  train=TrainSettings(epochs=args.epochs, lr=lr, batch_size=args.batch_size,
                                      max_length=args.max_length, warmup_ratio=0.0),
                  pad_ids={"input_ids": tok.pad_token_id})
    t0 = time.perf_counter()
    result = run_stage(stage, {"train": tokenized_stream(table, model_dir, args.max_length)},
                       ScalingSettings(workers=1, cpus_per_worker=threads), storage=work / "ray")
    wall = time.perf_counter() - t0
    engine = [h["samples_per_s"] for h in result.history]

    bare_rate, engine_rate = float(np.mean(bare[1:])), float(np.mean(engine[1:]))
    ratio = engine_rate / bare_rate
    rows = [
        {"loop": "bare PyTorch, 1 process, 2 threads", "samples/s (epochs 2+)": bare_rate,
         "epoch 1 samples/s": bare[0], "wall s": None},
        {"loop": "kdshield: Ray Train 1 worker x 2 CPUs + DeepSpeed ZeRO-0", "samples/s (epochs 2+)": engine_rate,
         "epoch 1 samples/s": engine[0], "wall s": wall},
    ]
    verdict = f"engine / bare = {ratio:.2f}x (target >= 0.85x): {'met' if ratio >= 0.85 else 'MISSED'}"
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "throughput.json").write_text(json.dumps({"args": vars(args), "bare": bare, "engine": engine,
                                                     "engine_wall_s": wall, "ratio": ratio}, indent=2))
    table_md = markdown_table(rows)
    (out / "throughput.md").write_text(
        "# Training throughput: Ray Train + DeepSpeed vs a bare PyTorch loop\n\n"
        f"`python benchmarks/throughput.py --rows {args.rows} --epochs {args.epochs}` "
        f"(MiniLM-L6, batch {args.batch_size}, max {args.max_length} tokens, dynamic padding, fp32, one run)\n\n"
        f"{table_md}\n\n{verdict}\n\nThe engine's wall time also includes starting the worker group, "
        "DeepSpeed initialisation and writing a checkpoint per epoch; the samples/s columns are the "
        "training loops alone.\n")
    print(table_md)
    print(verdict)


if __name__ == "__main__":
    main()
