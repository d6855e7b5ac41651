"""Child process of test_crash_safety.py: re-save a checkpoint folder and stop in the middle.

Usage: ``python _crash_writer.py MODE FOLDER SHARD_SIZE SYNC_FD``. The child loads FOLDER
(stage 2), adds one to every tensor and saves the result over FOLDER with
``save_bagel_checkpoint`` (sharded when SHARD_SIZE is not ``-``). MODE says where it stops:

- ``data``: the writer writes half of the 50th tensor's bytes, flushes, writes one byte to the
  pipe SYNC_FD and sleeps; the parent kills it with SIGKILL while the file is half written.
- ``rename``: the first rename of a shard over its final name (in the save's staging folder)
  happens, then the same signal and sleep (a kill between two renames of a sharded save).
- ``fsize``: no signal; ``RLIMIT_FSIZE`` is set to half the model file's size (``SIGXFSZ``
  ignored), so the kernel itself refuses a write; the child prints ``errno`` and the message
  of the ``OSError`` it gets, as JSON, and exits.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch

import bagelverify as bv
from bagelverify import checkpoint, safetensors_io

TENSORS_BEFORE_STOP = 50


def stop(sync_fd: int) -> None:
    os.write(sync_fd, b"!")
    time.sleep(120)  # the parent kills us long before
    raise SystemExit("not killed")


def main(mode: str, folder: Path, shard_size: str, sync_fd: int) -> None:
    native = bv.load_bagel_checkpoint_state_dict(folder, stage=2)
    changed = {key: value + 1 for key, value in native.items()}
    real_write = safetensors_io._write_tensor
    real_replace = os.replace
    written = 0

    def write_then_stop(handle: Any, spec: safetensors_io.TensorSpec, tensor: Any) -> None:
        nonlocal written
        written += 1
        if written < TENSORS_BEFORE_STOP:
            real_write(handle, spec, tensor)
            return
        data = bytes(safetensors_io.byte_view(tensor.contiguous()))
        handle.write(data[: len(data) // 2])
        handle.flush()
        stop(sync_fd)

    def replace_then_stop(source: Any, target: Any) -> None:
        real_replace(source, target)
        if str(target).endswith(".safetensors"):
            stop(sync_fd)

    if mode == "data":
        safetensors_io._write_tensor = write_then_stop  # type: ignore[assignment]
    elif mode == "rename":
        os.replace = replace_then_stop  # type: ignore[assignment]
    elif mode == "fsize":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        limit = os.path.getsize(folder / "ema.safetensors") // 2
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    size = None if shard_size == "-" else shard_size
    try:
        checkpoint.save_bagel_checkpoint(
            changed, folder, stage=2, max_shard_size=size, overwrite=True
        )
    except OSError as error:
        print(json.dumps({"errno": error.errno, "message": str(error)}))
        return
    print(json.dumps({"errno": None, "message": "saved"}))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
