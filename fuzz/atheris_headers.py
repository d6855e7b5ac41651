"""Coverage-guided fuzzing of the checkpoint readers with atheris (libFuzzer), outside CI.

Each input is written as ``ema.safetensors`` and as ``ae.safetensors`` of a scratch folder and
goes through ``read_header``, ``inspect_checkpoint``, ``load_bagel_checkpoint_state_dict`` and
``load_bagel_vae_state_dict``. A documented error (``BagelError``) is fine; any other exception
is reported by libFuzzer as a crash, with the input saved to ``crash-*``.

Setup (atheris is not a project dependency)::

    pip install atheris
    python fuzz/atheris_headers.py -runs=200000            # seeds itself with valid files
    python fuzz/atheris_headers.py CORPUS_DIR -max_total_time=600
"""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
from pathlib import Path

import atheris
import torch

with atheris.instrument_imports():
    import bagelverify as bv
    from bagelverify.errors import BagelError
    from bagelverify.safetensors_io import read_header, save_tensors

SEEDS = {
    "model.safetensors": {
        "language_model.model.norm.weight": torch.arange(4, dtype=torch.bfloat16),
        "vit_model.vision_model.post_layernorm.bias": torch.zeros(0, 2),
        "language_model.model.norm_moe_gen.weight": torch.tensor(1.5, dtype=torch.float64),
    },
    "vae.safetensors": {
        "decoder.conv_in.bias": torch.ones(3),
        "encoder.conv_in.bias": torch.ones(1),
    },
}

SCRATCH = Path(tempfile.mkdtemp(prefix="bagelverify-atheris-"))


def one_input(data: bytes) -> None:
    """Run every reader on ``data``; only BagelError may escape unreported."""
    for name in ("ema.safetensors", "ae.safetensors"):
        (SCRATCH / name).write_bytes(data)
    calls = (
        lambda: read_header(SCRATCH / "ema.safetensors"),
        lambda: bv.inspect_checkpoint(SCRATCH, stage=2),
        lambda: bv.load_bagel_checkpoint_state_dict(SCRATCH, stage=2, strict=False),
        lambda: bv.load_bagel_vae_state_dict(SCRATCH),
    )
    for call in calls:
        with contextlib.suppress(BagelError):
            call()


def main() -> None:
    logging.disable(logging.CRITICAL)  # the readers' warnings about every mutant are noise here
    args = sys.argv
    if not any(not arg.startswith("-") for arg in args[1:]):  # no corpus given: seed one
        corpus = Path(tempfile.mkdtemp(prefix="bagelverify-corpus-"))
        for name, tensors in SEEDS.items():
            save_tensors(corpus / name, tensors)
        args = [*args, str(corpus)]
    atheris.Setup(args, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
