"""Child process of test_publish.py: run one writer of a checkpoint folder and SIGKILL itself at
a chosen instant of publishing.

Usage: ``python _publish_crash.py WRITER POINT DST [ARGS ...]``.

WRITER (what runs):

- ``save NEW``: load the checkpoint folder NEW (stage 2) and save it over DST with NEW's config
  (``save_bagel_checkpoint(..., overwrite=True)``);
- ``save-inplace NEW``: the same, on an OS that cannot exchange folders (``publish.exchange``
  fails with ``EINVAL``), so DST is published in place;
- ``sharded NEW SIZE``: the same as a sharded save with shards of at most SIZE;
- ``convert SRC``: ``bagelverify convert SRC DST --stage 1 --force``;
- ``repair SRC BASE``: ``bagelverify repair SRC --base BASE -o DST``.

POINT (where the process kills itself with SIGKILL; ``none``: it runs to the end):

- ``write``: half-way through the 40th tensor's bytes, in the staging folder;
- ``staged``: the staging folder is complete and fsync'ed, nothing published;
- ``recorded``: the recovery record is written, nothing else changed;
- ``exchanged``: the staging folder and DST were just exchanged;
- ``carry``: the first of the user's files was carried over into the new DST;
- ``trash``: half of the previous checkpoint's files were removed from the trash folder;
- ``moved``: (in place) two staged files (``config.json``, ``ema.safetensors``) were moved
  into DST.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch

import bagelverify as bv
from bagelverify import publish, safetensors_io

TENSORS_BEFORE_STOP = 40
RECORD = "exchange"
"""The mode of the recovery record after which ``recorded`` stops (``in-place`` for
``save-inplace``, whose exchange record is removed when the exchange fails)."""


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def arm(point: str) -> None:
    """Patch the step after which (or in which) the process dies."""
    if point == "write":
        real_write = safetensors_io._write_tensor
        count = [0]

        def write(handle: Any, spec: Any, tensor: torch.Tensor) -> None:
            count[0] += 1
            if count[0] < TENSORS_BEFORE_STOP:
                real_write(handle, spec, tensor)
                return
            data = bytes(safetensors_io.byte_view(tensor.contiguous()))
            handle.write(data[: len(data) // 2])
            handle.flush()
            die()

        safetensors_io._write_tensor = write  # type: ignore[assignment]
    elif point == "staged":
        real_sync = publish._sync_tree

        def sync(folder: Path) -> None:
            real_sync(folder)
            die()

        publish._sync_tree = sync  # type: ignore[assignment]
    elif point == "recorded":
        real_journal = publish._write_journal

        def journal(path: Path, record: dict[str, Any]) -> None:
            real_journal(path, record)
            if record["mode"] == RECORD:
                die()

        publish._write_journal = journal  # type: ignore[assignment]
    elif point == "exchanged":
        real_exchange = publish.exchange

        def exchange(a: Any, b: Any) -> None:
            real_exchange(a, b)
            die()

        publish.exchange = exchange  # type: ignore[assignment]
    elif point == "carry":
        real_carry = publish._carry

        def carry(old: Path, new: Path, names: Any) -> None:
            names = list(names)
            assert len(names) >= 2, names  # the test gives DST two entries of the user's
            real_carry(old, new, names[:1])
            die()

        publish._carry = carry  # type: ignore[assignment]
    elif point == "trash":
        real_remove = publish._remove_tree

        def remove(path: Path) -> None:
            if publish.TRASH_MARKER in path.name:
                files = sorted(p for p in path.iterdir() if p.is_file())
                assert len(files) >= 2, files
                for file in files[: len(files) // 2]:
                    file.unlink()
                die()
            real_remove(path)

        publish._remove_tree = remove  # type: ignore[assignment]
    elif point == "moved":
        real_move = publish.move_into_place
        moves = [0]

        def move(source: Path, target: Path) -> None:
            real_move(source, target)
            moves[0] += 1
            if moves[0] == 2:
                die()

        publish.move_into_place = move  # type: ignore[assignment]
    elif point != "none":
        raise SystemExit(f"unknown point {point}")


def no_exchange() -> None:
    def exchange(a: Any, b: Any) -> None:
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), os.fspath(a))

    publish.exchange = exchange  # type: ignore[assignment]


def main(writer: str, point: str, dst: Path, *args: str) -> None:
    global RECORD
    if writer in ("save", "save-inplace", "sharded"):
        new = Path(args[0])
        state = bv.load_bagel_checkpoint_state_dict(new, stage=2)
        config = bv.BagelConfig.from_pretrained(new)
        size = args[1] if writer == "sharded" else None
        if writer == "save-inplace":
            no_exchange()
            RECORD = "in-place"
        arm(point)
        bv.save_bagel_checkpoint(
            state, dst, stage=2, config=config, max_shard_size=size, overwrite=True
        )
    elif writer == "convert":
        from bagelverify import cli

        arm(point)
        code = cli.main(["convert", args[0], str(dst), "--stage", "1", "--force", "-q"])
        raise SystemExit(code)
    elif writer == "repair":
        from bagelverify import cli

        arm(point)
        code = cli.main(["repair", args[0], "--base", args[1], "-o", str(dst), "-q"])
        raise SystemExit(code)
    else:
        raise SystemExit(f"unknown writer {writer}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]), *sys.argv[4:])
