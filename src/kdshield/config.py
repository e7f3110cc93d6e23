"""Typed job settings, validated before any Ray work starts.

Settings come from command-line flags, ``--set key=value`` pairs and YAML files; all of them
end up in these pydantic models, whose validation errors are turned into one-line
:class:`~kdshield.errors.InputError` messages by :func:`parse_settings`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer, model_validator

from kdshield.errors import InputError

M = TypeVar("M", bound=BaseModel)


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # settings added after job records were first written: left out of dumps while at their
    # defaults, so records (and the RUNs, cached stages and results they identify) written before
    # them still match
    _LATE_DEFAULTS: ClassVar[dict[str, Any]] = {}

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        data = handler(self)
        for key, default in self._LATE_DEFAULTS.items():
            if data.get(key, default) == default:
                data.pop(key, None)
        return data


class ScalingSettings(_Settings):
    """Where and how wide a job runs."""

    workers: int = Field(1, ge=1, description="Ray Train workers per training stage")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved for each worker")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs reserved for each worker")
    zero: Literal[0, 1, 2, 3] = Field(0, description="DeepSpeed ZeRO stage")
    bf16: bool = Field(False, description="bf16 mixed precision (fp32 otherwise)")
    address: str | None = Field(None, description="Ray address (auto, ray://...); None starts a local Ray")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    max_failures: int = Field(2, ge=0, description="worker-group restarts allowed, each from the last checkpoint")
    in_process: bool | None = Field(
        None, description="train in the job's own process instead of a Ray Train worker group (default: when "
                          "the job is one CPU worker on a Ray it starts itself); a worker group restarts a worker "
                          "that died, in process the job dies with it")
    grad_accum: int = Field(1, ge=1, description=(
        "micro-batches whose gradients add up to one optimizer step (the effective batch is batch_size x "
        "grad_accum x workers)"))
    gradient_checkpointing: bool = Field(False, description=(
        "recompute activations in the backward pass instead of keeping them (memory for compute)"))
    offload: Literal["none", "optimizer", "optimizer+params"] = Field("none", description=(
        "DeepSpeed ZeRO-Offload from GPU to CPU memory: the optimizer state (ZeRO 1-3), and the "
        "parameters too (ZeRO 3)"))

    _LATE_DEFAULTS: ClassVar[dict[str, Any]] = {"in_process": None, "grad_accum": 1, "gradient_checkpointing": False,
                                                "offload": "none"}

    @model_validator(mode="after")
    def _offload_needs(self):
        if self.offload == "optimizer+params" and self.zero != 3:
            raise ValueError("offload=optimizer+params partitions parameters to offload them: it needs zero=3")
        if self.offload != "none" and self.zero == 0:
            raise ValueError(f"offload={self.offload} offloads ZeRO's partitioned optimizer state: it needs zero 1-3")
        if self.offload != "none" and not self.gpus_per_worker:
            raise ValueError(f"offload={self.offload} moves GPU memory to CPU memory: the job has no GPU "
                             "(--gpus-per-worker); on CPU everything is in CPU memory already")
        return self

    def resolved(self) -> ScalingSettings:
        """These settings with the machine-dependent default filled in: a job of one CPU worker
        on a Ray it starts itself trains on every core of this machine unless ``cpus_per_worker``
        was given."""
        if "cpus_per_worker" in self.model_fields_set or self.workers != 1 or self.gpus_per_worker or self.address:
            return self
        return self.model_copy(update={"cpus_per_worker": float(os.cpu_count() or 1)})

    def describe(self, in_process: bool) -> str:
        """One line: where the job trains and on how many threads."""
        threads = max(1, int(self.cpus_per_worker))
        if in_process:
            return f"training in this process on {threads} thread(s)"
        return f"training on {self.workers} Ray Train worker(s), {threads} thread(s) each"


class TrainSettings(_Settings):
    """One training stage's optimisation settings."""

    epochs: int = Field(3, ge=1, description="passes over the training set")
    lr: float = Field(3e-5, gt=0, le=1.0, description="peak learning rate (AdamW, linear warm-up and decay)")
    batch_size: int = Field(32, ge=1, description="per-worker micro-batch size")
    max_length: int = Field(64, ge=8, le=8192, description="tokens per sample after truncation")
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, ge=0, description="global gradient-norm clip; 0 disables")
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    checkpoint_interval_s: float = Field(
        60.0, ge=0, description="checkpoint after an epoch only when this long has passed since the last "
                                "one (0: every epoch); the final epoch always writes the model")
    seed: int = Field(0, description="seed of shuffling, sampling and initialisation")
    max_steps_per_epoch: int | None = Field(None, ge=1, description=(
        "end each phase's pass over its stream after this many micro-batches per worker (smoke runs, "
        "benchmarks on large data); None: the whole stream"))

    _LATE_DEFAULTS: ClassVar[dict[str, Any]] = {"max_steps_per_epoch": None}


def _format_error(source: str, err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "settings"
    if first["type"] == "missing":
        return f"{source}: {where} is required (a flag, or a key of --config)"
    if first["type"] == "value_error":  # a validator's own sentence says what is wrong
        return f"{source}: {where}: {first['msg'].removeprefix('Value error, ')}"
    value = first.get("input")
    return f"{source}: {where}={value!r}: {first['msg']}"


def parse_settings(model: type[M], values: dict[str, Any], *, source: str) -> M:
    """Validate ``values`` into ``model``; a bad value raises a one-line InputError."""
    try:
        return model.model_validate(values)
    except ValidationError as err:
        raise InputError(_format_error(source, err)) from None


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, except that ``3e-5`` is a float (as in YAML 1.2 and Python), not the
    string YAML 1.1 makes of an exponent without a decimal point."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                              list("-+0123456789."))


def read_yaml(text: str) -> Any:
    """``text`` parsed as YAML by :class:`_Loader` (safe: plain data only)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def parse_assignments(pairs: list[str] | None) -> dict[str, Any]:
    """``["alpha=0.3", "lr=3e-5"]`` -> ``{"alpha": 0.3, "lr": 3e-05}`` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--set {pair!r}: expected key=value")
        try:
            out[key.strip()] = read_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise InputError(f"--set {pair!r}: not a YAML value ({str(err).splitlines()[0]})") from None
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from ``path``; missing file, bad YAML or a non-mapping raise InputError."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such config file")
    try:
        data = read_yaml(p.read_text())
    except yaml.YAMLError as err:
        raise InputError(f"{p}: not valid YAML ({str(err).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"{p}: expected a mapping of settings, got {type(data).__name__}")
    return data


def redact_url(url: str) -> str:
    """A database URL for display and records: its password replaced by ``***`` (anything that
    does not parse as a URL becomes ``<storage>``, since it may hold a secret in another shape)."""
    from sqlalchemy.engine import make_url  # SQLAlchemy comes with optuna; only storage URLs need it

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - any parse failure: show nothing of it
        return "<storage>"
