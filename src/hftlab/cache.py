"""Cache entries shared between runs (aligned and fine-tuned models, evaluations): written whole
or not at all, verified on every read, one writer per entry.

An entry is a folder committed by :func:`commit_entry`: its files are written into a temporary
folder beside it, listed with their size and SHA-256 in ``manifest.json`` and renamed into
place, so a kill leaves no half-written entry (only a temporary folder, which the next writer
of that entry removes). :func:`verify_entry` checks the listed files before an entry is used; a
damaged entry is reported in one line and rebuilt. :func:`entry_lock` is a file lock per entry,
so concurrent runs (sweep workers, or runs on several machines sharing the cache folder) train
an entry once and the others wait for it. Run folders get copies (reflinks where the file
system has them), never hard links: a damaged file in one run folder cannot reach the cache.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from hftlab.faults import announce_change
from hftlab.utils import atomic_dir, read_json, write_json

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
# Entries hold sub-entries committed later with manifests of their own (evaluations of the
# entry's model); those are not part of the parent's manifest.
NESTED = frozenset({"eval"})
_FICLONE = 0x40049409  # ioctl request of Linux's reflink (copy-on-write clone)
_verified: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) → sha256, this process


class CacheError(ValueError):
    """A cache entry that cannot be used or rebuilt (one line naming the entry and the fix)."""


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, remembered per process for an unchanged file (size and mtime)."""
    stat = path.stat()
    memo = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if memo not in _verified:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _verified[memo] = digest.hexdigest()
    return _verified[memo]


def entry_files(folder: Path) -> list[Path]:
    """The files an entry's manifest covers: all but the manifest and nested entries."""
    return sorted(
        path for path in folder.rglob("*")
        if path.is_file() and path.relative_to(folder).parts[0] not in NESTED
        and path.name != MANIFEST
    )


def write_manifest(folder: Path) -> None:
    files = {
        str(path.relative_to(folder)): {"size": path.stat().st_size, "sha256": file_sha256(path)}
        for path in entry_files(folder)
    }
    write_json(folder / MANIFEST, {"format": MANIFEST_FORMAT, "files": files})


def verify_entry(folder: Path) -> str | None:
    """None if the entry's files are those its manifest lists, else why not (one phrase). An
    entry from before manifests existed is trusted once and gets its manifest now."""
    if not folder.is_dir():
        return "missing"
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        log.info("cache entry %s has no manifest (written by an older hftlab): recording its "
                 "files' sizes and hashes now", folder)
        write_manifest(folder)
        return None
    try:
        manifest = read_json(manifest_path)
        listed = manifest["files"]
    except (ValueError, KeyError, TypeError):
        return f"its {MANIFEST} is unreadable"
    present = {str(p.relative_to(folder)) for p in entry_files(folder)}
    missing = sorted(set(listed) - present)
    if missing:
        return f"{missing[0]} is missing"
    extra = sorted(present - set(listed))
    if extra:
        return f"{extra[0]} is not in its manifest"
    for name, expected in listed.items():
        path = folder / name
        if path.stat().st_size != expected["size"]:
            return f"{name} has {path.stat().st_size} bytes, not {expected['size']}"
        if file_sha256(path) != expected["sha256"]:
            return f"{name} does not match its recorded SHA-256"
    return None


def usable_entry(folder: Path, marker: str = "meta.json") -> bool:
    """Whether a committed, intact entry is at ``folder``; a damaged one is reported and
    removed (under the caller's :func:`entry_lock`), so that the caller rebuilds it."""
    if not (folder / marker).is_file():
        return False
    problem = verify_entry(folder)
    if problem is None:
        return True
    log.warning("cache entry %s is damaged (%s): rebuilding it", folder, problem)
    discard_entry(folder)
    return False


def discard_entry(folder: Path) -> None:
    """Move an entry aside and delete it, so no reader sees it half-deleted."""
    trash = folder.with_name(f".{folder.name}.discarded-{os.getpid()}")
    try:
        os.replace(folder, trash)
    except FileNotFoundError:
        return  # gone already (another process of the run discarded it)
    shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def commit_entry(target: Path) -> Iterator[Path]:
    """Yield a temporary folder; on success it gets its manifest and replaces ``target``."""
    with atomic_dir(target) as tmp:
        yield tmp
        write_manifest(tmp)


@contextlib.contextmanager
def entry_lock(target: Path, enabled: bool = True) -> Iterator[None]:
    """Hold the lock of cache entry ``target`` (a ``.NAME.lock`` file beside it, ``flock``:
    released by the kernel when the process dies, so a killed writer never blocks the next).
    The holder then removes temporary folders that killed writers of this entry left behind.
    ``enabled=False`` (the non-main processes of a multi-process run) takes no lock."""
    if not enabled:
        yield
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.with_name(f".{target.name}.lock")
    with lock_path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            log.warning("waiting for another process that is writing %s (lock %s)", target,
                        lock_path)
            started = time.perf_counter()
            fcntl.flock(handle, fcntl.LOCK_EX)
            log.warning("lock on %s released after %.0f s", target,
                        time.perf_counter() - started)
        try:
            remove_stale_temporaries(target)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def remove_stale_temporaries(target: Path) -> None:
    """Temporary folders of ``target`` left by killed writers (only call with its lock held)."""
    for path in target.parent.glob(f".{target.name}.*"):
        if path.is_dir():
            log.info("removing %s, left by an interrupted cache write", path)
            shutil.rmtree(path, ignore_errors=True)


def copy_file(source: Path, destination: Path) -> None:
    """A copy of ``source`` that shares no data with it once written: a reflink where the file
    system offers one (instant, copy-on-write), else a plain copy."""
    with source.open("rb") as src, destination.open("wb") as dst:
        try:
            fcntl.ioctl(dst.fileno(), _FICLONE, src.fileno())
            shutil.copystat(source, destination)
            return
        except OSError:
            pass
    shutil.copy2(source, destination)


def copy_tree(source: Path, target: Path, skip: set[str]) -> None:
    """Copy ``source``'s files into ``target`` (top-level names in ``skip`` left out)."""
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if relative.parts[0] in skip or not path.is_file():
            continue
        destination = target / relative
        announce_change(destination)
        destination.parent.mkdir(parents=True, exist_ok=True)
        if destination.exists():
            destination.unlink()
        copy_file(path, destination)
