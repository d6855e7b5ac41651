"""LoRA factor keys in the key model: derived from the family table, under every root."""

from __future__ import annotations

import pytest

import bagelverify as bv
from bagelverify.families import FAMILIES
from bagelverify.lora_keys import (
    PEFT_ROOT,
    factor_mismatches,
    factor_shape,
    lora_families,
    lora_key,
    native_factor_key,
)
from bagelverify.partition import classify
from bagelverify.synthetic import scaled_config

TINY = scaled_config(64)
ROOTS = ["", "model.", PEFT_ROOT, PEFT_ROOT + "model."]


def test_lora_families_are_exactly_the_families_with_a_2d_weight() -> None:
    expected = [
        f.name
        for f in FAMILIES
        if f.shape is not None and "weight" in f.params and len(f.shape.weight) == 2
    ]
    assert [f.name for f in lora_families()] == expected
    names = set(expected)
    assert {"q_proj", "q_proj_moe_gen", "down_proj_moe_gen", "vit.fc1", "connector.fc2"} <= names
    assert not names & {"norm", "q_norm", "input_layernorm_moe_gen", "vit.layer_norm1"}


@pytest.mark.parametrize("root", ROOTS)
def test_every_factor_key_of_every_2d_weight_names_its_weight_under_every_root(root: str) -> None:
    """For each 2-D weight of the table (at a tiny config): both factor keys, under each root,
    name that weight, its family and bucket; the native key is model.-rooted (PEFT kept)."""
    for family in lora_families():
        for weight in [key for key in family.keys(TINY) if key.endswith(".weight")]:
            module = weight.removesuffix(".weight")
            for factor in ("lora_A", "lora_B"):
                found = lora_key(f"{root}{module}.{factor}.weight")
                assert found is not None
                assert (found.weight, found.family, found.factor, found.root) == (
                    weight,
                    family,
                    factor,
                    root,
                )
                assert found.bucket is classify(weight)
                native = native_factor_key(found)
                peft = PEFT_ROOT if root.startswith(PEFT_ROOT) else ""
                assert native == f"{peft}model.{module}.{factor}.weight"


@pytest.mark.parametrize(
    "key",
    [
        "language_model.model.norm.lora_A.weight",  # a 1-D weight
        "language_model.model.layers.0.self_attn.q_proj.lora_A.bias",
        "language_model.model.layers.0.self_attn.q_prj.lora_A.weight",  # a typo
        "language_model.model.layers.0.self_attn.q_proj.lora_C.weight",
        "language_model.model.layers.0.self_attn.q_proj.weight",  # the weight itself
        "model.model.connector.fc1.lora_A.weight",  # rooted twice
        "base_model.model.base_model.model.connector.fc1.lora_A.weight",
    ],
)
def test_keys_that_are_no_factor_of_a_bagel_weight_are_none(key: str) -> None:
    assert lora_key(key) is None


def test_classify_keeps_calling_factor_keys_unknown() -> None:
    assert classify("connector.fc1.lora_A.weight") is bv.Bucket.UNKNOWN


def test_factor_shapes_derive_from_the_weight_shape_and_the_rank() -> None:
    family = lora_key("language_model.model.layers.0.mlp.down_proj.lora_A.weight")
    assert family is not None
    out, inner = family.family.shape(TINY, "weight")  # type: ignore[misc]
    assert factor_shape(family.family, TINY, "lora_A", 8) == (8, inner)
    assert factor_shape(family.family, TINY, "lora_B", 8) == (out, 8)


def test_factor_mismatches_name_each_bad_factor() -> None:
    q = "language_model.model.layers.0.self_attn.q_proj"
    out, inner = TINY.q_dim, TINY.hidden_size
    good = {f"{q}.lora_A.weight": (4, inner), f"{q}.lora_B.weight": (out, 4)}
    assert factor_mismatches(good, config=TINY) == []
    rank = {f"{q}.lora_A.weight": (4, inner), f"{q}.lora_B.weight": (out, 5)}
    [line] = factor_mismatches(rank)
    assert "rank 5" in line and "rank 4" in line and f"{q}.lora_B.weight" in line
    wide = {f"{q}.lora_A.weight": (4, inner + 1)}
    [line] = factor_mismatches(wide, config=TINY)
    assert f"expected [4, {inner}]" in line and f"{q}.weight" in line
    assert factor_mismatches({f"{q}.lora_A.weight": (4,)}) != []
    assert factor_mismatches({"connector.fc1.weight": (1,)}) == []


def test_the_adapter_converts_factors_keeping_the_stage_and_checking_their_shapes() -> None:
    """from_hf/to_hf carry LoRA factors: a GEN twin's factors only in stage 2, PEFT-rooted
    keys unchanged, an adapter alone needs no base weights, a misfit factor is named."""
    import torch

    q = "language_model.model.layers.0.self_attn.q_proj"
    gen = "language_model.model.layers.0.self_attn.q_proj_moe_gen"
    a, b = torch.zeros(4, TINY.hidden_size), torch.zeros(TINY.q_dim, 4)
    hf = {f"{m}.lora_{f}.weight": t for m in (q, gen) for f, t in (("A", a), ("B", b))}
    stage1 = bv.BagelStateDictAdapter(TINY, stage="stage1").from_hf(hf)
    assert sorted(stage1) == [f"model.{q}.lora_A.weight", f"model.{q}.lora_B.weight"]
    stage2 = bv.BagelStateDictAdapter(TINY, stage="stage2")
    native = stage2.from_hf(hf)
    assert len(native) == 4 and stage2.to_hf(native) == hf
    peft = {PEFT_ROOT + key: value for key, value in native.items()}
    assert stage2.to_hf(peft) == peft
    assert stage2.from_hf(peft) == peft
    wrong = {f"{q}.lora_A.weight": torch.zeros(4, TINY.hidden_size + 1)}
    with pytest.raises(bv.ShapeMismatchError, match=rf"{q}\.lora_A\.weight: \[4, "):
        stage2.from_hf(wrong)


def test_every_bad_factor_is_named_not_only_the_first() -> None:
    """A rank mismatch does not end the check: later factors are still looked at."""
    q, k = (f"language_model.model.layers.{n}.self_attn.q_proj" for n in (0, 1))
    out, inner = TINY.q_dim, TINY.hidden_size
    shapes = {
        f"{q}.lora_A.weight": (4, inner),
        f"{q}.lora_B.weight": (out, 5),
        f"{k}.lora_A.weight": (4, inner),
        f"{k}.lora_B.weight": (out, 6),
        "vit_model.vision_model.encoder.layers.0.mlp.fc1.lora_A.weight": (4,),
    }
    lines = factor_mismatches(shapes, config=TINY)
    assert [line.split(":")[0].strip() for line in lines] == [
        f"{q}.lora_B.weight",
        f"{k}.lora_B.weight",
        "vit_model.vision_model.encoder.layers.0.mlp.fc1.lora_A.weight",
    ]
