"""Did the attack implant its backdoor, and if not, why: for every backdoored RUN of the defense
benchmarks' cells, how many poisoned training rows show their trigger inside the model's token
window, how many of them the backdoored model itself labels as the target (has it even fitted its
poisoned rows?), and the ASR on the triggered test split. Writes ``results/attack_fit.md``.
Forward passes only.

    python benchmarks/attack_fit.py [--max-length 64]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def trigger_visible(tokenizer, texts: list[str], triggers: list[str], max_length: int) -> list[bool]:
    """Whether a whole trigger (word or sentence) survives truncation to ``max_length`` tokens,
    text by text."""
    wanted = [f" {' '.join(t.lower().split())} " for t in triggers]
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    seen = [f" {' '.join(tokenizer.decode(row, skip_special_tokens=True).lower().split())} " for row in ids]
    return [any(w in s for w in wanted) for s in seen]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-length", type=int, default=64, help="the attack's training max_length")
    args = ap.parse_args()

    import numpy as np

    from _cells import CELLS
    from class_recall import predictions
    from kdshield.datasets import read_table
    from kdshield.evaluation import markdown_table
    from kdshield.models import load_tokenizer

    rows = []
    for run in sorted(CELLS.glob("*/*/*/run-*")):
        if not (run / "metrics.json").is_file():
            continue
        info = json.loads((run / "attack.json").read_text())
        metrics = json.loads((run / "metrics.json").read_text())
        target, n = info["target_label"], info["num_labels"]
        train = read_table(run / "data" / "train.parquet")
        poisoned = train.filter(train.column("poisoned")).column("text").to_pylist()
        tok = load_tokenizer(str(run / "model"))
        visible = np.array(trigger_visible(tok, poisoned, info["spec"]["triggers"], args.max_length))
        triggered = read_table(run / "data" / "test_triggered.parquet").column("text").to_pylist()
        test_visible = np.array(trigger_visible(tok, triggered, info["spec"]["triggers"], args.max_length))
        pred = predictions(run / "model", n, poisoned, args.max_length)
        rows.append({"dataset": run.parts[-3], "attack": run.parts[-2], "run": run.name, "classes": n,
                     "poisoned rows": len(poisoned),
                     "trigger inside the window %": round(100 * float(visible.mean()), 1),
                     "poisoned rows fitted (predicted target) %": round(100 * float((pred == target).mean()), 1),
                     "fitted, trigger visible %": round(100 * float((pred[visible] == target).mean()), 1)
                     if visible.any() else None,
                     "triggered test rows, trigger inside the window %": round(100 * float(test_visible.mean()), 1),
                     "CACC %": round(metrics["cacc"], 1), "ASR %": round(metrics["asr"], 1)})
        print(markdown_table(rows[-1:]), flush=True)
    out = HERE / "results" / "attack_fit.md"
    out.write_text(
        "# Did each benchmark attack implant its backdoor?\n\n"
        f"`python benchmarks/attack_fit.py --max-length {args.max_length}`: every backdoored RUN under "
        "`benchmarks/work/cells` (`run-Nep`: N attack epochs at lr 5e-5; `run-Nep-lrX`: at lr X). `trigger inside the window`: poisoned training "
        f"rows whose trigger survives truncation to {args.max_length} tokens; `fitted`: poisoned training rows "
        "the backdoored model itself labels as the target. A model that has not fitted its own poisoned rows "
        "has not learned the trigger, whatever the window; the ASR cannot exceed the share of triggered test "
        "rows whose trigger is inside the window by much (a row without a visible trigger is a clean row "
        "to the model).\n\n" + markdown_table(rows) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
