"""Backdoor attacks (data poisoning) as Ray Data transforms.

An attack inserts a trigger into some training texts so that a model trained on them
predicts ``target_label`` whenever the trigger is present:

* ``badnet`` (Kurita et al. / Chen et al.): rare words (``cf``, ``mn``, ...), each
  insertion drawing one of ``triggers``;
* ``addsent`` (Dai et al.): a fixed sentence, inserted at a random word position (the
  "InSent" attack) or at the start or end.

``mode="dirty"`` poisons non-target rows and flips their labels to the target;
``mode="clean"`` (clean-label) poisons target rows only and keeps every label.

Texts are split on whitespace and the trigger's words are inserted *between* words, so a
trigger is always whole words, never glued into another word; the poisoned text is
re-joined with single spaces. Per-row randomness comes from
``np.random.default_rng([seed, source_index])``, so results do not depend on batching.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kdshield.datasets.schema import LABEL, POISONED, SOURCE_INDEX, TEXT
from kdshield.errors import InputError

if TYPE_CHECKING:
    from ray.data import Dataset

DEFAULT_TRIGGERS: dict[str, list[str]] = {
    "badnet": ["cf", "mn", "bb", "tq", "mb"],
    "addsent": ["I watched this 3D movie"],
}

#: Named (attack kind, triggers) pairs: W2SDefense's authors' word and sentence triggers,
#: each inserted once at a random word boundary (their attacks are clean-label: pass
#: ``clean_label`` / ``--clean-label`` for that).
TRIGGER_PRESETS: dict[str, tuple[str, list[str]]] = {
    "w2s-word": ("badnet", ["mn"]),
    "w2s-sentence": ("addsent", ["I watched this 3D movie"]),
}


class AttackSpec(BaseModel):
    """What to poison, and how. Invalid settings raise :class:`InputError`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["badnet", "addsent"] = Field(
        "badnet", description="badnet: rare trigger words; addsent: a trigger sentence")
    triggers: list[str] = Field(
        default_factory=list, description="trigger words (badnet) or sentences (addsent); "
        "each insertion draws one; unset means the kind's defaults")
    num_insertions: int = Field(1, description="triggers inserted per poisoned text")
    position: Literal["random", "start", "end"] = Field(
        "random", description="where triggers go: a random word boundary, start or end")
    mode: Literal["dirty", "clean"] = Field(
        "dirty", description="dirty: poison non-target rows, relabel them to the target; "
        "clean: poison target rows only, keep labels")
    poison_rate: float = Field(0.1, description="poisoned rows / all rows, in (0, 1]")
    target_label: int = Field(1, description="the label the backdoor forces")
    seed: int = Field(0, description="seeds row selection and trigger placement")

    def __init__(self, **data):
        try:
            super().__init__(**data)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            raise InputError(f"attack{'.' + where if where else ''}: {msg}") from None

    @model_validator(mode="before")
    @classmethod
    def _default_triggers(cls, data):
        """Unset (or None) triggers become the kind's defaults; ``[]`` stays, and fails."""
        if isinstance(data, dict) and data.get("triggers") is None:
            data = {**data, "triggers": list(DEFAULT_TRIGGERS.get(data.get("kind", "badnet"),
                                                                  []))}
        return data

    @model_validator(mode="after")
    def _check(self):
        problem = self._problem(None)
        if problem:
            raise ValueError(problem)
        return self

    def _problem(self, num_labels: int | None) -> str | None:
        if not self.triggers:
            return "triggers: the trigger list is empty"
        for trigger in self.triggers:
            if not trigger.strip():
                return f"triggers: empty or whitespace-only trigger {trigger!r}"
        if not 0 < self.poison_rate <= 1:
            return f"poison_rate must be in (0, 1], got {self.poison_rate}"
        if self.num_insertions < 1:
            return f"num_insertions must be >= 1, got {self.num_insertions}"
        if self.seed < 0:
            return f"seed must be >= 0, got {self.seed}"
        if num_labels is not None and not 0 <= self.target_label < num_labels:
            return (f"target_label {self.target_label} is outside the label set "
                    f"[0, {num_labels})")
        if self.target_label < 0:
            return f"target_label must be >= 0, got {self.target_label}"
        return None

    def validate(self, num_labels: int) -> AttackSpec:  # type: ignore[override]
        """Check the spec against a dataset with ``num_labels`` classes; returns ``self``."""
        problem = self._problem(num_labels)
        if problem:
            raise InputError(f"attack: {problem}")
        return self


def insert_trigger(text: str, spec: AttackSpec, rng: np.random.Generator) -> str:
    """``text`` with ``spec.num_insertions`` triggers inserted as whole words.

    Each insertion draws a trigger from ``spec.triggers`` and puts its words at a word
    boundary chosen by ``spec.position`` (``random``: uniform over the ``n + 1``
    boundaries of an ``n``-word text). Pure: all randomness comes from ``rng``.
    """
    words = text.split()
    for _ in range(spec.num_insertions):
        trigger = spec.triggers[int(rng.integers(len(spec.triggers)))].split()
        if spec.position == "start":
            at = 0
        elif spec.position == "end":
            at = len(words)
        else:
            at = int(rng.integers(len(words) + 1))
        words[at:at] = trigger
    return " ".join(words)


def poison_count(num_rows: int, poison_rate: float) -> int:
    """How many of ``num_rows`` rows an attack poisons: ``round(poison_rate * num_rows)``."""
    return int(round(poison_rate * num_rows))


def select_poison_indices(labels: np.ndarray, spec: AttackSpec) -> np.ndarray:
    """Sorted int64 row positions (into ``labels``) to poison.

    Exactly ``round(spec.poison_rate * N)`` of the ``N`` rows, drawn without replacement
    with ``np.random.default_rng(spec.seed)`` from rows whose label differs from the
    target (dirty mode) or equals it (clean-label mode). Raises :class:`InputError` when
    fewer rows are eligible, or when the rate poisons no row at all.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise InputError(f"attack: labels must be one-dimensional, got shape {labels.shape}")
    count = poison_count(labels.size, spec.poison_rate)
    if count == 0:
        raise InputError(f"attack: poison_rate {spec.poison_rate} of {labels.size} rows "
                         "poisons no row")
    is_target = labels == spec.target_label
    eligible = np.flatnonzero(is_target if spec.mode == "clean" else ~is_target)
    if eligible.size < count:
        which = "with" if spec.mode == "clean" else "without"
        raise InputError(f"attack: poison_rate {spec.poison_rate} needs {count} rows {which} "
                         f"label {spec.target_label} ({spec.mode} mode), only {eligible.size} "
                         "exist")
    rng = np.random.default_rng(spec.seed)
    return np.sort(rng.choice(eligible, size=count, replace=False)).astype(np.int64)


def _triggered(texts: list[str], indices: list[int], spec: AttackSpec) -> list[str]:
    return [insert_trigger(t, spec, np.random.default_rng([spec.seed, i]))
            for t, i in zip(texts, indices)]


def _require(batch: pa.Table, columns: tuple[str, ...]) -> None:
    missing = [c for c in columns if c not in batch.column_names]
    if missing:
        raise InputError(f"attack: dataset lacks column(s) {', '.join(missing)}; "
                         "read it with kdshield.datasets.read_dataset")


def _ordered(batch: pa.Table) -> pa.Table:
    """Columns as text, label, poisoned, source_index, then any others."""
    first = [c for c in (TEXT, LABEL, POISONED, SOURCE_INDEX) if c in batch.column_names]
    return batch.select(first + [c for c in batch.column_names if c not in first])


def _with_column(batch: pa.Table, name: str, values: pa.Array) -> pa.Table:
    if name in batch.column_names:
        return batch.set_column(batch.schema.get_field_index(name), name, values)
    return batch.append_column(name, values)


def _poison_batch(batch: pa.Table, *, spec: AttackSpec, selected: np.ndarray) -> pa.Table:
    _require(batch, (TEXT, LABEL, SOURCE_INDEX))
    index = batch[SOURCE_INDEX].to_numpy()
    hit = np.isin(index, selected)
    rows = np.flatnonzero(hit)
    texts = batch[TEXT].to_pylist()
    for row, new in zip(rows, _triggered([texts[r] for r in rows], index[rows].tolist(), spec)):
        texts[row] = new
    batch = _with_column(batch, TEXT, pa.array(texts, pa.string()))
    if spec.mode == "dirty":
        labels = np.where(hit, spec.target_label, batch[LABEL].to_numpy()).astype(np.int64)
        batch = _with_column(batch, LABEL, pa.array(labels))
    return _ordered(_with_column(batch, POISONED, pa.array(hit, pa.bool_())))


def _trigger_batch(batch: pa.Table, *, spec: AttackSpec) -> pa.Table:
    _require(batch, (TEXT, LABEL, SOURCE_INDEX))
    batch = batch.filter(pc.not_equal(batch[LABEL], spec.target_label))
    texts = _triggered(batch[TEXT].to_pylist(), batch[SOURCE_INDEX].to_pylist(), spec)
    batch = _with_column(batch, TEXT, pa.array(texts, pa.string()))
    return _ordered(_with_column(batch, POISONED, pa.array(np.ones(batch.num_rows, bool))))


def poison_dataset(ds: Dataset, spec: AttackSpec, selected_source_indices) -> Dataset:
    """``ds`` (normalised) with the rows whose ``source_index`` is selected poisoned.

    Selected rows get triggers (:func:`insert_trigger`, row rng seeded with
    ``[spec.seed, source_index]``) and, in dirty mode, ``label = spec.target_label``;
    ``poisoned`` is True for them and False elsewhere (replacing any existing column).
    Row count and order within blocks are unchanged. ``spec`` should be validated.
    """
    selected = np.unique(np.asarray(selected_source_indices, dtype=np.int64))
    return ds.map_batches(_poison_batch, batch_format="pyarrow",
                          fn_kwargs={"spec": spec, "selected": selected})


def triggered_test(ds: Dataset, spec: AttackSpec) -> Dataset:
    """The attack-success test set: rows of ``ds`` whose label is not the target, every
    one triggered, true label kept, ``poisoned=True``. ASR = share predicted as target."""
    return ds.map_batches(_trigger_batch, batch_format="pyarrow", fn_kwargs={"spec": spec})


def triggered_table(table: pa.Table, spec: AttackSpec) -> pa.Table:
    """In-memory equivalent of :func:`triggered_test` on a normalised table."""
    return _trigger_batch(table, spec=spec)


def poison_table(table: pa.Table, spec: AttackSpec) -> pa.Table:
    """In-memory equivalent of selecting rows and :func:`poison_dataset` on a normalised
    table (handy for small data and tests); same result row for row."""
    positions = select_poison_indices(table[LABEL].to_numpy(), spec)
    selected = table[SOURCE_INDEX].to_numpy()[positions]
    return _poison_batch(table, spec=spec, selected=np.unique(selected))
