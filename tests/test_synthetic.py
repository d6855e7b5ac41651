"""Synthetic checkpoints: manifest keys and dtypes, config-consistent shapes, seeded values."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch

from bagelverify import BagelConfig, make_synthetic_checkpoint
from bagelverify.errors import ArgumentError
from bagelverify.families import expected_shapes
from bagelverify.manifest import load_manifest
from bagelverify.safetensors_io import read_header
from bagelverify.synthetic import SyntheticCheckpoint, scaled_config

MANIFEST = load_manifest()


@pytest.mark.parametrize("scale", [1, 2, 3.5, 8, 64, 10_000])
def test_scaled_config_keeps_counts_and_divides_widths(scale: float) -> None:
    full, small = BagelConfig(), scaled_config(scale)
    assert small.num_hidden_layers == full.num_hidden_layers
    assert small.vit_layers_used == full.vit_layers_used
    assert (small.num_attention_heads, small.num_key_value_heads) == (28, 4)
    assert small.head_dim == max(1, int(full.head_dim // scale))
    assert small.intermediate_size == max(1, int(full.intermediate_size // scale))
    assert small.vit_num_positions == (small.vit_image_size // small.vit_patch_size) ** 2
    assert scaled_config(1) == full


def test_folder_matches_manifest_and_its_own_config(
    synthetic_checkpoint: SyntheticCheckpoint,
) -> None:
    folder = synthetic_checkpoint.path
    config = BagelConfig.from_pretrained(folder)
    assert config == synthetic_checkpoint.config
    shapes = expected_shapes(config)
    for name in ("ema.safetensors", "ae.safetensors"):
        header = read_header(folder / name)
        assert list(header.tensors) == list(MANIFEST[name])  # header keeps manifest order
        assert {k: i.dtype for k, i in header.tensors.items()} == {
            k: s.dtype for k, s in MANIFEST[name].items()
        }
    ema = read_header(folder / "ema.safetensors").tensors
    assert {k: i.shape for k, i in ema.items()} == shapes
    ae = read_header(folder / "ae.safetensors").tensors
    assert all(
        i.shape == tuple(max(1, d // 64) for d in MANIFEST["ae.safetensors"][k].shape)
        for k, i in ae.items()
    )
    assert synthetic_checkpoint.model_bytes == sum(i.nbytes for i in ema.values())


def test_same_seed_same_bytes_other_seed_other_values(tmp_path: Path) -> None:
    a = make_synthetic_checkpoint(tmp_path / "a", scale=128, seed=1, with_vae=False)
    b = make_synthetic_checkpoint(tmp_path / "b", scale=128, seed=1, with_vae=False)
    c = make_synthetic_checkpoint(tmp_path / "c", scale=128, seed=2, with_vae=False)
    assert (a.path / "ema.safetensors").read_bytes() == (b.path / "ema.safetensors").read_bytes()
    key = "language_model.lm_head.weight"
    va = safetensors.torch.load_file(a.path / "ema.safetensors")[key]
    vc = safetensors.torch.load_file(c.path / "ema.safetensors")[key]
    assert not torch.equal(va, vc) and va.float().std() > 0
    assert not (a.path / "ae.safetensors").exists()


@pytest.mark.parametrize("spelling", ["F32", "f32", "float32"])
def test_dtype_override_takes_the_cli_spellings_too(tmp_path: Path, spelling: str) -> None:
    made = make_synthetic_checkpoint(tmp_path, scale=128, dtype=spelling, with_vae=False)
    assert {i.dtype for i in read_header(made.path / "ema.safetensors").tensors.values()} == {"F32"}


def test_bad_dtype_and_scale_raise_bagel_errors(tmp_path: Path) -> None:
    with pytest.raises(ArgumentError, match=r"dtype must be bf16, f16 or f32.*got 'X'"):
        make_synthetic_checkpoint(tmp_path, scale=128, dtype="X")
    with pytest.raises(ArgumentError, match="scale must be a number >= 1"):
        scaled_config(0.5)


def test_default_scale_is_the_demos_and_the_readmes_and_its_docstring_size_is_true(
    tmp_path: Path,
) -> None:
    """The README's and the demo's scale is the function's default, and the docstring's "about
    N MB" for the default and for 64 is the size written (within 10%)."""
    import inspect as inspect_module
    import re

    from bagelverify.commands.demo import configure
    from bagelverify.synthetic import DEFAULT_SCALE

    default = inspect_module.signature(make_synthetic_checkpoint).parameters["scale"].default
    parser = __import__("argparse").ArgumentParser()
    configure(parser)
    assert default == DEFAULT_SCALE == parser.parse_args([]).scale
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert set(re.findall(r"make_synthetic_checkpoint\([^)]*scale=(\d+)", readme)) <= {
        str(DEFAULT_SCALE)
    }
    doc = make_synthetic_checkpoint.__doc__ or ""
    claims = re.findall(r"``scale=(\d+)``(?:(?!``scale=).)*?about (\d+) MB", " ".join(doc.split()))
    assert {int(scale) for scale, _ in claims} == {DEFAULT_SCALE, 64}
    for scale, megabytes in claims:
        made = make_synthetic_checkpoint(tmp_path / scale, scale=int(scale), with_vae=False)
        assert abs(made.model_bytes / 1e6 - int(megabytes)) <= 0.1 * int(megabytes)
