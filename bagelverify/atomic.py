"""Atomic file replacement: write a temporary file next to the target, fsync, rename.

(Whole checkpoint folders are published by :mod:`bagelverify.publish`, on top of this.)

A process killed mid-write (SIGKILL, power loss) leaves its temporary file behind, never a
partial file under the final name. Temporary files are named
``.<name>.bagelverify-<16 hex digits>.tmp`` (:func:`temporary_name`) and are locked (``flock``) by
their writer for as long as it writes; the next :func:`atomic_open` of the same target removes the
ones whose writer is gone (unlocked) and that have not been modified for
:data:`STALE_AFTER_SECONDS`, so crash-and-retry loops do not fill the disk. Only names of exactly
that shape are ever removed: a user's ``.<name>.notes.tmp`` is left alone. Without ``fcntl``
(Windows) nothing is locked and stale files are left for the user to delete.

A new file gets the mode ``open()`` would give it (``0o666`` less the process umask); a replaced
file keeps its mode.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

TEMPORARY_SUFFIX = ".tmp"
TEMPORARY_MARKER = "bagelverify-"
"""Fixed part of every temporary name, between the target's name and the random token."""
_TOKEN_BYTES = 8  # 16 hex digits
STALE_AFTER_SECONDS = 60.0
"""An unlocked temporary file untouched for this long belongs to a dead writer. (The writer
locks its file right after creating it and unlocks it just before the rename; the age guards
those two instants.)"""


def temporary_prefix(path: Path) -> str:
    """Name prefix of the temporary files that :func:`atomic_open` writes for ``path``."""
    return f".{path.name}."


def temporary_name(path: Path) -> str:
    """A fresh temporary name for ``path``: ``.<name>.bagelverify-<16 hex digits>.tmp``."""
    token = secrets.token_hex(_TOKEN_BYTES)
    return f"{temporary_prefix(path)}{TEMPORARY_MARKER}{token}{TEMPORARY_SUFFIX}"


def is_temporary_name(path: Path, name: str) -> bool:
    """Whether ``name`` has exactly the shape of a :func:`temporary_name` of ``path``."""
    pattern = (
        re.escape(temporary_prefix(path) + TEMPORARY_MARKER)
        + f"[0-9a-f]{{{2 * _TOKEN_BYTES}}}"
        + re.escape(TEMPORARY_SUFFIX)
    )
    return re.fullmatch(pattern, name) is not None


def fsync_directory(directory: Path) -> None:
    """fsync a folder (so renames and removals in it survive a crash); best effort."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is still done
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_durably(path: Path) -> None:
    """Delete ``path`` if it exists and fsync its folder, so the removal survives a crash."""
    if path.exists():
        path.unlink()
        fsync_directory(path.parent)


def is_abandoned(candidate: Path) -> bool:
    """Whether no live writer holds the temporary file ``candidate`` and it has been idle for
    :data:`STALE_AFTER_SECONDS`."""
    if fcntl is None or time.time() - candidate.stat().st_mtime < STALE_AFTER_SECONDS:
        return False
    fd = os.open(candidate, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False  # a writer is still at work
    finally:
        os.close(fd)  # releases our lock, if we got it
    return True


def remove_stale_temporaries(path: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files of dead writers of ``path`` (see the module docstring).

    Best effort: a file that cannot be checked or removed is skipped. Returns what was removed.
    """
    path = Path(path)
    removed: list[Path] = []
    try:
        names = [n for n in os.listdir(path.parent) if is_temporary_name(path, n)]
    except OSError:
        return removed
    for name in names:
        candidate = path.parent / name
        try:
            if is_abandoned(candidate):
                candidate.unlink()
                removed.append(candidate)
                logger.info("removed %s, left by an interrupted write of %s", candidate, path)
        except OSError as error:
            logger.debug("could not check or remove %s: %s", candidate, error)
    return removed


def move_into_place(source: Path, target: Path) -> None:
    """Rename ``source`` over ``target``; across file systems (``EXDEV``), copy it next to
    ``target`` under a temporary name, fsync, rename that over ``target`` and delete ``source``,
    so ``target`` is still replaced in one step on its own file system."""
    try:
        os.replace(source, target)
        return
    except OSError as error:
        if error.errno != errno.EXDEV:
            raise
    if source.is_dir():
        raise OSError(
            errno.EXDEV,
            f"cannot move the folder {source} to {target}: they are on different file systems",
        )
    with atomic_open(target) as handle, open(source, "rb") as original:
        shutil.copyfileobj(original, handle, 16 << 20)
    shutil.copymode(source, target)
    source.unlink()


def _create_temporary(path: Path) -> tuple[int, Path]:
    """Create a new, empty temporary file for ``path`` (mode ``0o666`` less the umask)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    flags |= getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    while True:
        candidate = path.parent / temporary_name(path)
        try:
            return os.open(candidate, flags, 0o666), candidate
        except FileExistsError:  # pragma: no cover - a 64-bit token collided
            continue


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Open a temporary file next to ``path`` for writing; on success make it ``path``.

    The file is flushed, fsync'ed and renamed over ``path`` (then the folder is fsync'ed), so
    readers see either the old file or the complete new one. If the block raises, the temporary
    file is removed and an existing ``path`` is left untouched; an ``OSError`` (disk full, ...)
    is re-raised with the same errno and a message naming ``path``. Abandoned temporary files
    of earlier, killed writes of ``path`` are removed first (:func:`remove_stale_temporaries`).
    """
    path = Path(path)
    remove_stale_temporaries(path)
    fd, temporary = _create_temporary(path)
    handle = os.fdopen(fd, "wb")
    try:
        with handle:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: never contended
            if path.exists():  # a replaced file keeps its mode; a new one has the umask's
                os.fchmod(fd, path.stat().st_mode & 0o7777)
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        if error.errno is None:
            raise
        raise OSError(
            error.errno,
            f"{error.strerror or error} while writing {path}; the partial temporary file was "
            f"removed and {path} was not changed",
        ) from error
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


_held_guard = threading.Lock()
_held: dict[tuple[int, int], tuple[threading.RLock, list[int]]] = {}
"""Folders this process holds a :func:`folder_lock` on: (device, inode) -> (a lock for this
process's threads, [how deep the holding thread has nested])."""


@contextlib.contextmanager
def folder_lock(directory: str | os.PathLike[str], *, wait: bool = True) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the folder ``directory`` itself for the block (nothing is
    created in it), waiting for another holder to finish first, or, with ``wait=False``,
    raising ``BlockingIOError`` at once. Publishing (:mod:`bagelverify.publish`) holds it on a
    checkpoint folder's parent while it publishes or recovers, and on each staging folder for
    the staging folder's whole life. Re-entrant in one thread; other threads of the process
    wait like other processes. Without ``fcntl`` (Windows) only this process's threads are
    serialised."""
    stats = os.stat(directory)
    key = (stats.st_dev, stats.st_ino)
    with _held_guard:
        thread_lock, depth = _held.setdefault(key, (threading.RLock(), [0]))
    if not thread_lock.acquire(blocking=wait):
        raise BlockingIOError(errno.EWOULDBLOCK, f"another thread holds {directory}")
    try:
        if depth[0]:
            depth[0] += 1
            try:
                yield
            finally:
                depth[0] -= 1
            return
        flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(directory, flags)
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    if not wait:
                        raise
                    logger.info(
                        "%s: waiting for another writer of this folder to finish", directory
                    )
                    fcntl.flock(fd, fcntl.LOCK_EX)
            depth[0] = 1
            try:
                yield
            finally:
                depth[0] = 0
        finally:
            os.close(fd)  # releases the lock
    finally:
        thread_lock.release()
