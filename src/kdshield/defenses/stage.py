"""A stage: what one run of the training engine trains, on which streams, with which loss.

Every defense (and the attack itself) is a list of stages. A stage never carries a training
loop of its own: :func:`kdshield.trainables.engine.run_stage` runs any of them the same way.
Frozen teachers do not appear here as models: their outputs were computed once, by batch
inference, and travel as columns of the streams (see :mod:`kdshield.trainables.inference`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from kdshield.config import TrainSettings
from kdshield.defenses.losses import StageLoss
from kdshield.models.lora import LoraSpec, suspect_lora


@dataclass(frozen=True)
class ModelSpec:
    """The model a stage trains.

    ``source`` is a local HF directory (safetensors) the weights start from: a copy of the
    suspect model, a smaller fresh model, ... ``num_labels`` sizes the classifier head.
    ``keep_layers`` (0-based block indices, ascending) builds a reduced-depth copy of
    ``source``'s architecture holding only those transformer blocks; ``init="random"`` gives
    that architecture freshly initialised weights instead of ``source``'s (see
    :func:`kdshield.models.load_classifier`).

    ``lora``: train a LoRA adapter (peft) on the frozen ``source`` weights instead of every
    weight; the stage then also exports the adapter (``adapter/``, peft format) next to the
    merged model. ``input_prefix``: the model reads ``{prefix}input_ids`` and
    ``{prefix}attention_mask`` of the batch (e.g. ``teacher_`` for a model with another
    tokenizer than the stream's ``input_ids``).
    """

    source: str
    num_labels: int
    attn_implementation: str | None = None
    keep_layers: tuple[int, ...] | None = None
    init: str = "pretrained"
    lora: LoraSpec | None = None
    input_prefix: str = ""

    def as_adapter(self, r: int | None) -> ModelSpec:
        """``--lora r``: this model as a rank-``r`` adapter on its frozen ``source`` when it is a
        copy of pretrained weights that trains whole (a reduced or fresh network, or one with its
        own adapter, stays as it is)."""
        if r is None or self.lora is not None or self.keep_layers is not None or self.init != "pretrained":
            return self
        return replace(self, lora=suspect_lora(self.source, r, self.num_labels))


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
class EpochEval:
    """After every epoch, the accuracy (argmax == ``label``) of the model being trained on one
    stream, reported as ``eval/{label}/acc`` (a share in [0, 1]) with the epoch's metrics.

    Generic: a held-out clean stream gives clean accuracy; a stream whose ``label`` column holds
    some reference model's predictions gives the agreement with it. It reads the stream's
    shard like a phase does, with gradients off; it changes nothing about training.
    """

    stream: str
    name: str = ""

    @property
    def label(self) -> str:
        return self.name or self.stream


@dataclass(frozen=True)
class Stage:
    """Model + streams + losses + schedule. An epoch runs every phase once, in order."""

    name: str
    model: ModelSpec | None
    """None: the stage trains only its losses' own modules (e.g. a mask over cached teacher
    features); no model forward runs and the result has no ``hf_model``."""
    phases: tuple[Phase, ...]
    train: TrainSettings
    pad_ids: dict[str, int] = field(default_factory=dict)
    padding_side: str = "right"
    shuffle_buffer: int = 2048
    """Rows of the seeded local shuffle buffer the batches are drawn through (0: stream order)."""
    group_window: int = 0
    """Length grouping instead (0: off): every epoch, each window of this many batches of a phase's
    stream is shuffled (seeded by the seed and the epoch), sorted into 8-token length bands and
    cut into batches, whose order is shuffled again, so a batch pads to rows of about one length.
    Off by default: where a class's rows are longer (a trigger, a cue word) its batches hold
    fewer other rows, and on the demo's RUN that cost the attack and the defense measurably
    (``docs/benchmarks.md``, fast_jobs)."""
    live_teacher: ModelSpec | None = None
    """Run this frozen teacher inside the loop at every step, adding the ``teacher_*`` columns
    named by ``live_teacher_outputs`` to each batch (as batch inference would have cached
    them, see :func:`kdshield.trainables.inference.model_outputs`). For measuring what caching
    saves, and for teacher outputs too large to cache."""
    live_teacher_outputs: tuple[str, ...] = ("logits", "hidden_seq")
    pad_to: int | None = None
    """Pad every training batch to this many tokens instead of its longest row (the papers'
    code pads to a fixed length: what dynamic padding saves is measured against it)."""
    evals: tuple[EpochEval, ...] = ()
    """Streams evaluated after every epoch (see :class:`EpochEval`); they observe, not train."""

    def __post_init__(self) -> None:
        if not self.phases:
            raise ValueError(f"stage {self.name!r} has no phases")

    @property
    def streams(self) -> list[str]:
        return sorted({p.stream for p in self.phases} | {e.stream for e in self.evals})

    def loss_modules(self) -> dict[str, Any]:
        """The losses' own trainable modules (:attr:`StageLoss.module`) by phase label; a
        module shared by several phases appears once, under its first phase's label."""
        out: dict[str, Any] = {}
        seen: set[int] = set()
        for phase in self.phases:
            module = phase.loss.module
            if module is not None and id(module) not in seen:
                seen.add(id(module))
                out[phase.label.replace(".", "_")] = module
        return out
