"""docs/w2s_memory.md's 8B table, recomputed by ``kdshield plan`` (kdshield.cluster.memory): W2SDefense's
student, Llama-3-8B as a classifier with the authors' LoRA (r 512 on q_proj and v_proj, plus the head),
bf16 on GPUs, per micro-batch and ZeRO stage / worker count. Arithmetic only (config, no weights).

    python benchmarks/plan_8b.py   # -> benchmarks/results/plan_8b.{json,md}
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
BATCHES = [(8, 128), (32, 128), (4, 512)]
LAYOUTS = [(0, 1), (2, 2), (2, 8), (3, 2), (3, 4), (3, 8)]  # (ZeRO, workers)


def main() -> None:
    from transformers import LlamaConfig

    from kdshield.cluster.memory import GIB, estimate_memory

    def llama3_8b():  # Llama-3-8B's published shape
        return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=8, vocab_size=128256)

    rows = []
    for batch, length in BATCHES:
        row = {"micro-batch (B x S)": f"{batch} x {length}"}
        for zero, workers in LAYOUTS:
            plan = estimate_memory(llama3_8b(), workers=workers, zero=zero, bf16=True, lora_r=512, batch_size=batch,
                                   max_length=length, gpu=True)
            row["activations"] = round(plan.device["activations"] / GIB, 1)
            row[f"ZeRO-{zero}, N={workers}"] = round(plan.device_total / GIB, 1)
        rows.append(row)
    facts = estimate_memory(llama3_8b(), lora_r=512, gpu=True, bf16=True).facts
    out = HERE / "results"
    (out / "plan_8b.json").write_text(json.dumps({"facts": facts, "rows": rows}, indent=1) + "\n")
    cols = list(rows[0])
    md = ["# W2SDefense's 8B student per GPU (GiB), by `kdshield plan`", "",
          "`python benchmarks/plan_8b.py`: Llama-3-8B as a classifier, LoRA r 512 on q_proj/v_proj + head "
          f"({facts['trained'] / 1e6:.0f}M trained of {facts['parameters'] / 1e9:.2f}B), bf16, GPU workers (fused "
          "attention), activations with the measured 1.3x slack; before the CUDA context (~0.5-1 GiB). ZeRO-3 "
          "budgets DeepSpeed's whole live-parameter limit (1e9) gathered: an upper bound (the 1.1B LLaMA measured "
          "below it, `tests/test_cluster.py`).", "",
          "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    (out / "plan_8b.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
