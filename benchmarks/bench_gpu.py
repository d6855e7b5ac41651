"""Stage-1 load throughput into preallocated parameters: the read engine against the limits.

Builds a full-size (``--scale 1``: the real 1,223 keys and shapes, 29.2 GB) synthetic
``ema.safetensors`` from filler bytes (a random block, rotated per tensor, so that a misplaced
chunk changes the digest; seconds, not minutes), then runs each method in its own process, warm
(file in the page cache) and cold (page cache dropped first: ``POSIX_FADV_DONTNEED`` and, as
root, ``/proc/sys/vm/drop_caches``), and prints one table with each row's ratio to its limit.

A method is ``NAME[:key=value,...]``; keys: ``device`` (``cuda``/``cpu``), ``dtype`` (``bf16``,
``f32``: the destinations' dtype), ``threads``, ``chunk`` and ``staging`` (MiB), ``direct``
(``O_DIRECT`` reads at once), ``prefetch`` (``0``: none), ``loads`` (loads in one process; the
row is the first, the last is printed beside it), ``code=NAME``
(import bagelverify from the folder given as ``--code NAME=FOLDER``, e.g. ``git archive`` of an
earlier commit, for a before/after in one run), ``profile=1`` (engine: where the readers' time
went, in thread-seconds: getting a buffer, pinning, ``preadv``, issuing copies). Names:

- ``engine``: :func:`bagelverify.load_into` (the read engine; default knobs unless given);
- ``reference``: ``safetensors.torch.load_file`` -> keep the stage's keys -> ``copy_``;
- ``safe_open``: ``safe_open(device=...)``, kept keys only -> ``copy_``;
- ``fastsafetensors``: ``SafeTensorsFileLoader`` (``nogds=True``), kept keys (if installed);
- ``limit_read``: ``threads`` threads (default 16) ``preadv`` the kept ranges into reused 64 MiB
  buffers (no destination): the rate at which the host reads the file at all (the page cache
  warm, the disk cold);
- ``limit_direct``: the same with ``O_DIRECT`` (cold only; the disk without the page cache);
- ``limit_h2d``: pinned 64 MiB chunks copied to the GPU (no file);
- ``pin_cost``: seconds to pin ``staging`` MiB of ``chunk`` MiB buffers, one thread or
  ``threads`` threads: the fixed cost of a fresh process's first staged load.

Columns: GB/s over the kept (file) bytes; ratio to the row's limit (warm rows: the best
``engine:device=cpu`` row, the host's own read into CPU memory; cold rows: the best cold
``limit_*`` row, the disk); host memory beyond the parameters (peak RSS counter ``VmHWM`` after a
reset, minus the RSS just before the load, parameters included in both); GPU memory beyond the
parameters (``max_memory_allocated`` minus the parameters); a digest of the destinations (equal
for every method that fills them with the same dtype).

Run: ``python benchmarks/bench_gpu.py --dir /dev/shm/bagel --cold-dir /tmp/bagel`` (the table of
the README); ``--methods`` to choose, ``--no-cold``, ``--json OUT``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any

DEFAULT_METHODS = (
    "engine",
    "engine:dtype=f32",
    "engine:device=cpu",
    "reference",
    "limit_read",
    "limit_direct",
    "limit_h2d",
    "pin_cost:threads=1",
    "pin_cost",
)
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
    block = random.Random(0).randbytes(CHUNK + 4096)  # the same file in every folder
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


def _destinations(directory: Path, device: str, dtype: str) -> tuple[dict[str, Any], list[Any]]:
    """Preallocated, touched stage-1 destinations (native keys) and the kept tensor infos."""
    import torch

    from bagelverify import inspect_checkpoint

    report = inspect_checkpoint(directory, stage=1)
    infos = [report.tensors[key] for key in report.plan.native]
    wanted = {"bf16": None, "f32": torch.float32}[dtype]
    out = {
        native: torch.zeros(info.shape, dtype=wanted or info.torch_dtype, device=device)
        for native, info in zip(report.plan.native.values(), infos, strict=False)
    }
    return out, infos


def _digest(tensors: dict[str, Any]) -> str:
    """A position-sensitive checksum of every destination's bytes (computed on its device)."""
    import hashlib

    import torch

    sums = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach()
        if tensor.dtype == torch.float32:  # BF16 -> F32 is a shift: compare the upper halves
            tensor = (tensor.view(torch.int32) >> 16).to(torch.int16)
        if tensor.device.type == "cpu":  # crc32 of the bytes: fast on the CPU
            from bagelverify.safetensors_io import byte_view

            flat = tensor.reshape(-1).view(torch.uint8)
            sums.update(f"{key}:{zlib.crc32(byte_view(flat))};".encode())
            continue
        flat = tensor.reshape(-1).view(torch.int16)
        total = 0
        for start in range(0, flat.numel(), 1 << 26):
            part = flat[start : start + (1 << 26)].to(torch.int64)
            weights = torch.arange(start, start + part.numel(), device=part.device) % 65521 + 1
            total += int((part * weights).sum())
        sums.update(f"{key}:{total};".encode())
    return sums.hexdigest()[:16]


def _preadv_ranges(path: Path, infos: list[Any], threads: int, *, direct: bool = False) -> None:
    """The limit: ``threads`` threads ``preadv`` every kept range in 64 MiB pieces (``direct``:
    ``O_DIRECT``, ranges widened to 4 KiB boundaries, into page-aligned buffers)."""
    import mmap

    work = []
    align = 4096 if direct else 1
    for info in sorted(infos, key=lambda i: i.start):
        begin, end = info.start // align * align, -(-info.end // align) * align
        for offset in range(begin, end, CHUNK):
            work.append((offset, min(CHUNK, end - offset)))
    lock, position = threading.Lock(), [0]
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))

    def reader() -> None:
        buffer = mmap.mmap(-1, CHUNK)  # page-aligned, as O_DIRECT needs
        view = memoryview(buffer)
        while True:
            with lock:
                if position[0] >= len(work):
                    break
                offset, length = work[position[0]]
                position[0] += 1
            done = 0
            while done < length:
                got = os.preadv(fd, [view[done:length]], offset + done)
                if got == 0:
                    break  # the file's end (O_DIRECT ranges are rounded up)
                done += got
        view.release()
        buffer.close()

    pool = [threading.Thread(target=reader) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    os.close(fd)


def parse(method: str) -> tuple[str, dict[str, str]]:
    """``"engine:threads=16,chunk=32"`` -> ``("engine", {"threads": "16", "chunk": "32"})``."""
    name, _, rest = method.partition(":")
    return name, dict(item.split("=", 1) for item in rest.split(",") if item)


def pin_cost(knobs: dict[str, str]) -> float:
    """Seconds to pin ``staging`` MiB in ``chunk`` MiB buffers on ``threads`` threads."""
    import torch

    from bagelverify import engine

    chunk = int(knobs.get("chunk", 16)) << 20
    count = (int(knobs.get("staging", 1024)) << 20) // chunk
    threads = int(knobs.get("threads", 16))
    torch.empty(1, pin_memory=True)  # the host allocator's own start-up is not part of it
    pool = engine._Staging(count, chunk, pinned=True)
    shares = [count // threads + (n < count % threads) for n in range(threads)]
    workers = [
        threading.Thread(target=lambda share=share: [pool._allocate() for _ in range(share)])
        for share in shares
    ]
    start = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    seconds = time.perf_counter() - start
    return seconds


def _load(name: str, knobs: dict[str, str], path: Path, destinations: dict[str, Any]) -> bool:
    """One load by method ``name``; returns whether it filled ``destinations``."""
    import torch

    device = knobs.get("device", "cuda")
    infos = _INFOS
    if name == "engine":
        from bagelverify import engine, load_into

        options = engine.EngineOptions(
            threads=int(knobs["threads"]) if "threads" in knobs else None,
            chunk_bytes=int(knobs["chunk"]) << 20 if "chunk" in knobs else None,
            staging_bytes=int(knobs.get("staging", 1024)) << 20,
            prefetch=knobs.get("prefetch", "1") == "1",
            **({"direct_reads": int(knobs["direct"])} if "direct" in knobs else {}),
        )
        load_into(destinations, path.parent, stage=1, read_options=options)
    elif name == "reference":
        from safetensors.torch import load_file

        from bagelverify import BagelStateDictAdapter

        loaded = BagelStateDictAdapter(stage=1).from_hf(load_file(path))
        for key, value in loaded.items():
            destinations[key].copy_(value)
        del loaded
    elif name == "safe_open":
        from safetensors import safe_open

        with safe_open(path, framework="pt", device=device) as handle:
            for native, info in zip(destinations, infos, strict=False):
                destinations[native].copy_(handle.get_tensor(info.name))
    elif name == "fastsafetensors":
        from fastsafetensors import SafeTensorsFileLoader, SingleGroup

        loader = SafeTensorsFileLoader(SingleGroup(), torch.device(device), nogds=True)
        loader.add_filenames({0: [str(path)]})
        buffers = loader.copy_files_to_device()
        for native, info in zip(destinations, infos, strict=False):
            destinations[native].copy_(buffers.get_tensor(info.name))
        buffers.close()
        loader.close()
    elif name in ("limit_read", "limit_direct"):
        threads = int(knobs.get("threads", 16))
        _preadv_ranges(path, infos, threads, direct=name == "limit_direct")
        return False
    elif name == "limit_h2d":
        kept = sum(info.nbytes for info in infos)
        pinned = [torch.empty(CHUNK, dtype=torch.uint8, pin_memory=True) for _ in range(4)]
        flat = torch.empty(kept, dtype=torch.uint8, device=device)
        torch.cuda.synchronize()
        for n, offset in enumerate(range(0, kept, CHUNK)):
            length = min(CHUNK, kept - offset)
            flat[offset : offset + length].copy_(pinned[n % 4][:length], non_blocking=True)
        return False
    else:
        raise SystemExit(f"unknown method {name!r}")
    return True


_INFOS: list[Any] = []


def _profile() -> dict[str, float]:
    """Time the engine's steps in every reader (thread-seconds, summed); returns the totals,
    filled as the load runs. Patches the engine's internals: benchmark use only."""
    from bagelverify import engine, safetensors_io

    totals: dict[str, float] = {}
    lock = threading.Lock()

    def add(step: str, seconds: float) -> None:
        with lock:
            totals[step] = totals.get(step, 0.0) + seconds
            totals[step + " n"] = totals.get(step + " n", 0) + 1

    def timed(step: str, function: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                add(step, time.perf_counter() - start)

        return wrapper

    buffer = engine._Staging.buffer

    @contextlib.contextmanager
    def timed_buffer(self: Any, stop: Any) -> Any:
        start = time.perf_counter()
        with buffer(self, stop) as taken:
            add("get buffer (pin incl.)", time.perf_counter() - start)
            yield taken

    engine._Staging.buffer = timed_buffer
    engine._Staging._allocate = timed("pin", engine._Staging._allocate)
    safetensors_io.read_exact = timed("preadv", safetensors_io.read_exact)
    if hasattr(engine, "_read_staged"):
        engine._read_staged = timed("staged reads", engine._read_staged)
    engine._copy_piece = timed("issue copies", engine._copy_piece)
    engine._run_workers = timed("readers (wall)", engine._run_workers)
    return totals


def measure(method: str, directory: Path) -> dict[str, Any]:
    """Run one method in this process and return its numbers."""
    import torch

    name, knobs = parse(method)
    if name == "pin_cost":
        return {"method": method, "seconds": pin_cost(knobs)}
    path = directory / "ema.safetensors"
    device = knobs.get("device", "cuda")
    cuda = device.startswith("cuda") and name not in ("limit_read", "limit_direct")
    if name in ("limit_read", "limit_direct", "limit_h2d"):
        destinations, infos = {}, _destinations(directory, "meta", "bf16")[1]
    else:
        destinations, infos = _destinations(directory, device, knobs.get("dtype", "bf16"))
    _INFOS[:] = infos
    kept = sum(info.nbytes for info in infos)
    params = sum(t.numel() * t.element_size() for t in destinations.values())
    seconds: list[float] = []
    profile = _profile() if knobs.get("profile") == "1" else None
    for _ in range(int(knobs.get("loads", 1))):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        base_gpu = torch.cuda.memory_allocated() if cuda else 0
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")
        base_rss = _status("VmRSS")
        start = time.perf_counter()
        filled = _load(name, knobs, path, destinations)
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        host = _status("VmHWM") - base_rss
        gpu = (torch.cuda.max_memory_allocated() - base_gpu) if cuda else 0
        if name == "limit_h2d":
            gpu -= kept
    return {
        "method": method,
        "seconds": seconds[0],
        "gbps": kept / seconds[0] / 1e9,
        "last_gbps": kept / seconds[-1] / 1e9,
        "host_beyond_params_gb": host / 1e9,
        "gpu_beyond_params_gb": gpu / 1e9,
        "params_gb": params / 1e9,
        "digest": _digest(destinations) if filled else "-",
    } | ({"profile": profile} if profile is not None else {})


def _ratios(rows: list[dict[str, Any]]) -> None:
    """Each load row's ratio to its limit: warm, the best CPU-destination engine load; cold, the
    best cold ``limit_*`` read."""
    warm = [r["gbps"] for r in rows if r["cache"] == "warm" and _is_cpu_engine(r["method"])]
    cold = [r["gbps"] for r in rows if r["cache"] == "cold" and r["method"].startswith("limit_")]
    for row in rows:
        limit = max(warm or [0]) if row["cache"] == "warm" else max(cold or [0])
        row["ratio"] = row["gbps"] / limit if limit and "gbps" in row else None


def _code_folder(item: str) -> tuple[str, str]:
    """``--code NAME=FOLDER`` -> ``(NAME, FOLDER)``."""
    name, sep, folder = item.partition("=")
    if not (sep and name and folder):
        raise argparse.ArgumentTypeError(f"--code takes NAME=FOLDER, got {item!r}")
    return name, folder


def _is_cpu_engine(method: str) -> bool:
    name, knobs = parse(method)
    return name == "engine" and knobs.get("device") == "cpu" and "dtype" not in knobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, required=True, help="warm runs' folder")
    parser.add_argument("--cold-dir", type=Path, help="cold runs' folder (default: --dir)")
    parser.add_argument("--scale", type=float, default=1)
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS).replace(",", ";"))
    parser.add_argument("--cold-methods", default="engine;engine:dtype=f32;limit_read;limit_direct")
    parser.add_argument("--cold", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--repeat", type=int, default=2, help="warm runs of each method")
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--code",
        action="append",
        type=_code_folder,
        default=[],
        metavar="NAME=FOLDER",
        help="a folder holding an earlier bagelverify/, for methods with code=NAME",
    )
    parser.add_argument("--budget", type=float, default=0, help="start no run after N seconds")
    parser.add_argument("--prewarm", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.dir)))
        return
    start = time.perf_counter()
    with contextlib.suppress(OSError):
        gpu = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        )
        print(f"GPU: {gpu.stdout.strip()}; CPUs: {os.cpu_count()}", flush=True)
    build(args.dir, args.scale)
    cold_dir = args.cold_dir or args.dir
    if args.cold and cold_dir != args.dir:
        build(cold_dir, args.scale)
    print(f"checkpoint(s) ready in {time.perf_counter() - start:.1f} s", flush=True)
    plan = [("warm", m) for m in args.methods.split(";") for _ in range(args.repeat)]
    if args.cold:
        plan += [("cold", m) for m in args.cold_methods.split(";")]
    rows = []
    for cache, method in plan:
        if args.budget and time.perf_counter() - start > args.budget:
            print(f"budget spent: {method} ({cache}) and later runs skipped", flush=True)
            break
        directory = args.dir if cache == "warm" else cold_dir
        path = directory / "ema.safetensors"
        if cache == "cold":
            drop_cache(path)
        elif args.prewarm and not method.startswith("pin_cost"):
            warm_cache(path)
        command = [sys.executable, __file__, "--dir", str(directory), "--one", method]
        env = dict(os.environ)
        code = parse(method)[1].get("code")
        if code is not None:
            folders = dict(args.code)
            if code not in folders:
                raise SystemExit(f"{method} needs --code {code}=FOLDER")
            env["PYTHONPATH"] = os.pathsep.join([folders[code], env.get("PYTHONPATH", "")])
        done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
        if done.returncode:
            print(f"{method} ({cache}) failed: {done.stderr.strip()[-800:]}", flush=True)
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1]) | {"cache": cache}
        rows.append(row)
        print(json.dumps(row), flush=True)
    _ratios(rows)
    print()
    print(
        f"{'method':<40} {'cache':<5} {'GB/s':>7} {'ratio':>6} {'last':>7} {'host GB':>8} "
        f"{'GPU GB':>7}  digest"
    )
    for row in rows:
        if "gbps" not in row:
            print(f"{row['method']:<40} {'-':<5} {row['seconds']:7.3f} s")
            continue
        ratio = f"{row['ratio']:6.2f}" if row["ratio"] is not None else "     -"
        print(
            f"{row['method']:<40} {row['cache']:<5} {row['gbps']:7.2f} {ratio} "
            f"{row['last_gbps']:7.2f} {row['host_beyond_params_gb']:8.2f} "
            f"{row['gpu_beyond_params_gb']:7.2f}  {row['digest']}"
        )
        if "profile" in row:
            steps = {k: v for k, v in row["profile"].items() if not k.endswith(" n")}
            counts = row["profile"]
            print(
                "    "
                + "; ".join(f"{k} {v:.3f} s/{counts[k + ' n']:.0f}" for k, v in steps.items())
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
