"""Output directories: refuse to clobber what kdshield did not write, stage and publish atomically, record results."""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import shutil
import socket
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
    check_replaceable(out, what="--overwrite replaces")
    return False


def check_replaceable(out: Path, *, what: str = "kdshield replaces", own: tuple[str, ...] = ()) -> None:
    """``out`` is new, empty, a directory kdshield published (its marker file), or holds only files
    matching the patterns ``own`` (what the command itself writes: an output of a version before the marker):
    replacing it loses nothing kdshield did not write."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory")
    if (out.is_dir() and not (out / MARKER).is_file()
            and not all(any(fnmatch.fnmatchcase(p.name, pattern) for pattern in own) for p in out.iterdir())):
        raise InputError(f"{out}: not a directory kdshield wrote (no {MARKER} marker); {what} only those: "
                         "choose another --out")


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


def _sibling(out: Path, kind: str) -> Path:
    """``.NAME.KIND-HOST-PID`` next to ``out``: whose it is, so that a later job can tell a dead
    process's leftovers from a running job's (on this host; other hosts' are never touched)."""
    return out.parent / f".{out.name}.{kind}-{socket.gethostname()}-{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def sweep_dead_stages(out: Path) -> list[Path]:
    """Remove ``out``'s staging and replaced directories left by processes of this host that no
    longer run (a job killed by SIGKILL or a power cut cannot clean up after itself)."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(?:partial|old)-(?P<host>.+)-(?P<pid>\d+)")
    host, removed = socket.gethostname(), []
    if not out.parent.is_dir():
        return removed
    for path in out.parent.iterdir():
        m = pattern.fullmatch(path.name)
        if m and m["host"] == host and int(m["pid"]) != os.getpid() and not _alive(int(m["pid"])):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def staging_dir(out: Path) -> Path:
    """A fresh sibling directory to build ``out`` in, so a failed job never touches ``out``
    (dead processes' leftovers beside it are removed first)."""
    sweep_dead_stages(out)
    stage = _sibling(out, "partial")
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    return stage


def publish(stage: Path, out: Path) -> None:
    """Move the finished ``stage`` into place at ``out`` (the old ``out`` goes only now)."""
    if out.exists():
        old = _sibling(out, "old")
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


def write_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary sibling: readers see the old file or the new one."""
    import tempfile

    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_json(path: Path, data: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


VERBOSE_ENV = "KDSHIELD_VERBOSE"  # set by `kdshield --verbose`; Ray processes of the job inherit it


def verbose() -> bool:
    """Whether the person asked for everything (third-party logs, progress bars of every library)."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def say(msg: str) -> None:
    """A progress line for the person at the terminal (stderr)."""
    print(f"kdshield: {msg}", file=sys.stderr, flush=True)
