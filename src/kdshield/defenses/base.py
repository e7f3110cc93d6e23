"""What a defense is to the rest of kdshield: the spec it registers, the inputs it receives and
the context its recipe talks to.

A defense lives in one folder under ``kdshield/defenses/`` (``config.py``, ``losses.py``,
``recipe.py``) and registers a :class:`DefenseSpec` per method from its ``__init__.py``. Its recipe
is a plain function ``recipe(ctx) -> (model_dir, info)`` that reads top to bottom: it builds
streams, asks for frozen teachers' outputs, trains stages and returns the directory of the
defended model plus what it wants recorded. It never imports Ray or DeepSpeed: every such
service comes from the :class:`Context` it is given. ``kdshield.trainables`` implements the
context on Ray Train + DeepSpeed + Ray Data; ``tests/fake_context.py`` implements it in process,
so recipe tests need no Ray.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa

from kdshield.config import _Settings, parse_settings
from kdshield.defenses.stage import ModelSpec, Phase
from kdshield.errors import InputError


@dataclass
class Inputs:
    """Resolved, validated inputs of a defense (Arrow tables in the one schema)."""

    model_dir: str               # the suspect model (a local HF directory, safetensors)
    train: pa.Table              # the suspect (possibly poisoned) training set
    clean: pa.Table              # clean samples the defender trusts
    test: pa.Table               # clean test set
    triggered: pa.Table | None   # triggered test set (benchmarks), for ASR
    target_label: int | None     # the attack's target label, for ASR
    num_labels: int


class StageOutput(Protocol):
    """What a trained stage leaves behind (``kdshield.trainables.engine.StageResult``)."""

    model_dir: Path | None
    adapter_dir: Path | None
    history: list[dict[str, Any]]
    seconds: float

    def extras(self) -> dict[str, Any]:
        """The losses' trained modules' state dict, keyed ``{phase label}.{state key}``."""


class Context(Protocol):
    """Everything a recipe may ask of the system that runs it.

    A *stream* is an opaque handle on a tokenised table (a Ray Dataset in the real context);
    recipes pass streams around and read columns back only through :meth:`columns`.
    """

    inputs: Inputs
    config: Any                  # the method's typed config (its own class, validated)
    work: Path                   # the job's staging directory (becomes OUT)
    workers: int                 # training workers per stage
    live_teachers: bool          # --teacher-outputs live: frozen teachers run inside the loop

    def stream(self, table: pa.Table, *, tokenizer: str | None = None, prefix: str = "") -> Any:
        """``table`` tokenised (by ``tokenizer``, default the suspect's) into ``{prefix}input_ids``."""

    def retokenize(self, stream: Any, tokenizer: str, *, prefix: str) -> Any:
        """``stream`` plus a second tokenisation of its text into ``{prefix}input_ids``."""

    def teacher(self, stream: Any, model_dir: str, outputs: tuple[str, ...], *, input_prefix: str = "",
                attn_implementation: str | None = None) -> Any:
        """``stream`` plus the frozen model's ``teacher_{output}`` columns, computed once per content
        (shared through the content-hashed teacher cache across the trials of a search)."""

    def map(self, stream: Any, fn: Callable[..., dict], **kwargs: Any) -> Any:
        """``stream`` with ``fn(batch: dict[str, np.ndarray], **kwargs) -> dict`` applied to each batch."""

    def train(self, name: str, model: ModelSpec | None, phases: list[Phase], streams: dict[str, Any], *,
              epochs: int, lr: float, batch_size: int | None = None, pad_ids: dict | None = None,
              padding_side: Any = None, live_teacher: ModelSpec | None = None,
              live_outputs: tuple[str, ...] = ("logits", "hidden_seq")) -> StageOutput:
        """Run one stage on the engine (the config's batch size, max length and seed by default)."""

    def predict(self, stream: Any, model_dir: str, outputs: tuple[str, ...] = ("logits",), *,
                input_prefix: str = "") -> dict[str, Any]:
        """The model's outputs on every row, in row order (numpy arrays keyed by output name)."""

    def columns(self, stream: Any, names: list[str]) -> dict[str, Any]:
        """Columns of ``stream`` as numpy arrays, in row order."""

    def evaluate(self, model_dir: str) -> dict[str, float]:
        """CACC (and ASR, no-trigger ASR where a triggered test set is known) of a model."""

    def timed(self, name: str) -> Any:
        """Context manager adding the seconds spent inside it to ``stage_seconds[name]``."""

    def say(self, message: str) -> None:
        """One progress line for the person running the job."""


Recipe = Callable[[Context], "tuple[str, dict[str, Any]]"]
Check = Callable[[Any, Inputs, str], None]


@dataclass(frozen=True)
class Derived:
    """A search knob that is not a config field: ``apply(values, defaults)`` turns it into fields."""

    doc: str
    replaces: tuple[str, ...]
    apply: Callable[[dict[str, Any], dict[str, Any]], None]
    low_exclusive: float | None = None  # values must be > this


@dataclass(frozen=True)
class DefenseSpec:
    """One method, as registered by its folder."""

    name: str
    summary: str                           # one line for `kdshield defend --help` and list_defenses()
    config: type[_Settings]                # the method's settings: only the fields it uses
    recipe: Recipe
    final_stages: tuple[str, ...]          # stages whose model becomes the defended model (tune's eval hook)
    epoch_setting: str                     # the config field counting those stages' epochs (what ASHA counts)
    check: Check | None = None             # model-dependent checks before any Ray work: (config, inputs, teacher_outputs)
    derived: dict[str, Derived] = field(default_factory=dict)
    reference: str = ""                    # the paper
    # every model it trains starts from the suspect's weights, so `--lora R` can make each an
    # adapter on one frozen base (False: it trains another network whole, or has its own LoRA)
    suspect_copies: bool = True

    def parse(self, values: dict[str, Any]):
        """``values`` (``--set`` / YAML) parsed once into the method's config; a setting the
        method does not have is refused with one line listing those it has."""
        unknown = sorted(set(values) - set(self.config.model_fields))
        if unknown:
            raise InputError(f"{self.name} settings: unknown setting(s) {', '.join(unknown)}; {self.name} has: "
                             f"{', '.join(sorted(self.config.model_fields))}")
        return parse_settings(self.config, values, source=f"{self.name} settings")


_REGISTRY: dict[str, DefenseSpec] = {}


def register(*specs: DefenseSpec) -> None:
    """Called by a defense folder's ``__init__.py``, once per method it holds."""
    for spec in specs:
        if spec.name in _REGISTRY and _REGISTRY[spec.name] is not spec:
            raise ValueError(f"defense {spec.name!r} registered twice")
        if spec.epoch_setting not in spec.config.model_fields:
            raise ValueError(f"{spec.name}: epoch_setting {spec.epoch_setting!r} is not a field of "
                             f"{spec.config.__name__}")
        _REGISTRY[spec.name] = spec


def registered() -> Iterator[DefenseSpec]:
    return iter(_REGISTRY.values())
