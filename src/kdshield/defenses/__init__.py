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

from kdshield.defenses.base import DefenseSpec, registered
from kdshield.errors import InputError

__all__ = ["DefenseSpec", "get", "names", "specs"]


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
