"""``repair_checkpoint`` and ``bagelverify repair``: fill what SRC lacks from BASE, never more."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from bagelverify import load_bagel_checkpoint_state_dict, make_synthetic_checkpoint
from bagelverify.config import BagelConfig
from bagelverify.errors import MissingKeysError, ShapeMismatchError, UnknownKeysError
from bagelverify.families import FAMILIES
from bagelverify.manifest import load_manifest
from bagelverify.repair import repair_checkpoint
from bagelverify.safetensors_io import read_header, save_tensors
from bagelverify.synthetic import SyntheticCheckpoint

KEYS = list(load_manifest()["ema.safetensors"])
ENUMERATED = [f.name for f in FAMILIES if f.shape is not None]


def raw_tensors(path: Path) -> dict[str, bytes]:
    """HF key -> the stored bytes of every tensor of a folder's single model file."""
    file = path / "ema.safetensors"
    data = file.read_bytes()
    return {
        key.removeprefix("model."): data[info.start : info.end]
        for key, info in read_header(file).tensors.items()
    }


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> SyntheticCheckpoint:
    """A complete checkpoint whose values differ from the session fixture's (seed 1)."""
    return make_synthetic_checkpoint(tmp_path_factory.mktemp("base"), scale=64, seed=1)


def _without(
    synthetic: SyntheticCheckpoint, folder: Path, drop: set[str], *, root: str = ""
) -> Path:
    tensors = load_file(synthetic.path / "ema.safetensors")
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(
        folder / "ema.safetensors",
        {root + k: v for k, v in tensors.items() if k not in drop},
    )
    synthetic.config.save_pretrained(folder)
    return folder


@settings(max_examples=6, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    families=st.sets(st.sampled_from(ENUMERATED), max_size=4),
    keys=st.sets(st.sampled_from(KEYS), max_size=5),
    stage=st.sampled_from(["stage1", "stage2"]),
)
def test_repair_output_contains_src_unchanged_and_loads_strictly(
    synthetic_checkpoint: SyntheticCheckpoint,
    base: SyntheticCheckpoint,
    tmp_path_factory: pytest.TempPathFactory,
    families: set[str],
    keys: set[str],
    stage: str,
) -> None:
    """Invariant: output keys ⊇ SRC keys, SRC's bytes unchanged, every other key the stage
    expects comes from BASE byte for byte, and the output loads strictly for the stage."""
    by_name = {f.name: f for f in FAMILIES}
    config = synthetic_checkpoint.config
    drop = set(keys)
    for name in families:
        drop |= set(by_name[name].expected_shapes(config))
    work = tmp_path_factory.mktemp("repair")
    src = _without(synthetic_checkpoint, work / "src", drop)
    report = repair_checkpoint(src, base=base.path, out=work / "out", stage=stage)
    out, before, donor = raw_tensors(work / "out"), raw_tensors(src), raw_tensors(base.path)
    assert {k: out[k] for k in before} == before  # ⊇ SRC, bytes unchanged
    filled = set(out) - set(before)
    assert filled == set(report.filled) and filled <= drop
    assert all(out[k] == donor[k] for k in filled)
    load_bagel_checkpoint_state_dict(work / "out", stage=stage)  # strict by default
    assert (work / "out" / "ae.safetensors").is_file()
    assert report.vae_from == str(base.path / "ae.safetensors")


def test_lost_vision_tower_is_filled_and_reported_by_family(
    synthetic_checkpoint: SyntheticCheckpoint, base: SyntheticCheckpoint, tmp_path: Path
) -> None:
    vit = {k for k in KEYS if k.startswith("vit_model.")}
    src = _without(synthetic_checkpoint, tmp_path / "src", vit, root="model.")
    plan = repair_checkpoint(src, base=base.path, out=tmp_path / "out", stage=1, dry_run=True)
    assert not (tmp_path / "out").exists() and plan.dry_run
    assert set(plan.filled) == vit and plan.from_base["vit.fc1"][0].endswith("0.mlp.fc1.weight")
    assert plan.from_source["connector.fc1"] == 2 and "vit.fc1" not in plan.from_source
    report = repair_checkpoint(src, base=base.path, out=tmp_path / "out", stage=1)
    header = read_header(tmp_path / "out" / "ema.safetensors").tensors
    assert all(key.startswith("model.") for key in header)  # SRC's native layout is kept
    assert report.as_dict()["from_base"]["vit.fc1"] == 2 * 26
    assert BagelConfig.from_pretrained(tmp_path / "out") == synthetic_checkpoint.config


def test_base_lacking_a_key_or_of_another_size_is_refused_before_writing(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    lost = "connector.fc2.weight"
    src = _without(synthetic_checkpoint, tmp_path / "src", {lost})
    holey = _without(synthetic_checkpoint, tmp_path / "holey", {lost})
    with pytest.raises(
        MissingKeysError, match=r"the base lacks 1 of the 1 key to fill: .*connector\.fc2"
    ):
        repair_checkpoint(src, base=holey, out=tmp_path / "out")
    other = make_synthetic_checkpoint(tmp_path / "other", scale=32, with_vae=False)
    with pytest.raises(
        ShapeMismatchError, match=r"connector\.fc2\.weight: expected \[56, 56\], found \[112, 112\]"
    ):
        repair_checkpoint(src, base=other.path, out=tmp_path / "out", config=src)
    vision = {
        key
        for key in load_file(synthetic_checkpoint.path / "ema.safetensors")
        if key.startswith("vit_model.")
    }
    src_without_vision = _without(synthetic_checkpoint, tmp_path / "novit", vision)
    with pytest.raises(ShapeMismatchError) as many:
        repair_checkpoint(src_without_vision, base=other.path, out=tmp_path / "out", config=src)
    message = str(many.value)
    assert f"{len(vision):,} base tensors to fill do not have the shape" in message
    assert "(and " in message and message.count("\n") == 0  # summarised on one line
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial")]


def test_src_problems_other_than_missing_keys_and_existing_out_are_refused(
    synthetic_checkpoint: SyntheticCheckpoint, base: SyntheticCheckpoint, tmp_path: Path
) -> None:
    tensors = load_file(synthetic_checkpoint.path / "ema.safetensors")
    tensors["vit_model.vision_model.encoder.layers.0.mlp.fc3.weight"] = tensors[
        "connector.fc1.bias"
    ]
    (tmp_path / "bad").mkdir()
    save_tensors(tmp_path / "bad" / "ema.safetensors", tensors)
    synthetic_checkpoint.config.save_pretrained(tmp_path / "bad")
    with pytest.raises(UnknownKeysError, match="fc3"):
        repair_checkpoint(tmp_path / "bad", base=base.path, out=tmp_path / "out")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        repair_checkpoint(synthetic_checkpoint.path, base=base.path, out=tmp_path / "full")


def test_cli_repair_dry_run_and_json(
    synthetic_checkpoint: SyntheticCheckpoint, base: SyntheticCheckpoint, tmp_path: Path
) -> None:
    src = _without(synthetic_checkpoint, tmp_path / "src", {"latent_pos_embed.pos_embed"})
    command = [sys.executable, "-m", "bagelverify", "repair", str(src), "--base", str(base.path)]
    dry = subprocess.run(
        [*command, "-o", str(tmp_path / "out"), "--dry-run"], capture_output=True, text=True
    )
    assert dry.returncode == 0, dry.stderr
    assert "would write" in dry.stdout and "latent_pos_embed" in dry.stdout
    assert not (tmp_path / "out").exists()
    done = subprocess.run(
        [*command, "-o", str(tmp_path / "out"), "--json"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert document["command"] == "repair" and document["filled_keys"] == [
        "latent_pos_embed.pos_embed"
    ]
    assert any(f["path"].endswith("ema.safetensors") and f["bytes"] > 0 for f in document["files"])
