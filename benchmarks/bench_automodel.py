"""NeMo Automodel's ``Checkpointer.load_model`` with its own adapter, after ``install()``, and
``bagelverify.load_into``, side by side into the same Automodel BAGEL model.

Builds a synthetic BAGEL folder of filler bytes (``--scale 1``: the real 1,223 keys and shapes,
29.2 GB; see ``bench_gpu.build``), then, for every stage (1, 2), parameter dtype (BF16, the file's;
F32, master weights) and cache state (warm; cold: page cache dropped by the child), runs each
method in its own fresh process and prints one table:

- ``automodel``: Automodel 0.7.0 as released, its own BAGEL adapter and DCP storage reader;
- ``install``: the same call after :func:`bagelverify.integrations.automodel.install` (the
  checkpointer's reads go through bagelverify's engine; the bytes the engine read are counted);
- ``load_into``: :func:`bagelverify.load_into` ``(model.state_dict(), folder)``, the engine alone.

The model is ``BagelForUnifiedMultimodal`` built on the meta device, given memory on
``--device`` (``cuda`` or ``cpu``) in the chosen dtype and zero-filled before the clock starts.
Columns: GB/s over the loaded bytes (in the file's dtype), host memory above the model (peak RSS
counter after a reset, minus the RSS just before the load), and a digest of every parameter,
which must agree between the methods of a row. ``--ranks 2`` adds Automodel's checkpointer under
FSDP2 (``fully_shard``: ``Shard(0)`` DTensor parameters) on 2 ranks over gloo (``torchrun``,
both ranks on the one GPU when ``--device cuda``): per-rank bytes read against the rank's share,
and the shards checked against the file's rows. Linux only.

Run: ``python benchmarks/bench_automodel.py --device cuda --scale 1 --dir /tmp/bagel`` (CPU:
``--device cpu``, default scale 3.5; ``--stages``, ``--dtypes``, ``--no-cold``, ``--repeat``,
``--ranks``, ``--json OUT``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_distributed import _check_rows
from bench_gpu import _digest, build, drop_cache, warm_cache
from bench_io import _peak_above, _reset_peak

MODES = ("automodel", "install", "load_into")
DTYPES = {"bf16": "bfloat16", "f32": "float32"}


def _model(folder: Path, stage: int, dtype: str, device: str, mesh: Any = None) -> Any:
    """Automodel's BAGEL model for ``folder``'s config, in ``dtype`` on ``device``, zeroed
    (sharded by ``fully_shard`` over ``mesh`` when given)."""
    import torch
    from nemo_automodel.components.models.bagel.model import BagelForUnifiedMultimodal

    import bagelverify as bv
    from bagelverify.integrations import automodel

    config = bv.BagelConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = BagelForUnifiedMultimodal(automodel.automodel_config(config, stage=stage))
    model = model.to(getattr(torch, DTYPES[dtype]))
    if mesh is not None:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, mesh=mesh)
    model.to_empty(device=device)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            (tensor.to_local() if hasattr(tensor, "to_local") else tensor).zero_()
    return model


def _checkpointer(folder: Path, rank: int = 0) -> Any:
    from nemo_automodel.components.checkpoint import checkpointing as ck

    return ck.Checkpointer(
        ck.CheckpointingConfig(checkpoint_dir=str(folder / "unused"), save_consolidated=False),
        dp_rank=rank,
        tp_rank=0,
        pp_rank=0,
    )


def _engine_counter() -> list[int]:
    """Count the bytes bagelverify's DCP reader hands to the engine from now on."""
    from bagelverify.distributed import reader

    counted: list[int] = []
    original = reader.run_engine

    def counting(transfers: Any, **kwargs: Any) -> Any:
        counted.extend(t.nbytes for t in transfers)
        return original(transfers, **kwargs)

    reader.run_engine = counting  # type: ignore[assignment]
    return counted


def child(
    mode: str, folder: Path, stage: int, dtype: str, device: str, cold: bool
) -> dict[str, Any]:
    import torch

    import bagelverify as bv
    from bagelverify.integrations import automodel

    if mode == "install":
        automodel.install()
    notes = _capture_log_lines(("load_model:", "through bagelverify's read engine"))
    model = _model(folder, stage, dtype, device)
    counted = _engine_counter()
    if cold:
        drop_cache(folder / "ema.safetensors")
    if device == "cuda":
        torch.cuda.synchronize()
    loaded = sum(t.numel() * 2 for t in model.state_dict().values())  # bytes in the file (BF16)
    baseline = _reset_peak()
    start = time.perf_counter()
    if mode == "load_into":
        bv.load_into(model.state_dict(), folder, stage=stage)
    else:
        _checkpointer(folder).load_model(model, str(folder), is_init_step=True)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "gbps": loaded / seconds / 1e9,
        "host_above": _peak_above(baseline),
        "bytes": loaded,
        "engine_bytes": sum(counted),
        "digest": _digest(model.state_dict()),
        "notes": notes,
    }


def _capture_log_lines(markers: tuple[str, ...]) -> list[str]:
    """Keep the log records (Automodel's time breakdown, bagelverify's routing line) whose text
    contains one of ``markers``."""
    import logging

    kept: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            text = record.getMessage()
            if any(marker in text for marker in markers):
                kept.append(text)

    root = logging.getLogger()
    root.setLevel(logging.INFO)
    root.addHandler(Keep())
    return kept


def rank_worker(folder: Path, stage: int, device: str, cold: bool) -> None:
    """One torchrun rank: install(), FSDP2 model, Checkpointer.load_model; rank 0 prints rows."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import bagelverify as bv
    from bagelverify.integrations import automodel

    automodel.install()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group("gloo")
    model = _model(folder, stage, "bf16", device, init_device_mesh(device, (world,)))
    counted = _engine_counter()
    if rank == 0 and cold:
        drop_cache(folder / "ema.safetensors")
    dist.barrier()
    baseline = _reset_peak()
    start = time.perf_counter()
    _checkpointer(folder, rank).load_model(model, str(folder), is_init_step=True)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    state = model.state_dict()
    report = bv.inspect_checkpoint(folder, stage=stage)
    row = {
        "rank": rank,
        "seconds": seconds,
        "read": sum(counted),
        "share": sum(v.to_local().numel() * 2 for v in state.values()),
        "host_above": _peak_above(baseline),
        "bad_shards": _check_rows(dict(state), report, rank, world),
    }
    rows: list[Any] = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        print("ROWS " + json.dumps(rows), flush=True)
    dist.destroy_process_group()


def _run(arguments: list[str]) -> str:
    done = subprocess.run(arguments, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(arguments)} failed:\n{done.stderr[-4000:]}")
    return done.stdout


def run_child(
    mode: str, args: argparse.Namespace, stage: int, dtype: str, cold: bool
) -> dict[str, Any]:
    flags = ["--child", mode, "--stage", str(stage), "--dtype", dtype, "--device", args.device]
    command = [sys.executable, __file__, *flags, "--dir", str(args.dir)] + (
        ["--cold"] if cold else []
    )
    return dict(json.loads(_run(command).strip().splitlines()[-1]))


def run_ranks(args: argparse.Namespace, stage: int, cold: bool) -> list[dict[str, Any]]:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.ranks}"]
    command += [__file__, "--rank-worker", "--stage", str(stage), "--device", args.device]
    command += ["--dir", str(args.dir)] + (["--cold"] if cold else [])
    line = next(x for x in _run(command).splitlines() if x.startswith("ROWS "))
    return list(json.loads(line[5:]))


def _cell(runs: list[dict[str, Any]]) -> str:
    rates = sorted(r["gbps"] for r in runs)
    spread = f" ({rates[0]:.1f}-{rates[-1]:.1f})" if len(rates) > 1 else ""
    return f"{statistics.median(rates):.2f}{spread}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--scale", type=float, help="synthetic scale (1: full size; cpu: 3.5)")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/bench_automodel"))
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2], choices=(1, 2))
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "f32"], choices=tuple(DTYPES))
    parser.add_argument("--cold", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--cold-dtypes", nargs="+", default=["bf16"], choices=tuple(DTYPES))
    parser.add_argument("--repeat", type=int, default=1, help="warm runs per cell")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--ranks", type=int, default=0, help="also FSDP2 over N ranks (stage 1)")
    parser.add_argument("--json", type=Path, help="write every run here (JSON lines)")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--rank-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="bf16", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = child(args.child, args.dir, args.stage, args.dtype, args.device, args.cold)
        print(json.dumps(result))
        return
    if args.rank_worker:
        rank_worker(args.dir, args.stage, args.device, args.cold)
        return

    scale = args.scale or (1.0 if args.device == "cuda" else 3.5)
    started = time.perf_counter()
    build(args.dir, scale)
    print(f"built scale {scale} in {time.perf_counter() - started:.0f} s", flush=True)
    log = args.json.open("a") if args.json else None
    cells: dict[tuple[int, str, str], dict[str, list[dict[str, Any]]]] = {}
    plan = [("warm", stage, dtype) for stage in args.stages for dtype in args.dtypes]
    if args.cold:
        plan += [("cold", stage, dtype) for stage in args.stages for dtype in args.cold_dtypes]
    for cache, stage, dtype in plan:
        if cache == "warm":
            warm_cache(args.dir / "ema.safetensors")
        runs = cells.setdefault((stage, dtype, cache), {mode: [] for mode in args.modes})
        for _ in range(args.repeat if cache == "warm" else 1):
            for mode in args.modes:  # interleaved, so background load hits every mode
                run = run_child(mode, args, stage, dtype, cache == "cold")
                runs[mode].append(run)
                record = {"stage": stage, "dtype": dtype, "cache": cache, "mode": mode, **run}
                print(json.dumps(record), flush=True)
                if log:
                    print(json.dumps(record), file=log, flush=True)
    device = args.device
    if device == "cuda":
        import torch

        device = torch.cuda.get_device_name()
    print(f"\n{device}, scale {scale}: GB/s over the loaded bytes (median, range over runs)\n")
    print(
        "| stage | params | cache | Automodel | + install() | load_into | install / load_into "
        "| host above model GB (Automodel / install / load_into) | engine read | digests |"
    )
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | --- | --- | --- |")
    worst = float("inf")
    worst_host = 0.0
    for (stage, dtype, cache), runs in cells.items():
        ratio = statistics.median(r["gbps"] for r in runs["install"]) / statistics.median(
            r["gbps"] for r in runs["load_into"]
        )
        worst = min(worst, ratio)
        hosts = [max((r["host_above"] for r in runs.get(m, [])), default=0) / 1e9 for m in MODES]
        worst_host = max(worst_host, hosts[1])
        engine = all(r["engine_bytes"] == r["bytes"] for r in runs["install"])
        digests = {r["digest"] for done in runs.values() for r in done}
        rates = " | ".join(_cell(runs[mode]) if runs.get(mode) else "-" for mode in MODES)
        print(
            f"| {stage} | {dtype} | {cache} | {rates} | {ratio:.2f}x | "
            + " / ".join(f"{h:.2f}" for h in hosts)
            + f" | {'all bytes' if engine else 'NOT ALL'} | "
            + ("equal" if len(digests) == 1 else f"DIFFER ({len(digests)})")
            + " |"
        )
    print(
        f"\ntargets: install >= 0.9x load_into: {'met' if worst >= 0.9 else 'MISSED'} "
        f"(worst {worst:.2f}x); host above model <= 1.2 GB: "
        f"{'met' if worst_host <= 1.2 else 'MISSED'} (worst {worst_host:.2f} GB)"
    )
    for cache in ("warm", "cold") if args.ranks else ():
        if cache == "warm":
            warm_cache(args.dir / "ema.safetensors")
        rows = run_ranks(args, 1, cache == "cold")
        if log:
            print(json.dumps({"ranks": rows, "cache": cache}), file=log, flush=True)
        print(f"\nFSDP2, {args.ranks} ranks, stage 1, {cache}:")
        for row in rows:
            print(
                f"  rank {row['rank']}: {row['seconds']:.2f} s, read {row['read'] / 1e9:.3f} GB "
                f"= {row['read'] / row['share']:.3f}x its share, host above model "
                f"{row['host_above'] / 1e9:.2f} GB, shards unlike the file's rows: "
                f"{row['bad_shards']}"
            )


if __name__ == "__main__":
    main()
