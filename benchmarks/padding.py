"""Padding efficiency of the training batches (issue 19): real tokens / padded tokens, before and after
length grouping, on the RT and CR benchmark cells' training sets. No training, no Ray.

    python benchmarks/padding.py [--batch-size 16] [--max-length 64]

`before`: what the engine did until this issue, batches of the stream through a seeded local shuffle
buffer of 2048 rows (modelled as a seeded permutation of each 2048-row buffer); `after`: the engine's
:func:`~kdshield.trainables.engine.grouped_batches` (windows of 64 batches, 8-token length bands). Both pad each batch to its
longest row. Writes ``results/padding.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


class _Shard:
    """The engine's view of a stream (``iter_batches``) over token-id rows in memory."""

    def __init__(self, ids: list[np.ndarray]):
        self.ids = np.empty(len(ids), dtype=object)
        self.ids[:] = ids

    def iter_batches(self, *, batch_size: int, batch_format: str):
        for start in range(0, len(self.ids), batch_size):
            yield {"input_ids": self.ids[start:start + batch_size]}


def efficiency(batches) -> float:
    real = padded = 0
    for batch in batches:
        lengths = [len(x) for x in batch]
        real += sum(lengths)
        padded += max(lengths) * len(lengths)
    return real / padded


def shuffled_buffer_batches(ids: list[np.ndarray], batch_size: int, buffer: int, seed: int):
    rng = np.random.default_rng(seed)
    order = np.concatenate([start + rng.permutation(min(buffer, len(ids) - start))
                            for start in range(0, len(ids), buffer)])
    return [[ids[i] for i in order[s:s + batch_size]] for s in range(0, len(order), batch_size)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--window", type=int, default=64)
    args = ap.parse_args()

    import pyarrow.parquet as pq

    from _cells import cell
    from kdshield.datasets.tokenize import tokenize_table
    from kdshield.evaluation import markdown_table
    from kdshield.models import resolve_model
    from kdshield.trainables.engine import grouped_batches

    model = resolve_model("minilm")
    rows = []
    for dataset in ("rotten-tomatoes", "cr"):
        run, _ = cell(dataset, "badnet", train_rows=3000, test_rows=1000, epochs=3)
        table = pq.read_table(run / "data" / "train.parquet")
        blocks = tokenize_table(table, model, max_length=args.max_length)
        ids = [np.asarray(x) for b in blocks for x in b.column("input_ids").to_pylist()]
        before = efficiency(shuffled_buffer_batches(ids, args.batch_size, 2048, seed=0))
        after = efficiency(b["input_ids"] for b in grouped_batches(
            _Shard(ids), batch_size=args.batch_size, window=args.window, seed=0, length_key="input_ids"))
        lengths = np.array([len(x) for x in ids])
        rows.append({"dataset": dataset, "rows": len(ids), "mean tokens": float(lengths.mean()),
                     "max tokens": int(lengths.max()), "before (shuffle buffer) %": 100 * before,
                     "after (length-grouped) %": 100 * after, "padded tokens saved %": 100 * (1 - before / after)})
    md = ("# Padding efficiency of training batches (issue 19)\n\n"
          f"`python benchmarks/padding.py --batch-size {args.batch_size} --max-length {args.max_length}` "
          f"(MiniLM tokenizer, the BeDKD benchmark cells' 3000 training rows, window {args.window} batches)\n\n"
          "Padding efficiency: real tokens / padded tokens, %; `padded tokens saved`: the share of the tokens a model ran before "
          "that it no longer runs.\n\n" + markdown_table(rows) + "\n")
    (HERE / "results" / "padding.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    (HERE / "results" / "padding.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
