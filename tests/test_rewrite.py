"""Casts and resized position tables on the way through a conversion (``rewrite_checkpoint``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_pos_embed import reference

from bagelverify import BagelConfig, inspect_checkpoint, load_bagel_checkpoint_state_dict
from bagelverify.diff import diff_checkpoints
from bagelverify.errors import LossyCastError
from bagelverify.pos_embed import LATENT_POS_EMBED, VIT_POS_EMBED
from bagelverify.position_check import check_position_tables
from bagelverify.rewrite import is_lossless, parse_dtype, rewrite_checkpoint
from bagelverify.safetensors_io import DTYPES, read_header
from bagelverify.synthetic import SyntheticCheckpoint

FLOATS = ["BF16", "F16", "F32", "F64"]


@given(
    source=st.sampled_from(FLOATS),
    target=st.sampled_from(FLOATS),
    values=st.lists(st.floats(width=16, allow_nan=False), min_size=1, max_size=20),
)
def test_a_lossless_cast_round_trips_every_value(
    source: str, target: str, values: list[float]
) -> None:
    """Invariant: when is_lossless(a, b), a -> b -> a gives back the same bits; the
    classification says a narrowing cast is lossy exactly when it is not a widening."""
    a = torch.tensor(values, dtype=torch.float32).to(DTYPES[source].torch_dtype)
    if is_lossless(source, target):
        back = a.to(DTYPES[target].torch_dtype).to(a.dtype)
        assert torch.equal(back.view(torch.uint8), a.view(torch.uint8))
    wider = DTYPES[target].itemsize > DTYPES[source].itemsize
    assert is_lossless(source, target) == (source == target or wider)
    assert not is_lossless("BF16", "F16") and not is_lossless("F16", "BF16")


def test_parse_dtype_spellings() -> None:
    assert [parse_dtype(x) for x in ("bf16", "F16", "fp16", "float32", "f32")] == [
        "BF16",
        "F16",
        "F16",
        "F32",
        "F32",
    ]
    with pytest.raises(ValueError, match="got 'int8'"):
        parse_dtype("int8")


def test_bf16_f32_bf16_round_trip_is_bit_identical_and_sizes_are_reported(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    wide = rewrite_checkpoint(synthetic_checkpoint.path, tmp_path / "f32", dtype="f32")
    assert wide.bytes_after == 2 * wide.bytes_before == 2 * synthetic_checkpoint.model_bytes
    assert wide.narrowed == []
    dtypes = {i.dtype for i in read_header(tmp_path / "f32" / "ema.safetensors").tensors.values()}
    assert dtypes == {"F32"}
    with pytest.raises(LossyCastError, match=r"casting to BF16 loses .* for 1,223 tensors"):
        rewrite_checkpoint(tmp_path / "f32", tmp_path / "refused", dtype=torch.bfloat16)
    assert not (tmp_path / "refused" / "ema.safetensors").exists()
    back = rewrite_checkpoint(tmp_path / "f32", tmp_path / "bf16", dtype="bf16", allow_lossy=True)
    assert len(back.narrowed) == 1223 and back.bytes_after == synthetic_checkpoint.model_bytes
    original = (synthetic_checkpoint.path / "ema.safetensors").read_bytes()
    assert (tmp_path / "bf16" / "ema.safetensors").read_bytes() == original
    assert diff_checkpoints(synthetic_checkpoint.path, tmp_path / "f32").differing_keys == []


def test_resized_tables_are_regenerated_and_load_strictly_with_the_new_config(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    out = tmp_path / "big"
    report = rewrite_checkpoint(
        synthetic_checkpoint.path, out, max_latent_size=5, vit_max_num_patch_per_side=3
    )
    assert report.tables_regenerated == [VIT_POS_EMBED, LATENT_POS_EMBED]
    config = BagelConfig.from_pretrained(out)
    assert (config.max_latent_size, config.vit_max_num_patch_per_side) == (5, 3)
    assert inspect_checkpoint(out, stage=2).problems() == []
    state = load_bagel_checkpoint_state_dict(out, stage=2)
    width = config.hidden_size
    for key, side in ((LATENT_POS_EMBED, 5), (VIT_POS_EMBED, 3)):
        table = state["model." + key]
        assert table.shape == (side * side, width) and table.dtype == torch.bfloat16
        expected = torch.from_numpy(reference(side, width)).to(torch.bfloat16)
        assert (table.float() - expected.float()).abs().max() <= 2**-8
    assert all(check.exact for check in check_position_tables(out))
    # every other tensor is carried over unchanged
    diff = diff_checkpoints(synthetic_checkpoint.path, out)
    assert sorted(c.key for c in diff.header_changes) == [LATENT_POS_EMBED, VIT_POS_EMBED]
    assert diff.differing_keys == [] and diff.only_in_a == diff.only_in_b == []


def _bv(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bagelverify", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_convert_dtype_and_max_latent_size(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    done = _bv(
        "convert",
        synthetic_checkpoint.path,
        tmp_path / "f32",
        "--stage",
        "2",
        "--dtype",
        "f32",
        "--max-latent-size",
        "4",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    # twice the bytes, plus 15 more F32 rows of the latent table (1 x 1 -> 4 x 4 latents)
    growth = 15 * BagelConfig.from_pretrained(tmp_path / "f32").hidden_size * 4
    assert document["bytes_after"] == 2 * document["bytes_before"] + growth == document["bytes"]
    assert document["dtype"] == "F32" and document["max_latent_size"] == 4
    assert document["tables_regenerated"] == [LATENT_POS_EMBED]
    refused = _bv("convert", tmp_path / "f32", tmp_path / "bf16", "--stage", "2", "--dtype", "bf16")
    assert refused.returncode == 2 and "--allow-lossy" in refused.stderr
    assert not (tmp_path / "bf16").exists() or not any((tmp_path / "bf16").iterdir())
    text = _bv(
        "convert",
        tmp_path / "f32",
        tmp_path / "bf16",
        "--stage",
        "2",
        "--dtype",
        "bf16",
        "--allow-lossy",
    )
    assert text.returncode == 0, text.stderr
    assert "tensor bytes" in text.stdout and "(BF16)" in text.stdout
