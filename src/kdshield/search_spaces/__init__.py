"""Search spaces of the defenses, one per method: code (this registry) plus editable YAML.

A space file (``<method>.yaml`` beside this module, one per defense, are the packaged defaults;
``kdshield tune --space FILE`` takes a user's copy) reads::

    method: bedkd
    params:                       # what the search varies
      lam: {type: float, low: 0.1, high: 0.9}
      akd_lr: {type: float, low: 1.0e-5, high: 1.0e-4, log: true}
      akd_cycles: {type: int, low: 5, high: 50, log: true}
      alpha: {type: categorical, choices: [0.3, 0.5]}
    fixed:                        # settings every trial gets unchanged
      punish: bounded

Every name is a field of the method's config class (its registered
:class:`~kdshield.defenses.base.DefenseSpec`) or one of the method's *derived* knobs (BeDKD:
``nc_np_ratio``, which sets ``n_p = round(n_c / nc_np_ratio)``). :func:`load_space` validates a
file completely before anything runs: unknown names, ``low >= high``, ``log`` with ``low <= 0``,
a bound or choice the config class refuses, a combination of fixed and searched values that
cannot form a valid config; each problem is one :class:`~kdshield.errors.InputError` line
naming the file and the parameter.

Adding a defense's space is a data change: write ``<method>.yaml`` here; everything else the
search needs (config class, the stage that trains the defended model, derived knobs) comes from
the defense's registration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from kdshield import defenses
from kdshield.config import parse_settings, read_yaml
from kdshield.defenses.base import DefenseSpec
from kdshield.errors import InputError

__all__ = ["ParamSpec", "SearchSpace", "load_space", "method_spec", "space_path"]


# ----------------------------------------------------------------------------- methods

def method_spec(method: str) -> DefenseSpec:
    """The registered defense ``method`` (its config class, final stages, derived knobs)."""
    known = defenses.specs()
    if method not in known:
        raise InputError(f"tune: no defense {method!r} (known: {', '.join(known)})")
    if not space_path(method).is_file():
        raise InputError(f"tune: defense {method!r} has no packaged search space ({space_path(method).name})")
    return known[method]


# ----------------------------------------------------------------------------- parameters

@dataclass(frozen=True)
class ParamSpec:
    """One searched knob: ``float``/``int`` in [low, high] (``log`` or ``step``), or ``categorical``."""

    name: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple | None = None

    def values_to_check(self) -> list:
        return list(self.choices) if self.type == "categorical" else [self.low, self.high]

    def first(self):
        return self.choices[0] if self.type == "categorical" else self.low

    def distribution(self):
        import optuna.distributions as od

        if self.type == "categorical":
            return od.CategoricalDistribution(list(self.choices))
        if self.type == "int":
            return od.IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return od.FloatDistribution(float(self.low), float(self.high), log=self.log, step=self.step)

    def describe(self) -> str:
        if self.type == "categorical":
            return f"one of {list(self.choices)}"
        scale = " (log)" if self.log else f" step {self.step}" if self.step else ""
        return f"{self.type} in [{self.low}, {self.high}]{scale}"


def _number(where: str, key: str, raw, kind: str):
    if isinstance(raw, bool) or raw is None:
        raise InputError(f"{where}: {key} must be a number, got {raw!r}")
    try:
        value = float(raw)  # PyYAML reads 1e-5 (no dot) as a string
    except (TypeError, ValueError):
        raise InputError(f"{where}: {key} must be a number, got {raw!r}") from None
    if not math.isfinite(value):
        raise InputError(f"{where}: {key} must be finite, got {raw!r}")
    if kind == "int":
        if value != int(value):
            raise InputError(f"{where}: {key} must be an integer for an int parameter, got {raw!r}")
        return int(value)
    return value


_KEYS = {"float": {"type", "low", "high", "log", "step"}, "int": {"type", "low", "high", "log", "step"},
         "categorical": {"type", "choices"}}


def _param(source: str, name: str, raw) -> ParamSpec:
    where = f"{source}: params.{name}"
    if not isinstance(raw, dict):
        raise InputError(f"{where}: expected a mapping like {{type: float, low: 0.1, high: 0.9}}, got {raw!r}")
    kind = raw.get("type")
    if kind not in _KEYS:
        raise InputError(f"{where}: type must be float, int or categorical, got {kind!r}")
    extra = set(raw) - _KEYS[kind]
    if extra:
        raise InputError(f"{where}: unknown keys {sorted(extra)} for a {kind} parameter "
                         f"(allowed: {sorted(_KEYS[kind])})")
    if kind == "categorical":
        choices = raw.get("choices")
        if not isinstance(choices, list) or not choices:
            raise InputError(f"{where}: categorical needs a non-empty list of choices")
        if len({repr(c) for c in choices}) != len(choices):
            raise InputError(f"{where}: choices {choices} repeat a value")
        if not all(c is None or isinstance(c, (bool, int, float, str)) for c in choices):
            raise InputError(f"{where}: choices must be numbers, strings, booleans or null")
        return ParamSpec(name, kind, choices=tuple(choices))
    for key in ("low", "high"):
        if key not in raw:
            raise InputError(f"{where}: a {kind} parameter needs low and high")
    low, high = _number(where, "low", raw["low"], kind), _number(where, "high", raw["high"], kind)
    if not low < high:
        raise InputError(f"{where}: low must be < high (got low={low}, high={high})")
    log = raw.get("log", False)
    if not isinstance(log, bool):
        raise InputError(f"{where}: log must be true or false, got {log!r}")
    if log and low <= 0:
        raise InputError(f"{where}: a log scale needs low > 0 (got low={low})")
    step = raw.get("step")
    if step is not None:
        step = _number(where, "step", step, kind)
        if step <= 0:
            raise InputError(f"{where}: step must be > 0, got {step}")
        if log and (kind == "float" or step != 1):
            raise InputError(f"{where}: log and step cannot be combined (Optuna refuses it)")
    return ParamSpec(name, kind, low=low, high=high, log=log, step=step)


# ----------------------------------------------------------------------------- spaces

@dataclass(frozen=True)
class SearchSpace:
    """A validated search space of one method."""

    method: str
    params: dict[str, ParamSpec]
    fixed: dict[str, Any]
    source: str

    @property
    def spec(self) -> DefenseSpec:
        return defenses.get(self.method)

    def distributions(self) -> dict:
        """Optuna distributions, for ``OptunaSearch(space=...)``."""
        return {name: p.distribution() for name, p in self.params.items()}

    def settings(self, sampled: dict[str, Any]) -> dict[str, Any]:
        """The method's settings (``DefendJob.params``) for one sampled point of the space."""
        values = {**self.fixed, **{k: _plain(v) for k, v in sampled.items() if k in self.params}}
        defaults = {k: f.default for k, f in self.spec.config.model_fields.items()}
        for name, derived in self.spec.derived.items():
            if name in values:
                derived.apply(values, defaults)
        return values

    def config(self, sampled: dict[str, Any], *, where: str = ""):
        """The validated settings object for ``sampled`` (InputError when it is invalid)."""
        return parse_settings(self.spec.config, self.settings(sampled), source=where or self.source)

    def describe(self) -> str:
        return "\n".join(f"  {n}: {p.describe()}" for n, p in self.params.items())


def _plain(value):
    """numpy scalars (from Optuna) -> Python scalars (for YAML, JSON, pydantic)."""
    return value.item() if hasattr(value, "item") else value


def space_path(method: str) -> Path:
    """The packaged default space file of ``method``."""
    return Path(str(resources.files("kdshield.search_spaces") / f"{method}.yaml"))


def load_space(method: str, path: str | Path | None = None, *, fixed: dict[str, Any] | None = None) -> SearchSpace:
    """Read and fully validate the space of ``method`` (the packaged default, or ``path``);
    ``fixed`` adds settings fixed for every trial (``--set``), removing them from the search."""
    spec = method_spec(method)
    file = Path(path) if path is not None else space_path(method)
    source = str(file)
    if not file.is_file():
        raise InputError(f"{source}: no such search-space file")
    try:
        data = read_yaml(file.read_text())
    except yaml.YAMLError as err:
        raise InputError(f"{source}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise InputError(f"{source}: expected a mapping with method, params and fixed")
    unknown = set(data) - {"method", "params", "fixed"}
    if unknown:
        raise InputError(f"{source}: unknown top-level keys {sorted(unknown)} (allowed: method, params, fixed)")
    if data.get("method", method) != method:
        raise InputError(f"{source}: a space for method {data['method']!r}, not {method!r}")
    raw_params, file_fixed = data.get("params") or {}, data.get("fixed") or {}
    if not isinstance(raw_params, dict) or not raw_params:
        raise InputError(f"{source}: params must be a non-empty mapping of parameter -> range")
    if not isinstance(file_fixed, dict):
        raise InputError(f"{source}: fixed must be a mapping of setting -> value")
    overrides = dict(fixed or {})
    raw_params = {k: v for k, v in raw_params.items() if k not in overrides}
    fixed = {**file_fixed, **overrides}
    if not raw_params:
        raise InputError(f"{source}: every parameter is fixed by --set; nothing left to search")
    config_cls = spec.config
    fields = set(config_cls.model_fields)
    allowed = fields | set(spec.derived)
    for name in [*raw_params, *fixed]:
        if name not in allowed:
            raise InputError(f"{source}: unknown parameter {name!r} for {method} (not a field of "
                             f"{config_cls.__name__}; known: {', '.join(sorted(allowed))})")
    both = set(raw_params) & set(fixed)
    if both:
        raise InputError(f"{source}: {sorted(both)} both searched (params) and fixed")
    params = {name: _param(source, name, raw) for name, raw in raw_params.items()}
    for name, derived in spec.derived.items():
        clash = [r for r in derived.replaces if name in params and (r in params or r in fixed)]
        if clash:
            raise InputError(f"{source}: {name} ({derived.doc}) and {clash[0]} cannot both be given")
        if name in params and derived.low_exclusive is not None and any(
                v is None or not isinstance(v, (int, float)) or v <= derived.low_exclusive
                for v in params[name].values_to_check()):
            raise InputError(f"{source}: params.{name}: values must be > {derived.low_exclusive}")
    if "gamma" in fields and "target_frr" in fields and {"gamma", "target_frr"} <= set(params):
        raise InputError(f"{source}: search gamma or target_frr, not both (BeDKD uses exactly one threshold)")
    space = SearchSpace(method=method, params=params, fixed=dict(fixed), source=source)
    base = {n: p.first() for n, p in params.items()}
    space.config(base, where=f"{source}: fixed + first value of every parameter")
    for name, p in params.items():
        for value in p.values_to_check():
            try:
                space.config({**base, name: value})
            except InputError as err:
                reason = str(err).split(": ", 1)[1] if ": " in str(err) else str(err)
                raise InputError(f"{source}: params.{name}: {value!r} is not accepted by "
                                 f"{config_cls.__name__} ({reason})") from None
    return space
