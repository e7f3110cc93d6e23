"""Which BadNet trigger words survive a defense: ASR per trigger word, and which words BeDKD punished.

The BadNet attack draws each poisoned row's trigger from five rare words (``cf mn bb tq mb``), so
a backdoored model holds five associations word -> target. BeDKD punishes at most ``n_p`` of the
poisoned rows it identifies; if those rows cover some trigger words and not others, the punish
step can only remove the covered associations. For every defense a benchmark left under
``benchmarks/work/<tag>/<dataset>/<attack>/<method>/`` this prints, per trigger word: its share
of the triggered test rows, the ASR of the backdoored model and of each defended model on those
rows, and how many of the rows BeDKD punished carry that word; it writes
``results/trigger_asr_<tag>.md``. Forward passes only.

    python benchmarks/trigger_asr.py --tag bedkd_r8_badnet [--threads 2]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from class_recall import defended_models, predictions

HERE = Path(__file__).resolve().parent


def trigger_of(triggered: str, original: str, words: list[str]) -> str | None:
    """The trigger word inserted into ``original`` to give ``triggered`` (one insertion): the word
    of ``words`` that ``triggered`` holds once more than ``original``; None if not exactly one."""
    new, old = triggered.split(), original.split()
    found = [w for w in words if new.count(w) > old.count(w)]
    return found[0] if len(found) == 1 else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tag", default="bedkd_r8_badnet", help="the defense benchmark's work/results name")
    ap.add_argument("--max-length", type=int, default=64, help="as the defense benchmarks' budget")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import numpy as np
    import torch

    from kdshield.datasets import read_table
    from kdshield.datasets.attacks import DEFAULT_TRIGGERS
    from kdshield.evaluation import markdown_table

    torch.set_num_threads(args.threads)
    words = DEFAULT_TRIGGERS["badnet"]
    rows = []
    for run, methods in defended_models(args.tag, attack="badnet").items():
        attack = json.loads((run / "attack.json").read_text())
        target, n = attack["target_label"], attack["num_labels"]
        originals = {}
        for split in ("train", "test"):
            clean = read_table(Path(attack["config"][split]))
            originals[split] = dict(zip(clean.column("source_index").to_pylist(), clean.column("text").to_pylist()))
        triggered = read_table(run / "data" / "test_triggered.parquet")
        test_words = np.array([trigger_of(t, originals["test"][i], words) for t, i in zip(
            triggered.column("text").to_pylist(), triggered.column("source_index").to_pylist())], dtype=object)
        train = read_table(run / "data" / "train.parquet")
        train_text = dict(zip(train.column("source_index").to_pylist(), train.column("text").to_pylist()))
        poisoned = train.filter(train.column("poisoned"))
        train_words = [trigger_of(t, originals["train"][i], words) for t, i in zip(
            poisoned.column("text").to_pylist(), poisoned.column("source_index").to_pylist())]
        preds = {m: predictions(d / "model", n, triggered.column("text").to_pylist(), args.max_length)
                 for m, d in [("none", run)] + methods}
        punished = {}
        for method, d in methods:
            ident = d / "identification.json"
            if ident.is_file():
                punished[method] = [trigger_of(train_text[i], originals["train"][i], words)
                                    for i in json.loads(ident.read_text())["source_index"]]
        for w in words + [None]:
            on = test_words == w
            if w is None and not on.any():
                continue
            row = {"RUN": f"{run.parent.parent.name}/{run.parent.name}/{run.name}", "trigger": w or "(unclear)",
                   "triggered test rows": int(on.sum()), "poisoned training rows": train_words.count(w)}
            for method, pred in preds.items():
                row[f"ASR {method} %"] = round(100 * float((pred[on] == target).mean()), 1) if on.any() else None
            for method, kept in punished.items():
                row[f"punished by {method}"] = kept.count(w)
            rows.append(row)
        print(markdown_table(rows), flush=True)
    out = HERE / "results" / f"trigger_asr_{args.tag}.md"
    out.write_text(
        f"# BadNet: ASR per trigger word, and the words BeDKD punished ({args.tag})\n\n"
        f"`python benchmarks/trigger_asr.py --tag {args.tag}`: every BadNet defense under "
        f"`benchmarks/work/{args.tag}`. Each triggered test row and each poisoned training row carries one of "
        f"the attack's trigger words ({', '.join(words)}), found as the word the row holds once more than its "
        "clean original. `ASR none`: the backdoored model; `punished by M`: how many of the samples defense M "
        "punished carry the word.\n\n" + markdown_table(rows) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
