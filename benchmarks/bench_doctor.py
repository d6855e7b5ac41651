"""``repair`` and ``diff`` benchmark: wall time against a plain read of the same bytes, and peak
memory against the largest tensor, side by side in one run.

Builds synthetic BAGEL-shaped checkpoints (default scale 3: a 3.19 GB ``ema.safetensors``, the
real 1,223 keys) in a temporary folder: ``A``; ``A2``, a byte copy of ``A``; ``B``, another seed
(every value differs); ``SRC``, ``A`` without its vision tower (``vit_model.*``). Then, each in a
fresh subprocess with the page cache warm:

- ``diff A A2`` (identical: bitwise piece comparison) and ``diff A B`` (every tensor differs:
  value comparison), each against ``plain read`` of both files' bytes (``readinto`` tensor by
  tensor into one reused buffer of the largest tensor);
- ``repair SRC --base A`` against ``plain read`` of the bytes it reads, and against
  ``plain copy`` (the same reads, written to one file and fsync'ed: the write repair must do).

Peak memory is the kernel's peak-RSS counter (``VmHWM``) reset after the imports, minus the RSS
then (the helpers of ``bench_io.py``). Linux only.

Run: ``python benchmarks/bench_doctor.py`` (``--scale``, ``--dir`` to reuse the folders).
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


def _ranges(files: list[Path], keep: str | None = None) -> list[tuple[Path, int, int]]:
    from bagelverify.safetensors_io import read_header

    out = []
    for file in files:
        for key, info in read_header(file).tensors.items():
            if keep is None or key.startswith(keep):
                out.append((file, info.start, info.end))
    return out


def _plain(ranges: list[tuple[Path, int, int]], sink: Path | None) -> None:
    largest = max(end - begin for _, begin, end in ranges)
    buffer = memoryview(bytearray(largest))
    out = open(sink, "wb") if sink is not None else None  # noqa: SIM115
    handles: dict[Path, Any] = {}
    try:
        for path, begin, end in ranges:
            handle = handles.get(path) or handles.setdefault(path, open(path, "rb", buffering=0))  # noqa: SIM115
            handle.seek(begin)
            view, done = buffer[: end - begin], 0
            while done < len(view):
                done += handle.readinto(view[done:])
            if out is not None:
                out.write(view)
        if out is not None:
            out.flush()
            os.fsync(out.fileno())
    finally:
        for handle in handles.values():
            handle.close()
        if out is not None:
            out.close()


def child(mode: str, work: Path) -> dict[str, Any]:
    """One measurement in this fresh process."""
    from bagelverify.diff import diff_checkpoints
    from bagelverify.repair import repair_checkpoint

    a, a2, b, src = (work / n / "ema.safetensors" for n in ("A", "A2", "B", "SRC"))
    base_ranges = [r for r in _ranges([a], "vit_model.")]
    jobs = {
        "diff_same": lambda: diff_checkpoints(work / "A", work / "A2"),
        "read_same": lambda: _plain(_ranges([a, a2]), None),
        "diff_other": lambda: diff_checkpoints(work / "A", work / "B"),
        "read_other": lambda: _plain(_ranges([a, b]), None),
        "repair": lambda: repair_checkpoint(work / "SRC", base=work / "A", out=work / "OUT"),
        "read_repair": lambda: _plain(_ranges([src]) + base_ranges, None),
        "copy_repair": lambda: _plain(_ranges([src]) + base_ranges, work / "copy.bin"),
    }
    baseline = _reset_peak()
    start = time.perf_counter()
    jobs[mode]()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak": _peak_above(baseline)}


def _build(work: Path, scale: float) -> None:
    from safetensors import safe_open

    from bagelverify.safetensors_io import TensorSpec, read_header, write_safetensors
    from bagelverify.synthetic import make_synthetic_checkpoint

    for name, seed in (("A", 0), ("B", 1)):
        if not (work / name / "ema.safetensors").is_file():
            make_synthetic_checkpoint(work / name, scale=scale, seed=seed, with_vae=False)
    if not (work / "A2" / "ema.safetensors").is_file():
        shutil.copytree(work / "A", work / "A2")
    if not (work / "SRC" / "ema.safetensors").is_file():
        (work / "SRC").mkdir(exist_ok=True)
        header = read_header(work / "A" / "ema.safetensors").tensors
        specs = [
            TensorSpec(k, i.dtype, i.shape) for k, i in header.items() if not k.startswith("vit_")
        ]
        with safe_open(work / "A" / "ema.safetensors", "pt") as handle:
            write_safetensors(work / "SRC" / "ema.safetensors", specs, handle.get_tensor)
        for config in ("config.json", "llm_config.json", "vit_config.json"):
            shutil.copy(work / "A" / config, work / "SRC" / config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=3)
    parser.add_argument("--dir", type=Path, help="reuse (or create) the checkpoints here")
    parser.add_argument("--repeat", type=int, default=3, help="rounds (the median is shown)")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], Path(args.child[1]))))
        return
    from bagelverify.safetensors_io import read_header

    work = args.dir or Path(tempfile.mkdtemp(prefix="bench-doctor-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        _build(work, args.scale)
        infos = read_header(work / "A" / "ema.safetensors").tensors.values()
        total, largest = sum(i.nbytes for i in infos), max(i.nbytes for i in infos)
        print(
            f"checkpoint {total / 1e9:.2f} GB in {len(infos)} tensors; largest tensor "
            f"{largest / 1e6:.1f} MB (scale {args.scale:g}); median of {args.repeat} rounds, warm"
        )
        modes = (
            "diff_same",
            "read_same",
            "diff_other",
            "read_other",
            "repair",
            "read_repair",
            "copy_repair",
        )
        times: dict[str, list[float]] = {m: [] for m in modes}
        peaks: dict[str, int] = dict.fromkeys(modes, 0)
        for _ in range(args.repeat):
            for mode in modes:
                shutil.rmtree(work / "OUT", ignore_errors=True)
                (work / "copy.bin").unlink(missing_ok=True)
                for name in ("A", "A2", "B", "SRC"):
                    _warm(work / name / "ema.safetensors")
                subprocess.run(["sync"], check=True)
                command = [sys.executable, __file__, "--child", mode, str(work)]
                done = subprocess.run(command, check=True, capture_output=True, text=True)
                result = json.loads(done.stdout.strip().splitlines()[-1])
                times[mode].append(result["seconds"])
                peaks[mode] = max(peaks[mode], result["peak"])
        median = {m: sorted(t)[len(t) // 2] for m, t in times.items()}
        pairs = (
            ("diff A A2 (identical)", "diff_same", "read_same"),
            ("diff A B (all differ)", "diff_other", "read_other"),
            ("repair SRC --base A", "repair", "read_repair"),
            ("repair SRC --base A vs copy", "repair", "copy_repair"),
        )
        print(
            f"{'operation':<28} {'s':>7} {'baseline s':>11} {'speed vs baseline':>18} "
            f"{'peak MB':>8} {'peak/largest':>13}"
        )
        for label, mode, base in pairs:
            print(
                f"{label:<28} {median[mode]:7.2f} {median[base]:11.2f} "
                f"{median[base] / median[mode]:17.2f}x {peaks[mode] / 1e6:8.1f} "
                f"{peaks[mode] / largest:13.2f}"
            )
        for base in ("read_same", "read_other", "read_repair", "copy_repair"):
            print(f"  baseline {base}: peak {peaks[base] / 1e6:.1f} MB")
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
