"""Tokenising an in-memory Arrow table: in the calling process vs a Ray Data actor pipeline.

Every defense job turns several Arrow tables (clean set, suspect set, test splits) into tokenised
Ray Datasets. ``kdshield.trainables.attack.tokenized_stream`` does it in the calling process
(``tokenize_table``); before, it went through ``tokenize_dataset``, an actor pool of one that
starts a process and loads the tokenizer for every table. This times both, alternating, on the
MiniLM tokenizer and real Rotten Tomatoes rows, and writes ``results/tokenize_stream.md``.

    RAY_ADDRESS=local python benchmarks/tokenize_stream.py [--rows 48 2700 27000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[48, 2700, 27000])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-length", type=int, default=64)
    args = ap.parse_args()

    import pyarrow as pa
    import ray

    from kdshield.cluster import connect
    from kdshield.datasets import build_corpus, read_table, tokenize_dataset
    from kdshield.evaluation import markdown_table
    from kdshield.models import resolve_model
    from kdshield.trainables.attack import tokenized_stream

    corpus = Path(tempfile.mkdtemp()) / "rt"
    build_corpus("rotten-tomatoes", corpus, seed=0)
    source = read_table(corpus / "train.parquet")
    tokenizer = resolve_model("minilm")
    connect()

    ways = {"in process (tokenize_table)": lambda t: tokenized_stream(t, tokenizer, args.max_length),
            "Ray Data actor (tokenize_dataset)": lambda t: tokenize_dataset(
                ray.data.from_arrow(t), tokenizer, max_length=args.max_length).materialize()}
    rows = []
    for n in args.rows:
        reps = -(-n // source.num_rows)
        table = pa.concat_tables([source] * reps).slice(0, n)
        seconds: dict[str, list[float]] = {way: [] for way in ways}
        for _ in range(args.repeats):
            for way, run in ways.items():  # alternating, so drift hits both alike
                t0 = time.perf_counter()
                assert run(table).count() == n
                seconds[way].append(time.perf_counter() - t0)
        medians = {way: statistics.median(s) for way, s in seconds.items()}
        inproc, actor = medians.values()
        rows.append({"rows": n, **{f"{way} s": f"{m:.2f}" for way, m in medians.items()},
                     "actor / in process": f"{actor / inproc:.1f}x"})
        print(markdown_table(rows[-1:]), flush=True)
    out = HERE / "results" / "tokenize_stream.md"
    out.write_text("# Tokenising an in-memory table: in process vs a Ray Data actor\n\n"
                   f"`RAY_ADDRESS=local python benchmarks/tokenize_stream.py --rows {' '.join(map(str, args.rows))} "
                   f"--repeats {args.repeats}`: MiniLM tokenizer, Rotten Tomatoes training rows (repeated to "
                   f"size), max_length {args.max_length}, median of {args.repeats} alternating runs each, "
                   "one local Ray on this machine.\n\n" + markdown_table(rows) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
