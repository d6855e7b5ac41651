"""``bagelverify compose`` benchmark: throughput against a plain copy, peak memory.

Writes synthetic Qwen2 + SigLIP Hugging Face folders of a scaled BAGEL config
(:func:`bagelverify.synthetic.make_synthetic_backbones`, BF16; the default scale 2.5 gives
about 2.6 GB of backbones), warms the page cache, then in a fresh subprocess per method:

- ``compose``: :func:`bagelverify.compose_checkpoint` (what ``bagelverify compose`` runs):
  every backbone tensor read by the read engine, the twins read again, the rest generated, one
  ``ema.safetensors`` written, fsync'ed and published;
- ``copy``: a plain copy of the bytes compose wrote: its ``ema.safetensors`` read in 64 MiB
  chunks and written to a new file, fsync'ed (no checks, no conversion).

Each method runs ``--rounds`` times (default 3), alternating, so that a disk busy with other
work slows both alike; the table shows each one's fastest run (every run's seconds are listed
below it): seconds, GB/s of bytes written, compose's throughput as a fraction of the copy's
(the target is >= 0.8), and peak memory (``VmHWM`` reset after the imports, minus the RSS then)
against the largest tensor written (the target is <= 2x). Linux only.

Run: ``python benchmarks/bench_compose.py`` (``--scale``, ``--dir`` to keep the folders).
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
from typing import Any

from bench_io import _peak_above, _reset_peak, _warm

CHUNK = 64 << 20


def child(mode: str, work: Path, scale: float) -> dict[str, Any]:
    """Run one method in this (fresh) process; return its time, bytes written and peak."""
    import bagelverify as bv
    from bagelverify.synthetic import scaled_config

    config = scaled_config(scale)
    out = work / f"out-{mode}"
    shutil.rmtree(out, ignore_errors=True)
    baseline = _reset_peak()
    start = time.perf_counter()
    if mode == "compose":
        bv.compose_checkpoint(llm=work / "llm", vit=work / "vit", out=out, config=config)
        written = (out / "ema.safetensors").stat().st_size
    else:
        out.mkdir()
        buffer = bytearray(CHUNK)
        view = memoryview(buffer)
        written = 0
        with (
            open(work / "out-compose" / "ema.safetensors", "rb", buffering=0) as source,
            open(out / "ema.safetensors", "wb", buffering=0) as target,
        ):
            while count := source.readinto(buffer):
                target.write(view[:count])
                written += count
            os.fsync(target.fileno())
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "bytes": written, "peak": _peak_above(baseline)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=2.5)
    parser.add_argument("--dir", type=Path, help="work here and keep the folders")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each method (best shown)")
    parser.add_argument(
        "--child", nargs=3, metavar=("MODE", "DIR", "SCALE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        mode, work, scale = args.child
        print(json.dumps(child(mode, Path(work), float(scale))))
        return
    from bagelverify.safetensors_io import read_header
    from bagelverify.synthetic import make_synthetic_backbones, scaled_config

    work = args.dir or Path(tempfile.mkdtemp(prefix="bench-compose-"))
    try:
        work.mkdir(parents=True, exist_ok=True)
        for name in ("out-compose", "out-copy"):
            shutil.rmtree(work / name, ignore_errors=True)
        if not (work / "llm" / "model.safetensors").is_file():
            make_synthetic_backbones(work, scaled_config(args.scale))
        backbone_bytes = 0
        for backbone in ("llm", "vit"):
            _warm(work / backbone / "model.safetensors")
            backbone_bytes += (work / backbone / "model.safetensors").stat().st_size
        runs: dict[str, list[dict[str, Any]]] = {"compose": [], "copy": []}
        for _ in range(args.rounds):  # alternating, so a busy disk slows both alike
            for mode, found in runs.items():
                command = [sys.executable, __file__, "--child", mode, str(work), str(args.scale)]
                done = subprocess.run(command, check=True, capture_output=True, text=True)
                found.append(json.loads(done.stdout))
        results = {mode: min(found, key=lambda r: r["seconds"]) for mode, found in runs.items()}
        infos = read_header(work / "out-compose" / "ema.safetensors").tensors.values()
        largest = max(info.nbytes for info in infos)
        print(
            f"backbones {backbone_bytes / 1e9:.2f} GB (scale {args.scale:g}, BF16); composed "
            f"{len(infos):,} tensors, {results['compose']['bytes'] / 1e9:.2f} GB; largest tensor "
            f"{largest / 1e6:.1f} MB"
        )
        print(
            f"{'method':<8} {'seconds':>8} {'GB/s':>6} {'vs copy':>8} {'peak MB':>8} "
            f"{'peak/largest':>13}"
        )
        copy_rate = results["copy"]["bytes"] / results["copy"]["seconds"]
        for mode, result in results.items():
            rate = result["bytes"] / result["seconds"]
            print(
                f"{mode:<8} {result['seconds']:8.2f} {rate / 1e9:6.2f} {rate / copy_rate:8.2f} "
                f"{result['peak'] / 1e6:8.1f} {result['peak'] / largest:13.2f}"
            )
        for mode, found in runs.items():
            seconds = ", ".join(f"{run['seconds']:.2f}" for run in found)
            print(f"{mode} seconds, each round: {seconds}")
        print("targets: compose >= 0.80 of the copy's throughput; peak <= 2.00 x largest tensor")
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
