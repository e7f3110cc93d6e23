"""Defense-side augmentation: MBTSAD's token splitting, as a Ray Data transform.

Token splitting (MBTSAD Sec. III-B1, following its ref. [10]): a text of ``n`` whitespace
tokens gets ``k = max(min_tokens, floor(ratio * n))`` *target* tokens (at most the number of
tokens that can be split, i.e. that have at least two characters), chosen uniformly without
replacement; each target token ``c_1 ... c_l`` is split at a uniform random position
``p in [1, l - 1]`` into ``c_1 ... c_p`` and ``c_{p+1} ... c_l``, in place, separated by one
space. The paper's example: "a stirring, funny and finally transporting re-imagining of beauty"
becomes "a st irring, fu nny and finally transporting re-im agining of be auty".

Every clean row yields ``copies`` augmented rows (the paper's N = 3), with the original label,
``source_index`` and an ``augment_copy`` column (0 .. copies-1). Each row's randomness comes
from ``np.random.default_rng([seed, source_index, copy])``, so the result does not depend on
how Ray batches or orders the rows.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from kdshield.datasets.schema import SOURCE_INDEX, TEXT
from kdshield.errors import InputError

if TYPE_CHECKING:
    from ray.data import Dataset

AUGMENT_COPY = "augment_copy"


def split_count(n_tokens: int, *, ratio: float = 0.3, min_tokens: int = 10) -> int:
    """How many target tokens a text of ``n_tokens`` tokens asks for:
    ``max(min_tokens, floor(ratio * n_tokens))`` (before capping at the splittable ones)."""
    return max(min_tokens, math.floor(ratio * n_tokens + 1e-9))


def _check(ratio: float, min_tokens: int, copies: int = 1) -> None:
    if not 0 < ratio <= 1:
        raise InputError(f"token split: ratio must be in (0, 1], got {ratio}")
    if min_tokens < 0:
        raise InputError(f"token split: min_tokens must be >= 0, got {min_tokens}")
    if copies < 1:
        raise InputError(f"token split: copies must be >= 1, got {copies}")


def split_tokens(text: str, rng: np.random.Generator, *, ratio: float = 0.3,
                 min_tokens: int = 10) -> tuple[str, int]:
    """``(augmented text, number of tokens split)``. Tokens are whitespace-separated; the
    result joins them with single spaces. Pure: all randomness comes from ``rng``."""
    _check(ratio, min_tokens)
    tokens = text.split()
    splittable = [i for i, t in enumerate(tokens) if len(t) >= 2]
    k = min(len(splittable), split_count(len(tokens), ratio=ratio, min_tokens=min_tokens))
    if k == 0:
        return " ".join(tokens), 0
    targets = set(rng.choice(np.asarray(splittable), size=k, replace=False).tolist())
    out = []
    for i, tok in enumerate(tokens):
        if i in targets:
            p = int(rng.integers(1, len(tok)))  # 1 .. len-1: both pieces non-empty
            out += [tok[:p], tok[p:]]
        else:
            out.append(tok)
    return " ".join(out), k


def _split_batch(batch: pa.Table, *, copies: int, ratio: float, min_tokens: int, seed: int) -> pa.Table:
    for col in (TEXT, SOURCE_INDEX):
        if col not in batch.column_names:
            raise InputError(f"token split: dataset lacks column {col!r}")
    texts = batch[TEXT].to_pylist()
    index = batch[SOURCE_INDEX].to_pylist()
    rows = np.repeat(np.arange(batch.num_rows), copies)
    out = batch.take(pa.array(rows, pa.int64()))
    new_texts = [split_tokens(texts[r], np.random.default_rng([seed, int(index[r]), c]), ratio=ratio,
                              min_tokens=min_tokens)[0]
                 for r, c in zip(rows, np.tile(np.arange(copies), batch.num_rows))]
    out = out.set_column(out.schema.get_field_index(TEXT), TEXT, pa.array(new_texts, pa.string()))
    copy_col = pa.array(np.tile(np.arange(copies), batch.num_rows).astype(np.int64))
    if AUGMENT_COPY in out.column_names:
        return out.set_column(out.schema.get_field_index(AUGMENT_COPY), AUGMENT_COPY, copy_col)
    return out.append_column(AUGMENT_COPY, copy_col)


def token_split_table(table: pa.Table, *, copies: int = 3, ratio: float = 0.3, min_tokens: int = 10,
                      seed: int = 0) -> pa.Table:
    """In-memory token splitting of a normalised table (``copies`` rows per row, in order:
    row 0's copies, then row 1's ...); the same rows as :func:`token_split_dataset`."""
    _check(ratio, min_tokens, copies)
    return _split_batch(table, copies=copies, ratio=ratio, min_tokens=min_tokens, seed=seed)


def token_split_dataset(ds: Dataset, *, copies: int = 3, ratio: float = 0.3, min_tokens: int = 10,
                        seed: int = 0) -> Dataset:
    """``ds`` (normalised, with ``source_index``) with every row replaced by ``copies``
    token-split rows (:func:`split_tokens`), as a Ray Data ``map_batches`` transform."""
    _check(ratio, min_tokens, copies)
    return ds.map_batches(_split_batch, batch_format="pyarrow",
                          fn_kwargs={"copies": copies, "ratio": ratio, "min_tokens": min_tokens,
                                     "seed": seed})
