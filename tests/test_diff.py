"""``diff_checkpoints`` and ``bagelverify diff``: headers first, values streamed per family."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from bagelverify.diff import compare_tensors, diff_checkpoints
from bagelverify.manifest import load_manifest
from bagelverify.safetensors_io import read_header, save_tensors
from bagelverify.synthetic import SyntheticCheckpoint
from bagelverify.tensor_reader import TensorReader

KEYS = list(load_manifest()["ema.safetensors"])


def _copy(source: SyntheticCheckpoint, target: Path) -> Path:
    shutil.copytree(source.path, target)
    return target


def test_a_checkpoint_against_itself_is_empty(synthetic_checkpoint: SyntheticCheckpoint) -> None:
    """Invariant: diff(a, a) is empty and names every family identical."""
    diff = diff_checkpoints(synthetic_checkpoint.path, synthetic_checkpoint.path)
    assert diff.empty and diff.changed_keys == []
    assert sum(f.tensors for f in diff.families.values()) == len(KEYS)
    assert "vit.fc1" in diff.identical_families and len(diff.identical_families) == len(
        diff.families
    )


@settings(max_examples=8, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(KEYS), delta=st.sampled_from([1e-2, 1.0, -3.0]))
def test_one_changed_tensor_is_exactly_the_one_named(
    synthetic_checkpoint: SyntheticCheckpoint,
    tmp_path_factory: pytest.TempPathFactory,
    key: str,
    delta: float,
) -> None:
    """Invariant: changing one tensor makes diff name exactly that tensor, by that much."""
    folder = tmp_path_factory.mktemp("changed")
    tensors = load_file(synthetic_checkpoint.path / "ema.safetensors")
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[-1] += delta
    save_tensors(folder / "ema.safetensors", tensors)
    diff = diff_checkpoints(synthetic_checkpoint.path / "ema.safetensors", folder)
    assert diff.differing_keys == [key]
    assert diff.only_in_a == diff.only_in_b == [] and diff.header_changes == []
    (family,) = (f for f in diff.families.values() if f.differing)
    assert family.max_abs_diff == pytest.approx(abs(delta), rel=0.02)
    assert family.max_rel_diff > 0


def test_headers_only_in_a_only_in_b_and_changes_without_reading(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tensors = load_file(synthetic_checkpoint.path / "ema.safetensors")
    removed = "connector.fc1.bias"
    del tensors[removed]
    tensors["language_model.lm_head.weight"] = tensors["language_model.lm_head.weight"].float()
    tensors["time_embedder.mlp.0.bias"] = tensors["time_embedder.mlp.0.bias"][:-1].clone()
    tensors["extra.weight"] = torch.zeros(2)
    save_tensors(tmp_path / "ema.safetensors", tensors)

    def no_reads(*args: object, **kwargs: object) -> None:
        raise AssertionError("--keys-only read tensor data")

    monkeypatch.setattr(TensorReader, "read_range", no_reads)
    diff = diff_checkpoints(synthetic_checkpoint.path, tmp_path, keys_only=True)
    assert diff.only_in_a == [removed] and diff.only_in_b == ["extra.weight"]
    assert sorted(c.key for c in diff.header_changes) == [
        "language_model.lm_head.weight",
        "time_embedder.mlp.0.bias",
    ]
    assert not diff.values_compared and diff.families == {}
    monkeypatch.undo()
    full = diff_checkpoints(synthetic_checkpoint.path, tmp_path)
    # the widened lm_head holds the same values: compared by value, equal
    assert "language_model.lm_head.weight" not in full.differing_keys
    assert full.families["lm_head"].identical


def test_native_and_hf_keys_compare_key_for_key(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    tensors = load_file(synthetic_checkpoint.path / "ema.safetensors")
    save_tensors(tmp_path / "ema.safetensors", {"model." + k: v for k, v in tensors.items()})
    assert diff_checkpoints(synthetic_checkpoint.path, tmp_path).empty


def test_pieces_cover_the_tensor_and_relative_diff_uses_the_whole_tensor(tmp_path: Path) -> None:
    a = torch.zeros(1000)
    a[3] = 8.0  # in the first piece, identical on both sides
    b = a.clone()
    b[997] = 0.5  # in the last piece
    save_tensors(tmp_path / "a.safetensors", {"t": a})
    save_tensors(tmp_path / "b.safetensors", {"t": b})
    info_a = read_header(tmp_path / "a.safetensors").tensors["t"]
    info_b = read_header(tmp_path / "b.safetensors").tensors["t"]
    buffers = (torch.empty(400), torch.empty(400))  # 100 float32 elements each
    buffers = (buffers[0].view(torch.uint8), buffers[1].view(torch.uint8))
    with TensorReader() as reader:
        differs, max_abs, max_a = compare_tensors(reader, info_a, info_b, buffers, step=100)
    assert differs and max_abs == 0.5 and max_a == 8.0
    nan = a.clone()
    nan[0] = math.nan
    save_tensors(tmp_path / "n.safetensors", {"t": nan.double()})
    info_n = read_header(tmp_path / "n.safetensors").tensors["t"]
    big = (torch.empty(800, dtype=torch.uint8), torch.empty(800, dtype=torch.uint8))
    with TensorReader() as reader:
        assert compare_tensors(reader, info_a, info_n, big, step=100)[:2] == (True, math.inf)


def _bv(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bagelverify", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_diff_json_and_text(synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path) -> None:
    same = _bv("diff", synthetic_checkpoint.path, synthetic_checkpoint.path, "--json")
    assert same.returncode == 0, same.stderr
    document = json.loads(same.stdout)
    assert document["schema_version"] == 1 and document["command"] == "diff"
    assert document["identical"] and document["exit_code"] == 0
    tensors = load_file(synthetic_checkpoint.path / "ema.safetensors")
    key = "vit_model.vision_model.encoder.layers.3.mlp.fc1.weight"
    tensors[key] = tensors[key] * 2
    save_tensors(tmp_path / "ema.safetensors", tensors)
    changed = _bv("diff", synthetic_checkpoint.path, tmp_path)
    assert changed.returncode == 1, changed.stderr
    assert "vit.fc1" in changed.stdout and "1 key differs" in changed.stdout
    assert "\x1b" not in changed.stdout + changed.stderr  # piped: plain text, no progress bar
    keys = json.loads(
        _bv("diff", synthetic_checkpoint.path, tmp_path, "--keys-only", "--json").stdout
    )
    assert keys["identical"] and not keys["values_compared"]
