"""Checkpoint I/O benchmark: peak memory and throughput of stage-1 loading and of saving.

Builds a synthetic BAGEL-shaped checkpoint (scale 3: 3.2 GB, 1.76 GB of UND tensors) in a
temporary folder, warms the page cache, then runs every measurement in a fresh subprocess and
prints one side-by-side table:

- ``naive``: ``safetensors.torch.load_file``, adapter filter, copy into preallocated parameters
  (what the reference does before ``load_state_dict``);
- ``load_into``: :func:`bagelverify.load_into` into the same preallocated parameters;
- ``dict``: :func:`bagelverify.load_bagel_checkpoint_state_dict`;
- ``plain_read``: ``readinto`` of the same byte ranges into one zero-filled buffer of the UND
  size (the limit: the bytes land in distinct resident memory, as in parameters);
  ``plain_read_reused``: the same into one reused buffer of the largest tensor's size;
- ``save`` vs ``save_file`` (and ``save_file`` + fsync, since ours always fsyncs).

Peak RSS is the kernel's peak-RSS counter (``VmHWM``, reset after the imports, torch included)
minus the RSS at that point, read once the values are in the parameters, so the mmap pages that
``load_file`` touches are counted. The parameters of ``naive`` and ``load_into`` are allocated
and zero-filled before the clock starts, as a constructed model's are (their memory counts in
the peak); the ``dict`` loader allocates its tensors inside the measurement. Linux only.

Run: ``python benchmarks/bench_io.py`` (``--scale``, ``--repeat``, ``--dir`` to reuse a folder,
``--cold`` to evict the file from the page cache before every load).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

LOADS = ("naive", "load_into", "dict", "plain_read", "plain_read_reused")
SAVES = ("save", "save_file", "save_file_fsync")


def _status(field: str) -> int:
    """A ``/proc/self/status`` memory field in bytes (``VmRSS``, ``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> int:
    """Reset the peak-RSS counter (Linux >= 4.0) and return the current RSS as the baseline."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


def _peak_above(baseline: int) -> int:
    return _status("VmHWM") - baseline


def _stage1_parameters(folder: Path) -> tuple[dict[str, Any], int]:
    """Zero-filled stage-1 parameters, as a constructed model holds them, and the UND bytes."""
    import torch

    import bagelverify as bv

    report = bv.inspect_checkpoint(folder, stage=1)
    params = {
        native: torch.zeros(info.shape, dtype=info.torch_dtype)  # type: ignore[union-attr]
        for native, info in report.retained.items()
    }
    return params, report.stage1_bytes


def _und_ranges(folder: Path) -> tuple[Path, list[tuple[int, int]]]:
    """The model file and the byte ranges of its UND tensors, in file order."""
    import bagelverify as bv
    from bagelverify.checkpoint import open_checkpoint

    files = open_checkpoint(folder)
    kept = [i for k, i in files.tensors.items() if bv.classify(k) == "und"]
    return files.files[0], sorted((i.start, i.end) for i in kept)


def _plain_read(path: Path, ranges: list[tuple[int, int]], buffer: memoryview, reuse: bool) -> None:
    """``readinto`` each range: one after another into ``buffer``, or each at its start."""
    at = 0
    with open(path, "rb", buffering=0) as handle:
        for begin, end in ranges:
            handle.seek(begin)
            view, done = buffer[at : at + end - begin], 0
            while done < len(view):
                done += handle.readinto(view[done:])
            at = 0 if reuse else at + end - begin


def child(mode: str, folder: Path, out: Path | None) -> dict[str, Any]:
    """One measurement, in this (fresh) process."""
    import safetensors.torch
    import torch

    import bagelverify as bv
    from bagelverify.safetensors_io import byte_view

    with torch.no_grad():  # torch's one-time kernel set-up is not part of any flow
        torch.zeros(4096, dtype=torch.bfloat16).copy_(torch.ones(4096, dtype=torch.bfloat16))
    baseline = _reset_peak()
    if mode in SAVES:
        state = bv.load_bagel_checkpoint_state_dict(folder, stage=1)
        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        hf = {k.removeprefix("model."): v for k, v in state.items()}
        assert out is not None
        start = time.perf_counter()
        if mode == "save":
            bv.save_bagel_checkpoint(state, out, stage=1)
        else:
            target = out / "ema.safetensors"
            safetensors.torch.save_file(hf, target, metadata={"format": "pt"})
            if mode == "save_file_fsync":
                fd = os.open(target, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "bytes": nbytes, "peak": None}

    if mode in ("naive", "load_into"):
        params, und = _stage1_parameters(folder)
    else:
        params, und = {}, bv.inspect_checkpoint(folder, stage=1).stage1_bytes
    if mode.startswith("plain_read"):
        # the same bytes into zero-filled memory: one buffer of the UND size (distinct resident
        # memory, as the parameters are), or one reused buffer of the largest tensor's size
        path, ranges = _und_ranges(folder)
        size = max(e - b for b, e in ranges) if mode == "plain_read_reused" else und
        buffer = torch.zeros(size, dtype=torch.uint8)
    start = time.perf_counter()
    if mode == "naive":
        everything = safetensors.torch.load_file(folder / "ema.safetensors")
        kept = bv.BagelStateDictAdapter().from_hf(everything, stage=1)
        with torch.no_grad():
            for key, tensor in kept.items():
                params[key].copy_(tensor)
    elif mode == "load_into":
        bv.load_into(params, folder, stage=1)
    elif mode == "dict":
        params = bv.load_bagel_checkpoint_state_dict(folder, stage=1)
    elif mode.startswith("plain_read"):
        _plain_read(path, ranges, byte_view(buffer), reuse=mode == "plain_read_reused")
    else:
        raise SystemExit(f"unknown mode {mode}")
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "bytes": und, "peak": _peak_above(baseline)}


def run_child(mode: str, folder: Path, out: Path | None = None) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", mode, "--dir", str(folder)]
    if out is not None:
        command += ["--out", str(out)]
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def _evict(path: Path) -> None:
    """Drop the file's pages from the page cache (they are clean, so nothing is lost)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _warm(path: Path) -> None:
    with open(path, "rb", buffering=0) as handle:
        while handle.read(64 << 20):
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=3.0, help="synthetic scale (3: 3.2 GB)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per measurement (median)")
    parser.add_argument("--dir", type=Path, help="existing or new folder for the checkpoint")
    parser.add_argument(
        "--cold",
        action="store_true",
        help="evict the file from the page cache before every load (loads only, no saves)",
    )
    parser.add_argument("--child", choices=LOADS + SAVES, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.dir, args.out)))
        return

    import bagelverify as bv

    with tempfile.TemporaryDirectory(prefix="bench_io.") as scratch:
        folder = args.dir or Path(scratch) / "ckpt"
        if not (folder / "ema.safetensors").exists():
            start = time.perf_counter()
            made = bv.make_synthetic_checkpoint(folder, scale=args.scale, with_vae=False)
            print(
                f"built {made.model_bytes / 1e9:.2f} GB synthetic checkpoint (scale {args.scale}) "
                f"in {time.perf_counter() - start:.1f} s",
                flush=True,
            )
        model_file = folder / "ema.safetensors"
        modes = LOADS if args.cold else LOADS + SAVES
        if not args.cold:
            _warm(model_file)
        runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
        for round_ in range(args.repeat):  # interleaved, so background load hits every mode
            for mode in modes:
                os.sync()  # no writeback of an earlier save may overlap this measurement
                if args.cold:
                    _evict(model_file)
                out = None
                if mode in SAVES:
                    out = Path(tempfile.mkdtemp(dir=scratch, prefix=f"{mode}."))
                runs[mode].append(run_child(mode, folder, out))
                if out is not None:
                    shutil.rmtree(out)
            print(f"  round {round_ + 1}/{args.repeat} done", flush=True)
        results: dict[str, dict[str, float]] = {}
        for mode, done in runs.items():
            seconds = statistics.median(r["seconds"] for r in done)
            peaks = [r["peak"] for r in done if r["peak"] is not None]
            results[mode] = {
                "seconds": seconds,
                "gbps": done[0]["bytes"] / seconds / 1e9,
                "bytes": done[0]["bytes"],
                "peak": statistics.median(peaks) if peaks else float("nan"),
            }

    und = results["load_into"]["bytes"]
    limit = results["plain_read"]["gbps"]
    cache = "cold (evicted before each load)" if args.cold else "warm"
    print(f"\nstage 1, UND bytes {und / 1e9:.3f} GB, {cache} page cache, median of {args.repeat}\n")
    print("| load | wall s | GB/s | / plain_read | peak RSS GB | peak / UND |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for mode in LOADS:
        r = results[mode]
        print(
            f"| {mode} | {r['seconds']:.3f} | {r['gbps']:.2f} | {r['gbps'] / limit:.2f}x | "
            f"{r['peak'] / 1e9:.3f} | {r['peak'] / und:.2f}x |"
        )
    ok_peak = results["load_into"]["peak"] / und <= 1.15
    ok_read = results["load_into"]["gbps"] / limit >= 0.8
    verdict = {True: "met", False: "MISSED"}
    targets = (
        f"load_into peak <= 1.15x UND: {verdict[ok_peak]}; "
        f"load_into >= 0.8x plain read: {verdict[ok_read]}"
    )
    if args.cold:
        print(f"\ntargets: {targets}")
        return
    reference = results["save_file"]["gbps"]
    print("\n| save (stage-1 tensors) | wall s | GB/s | / save_file |")
    print("| --- | ---: | ---: | ---: |")
    for mode in SAVES:
        r = results[mode]
        print(f"| {mode} | {r['seconds']:.3f} | {r['gbps']:.2f} | {r['gbps'] / reference:.2f}x |")
    ok_save = results["save"]["gbps"] / reference >= 0.8
    print(f"\ntargets: {targets}; save >= 0.8x save_file: {verdict[ok_save]}")


if __name__ == "__main__":
    main()
