"""BagelStateDictAdapter and normalize_stage: behaviour on concrete inputs and every error path."""

from __future__ import annotations

import logging
import re
from types import SimpleNamespace

import pytest
import torch

import bagelverify as bv
from bagelverify.buckets import Bucket
from bagelverify.errors import (
    KeyCollisionError,
    MissingKeysError,
    RootError,
    ShapeMismatchError,
    StageError,
    StageTypeError,
    UnknownKeysError,
)
from bagelverify.families import expected_shapes
from bagelverify.manifest import load_manifest
from bagelverify.strategies import STAGE_SPELLINGS, FakeTensor
from bagelverify.synthetic import scaled_config

EMA = list(load_manifest()["ema.safetensors"])
AE = list(load_manifest()["ae.safetensors"])
Q = "language_model.model.layers.0.self_attn.q_proj.weight"
Q_GEN = "language_model.model.layers.0.self_attn.q_proj_moe_gen.weight"


def fake(keys: list[str]) -> dict[str, FakeTensor]:
    return {k: FakeTensor(k) for k in keys}


# -- normalize_stage -------------------------------------------------------------------------


@pytest.mark.parametrize(("given", "expected"), list(STAGE_SPELLINGS.items()))
def test_normalize_stage_accepts(given: object, expected: str) -> None:
    assert bv.normalize_stage(given) == expected


@pytest.mark.parametrize("given", [0, 3, -1, "3", "stage", "stage 1", "", "stage3", "one"])
def test_normalize_stage_rejects_values_listing_accepted(given: object) -> None:
    with pytest.raises(StageError, match=r"'stage1' or 'stage2'") as info:
        bv.normalize_stage(given)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("given", [True, False, 1.0, 2.0, None, b"1", [1]])
def test_normalize_stage_rejects_types(given: object) -> None:
    with pytest.raises(StageTypeError, match="expected 1, 2") as info:
        bv.normalize_stage(given)
    assert isinstance(info.value, TypeError) and isinstance(info.value, ValueError)


def test_adapter_rejects_bad_default_stage() -> None:
    with pytest.raises(ValueError, match="unknown stage 'stage3'"):
        bv.BagelStateDictAdapter(stage="stage3")


# -- from_hf ---------------------------------------------------------------------------------


def test_from_hf_stage1_and_stage2_on_the_real_key_set() -> None:
    sd = fake(EMA)
    adapter = bv.BagelStateDictAdapter()
    stage1 = adapter.from_hf(sd)
    stage2 = adapter.from_hf(sd, stage="stage2")
    assert len(stage1) == 821 and len(stage2) == 1223
    assert all(k.startswith("model.") for k in stage2)
    assert all(stage2["model." + k] is sd[k] for k in sd)
    assert list(stage2) == ["model." + k for k in EMA]  # input order kept


def test_from_hf_accepts_rooted_keys_and_returns_same_objects() -> None:
    sd = {"model." + Q: FakeTensor("a"), "language_model.lm_head.weight": FakeTensor("b")}
    out = bv.BagelStateDictAdapter().from_hf(sd)
    assert out == {
        "model." + Q: sd["model." + Q],
        "model.language_model.lm_head.weight": sd["language_model.lm_head.weight"],
    }


def test_from_hf_collision_is_an_error_even_when_not_strict() -> None:
    sd = fake([Q, "model." + Q])
    with pytest.raises(
        KeyCollisionError,
        match=re.escape(
            repr(("language_model.model.layers.0.self_attn.q_proj.weight", "model." + Q))
        ),
    ):
        bv.BagelStateDictAdapter().from_hf(sd, strict=False)


def test_from_hf_strict_unknown_lists_count_and_five_examples() -> None:
    bad = [f"bogus.{i}" for i in range(7)]
    with pytest.raises(UnknownKeysError) as info:
        bv.BagelStateDictAdapter().from_hf(fake([Q, *bad]))
    message = str(info.value)
    assert isinstance(info.value, KeyError)
    assert message.startswith("7 keys match no BAGEL key family")
    assert all(repr(k) in message for k in bad[:5]) and "bogus.5" not in message
    assert "(and 2 more)" in message and "strict=False" in message
    assert info.value.keys == bad


def test_from_hf_non_strict_warns_once_and_drops(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="bagelverify"):
        out = bv.BagelStateDictAdapter().from_hf(fake([Q, "bogus.a", "bogus.b"]), strict=False)
    assert list(out) == ["model." + Q]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "2 keys" in warnings[0].getMessage() and "'bogus.a'" in warnings[0].getMessage()


def test_from_hf_excludes_vae_and_extra_with_log(caplog: pytest.LogCaptureFixture) -> None:
    extra = Q.replace("weight", "_extra_state")
    with caplog.at_level(logging.INFO, logger="bagelverify"):
        out = bv.BagelStateDictAdapter().from_hf(fake([Q, *AE, extra]))
    assert list(out) == ["model." + Q]
    text = caplog.text
    assert "244 VAE keys" in text and "1 Transformer-Engine ._extra_state" in text


def test_from_hf_stage2_gen_without_und_twin() -> None:
    adapter = bv.BagelStateDictAdapter(stage=2)
    with pytest.raises(MissingKeysError, match=re.escape(repr(Q))) as info:
        adapter.from_hf(fake([Q_GEN]))
    assert info.value.keys == [Q]
    assert list(adapter.from_hf(fake([Q_GEN]), strict=False)) == ["model." + Q_GEN]
    # stage 1 drops GEN keys, so the twin does not matter there
    assert adapter.from_hf(fake([Q_GEN]), stage=1) == {}


def test_from_hf_does_not_mutate_input() -> None:
    sd = fake([*EMA[:50], *AE[:3], "bogus"])
    before = dict(sd)
    bv.BagelStateDictAdapter().from_hf(sd, stage=2, strict=False)
    assert sd == before and list(sd) == list(before)


@pytest.mark.parametrize("bad", [[("k", 1)], "language_model.lm_head.weight", None, 3])
def test_from_hf_rejects_non_mappings(bad: object) -> None:
    with pytest.raises(TypeError, match="must be a mapping"):
        bv.BagelStateDictAdapter().from_hf(bad)  # type: ignore[arg-type]


def test_from_hf_rejects_non_str_keys_naming_them() -> None:
    with pytest.raises(TypeError, match=r"got int 7"):
        bv.BagelStateDictAdapter().from_hf({Q: 1, 7: 2})  # type: ignore[dict-item]


def test_from_hf_accepts_device_mesh_and_refuses_unknown_keywords() -> None:
    sd = fake([Q])
    adapter = bv.BagelStateDictAdapter()
    assert adapter.from_hf(sd, None)["model." + Q] is sd[Q]
    assert adapter.from_hf(sd, device_mesh=object())["model." + Q] is sd[Q]
    with pytest.raises(TypeError, match="some_future_flag"):
        adapter.from_hf(sd, some_future_flag=True)  # type: ignore[call-arg]


def test_to_hf_takes_automodels_keywords_and_refuses_a_misspelt_one() -> None:
    """Every keyword Automodel 0.7.0 passes is accepted; a misspelt one is a TypeError naming
    it (it used to be swallowed by **kwargs and silently ignored)."""
    adapter = bv.BagelStateDictAdapter()
    native = {"model." + Q: object(), "model.x._extra_state": object()}
    out = adapter.to_hf(
        native,
        exclude_key_regex=r".*_extra_state.*",
        quantization=False,
        device_mesh=None,
        v4_compatible=True,
        legacy_paramwrapper_layout=True,
        for_checkpoint_load=True,
    )
    assert out == {Q: native["model." + Q]}
    with pytest.raises(TypeError, match="exclude_regex"):
        adapter.to_hf(native, exclude_regex="x")  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="exclude_regex"):
        adapter.convert_single_tensor_to_hf("model." + Q, 1, exclude_regex="x")  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="no quantized tensors"):
        adapter.to_hf(native, quantization=True)


def test_automodel_base_class_hooks_on_the_adapter_itself() -> None:
    """The members Automodel's StateDictAdapter base provides, on our class without it."""
    adapter = bv.BagelStateDictAdapter()
    assert adapter.supports_low_memory_dcp_load is True
    assert adapter.supports_write_through_checkpoint_load is True
    assert adapter.checkpoint_key_aliases == {}
    assert adapter.iter_checkpoint_load_parts({"model." + Q: 1}) is None
    native = {"model." + Q: 1, "model.x._extra_state": 2, "model.x._extra_state.step": 3}
    assert adapter.get_hf_state_dict_keys(native) == [Q]
    with pytest.raises(bv.UnknownKeysError):
        adapter.get_hf_state_dict_keys({"model.bogus.weight": 1})
    # PEFT adapter keys keep their root (base_model.model.model.<hf key>), so the targets do too
    name = "model.language_model.model.layers.0.self_attn.q_proj"
    assert adapter.map_peft_target_module_to_hf(name) == name
    assert adapter.map_peft_target_module_to_hf("connector.fc1", v4_compatible=True) == (
        "connector.fc1"
    )


# -- to_hf / convert_single_tensor_to_hf ------------------------------------------------------


def test_to_hf_strips_root_and_drops_extra_state() -> None:
    native = fake(["model." + Q, "model." + Q.replace("weight", "_extra_state")])
    assert bv.BagelStateDictAdapter().to_hf(native) == {Q: native["model." + Q]}


def test_to_hf_refuses_unrooted_keys_whatever_strict() -> None:
    with pytest.raises(RootError, match=re.escape(repr(Q))):
        bv.BagelStateDictAdapter().to_hf(fake([Q]), strict=False)


def test_to_hf_strict_refuses_non_model_keys_non_strict_keeps_them(
    caplog: pytest.LogCaptureFixture,
) -> None:
    native = fake(["model." + Q, "model.encoder.conv_in.weight", "model.head.weight"])
    with pytest.raises(UnknownKeysError, match="2 native keys"):
        bv.BagelStateDictAdapter().to_hf(native)
    with caplog.at_level(logging.WARNING, logger="bagelverify"):
        out = bv.BagelStateDictAdapter().to_hf(native, strict=False)
    assert list(out) == [Q, "encoder.conv_in.weight", "head.weight"]
    assert "converting them unchanged" in caplog.text


def test_to_hf_exclude_key_regex_uses_re_match_on_native_key() -> None:
    native = fake(["model." + Q, "model.head.weight", "lonely"])
    out = bv.BagelStateDictAdapter().to_hf(native, exclude_key_regex=r"model\.head|lonely")
    assert list(out) == [Q]
    # re.match anchors at the start only: this does not exclude "model.head.weight"
    with pytest.raises(UnknownKeysError):
        bv.BagelStateDictAdapter().to_hf(native, exclude_key_regex=r"head|lonely")


def test_convert_single_tensor_to_hf() -> None:
    adapter = bv.BagelStateDictAdapter()
    tensor = FakeTensor("t")
    assert adapter.convert_single_tensor_to_hf("model." + Q, tensor) == [(Q, tensor)]
    assert adapter.convert_single_tensor_to_hf("model.x._extra_state", tensor) == []
    with pytest.raises(RootError):
        adapter.convert_single_tensor_to_hf(Q, tensor)
    with pytest.raises(UnknownKeysError):
        adapter.convert_single_tensor_to_hf("model.bogus", tensor)


def test_reference_key_helpers() -> None:
    adapter = bv.BagelStateDictAdapter()
    assert adapter._hf_to_nemo_key(Q) == "model." + Q
    assert adapter._nemo_to_hf_key("model." + Q) == Q
    assert adapter._strip_nemo_root(Q) == Q


# -- plan -------------------------------------------------------------------------------------


def test_plan_reports_every_bucket_without_converting() -> None:
    keys = [
        Q,
        Q_GEN,
        "model.vae2llm.bias",
        "encoder.conv_in.weight",
        "x._extra_state",
        "bogus",
        "language_model.model.layers.1.mlp_moe_gen.up_proj.weight",
    ]
    report = bv.BagelStateDictAdapter().plan(keys, stage="2")
    assert report.stage == "stage2"
    assert report.kept == [
        Q,
        Q_GEN,
        "model.vae2llm.bias",
        "language_model.model.layers.1.mlp_moe_gen.up_proj.weight",
    ]
    assert report.native["model.vae2llm.bias"] == "model.vae2llm.bias"
    assert report.dropped == {
        Bucket.VAE: ["encoder.conv_in.weight"],
        Bucket.EXTRA: ["x._extra_state"],
        Bucket.UNKNOWN: ["bogus"],
    }
    assert report.twin_violations == [
        (
            "language_model.model.layers.1.mlp_moe_gen.up_proj.weight",
            "language_model.model.layers.1.mlp.up_proj.weight",
        )
    ]
    assert [type(p) for p in report.problems()] == [UnknownKeysError, MissingKeysError]
    assert report.problems(strict=False) == []


# -- drop-in behaviour expected by code written against the reference adapter ----------------


def test_stage2_roots_und_and_flow_matching_keys_without_shape_checks() -> None:
    weight, bias = torch.ones(2, 2), torch.zeros(2)  # toy shapes: no config, no shape checks
    out = bv.BagelStateDictAdapter(stage="stage2").from_hf(
        {"language_model.model.embed_tokens.weight": weight, "time_embedder.mlp.0.bias": bias}
    )
    assert out == {
        "model.language_model.model.embed_tokens.weight": weight,
        "model.time_embedder.mlp.0.bias": bias,
    }


def test_root_module_extra_state_is_dropped_with_or_without_exclusion() -> None:
    weight = torch.ones(2, 2)
    native = {
        "model.language_model.model.embed_tokens.weight": weight,
        "model._extra_state": torch.zeros(1),
    }
    adapter = bv.BagelStateDictAdapter(stage="stage2")
    for exclude in (None, r".*_extra_state.*"):
        assert adapter.to_hf(native, exclude_key_regex=exclude) == {
            "language_model.model.embed_tokens.weight": weight
        }
    assert adapter.convert_single_tensor_to_hf("model.layer._extra_state", torch.zeros(1)) == []


def test_foreign_config_objects_are_accepted_and_stage_is_assignable() -> None:
    adapter = bv.BagelStateDictAdapter(config=SimpleNamespace(text_config=None), stage="stage1")
    adapter.stage = "stage2"  # type: ignore[assignment]
    assert list(adapter.from_hf(fake([Q_GEN, Q]))) == ["model." + Q_GEN, "model." + Q]


# -- a BagelConfig turns on shape and completeness checks -------------------------------------


def test_adapter_with_a_config_checks_shapes_and_completeness_like_a_load() -> None:
    config = scaled_config(64)
    shapes = expected_shapes(config)
    sd = {k: torch.empty(shape, dtype=torch.bfloat16) for k, shape in shapes.items()}
    adapter = bv.BagelStateDictAdapter(config=config, stage=2)
    out = adapter.from_hf(sd)
    assert len(out) == 1223 and all(out["model." + k] is v for k, v in sd.items())

    wrong = {**sd, Q: torch.empty(3, 3), "vae2llm.bias": torch.empty(1)}
    with pytest.raises(ShapeMismatchError) as info:
        adapter.from_hf(wrong, strict=False)
    message = str(info.value)
    expected_q = list(shapes[Q])
    assert f"{Q}: expected {expected_q}, found [3, 3]" in message
    assert "vae2llm.bias: expected" in message  # every mismatch, not only the first

    del sd["vit_model.vision_model.post_layernorm.bias"]
    with pytest.raises(MissingKeysError, match=r"vit.post_layernorm: 1 key missing"):
        adapter.from_hf(sd)
    assert len(adapter.from_hf(sd, strict=False)) == 1222
    assert len(adapter.from_hf(sd, stage=1, strict=False)) == 820


def test_to_hf_with_a_config_checks_shapes_and_load_destinations_completeness() -> None:
    """With a BagelConfig, to_hf refuses a wrong shape always and, for checkpoint-load
    destinations, an incomplete key set; a subset is fine otherwise (saving, single tensors)."""
    config = scaled_config(64)
    native = {
        "model." + key: torch.empty(shape, device="meta")
        for key, shape in expected_shapes(config).items()
        if bv.classify(key) is Bucket.UND
    }
    adapter = bv.BagelStateDictAdapter(config)
    assert list(adapter.to_hf(native, for_checkpoint_load=True)) == [k[6:] for k in native]
    subset = dict(list(native.items())[:3])
    assert len(adapter.to_hf(subset)) == 3
    with pytest.raises(bv.MissingKeysError, match="stage1 expects"):
        adapter.to_hf(subset, for_checkpoint_load=True)
    first = next(iter(native))
    with pytest.raises(bv.ShapeMismatchError, match="found \\[1, 2\\]"):
        adapter.to_hf({**subset, first: torch.empty(1, 2, device="meta")})
    rope_key = "model.vit_model.vision_model.rope.cos_h"
    with pytest.raises(
        bv.UnknownKeysError, match="1 key does not exist in a model with this config"
    ):
        adapter.to_hf({**native, rope_key: torch.empty(1, device="meta")})
