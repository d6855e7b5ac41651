"""Composing a BAGEL initialisation from Qwen2 + SigLIP folders written by transformers.

The backbones are tiny models that transformers 5.18 builds and ``save_pretrained``s; the
comparison runs NeMo Automodel 0.7.0's own ``hf_backbones`` initialisation. Skipped (one line)
where transformers or Automodel is not installed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_json_schema import assert_valid

import bagelverify as bv
from bagelverify import backbones
from bagelverify.buckets import Bucket
from bagelverify.compose import ORIGINS_METADATA, compose_checkpoint, read_origins
from bagelverify.config import CONFIG_FILES, BagelConfig
from bagelverify.errors import (
    ConfigError,
    KeyCollisionError,
    MissingKeysError,
    ShapeMismatchError,
    UnknownKeysError,
)
from bagelverify.families import FAMILIES, FAMILY_BY_NAME, expected_shapes, und_twin
from bagelverify.pos_embed import POSITION_TABLE_KEYS
from bagelverify.safetensors_io import read_header, save_tensors

pytest.importorskip("transformers", reason="transformers not installed (the backbones' writer)")

needs_automodel = pytest.mark.skipif(
    importlib.util.find_spec("nemo_automodel") is None,
    reason="nemo_automodel not installed (pip install 'bagelverify[automodel]')",
)

LLM = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 96,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
}
VIT = {
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "patch_size": 14,
    "image_size": 56,
}
TEXT = {
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
}
CONFIG = BagelConfig(
    **LLM,
    vit_hidden_size=32,
    vit_intermediate_size=48,
    vit_num_hidden_layers=3,
    vit_num_attention_heads=2,
    vit_patch_size=14,
    vit_image_size=56,
)
"""The BagelConfig the tiny backbones make (BAGEL's own fields at the release's values)."""


def write_qwen2(
    folder: Path,
    *,
    seed: int = 1,
    dtype: torch.dtype = torch.float32,
    tied: bool = False,
    **sizes: Any,
) -> Path:
    import transformers

    torch.manual_seed(seed)
    config = transformers.Qwen2Config(**{**LLM, **sizes}, tie_word_embeddings=tied)
    transformers.Qwen2ForCausalLM(config).to(dtype).save_pretrained(folder)
    return folder


def write_siglip(
    folder: Path, *, full: bool, seed: int = 2, dtype: torch.dtype = torch.float32, **sizes: Any
) -> Path:
    import transformers

    torch.manual_seed(seed)
    vision = {**VIT, **sizes}
    if full:
        config = transformers.SiglipConfig(
            vision_config=vision, text_config={**TEXT, "vocab_size": 100}
        )
        model: Any = transformers.SiglipModel(config)
    else:
        model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**vision))
    model.to(dtype).save_pretrained(folder)
    return folder


def edited(
    source: Path, target: Path, edit: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
) -> Path:
    """A copy of a backbone folder whose tensors ``edit`` changed (its config.json kept)."""
    import safetensors.torch

    target.mkdir()
    tensors = safetensors.torch.load_file(str(source / "model.safetensors"))
    save_tensors(target / "model.safetensors", edit(tensors))
    (target / "config.json").write_text((source / "config.json").read_text())
    return target


def prefixed(source: Path, target: Path, prefix: str) -> Path:
    """A copy of a vision-only folder with its keys under ``prefix`` (the hub's layout)."""
    return edited(source, target, lambda tensors: {prefix + k: v for k, v in tensors.items()})


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("backbones")
    vision = write_siglip(root / "siglip-vision", full=False)
    return {
        "llm": write_qwen2(root / "qwen2"),
        "full": write_siglip(root / "siglip-full", full=True),
        "vision": vision,
        "vision-prefixed": prefixed(vision, root / "siglip-vision-prefixed", "vision_model."),
    }


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    import safetensors.torch

    return safetensors.torch.load_file(str(folder / "ema.safetensors"))


@pytest.fixture(scope="module")
def composed(folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("composed") / "bagel"
    compose_checkpoint(llm=folders["llm"], vit=folders["full"], out=out, seed=7)
    return out


# -- the table ---------------------------------------------------------------------------------


def test_every_bagel_family_has_exactly_one_rule() -> None:
    """Invariant: every UND/GEN family is copied from a backbone, filled, or refused, once."""
    for family in FAMILIES:
        if family.bucket not in (Bucket.UND, Bucket.GEN):
            continue
        rules = [
            family.name in backbones.COPIED,
            backbones.fill_of(family) is not None,
            family.name in backbones.UNSUPPORTED,
        ]
        assert sum(rules) == 1, family.name
    assert set(backbones.SEED_ORDER) <= {
        name for name, fill in backbones.FILLED.items() if fill in ("seeded", "zeros")
    }


@pytest.mark.parametrize(
    ("backbone", "key", "bagel_key", "convert"),
    [
        (
            "llm",
            "model.layers.1.mlp.up_proj.weight",
            "language_model.model.layers.1.mlp.up_proj.weight",
            False,
        ),
        ("llm", "lm_head.weight", "language_model.lm_head.weight", False),
        ("llm", "model.norm.weight", "language_model.model.norm.weight", False),
        (
            "vit",
            "vision_model.encoder.layers.1.mlp.fc1.bias",
            "vit_model.vision_model.encoder.layers.1.mlp.fc1.bias",
            False,
        ),
        (
            "vit",
            "encoder.layers.0.self_attn.out_proj.weight",
            "vit_model.vision_model.encoder.layers.0.self_attn.out_proj.weight",
            False,
        ),
        (
            "vit",
            "embeddings.patch_embedding.weight",
            "vit_model.vision_model.embeddings.patch_embedding.weight",
            True,
        ),
        (
            "vit",
            "vision_model.embeddings.patch_embedding.bias",
            "vit_model.vision_model.embeddings.patch_embedding.bias",
            False,
        ),
    ],
)
def test_backbone_keys_route_to_their_bagel_keys(
    backbone: backbones.Backbone, key: str, bagel_key: str, convert: bool
) -> None:
    routed = backbones.route(backbone, key, CONFIG)
    assert routed is not None and (routed.bagel_key, routed.convert) == (bagel_key, convert)


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("vision_model.head.probe", "pooling head"),
        ("head.mlp.fc1.weight", "pooling head"),
        ("text_model.encoder.layers.0.mlp.fc1.weight", "text tower"),
        ("logit_scale", "logit scale"),
        ("vision_model.encoder.layers.2.mlp.fc1.weight", "past vit_select_layer"),
    ],
)
def test_dropped_backbone_keys_say_why(key: str, reason: str) -> None:
    routed = backbones.route("vit", key, CONFIG)
    assert routed is not None and routed.bagel_key is None and reason in (routed.reason or "")


@pytest.mark.parametrize(
    ("backbone", "key"),
    [
        ("llm", "model.layers.0.self_attn.q_norm.weight"),  # Qwen3's, not Qwen2's
        ("llm", "vision_model.post_layernorm.weight"),  # a SigLIP key given as the LLM
        ("vit", "vision_model.encoder.layers.0.mlp.fc3.weight"),
        ("vit", "vision_model.head"),
        ("llm", "model.layers.٣.mlp.up_proj.weight"),  # a non-ASCII digit
    ],
)
def test_a_key_of_no_family_routes_nowhere(backbone: backbones.Backbone, key: str) -> None:
    assert backbones.route(backbone, key, CONFIG) is None


# -- composing from the real layouts ----------------------------------------------------------


def test_composed_checkpoint_loads_strictly_for_stage2_with_the_backbones_config(
    composed: Path,
) -> None:
    assert BagelConfig.from_pretrained(composed) == CONFIG
    assert bv.inspect_checkpoint(composed, stage="stage2").problems(strict=True) == []
    loaded = bv.load_bagel_checkpoint_state_dict(composed, stage="stage2", strict=True)
    assert set(loaded) == {"model." + k for k in expected_shapes(CONFIG)}
    llm = json.loads((composed / "llm_config.json").read_text())
    assert llm["qk_norm"] is True and llm["rms_norm_eps"] == 1e-6  # the Qwen2 fields are kept
    assert not (composed / "ae.safetensors").exists()


@pytest.mark.parametrize("vit", ["full", "vision", "vision-prefixed"])
def test_backbone_tensors_are_copied_byte_for_byte_and_the_patch_weight_permuted(
    folders: dict[str, Path], vit: str, tmp_path: Path
) -> None:
    import safetensors.torch

    report = compose_checkpoint(llm=folders["llm"], vit=folders[vit], out=tmp_path / "out")
    out = tensors_of(tmp_path / "out")
    sources = {
        "llm": safetensors.torch.load_file(str(folders["llm"] / "model.safetensors")),
        "vit": safetensors.torch.load_file(str(folders[vit] / "model.safetensors")),
    }
    copied = 0
    for key, origin in report.origins.items():
        if origin.kind not in ("llm", "vit"):
            continue
        assert origin.source is not None
        source = sources[origin.kind][origin.source]
        if origin.convert:
            source = source.permute(0, 2, 3, 1).reshape(source.shape[0], -1)
        assert out[key].dtype == source.dtype
        assert out[key].view(torch.uint8).equal(source.contiguous().view(torch.uint8)), key
        copied += 1
    # every LLM tensor; the ViT's patch (2) and position (1) embeddings, 16 tensors of each of
    # its first 2 layers (the last of 3 is dropped) and the post-layernorm (2); not the head
    assert report.counts() == {**report.counts(), "llm": len(sources["llm"]), "vit": 37}
    assert copied == len(sources["llm"]) + 37


def test_every_tensors_origin_is_in_the_report_and_the_file_metadata(composed: Path) -> None:
    header = read_header(composed / "ema.safetensors")
    origins = read_origins(header.metadata)
    assert set(origins) == set(header.tensors)
    assert origins["language_model.model.layers.0.self_attn.q_proj_moe_gen.weight"] == (
        "twin:language_model.model.layers.0.self_attn.q_proj.weight"
    )
    assert origins["vit_model.vision_model.embeddings.patch_embedding.weight"] == (
        "vit:vision_model.embeddings.patch_embedding.weight (conv_to_linear)"
    )
    assert origins["language_model.model.layers.1.self_attn.k_norm.weight"] == "ones"
    assert origins["connector.fc2.bias"] == "seeded"
    assert origins["llm2vae.weight"] == "zeros"
    assert origins["latent_pos_embed.pos_embed"] == "sincos"
    assert ORIGINS_METADATA in header.metadata


def test_twins_norms_and_tables_hold_what_the_rules_say(composed: Path) -> None:
    """Invariant: every *_moe_gen twin equals its UND tensor; QK norms are ones; llm2vae is
    zero; both position tables equal the independent float64 formula of test_pos_embed."""
    from test_pos_embed import reference

    tensors = tensors_of(composed)
    twins = 0
    for key, value in tensors.items():
        und = und_twin(key)
        if und is not None:
            assert torch.equal(value, tensors[und]), key
            twins += 1
    assert twins == sum(1 for f in FAMILIES if f.twin for _ in f.keys(CONFIG))
    for key, value in tensors.items():
        if ".q_norm" in key or ".k_norm" in key:
            assert torch.equal(value, torch.ones_like(value)), key
    assert not tensors["llm2vae.weight"].any() and not tensors["llm2vae.bias"].any()
    for key in POSITION_TABLE_KEYS:
        side = int(tensors[key].shape[0] ** 0.5)
        expected = torch.from_numpy(reference(side, CONFIG.hidden_size))
        assert torch.allclose(tensors[key], expected, rtol=0, atol=1e-7), key


@given(seed=st.integers(0, 2**32 - 1))
@settings(max_examples=5, deadline=None)
def test_the_seeded_modules_are_kaiming_uniform_within_their_bounds(seed: int) -> None:
    """Invariant: every seeded weight and bias lies in ±1/sqrt(fan_in), and a seed decides them."""
    from bagelverify.compose import seeded_values

    values = seeded_values(CONFIG, seed, torch.float32)
    again = seeded_values(CONFIG, seed, torch.float32)
    for name in backbones.SEED_ORDER:
        family = FAMILY_BY_NAME[name]
        weight = values[family.template.format(param="weight")]
        bias = values[family.template.format(param="bias")]
        bound = 1 / weight.shape[1] ** 0.5
        assert weight.abs().max() <= bound and bias.abs().max() <= bound
        if backbones.FILLED[name] == "seeded":
            assert weight.std() > bound / 4
    assert all(torch.equal(values[k], again[k]) for k in values)


def test_composing_twice_gives_identical_bytes(folders: dict[str, Path], tmp_path: Path) -> None:
    """Invariant: the same backbones and seed give the same files, byte for byte."""
    digests = []
    for name in ("a", "b"):
        report = compose_checkpoint(
            llm=folders["llm"], vit=folders["vision"], out=tmp_path / name, seed=3
        )
        digests.append(
            {Path(f).name: hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in report.files}
        )
    assert digests[0] == digests[1] and len(digests[0]) == 4
    other = compose_checkpoint(
        llm=folders["llm"], vit=folders["vision"], out=tmp_path / "c", seed=4
    )
    assert (
        hashlib.sha256(Path(other.files[0]).read_bytes()).hexdigest()
        != digests[0]["ema.safetensors"]
    )


def test_a_dry_run_checks_and_writes_nothing(folders: dict[str, Path], tmp_path: Path) -> None:
    report = compose_checkpoint(
        llm=folders["llm"], vit=folders["full"], out=tmp_path / "out", dry_run=True
    )
    assert not (tmp_path / "out").exists() and report.files == []
    assert report.bytes == sum(4 * torch.Size(s).numel() for s in expected_shapes(CONFIG).values())
    assert report.dropped_counts()[backbones.PAST_SELECT_LAYER] == 16


# -- wrong input: one clear error, nothing written --------------------------------------------


def test_a_backbone_of_another_size_names_the_config_field(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=r"llm_config\.json hidden_size: the config says 128, "):
        compose_checkpoint(
            llm=folders["llm"],
            vit=folders["full"],
            out=tmp_path / "out",
            config=dataclasses.replace(CONFIG, hidden_size=128),
        )
    assert not (tmp_path / "out").exists()


def test_tensors_of_another_size_than_their_config_name_the_field(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    """A folder whose config.json says one size and whose tensors are another."""
    bad = edited(
        folders["llm"],
        tmp_path / "bad",
        lambda t: {**t, "model.embed_tokens.weight": torch.zeros(128, 32)},
    )
    with pytest.raises(ShapeMismatchError) as info:
        compose_checkpoint(llm=bad, vit=folders["full"], out=tmp_path / "out")
    message = str(info.value)
    assert "llm:model.embed_tokens.weight: [128, 32], expected [128, 64]" in message
    assert "llm_config.json hidden_size = 64" in message
    assert message.count("\n") < 6 and not (tmp_path / "out").exists()


def test_a_vision_tower_with_more_layers_than_the_config_names_num_hidden_layers(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    deeper = write_siglip(tmp_path / "deeper", full=False, num_hidden_layers=5)
    with pytest.raises(ConfigError, match=r"vit_config\.json num_hidden_layers: the config says 3"):
        compose_checkpoint(llm=folders["llm"], vit=deeper, out=tmp_path / "out", config=CONFIG)


def test_a_layer_beyond_the_folders_own_config_names_num_hidden_layers(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    extra = {"model.layers.2.input_layernorm.weight": torch.ones(64)}
    deeper = edited(folders["llm"], tmp_path / "deeper", lambda t: {**t, **extra})
    with pytest.raises(ShapeMismatchError) as info:
        compose_checkpoint(llm=deeper, vit=folders["full"], out=tmp_path / "out")
    assert "llm_config.json num_hidden_layers = 2" in str(info.value)
    assert "llm:model.layers.2.input_layernorm.weight: [64], a layer the config does not" in str(
        info.value
    )


def test_a_backbone_key_that_maps_nowhere_is_named(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    odd = edited(
        folders["vision"],
        tmp_path / "odd",
        lambda t: {**t, "encoder.layers.0.mlp.fc3.weight": torch.zeros(2)},
    )
    with pytest.raises(UnknownKeysError, match=r"1 backbone key maps to no BAGEL key") as info:
        compose_checkpoint(llm=folders["llm"], vit=odd, out=tmp_path / "out")
    assert info.value.keys == ["vit:encoder.layers.0.mlp.fc3.weight"]
    assert not (tmp_path / "out").exists()


def test_a_tied_qwen2_gets_lm_head_from_its_embeddings(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    import safetensors.torch

    tied = write_qwen2(tmp_path / "tied", tied=True)
    assert "lm_head.weight" not in safetensors.torch.load_file(str(tied / "model.safetensors"))
    report = compose_checkpoint(llm=tied, vit=folders["full"], out=tmp_path / "out")
    assert report.origins["language_model.lm_head.weight"].describe() == (
        "llm:model.embed_tokens.weight"
    )
    out = tensors_of(tmp_path / "out")
    assert torch.equal(
        out["language_model.lm_head.weight"], out["language_model.model.embed_tokens.weight"]
    )
    assert (
        json.loads((tmp_path / "out" / "llm_config.json").read_text())["tie_word_embeddings"]
        is False
    )


def test_fields_a_config_leaves_out_take_the_hf_default_and_are_listed(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    sparse = edited(folders["vision"], tmp_path / "sparse", dict)
    document = json.loads((sparse / "config.json").read_text())
    del document["num_channels"]  # older transformers wrote only non-default fields
    (sparse / "config.json").write_text(json.dumps(document))
    report = compose_checkpoint(llm=folders["llm"], vit=sparse, out=tmp_path / "o", dry_run=True)
    assert report.defaulted == ["vit:num_channels"] and report.config.vit_num_channels == 3


def test_a_folder_without_safetensors_says_what_compose_reads(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    binary = tmp_path / "binary"
    binary.mkdir()
    (binary / "config.json").write_text((folders["llm"] / "config.json").read_text())
    (binary / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors and no model\.safe"):
        compose_checkpoint(llm=binary, vit=folders["full"], out=tmp_path / "out")


def test_a_rope_config_is_refused(folders: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="vit_rope=True: a SigLIP backbone has a learned"):
        compose_checkpoint(
            llm=folders["llm"],
            vit=folders["full"],
            out=tmp_path / "out",
            config=dataclasses.replace(CONFIG, vit_rope=True),
        )


def test_backbones_given_the_wrong_way_round_are_refused(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="model_type is 'siglip', expected qwen2"):
        compose_checkpoint(llm=folders["full"], vit=folders["llm"], out=tmp_path / "out")


def test_a_folder_mixing_both_vision_roots_and_a_missing_tensor_are_refused(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    mixed = edited(
        folders["vision"],
        tmp_path / "mixed",
        lambda t: {**t, "vision_model.post_layernorm.weight": t["post_layernorm.weight"]},
    )
    with pytest.raises(KeyCollisionError, match=r"vision_model\.post_layernorm\.weight"):
        compose_checkpoint(llm=folders["llm"], vit=mixed, out=tmp_path / "out")
    halves = edited(
        folders["vision"],
        tmp_path / "halves",
        lambda t: {
            ("vision_model." if k.startswith("embeddings.") else "") + k: v for k, v in t.items()
        },
    )
    with pytest.raises(KeyCollisionError, match=r"two ways.*'vit:vision_model\.embeddings"):
        compose_checkpoint(llm=folders["llm"], vit=halves, out=tmp_path / "out")
    lacking = edited(
        folders["vision"],
        tmp_path / "lacking",
        lambda t: {k: v for k, v in t.items() if k != "post_layernorm.bias"},
    )
    with pytest.raises(MissingKeysError, match=r"vit_model\.vision_model\.post_layernorm\.bias"):
        compose_checkpoint(llm=folders["llm"], vit=lacking, out=tmp_path / "out")


# -- against NeMo Automodel's own hf_backbones initialisation -------------------------------


def _automodel_build(config: BagelConfig, dtype: torch.dtype) -> Any:
    """Automodel's stage-2 BAGEL model for ``config``, every tensor NaN (so a tensor nothing
    fills shows)."""
    from bagelverify.integrations import automodel

    model_module = importlib.import_module("nemo_automodel.components.models.bagel.model")
    with torch.device("meta"):
        model = model_module.BagelForUnifiedMultimodal(
            automodel.automodel_config(config, stage="stage2")
        )
    model = model.to(dtype).to_empty(device="cpu")
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.fill_(float("nan"))
    return model


def automodels_own(llm: Path, vit: Path, config: BagelConfig, seed: int, dtype: torch.dtype) -> Any:
    """Automodel's recipe order: the non-backbone init with the seed, then its backbone load."""
    from bagelverify.integrations import automodel

    loader = automodel.automodel_originals()
    model = _automodel_build(config, dtype)
    loader["initialize_bagel_non_backbone_weights"](model, seed=seed)
    loader["load_bagel_hf_backbone_weights"](
        model, {"llm_path": str(llm), "vit_path": str(vit), "visual_und": True}
    )
    return model


@needs_automodel
@pytest.mark.parametrize("vit", ["full", "vision-prefixed"])
def test_composed_equals_automodels_own_hf_backbones_initialisation(
    folders: dict[str, Path], vit: str, tmp_path: Path
) -> None:
    """Tensor for tensor (F32 backbones, F32 model, same seed): Automodel's
    load_bagel_hf_backbone_weights + initialize_bagel_non_backbone_weights, and our file loaded
    strictly into the same model with bagelverify."""
    compose_checkpoint(llm=folders["llm"], vit=folders[vit], out=tmp_path / "out", seed=11)
    theirs = automodels_own(folders["llm"], folders[vit], CONFIG, 11, torch.float32).state_dict()
    ours_model = _automodel_build(CONFIG, torch.float32)
    bv.load_into(ours_model.state_dict(), tmp_path / "out", stage="stage2", strict=True)
    ours = ours_model.state_dict()
    assert set(ours) == set(theirs)
    differ = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert differ == []
    assert not any(t.isnan().any() for t in ours.values())


@needs_automodel
def test_automodel_loads_nothing_from_a_transformers5_vision_folder_compose_maps_it(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    """transformers 5 saves SiglipVisionModel keys without vision_model.: Automodel's loader
    (strict=False) leaves the whole vision tower unfilled; compose maps every key."""
    theirs = automodels_own(folders["llm"], folders["vision"], CONFIG, 0, torch.float32)
    unfilled = [k for k, t in theirs.state_dict().items() if t.isnan().any()]
    assert unfilled and all(k.startswith("model.vit_model.") for k in unfilled)
    report = compose_checkpoint(llm=folders["llm"], vit=folders["vision"], out=tmp_path / "o")
    assert report.counts()["vit"] == len(unfilled)


@needs_automodel
def test_bf16_backbones_compose_equal_to_automodels_own_in_a_bf16_model(tmp_path: Path) -> None:
    """The seeded modules drawn in BF16 and the tables rounded to BF16 match Automodel's too."""
    llm = write_qwen2(tmp_path / "qwen2", dtype=torch.bfloat16)
    vit = write_siglip(tmp_path / "siglip", full=True, dtype=torch.bfloat16)
    report = compose_checkpoint(llm=llm, vit=vit, out=tmp_path / "out", seed=5)
    assert report.dtype == "BF16"
    theirs = automodels_own(llm, vit, CONFIG, 5, torch.bfloat16).state_dict()
    model = _automodel_build(CONFIG, torch.bfloat16)
    bv.load_into(model.state_dict(), tmp_path / "out", stage="stage2", strict=True)
    ours = model.state_dict()
    assert [k for k in ours if not torch.equal(ours[k], theirs[k])] == []


# -- the command line --------------------------------------------------------------------------


def test_cli_compose_json_lists_every_origin_and_writes_the_folder(
    folders: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bagelverify import cli

    out = tmp_path / "out"
    words = ["compose", "--llm", str(folders["llm"]), "--vit", str(folders["vision"])]
    assert cli.main([*words, "-o", str(out), "--seed", "2", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert_valid(document, "compose")  # the envelope, then exactly docs/json.md's fields
    assert set(document["origins"]) == set(expected_shapes(CONFIG))
    assert document["files"] == [str(out / n) for n in ("ema.safetensors", *CONFIG_FILES)]
    assert read_origins(read_header(out / "ema.safetensors").metadata) == document["origins"]
    assert cli.main([*words, "-o", str(tmp_path / "dry"), "--dry-run"]) == 0
    assert "would compose 111 tensors" in capsys.readouterr().out
    assert not (tmp_path / "dry").exists()


def test_cli_compose_of_a_wrong_size_exits_1_with_one_line(
    folders: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bagelverify import cli

    bagel = tmp_path / "bagel"
    bagel.mkdir()
    dataclasses.replace(CONFIG, vocab_size=256).save_pretrained(bagel)
    words = ["compose", "--llm", str(folders["llm"]), "--vit", str(folders["full"])]
    assert cli.main([*words, "-o", str(tmp_path / "out"), "--config", str(bagel)]) == 1
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "llm_config.json vocab_size: the config says 256" in error
    assert not (tmp_path / "out").exists()


# -- at BAGEL-7B-MoT's size (headers only) -----------------------------------------------------


def sparse_backbones(folder: Path, config: BagelConfig) -> dict[str, Path]:
    """Qwen2 + SigLIP folders of ``config``'s size whose data is a hole: the header is real,
    the file has the right length, no disk space is used (a dry run reads headers only)."""
    from bagelverify.safetensors_io import encode_header, layout_order
    from bagelverify.synthetic import backbone_specs

    documents = config.to_json_documents()
    out = {}
    for backbone, specs in backbone_specs(config).items():
        target = folder / backbone
        target.mkdir(parents=True)
        ordered = layout_order(specs)
        with open(target / "model.safetensors", "wb") as handle:
            handle.write(encode_header(ordered, {"format": "pt"}))
            handle.truncate(handle.tell() + sum(spec.nbytes for spec in ordered))
        name = "llm_config.json" if backbone == "llm" else "vit_config.json"
        (target / "config.json").write_text(json.dumps(documents[name]))
        out[backbone] = target
    return out


def test_release_sized_backbones_compose_to_the_manifests_1223_tensors(tmp_path: Path) -> None:
    """A dry run on Qwen2.5-7B / SigLIP-so400m-980-shaped headers plans exactly the release's
    keys and shapes, with the counts docs/compose.md shows."""
    from bagelverify.manifest import MODEL_FILE, load_manifest

    release = BagelConfig()
    found = sparse_backbones(tmp_path, release)
    report = compose_checkpoint(
        llm=found["llm"], vit=found["vit"], out=tmp_path / "o", dry_run=True
    )
    manifest = load_manifest()[MODEL_FILE]
    assert list(report.origins) == list(expected_shapes(release))
    assert set(report.origins) == set(manifest)
    assert report.config == release
    assert report.counts() == {
        "llm": 339,
        "twin": 393,
        "ones": 56,
        "seeded": 10,
        "zeros": 2,
        "sincos": 2,
        "vit": 421,
    }
    assert {e.dtype for e in manifest.values()} == {"BF16"} and report.dtype == "BF16"
    assert report.bytes == 2 * sum(math.prod(e.shape) for e in manifest.values())
    assert all(tuple(manifest[k].shape) == s for k, s in expected_shapes(release).items())
    assert report.dropped_counts() == {
        backbones.PAST_SELECT_LAYER: 16,
        "SigLIP's attention-pooling head; BAGEL feeds the patch features to its connector": 2,
    }


@needs_automodel
def test_release_sized_position_tables_round_to_bf16_as_automodels_do() -> None:
    """bagelverify rounds float64 -> float32 -> BF16, Automodel float64 -> BF16: at the
    release's sizes (4900 and 4096 rows of 3584) the results are identical."""
    from nemo_automodel.components.models.bagel.embeddings import _get_2d_sincos_pos_embed

    from bagelverify.pos_embed import grid_side, position_table

    release = BagelConfig()
    for key in POSITION_TABLE_KEYS:
        ours = position_table(key, release, torch.bfloat16)
        side = grid_side(key, release)
        theirs = torch.from_numpy(_get_2d_sincos_pos_embed(release.hidden_size, side))
        assert torch.equal(ours, theirs.to(torch.bfloat16)), key


# -- Automodel's hf_backbones initialisation after install() --------------------------------


@needs_automodel
@pytest.mark.parametrize("vit", ["full", "vision-prefixed"])
def test_after_install_automodels_backbone_load_reads_in_place_and_equals_its_own(
    folders: dict[str, Path], vit: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """install() replaces load_bagel_hf_backbone_weights: the model ends bit-equal to
    Automodel's own load, and no backbone state dict is loaded whole onto the CPU."""
    from bagelverify.integrations import automodel

    automodel.install()
    loader = importlib.import_module(automodel.BACKBONE_LOADER)
    assert loader.load_bagel_hf_backbone_weights is automodel.load_bagel_hf_backbone_weights
    theirs = automodels_own(folders["llm"], folders[vit], CONFIG, 3, torch.float32).state_dict()
    checkpointing = importlib.import_module("nemo_automodel.components.checkpoint.checkpointing")

    def whole(*args: object, **kwargs: object) -> None:
        raise AssertionError("a backbone was loaded whole onto the CPU")

    monkeypatch.setattr(checkpointing, "_load_hf_checkpoint_preserving_dtype", whole)
    model = _automodel_build(CONFIG, torch.float32)
    automodel.automodel_originals()["initialize_bagel_non_backbone_weights"](model, seed=3)
    cfg = {"llm_path": str(folders["llm"]), "vit_path": str(folders[vit]), "visual_und": True}
    loader.load_bagel_hf_backbone_weights(model, cfg)
    ours = model.state_dict()
    assert [k for k in ours if not torch.equal(ours[k], theirs[k])] == []


@needs_automodel
def test_after_install_a_backbone_of_another_size_is_one_error_and_the_model_is_untouched(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    from bagelverify.integrations import automodel

    automodel.install()
    wider = write_qwen2(tmp_path / "wider", intermediate_size=128)
    model = _automodel_build(CONFIG, torch.float32)
    cfg = {"llm_path": str(wider), "vit_path": str(folders["full"]), "visual_und": True}
    loader = importlib.import_module(automodel.BACKBONE_LOADER)
    with pytest.raises(ConfigError, match=r"json intermediate_size: the config says 96"):
        loader.load_bagel_hf_backbone_weights(model, cfg)
    assert all(t.isnan().all() for t in model.state_dict().values())


def test_two_ranks_fill_their_row_shards_from_the_backbones_equal_to_the_composed_file(
    folders: dict[str, Path], composed: Path
) -> None:
    """DTensor destinations sharded by rows on 2 gloo ranks: each rank reads its rows (together
    about the backbone bytes once), and the full tensors equal the composed file's."""
    import _dist_workers as workers
    from _multiprocess import run_ranks

    results = run_ranks(
        workers.backbones_into_shards,
        str(folders["llm"]),
        str(folders["full"]),
        str(composed),
        world_size=2,
        timeout=120,
    )
    assert all(r["differ"] == [] and r["untouched_changed"] == [] for r in results)
    header = read_header(composed / "ema.safetensors")
    origins = read_origins(header.metadata)
    backbone = [k for k, o in origins.items() if o.split(":")[0] in ("llm", "vit")]
    patch = "vit_model.vision_model.embeddings.patch_embedding.weight"  # read whole by each
    rows = sum(header.tensors[k].nbytes for k in backbone if k != patch)
    # every byte of the sharded tensors read once over the two ranks, the patch weight twice
    assert sum(r["bytes_read"] for r in results) == rows + 2 * header.tensors[patch].nbytes
    assert all(r["bytes_read"] < rows for r in results)
