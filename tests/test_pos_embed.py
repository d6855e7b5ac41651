"""Position tables: regenerated tables against an independent float64 formula, and checks."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bagelverify import BagelConfig, make_synthetic_checkpoint
from bagelverify.errors import ConfigError
from bagelverify.pos_embed import (
    LATENT_POS_EMBED,
    VIT_POS_EMBED,
    compare_table,
    position_table,
    sincos_table,
)
from bagelverify.position_check import check_position_tables, check_tables
from bagelverify.safetensors_io import (
    TensorInfo,
    TensorSpec,
    encode_header,
    read_header,
    save_tensors,
)


def reference(side: int, width: int) -> np.ndarray:
    """Element by element from the definition: row r = (y, x) = divmod(r, side); column c of
    width D is, for q = D/4, sin(x w_k), cos(x w_k), sin(y w_k), cos(y w_k) by quarter, with
    w_k = 10000^(-k/q); computed in float64 with math, then rounded to float32."""
    q = width // 4
    out = np.empty((side * side, width), dtype=np.float64)
    for r in range(side * side):
        y, x = divmod(r, side)
        for c in range(width):
            quarter, k = divmod(c, q)
            coordinate = x if quarter < 2 else y
            angle = coordinate * (1.0 / 10000.0 ** (k / q))
            out[r, c] = math.sin(angle) if quarter % 2 == 0 else math.cos(angle)
    return out.astype(np.float32)


@given(side=st.integers(1, 9), quarter=st.integers(1, 12))
def test_table_equals_the_float64_definition_rounded_to_float32(side: int, quarter: int) -> None:
    """Invariant: every element equals the definition evaluated in float64, rounded once."""
    table = sincos_table(side, 4 * quarter)
    assert table.dtype == torch.float32 and table.shape == (side * side, 4 * quarter)
    expected = torch.from_numpy(reference(side, 4 * quarter))
    # float64 sin/pow of two libraries may differ in the last float64 bit, which moves a float32
    # rounding by at most one float32 ulp, and only at a rounding tie
    assert torch.allclose(table, expected, rtol=0, atol=1e-7)
    assert (table != expected).float().mean() < 0.01


def test_full_size_tables_have_the_release_shapes_and_known_values() -> None:
    config = BagelConfig()
    vit = position_table(VIT_POS_EMBED, config, torch.bfloat16)
    latent = position_table(LATENT_POS_EMBED, config)
    assert vit.shape == (4900, 3584) and vit.dtype == torch.bfloat16
    assert latent.shape == (4096, 3584)
    # row 0 is (x, y) = (0, 0): sines 0, cosines 1
    assert torch.equal(latent[0], torch.tensor(([0.0] * 896 + [1.0] * 896) * 2))
    # row 65 of the latent grid is (y, x) = (1, 1); column 0 is sin(x * 1), column 1792 sin(y)
    assert latent[65, 0] == pytest.approx(math.sin(1.0), abs=1e-7)
    assert latent[65, 1792 + 896] == pytest.approx(math.cos(1.0), abs=1e-7)
    # row 3 is x = 3, y = 0: the second half is the row's, all sin 0 / cos 1
    assert latent[3, 1] == pytest.approx(math.sin(3 * 10000 ** (-1 / 896)), abs=1e-7)
    assert torch.equal(latent[3, 1792:], latent[0, 1792:])


def test_widths_that_are_not_multiples_of_four_are_refused() -> None:
    with pytest.raises(ConfigError, match="multiple of 4; got side 4, width 6"):
        sincos_table(4, 6)


def test_compare_table_exact_after_rounding_differs_and_wrong_shape() -> None:
    config = BagelConfig(hidden_size=56, num_attention_heads=28, num_key_value_heads=4)
    good = position_table(LATENT_POS_EMBED, config, torch.bfloat16)
    check = compare_table(LATENT_POS_EMBED, good, config)
    assert check.exact and check.max_abs_diff == 0.0 and "equals" in check.describe()
    bad = good.clone()
    bad[5, 7] += 0.25
    check = compare_table(LATENT_POS_EMBED, bad, config)
    assert not check.exact and check.max_abs_diff == pytest.approx(0.25, abs=0.01)
    smaller = BagelConfig(
        hidden_size=56, num_attention_heads=28, num_key_value_heads=4, max_latent_size=8
    )
    small = position_table(LATENT_POS_EMBED, smaller)
    check = compare_table(LATENT_POS_EMBED, small, config)
    assert not check.exact and check.max_abs_diff is None
    assert check.as_dict()["expected_shape"] == [4096, 56]


def test_synthetic_checkpoints_hold_the_real_tables(tmp_path: Path) -> None:
    made = make_synthetic_checkpoint(tmp_path / "a", scale=64, with_vae=False)
    checks = check_position_tables(made.path)
    assert [c.key for c in checks] == [VIT_POS_EMBED, LATENT_POS_EMBED]
    assert all(c.exact for c in checks), [c.describe() for c in checks]
    # the stored bytes are the definition's, rounded to BF16 (independent of the writer)
    header = read_header(made.path / "ema.safetensors")
    info = header.tensors[LATENT_POS_EMBED]
    side = made.config.max_latent_size
    raw = (made.path / "ema.safetensors").read_bytes()[info.start : info.end]
    stored = torch.frombuffer(bytearray(raw), dtype=torch.bfloat16).reshape(info.shape)
    expected = torch.from_numpy(reference(side, made.config.hidden_size)).to(torch.bfloat16)
    assert (stored.float() - expected.float()).abs().max() <= 2**-8


def test_a_changed_table_is_reported_with_its_difference(tmp_path: Path) -> None:
    made = make_synthetic_checkpoint(tmp_path / "a", scale=64, with_vae=False)
    from safetensors.torch import load_file

    tensors = load_file(made.path / "ema.safetensors")
    tensors[VIT_POS_EMBED] = tensors[VIT_POS_EMBED] + 1
    save_tensors(made.path / "ema.safetensors", tensors)
    vit, latent = check_position_tables(made.path)
    assert not vit.exact and vit.max_abs_diff == pytest.approx(1.0, abs=0.01)
    assert latent.exact


def test_without_a_config_a_table_is_compared_with_its_own_grid() -> None:
    """Invariant: a table of any square grid compares exact against itself regenerated from
    its shape alone; a non-square row count is named, never guessed."""
    table = torch.from_numpy(reference(5, 12)).to(torch.bfloat16)
    check = compare_table(VIT_POS_EMBED, table, None)
    assert check.exact and check.expected_shape == (25, 12)
    odd = compare_table(VIT_POS_EMBED, table[:24], None)
    assert not odd.exact and odd.max_abs_diff is None
    assert "no square grid" in odd.describe()


def test_inspect_reports_the_position_tables(tmp_path: Path) -> None:
    from test_cli import bv

    made = make_synthetic_checkpoint(tmp_path / "a", scale=64, with_vae=False)
    clean = bv("inspect", made.path)
    assert clean.returncode == 0, clean.stderr
    assert f"{VIT_POS_EMBED}: equals the regenerated table (BF16)" in clean.stdout
    from safetensors.torch import load_file

    tensors = load_file(made.path / "ema.safetensors")
    tensors[LATENT_POS_EMBED] = tensors[LATENT_POS_EMBED] * 0.5
    save_tensors(made.path / "ema.safetensors", tensors)
    shown = bv("inspect", made.path, "--json")
    assert shown.returncode == 0  # a differing frozen table is reported, not a load problem
    latent = {t["key"]: t for t in json.loads(shown.stdout)["position_tables"]}[LATENT_POS_EMBED]
    assert not latent["exact"] and latent["max_abs_diff"] == pytest.approx(0.5, abs=0.01)
    skipped = bv("inspect", made.path, "--json", "--headers-only")
    assert json.loads(skipped.stdout)["position_tables"] is None


def _sparse_tables(path: Path, shapes: dict[str, tuple[int, ...]]) -> dict[str, TensorInfo]:
    """A valid file whose tables' data section is a hole: headers only, nothing written."""
    specs = [TensorSpec(key, "BF16", shape) for key, shape in shapes.items()]
    header = encode_header(specs, {})
    with open(path, "wb") as handle:
        handle.write(header)
        handle.truncate(len(header) + sum(spec.nbytes for spec in specs))
    return read_header(path).tensors


def test_tables_the_header_decides_are_never_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A header claiming a huge grid (268 M elements) or a shape the config does not give is
    reported from the header alone: no byte read, no table regenerated."""
    tensors = _sparse_tables(
        tmp_path / "x.safetensors",
        {LATENT_POS_EMBED: (8192 * 8192, 4), VIT_POS_EMBED: (4096, 8)},
    )

    def forbidden(*args: object) -> None:
        raise AssertionError("a table was read")

    monkeypatch.setattr(os, "preadv", forbidden)
    (latent,) = check_tables({LATENT_POS_EMBED: tensors[LATENT_POS_EMBED]}, None)
    assert latent.max_abs_diff is None and latent.not_compared is not None
    assert "268,435,456 elements, beyond the 67,108,864 regenerated" in latent.describe()
    config = BagelConfig()  # latent 64 x 64 rows, 3584 wide: neither table has its shape
    checks = check_tables(tensors, config)
    assert [check.key for check in checks] == [VIT_POS_EMBED, LATENT_POS_EMBED]
    for check in checks:
        assert check.not_compared is None and check.max_abs_diff is None
        assert check.expected_shape[1] == 3584 and "the config implies" in check.describe()
    monkeypatch.undo()
    (vit,) = check_tables({VIT_POS_EMBED: tensors[VIT_POS_EMBED]}, None)  # a 64 x 64 grid: read
    assert vit.not_compared is None and vit.max_abs_diff is not None and not vit.exact
