"""Where a defense's clean-accuracy loss lands: recall per class on the clean test split.

BeDKD's punish step pushes the student away from the backdoored teacher on samples the teacher
labels as the target class. If that also teaches the student to avoid the target class on clean
inputs, the target class's recall drops and the others' does not. For the backdoored model of a
cell and every defended model a defense benchmark left under ``benchmarks/work/<tag>/<dataset>/
<attack>/<method>/model``, this prints the clean test recall of each class and the share of all
test rows predicted as the target, and writes ``results/class_recall_<tag>.md``. Forward passes
only.

    python benchmarks/class_recall.py [--tag bedkd_np] [--datasets rotten-tomatoes] [--attacks badnet]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def predictions(model_dir: Path, num_labels: int, texts: list[str], max_length: int):
    """The argmax label of every text under the (safetensors) classifier in ``model_dir``."""
    import numpy as np
    import torch

    from kdshield.models import load_classifier

    model, tokenizer = load_classifier(str(model_dir), num_labels)
    model.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), 64):
            enc = tokenizer(texts[i:i + 64], padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
            out.append(model(**enc).logits.argmax(-1).numpy())
    return np.concatenate(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tag", default="bedkd_np", help="the defense benchmark's work/results name")
    ap.add_argument("--datasets", nargs="+", default=["rotten-tomatoes"])
    ap.add_argument("--attacks", nargs="+", default=["badnet"])
    ap.add_argument("--max-length", type=int, default=64, help="as the defense benchmarks' budget")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import numpy as np
    import torch

    from _cells import CELLS
    from kdshield.datasets import read_table
    from kdshield.evaluation import markdown_table

    torch.set_num_threads(args.threads)
    rows = []
    for dataset in args.datasets:
        for attack in args.attacks:
            (run,) = sorted(CELLS.glob(f"*/{dataset}/{attack}/run-*"))
            info = json.loads((run / "attack.json").read_text())
            target, n = info["target_label"], info["num_labels"]
            test = read_table(run / "data" / "test.parquet")
            labels = test.column("label").to_numpy()
            models = [("none", run / "model")] + sorted(
                (p.parent.name, p) for p in (HERE / "work" / args.tag / dataset / attack).glob("*/model"))
            for method, model_dir in models:
                pred = predictions(model_dir, n, test.column("text").to_pylist(), args.max_length)
                row = {"dataset": dataset, "attack": attack, "method": method,
                       "CACC %": round(100 * float((pred == labels).mean()), 1)}
                for c in range(n):
                    row[f"recall {c}{' (target)' if c == target else ''} %"] = round(
                        100 * float((pred[labels == c] == c).mean()), 1) if (labels == c).any() else None
                row["predicted target %"] = round(100 * float((pred == target).mean()), 1)
                row["target share of test %"] = round(100 * float((labels == target).mean()), 1)
                rows.append(row)
                print(markdown_table(rows[-1:]), flush=True)
    out = HERE / "results" / f"class_recall_{args.tag}.md"
    out.write_text(
        f"# Clean test recall per class: backdoored model vs defended models (`{args.tag}`)\n\n"
        f"`python benchmarks/class_recall.py --tag {args.tag} --datasets {' '.join(args.datasets)} "
        f"--attacks {' '.join(args.attacks)}`: `none` is the cell's backdoored model, every other row a "
        f"defended model from `benchmarks/work/{args.tag}` (methods as in `results/{args.tag}.md`). A CACC "
        "loss that sits in the target class's recall, with fewer rows predicted as the target, is the "
        "student learning to avoid the target class, not forgetting the task.\n\n" + markdown_table(rows) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
