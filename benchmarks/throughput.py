"""Training throughput: kdshield's engine (DeepSpeed, in process and on Ray Train) against a bare PyTorch loop.

All train the packaged MiniLM on the same Rotten Tomatoes samples with the same batch size,
sequence length, dynamic padding, optimiser and thread count (2, the machine's cores), alternated
in one run of this script. Reported: steady-state samples/s (epochs after the first), the median
over rounds, and the ratios. Target (issue 19): the engine >= 0.9x the bare loop.

    python benchmarks/throughput.py [--rows 512] [--epochs 3] [--rounds 3]   # writes results/throughput.{json,md}
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


def engine_rates(stage, stream, *, in_process: bool, threads: int, storage: Path) -> tuple[list[float], float]:
    """Samples/s of each epoch of the engine, and its wall seconds (set-up and export included)."""
    from kdshield.config import ScalingSettings
    from kdshield.trainables.engine import run_stage

    t0 = time.perf_counter()
    result = run_stage(stage, {"train": stream}, ScalingSettings(workers=1, cpus_per_worker=threads,
                                                                 in_process=in_process), storage=storage)
    return [h["samples_per_s"] for h in result.history], time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=48)
    ap.add_argument("--work", default=str(HERE / "work" / "throughput"))
    args = ap.parse_args()

    from kdshield.cluster import connect
    from kdshield.config import TrainSettings
    from kdshield.datasets import build_corpus, read_table
    from kdshield.defenses.losses import CrossEntropy
    from kdshield.defenses.stage import ModelSpec, Phase, Stage
    from kdshield.demo import subset
    from kdshield.evaluation import markdown_table
    from kdshield.models import load_tokenizer, resolve_model
    from kdshield.trainables.attack import tokenized_stream

    work = Path(args.work)
    build_corpus("rotten-tomatoes", work / "corpus", seed=0)
    table = subset(read_table(work / "corpus/train.parquet"), args.rows, seed=0)
    model_dir = resolve_model("minilm")
    threads, lr = 2, 5e-5
    connect()
    tok = load_tokenizer(model_dir)
    # stream order, no length grouping: the bare loop's batches are random draws padded to their
    # longest row, and so are these (the grouping's own gain is padding, measured by padding.py)
    stage = Stage(name="throughput", model=ModelSpec(source=str(model_dir), num_labels=2),
                  phases=(Phase("train", CrossEntropy()),),
                  train=TrainSettings(epochs=args.epochs, lr=lr, batch_size=args.batch_size,
                                      max_length=args.max_length, warmup_ratio=0.0),
                  pad_ids={"input_ids": tok.pad_token_id}, shuffle_buffer=0)
    stream = tokenized_stream(table.take(np.random.default_rng(0).permutation(table.num_rows)), model_dir,
                              args.max_length)
    loops = {
        "bare PyTorch, 1 process, 2 threads": lambda: (bare_loop(
            model_dir, table.column("text").to_pylist(), table.column("label").to_numpy(), epochs=args.epochs,
            batch_size=args.batch_size, max_length=args.max_length, lr=lr, threads=threads), None),
        "kdshield engine in process, 2 threads, DeepSpeed ZeRO-0": lambda: engine_rates(
            stage, stream, in_process=True, threads=threads, storage=work / "ray"),
        "kdshield engine, Ray Train 1 worker x 2 CPUs, DeepSpeed ZeRO-0": lambda: engine_rates(
            stage, stream, in_process=False, threads=threads, storage=work / "ray"),
    }
    runs: dict[str, list] = {name: [] for name in loops}
    for round_ in range(args.rounds):  # alternated: every loop once per round, the order rotating
        names = list(loops)
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            rates, wall = loops[name]()
            runs[name].append({"rates": rates, "steady": float(np.mean(rates[1:])), "wall_s": wall})
            print(f"{name}: {runs[name][-1]['steady']:.1f} samples/s", flush=True)

    def median(values):
        return float(np.median(values))

    bare = median([r["steady"] for r in runs[names[0]]])
    rows = [{"loop": name, "samples/s (epochs 2+, median)": median([r["steady"] for r in rs]),
             "each round": " / ".join(f"{r['steady']:.1f}" for r in rs),
             "vs bare": median([r["steady"] for r in rs]) / bare,
             "wall s (median)": None if rs[0]["wall_s"] is None else median([r["wall_s"] for r in rs])}
            for name, rs in runs.items()]
    ratio = rows[1]["vs bare"]
    verdict = f"engine in process / bare = {ratio:.2f}x (target >= 0.9x): {'met' if ratio >= 0.9 else 'MISSED'}"
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "throughput.json").write_text(json.dumps({"args": vars(args), "runs": runs, "ratio": ratio}, indent=2))
    table_md = markdown_table(rows)
    (out / "throughput.md").write_text(
        "# Training throughput: the engine vs a bare PyTorch loop\n\n"
        f"`python benchmarks/throughput.py --rows {args.rows} --epochs {args.epochs} --rounds {args.rounds}` "
        f"(MiniLM-L6, batch {args.batch_size}, max {args.max_length} tokens, batches in random order padded to "
        "their longest row, fp32, 2 threads; the three loops alternated, rotating their order, in one run; "
        "median over rounds of the mean samples/s of epochs 2+)\n\n"
        f"{table_md}\n\n{verdict}\n\nWall time includes, for the engine, loading the model, DeepSpeed "
        "initialisation, a checkpoint per epoch and the export (and, on Ray Train, starting the worker group); "
        "the samples/s columns are the training loops alone.\n")
    print(table_md)
    print(verdict)


if __name__ == "__main__":
    main()
