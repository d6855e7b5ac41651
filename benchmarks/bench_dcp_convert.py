"""Memory and time of HF <-> DCP conversion: the library's converters against load-then-save.

Builds a synthetic BAGEL-shaped checkpoint (scale 4 by default: ~1.8 GB model file) and a DCP
copy of it, then runs each flow in a fresh subprocess and prints one side-by-side table:

- ``load+dcp.save``: :func:`bagelverify.load_bagel_checkpoint_state_dict`, then
  ``torch.distributed.checkpoint.save`` of the loaded tensors;
- ``hf_to_dcp``: :func:`bagelverify.hf_to_dcp` (same validation, tensors streamed from a
  copy-on-write map of the source);
- ``dcp.load+save``: ``torch.distributed.checkpoint.load`` of every tensor, then
  :func:`bagelverify.save_bagel_checkpoint`;
- ``dcp_to_hf``: :func:`bagelverify.dcp_to_hf` (one tensor loaded, written and released at a
  time).

Memory is the peak of ``RssAnon`` (``/proc/self/status``: process memory that is not page
cache) above its value before the conversion, sampled every 5 ms by a thread; ``VmHWM`` growth
(which also counts mapped page-cache pages, reclaimable) is shown next to it. Linux only.

Run: ``python benchmarks/bench_dcp_convert.py`` (``--scale``, ``--stage``, ``--dir``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path


def _status(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


@contextlib.contextmanager
def anon_growth() -> Iterator[list[int]]:
    """Sample ``RssAnon`` every 5 ms while the block runs; the list's one item is then its peak
    growth above the value before the block."""
    anon0 = _status("RssAnon")
    peak = [anon0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _status("RssAnon"))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    growth = [0]
    try:
        yield growth
    finally:
        stop.set()
        sampler.join()
        growth[0] = max(peak[0], _status("RssAnon")) - anon0


def measure(flow: str, source: str, target: str, stage: str) -> dict[str, float]:
    """Run one flow in this process; return peak RssAnon / VmHWM growth and seconds."""
    import warnings

    # imported before the baseline: their memory is not the flow's
    import torch
    import torch.distributed.checkpoint  # noqa: F401

    import bagelverify  # noqa: F401

    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    hwm0 = _status("VmHWM")
    with anon_growth() as anon:
        start = time.perf_counter()
        _run_flow(flow, source, target, stage)
        seconds = time.perf_counter() - start
    return {"anon": anon[0], "hwm": _status("VmHWM") - hwm0, "seconds": seconds}


def _run_flow(flow: str, source: str, target: str, stage: str) -> None:
    import torch
    import torch.distributed.checkpoint as dcp

    import bagelverify as bv

    if flow == "load+dcp.save":
        state = bv.load_bagel_checkpoint_state_dict(source, stage=stage)
        dcp.save(state, checkpoint_id=target, no_dist=True)
        del state
    elif flow == "hf_to_dcp":
        bv.hf_to_dcp(source, target, stage=stage)
    elif flow == "dcp.load+save":
        metadata = dcp.FileSystemReader(source).read_metadata().state_dict_metadata
        state = {
            key: torch.empty(entry.size, dtype=entry.properties.dtype)
            for key, entry in metadata.items()
        }
        dcp.load(state, checkpoint_id=source, no_dist=True)
        bv.save_bagel_checkpoint(state, target, stage=stage)
        del state
    else:
        bv.dcp_to_hf(source, target, stage=stage)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=4.0, help="width divisor (1 = 29 GB)")
    parser.add_argument("--stage", default="stage2")
    parser.add_argument("--dir", help="reuse or create the synthetic checkpoint here")
    parser.add_argument("--flow", help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.flow:
        print(json.dumps(measure(args.flow, args.dir, args.target, args.stage)))
        return 0

    from bagelverify import hf_to_dcp, inspect_checkpoint, make_synthetic_checkpoint

    work = Path(tempfile.mkdtemp(prefix="bagelverify-dcp-bench-"))
    source = Path(args.dir) if args.dir else work / "checkpoint"
    try:
        if not (source / "ema.safetensors").is_file():
            make_synthetic_checkpoint(source, scale=args.scale, seed=0, with_vae=False)
        report = inspect_checkpoint(source, stage=args.stage)
        kept = sum(info.nbytes for info in report.retained.values())
        dcp_source = work / "dcp"
        hf_to_dcp(source, dcp_source, stage=args.stage)
        rows = {}
        for flow in ("load+dcp.save", "hf_to_dcp", "dcp.load+save", "dcp_to_hf"):
            target = work / flow.replace("+", "_")
            origin = dcp_source if flow.startswith("dcp") else source
            command = [sys.executable, __file__, "--flow", flow, "--dir", str(origin)]
            command += ["--target", str(target), "--stage", args.stage]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                sys.stderr.write(done.stdout + done.stderr)
                return done.returncode
            rows[flow] = json.loads(done.stdout.strip().splitlines()[-1])
            shutil.rmtree(target)
        print(f"{args.stage}: kept tensors {kept / 1e6:.1f} MB")
        print(f"{'flow':>14} {'peak RssAnon MB':>16} {'x kept':>7} {'VmHWM MB':>9} {'seconds':>8}")
        for flow, row in rows.items():
            print(
                f"{flow:>14} {row['anon'] / 1e6:>16.1f} {row['anon'] / kept:>7.2f} "
                f"{row['hwm'] / 1e6:>9.1f} {row['seconds']:>8.2f}"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
