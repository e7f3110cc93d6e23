"""A stage: what one run of the training engine trains, on which streams, with which loss.

Every defense (and the attack itself) is a list of stages. A stage never carries a training
loop of its own: :func:`kdshield.trainables.engine.run_stage` runs any of them the same way.
Frozen teachers do not appear here as models: their outputs were computed once, by batch
inference, and travel as columns of the streams (see :mod:`kdshield.trainables.inference`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kdshield.config import TrainSettings
from kdshield.defenses.losses import StageLoss


@dataclass(frozen=True)
class ModelSpec:
    """The model a stage trains.

    ``source`` is a local HF directory (safetensors) the weights start from: a copy of the
    suspect model, a smaller fresh model, ... ``num_labels`` sizes the classifier head.
    """

    source: str
    num_labels: int
    attn_implementation: str | None = None


@dataclass(frozen=True)
class Phase:
    """One pass over one stream with one loss, inside an epoch (a "cycle" in BeDKD terms)."""

    stream: str
    loss: StageLoss
    name: str = ""

    @property
    def label(self) -> str:
        return self.name or self.stream


@dataclass(frozen=True)
class Stage:
    """Model + streams + losses + schedule. An epoch runs every phase once, in order."""

    name: str
    model: ModelSpec
    phases: tuple[Phase, ...]
    train: TrainSettings
    pad_ids: dict[str, int] = field(default_factory=dict)
    padding_side: str = "right"
    shuffle_buffer: int = 2048
    live_teacher: ModelSpec | None = None
    """Run this frozen teacher inside the loop at every step, adding ``teacher_logits`` and
    ``teacher_hidden_seq`` to each batch. Only for measuring what caching saves: stages
    normally read those columns precomputed by batch inference."""

    def __post_init__(self) -> None:
        if not self.phases:
            raise ValueError(f"stage {self.name!r} has no phases")

    @property
    def streams(self) -> list[str]:
        return sorted({p.stream for p in self.phases})
