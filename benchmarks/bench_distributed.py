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

``--cuda``: the parameters live on GPUs (rank r on ``cuda:r % device_count``): NCCL when every
rank has a GPU of its own, else gloo (NCCL refuses two ranks on one GPU). It also reports, per
rank, host memory (peak RSS) and GPU memory beyond the parameters, and checks every local shard
against the file's bytes of its rows, read independently with ``os.pread``. ``--warm`` skips the
page-cache eviction; ``--error-path`` makes rank 1 pass one destination of a wrong shape and
reports what each rank raised.
"""

from __future__ import annotations

import argparse
import contextlib
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


def _status(field: str) -> int:
    """A ``/proc/self/status`` field in bytes (the GPU benchmark's reader)."""
    from bench_gpu import _status as status  # a sibling script: its folder is on sys.path

    return status(field)


def _evict(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _check_rows(model: dict[str, object], report: object, rank: int, world: int) -> int:
    """How many local shards differ from their rows' bytes in the file (read with os.pread)."""
    import torch

    bad = 0
    for native, value in model.items():
        info = report.retained[native]  # type: ignore[attr-defined]
        local = value.to_local().detach().cpu().contiguous()  # type: ignore[attr-defined]
        rows = info.shape[0] if info.shape else 1
        per = -(-rows // world)
        first = min(rows, rank * per)
        row_bytes = info.nbytes // rows if rows else 0
        fd = os.open(info.path, os.O_RDONLY)
        try:
            raw = os.pread(fd, local.numel() * local.element_size(), info.start + first * row_bytes)
        finally:
            os.close(fd)
        expected = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else None
        got = local.view(-1).view(torch.uint8) if local.numel() else None
        if (expected is None) != (got is None) or (
            expected is not None and not torch.equal(expected, got)  # type: ignore[arg-type]
        ):
            bad += 1
    return bad


def worker(directory: str, stage: str, cuda: bool, warm: bool, error_path: bool) -> None:
    """One rank (started by torchrun): load sharded, print one JSON line with the counts."""
    import torch
    import torch.distributed as dist
    import torch.distributed.tensor as dtensor
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard

    import bagelverify as bv

    torch.set_num_threads(1)
    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    backend, device = "gloo", "cpu"
    if cuda:
        count = torch.cuda.device_count()
        torch.cuda.set_device(rank % count)
        backend, device = ("nccl" if count >= world else "gloo"), "cuda"
    dist.init_process_group(backend)
    mesh = init_device_mesh(device, (world,))
    report = bv.inspect_checkpoint(directory, stage=stage)
    model = {
        native: dtensor.empty(
            info.shape, dtype=info.torch_dtype, device_mesh=mesh, placements=[Shard(0)]
        )
        for native, info in report.retained.items()
    }
    if error_path and rank == 1:
        key = next(iter(model))
        shape = list(report.retained[key].shape)
        shape[0] += 1
        model[key] = dtensor.empty(
            shape, dtype=model[key].dtype, device_mesh=mesh, placements=[Shard(0)]
        )
    files = sorted({Path(str(getattr(info, "path", ""))) for info in report.tensors.values()})
    if rank == 0 and not warm:
        _evict(files)
        with contextlib.suppress(OSError):
            Path("/proc/sys/vm/drop_caches").write_text("3")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_gpu = torch.cuda.memory_allocated() if cuda else 0
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    base_rss = _status("VmRSS")
    dist.barrier()
    before, start = _io_read_bytes(), time.perf_counter()
    raised = None
    try:
        result = bv.load_bagel_checkpoint_distributed(model, directory, stage=stage)
    except Exception as error:  # the error path: report it, every rank alike
        raised = f"{type(error).__name__}: {str(error).splitlines()[0]}"
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    disk = _io_read_bytes() - before
    row: dict[str, object] = {"rank": rank, "backend": backend, "raised": raised}
    if raised is None:
        row.update(
            requested=result.bytes_read,
            disk=disk,
            kept=result.bytes_loaded,
            file=sum(path.stat().st_size for path in files),
            seconds=seconds,
            host_beyond=max(0, _status("VmHWM") - base_rss),
            gpu_beyond=(torch.cuda.max_memory_allocated() - base_gpu) if cuda else 0,
            bad_shards=_check_rows(model, report, rank, world),
            share=sum(
                v.to_local().numel() * v.element_size()
                for v in model.values()  # type: ignore[attr-defined]
            ),
        )
    rows: list[object] = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        print("ROWS " + json.dumps(rows), flush=True)
    dist.destroy_process_group()


def _table(rows: list[dict[str, float]], stage: str, nproc: int) -> str:
    if any(row.get("raised") for row in rows):
        return "\n".join(f"rank {row['rank']}: {row['raised']}" for row in rows)
    kept, file = rows[0]["kept"], rows[0]["file"]
    mb = 1e6
    lines = [
        f"stage {stage}, {nproc} ranks, Shard(0) on every tensor; model file {file / mb:.1f} MB, "
        f"kept by the stage {kept / mb:.1f} MB ({kept / file:.1%} of the file)",
        f"{'rank':>4} {'requested MB':>13} {'of kept':>8} {'of file':>8} "
        f"{'disk MB':>9} {'of file':>8} {'seconds':>8}",
    ]
    lines[-1] += f" {'GB/s':>6} {'host+ GB':>8} {'gpu+ GB':>7} {'÷share':>6} {'bad':>3}"
    for row in rows:
        lines.append(
            f"{row['rank']:>4} {row['requested'] / mb:>13.1f} {row['requested'] / kept:>8.1%} "
            f"{row['requested'] / file:>8.1%} {row['disk'] / mb:>9.1f} "
            f"{row['disk'] / file:>8.1%} {row['seconds']:>8.2f} "
            f"{row['requested'] / row['seconds'] / 1e9:>6.2f} {row['host_beyond'] / 1e9:>8.2f} "
            f"{row['gpu_beyond'] / 1e9:>7.2f} {row['requested'] / row['share']:>6.3f} "
            f"{row['bad_shards']:>3}"
        )
    slowest = max(row["seconds"] for row in rows)
    total_req = sum(r["requested"] for r in rows)
    total_disk = sum(r["disk"] for r in rows)
    lines.append(
        f"{'all':>4} {total_req / mb:>13.1f} {total_req / kept:>8.1%} {total_req / file:>8.1%} "
        f"{total_disk / mb:>9.1f} {total_disk / file:>8.1%} {slowest:>8.2f} "
        f"{total_req / slowest / 1e9:>6.2f}  (backend {rows[0]['backend']})"
    )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=8.0, help="width divisor (1 = 29 GB)")
    parser.add_argument("--nproc", type=int, default=2, help="ranks (processes)")
    parser.add_argument("--stage", default="stage1")
    parser.add_argument("--dir", help="reuse or create the synthetic checkpoint here")
    parser.add_argument("--cuda", action="store_true", help="parameters on GPUs")
    parser.add_argument("--warm", action="store_true", help="keep the page cache")
    parser.add_argument("--error-path", action="store_true", help="rank 1 passes a bad shape")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.dir, args.stage, args.cuda, args.warm, args.error_path)
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
            *(["--cuda"] if args.cuda else []),
            *(["--warm"] if args.warm else []),
            *(["--error-path"] if args.error_path else []),
        ]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        done = subprocess.run(
            command, capture_output=True, text=True, env=env, check=False, timeout=args.timeout
        )
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
