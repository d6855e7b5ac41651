"""``bagelverify convert`` memory benchmark: streaming conversion vs load-everything-then-save.

Builds a synthetic BAGEL-shaped checkpoint (default scale 8: about 460 MB, the real 1,223 keys)
in a temporary folder, warms the page cache, then converts it HF -> native for stage 2 in a
fresh subprocess per method and prints one side-by-side table:

- ``stream``: :func:`bagelverify.checkpoint.convert_checkpoint` (what ``bagelverify convert``
  runs): one tensor read, written and released at a time;
- ``naive``: ``safetensors.torch.load_file`` + key renaming + ``save_file``.

Peak memory is the kernel's peak-RSS counter (``VmHWM``) reset after the imports, minus the RSS
at that point (the helpers of ``bench_io.py``). The claim: the streaming peak is a small multiple
of the largest tensor and independent of the checkpoint size; the naive peak is about the
checkpoint. Linux only.

Run: ``python benchmarks/bench_convert.py`` (``--scale``, ``--dir`` to reuse a folder).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_io import _peak_above, _reset_peak, _warm

MODES = ("stream", "naive")


def child(mode: str, folder: Path, out: Path) -> dict[str, Any]:
    """Convert ``folder`` into ``out`` with one method; return its peak memory and time."""
    from safetensors.torch import load_file, save_file

    import bagelverify.checkpoint as checkpoint

    baseline = _reset_peak()
    start = time.perf_counter()
    if mode == "stream":
        checkpoint.convert_checkpoint(folder, out, stage=2, keys="native")
    else:
        tensors = load_file(folder / "ema.safetensors")
        out.mkdir(parents=True, exist_ok=True)
        save_file(
            {"model." + key: value for key, value in tensors.items()}, out / "ema.safetensors"
        )
    return {"seconds": time.perf_counter() - start, "peak": _peak_above(baseline)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=8)
    parser.add_argument("--dir", type=Path, help="reuse (or create) the checkpoint here")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "SRC", "DST"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, src, dst = args.child
        print(json.dumps(child(mode, Path(src), Path(dst))))
        return
    from bagelverify.safetensors_io import read_header
    from bagelverify.synthetic import make_synthetic_checkpoint

    work = Path(tempfile.mkdtemp(prefix="bench-convert-"))
    try:
        folder = args.dir or work / "bagel"
        if not (folder / "ema.safetensors").is_file():
            make_synthetic_checkpoint(folder, scale=args.scale, with_vae=False)
        model = folder / "ema.safetensors"
        _warm(model)
        infos = read_header(model).tensors.values()
        total, largest = sum(i.nbytes for i in infos), max(i.nbytes for i in infos)
        print(
            f"checkpoint {total / 1e6:.1f} MB in {len(infos)} tensors; largest tensor "
            f"{largest / 1e6:.1f} MB (scale {args.scale:g})"
        )
        print(
            f"{'method':<8} {'peak MB':>9} {'peak/largest':>13} {'peak/checkpoint':>16} "
            f"{'seconds':>8}"
        )
        for mode in MODES:
            out = work / mode
            command = [sys.executable, __file__, "--child", mode, str(folder), str(out)]
            result = json.loads(
                subprocess.run(command, check=True, capture_output=True, text=True).stdout
            )
            shutil.rmtree(out, ignore_errors=True)
            print(
                f"{mode:<8} {result['peak'] / 1e6:9.1f} {result['peak'] / largest:13.2f} "
                f"{result['peak'] / total:16.3f} {result['seconds']:8.2f}"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
