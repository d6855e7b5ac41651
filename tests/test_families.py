"""The key-family table against the real BAGEL-7B-MoT key list, and the exported patterns."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

import bagelverify as bv
from bagelverify.buckets import Bucket
from bagelverify.families import FAMILIES, expected_shapes, family_of, und_twin
from bagelverify.manifest import load_manifest
from bagelverify.strategies import FIXED_NEAR_MISSES

SHARED_MANIFEST = Path(__file__).resolve().parents[2] / "shared/data/bagel-7b-mot.manifest.json"
EMA = load_manifest()["ema.safetensors"]
AE = load_manifest()["ae.safetensors"]
ROPE_CONFIG = bv.BagelConfig(vit_rope=True)
#: keys a vit_rope=True model has and the (rope-free) release does not
ROPE = [k for k in expected_shapes(ROPE_CONFIG) if k not in EMA]


@pytest.mark.skipif(
    not SHARED_MANIFEST.exists(),
    reason="shipped manifest not compared with the project's reference key list "
    "(shared/data/bagel-7b-mot.manifest.json, kept outside the package, is absent here)",
)
def test_shipped_manifest_is_the_shared_one() -> None:
    shipped = Path(bv.__file__).parent / "data" / SHARED_MANIFEST.name
    assert json.loads(shipped.read_text()) == json.loads(SHARED_MANIFEST.read_text())


def test_manifest_classifies_to_821_und_402_gen_244_vae() -> None:
    assert len(EMA) == 1223 and len(AE) == 244
    assert Counter(bv.classify(k) for k in EMA) == {Bucket.UND: 821, Bucket.GEN: 402}
    assert Counter(bv.classify(k) for k in AE) == {Bucket.VAE: 244}


def test_vision_tower_has_421_exact_keys() -> None:
    vit = [k for k in EMA if k.startswith("vit_model.")]
    assert len(vit) == 421
    assert all(bv.classify(k) is Bucket.UND for k in vit)


def test_expected_shapes_reproduce_every_manifest_shape() -> None:
    assert expected_shapes(bv.BagelConfig()) == {k: spec.shape for k, spec in EMA.items()}


def test_vit_rope_swaps_the_position_table_for_four_rope_buffers() -> None:
    """With vit_rope the ViT has four (positions, rope_dim) buffers instead of the learned
    position table; every other key and shape is the release's."""
    position = "vit_model.vision_model.embeddings.position_embedding.weight"
    rope = expected_shapes(ROPE_CONFIG)
    assert sorted(ROPE) == sorted(
        f"vit_model.vision_model.rope.{n}" for n in ("cos_h", "sin_h", "cos_w", "sin_w")
    )
    assert {rope[k] for k in ROPE} == {(4900, 36)}  # 70 x 70 patches; head 72 -> 36
    assert position not in rope
    assert {k: v for k, v in rope.items() if k not in ROPE} == {
        k: spec.shape for k, spec in EMA.items() if k != position
    }
    assert all(bv.classify(k) is Bucket.UND for k in ROPE)
    assert bv.BagelConfig(vit_hidden_size=8, vit_num_attention_heads=2).vit_rope_dim == 2


def test_every_manifest_key_has_exactly_one_family() -> None:
    for key in [*EMA, *AE]:
        owners = [f.name for f in FAMILIES if f.match(key)]
        assert len(owners) == 1, (key, owners)


@pytest.mark.parametrize("pattern", bv.UND_PATTERNS + bv.GEN_PATTERNS + bv.VAE_PATTERNS)
def test_exported_patterns_are_self_contained_full_match(pattern: str) -> None:
    compiled = re.compile(pattern)
    assert compiled.flags & re.MULTILINE == 0
    members = [k for k in [*EMA, *AE, *ROPE] if re.fullmatch(pattern, k)]
    assert members, f"{pattern} matches no real key"
    for key in members:
        assert not re.fullmatch(pattern, key + "\n")
        # match and search agree with fullmatch: the anchors are in the pattern itself
        for text in (key, key + "\n", "x" + key, key + "x", key + "\nx", "\n" + key):
            verdict = bool(re.fullmatch(pattern, text))
            assert bool(re.match(pattern, text)) is verdict
            assert bool(re.search(pattern, text)) is verdict


def test_patterns_accept_only_ascii_layer_numbers() -> None:
    key = "language_model.model.layers.3.self_attn.q_proj.weight"
    assert bv.classify(key) is Bucket.UND
    for digit in "٣३３":
        assert bv.classify(key.replace("3", digit)) is Bucket.UNKNOWN


@pytest.mark.parametrize("key", FIXED_NEAR_MISSES)
def test_fixed_near_misses_are_unknown(key: str) -> None:
    assert bv.classify(key) is Bucket.UNKNOWN


@pytest.mark.parametrize(
    ("key", "bucket"),
    [
        ("language_model.model.layers.0.self_attn.q_proj._extra_state", Bucket.EXTRA),
        ("model.language_model.model.layers.0.mlp.fc1._extra_state", Bucket.EXTRA),
        ("encoder.down.0.block.1.conv1._extra_state", Bucket.EXTRA),
        ("_extra_state", Bucket.EXTRA),  # the root module's own (native key "model._extra_state")
        ("encoder.quant_conv.weight", Bucket.VAE),
        ("decoder.up.3.upsample.conv.bias", Bucket.VAE),
        ("language_model.model.layers.123456789.mlp_moe_gen.down_proj.weight", Bucket.GEN),
        ("vit_model.vision_model.encoder.layers.25.layer_norm2.bias", Bucket.UND),
        ("model.language_model.model.norm.weight", Bucket.UNKNOWN),
    ],
)
def test_classify_examples(key: str, bucket: Bucket) -> None:
    assert bv.classify(key) is bucket


def test_classify_rejects_non_str_keys_naming_them() -> None:
    with pytest.raises(TypeError, match="b'language_model"):
        bv.classify(b"language_model.lm_head.weight")  # type: ignore[arg-type]


def test_gen_twins_of_the_manifest_are_und_keys_of_the_same_shape() -> None:
    gen = [k for k in EMA if bv.classify(k) is Bucket.GEN]
    twinned = {k: und_twin(k) for k in gen}
    no_twin = sorted(k for k, twin in twinned.items() if twin is None)
    flow_matching = {"time_embedder", "vae2llm", "llm2vae", "latent_pos_embed"}
    assert no_twin == sorted(k for k in gen if k.split(".")[0] in flow_matching)
    assert len(no_twin) == 9
    for gen_key, und_key in twinned.items():
        if und_key is None:
            continue
        assert und_key == gen_key.replace("_moe_gen", "")
        assert bv.classify(und_key) is Bucket.UND
        assert EMA[und_key].shape == EMA[gen_key].shape
        gen_family, und_family = family_of(gen_key), family_of(und_key)
        assert gen_family is not None and und_family is not None
        assert gen_family.twin == und_family.name


def test_partition_keeps_order_and_returns_same_values() -> None:
    values = {k: object() for k in ["encoder.conv_in.weight", "x", *list(EMA)[:5]]}
    parts = bv.partition(values)
    assert set(parts) == set(Bucket)
    assert list(parts[Bucket.UND]) == [k for k in values if bv.classify(k) is Bucket.UND]
    assert parts["unknown"] == {"x": values["x"]}
    assert all(parts[b][k] is values[k] for b in Bucket for k in parts[b])
    assert bv.partition(iter(["x", "vae2llm.bias"])) == {
        **{b: [] for b in Bucket},
        Bucket.UNKNOWN: ["x"],
        Bucket.GEN: ["vae2llm.bias"],
    }


def test_partition_refuses_a_single_string() -> None:
    with pytest.raises(TypeError, match="single key"):
        bv.partition("language_model.lm_head.weight")


def test_import_stays_light_until_a_torch_name_is_used() -> None:
    code = (
        "import sys, bagelverify as bv; assert 'torch' not in sys.modules; "
        "bv.classify('vae2llm.bias'); bv.BagelStateDictAdapter().from_hf({}); "
        "assert 'torch' not in sys.modules; bv.load_into; assert 'torch' in sys.modules; "
        "assert set(bv.__all__) <= set(dir(bv))"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
