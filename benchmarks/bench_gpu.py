"""Stage-1 load throughput into preallocated parameters: the read engine against the other ways.

Builds a full-size (``--scale 1``: the real 1,223 keys and shapes, 29.2 GB) synthetic
``ema.safetensors`` from filler bytes (a random block, rotated per tensor, so that a misplaced
chunk changes the digest; seconds, not minutes), then runs each method in its own process, warm
(file in the page cache) and cold (page cache dropped first: ``POSIX_FADV_DONTNEED`` and, as
root, ``/proc/sys/vm/drop_caches``), and prints one table:

- ``engine``: :func:`bagelverify.load_into` (the read engine, default knobs);
- ``engine_1t``: the same with one reader thread;
- ``reference``: ``safetensors.torch.load_file`` -> keep the stage's keys -> ``copy_``;
- ``safe_open``: ``safe_open(device=...)``, kept keys only -> ``copy_`` (GPU only);
- ``fastsafetensors``: ``SafeTensorsFileLoader`` (``nogds=True``), kept keys (GPU, if installed);
- ``limit_read``: 8 threads ``preadv`` the kept ranges into 64 MB buffers (no destination);
- ``limit_h2d``: pinned 64 MB chunks copied to the GPU (no file; GPU only).

Columns: GB/s over the kept bytes, host memory beyond the parameters (peak RSS counter
``VmHWM`` after a reset, minus the RSS just before the load, parameters included in both), GPU
memory beyond the parameters (``max_memory_allocated`` minus the parameters), and a digest of
the destinations (equal for every method that fills them).

Run: ``python benchmarks/bench_gpu.py --dir /tmp/bagel --device cuda`` (``--device cpu`` for
CPU destinations, ``--methods`` to choose, ``--cold/--no-cold``, ``--json OUT``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any

GPU_METHODS = (
    "engine",
    "engine_1t",
    "reference",
    "safe_open",
    "fastsafetensors",
    "limit_read",
    "limit_h2d",
)
CPU_METHODS = ("engine", "engine_1t", "reference", "limit_read")
CHUNK = 64 << 20


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def build(directory: Path, scale: float) -> None:
    """Write ``ema.safetensors`` + configs of the given scale with filler bytes."""
    from bagelverify.safetensors_io import DEFAULT_METADATA, encode_header, layout_order
    from bagelverify.synthetic import synthetic_specs

    config, model, _ = synthetic_specs(scale)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / "ema.safetensors"
    ordered = layout_order(model)
    total = sum(spec.nbytes for spec in ordered)
    if target.exists() and target.stat().st_size > total:
        return
    block = os.urandom(CHUNK + 4096)
    with open(target, "wb") as handle:
        handle.write(encode_header(ordered, DEFAULT_METADATA))
        for n, spec in enumerate(ordered):
            left, shift = spec.nbytes, (n * 2 * 37) % 4096
            while left:
                take = min(left, CHUNK)
                handle.write(memoryview(block)[shift : shift + take])
                left -= take
    config.save_pretrained(directory)


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    with contextlib.suppress(OSError):
        Path("/proc/sys/vm/drop_caches").write_text("3")


def warm_cache(path: Path) -> None:
    with open(path, "rb", buffering=0) as handle:
        buffer = bytearray(CHUNK)
        while handle.readinto(buffer):
            pass


def _destinations(directory: Path, device: str) -> tuple[dict[str, Any], list[Any]]:
    """Preallocated, touched stage-1 destinations (native keys) and the kept tensor infos."""
    import torch

    from bagelverify import inspect_checkpoint

    report = inspect_checkpoint(directory, stage=1)
    infos = [report.tensors[key] for key in report.plan.native]
    out = {
        native: torch.zeros(info.shape, dtype=info.torch_dtype, device=device)
        for native, info in zip(report.plan.native.values(), infos, strict=False)
    }
    return out, infos


def _digest(tensors: dict[str, Any]) -> str:
    """A position-sensitive checksum of every destination's bytes (computed on its device)."""
    import hashlib

    import torch

    sums = hashlib.sha256()
    for key in sorted(tensors):
        if tensors[key].device.type == "cpu":  # crc32 of the bytes: fast on the CPU
            from bagelverify.safetensors_io import byte_view

            flat = tensors[key].detach().reshape(-1).view(torch.uint8)
            sums.update(f"{key}:{zlib.crc32(byte_view(flat))};".encode())
            continue
        flat = tensors[key].detach().reshape(-1).view(torch.int16)
        total = 0
        for start in range(0, flat.numel(), 1 << 26):
            part = flat[start : start + (1 << 26)].to(torch.int64)
            weights = torch.arange(start, start + part.numel(), device=part.device) % 65521 + 1
            total += int((part * weights).sum())
        sums.update(f"{key}:{total};".encode())
    return sums.hexdigest()[:16]


def _preadv_ranges(path: Path, infos: list[Any], threads: int) -> None:
    """The limit: ``threads`` threads ``preadv`` every kept range in 64 MB pieces."""
    work = []
    for info in sorted(infos, key=lambda i: i.start):
        for offset in range(info.start, info.end, CHUNK):
            work.append((offset, min(CHUNK, info.end - offset)))
    lock, position = threading.Lock(), [0]
    fd = os.open(path, os.O_RDONLY)

    def reader() -> None:
        buffer = bytearray(CHUNK)
        view = memoryview(buffer)
        while True:
            with lock:
                if position[0] >= len(work):
                    return
                offset, length = work[position[0]]
                position[0] += 1
            done = 0
            while done < length:
                done += os.preadv(fd, [view[done:length]], offset + done)

    pool = [threading.Thread(target=reader) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    os.close(fd)


def measure(method: str, directory: Path, device: str) -> dict[str, Any]:
    """Run one method in this process and return its numbers."""
    import torch

    path = directory / "ema.safetensors"
    cuda = device.startswith("cuda")
    destinations, infos = _destinations(directory, device)
    kept = sum(info.nbytes for info in infos)
    params = sum(t.numel() * t.element_size() for t in destinations.values())
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_gpu = torch.cuda.memory_allocated() if cuda else 0
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    base_rss = _status("VmRSS")
    start = time.perf_counter()
    filled = True
    if method in ("engine", "engine_1t"):
        from bagelverify import load_into
        from bagelverify.engine import EngineOptions

        options = EngineOptions(threads=1) if method == "engine_1t" else EngineOptions()
        load_into(destinations, directory, stage=1, read_options=options)
    elif method == "reference":
        from safetensors.torch import load_file

        from bagelverify import BagelStateDictAdapter

        loaded = BagelStateDictAdapter(stage=1).from_hf(load_file(path))
        for key, value in loaded.items():
            destinations[key].copy_(value)
        del loaded
    elif method == "safe_open":
        from safetensors import safe_open

        with safe_open(path, framework="pt", device=device) as handle:
            for native, info in zip(destinations, infos, strict=False):
                destinations[native].copy_(handle.get_tensor(info.name))
    elif method == "fastsafetensors":
        from fastsafetensors import SafeTensorsFileLoader, SingleGroup

        loader = SafeTensorsFileLoader(SingleGroup(), torch.device(device), nogds=True)
        loader.add_filenames({0: [str(path)]})
        buffers = loader.copy_files_to_device()
        for native, info in zip(destinations, infos, strict=False):
            destinations[native].copy_(buffers.get_tensor(info.name))
        buffers.close()
        loader.close()
    elif method == "limit_read":
        _preadv_ranges(path, infos, 8)
        filled = False
    elif method == "limit_h2d":
        pinned = [torch.empty(CHUNK, dtype=torch.uint8, pin_memory=True) for _ in range(4)]
        flat = torch.empty(kept, dtype=torch.uint8, device=device)
        start = time.perf_counter()
        for n, offset in enumerate(range(0, kept, CHUNK)):
            length = min(CHUNK, kept - offset)
            flat[offset : offset + length].copy_(pinned[n % 4][:length], non_blocking=True)
        filled = False
    else:
        raise SystemExit(f"unknown method {method!r}")
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    host = _status("VmHWM") - base_rss
    gpu = (torch.cuda.max_memory_allocated() - base_gpu) if cuda else 0
    if method == "limit_h2d":
        gpu -= kept
    return {
        "method": method,
        "seconds": seconds,
        "gbps": kept / seconds / 1e9,
        "host_beyond_params_gb": host / 1e9,
        "gpu_beyond_params_gb": gpu / 1e9,
        "params_gb": params / 1e9,
        "digest": _digest(destinations) if filled else "-",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--scale", type=float, default=1)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--methods", default="")
    parser.add_argument("--cold", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--warm-repeat", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.dir, args.device)))
        return
    start = time.perf_counter()
    build(args.dir, args.scale)
    print(f"checkpoint ready in {time.perf_counter() - start:.1f} s", flush=True)
    cuda = args.device.startswith("cuda")
    methods = args.methods.split(",") if args.methods else (GPU_METHODS if cuda else CPU_METHODS)
    path = args.dir / "ema.safetensors"
    rows = []
    for cache in ("warm", "cold") if args.cold else ("warm",):
        for method in methods:
            if method == "limit_h2d" and cache == "cold":
                continue
            for _ in range(args.warm_repeat if cache == "warm" else 1):
                if cache == "cold":
                    drop_cache(path)
                else:
                    warm_cache(path)
                command = [
                    sys.executable,
                    __file__,
                    "--dir",
                    str(args.dir),
                    "--device",
                    args.device,
                    "--one",
                    method,
                ]
                done = subprocess.run(command, capture_output=True, text=True, timeout=900)
                if done.returncode:
                    print(f"{method} ({cache}) failed: {done.stderr.strip()[-800:]}", flush=True)
                    break
                row = json.loads(done.stdout.strip().splitlines()[-1]) | {"cache": cache}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print()
    print(f"{'method':<16} {'cache':<5} {'GB/s':>7} {'host GB':>8} {'GPU GB':>7}  digest")
    for row in rows:
        print(
            f"{row['method']:<16} {row['cache']:<5} {row['gbps']:7.2f} "
            f"{row['host_beyond_params_gb']:8.2f} {row['gpu_beyond_params_gb']:7.2f}  "
            f"{row['digest']}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
