"""Weight selection in upstream training output folders: ema.safetensors or model.safetensors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from bagelverify.diff import diff_checkpoints
from bagelverify.rewrite import rewrite_checkpoint
from bagelverify.safetensors_io import save_tensors
from bagelverify.synthetic import SyntheticCheckpoint
from bagelverify.weights import choose_weights, open_weights


@pytest.fixture
def training_output(synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path) -> Path:
    """ema.safetensors (the synthetic values) and model.safetensors (every value doubled)."""
    folder = tmp_path / "out"
    shutil.copytree(synthetic_checkpoint.path, folder)
    tensors = load_file(folder / "ema.safetensors")
    save_tensors(folder / "model.safetensors", {k: v * 2 for k, v in tensors.items()})
    return folder


def test_default_is_ema_and_model_is_chosen_on_request(training_output: Path) -> None:
    assert choose_weights(training_output).path.name == "ema.safetensors"
    chosen = choose_weights(training_output, "model")
    assert chosen.path.name == "model.safetensors" and "asked for" in chosen.reason
    assert open_weights(training_output, "model").source.endswith("model.safetensors")
    diff = diff_checkpoints(training_output, training_output, weights_b="model")
    assert len(diff.differing_keys) == 1223  # the two files really are different weights


def test_a_folder_with_only_model_weights_needs_no_flag(training_output: Path) -> None:
    (training_output / "ema.safetensors").unlink()
    chosen = choose_weights(training_output)
    assert chosen.weights == "model" and "no ema.safetensors" in chosen.reason
    with pytest.raises(FileNotFoundError, match=r"no ema.safetensors \(weights='ema'\).*model"):
        choose_weights(training_output, "ema")
    with pytest.raises(ValueError, match="weights must be 'ema', 'model' or None"):
        choose_weights(training_output, "latest")


def test_model_index_is_read_and_rewrite_uses_the_chosen_weights(
    training_output: Path, tmp_path: Path
) -> None:
    report = rewrite_checkpoint(training_output, tmp_path / "m", weights="model")
    assert report.source.endswith("model.safetensors")
    model = load_file(training_output / "model.safetensors")
    assert load_file(tmp_path / "m" / "ema.safetensors").keys() == model.keys()
    # sharded model weights: model.safetensors.index.json and its shards, no ema.safetensors
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    save_tensors(sharded / "model-00001-of-00001.safetensors", model)
    index = {"weight_map": dict.fromkeys(model, "model-00001-of-00001.safetensors")}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    selected = open_weights(sharded)
    assert selected.choice.layout == "sharded" and len(selected.tensors) == 1223
    with pytest.raises(ValueError, match="is a file"):
        open_weights(training_output / "ema.safetensors", "model")
