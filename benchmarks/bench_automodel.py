"""NeMo Automodel's ``Checkpointer.load_model`` with its own BAGEL adapter vs bagelverify's.

Builds a synthetic BAGEL-shaped folder (scale 3.5: a 2.4 GB ``ema.safetensors`` plus a small
``ae.safetensors``), warms the page cache, then loads stage 1 into Automodel's
``BagelForUnifiedMultimodal`` (BF16, the file's dtype) with ``is_init_step=True``, each adapter in
its own fresh subprocess, and prints both side by side:

- ``automodel``: Automodel 0.7.0 as released. Its adapter is a ``StateDictAdapter``, so the
  checkpointer takes its in-place (DCP) path too;
- ``bagelverify``: after :func:`bagelverify.integrations.automodel.install`, the same path with
  bagelverify's checks (destinations validated before the read, tensors after it);
- ``not_recognised``: bagelverify's adapter where Automodel does not recognise it (before issue
  12: no base class, no flag): the checkpointer reads every ``*.safetensors`` onto the CPU.

The model's memory is allocated and zero-filled before the measurement (a constructed model's
is); peak RSS is the kernel's peak counter above that point, so the file pages the readers map
are counted. Every loaded tensor is compared with the file afterwards. Linux only.

Run: ``python benchmarks/bench_automodel.py`` (``--scale``, ``--repeat``, ``--dir``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_io import _peak_above, _reset_peak, _warm

MODES = ("automodel", "bagelverify", "not_recognised")


def child(mode: str, folder: Path) -> dict[str, Any]:
    import safetensors
    import torch

    import bagelverify as bv
    from bagelverify.integrations import automodel

    if mode != "automodel":
        automodel.install()
    from nemo_automodel.components.checkpoint import checkpointing as ck
    from nemo_automodel.components.models.bagel.model import BagelForUnifiedMultimodal

    fallback_calls = 0
    original = ck._load_hf_checkpoint_preserving_dtype

    def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal fallback_calls
        fallback_calls += 1
        return original(*args, **kwargs)

    ck._load_hf_checkpoint_preserving_dtype = counted
    config = bv.BagelConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = BagelForUnifiedMultimodal(automodel.automodel_config(config, stage=1))
    model = model.to(torch.bfloat16).to_empty(device="cpu")
    for tensor in model.state_dict().values():
        tensor.zero_()
    if mode == "not_recognised":

        class NotRecognised:  # what register() fixes: same methods, no base class
            def __init__(self, inner: Any) -> None:
                self.inner = inner

            def to_hf(self, state_dict: Any, **kwargs: Any) -> Any:
                return self.inner.to_hf(state_dict, **kwargs)

            def from_hf(self, state_dict: Any, **kwargs: Any) -> Any:
                return self.inner.from_hf(state_dict, **kwargs)

        model.state_dict_adapter = NotRecognised(model.state_dict_adapter)
    checkpointer = ck.Checkpointer(
        ck.CheckpointingConfig(checkpoint_dir=str(folder / "unused"), save_consolidated=False),
        dp_rank=0,
        tp_rank=0,
        pp_rank=0,
    )
    loaded_bytes = sum(t.nbytes for t in model.state_dict().values())
    baseline = _reset_peak()
    start = time.perf_counter()
    checkpointer.load_model(model, str(folder), is_init_step=True)
    seconds = time.perf_counter() - start
    peak = _peak_above(baseline)
    unequal = 0
    with safetensors.safe_open(str(folder / "ema.safetensors"), framework="pt") as handle:
        for key, tensor in model.state_dict().items():
            unequal += not torch.equal(tensor, handle.get_tensor(key[len("model.") :]))
    return {
        "seconds": seconds,
        "peak": peak,
        "bytes": loaded_bytes,
        "fallback_calls": fallback_calls,
        "unequal": unequal,
    }


def run_child(mode: str, folder: Path) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", mode, "--dir", str(folder)]
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=3.5, help="synthetic scale (3.5: 2.4 GB)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per mode (median)")
    parser.add_argument("--dir", type=Path, help="existing or new folder for the checkpoint")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.dir)))
        return

    import bagelverify as bv

    with tempfile.TemporaryDirectory(prefix="bench_automodel.") as scratch:
        folder = args.dir or Path(scratch) / "ckpt"
        if not (folder / "ema.safetensors").exists():
            made = bv.make_synthetic_checkpoint(folder, scale=args.scale)
            print(f"built {made.model_bytes / 1e9:.2f} GB synthetic checkpoint", flush=True)
        file_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        for path in folder.glob("*.safetensors"):
            _warm(path)
        runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
        for round_ in range(args.repeat):  # interleaved, so background load hits every mode
            for mode in MODES:
                runs[mode].append(run_child(mode, folder))
            print(f"  round {round_ + 1}/{args.repeat} done", flush=True)

    stage1 = runs["automodel"][0]["bytes"]
    print(
        f"\nstage 1 into BF16 parameters: {stage1 / 1e9:.3f} GB loaded from "
        f"{file_bytes / 1e9:.3f} GB of *.safetensors, warm page cache, median of {args.repeat}\n"
    )
    print(
        "| adapter | wall s (range) | peak RSS above model GB | peak / loaded | full-CPU fallback |"
    )
    print("| --- | ---: | ---: | ---: | --- |")
    peaks = {}
    for mode, done in runs.items():
        if any(r["unequal"] for r in done):
            raise SystemExit(f"{mode}: {done[0]['unequal']} tensors differ from the file")
        peaks[mode] = statistics.median(r["peak"] for r in done)
        seconds = sorted(r["seconds"] for r in done)
        fallback = "called" if done[0]["fallback_calls"] else "not called"
        print(
            f"| {mode} | {statistics.median(seconds):.2f} ({seconds[0]:.2f}-{seconds[-1]:.2f}) | "
            f"{peaks[mode] / 1e9:.3f} | "
            f"{peaks[mode] / stage1:.2f}x | {fallback} |"
        )
    verdict = "met" if peaks["bagelverify"] <= peaks["automodel"] * 1.02 else "MISSED"
    print(f"\ntarget: bagelverify peak <= automodel's (2% noise): {verdict}")


if __name__ == "__main__":
    main()
