"""BagelConfig.from_pretrained / save_pretrained: real Hugging Face field names, precise errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from bagelverify.config import CONFIG_FILES, BagelConfig
from bagelverify.errors import ConfigError
from bagelverify.families import expected_shapes
from bagelverify.manifest import load_manifest

RELEASE_FILES = {
    # the fields BAGEL-7B-MoT's files hold (Qwen2.5-7B, siglip-so400m-14-980), others omitted
    "llm_config.json": {
        "model_type": "qwen2",
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_attention_heads": 28,
        "num_hidden_layers": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "rope_theta": 1000000.0,
    },
    "vit_config.json": {
        "model_type": "siglip_vision_model",
        "hidden_size": 1152,
        "image_size": 980,
        "intermediate_size": 4304,
        "num_attention_heads": 16,
        "num_hidden_layers": 27,
        "patch_size": 14,
    },
    "config.json": {},
}


def write(folder: Path, files: dict[str, dict[str, object]]) -> Path:
    for name, document in files.items():
        (folder / name).write_text(json.dumps(document))
    return folder


def test_release_files_give_the_default_config_and_manifest_shapes(tmp_path: Path) -> None:
    config = BagelConfig.from_pretrained(write(tmp_path, RELEASE_FILES))
    assert config == BagelConfig()
    manifest = load_manifest()["ema.safetensors"]
    assert expected_shapes(config) == {k: spec.shape for k, spec in manifest.items()}


def test_save_pretrained_round_trips_and_uses_hf_names(tmp_path: Path) -> None:
    config = BagelConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, vae_z_channels=4
    )
    config.save_pretrained(tmp_path)
    assert BagelConfig.from_pretrained(tmp_path) == config
    llm = json.loads((tmp_path / "llm_config.json").read_text())
    assert llm["hidden_size"] == 64 and llm["num_key_value_heads"] == 2
    bagel = json.loads((tmp_path / "config.json").read_text())
    assert bagel["vae_config"] == {"z_channels": 4} and bagel["max_latent_size"] == 64


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_missing_file_is_named(tmp_path: Path, name: str) -> None:
    write(tmp_path, RELEASE_FILES)
    (tmp_path / name).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / name))):
        BagelConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("file", "field", "value", "message"),
    [
        ("llm_config.json", "vocab_size", None, "required field 'vocab_size' is missing"),
        ("vit_config.json", "patch_size", None, "required field 'patch_size' is missing"),
        (
            "llm_config.json",
            "hidden_size",
            "3584",
            "field 'hidden_size' must be a positive integer",
        ),
        ("vit_config.json", "image_size", 0, "field 'image_size' must be a positive integer"),
        ("config.json", "max_latent_size", True, "field 'max_latent_size' must be a positive"),
        (
            "llm_config.json",
            "num_key_value_heads",
            5,
            "not a multiple of llm_config.json num_key_value_heads 5",
        ),
        ("config.json", "vit_rope", 1, "field 'vit_rope' must be true or false, got 1"),
    ],
)
def test_bad_field_names_file_and_field(
    tmp_path: Path, file: str, field: str, value: object, message: str
) -> None:
    files = {name: dict(document) for name, document in RELEASE_FILES.items()}
    if value is None:
        del files[file][field]
    else:
        files[file][field] = value
    write(tmp_path, files)
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        BagelConfig.from_pretrained(tmp_path)
    if "multiple" not in message:
        assert str(tmp_path / file) in str(info.value)


def test_invalid_json_is_named(tmp_path: Path) -> None:
    write(tmp_path, RELEASE_FILES)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'config.json'}: not valid")):
        BagelConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("[]")
    with pytest.raises(ConfigError, match="expected a JSON object, got list"):
        BagelConfig.from_pretrained(tmp_path)


def test_constructor_rejects_non_positive_sizes() -> None:
    with pytest.raises(ConfigError, match=r"BagelConfig\.vocab_size must be a positive int"):
        BagelConfig(vocab_size=0)


def test_vit_rope_is_read_and_written_only_when_set(tmp_path: Path) -> None:
    """The rope flag round-trips; a rope-free config writes the release's files unchanged."""
    files = {name: dict(document) for name, document in RELEASE_FILES.items()}
    files["config.json"]["vit_rope"] = True
    assert BagelConfig.from_pretrained(write(tmp_path, files)) == BagelConfig(vit_rope=True)
    (tmp_path / "on").mkdir()
    (tmp_path / "off").mkdir()
    BagelConfig(vit_rope=True).save_pretrained(tmp_path / "on")
    BagelConfig().save_pretrained(tmp_path / "off")
    assert json.loads((tmp_path / "on/config.json").read_text())["vit_rope"] is True
    assert "vit_rope" not in json.loads((tmp_path / "off/config.json").read_text())
    assert BagelConfig.from_pretrained(tmp_path / "on").vit_rope is True
    with pytest.raises(ConfigError, match=r"BagelConfig\.vit_rope must be a bool, got 1"):
        BagelConfig(vit_rope=1)  # type: ignore[arg-type]
