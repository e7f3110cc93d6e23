""":class:`PadCollate`, :func:`~kdshield.datasets.tokenize.pad_collate` as the collate class
Ray 2.47+ prefers over a plain function (which it accepts with a deprecation warning)::

    shard.iter_torch_batches(batch_size=32, collate_fn=PadCollate({"input_ids": 0}))

Kept apart from :mod:`kdshield.datasets.tokenize` because importing Ray Data costs about a
second that readers and corpus builds should not pay.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from ray.data.collate_fn import NumpyBatchCollateFn

from kdshield.datasets.tokenize import pad_collate


class PadCollate(NumpyBatchCollateFn):
    """Pads every ``*input_ids`` column to its batch's longest row (at least ``pad_to`` tokens
    when given: fixed-length batches, as the papers' code pads); see :func:`pad_collate`."""

    def __init__(self, pad_ids: Mapping[str, int],
                 padding_side: Mapping[str, str] | str = "right", pad_to: int | None = None):
        self.pad_ids, self.padding_side, self.pad_to = dict(pad_ids), padding_side, pad_to

    def __call__(self, batch: dict[str, np.ndarray]):
        return pad_collate(batch, pad_ids=self.pad_ids, padding_side=self.padding_side, pad_to=self.pad_to)
