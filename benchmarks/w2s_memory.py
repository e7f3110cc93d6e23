"""Peak memory per worker of W2SDefense's student stage (LoRA on SmolLM2-135M, W2S loss) at
DeepSpeed ZeRO 0, 2 and 3 with 2 Ray Train workers, against the arithmetic of docs/w2s_memory.md.

The stage is the real one (``ModelSpec(lora=...)``, :class:`W2SLoss` with CE + T^2 KL + feature
MSE, 2 workers over gloo, fp32 on CPU); the teacher columns are random (their values do not change
memory), and every text is padded to the same length so every step has the same shape. Per
worker it records: RSS right after ``deepspeed.initialize`` (weights placed, ZeRO-3 partitions
made), the training peak (the kernel's RSS high-water mark reset after initialize), and the
whole-process peak (model loading included).

    python benchmarks/w2s_memory.py [--model smollm2-135m] [--batch-size 8] [--length 64] [--zeros 0 2 3]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MB = 2**20


def predict(config, lora_params: int, *, batch: int, length: int, zero: int, workers: int, bytes_per: int = 4,
            max_live: float = 1e9) -> dict:
    """The arithmetic of docs/w2s_memory.md for one worker, MB (fp32 on CPU: bytes_per 4).

    Frozen base ``P_base b``, divided by the workers under ZeRO-3, where up to
    ``min(P_base, stage3_max_live_parameters)`` gathered parameters (DeepSpeed's default 1e9)
    may be alive at once on top of the partitions. LoRA (``P`` trainable): the parameters ``P b``
    (/w at ZeRO-3), their gradients ``P b`` (/w from ZeRO-2), DeepSpeed's fp32 master partition
    ``4 P / w`` (ZeRO >= 1) and AdamW's two moments ``8 P`` (/w from ZeRO-1). Activations kept for
    backward: ``tokens * layers * (12 H + 3 H_kv + 4 I + heads S) * b`` per block (norm inputs and
    normalised outputs, q, k, v before and after RoPE, k and v repeated to every head, the
    attention output, o_proj's input, the residual, gate, up, act(gate), act(gate) * up, LoRA's
    dropout outputs on q and v, and the attention probabilities when SDPA falls back to the math
    kernel, as it does on CPU with a padding mask)."""
    h, i, n = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads = config.num_attention_heads
    kv = h // heads * config.num_key_value_heads
    vocab = config.vocab_size
    params = vocab * h + n * (h * h * 2 + 2 * h * kv + 3 * h * i + 2 * h) + h
    base = params * bytes_per
    w = workers
    p = lora_params
    base_w = base / w + min(params, max_live) * bytes_per if zero == 3 else base
    lora_w = (p * bytes_per / (w if zero == 3 else 1) + p * bytes_per / (w if zero >= 2 else 1)
              + (4 * p / w if zero >= 1 else 0) + 8 * p / (w if zero >= 1 else 1))
    acts = batch * length * n * (12 * h + 3 * kv + 4 * i + heads * length) * bytes_per
    return {"base_mb": base_w / MB, "lora_mb": lora_w / MB, "activations_mb": acts / MB,
            "total_mb": (base_w + lora_w + acts) / MB}


COLS = ["ZeRO", "workers", "RSS after init MB (per rank)", "train peak MB (per rank)", "process peak MB (per rank)",
        "predicted weights MB", "predicted LoRA+optim MB", "predicted activations MB", "samples/s", "seconds"]


def render(meta: dict, rows: list[dict], config) -> str:
    """The Markdown table; predicted columns recomputed from ``predict`` (``--render-only``)."""
    from kdshield.evaluation import markdown_table

    for r in rows:
        pred = predict(config, meta["lora"]["trainable_params"], batch=meta["batch_size"], length=meta["length"],
                       zero=r["ZeRO"], workers=r["workers"])
        r.update({"predicted weights MB": round(pred["base_mb"]), "predicted LoRA+optim MB": round(pred["lora_mb"], 1),
                  "predicted activations MB": round(pred["activations_mb"]), "predicted": pred})
        r.pop("predicted base MB", None)
    lora = meta["lora"]
    return (f"# W2SDefense student stage: memory per worker, ZeRO 0 / 2 / 3 ({rows[0]['workers']} workers)\n\n"
            f"`python benchmarks/w2s_memory.py` — {meta['model']} with LoRA r={lora['r']} on "
            f"{', '.join(lora['target_modules'])} (+ head): {lora['trainable_params']:,} trainable parameters; "
            f"micro-batch {meta['batch_size']} x {meta['length']} tokens; fp32 on CPU (DS_ACCELERATOR=cpu, gloo), "
            "1 CPU per worker, DeepSpeed's default ZeRO-3 settings. `RSS after init`: resident memory right after "
            "deepspeed.initialize; `train peak`: the RSS high-water mark of the training steps only (reset after "
            "initialize); `process peak`: the whole process, model loading included. Predicted columns (MiB): "
            "the arithmetic of docs/w2s_memory.md (weights: the frozen base, at ZeRO-3 its partition plus the "
            "gathered parameters DeepSpeed may keep alive). `samples/s`, `seconds`: on a shared, overloaded "
            "2-core machine, not comparable between rows.\n\n" + markdown_table(rows, COLS) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--rows", type=int, default=48, help="rows per run (both workers together)")
    ap.add_argument("--zeros", nargs="+", type=int, default=[0, 2, 3])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tag", default="w2s_memory")
    ap.add_argument("--render-only", action="store_true", help="re-render the table from the JSON results")
    args = ap.parse_args()
    if args.render_only:
        from kdshield.models import load_config, resolve_model

        data = json.loads((RESULTS / f"{args.tag}.json").read_text())
        rows = data.pop("rows")
        md = render(data, rows, load_config(resolve_model(data["model"])))
        (RESULTS / f"{args.tag}.json").write_text(json.dumps({**data, "rows": rows}, indent=2))
        (RESULTS / f"{args.tag}.md").write_text(md)
        print(md)
        return

    import numpy as np
    import pyarrow as pa
    import ray.data

    from kdshield.cluster import connect
    from kdshield.config import ScalingSettings, TrainSettings
    from kdshield.defenses.w2s.config import W2SConfig
    from kdshield.defenses.w2s.losses import W2SLoss
    from kdshield.evaluation import markdown_table
    from kdshield.models import hidden_size, load_config, load_tokenizer, resolve_model
    from kdshield.models.lora import LoraSpec, default_rank
    from kdshield.trainables.engine import run_stage
    from kdshield.defenses.stage import ModelSpec, Phase, Stage

    model_dir = resolve_model(args.model)
    config = load_config(model_dir)
    tok = load_tokenizer(model_dir)
    width, c = hidden_size(config), W2SConfig()
    r = default_rank(width)
    lora = LoraSpec(r=r, alpha=float(r), dropout=c.lora_dropout, target_modules=tuple(c.target_modules))
    rng = np.random.default_rng(0)
    ids = rng.integers(100, tok.vocab_size - 100, size=(args.rows, args.length)).astype(np.int32)
    table = pa.table({"input_ids": pa.array(list(ids), pa.list_(pa.int32())),
                      "label": pa.array(rng.integers(0, 2, args.rows), pa.int64()),
                      "teacher_feature": pa.array(list(rng.normal(size=(args.rows, width)).astype(np.float32)),
                                                  pa.list_(pa.float32(), width)),
                      "teacher_logits": pa.array(list(rng.normal(size=(args.rows, 2)).astype(np.float32)),
                                                 pa.list_(pa.float32(), 2))})
    connect(None)
    stream = ray.data.from_arrow(table).materialize()
    a, b, g = c.loss_weights
    stage = Stage(name="student", model=ModelSpec(model_dir, 2, lora=lora),
                  phases=(Phase("clean", W2SLoss(a, b, g, c.temperature)),),
                  pad_ids={"input_ids": tok.pad_token_id}, padding_side="left", shuffle_buffer=0,
                  train=TrainSettings(epochs=1, lr=c.lr, batch_size=args.batch_size, max_length=args.length,
                                      warmup_ratio=0.0))
    lora_params = None
    rows = []
    RESULTS.mkdir(exist_ok=True)
    work = HERE / "work" / "w2s_memory"
    for zero in args.zeros:
        t0 = time.perf_counter()
        res = run_stage(stage, {"clean": stream}, ScalingSettings(workers=args.workers, cpus_per_worker=1, zero=zero),
                        storage=work, run_name=f"zero{zero}-{int(time.time())}")
        if lora_params is None:
            from kdshield.models import count_parameters

            lora_params = count_parameters(res.adapter_dir)
        h = res.history[-1]
        pred = predict(config, lora_params, batch=args.batch_size, length=args.length, zero=zero,
                       workers=args.workers)
        rows.append({"ZeRO": zero, "workers": args.workers,
                     "RSS after init MB (per rank)": " / ".join(f"{v:.0f}" for v in h["rss_after_init_mb_per_rank"]),
                     "train peak MB (per rank)": " / ".join(f"{v:.0f}" for v in h["train_peak_rss_mb_per_rank"]),
                     "process peak MB (per rank)": " / ".join(f"{v:.0f}" for v in h["peak_rss_mb_per_rank"]),
                     "samples/s": round(h["samples_per_s"], 2), "seconds": round(time.perf_counter() - t0),
                     "raw": {k: h[k] for k in ("rss_after_init_mb_per_rank", "train_peak_rss_mb_per_rank",
                                               "peak_rss_mb_per_rank")}})
        print(rows[-1], {k: round(v) for k, v in pred.items()}, flush=True)
    meta = {"model": args.model, "lora": {"r": r, "alpha": r, "target_modules": list(c.target_modules),
                                          "trainable_params": lora_params},
            "batch_size": args.batch_size, "length": args.length, "n_rows": args.rows, "precision": "fp32 (CPU)"}
    md = render(meta, rows, config)
    (RESULTS / f"{args.tag}.json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
    (RESULTS / f"{args.tag}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
