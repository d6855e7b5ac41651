"""Throughput and memory of ``export_checkpoint`` against a plain copy of the same files.

Writes a synthetic stage-2 Automodel training step folder with 2 gloo ranks, as FSDP2 leaves it:
``model/`` is a DCP checkpoint of F32 master weights (each rank's ``Shard(0)`` rows of every
tensor, HF keys as Automodel's adapter names them), ``ema/`` a DCP checkpoint of an EMA that holds
the trainable GEN tensors of a ``freeze_und`` run (``model.``-rooted ``named_parameters`` names).
Scale 5 by default: 2.27 GB of model weights, 1.02 GB of EMA.

Then, each in a fresh subprocess, on a warm page cache:

- ``copy``: ``shutil.copyfile`` of every data file of ``model/`` and ``ema/`` (the bytes an
  export reads from, and more: the GEN rows of the model too);
- ``copy+fsync``: the same, each file fsync'ed (an export publishes durable files);
- ``export keep``: :func:`bagelverify.export_checkpoint` with ``dtype="keep"`` (F32 out);
- ``export bf16``: the default, F32 master weights rounded to BF16.

Each flow runs ``--rounds`` times (2), after an ``os.sync()``; the fastest run is kept.
Throughput is bytes read per second (a copy reads each byte once; an export reads each tensor
it writes once). Memory is the peak of ``RssAnon`` above its value before the flow (sampled
every 5 ms; see ``bench_dcp_convert.py``), against twice the largest tensor.

Run: ``python benchmarks/bench_export.py`` (``--scale``, ``--dir``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_dcp_convert import anon_growth

REPO = Path(__file__).resolve().parent.parent


def write_rank(rank: int, world_size: int, step: str, scale: float) -> int:
    """This rank's ``Shard(0)`` rows of every stage-2 tensor (F32, seeded by key) saved by DCP
    as ``model/``, then the GEN tensors' rows (the EMA of a freeze_und run) as ``ema/``."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    import bagelverify as bv
    from bagelverify.families import expected_shapes
    from bagelverify.synthetic import scaled_config

    mesh = init_device_mesh("cpu", (world_size,))
    shapes = expected_shapes(scaled_config(scale))

    def rows(key: str, shape: tuple[int, ...], seed: int) -> DTensor:
        per = -(-shape[0] // world_size)
        first, count = min(rank * per, shape[0]), max(0, min(per, shape[0] - rank * per))
        local = torch.empty((count, *shape[1:]), dtype=torch.float32)
        local.normal_(generator=torch.Generator().manual_seed(seed * 7919 + first))
        stride = tuple(math.prod(shape[d + 1 :]) for d in range(len(shape)))
        return DTensor.from_local(
            local, mesh, [Shard(0)], run_check=False, shape=torch.Size(shape), stride=stride
        )

    model = {key: rows(key, shape, i) for i, (key, shape) in enumerate(shapes.items())}
    dcp.save(model, checkpoint_id=Path(step) / "model")
    del model
    ema = {
        "model." + key: rows(key, shape, 10_000 + i)
        for i, (key, shape) in enumerate(shapes.items())
        if bv.classify(key) is bv.Bucket.GEN
    }
    dcp.save(ema, checkpoint_id=Path(step) / "ema")
    return len(ema)


def measure(flow: str, step: Path, target: Path, scale: float) -> dict[str, float]:
    """Run one flow in this process; bytes read, seconds, peak RssAnon growth."""
    import bagelverify as bv
    import bagelverify.export  # its imports (torch.distributed) before the baseline
    from bagelverify.synthetic import scaled_config

    config = scaled_config(scale)
    with anon_growth() as anon:
        start = time.perf_counter()
        if flow.startswith("copy"):
            nbytes = 0
            for folder in ("model", "ema"):
                (target / folder).mkdir(parents=True)
                for source in sorted((step / folder).iterdir()):
                    shutil.copyfile(source, target / folder / source.name)
                    nbytes += source.stat().st_size
                    if flow == "copy+fsync":
                        fd = os.open(target / folder / source.name, os.O_RDONLY)
                        os.fsync(fd)
                        os.close(fd)
        else:
            dtype = "keep" if flow == "export keep" else "bf16"
            report = bv.export_checkpoint(step, target, dtype=dtype, config=config)
            nbytes = report.bytes_before
        seconds = time.perf_counter() - start
    return {"bytes": nbytes, "seconds": seconds, "anon": anon[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=5.0, help="width divisor (1: 58 GB F32)")
    parser.add_argument("--dir", help="reuse or create the step folder here")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each flow (best kept)")
    parser.add_argument("--flow", help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.flow:
        print(json.dumps(measure(args.flow, Path(args.dir), Path(args.target), args.scale)))
        return 0

    from bagelverify.families import expected_shapes
    from bagelverify.synthetic import scaled_config

    sys.path.insert(0, str(REPO / "tests"))
    from _multiprocess import run_ranks

    work = Path(tempfile.mkdtemp(prefix="bagelverify-export-bench-"))
    step = Path(args.dir) if args.dir else work / "epoch_0_step_100"
    try:
        if not (step / "ema" / ".metadata").is_file():
            run_ranks(write_rank, str(step), args.scale, timeout=1800.0)
        shapes = expected_shapes(scaled_config(args.scale))
        largest = 4 * max(math.prod(shape) for shape in shapes.values())
        size = sum(p.stat().st_size for p in step.rglob("*") if p.is_file())
        rows: dict[str, dict[str, Any]] = {}
        for _ in range(args.rounds):
            for flow in ("copy", "copy+fsync", "export keep", "export bf16"):
                target = work / flow.replace(" ", "_").replace("+", "_")
                command = [sys.executable, __file__, "--flow", flow, "--dir", str(step)]
                command += ["--target", str(target), "--scale", str(args.scale)]
                os.sync()  # each flow starts with no dirty pages of the one before
                done = subprocess.run(command, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    sys.stderr.write(done.stdout + done.stderr)
                    return done.returncode
                row = json.loads(done.stdout.strip().splitlines()[-1])
                if flow not in rows or row["seconds"] < rows[flow]["seconds"]:
                    rows[flow] = row
                shutil.rmtree(target)
        print(f"step folder (2 ranks, DCP): {size / 1e9:.2f} GB", end="; ")
        print(f"largest tensor {largest / 1e6:.1f} MB (F32)")
        copy = rows["copy"]["bytes"] / rows["copy"]["seconds"]
        synced = rows["copy+fsync"]["bytes"] / rows["copy+fsync"]["seconds"]
        print(
            f"{'flow':>12} {'GB read':>8} {'seconds':>8} {'GB/s':>6} {'x copy':>7} "
            f"{'x copy+fsync':>13} {'peak RssAnon MB':>16} {'x 2*largest':>12}"
        )
        for flow, row in rows.items():
            rate = row["bytes"] / row["seconds"]
            print(
                f"{flow:>12} {row['bytes'] / 1e9:>8.2f} {row['seconds']:>8.2f} {rate / 1e9:>6.2f} "
                f"{rate / copy:>7.2f} {rate / synced:>13.2f} {row['anon'] / 1e6:>16.1f} "
                f"{row['anon'] / (2 * largest):>12.2f}"
            )
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
