"""Folder-atomic publishing: the one rule by which every writer of a checkpoint folder replaces it.

The rule. A writer builds the complete new checkpoint in a private staging folder on the
destination's file system, fsyncs it, and then publishes it in one step, so that at every
instant -- including a SIGKILL or a power cut at any point -- the destination ``DST`` holds the
complete old checkpoint or the complete new one. Files of ``DST`` that the new checkpoint does
not replace (a user's notes, a training run's optimizer folder) are carried over. A run that was
killed is rolled forward or back, and its leftovers removed, by the next run of any writer of
``DST`` and by any load of it (:func:`recover`): nobody has to delete anything by hand.

Every name this module makes is hidden and starts with ``.<DST name>.``, a fixed marker and the
run's 16 hex digits, so that it is recognised and never confused with a user's file:

``.<name>.partial-<hex>``
    The staging folder: beside ``DST`` (same parent), or inside an existing ``DST`` whose parent
    cannot be written or that is a mount point. Its writer holds a ``flock`` on it from its
    creation (made under the lock below) to the end, so one that nobody holds is a dead run's.
``.<name>.publish-<hex>``
    The recovery record: which staging folder is being published and how. It is written and
    fsync'ed before the first change to ``DST`` and removed after the last.
``.<name>.trash-<hex>``
    The previous checkpoint folder after an exchange, while what it still holds of the user's is
    carried over and the rest is removed.

Publishing, under an exclusive ``flock`` on ``DST``'s parent folder (so publishes, recoveries and
the creation of staging folders in one folder never interleave; writing the staging folders does
not hold it):

1. ``DST`` does not exist: the staging folder is renamed to ``DST`` (one ``rename``).
2. ``DST`` exists and the OS can exchange two folders (Linux ``renameat2(RENAME_EXCHANGE)``): the
   record is written, the staging folder takes the old folder's mode, the two are exchanged in
   one step, the old folder is renamed to the trash name, the entries it holds that the new
   checkpoint does not replace are moved into ``DST``, and the trash is removed. A kill before
   the exchange is rolled back (the staging folder removed); after it, forward.
3. Otherwise (no ``renameat2``, a file system that refuses the exchange, ``DST`` a mount point or
   this process's working folder): *in place*. The record, inside ``DST``, lists the staged
   files in the order they are moved in (index or DCP metadata last) and the old files to
   remove; each move is a ``rename`` (or a copy and ``rename`` across file systems), and a kill
   part way is rolled forward by the next run. Here, and only here, ``DST`` holds a mix of the
   two checkpoints while the moves run (and until the next run, after a kill): a sharded load
   refuses shards of two saves by their save id meanwhile.

Publishing also refuses an output that is one of its inputs (:func:`refuse_aliasing`), comparing
files by identity (device and inode), so symlinks, bind mounts and hard links are seen through.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import platform
import re
import secrets
import shutil
import stat
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from .atomic import (
    STALE_AFTER_SECONDS,
    TEMPORARY_MARKER,
    TEMPORARY_SUFFIX,
    folder_lock,
    fsync_directory,
    is_abandoned,
    move_into_place,
)
from .errors import AliasError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

STAGING_MARKER = ".partial-"
"""Marker of a staging folder's name: ``.<DST name>.partial-<16 hex digits>``."""
JOURNAL_MARKER = ".publish-"
"""Marker of a recovery record's name: ``.<DST name>.publish-<16 hex digits>``."""
TRASH_MARKER = ".trash-"
"""Marker of a replaced folder's name while it is removed: ``.<DST name>.trash-<16 hex>``."""
_MARKERS = (STAGING_MARKER, JOURNAL_MARKER, TRASH_MARKER)
_TOKEN_DIGITS = 16
_VERSION = 1
_LEFTOVER = re.compile(
    r"\..+(?:"
    + "|".join(re.escape(marker) for marker in _MARKERS)
    + rf")[0-9a-f]{{{_TOKEN_DIGITS}}}"
)
_TEMPORARY = re.compile(
    r"\.(?P<target>.+)\."
    + re.escape(TEMPORARY_MARKER)
    + rf"[0-9a-f]{{{_TOKEN_DIGITS}}}"
    + re.escape(TEMPORARY_SUFFIX)
)

FALLBACK_ERRNOS = frozenset(
    {
        errno.EINVAL,  # the file system does not implement RENAME_EXCHANGE
        errno.ENOSYS,  # no renameat2 at all
        errno.EXDEV,  # DST is a (bind) mount point
        errno.EBUSY,  # DST is a mount point
        errno.EPERM,  # a sandbox (seccomp) refuses the call
        getattr(errno, "ENOTSUP", errno.EINVAL),
        getattr(errno, "EOPNOTSUPP", errno.EINVAL),
    }
)
"""errnos of an exchange the OS or the file system cannot do: publishing goes in place."""


# -- names -------------------------------------------------------------------------------------


def leftover_name(destination: str | os.PathLike[str], marker: str, token: str) -> str:
    """``.<name>.<marker><token>``: a name this module gives a leftover of ``destination``."""
    return f".{Path(destination).name}{marker}{token}"


def _parse(dst_name: str, name: str) -> tuple[str, str] | None:
    """(marker, token) when ``name`` is one of this module's names for ``dst_name``."""
    prefix = f".{dst_name}"
    if not name.startswith(prefix):
        return None
    rest = name[len(prefix) :]
    for marker in _MARKERS:
        token = rest[len(marker) :]
        if (
            rest.startswith(marker)
            and len(token) == _TOKEN_DIGITS
            and all(c in "0123456789abcdef" for c in token)
        ):
            return marker, token
    return None


def is_leftover_name(name: str) -> bool:
    """Whether ``name`` has the shape of a staging folder, recovery record or trash folder (of
    any destination) or of an atomic write's temporary file: names no user gives a file, which
    "is the folder empty?" checks ignore."""
    return _LEFTOVER.fullmatch(name) is not None or _TEMPORARY.fullmatch(name) is not None


def temporary_target(name: str) -> str | None:
    """The file an :func:`~bagelverify.atomic.atomic_open` temporary named ``name`` was to
    become, or ``None`` when ``name`` is not one."""
    match = _TEMPORARY.fullmatch(name)
    return None if match is None else match.group("target")


def visible_entries(folder: str | os.PathLike[str]) -> list[str]:
    """The names in ``folder`` (sorted) other than leftovers of interrupted writes; none when
    the folder does not exist."""
    try:
        names = os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(name for name in names if not is_leftover_name(name))


# -- the exchange --------------------------------------------------------------------------------

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_SYSCALL_NUMBERS = {"x86_64": 316, "amd64": 316, "aarch64": 276, "arm64": 276, "riscv64": 276}
_renameat2: Callable[[bytes, bytes, int], int] | None = None
_renameat2_looked_up = False


def _find_renameat2() -> Callable[[bytes, bytes, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover - no C library to load
        return None
    function = getattr(libc, "renameat2", None)
    if function is not None:  # glibc >= 2.28, musl >= 1.2.5
        function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
        function.argtypes.append(ctypes.c_uint)
        function.restype = ctypes.c_int

        def call(a: bytes, b: bytes, flags: int) -> int:
            return int(function(_AT_FDCWD, a, _AT_FDCWD, b, flags))

        return call
    number = _SYSCALL_NUMBERS.get(platform.machine().lower())  # pragma: no cover - old libc
    if number is None:  # pragma: no cover
        return None
    syscall = libc.syscall  # pragma: no cover
    syscall.restype = ctypes.c_long  # pragma: no cover

    def raw(a: bytes, b: bytes, flags: int) -> int:  # pragma: no cover
        return int(
            syscall(
                ctypes.c_long(number),
                ctypes.c_int(_AT_FDCWD),
                ctypes.c_char_p(a),
                ctypes.c_int(_AT_FDCWD),
                ctypes.c_char_p(b),
                ctypes.c_uint(flags),
            )
        )

    return raw  # pragma: no cover


def exchange(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> None:
    """Exchange the two folders ``a`` and ``b`` in one atomic step (Linux
    ``renameat2(RENAME_EXCHANGE)``); ``OSError`` with the call's errno otherwise (``ENOSYS``
    where the OS has no such call)."""
    global _renameat2, _renameat2_looked_up
    if not _renameat2_looked_up:
        _renameat2, _renameat2_looked_up = _find_renameat2(), True
    if _renameat2 is None:
        raise OSError(errno.ENOSYS, "this OS cannot exchange two folders", os.fspath(a))
    if _renameat2(os.fsencode(a), os.fsencode(b), _RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), os.fspath(a), None, os.fspath(b))


# -- file-system steps (module functions, so that the crash tests can stop between them) --------


def _remove_tree(path: Path) -> None:
    """Remove a folder and everything in it (nothing when it is gone)."""
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(path)


def _remove_entry(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        _remove_tree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _carry(old: Path, new: Path, names: Iterable[str]) -> None:
    """Move each named entry of ``old`` into ``new`` (skipping those gone or already there)."""
    moved = False
    for name in names:
        if os.path.lexists(old / name) and not os.path.lexists(new / name):
            os.rename(old / name, new / name)
            moved = True
    if moved:
        fsync_directory(new)


def _move_in(staging: Path, target: Path, order: list[str], remove: list[str]) -> None:
    """In place: move the staged files into ``target`` in ``order``, then delete ``remove``."""
    for name in order:
        if os.path.lexists(staging / name):
            move_into_place(staging / name, target / name)
    fsync_directory(target)
    for name in remove:
        if name not in order and os.path.lexists(target / name):
            _remove_entry(target / name)
    fsync_directory(target)


def _sync_tree(folder: Path) -> None:
    """fsync every file under ``folder`` and the folders themselves."""
    for entry in os.scandir(folder):
        if entry.is_dir(follow_symlinks=False):
            _sync_tree(Path(entry.path))
        elif entry.is_file(follow_symlinks=False):
            fd = os.open(entry.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_directory(folder)


# -- recovery records ----------------------------------------------------------------------------


def _write_journal(path: Path, record: dict[str, Any]) -> None:
    """Write, fsync and publish a recovery record (a new file: its name is the run's own)."""
    data = (json.dumps({"version": _VERSION, **record}) + "\n").encode("ascii")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_directory(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            path.unlink()
        raise


def _read_journal(path: Path) -> dict[str, Any] | None:
    """A recovery record, or ``None`` when it is not a complete one (a run killed while writing
    it had not changed anything yet)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as handle:
            raw = handle.read(1 << 20)
        record = json.loads(raw)
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("version") != _VERSION:
        return None
    mode = record.get("mode")
    names = ("carry",) if mode == "exchange" else ("order", "remove") if mode == "in-place" else ()
    if not names or not all(
        isinstance(record.get(key), list) and all(isinstance(n, str) for n in record[key])
        for key in names
    ):
        return None
    if mode == "exchange" and not (
        isinstance(record.get("new"), list)
        and len(record["new"]) == 2
        and all(isinstance(n, int) for n in record["new"])
    ):
        return None
    if mode == "in-place" and not isinstance(record.get("beside"), bool):
        return None
    return record


# -- locks ---------------------------------------------------------------------------------------

LockState = Literal["held", "busy", "unavailable"]


@contextlib.contextmanager
def _parent_lock(folder: Path, *, wait: bool) -> Iterator[LockState]:
    """The publishing lock of the folders in ``folder``: ``"held"``, or ``"busy"`` (another
    writer holds it and ``wait`` is false), or ``"unavailable"`` (the file system cannot lock
    folders, or ``folder`` cannot be opened): the block runs either way."""
    stack = contextlib.ExitStack()
    try:
        stack.enter_context(folder_lock(folder, wait=wait))
        state: LockState = "held"
    except BlockingIOError:
        state = "busy"
    except OSError as error:
        logger.debug("%s: cannot lock the folder (%s); publishing unlocked", folder, error)
        state = "unavailable"
    with stack:
        yield state


def _abandoned(path: Path, *, locked: bool) -> bool:
    """Whether no live run holds the staging folder ``path``. Under the publishing lock a
    folder nobody ``flock``s is a dead run's (staging folders are created and locked under it);
    without it, it must also have been idle for :data:`STALE_AFTER_SECONDS`."""
    try:
        young = time.time() - path.lstat().st_mtime < STALE_AFTER_SECONDS
        if fcntl is None or (young and not locked):
            return False
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False  # a live writer holds it (or the file system cannot tell: keep it)
    finally:
        os.close(fd)
    return True


# -- recovery ------------------------------------------------------------------------------------


def _ours(folder: Path, dst_name: str) -> dict[str, dict[str, Path]]:
    """marker -> token -> path of this module's entries for ``dst_name`` in ``folder``."""
    found: dict[str, dict[str, Path]] = {marker: {} for marker in _MARKERS}
    try:
        names = os.listdir(folder)
    except OSError:
        return found
    for name in names:
        parsed = _parse(dst_name, name)
        if parsed is not None:
            found[parsed[0]][parsed[1]] = folder / name
    return found


def _identity(path: Path) -> list[int] | None:
    try:
        stats = os.stat(path)
    except OSError:
        return None
    return [stats.st_dev, stats.st_ino]


def _finish_exchange(dst: Path, token: str, record: dict[str, Any]) -> None:
    """Roll a recorded exchange forward (it happened) or back (it did not)."""
    parent = dst.parent
    staging = parent / leftover_name(dst, STAGING_MARKER, token)
    trash = parent / leftover_name(dst, TRASH_MARKER, token)
    staged = _identity(staging)
    # Exchanged when DST is the staged folder, or when the staging name no longer holds it (it
    # holds the previous folder, or that was already renamed to the trash name).
    if (
        _identity(dst) == record["new"]
        or os.path.lexists(trash)
        or (staged is not None and staged != record["new"])
    ):
        if staged is not None and not os.path.lexists(trash):
            os.rename(staging, trash)
            fsync_directory(parent)
        if os.path.isdir(trash) and os.path.isdir(dst):
            _carry(trash, dst, record["carry"])
        _remove_tree(trash)
        logger.info("%s: finished publishing an interrupted run's checkpoint", dst)
    else:
        _remove_tree(staging)  # the staged checkpoint, never published
        logger.info("%s: removed the staged checkpoint of an interrupted run", dst)


def _finish_in_place(dst: Path, token: str, record: dict[str, Any]) -> None:
    """Roll a recorded in-place publish forward."""
    where = dst.parent if record["beside"] else dst
    staging = where / leftover_name(dst, STAGING_MARKER, token)
    if staging.is_dir():
        _move_in(staging, dst, record["order"], record["remove"])
    else:
        _move_in(dst, dst, [], record["remove"])
    _remove_tree(staging)
    logger.info("%s: finished publishing an interrupted run's checkpoint in place", dst)


def _recover_locked(
    dst: Path, *, locked: bool, report: Callable[..., None] = logger.warning
) -> list[Path]:
    """Finish or undo the recorded publishes of ``dst`` and remove abandoned staging and trash
    folders, beside it and inside it. The caller holds the publishing lock (``locked``), else
    only entries idle for :data:`STALE_AFTER_SECONDS` are touched. Returns what was handled."""
    handled: list[Path] = []
    places = [(dst.parent, "exchange")]
    if dst.is_dir() and not dst.is_symlink():
        places.append((dst, "in-place"))
    for folder, mode in places:  # every record first: one may need a folder of either place
        for token, journal in sorted(_ours(folder, dst.name)[JOURNAL_MARKER].items()):
            try:
                if not locked and time.time() - journal.lstat().st_mtime < STALE_AFTER_SECONDS:
                    continue
                record = _read_journal(journal)
                if record is not None and record["mode"] == mode == "exchange":
                    _finish_exchange(dst, token, record)
                elif record is not None and record["mode"] == mode == "in-place":
                    _finish_in_place(dst, token, record)
                journal.unlink()
                fsync_directory(folder)
                handled.append(journal)
            except OSError as error:
                report("%s: could not finish the interrupted publish %s: %s", dst, journal, error)
    leftovers = [_ours(folder, dst.name) for folder, _ in places]
    if any(ours[JOURNAL_MARKER] for ours in leftovers):
        return handled  # a record is left: the folders it names stay for the next run
    for ours in leftovers:
        for marker in (STAGING_MARKER, TRASH_MARKER):
            for path in ours[marker].values():
                if not path.is_dir() or path.is_symlink():
                    continue
                if marker == TRASH_MARKER:  # nobody locks a trash folder: the lock or its age
                    idle = time.time() - path.lstat().st_mtime >= STALE_AFTER_SECONDS
                    if not (locked or idle):
                        continue
                elif not _abandoned(path, locked=locked):
                    continue
                try:
                    _remove_tree(path)
                except OSError as error:
                    logger.debug("could not remove %s: %s", path, error)
                    continue
                handled.append(path)
                logger.info("removed %s, left by an interrupted write of %s", path, dst)
    return handled


def recover(destination: str | os.PathLike[str], *, wait: bool = False) -> list[Path]:
    """Finish (or undo) the interrupted publishes of ``destination`` and remove the leftovers of
    killed runs; return the recovery records and folders handled.

    Every writer does this (waiting for the lock) before it starts; loads call this function
    without waiting (``wait=False``: when another process publishes in the folder now, nothing
    is done). Best effort: what cannot be done now (a read-only folder) is left for a later run,
    and nothing here raises ``OSError``. Cheap when there is nothing to do: one listing of the
    folder and of its parent.
    """
    dst = Path(os.path.realpath(destination))
    parent = dst.parent
    try:
        if not any(_parse(dst.name, name) for name in os.listdir(parent)) and not (
            dst.is_dir() and any(_parse(dst.name, name) for name in os.listdir(dst))
        ):
            return []
    except OSError:
        return []
    try:
        with _parent_lock(parent, wait=wait) as state:
            if state == "busy":
                return []
            return _recover_locked(dst, locked=state == "held", report=logger.info)
    except OSError as error:
        logger.debug("%s: recovery left for a later run: %s", dst, error)
        return []


# -- aliasing ------------------------------------------------------------------------------------


def _how(a: str, b: str, folders: bool) -> str:
    """Why two paths name one file: the same path, a symlink, a bind mount or a hard link."""
    if os.path.abspath(a) == os.path.abspath(b):
        return "the same path"
    if os.path.realpath(a) == os.path.realpath(b):
        return "one of them a symlink to the other"
    return "a bind mount" if folders else "hard links to one file"


def refuse_aliasing(
    destination: str | os.PathLike[str],
    reads: Iterable[str | os.PathLike[str] | None],
    replaces: Callable[[str], bool],
) -> None:
    """Raise :class:`~bagelverify.errors.AliasError` when writing ``destination`` would replace
    something it reads: ``destination`` is one of the folders in ``reads``, or one of its
    entries that ``replaces`` names is one of the files in ``reads`` or in a folder of
    ``reads``. Paths are compared by identity (device and inode), so symlinks, bind mounts and
    hard links count; the message names both paths."""
    given = os.fspath(destination)
    try:
        target = os.stat(given)
    except OSError:
        return  # nothing there to replace
    if not stat.S_ISDIR(target.st_mode):
        return
    replaced: list[tuple[str, os.stat_result]] = []
    for name in visible_entries(given):
        if replaces(name):
            with contextlib.suppress(OSError):
                replaced.append((os.path.join(given, name), os.stat(os.path.join(given, name))))
    for read in reads:
        if read is None:
            continue
        source = os.fspath(read)
        try:
            stats = os.stat(source)
        except OSError:
            continue
        files: list[tuple[str, os.stat_result]] = []
        if stat.S_ISDIR(stats.st_mode):
            if os.path.samestat(stats, target):
                raise AliasError(
                    f"{given} is the same folder as the input {source} "
                    f"({_how(given, source, True)}): writing it would replace the checkpoint "
                    "being read. Write to another folder.",
                    source,
                    given,
                )
            with contextlib.suppress(OSError), os.scandir(source) as entries:
                for entry in entries:
                    with contextlib.suppress(OSError):
                        if entry.is_file():
                            files.append((entry.path, entry.stat()))
        else:
            files.append((source, stats))
        for written, written_stats in replaced:
            for read_file, read_stats in files:
                if os.path.samestat(written_stats, read_stats):
                    raise AliasError(
                        f"{written} would be replaced, but it is the same file as the input "
                        f"{read_file} ({_how(written, read_file, False)}). Write to another "
                        "folder.",
                        read_file,
                        written,
                    )


# -- publishing ------------------------------------------------------------------------------------

_active_guard = threading.Lock()
_active: dict[tuple[int, int], Path] = {}
"""Staging folders of this process's running publishes: (device, inode) -> the destination."""


def _active_destination(path: Path) -> Path | None:
    try:
        stats = os.stat(path)
    except OSError:
        return None
    with _active_guard:
        return _active.get((stats.st_dev, stats.st_ino))


def public_path(path: str | os.PathLike[str]) -> Path:
    """``path``, or the destination a running publish of this process stages in it."""
    return _active_destination(Path(path)) or Path(path)


def _cwd_inside(dst: Path) -> bool:
    try:
        cwd = os.path.realpath(os.getcwd())
    except OSError:
        return False
    return cwd == str(dst) or cwd.startswith(str(dst) + os.sep)


def _mkdir_staging(where: Path, dst: Path) -> Path:
    while True:
        folder = where / leftover_name(dst, STAGING_MARKER, secrets.token_hex(_TOKEN_DIGITS // 2))
        try:
            folder.mkdir(mode=0o777)
            return folder
        except FileExistsError:  # pragma: no cover - a 64-bit token collided
            continue


def _not_writable(folder: Path, error: OSError) -> OSError:
    """``error`` naming the folder that cannot be written (not a hidden staging path)."""
    return OSError(error.errno, error.strerror or str(error), os.fspath(folder))


def _staging_place(dst: Path) -> Path:
    """Beside ``dst``, or inside an existing ``dst`` that is a mount point or whose parent
    cannot be written. Raises ``OSError`` (``filename`` the folder) when ``dst`` must be written
    and cannot be."""
    parent = dst.parent
    if not dst.exists():
        return parent
    if not dst.is_dir():
        raise FileExistsError(errno.EEXIST, f"{dst} exists and is not a folder", os.fspath(dst))
    if os.stat(parent).st_dev != os.stat(dst).st_dev or not os.access(parent, os.W_OK | os.X_OK):
        return dst
    if not os.access(dst, os.W_OK | os.X_OK):
        # the replaced folder's entries are removed (or its files replaced in place): find out
        # what the file system says (read-only, immutable, permissions)
        probe = dst / leftover_name(dst, STAGING_MARKER, "0" * _TOKEN_DIGITS)
        try:
            probe.mkdir()
        except FileExistsError:
            pass
        except OSError as error:
            raise _not_writable(dst, error) from error
        with contextlib.suppress(OSError):
            probe.rmdir()
    return parent


Guard = Callable[[list[str]], None]
"""Called with the visible entries of an existing destination before anything is written and
again just before publishing; raises to refuse the destination (``FileExistsError`` ...)."""


class _Publish:
    """One publish of ``given`` (see :func:`publishing`)."""

    def __init__(
        self,
        given: Path,
        replaces: Callable[[str], bool],
        guard: Guard | None,
        reads: list[str | os.PathLike[str] | None],
        last: Collection[str],
    ) -> None:
        self.given = given
        self.created: list[Path] = []
        self.dst = Path(os.path.realpath(given))
        self.replaces = replaces
        self.guard = guard
        self.reads = reads
        self.last = last

    def check(self) -> None:
        """The aliasing check and the guard, against ``DST`` as it is now."""
        refuse_aliasing(self.given, self.reads, self.replaces)
        if self.guard is not None and self.dst.is_dir():
            self.guard(visible_entries(self.dst))

    def begin(self) -> Path:
        """Recover, check, create and lock the staging folder (under the publishing lock)."""
        parent = self.dst.parent
        # the missing parents made here (innermost first): removed again, when still empty,
        # if this publish publishes nothing
        self.created = [folder for folder in (parent, *parent.parents) if not folder.exists()]
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            if error.errno == errno.EEXIST:
                raise
            raise _not_writable(Path(error.filename or parent), error) from error
        with _parent_lock(parent, wait=True) as state:
            _recover_locked(self.dst, locked=state == "held")
            self.check()
            where = _staging_place(self.dst)
            try:
                staging = _mkdir_staging(where, self.dst)
            except OSError as error:
                raise _not_writable(where, error) from error
            self.lock = contextlib.ExitStack()
            try:
                self.lock.enter_context(folder_lock(staging))
            except OSError as error:  # a file system without folder locks: unlocked
                logger.debug("%s: cannot lock the staging folder (%s)", staging, error)
        self.staging = staging
        stats = os.stat(staging)
        self.key = (stats.st_dev, stats.st_ino)
        with _active_guard:
            _active[self.key] = self.given
        return staging

    def end(self) -> None:
        with _active_guard:
            _active.pop(self.key, None)
        self.lock.close()

    def discard(self) -> None:
        """Remove the staging folder of a publish that did not reach its recovery record."""
        try:
            _remove_tree(self.staging)
        except OSError as error:
            logger.warning("could not remove the staging folder %s: %s", self.staging, error)
        for folder in self.created:
            with contextlib.suppress(OSError):  # not empty (another writer's): it stays
                folder.rmdir()

    def commit(self) -> None:
        """Publish the complete staging folder (see the module docstring)."""
        self.journal: Path | None = None
        try:
            _sync_tree(self.staging)
        except BaseException:
            self.discard()
            raise
        with _parent_lock(self.dst.parent, wait=True) as state:
            try:
                self.check()
                self._publish()
            except BaseException:
                journal = self._recorded()
                if journal is not None and os.path.lexists(journal):
                    # the record is written: do now what it says (else the next run will)
                    with contextlib.suppress(Exception):
                        _recover_locked(self.dst, locked=state == "held")
                if (journal is None or not os.path.lexists(journal)) and _identity(
                    self.staging
                ) == list(self.key):
                    self.discard()  # still the unpublished staging folder, and no record
                raise

    def _recorded(self) -> Path | None:
        """The recovery record written by this publish and not yet removed, if any."""
        return self.journal

    def _record(self, where: Path, record: dict[str, Any]) -> None:
        token = self.staging.name.rsplit("-", 1)[1]
        self.journal = where / leftover_name(self.dst, JOURNAL_MARKER, token)
        _write_journal(self.journal, record)

    def _forget(self) -> None:
        assert self.journal is not None
        self.journal.unlink()
        fsync_directory(self.journal.parent)
        self.journal = None

    def _publish(self) -> None:
        dst, staging = self.dst, self.staging
        if staging.parent == dst:
            self._in_place()
            return
        if not os.path.lexists(dst):
            try:
                os.rename(staging, dst)  # never replaces a folder that holds anything
                fsync_directory(dst.parent)
                return
            except OSError as error:
                if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
        if _cwd_inside(dst):  # this process works in DST: keep that folder
            self._in_place()
            return
        old = os.stat(dst)
        staged = set(os.listdir(staging))  # a staged file replaces the old one of its name
        carry = [
            name
            for name in os.listdir(dst)
            if name not in staged and not self.replaces(name) and not self._superseded(name)
        ]
        with contextlib.suppress(OSError):  # the new folder takes the old one's mode and group
            os.chmod(staging, stat.S_IMODE(old.st_mode))
            if os.stat(staging).st_gid != old.st_gid:
                os.chown(staging, -1, old.st_gid)
        new = _identity(staging)
        self._record(dst.parent, {"mode": "exchange", "new": new, "carry": carry})
        try:
            exchange(staging, dst)
        except OSError as error:
            if error.errno not in FALLBACK_ERRNOS:
                raise
            logger.info("%s: cannot exchange folders here (%s); publishing in place", dst, error)
            self._forget()
            self._in_place()
            return
        fsync_directory(dst.parent)
        trash = dst.parent / leftover_name(dst, TRASH_MARKER, staging.name.rsplit("-", 1)[1])
        os.rename(staging, trash)
        fsync_directory(dst.parent)
        _carry(trash, dst, carry)
        _remove_tree(trash)
        self._forget()

    def _superseded(self, name: str) -> bool:
        """A temporary file of an interrupted write of a file the new checkpoint replaces."""
        target = temporary_target(name)
        return target is not None and self.replaces(target)

    def _in_place(self) -> None:
        dst, staging = self.dst, self.staging
        names = sorted(os.listdir(staging), key=lambda name: (name in self.last, name))
        remove = [n for n in visible_entries(dst) if self.replaces(n) and n not in names]
        beside = staging.parent != dst
        self._record(dst, {"mode": "in-place", "beside": beside, "order": names, "remove": remove})
        _move_in(staging, dst, names, remove)
        _remove_tree(staging)
        for name in os.listdir(dst):  # temporaries of killed writes of the replaced files
            if self._superseded(name) and _abandoned_file(dst / name):
                with contextlib.suppress(OSError):
                    (dst / name).unlink()
        self._forget()


def _abandoned_file(path: Path) -> bool:
    try:
        return is_abandoned(path)
    except OSError:
        return False


def _public_error(error: OSError, staging: Path, given: Path) -> OSError:
    """``error`` with the staging folder's path written as the destination's."""
    old, new = str(staging), str(given)
    names = [error.filename, error.filename2]
    if error.errno is None or not (
        old in (error.strerror or "") or any(isinstance(n, str) and old in n for n in names)
    ):
        return error
    args: list[Any] = [error.errno, (error.strerror or "").replace(old, new)]
    if error.filename is not None:
        args.append(os.fspath(error.filename).replace(old, new))
        if error.filename2 is not None:
            args += [None, os.fspath(error.filename2).replace(old, new)]
    return OSError(*args)


@contextlib.contextmanager
def publishing(
    destination: str | os.PathLike[str],
    *,
    replaces: Callable[[str], bool],
    guard: Guard | None = None,
    reads: Iterable[str | os.PathLike[str] | None] = (),
    last: Collection[str] = (),
) -> Iterator[Path]:
    """Build a checkpoint folder in a staging folder, then publish it as ``destination``.

    The block writes the new checkpoint's files into the yielded (empty, private) folder; when
    it ends without an exception they are fsync'ed and published by the module's rule: the
    entries of an existing ``destination`` that ``replaces`` names go, the others are carried
    over. When it raises, the staging folder is removed and ``destination`` is untouched (an
    ``OSError`` naming a staged file is re-raised naming the destination's file instead).

    Before anything is written -- and again under the lock just before publishing -- an input
    in ``reads`` that the publish would replace raises :class:`~bagelverify.errors.AliasError`
    (:func:`refuse_aliasing`), and ``guard`` (given the visible entries of an existing
    destination) may refuse it. ``last`` names the files moved in last when publishing in place
    (an index, DCP metadata). A destination that is a symlink is published into the folder it
    points to. A ``destination`` that is itself the staging folder of a publish this process is
    running is yielded as it is: writers compose (``convert`` stages, then calls the library's
    writers into its staging folder).
    """
    given = Path(destination)
    if _active_destination(given) is not None:
        yield given
        return
    publish = _Publish(given, replaces, guard, list(reads), last)
    staging = publish.begin()
    try:
        try:
            yield staging
        except OSError as error:
            publish.discard()
            raise _public_error(error, staging, given) from error
        except BaseException:
            publish.discard()
            raise
        publish.commit()
    finally:
        publish.end()
