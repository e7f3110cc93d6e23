"""Where a defense's clean-accuracy loss lands: recall per class on the clean test split.

BeDKD's punish step pushes the student away from the backdoored teacher on samples the teacher
labels as the target class. If that also teaches the student to avoid the target class on clean
inputs, the target class's recall drops and the others' does not. For the backdoored model of a
cell and every defended model a defense benchmark left under ``benchmarks/work/<tag>/<dataset>/
<attack>/<method>/model``, this prints the clean test recall of each class and the share of all
test rows predicted as the target, and writes ``results/class_recall_<tag>.md``. Forward passes
only.

It also gives each model's *no-trigger ASR*: the share of the non-target test rows predicted as the
target without any trigger. The ASR test set is exactly these rows with the trigger inserted, so
ASR minus this is what the trigger itself adds; a defended model whose ASR equals its no-trigger
ASR has lost the backdoor, and what remains is clean error into the target class.

    python benchmarks/class_recall.py [--tag bedkd_np] [--datasets rotten-tomatoes] [--attacks badnet]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
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


def defended_models(tag: str, dataset: str = "*", attack: str = "*") -> dict[Path, list[tuple[str, Path]]]:
    """Every defense a benchmark left under ``benchmarks/work/<tag>/<dataset>/<attack>/<method>/``,
    grouped by the backdoored RUN it defended (read from its ``metrics.json``): RUN -> [(method, dir)]."""
    found = defaultdict(list)
    for metrics in sorted((HERE / "work" / tag).glob(f"{dataset}/{attack}/*/metrics.json")):
        found[Path(json.loads(metrics.read_text())["config"]["run"])].append((metrics.parent.name, metrics.parent))
    return dict(found)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tag", default="bedkd_np", help="the defense benchmark's work/results name")
    ap.add_argument("--datasets", nargs="+", default=["*"], help="dataset directories (glob)")
    ap.add_argument("--attacks", nargs="+", default=["*"], help="attack directories (glob)")
    ap.add_argument("--max-length", type=int, default=64, help="as the defense benchmarks' budget")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import numpy as np
    import torch

    from kdshield.datasets import read_table
    from kdshield.evaluation import markdown_table

    torch.set_num_threads(args.threads)
    rows = []
    for dataset in args.datasets:
        for attack in args.attacks:
            for run, methods in defended_models(args.tag, dataset, attack).items():
                info = json.loads((run / "attack.json").read_text())
                target, n = info["target_label"], info["num_labels"]
                test = read_table(run / "data" / "test.parquet")
                labels = test.column("label").to_numpy()
                for method, out in [("none", run)] + methods:
                    pred = predictions(out / "model", n, test.column("text").to_pylist(), args.max_length)
                    asr = json.loads((out / "metrics.json").read_text())["asr"]
                    no_trigger = 100 * float((pred[labels != target] == target).mean())
                    row = {"dataset": run.parent.parent.name, "attack": info["config"]["attack"],
                           "RUN": run.name, "method": method, "CACC %": round(100 * float((pred == labels).mean()), 1),
                           "ASR %": round(asr, 1), "no-trigger ASR %": round(no_trigger, 1),
                           "ASR - no-trigger": round(asr - no_trigger, 1)}
                    for c in range(n):
                        row[f"recall {c}{' (target)' if c == target else ''} %"] = round(
                            100 * float((pred[labels == c] == c).mean()), 1) if (labels == c).any() else None
                    row["predicted target %"] = round(100 * float((pred == target).mean()), 1)
                    row["target share of test %"] = round(100 * float((labels == target).mean()), 1)
                    rows.append(row)
                    print(markdown_table(rows[-1:]), flush=True)
    out = HERE / "results" / f"class_recall_{args.tag}.md"
    out.write_text(
        f"# Clean test recall per class and no-trigger ASR: backdoored vs defended models (`{args.tag}`)\n\n"
        f"`python benchmarks/class_recall.py --tag {args.tag} --datasets {' '.join(args.datasets)} "
        f"--attacks {' '.join(args.attacks)}`: `none` is the cell's backdoored model (its RUN), every other row a "
        f"defended model from `benchmarks/work/{args.tag}` (methods as in `results/{args.tag}.md`). "
        "`no-trigger ASR`: the non-target test rows predicted as the target *without* the trigger; the ASR "
        "test set is the same rows with it, so `ASR - no-trigger` is what the trigger adds. A CACC "
        "loss that sits in the target class's recall, with fewer rows predicted as the target, is the "
        "student learning to avoid the target class, not forgetting the task.\n\n" + markdown_table(rows) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
