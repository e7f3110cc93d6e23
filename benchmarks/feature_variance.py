"""RobustKD's premise on text transformers: do a backdoored model's features vary more within an
example on triggered inputs than on clean ones?

RobustKD (images) detoxifies teacher features by lowering Var(F), the variance of a sample's
feature values, on the observation that backdoored features have the larger one. For every
backdoored RUN of the defense benchmarks' cells (``_cells.CELLS``) this measures that variance,
exactly as kdshield's RobustKD computes it (the pooled hidden state of each chosen teacher layer,
variance over the hidden dimension), on the clean test split and on its triggered copy, and
writes ``results/feature_variance.md``. Forward passes only (a few seconds per cell).

    python benchmarks/feature_variance.py [--rows 300]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def variances(model, tokenizer, texts: list[str], layers: list[int], family: str, max_length: int):
    """[n, len(layers)] Var(F) of every text at every chosen layer."""
    import torch

    from kdshield.defenses.robustkd.losses import feature_variance
    from kdshield.models.outputs import model_outputs

    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), 32):
            enc = tokenizer(texts[i:i + 32], padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
            h = model_outputs(model, enc["input_ids"], enc["attention_mask"], ("hidden_states",), family)
            feats = h["hidden_states"][:, layers]  # [b, K, H]
            out.append(torch.stack([feature_variance(f[None]) for f in feats]))  # [b, K]
    return torch.cat(out).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=300, help="clean and triggered test rows per cell")
    ap.add_argument("--max-length", type=int, default=64, help="as the benchmark's RobustKD budget")
    args = ap.parse_args()

    import numpy as np
    import torch

    from _cells import CELLS
    from kdshield.datasets import read_table
    from kdshield.defenses.robustkd.config import RobustKDConfig
    from kdshield.evaluation import markdown_table
    from kdshield.models import load_classifier, load_config, model_family
    from kdshield.defenses.robustkd.recipe import plan_student

    torch.set_num_threads(2)
    rows = []
    for run in sorted(CELLS.glob("*/*/*/run-*")):
        if not (run / "metrics.json").is_file():
            continue
        dataset, attack = run.parts[-3], run.parts[-2]
        info = json.loads((run / "attack.json").read_text())
        plan = plan_student(RobustKDConfig(), str(run / "model"))
        model, tokenizer = load_classifier(str(run / "model"), info["num_labels"])
        model.eval()
        family = model_family(load_config(str(run / "model")))
        clean = read_table(run / "data" / "test.parquet").column("text").to_pylist()[:args.rows]
        trig = read_table(run / "data" / "test_triggered.parquet").column("text").to_pylist()[:args.rows]
        vc, vt = (variances(model, tokenizer, t, plan.teacher_layers, family, args.max_length) for t in (clean, trig))
        for k, layer in enumerate(plan.teacher_layers):
            a, b = vc[:, k], vt[:, k]
            pooled = np.sqrt((a.var() + b.var()) / 2)
            rows.append({"dataset": dataset, "attack": attack, "layer": layer,
                         "clean Var mean": f"{a.mean():.4f}", "clean Var sd": f"{a.std():.4f}",
                         "triggered Var mean": f"{b.mean():.4f}", "triggered Var sd": f"{b.std():.4f}",
                         # a Var that LayerNorm pins (sd ~ 0) separates nothing, whatever the ratio of tiny numbers
                         "effect size d": f"{(b.mean() - a.mean()) / pooled:.2f}" if pooled > 1e-3 else "- (sd < 0.001)",
                         "rows": f"{len(a)} / {len(b)}"})
        print(markdown_table(rows), flush=True)
    out = HERE / "results" / "feature_variance.md"
    out.write_text(
        "# RobustKD's premise on MiniLM: Var(F) of clean vs triggered inputs in the backdoored model\n\n"
        f"`python benchmarks/feature_variance.py --rows {args.rows} --max-length {args.max_length}`: every cell's "
        "backdoored MiniLM (the defense benchmarks' RUNs), RobustKD's default teacher layers, Var(F) = the variance "
        "over the hidden dimension of the layer's pooled ([CLS]) hidden state, per test sample. `effect size d`: "
        "(triggered - clean mean) / pooled sd, not given where both sds are below 0.001. RobustKD needs triggered "
        "features with clearly larger variance on every chosen layer.\n\n"
        + markdown_table(rows) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
