"""Per-worker peak memory of loading and training at ZeRO-3 with 2 workers, whole-model loading
(every worker builds the full model, then DeepSpeed partitions it) against partitioned loading
(:func:`kdshield.models.load_classifier_partitioned`: the model built under ``deepspeed.zero.Init``
without drawing its weights, each worker reading only its partitions' bytes from the safetensors).

Models: SmolLM2-135M (the packaged preset) and a randomly initialised LLaMA of about 1.1B
parameters (TinyLlama-1.1B's shape, SmolLM2's vocabulary so its tokenizer fits; no weights needed:
built from its config, written once as sharded safetensors). Each run trains a LoRA adapter (r 16)
for a few steps in bf16 on 2 Ray Train workers (gloo, CPU), through the engine (``run_stage``).

"Before" is the engine as of a commit without partitioned loading (``--before-src``, a ``src``
directory of an older checkout); "after" is this checkout. Both run in one script run, each in its
own process (and its own local Ray), alternated per model. Written: ``results/zero3_memory.json``
(per model and code: each rank's peak RSS in MB, the fp32 size of the model, the ratio) and
``results/zero3_memory.md``. Target: for the 1B model each worker's peak at most 60% of one full
fp32 copy of the model.

    git worktree add /tmp/before <commit-before>   # e.g. the commit before partitioned loading
    python benchmarks/zero3_memory.py --before-src /tmp/before/src
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
LLAMA_1B = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
            "num_key_value_heads": 4, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False}  # TinyLlama-1.1B's shape

ONE_RUN = r"""
import json, sys
import numpy as np, pyarrow as pa
from kdshield.cluster import connect
from kdshield.config import ScalingSettings, TrainSettings
from kdshield.defenses.losses import CrossEntropy
from kdshield.defenses.stage import ModelSpec, Phase, Stage
from kdshield.models.lora import LoraSpec
from kdshield.models import load_tokenizer
from kdshield.trainables.attack import tokenized_stream
from kdshield.trainables.engine import run_stage

model_dir, out, bf16, n = sys.argv[1], sys.argv[2], sys.argv[3] == "bf16", int(sys.argv[4])
connect(num_cpus=2)
tok = load_tokenizer(model_dir)
rng = np.random.default_rng(0)
texts = [" ".join(rng.choice(["good", "bad", "film", "plot", "long", "very"], size=12)) for _ in range(n)]
table = pa.table({"text": texts, "label": pa.array([i % 2 for i in range(n)], pa.int64()),
                  "source_index": pa.array(np.arange(n), pa.int64())})
stage = Stage(name="lora", model=ModelSpec(source=model_dir, num_labels=2,
                                           lora=LoraSpec(r=16, alpha=16, dropout=0.0, target_modules=("q_proj", "v_proj"))),
              phases=(Phase("train", CrossEntropy()),),
              train=TrainSettings(epochs=1, lr=1e-4, batch_size=2, max_length=32, warmup_ratio=0.0),
              pad_ids={"input_ids": tok.pad_token_id}, padding_side="left")
result = run_stage(stage, {"train": tokenized_stream(table, model_dir, 32)},
                   ScalingSettings(workers=2, cpus_per_worker=1, zero=3, bf16=bf16), storage=out)
last = result.history[-1]
json.dump({k: last.get(k) for k in ("peak_rss_mb_per_rank", "train_peak_rss_mb_per_rank", "rss_after_init_mb_per_rank",
                                    "train/loss")}, sys.stdout)
"""


def random_llama(dest: Path, tokenizer_dir: str) -> Path:
    """A randomly initialised ~1.1B LLaMA classifier checkpoint (sharded safetensors), once."""
    if (dest / "config.json").is_file():
        return dest
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tok), **LLAMA_1B)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    tmp = dest.with_name(dest.name + ".partial")
    model.save_pretrained(tmp, max_shard_size="1GB")
    tok.save_pretrained(tmp)
    tmp.rename(dest)
    return dest


def measure(src: Path, model_dir: Path, work: Path, precision: str, rows: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src), "RAY_ADDRESS": ""}
    proc = subprocess.run([sys.executable, "-c", ONE_RUN, str(model_dir), str(work), precision, str(rows)], env=env,
                          capture_output=True,
                          text=True, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before-src", required=True, help="src directory of a checkout without partitioned loading")
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "llama-1b"])
    ap.add_argument("--work", default=str(HERE / "work" / "zero3_memory"))
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--rows", type=int, default=16, help="training rows (batch 2 per worker: rows/4 steps each)")
    args = ap.parse_args()
    sys.path.insert(0, str(HERE.parent / "src"))
    from kdshield.models import count_parameters, resolve_model

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    smol = resolve_model("smollm2-135m")
    rows = []
    for name in args.models:
        model_dir = Path(smol) if name == "smollm2-135m" else random_llama(work / "llama-1b", str(smol))
        params = count_parameters(model_dir)
        fp32_mb = params * 4 / 2**20
        row = {"model": name, "parameters": params, "fp32_copy_mb": round(fp32_mb)}
        for code, src in (("before", Path(args.before_src)), ("after", HERE.parent / "src")):
            m = measure(src.resolve(), model_dir, work / f"{name}-{code}", args.precision, args.rows)
            peak = max(m["peak_rss_mb_per_rank"])
            row[code] = {**m, "worker_peak_mb": round(peak), "peak_over_fp32_copy": round(peak / fp32_mb, 3)}
            print(name, code, row[code], flush=True)
        rows.append(row)
    RESULTS.mkdir(exist_ok=True)
    store = RESULTS / "zero3_memory.json"
    if store.is_file():  # rows of models not measured in this run stay
        rows = [r for r in json.loads(store.read_text())["rows"] if r["model"] not in args.models] + rows
    record = {"command": " ".join(["python", "benchmarks/zero3_memory.py", *sys.argv[1:]]),
              "setup": f"ZeRO-3, 2 workers x 1 CPU, {args.precision}, LoRA r 16 on q_proj/v_proj, batch 2 x 32 "
                       f"tokens, {args.rows // 4} step(s) per worker",
              "machine": f"{os.cpu_count()} CPUs, no GPU", "rows": rows}
    (RESULTS / "zero3_memory.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = ["# Per-worker peak memory at ZeRO-3, 2 workers: whole-model vs partitioned loading", "",
             f"`{record['command']}`", "", f"{record['setup']}; {record['machine']}. Peak: the largest worker's "
             "peak RSS over loading and training (MB).", "",
             "| model | parameters | one fp32 copy MB | before: worker peak MB (x copy) | after: worker peak MB (x copy) |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['parameters'] / 1e6:.0f}M | {r['fp32_copy_mb']} | "
                     f"{r['before']['worker_peak_mb']} ({r['before']['peak_over_fp32_copy']}) | "
                     f"{r['after']['worker_peak_mb']} ({r['after']['peak_over_fp32_copy']}) |")
    lines += ["", "Target: the 1B model's worker peak at most 0.6 x one fp32 copy (after)."]
    (RESULTS / "zero3_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
