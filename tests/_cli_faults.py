"""``python tests/_cli_faults.py COMMAND ...``: the command line with one fault injected.

For the subprocess tests of ``tests/test_cli_new_user.py``, which need conditions a test cannot
make for real on any machine (a mount point, a folder even root cannot write) or a convert slow
enough to signal mid-write. Chosen by environment variables:

``BV_FAULT_SLOW=SECONDS``
    convert waits SECONDS after each tensor it writes;
``BV_FAULT_MOUNT=DIR``
    DIR acts as a mount point: a rename into or out of it fails with ``EXDEV``, and exchanging
    it with another folder with ``EBUSY``;
``BV_FAULT_READONLY=DIR`` (with ``BV_FAULT_ERRNO``, default ``EACCES``)
    creating a folder or file directly in DIR fails with that errno, and ``os.access`` says DIR
    cannot be written.
"""

from __future__ import annotations

import errno
import os
import sys
import time
from pathlib import Path
from typing import Any


def _inside(path: Any, folder: Path) -> bool:
    resolved = Path(os.fsdecode(path)).resolve()
    return resolved == folder or folder in resolved.parents


def _mount(folder: Path) -> None:
    for name in ("replace", "rename"):
        real = getattr(os, name)

        def move(src: Any, dst: Any, *args: Any, _real: Any = real, **kwargs: Any) -> None:
            if _inside(src, folder) != _inside(dst, folder):
                raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), src, None, dst)
            _real(src, dst, *args, **kwargs)

        setattr(os, name, move)
    from bagelverify import publish

    real_exchange = publish.exchange

    def exchange(a: Any, b: Any) -> None:
        if _inside(a, folder) or _inside(b, folder):
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), a, None, b)
        real_exchange(a, b)

    publish.exchange = exchange  # type: ignore[assignment]


def _readonly(folder: Path, code: int) -> None:
    real_mkdir, real_open = os.mkdir, os.open

    def refuse(path: Any) -> None:
        if Path(os.fsdecode(path)).parent.resolve() == folder:
            raise OSError(code, os.strerror(code), os.fsdecode(path))

    def mkdir(path: Any, *args: Any, **kwargs: Any) -> None:
        if not Path(os.fsdecode(path)).exists():
            refuse(path)
        real_mkdir(path, *args, **kwargs)

    def open_(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & os.O_CREAT:
            refuse(path)
        return real_open(path, flags, *args, **kwargs)

    real_access = os.access

    def access(path: Any, mode: int, *args: Any, **kwargs: Any) -> bool:
        if mode & os.W_OK and Path(os.fsdecode(path)).resolve() == folder:
            return False
        return real_access(path, mode, *args, **kwargs)

    os.mkdir, os.open, os.access = mkdir, open_, access  # type: ignore[assignment]


def _slow(seconds: float) -> None:
    import bagelverify.commands.convert as convert

    real = convert.convert_checkpoint

    def slow_convert(*args: Any, on_tensor: Any = None, **kwargs: Any) -> Any:
        def tick(key: str, nbytes: int) -> None:
            if on_tensor is not None:
                on_tensor(key, nbytes)
            time.sleep(seconds)

        return real(*args, on_tensor=tick, **kwargs)

    convert.convert_checkpoint = slow_convert  # type: ignore[assignment]


def main() -> int:
    if "BV_FAULT_MOUNT" in os.environ:
        _mount(Path(os.environ["BV_FAULT_MOUNT"]).resolve())
    if "BV_FAULT_READONLY" in os.environ:
        code = getattr(errno, os.environ.get("BV_FAULT_ERRNO", "EACCES"))
        _readonly(Path(os.environ["BV_FAULT_READONLY"]).resolve(), code)
    if "BV_FAULT_SLOW" in os.environ:
        _slow(float(os.environ["BV_FAULT_SLOW"]))
    from bagelverify import cli

    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
