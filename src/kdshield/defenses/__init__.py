"""The defenses, one folder each, and their registry.

Every sub-package of ``kdshield.defenses`` is a defense: its ``__init__.py`` registers one
:class:`~kdshield.defenses.base.DefenseSpec` per method it holds (``bedkd`` holds ``bedkd``,
``ft`` and ``kd``). The registry finds the folders itself, so adding a defense is a new folder
plus its ``search_spaces/<name>.yaml``; nothing else lists the methods.

Nothing under ``kdshield.defenses`` imports Ray or DeepSpeed: recipes talk to a
:class:`~kdshield.defenses.base.Context`.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Any

from kdshield.config import read_yaml
from kdshield.defenses.base import DefenseSpec, registered
from kdshield.errors import InputError

__all__ = ["DefenseSpec", "get", "names", "preset", "presets", "specs"]


def _discover() -> None:
    for module in pkgutil.iter_modules(__path__):
        if module.ispkg:
            importlib.import_module(f"{__name__}.{module.name}")


def specs() -> dict[str, DefenseSpec]:
    """Every registered method, by name (sorted)."""
    _discover()
    return {s.name: s for s in sorted(registered(), key=lambda s: s.name)}


def names() -> list[str]:
    return list(specs())


def get(name: str) -> DefenseSpec:
    """The spec of method ``name``; an unknown name is one InputError line listing the known ones."""
    known = specs()
    if name not in known:
        raise InputError(f"unknown defense {name!r} (known: {', '.join(known)})")
    return known[name]


def _preset_dir(name: str) -> Path:
    """``presets/`` in the folder of the defense that registered method ``name``."""
    package = get(name).config.__module__.rsplit(".", 1)[0]
    return Path(importlib.import_module(package).__file__).parent / "presets"


def _preset_files(name: str) -> dict[str, Path]:
    """Preset files of method ``name``: those in its folder's ``presets/`` whose ``method:`` is it
    (a folder holds several methods: RobustKD's holds feature-kd, MBTSAD's ts-ft)."""
    folder = _preset_dir(name)
    files = sorted(folder.glob("*.yaml")) if folder.is_dir() else []
    return {p.stem: p for p in files if read_yaml(p.read_text()).get("method") == name}


def presets(name: str) -> list[str]:
    """The named settings packaged for method ``name`` (``<defense folder>/presets/<preset>.yaml``)."""
    return list(_preset_files(name))


def preset(name: str, which: str) -> dict[str, Any]:
    """The settings of preset ``which`` of method ``name``; an unknown one is one InputError line."""
    files = _preset_files(name)
    if which not in files:
        raise InputError(f"--preset {which}: {name} has no such preset (packaged: {', '.join(files) or 'none'})")
    return dict(read_yaml(files[which].read_text())["params"])
