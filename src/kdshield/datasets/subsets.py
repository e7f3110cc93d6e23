"""Defense-side table transforms: seeded per-class subsets and relabelled copies (pyarrow only)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def sample_per_class(table: pa.Table, n: int | None, seed: int) -> pa.Table:
    """Up to ``n`` rows of every label, chosen by ``seed`` (all of a label's rows if fewer; the
    whole table when ``n`` is None), in the table's order."""
    if n is None:
        return table
    labels = table.column("label").to_numpy()
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(labels == y))[:n] for y in np.unique(labels)]
    return table.take(pa.array(np.sort(np.concatenate(keep))))


def with_labels(table: pa.Table, labels: np.ndarray) -> pa.Table:
    """``table`` with its ``label`` column replaced by ``labels`` [N]."""
    return table.set_column(table.schema.get_field_index("label"), "label", pa.array(labels, pa.int64()))
