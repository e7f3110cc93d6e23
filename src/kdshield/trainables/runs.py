"""Output directories of jobs: refuse to clobber another run, write atomically, record results."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from kdshield.errors import InputError


MARKER = ".kdshield"  # in every directory a kdshield job published: what --overwrite may replace


def check_out_dir(out: Path, *, record: str, config: dict[str, Any], overwrite: bool) -> bool:
    """Decide whether ``out`` may receive a job whose resolved config is ``config``.

    Returns True when ``out`` already holds a finished job with exactly this config (nothing to
    do). Raises InputError when it holds anything else, unless ``overwrite`` and kdshield wrote it
    (its marker file): a directory kdshield did not write is never replaced. An ``out`` whose
    parent cannot be created or written is refused here, before any work.
    """
    check_writable(out)
    if not out.exists():
        return False
    if not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory")
    if not any(out.iterdir()):
        return False
    previous = out / record
    if previous.is_file() and (out / "metrics.json").is_file():
        try:
            same = json.loads(previous.read_text()).get("config") == json.loads(json.dumps(config))
        except json.JSONDecodeError:
            same = False
        if same and not overwrite:
            return True
    if not overwrite:
        raise InputError(f"{out}: already holds a different run; choose another --out or pass --overwrite")
    if not (out / MARKER).is_file():
        raise InputError(f"{out}: not a directory kdshield wrote (no {MARKER} marker); --overwrite replaces only "
                         "those: choose another --out")
    return False


def check_writable(out: Path) -> None:
    """``out`` can be created (its nearest existing ancestor takes a new directory): tried, not assumed."""
    import tempfile

    parent = Path(out).resolve().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    try:
        Path(tempfile.mkdtemp(prefix=".kdshield-probe-", dir=parent)).rmdir()
    except OSError as err:
        raise InputError(f"{out}: cannot be written ({parent}: {err.strerror or err})") from None


def staging_dir(out: Path) -> Path:
    """A fresh sibling directory to build ``out`` in, so a failed job never touches ``out``."""
    stage = out.parent / f".{out.name}.partial-{os.getpid()}"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    return stage


def publish(stage: Path, out: Path) -> None:
    """Move the finished ``stage`` into place at ``out`` (the old ``out`` goes only now)."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        stage.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        stage.rename(out)


@contextlib.contextmanager
def staged(out: Path):
    """Build ``out`` in a fresh sibling directory; publish it on success, delete it on failure."""
    work = staging_dir(out)
    (work / MARKER).write_text("written by kdshield; `--overwrite` may replace this directory\n")
    try:
        yield work
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    publish(work, out)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def say(msg: str) -> None:
    """A progress line for the person at the terminal (stderr)."""
    print(f"kdshield: {msg}", file=sys.stderr, flush=True)
