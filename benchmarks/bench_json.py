"""Header validation cost: :func:`bagelverify.safetensors_io.read_header` against a bare
``json.loads`` of the same bytes, for large hostile headers.

Writes one safetensors-shaped file per header kind (default 20 MB of header each) into a
temporary folder, then in a fresh subprocess per (kind, method) measures the wall time and the
peak RSS above the post-import baseline (``VmHWM``, the helpers of ``bench_io.py``) and prints one
table with the ratios ``read_header / json.loads``. The claim: validation is linear in the header
size with a small constant, so both ratios stay near 1-3 for every kind. Linux only.

Kinds: ``entries`` (a valid header of many zero-byte tensors), ``long-shape`` (one tensor whose
shape lists millions of 2s), ``array`` (a metadata value that is a huge array of small ints),
``strings`` (a metadata object of many short strings).

Run: ``python benchmarks/bench_json.py`` (``--mb`` for another header size).
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_io import _peak_above, _reset_peak

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("entries", "long-shape", "array", "strings")
METHODS = ("json.loads", "read_header")


def header_body(kind: str, size: int) -> bytes:
    """A JSON header of about ``size`` bytes of the given kind."""
    if kind == "entries":
        entry = '"t{:09d}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}'
        count = size // len(entry.format(0))
        return ("{" + ",".join(entry.format(i) for i in range(count)) + "}").encode()
    if kind == "long-shape":
        dims = ",".join(["2"] * (size // 2))
        return f'{{"t":{{"dtype":"U8","shape":[{dims}],"data_offsets":[0,0]}}}}'.encode()
    if kind == "array":
        return ('{"__metadata__":{"x":[' + ",".join(["0"] * (size // 2)) + "]}}").encode()
    if kind == "strings":
        count = size // len('"k000000000":"v",')
        pairs = ",".join(f'"k{i:09d}":"v"' for i in range(count))
        return ('{"__metadata__":{' + pairs + "}}").encode()
    raise ValueError(kind)


def child(method: str, path: Path) -> dict[str, Any]:
    """Parse ``path``'s header with one method; return its peak memory and time."""
    import bagelverify.safetensors_io as io
    from bagelverify.errors import BagelError

    baseline = _reset_peak()
    started = time.perf_counter()
    outcome = "ok"
    if method == "json.loads":
        raw = path.read_bytes()
        (length,) = struct.unpack("<Q", raw[:8])
        json.loads(raw[8 : 8 + length])
    else:
        try:
            io.read_header(path)
        except BagelError as error:
            outcome = type(error).__name__
    return {
        "seconds": time.perf_counter() - started,
        "peak_mb": _peak_above(baseline) / 2**20,
        "outcome": outcome,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=20.0, help="header size in MB")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    args = parser.parse_args()
    size = int(args.mb * 2**20)
    print(f"header size {args.mb:g} MB; peak = RSS high-water mark above the baseline")
    print(f"{'kind':<11} {'method':<12} {'seconds':>8} {'peak MB':>8} {'x time':>7} {'x peak':>7}")
    with tempfile.TemporaryDirectory() as folder:
        for kind in args.kinds:
            body = header_body(kind, size)
            path = Path(folder) / f"{kind}.safetensors"
            path.write_bytes(struct.pack("<Q", len(body)) + body)
            results = {}
            for method in METHODS:
                output = subprocess.run(
                    [sys.executable, __file__, "--child", method, str(path)],
                    check=True,
                    env=dict(os.environ, PYTHONPATH=str(ROOT)),  # this checkout's bagelverify
                    capture_output=True,
                    text=True,
                ).stdout
                results[method] = json.loads(output)
            base = results["json.loads"]
            for method, result in results.items():
                time_ratio = result["seconds"] / base["seconds"]
                peak_ratio = result["peak_mb"] / max(base["peak_mb"], 1e-9)
                print(
                    f"{kind:<11} {method:<12} {result['seconds']:8.2f} {result['peak_mb']:8.0f} "
                    f"{time_ratio:7.2f} {peak_ratio:7.2f}  {result['outcome']}"
                )


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], Path(sys.argv[3]))))
    else:
        main()
