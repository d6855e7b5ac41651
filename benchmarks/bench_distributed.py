"""How much of the checkpoint each rank reads in a sharded (FSDP2-style) distributed load.

Builds a synthetic BAGEL-shaped checkpoint (scale 8 by default: ~460 MB model file), then runs
itself under ``torchrun`` (gloo, CPU) so the launch is exactly what a cluster user runs. Every
rank builds the model's state dict as row-sharded DTensors (``Shard(0)`` on a 1-D mesh: FSDP2's
layout; only the local shard is allocated), rank 0 evicts the checkpoint from the page cache, and
all ranks call :func:`bagelverify.load_bagel_checkpoint_distributed` together. Per rank it prints:

- ``requested``: bytes of tensor data DCP asked the reader for (the rank's slices, exact);
- ``disk``: ``read_bytes`` of ``/proc/self/io`` around the load, i.e. what the kernel fetched
  from the block device for this process, read-ahead included (Linux only);
- both as a share of the stage's kept bytes and of the whole model file.

Ranks load concurrently and share the page cache, so a page that two ranks need is fetched once
and counted for one of them; read-ahead (``/sys/block/*/queue/read_ahead_kb``) rounds each
rank's ranges up.

Run: ``python benchmarks/bench_distributed.py`` (``--scale``, ``--nproc``, ``--stage``, ``--dir``
to reuse a folder).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _io_read_bytes() -> int:
    with open("/proc/self/io") as handle:
        fields = dict(line.split(": ") for line in handle.read().splitlines())
    return int(fields["read_bytes"])


def _evict(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def worker(directory: str, stage: str) -> None:
    """One rank (started by torchrun): load sharded, print one JSON line with the counts."""
    import torch
    import torch.distributed as dist
    import torch.distributed.tensor as dtensor
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard

    import bagelverify as bv

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    report = bv.inspect_checkpoint(directory, stage=stage)
    model = {
        native: dtensor.empty(
            info.shape, dtype=info.torch_dtype, device_mesh=mesh, placements=[Shard(0)]
        )
        for native, info in report.retained.items()
    }
    files = sorted({Path(str(getattr(info, "path", ""))) for info in report.tensors.values()})
    if rank == 0:
        _evict(files)
    dist.barrier()
    before, start = _io_read_bytes(), time.perf_counter()
    result = bv.load_bagel_checkpoint_distributed(model, directory, stage=stage)
    seconds = time.perf_counter() - start
    disk = _io_read_bytes() - before
    row = {
        "rank": rank,
        "requested": result.bytes_read,
        "disk": disk,
        "kept": result.bytes_loaded,
        "file": sum(path.stat().st_size for path in files),
        "seconds": seconds,
    }
    rows: list[object] = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        print("ROWS " + json.dumps(rows), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def _table(rows: list[dict[str, float]], stage: str, nproc: int) -> str:
    kept, file = rows[0]["kept"], rows[0]["file"]
    mb = 1e6
    lines = [
        f"stage {stage}, {nproc} ranks, Shard(0) on every tensor; model file {file / mb:.1f} MB, "
        f"kept by the stage {kept / mb:.1f} MB ({kept / file:.1%} of the file)",
        f"{'rank':>4} {'requested MB':>13} {'of kept':>8} {'of file':>8} "
        f"{'disk MB':>9} {'of file':>8} {'seconds':>8}",
    ]
    for row in rows:
        lines.append(
            f"{row['rank']:>4} {row['requested'] / mb:>13.1f} {row['requested'] / kept:>8.1%} "
            f"{row['requested'] / file:>8.1%} {row['disk'] / mb:>9.1f} "
            f"{row['disk'] / file:>8.1%} {row['seconds']:>8.2f}"
        )
    total_req = sum(r["requested"] for r in rows)
    total_disk = sum(r["disk"] for r in rows)
    lines.append(
        f"{'all':>4} {total_req / mb:>13.1f} {total_req / kept:>8.1%} {total_req / file:>8.1%} "
        f"{total_disk / mb:>9.1f} {total_disk / file:>8.1%}"
    )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=8.0, help="width divisor (1 = 29 GB)")
    parser.add_argument("--nproc", type=int, default=2, help="ranks (processes)")
    parser.add_argument("--stage", default="stage1")
    parser.add_argument("--dir", help="reuse or create the synthetic checkpoint here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.dir, args.stage)
        return 0

    from bagelverify import make_synthetic_checkpoint

    temporary = None if args.dir else tempfile.mkdtemp(prefix="bagelverify-dist-bench-")
    directory = Path(args.dir or temporary or "")
    try:
        if not (directory / "ema.safetensors").is_file():
            made = make_synthetic_checkpoint(directory, scale=args.scale, seed=0, with_vae=False)
            print(f"wrote {made.model_bytes / 1e6:.1f} MB synthetic checkpoint to {directory}")
        torchrun = [sys.executable, "-m", "torch.distributed.run"]
        command = [
            *torchrun,
            "--standalone",
            f"--nproc-per-node={args.nproc}",
            __file__,
            "--worker",
            "--dir",
            str(directory),
            "--stage",
            args.stage,
        ]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        found = [line for line in done.stdout.splitlines() if line.startswith("ROWS ")]
        if done.returncode != 0 or not found:
            sys.stderr.write(done.stdout + done.stderr)
            return done.returncode or 1
        print(_table(json.loads(found[0][5:]), args.stage, args.nproc))
    finally:
        if temporary:
            shutil.rmtree(temporary, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
