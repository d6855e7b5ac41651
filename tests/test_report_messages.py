"""What the report's errors say: shape mismatches summarised with the config field behind them,
destination keys a stage drops told apart from absent ones, and the shipped manifest standing in
for a missing config's key list (issue 15, items 3, 12 and 15)."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest
import safetensors.torch
import torch

import bagelverify as bv
from bagelverify.buckets import Bucket
from bagelverify.config import BagelConfig
from bagelverify.errors import ConfigError, MissingKeysError, ShapeMismatchError
from bagelverify.manifest import load_manifest
from bagelverify.partition import classify
from bagelverify.safetensors_io import read_header, save_tensors
from bagelverify.synthetic import SyntheticCheckpoint

EMA = load_manifest()["ema.safetensors"]
DISTRIBUTED = Path(__file__).resolve().parent.parent / "docs" / "distributed.md"


def mismatch_error(checkpoint: SyntheticCheckpoint, **wrong: int) -> ShapeMismatchError:
    config = dataclasses.replace(checkpoint.config, **wrong)
    with pytest.raises(ShapeMismatchError) as info:
        bv.load_bagel_checkpoint_state_dict(checkpoint.path, stage=2, config=config)
    return info.value


# -- item 3: shape mismatches --------------------------------------------------------------------


def test_a_wrong_hidden_size_is_a_few_lines_naming_llm_config_hidden_size(
    synthetic_checkpoint: SyntheticCheckpoint,
) -> None:
    right = synthetic_checkpoint.config.hidden_size
    wrong = right + synthetic_checkpoint.config.num_attention_heads
    error = mismatch_error(synthetic_checkpoint, hidden_size=wrong)
    message = str(error)
    assert "801 tensors do not have the shape the config implies, in 34 families" in message
    assert "q_proj 56" in message and "(and 29 more)" in message
    assert f"llm_config.json hidden_size is {wrong}; the checkpoint's tensors imply {right}" in (
        message
    )
    assert "(with that value all 801 shapes match)" in message
    assert len(message.splitlines()) <= 8 and len(message) < 1500
    assert len(error.mismatches) == 801  # the full list stays on the exception
    assert {m.key for m in error.mismatches} >= {
        "language_model.model.embed_tokens.weight",
        "language_model.model.layers.27.mlp_moe_gen.down_proj.weight",
    }


def test_the_report_json_keeps_every_mismatch(synthetic_checkpoint: SyntheticCheckpoint) -> None:
    config = dataclasses.replace(synthetic_checkpoint.config, hidden_size=84)
    report = bv.inspect_checkpoint(synthetic_checkpoint.path, stage=2, config=config)
    listed = report.as_dict()["shape_mismatches"]
    assert len(listed) == 801
    assert listed[0] == {
        "key": "language_model.model.embed_tokens.weight",
        "expected": [config.vocab_size, 84],
        "found": [config.vocab_size, synthetic_checkpoint.config.hidden_size],
    }


def test_a_vision_size_names_vit_config_and_a_derived_size_names_its_fields(
    synthetic_checkpoint: SyntheticCheckpoint,
) -> None:
    config = synthetic_checkpoint.config
    message = str(
        mismatch_error(
            synthetic_checkpoint,
            vit_intermediate_size=config.vit_intermediate_size + 1,
            max_latent_size=config.max_latent_size + 1,
        )
    )
    assert "79 tensors do not have the shape the config implies, in 3 families " in message
    assert "(latent_pos_embed 1, vit.fc1 52, vit.fc2 26)" in message
    assert (
        f"vit_config.json intermediate_size is {config.vit_intermediate_size + 1}; the "
        f"checkpoint's tensors imply {config.vit_intermediate_size}" in message
    )
    assert "(with that value 78 of the 79 shapes match)" in message
    wrong_rows, found_rows = (config.max_latent_size + 1) ** 2, config.max_latent_size**2
    assert (
        f"latent_positions (from config.json max_latent_size) is {wrong_rows}; the "
        f"checkpoint's tensors give {found_rows}" in message
    )


def test_derived_sizes_depend_only_on_the_attributes_listed_for_them() -> None:
    """Invariant: changing an attribute not in DERIVED_FROM[name] never changes ``name``, so a
    mismatch in a derived size is blamed on the right config fields."""
    from bagelverify.config import DERIVED_FROM

    base = BagelConfig()
    for item in dataclasses.fields(BagelConfig):
        value = getattr(base, item.name)
        changed = not value if isinstance(value, bool) else value * 2
        try:
            other = dataclasses.replace(base, **{item.name: changed})
        except ConfigError:
            continue
        for name, sources in DERIVED_FROM.items():
            if item.name not in sources:
                assert getattr(other, name) == getattr(base, name), (name, item.name)


# -- item 12: destination keys the stage does not keep -------------------------------------------


def full_destination(checkpoint: SyntheticCheckpoint) -> dict[str, torch.Tensor]:
    """A full UND+GEN model's state dict (native keys), zeroed."""
    header = read_header(checkpoint.path / "ema.safetensors")
    return {
        "model." + key: torch.zeros(info.shape, dtype=info.torch_dtype)
        for key, info in header.tensors.items()
    }


def test_a_full_model_loaded_for_stage1_is_told_stage1_does_not_keep_its_gen_keys(
    synthetic_checkpoint: SyntheticCheckpoint,
) -> None:
    destination = full_destination(synthetic_checkpoint)
    with pytest.raises(MissingKeysError) as info:
        bv.load_into(destination, synthetic_checkpoint.path, stage=1)
    message = str(info.value)
    assert "402 destination keys are in the checkpoint but stage1 does not keep them" in message, (
        message
    )
    assert "not in the checkpoint" not in message
    assert "Pass stage=2 to load them too, or strict=False" in message
    assert len(info.value.keys) == 402
    assert all(classify(key.removeprefix("model.")) is Bucket.GEN for key in info.value.keys)
    assert bv.load_into(destination, synthetic_checkpoint.path, stage=2) == bv.IncompatibleKeys(
        [], []
    )


def test_dropped_and_truly_absent_destination_keys_are_counted_apart(
    synthetic_checkpoint: SyntheticCheckpoint,
) -> None:
    destination = full_destination(synthetic_checkpoint)
    absent = "model.language_model.model.layers.28.input_layernorm.weight"
    destination[absent] = torch.zeros(1)
    with pytest.raises(MissingKeysError) as info:
        bv.load_into(destination, synthetic_checkpoint.path, stage=1)
    message = str(info.value)
    assert "402 destination keys are in the checkpoint but stage1 does not keep them" in message
    assert f"1 destination key is not in the checkpoint ({absent!r})" in message
    with pytest.raises(MissingKeysError) as info:
        bv.load_into(destination, synthetic_checkpoint.path, stage=2)
    assert "does not keep" not in str(info.value)
    assert "Check the stage, or pass strict=False" in str(info.value)


def readme_distributed_stage() -> object:
    """The ``stage`` the docs' distributed example passes to the loader."""
    section = DISTRIBUTED.read_text("utf-8")
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    for node in ast.walk(ast.parse(code.group(1))):
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == (
            "load_bagel_checkpoint_distributed"
        ):
            stages = [k.value for k in node.keywords if k.arg == "stage"]
            assert len(stages) == 1 and isinstance(stages[0], ast.Constant)
            return stages[0].value
    raise AssertionError("no load_bagel_checkpoint_distributed call in docs/distributed.md")


def test_the_readme_distributed_example_loads_a_full_model(
    synthetic_checkpoint: SyntheticCheckpoint,
) -> None:
    destination = full_destination(synthetic_checkpoint)
    result = bv.load_bagel_checkpoint_distributed(
        destination, synthetic_checkpoint.path, stage=readme_distributed_stage()
    )
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert result.bytes_loaded == synthetic_checkpoint.model_bytes


# -- item 15: the manifest stands in for a missing config ----------------------------------------


def bare(checkpoint: SyntheticCheckpoint, folder: Path, drop: tuple[str, ...] = ()) -> Path:
    """The synthetic model file without config files, less the keys ``drop``."""
    folder.mkdir()
    tensors = safetensors.torch.load_file(checkpoint.path / "ema.safetensors")
    save_tensors(folder / "ema.safetensors", {k: v for k, v in tensors.items() if k not in drop})
    return folder


def test_without_config_the_full_key_set_is_clean_by_the_manifest(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    folder = bare(synthetic_checkpoint, tmp_path / "bare")
    for stage in ("stage1", "stage2"):
        report = bv.inspect_checkpoint(folder, stage=stage)
        assert report.expected_from == report.as_dict()["expected_from"] == "manifest"
        assert report.problems() == [] and report.shape_mismatches == []
    assert bv.inspect_checkpoint(synthetic_checkpoint.path).expected_from == "config"


def test_without_config_a_missing_key_is_reported_under_its_family(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    gone = "vit_model.vision_model.encoder.layers.3.mlp.fc1.weight"
    folder = bare(synthetic_checkpoint, tmp_path / "nofc1", (gone,))
    report = bv.inspect_checkpoint(folder, stage=1)
    assert report.expected_from == "manifest" and report.missing == {"vit.fc1": [gone]}
    with pytest.raises(MissingKeysError) as info:
        bv.load_bagel_checkpoint_state_dict(folder, stage=1)
    assert "stage1 expects 1 key that the checkpoint lacks (expected keys from the shipped " in (
        str(info.value)
    )
    assert "vit.fc1: 1 key missing (layers 3)" in str(info.value)
    assert info.value.keys == [gone]


def test_without_config_a_missing_gen_key_counts_only_for_stage2(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    gone = "language_model.model.layers.0.self_attn.q_proj_moe_gen.weight"
    folder = bare(synthetic_checkpoint, tmp_path / "nogen", (gone,))
    assert bv.inspect_checkpoint(folder, stage=1).problems() == []
    report = bv.inspect_checkpoint(folder, stage=2)
    assert report.missing == {"q_proj_moe_gen": [gone]}


@pytest.mark.parametrize(
    "drop_layer",
    [
        pytest.param("language_model.model.layers.27.", id="llm-has-27-layers"),
        pytest.param("vit_model.vision_model.encoder.layers.25.", id="vit-has-25-layers"),
    ],
)
def test_without_config_a_shallower_model_is_not_judged_by_the_manifest(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path, drop_layer: str
) -> None:
    drop = tuple(key for key in EMA if key.startswith(drop_layer))
    folder = bare(synthetic_checkpoint, tmp_path / "shallow", drop)
    report = bv.inspect_checkpoint(folder, stage=2)
    assert report.expected_from is None and report.missing == {}
    assert report.problems() == []


def test_without_config_a_model_with_keys_beyond_the_release_is_not_judged_by_it(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    folder = bare(synthetic_checkpoint, tmp_path / "deeper", ("connector.fc1.bias",))
    tensors = safetensors.torch.load_file(folder / "ema.safetensors")
    tensors["language_model.model.layers.28.input_layernorm.weight"] = torch.ones(1)
    save_tensors(folder / "ema.safetensors", tensors)
    report = bv.inspect_checkpoint(folder, stage=1)
    assert report.expected_from is None and report.missing == {}


def test_inspect_command_checks_completeness_by_the_manifest_without_config(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    """`bagelverify inspect` on a folder without config files used to call a checkpoint missing
    a key clean; it now uses the manifest as the API does, and says so."""
    import subprocess
    import sys

    gone = "vit_model.vision_model.encoder.layers.3.mlp.fc1.weight"
    folder = bare(synthetic_checkpoint, tmp_path / "nofc1", (gone,))
    done = subprocess.run(
        [sys.executable, "-m", "bagelverify", "inspect", str(folder), "--stage", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0, done.stdout
    assert "completeness checked against the shipped BAGEL-7B-MoT manifest" in done.stdout
    assert "vit.fc1: 1 key missing (layers 3)" in done.stdout
    whole = bare(synthetic_checkpoint, tmp_path / "whole", ())
    clean = subprocess.run(
        [sys.executable, "-m", "bagelverify", "inspect", str(whole), "--stage", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert clean.returncode == 0, clean.stdout + clean.stderr
