"""Datasets in one Arrow schema: readers, packaged real corpora, attacks, tokenisation.

Every table has ``text: string``, ``label: int64`` in ``[0, num_labels)``, an optional
``poisoned: bool`` and ``source_index: int64`` (see :mod:`kdshield.datasets.schema`).
Readers (:func:`read_table`, :func:`read_dataset`) validate input on the driver with
pyarrow before any Ray work; attacks and tokenisation are Ray Data ``map_batches``
transforms; :func:`pad_collate` (or the class :class:`PadCollate`) pads per batch in
``iter_torch_batches``.
"""

from kdshield.datasets.attacks import (
    DEFAULT_TRIGGERS,
    TRIGGER_PRESETS,
    AttackSpec,
    insert_trigger,
    poison_count,
    poison_dataset,
    poison_table,
    select_poison_indices,
    triggered_test,
)
from kdshield.datasets.augment import split_count, split_tokens, token_split_dataset, token_split_table
from kdshield.datasets.corpora import (
    CORPORA,
    Corpus,
    build_corpus,
    get_corpus,
    label_names,
    load_corpus,
    stratified_split,
)
from kdshield.datasets.schema import (
    LABEL,
    POISONED,
    SCHEMA,
    SOURCE_INDEX,
    TEXT,
    normalize_batch,
    normalize_table,
    num_labels_of,
)
from kdshield.datasets.sources import read_dataset, read_table, write_table
from kdshield.datasets.tokenize import pad_collate, tokenize_dataset

__all__ = [
    "CORPORA", "DEFAULT_TRIGGERS", "TRIGGER_PRESETS", "LABEL", "POISONED", "SCHEMA", "SOURCE_INDEX", "TEXT",
    "AttackSpec", "Corpus", "build_corpus", "get_corpus", "insert_trigger", "label_names",
    "load_corpus", "normalize_batch", "normalize_table", "num_labels_of",
    "pad_collate", "poison_count", "poison_dataset", "poison_table", "read_dataset",
    "read_table", "select_poison_indices", "stratified_split", "tokenize_dataset",
    "triggered_test", "write_table", "PadCollate", "split_count", "split_tokens",
    "token_split_dataset", "token_split_table",
]


def __getattr__(name: str):
    # PadCollate subclasses a Ray Data class; import Ray only when it is asked for.
    if name == "PadCollate":
        from kdshield.datasets.collate import PadCollate

        return PadCollate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
