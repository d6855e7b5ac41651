"""Weight selection in upstream training output folders: ema.safetensors or model.safetensors,
on every loader and command (``weights=`` / ``--weights``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_cli import bv

import bagelverify as bv_api
from bagelverify.checkpoint import (
    choose_weights,
    convert_checkpoint,
    inspect_checkpoint,
    load_bagel_checkpoint_state_dict,
    load_into,
    open_checkpoint,
    open_weights,
    save_bagel_checkpoint,
)
from bagelverify.diff import diff_checkpoints
from bagelverify.distributed import dcp_to_hf, hf_to_dcp, load_bagel_checkpoint_distributed
from bagelverify.rewrite import rewrite_checkpoint
from bagelverify.safetensors_io import save_tensors
from bagelverify.synthetic import SyntheticCheckpoint


@pytest.fixture
def training_output(synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path) -> Path:
    """ema.safetensors (the synthetic values) and model.safetensors (every value doubled)."""
    folder = tmp_path / "out"
    shutil.copytree(synthetic_checkpoint.path, folder)
    tensors = load_file(folder / "ema.safetensors")
    save_tensors(folder / "model.safetensors", {k: v * 2 for k, v in tensors.items()})
    return folder


def _doubled(ema: dict[str, torch.Tensor], model: dict[str, torch.Tensor]) -> bool:
    """Every tensor of ``model`` is its ``ema`` twin times two (and the key sets agree)."""
    return ema.keys() == model.keys() and all(torch.equal(ema[k] * 2, model[k]) for k in ema)


def test_default_is_ema_and_model_is_chosen_on_request(training_output: Path) -> None:
    path, why = choose_weights(training_output)
    assert path.name == "ema.safetensors" and why == "ema.safetensors (the default)"
    path, why = choose_weights(training_output, "model")
    assert path.name == "model.safetensors" and "weights='model'" in why
    assert open_weights(training_output, "model").source.endswith("model.safetensors")
    diff = diff_checkpoints(training_output, training_output, weights_b="model")
    assert len(diff.differing_keys) == 1223  # the two files really are different weights


def test_every_loader_reads_the_weights_it_is_asked_for(training_output: Path) -> None:
    ema = load_bagel_checkpoint_state_dict(training_output, stage=2)
    model = load_bagel_checkpoint_state_dict(training_output, stage=2, weights="model")
    assert _doubled(ema, model)
    into = {key: torch.empty_like(value) for key, value in ema.items()}
    load_into(into, training_output, stage=2, weights="model")
    assert _doubled(ema, into)
    result = load_bagel_checkpoint_distributed(into, training_output, stage=2, weights="ema")
    assert not result.missing_keys and _doubled(into, model)  # back to the EMA values
    report = inspect_checkpoint(training_output, weights="model")
    assert report.source.endswith("model.safetensors")
    assert report.weights == "model.safetensors (weights='model')"
    assert report.as_dict()["weights"] == report.weights


def test_conversions_read_the_weights_they_are_asked_for(
    training_output: Path, tmp_path: Path
) -> None:
    ema = load_bagel_checkpoint_state_dict(training_output, stage=2)
    convert_checkpoint(training_output, tmp_path / "hf", weights="model")
    assert _doubled(ema, load_bagel_checkpoint_state_dict(tmp_path / "hf", stage=2))
    hf_to_dcp(training_output, tmp_path / "dcp", weights="model")
    dcp_to_hf(tmp_path / "dcp", tmp_path / "back")
    assert _doubled(ema, load_bagel_checkpoint_state_dict(tmp_path / "back", stage=2))


def test_a_folder_with_only_model_weights_loads_without_a_flag(training_output: Path) -> None:
    ema = load_bagel_checkpoint_state_dict(training_output, stage=2)
    (training_output / "ema.safetensors").unlink()
    path, why = choose_weights(training_output)
    assert path.name == "model.safetensors" and "no ema.safetensors in the folder" in why
    assert _doubled(ema, load_bagel_checkpoint_state_dict(training_output, stage=2))
    assert inspect_checkpoint(training_output).weights == why
    with pytest.raises(FileNotFoundError, match=r"no ema.safetensors \(weights='ema'\).*model"):
        load_bagel_checkpoint_state_dict(training_output, weights="ema")
    with pytest.raises(ValueError, match=r"weights must be 'ema'.*got 'latest'"):
        load_bagel_checkpoint_state_dict(training_output, weights="latest")


def test_the_model_index_is_read_beside_ema_when_asked(
    training_output: Path, tmp_path: Path
) -> None:
    """weights='model' selects model.safetensors.index.json and its shards even where
    ema.safetensors exists (the default still reads ema.safetensors)."""
    model = load_file(training_output / "model.safetensors")
    (training_output / "model.safetensors").unlink()
    save_tensors(training_output / "model-00001-of-00001.safetensors", model)
    index = {"weight_map": dict.fromkeys(model, "model-00001-of-00001.safetensors")}
    (training_output / "model.safetensors.index.json").write_text(json.dumps(index))
    files = open_checkpoint(training_output, weights="model")
    assert files.layout == "sharded" and len(files.tensors) == 1223
    assert files.source.endswith("model.safetensors.index.json")
    assert open_checkpoint(training_output).source.endswith("ema.safetensors")
    loaded = load_bagel_checkpoint_state_dict(training_output, stage=2, weights="model")
    assert _doubled(load_bagel_checkpoint_state_dict(training_output, stage=2), loaded)
    report = rewrite_checkpoint(training_output, tmp_path / "m", weights="model")
    assert report.source.endswith("model.safetensors.index.json")
    with pytest.raises(ValueError, match="is a file"):
        open_weights(training_output / "ema.safetensors", "model")


def test_a_sharded_save_refuses_a_folder_whose_model_file_would_shadow_it(
    training_output: Path,
) -> None:
    (training_output / "ema.safetensors").unlink()
    state = load_bagel_checkpoint_state_dict(training_output, stage=2)
    with pytest.raises(FileExistsError, match=r"model\.safetensors exists and would shadow"):
        save_bagel_checkpoint(state, training_output, max_shard_size="1MB", overwrite=True)


def test_inspect_and_convert_take_weights_on_the_command_line(
    training_output: Path, tmp_path: Path
) -> None:
    shown = bv("inspect", training_output, "--weights", "model", "--headers-only")
    assert shown.returncode == 0, shown.stderr
    assert "weights: model.safetensors (weights='model')" in shown.stdout
    as_json = json.loads(bv("inspect", training_output, "--json").stdout)
    assert as_json["report"]["weights"] == "ema.safetensors (the default)"
    done = bv(
        "convert", training_output, tmp_path / "dst", "--stage", 2, "--weights", "model", "--json"
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["weights"] == "model.safetensors (weights='model')"
    ema = load_bagel_checkpoint_state_dict(training_output, stage=2)
    assert _doubled(ema, bv_api.load_bagel_checkpoint_state_dict(tmp_path / "dst", stage=2))
    refused = bv(
        "convert",
        training_output,
        tmp_path / "x",
        "--stage",
        2,
        "--from",
        "dcp",
        "--weights",
        "ema",
    )
    assert refused.returncode == 2 and "drop --weights" in refused.stderr


def test_a_folder_without_weights_names_what_it_looked_for_and_its_visible_files(
    tmp_path: Path,
) -> None:
    """The message lists the folder's own safetensors files, not a killed save's hidden
    temporary files."""
    save_tensors(tmp_path / "model-00001-of-00002.safetensors", {"x": torch.zeros(1)})
    (tmp_path / ".model-00002-of-00002.safetensors.bagelverify-0123.tmp").write_bytes(b"")
    with pytest.raises(FileNotFoundError) as default:
        open_checkpoint(tmp_path)
    message = str(default.value)
    assert message.startswith(f"{tmp_path / 'ema.safetensors'}: not found, and no model.")
    assert "it holds model-00001-of-00002.safetensors." in message
    assert ".tmp" not in message
    with pytest.raises(FileNotFoundError, match=r"\(weights='ema'\); it holds model-0.*--weights"):
        open_checkpoint(tmp_path, weights="ema")


def test_inspect_of_a_dcp_folder_refuses_weights(training_output: Path, tmp_path: Path) -> None:
    hf_to_dcp(training_output, tmp_path / "dcp", stage=2)
    refused = bv("inspect", tmp_path / "dcp", "--weights", "model")
    assert refused.returncode == 2
    assert "is a DCP checkpoint" in refused.stderr and "drop --weights" in refused.stderr
