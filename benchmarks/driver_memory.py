"""The driver's memory does not grow with the data: `kdshield attack` over 100,000 and 1,000,000 rows.

The input is a synthetic expansion of the packaged Rotten Tomatoes training split (each copy of a
snippet gets one number word, so no two rows are equal), written as a directory of Parquet shards
of 100,000 rows (the usual shape of a large corpus); the test set is the packaged test split. Each
size runs `kdshield attack` in a fresh process (its own local Ray): the streaming scan, then Ray
Data's split, poisoning (BadNet 10%), tokenisation and writing of the RUN's data, then training capped
to a few steps (`training.max_steps_per_epoch`, tiny-bert: the data path is measured, not the model)
and the evaluation. The driver's peak RSS is that process's own (``getrusage(RUSAGE_SELF)``): Ray's
worker processes, the object store and the raylet are not in it.

    python benchmarks/driver_memory.py [--rows 100000 1000000]
    # -> benchmarks/results/driver_memory.{json,md}
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARD_ROWS = 100_000
DRIVER = """
import json, resource, sys, time
from kdshield.cli import main
t0 = time.perf_counter()
code = main(sys.argv[1:])
print("DRIVER " + json.dumps({"code": code, "seconds": time.perf_counter() - t0,
                              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def expand(corpus: Path, rows: int, dest: Path) -> Path:
    """``rows`` rows cycling over the corpus's training split, copy k of a snippet ending in the word
    for k; shards of SHARD_ROWS rows, no ``source_index`` (the reader numbers the rows)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kdshield.datasets import read_table

    if dest.is_dir() and sum(pq.ParquetFile(p).metadata.num_rows for p in dest.glob("*.parquet")) == rows:
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    base = read_table(corpus / "train.parquet")
    texts, labels = np.array(base.column("text").to_pylist(), dtype=object), base.column("label").to_numpy()
    n = len(texts)
    for start in range(0, rows, SHARD_ROWS):
        idx = np.arange(start, min(start + SHARD_ROWS, rows))
        copy = idx // n
        shard = pa.table({"text": [f"{t} copy{c}" for t, c in zip(texts[idx % n], copy)],
                          "label": labels[idx % n]})
        pq.write_table(shard, dest / f"part-{start // SHARD_ROWS:05d}.parquet")
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--steps", type=int, default=5, help="training micro-batches (the cap)")
    ap.add_argument("--work", default=str(HERE / "work" / "driver_memory"))
    args = ap.parse_args()

    from kdshield.datasets import build_corpus

    work = Path(args.work)
    corpus = work / "corpus"
    build_corpus("rotten-tomatoes", corpus, seed=0)
    rows_out, peaks, records = [], [], []
    for rows in args.rows:
        data = expand(corpus, rows, work / f"train-{rows}")
        out = work / f"run-{rows}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-c", DRIVER, "attack", "--train", str(data), "--test", str(corpus / "test.parquet"),
               "--model", "tiny-bert", "--attack", "badnet", "--poison-rate", "0.1", "--out", str(out),
               "--epochs", "1", "--batch-size", "32", "--max-length", "64", "--set",
               f"training.max_steps_per_epoch={args.steps}"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("DRIVER ")), None)
        if proc.returncode or line is None:
            sys.exit(f"attack over {rows} rows failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        result = json.loads(line.removeprefix("DRIVER "))
        attack = json.loads((out / "attack.json").read_text())
        records.append({"rows": rows, "driver_peak_rss_mb": round(result["peak_rss_mb"], 1),
                        "seconds": round(time.perf_counter() - t0, 1), "run_rows": attack["rows"]})
        rows_out.append(rows)
        peaks.append(round(result["peak_rss_mb"], 1))
        print(records[-1], flush=True)
        shutil.rmtree(out, ignore_errors=True)
    ratio = peaks[-1] / peaks[0]
    result = {"rows": rows_out, "driver_peak_rss_mb": peaks, "ratio_largest_to_smallest": round(ratio, 3),
              "command": " ".join(["python", "benchmarks/driver_memory.py", *sys.argv[1:]]),
              "job": "kdshield attack --model tiny-bert --attack badnet (10%), 1 epoch capped at "
                     f"{args.steps} micro-batches of 32, max_length 64, local Ray, default scaling",
              "runs": records}
    dest = HERE / "results"
    (dest / "driver_memory.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# Driver memory of `kdshield attack` against the data's size", "", f"`{result['command']}`", "",
             "Input: a directory of Parquet shards (100,000 rows each) expanding the packaged Rotten Tomatoes "
             f"training split; test set: its {records[0]['run_rows']['test']:,}-row test split. The job: "
             f"{result['job']}. Peak RSS of the driver process alone (`getrusage(RUSAGE_SELF)`), one fresh process "
             "per size.", "",
             "| rows | driver peak RSS (MB) |", "|---|---|"]
    lines += [f"| {r['rows']:,} | {r['driver_peak_rss_mb']:.0f} |" for r in records]
    lines += ["", f"Largest / smallest: {ratio:.2f}x (target: at most 1.2x). Each job's wall seconds are in the "
              "JSON for orientation only: this is a memory benchmark, and its runs may share the machine."]
    (dest / "driver_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
