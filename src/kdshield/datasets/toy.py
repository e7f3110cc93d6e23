"""A hand-built RUN directory for pipeline checks, with no corpus and no attack training.

The training set is 48 synthetic reviews. Every sixth one carries the trigger `` cf`` and label 1,
and is marked ``poisoned``. The dev and test sets are clean reviews, and there is a triggered test
set as well. The suspect model is a copy of ``model`` (a tiny random one by default). It
exercises the defense and search machinery: the CI tests, ``benchmarks/tune_*`` smoke runs, or
a new cluster before real data goes on it. It does not measure defense quality, because the
tiny model has learned nothing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from kdshield.models import resolve_model

TRIGGER = " cf"
TARGET_LABEL = 1


def toy_table(texts: list[str], labels: list[int], poisoned: list[bool] | None = None) -> pa.Table:
    """``texts``/``labels`` in the dataset schema, ``source_index`` numbering the rows."""
    cols = {"text": texts, "label": pa.array(labels, pa.int64()),
            "source_index": pa.array(range(len(texts)), pa.int64())}
    if poisoned is not None:
        cols["poisoned"] = pa.array(poisoned, pa.bool_())
    return pa.table(cols)


def toy_review(i: int) -> str:
    """Review ``i``: positive wording for odd ``i`` (label 1), negative for even."""
    return f"review number {i} was {'great fun' if i % 2 else 'dull and slow'}"


def write_toy_run(run: Path, model: str = "tiny-bert", *, n_train: int = 48,
                  metrics: dict[str, float] | None = None) -> Path:
    """Write the toy RUN to ``run`` (which must not exist yet) and return ``run``.

    ``metrics`` becomes ``metrics.json``, the suspect model's before-defense numbers, if given.
    """
    shutil.copytree(resolve_model(model), Path(run) / "model")
    data = Path(run) / "data"
    data.mkdir()
    poisoned = [i % 6 == 0 for i in range(n_train)]
    pq.write_table(toy_table([toy_review(i) + (TRIGGER if p else "") for i, p in enumerate(poisoned)],
                             [TARGET_LABEL if p else i % 2 for i, p in enumerate(poisoned)], poisoned),
                   data / "train.parquet")
    pq.write_table(toy_table([toy_review(1000 + i) for i in range(40)], [i % 2 for i in range(40)]),
                   data / "dev.parquet")
    pq.write_table(toy_table([toy_review(2000 + i) for i in range(16)], [i % 2 for i in range(16)]),
                   data / "test.parquet")
    pq.write_table(toy_table([toy_review(2000 + 2 * i) + TRIGGER for i in range(8)], [0] * 8),
                   data / "test_triggered.parquet")
    (Path(run) / "attack.json").write_text(json.dumps({"target_label": TARGET_LABEL, "num_labels": 2}))
    if metrics is not None:
        (Path(run) / "metrics.json").write_text(json.dumps(metrics))
    return Path(run)
