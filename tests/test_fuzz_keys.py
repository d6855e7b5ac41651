"""Fuzzing the key-only entry points: any input gives a result or a documented error, and real
tensors pass through as the same objects (no copies, no mutation of the input)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import bagelverify as bv
from bagelverify import strategies as bst
from bagelverify.errors import BagelError

ADAPTER = bv.BagelStateDictAdapter()

#: What the key-only entry points may raise; anything else is a bug.
DOCUMENTED = (BagelError, TypeError, ValueError)

odd_keys = st.one_of(
    bst.any_keys(),
    bst.any_keys().map(lambda k: "model." + k),
    st.integers(),
    st.binary(max_size=8),
    st.none(),
    st.tuples(st.text(max_size=3)),
)
odd_values = st.one_of(st.none(), st.integers(), st.builds(object), st.text(max_size=3))
odd_stages = st.one_of(
    bst.stages, st.integers(-3, 5), st.text(max_size=8), st.floats(), st.booleans(), st.none()
)
odd_mappings = st.one_of(
    st.dictionaries(odd_keys, odd_values, max_size=12),
    st.lists(st.text(max_size=5), max_size=3),
    st.text(max_size=5),
    st.none(),
)


@given(odd_mappings, odd_stages, st.booleans())
def test_from_hf_gives_a_result_or_a_documented_error(sd: object, stage: object, strict: bool):
    """from_hf on arbitrary input either returns rooted keys of the stage or raises a documented
    error, and never changes its input."""
    before = list(sd.items()) if isinstance(sd, dict) else None
    try:
        out = ADAPTER.from_hf(sd, stage=stage, strict=strict)  # type: ignore[arg-type]
    except DOCUMENTED as error:
        assert str(error)  # every error says something
    else:
        assert isinstance(sd, dict)
        assert all(k.startswith("model.") for k in out)
        kept = bv.stage.STAGE_BUCKETS[bv.normalize_stage(ADAPTER.stage if stage is None else stage)]
        assert all(bv.classify(k[len("model.") :]) in kept for k in out)
    if before is not None:
        assert isinstance(sd, dict) and list(sd.items()) == before


@given(
    odd_mappings,
    st.sampled_from([None, r"model\.vit", "", r"(", ".*extra", "[z-a]"]),
    st.booleans(),
)
def test_to_hf_gives_a_result_or_a_documented_error(sd: object, exclude: str | None, strict: bool):
    """to_hf on arbitrary input returns unrooted keys or raises a documented error."""
    try:
        out = ADAPTER.to_hf(sd, exclude_key_regex=exclude, strict=strict)  # type: ignore[arg-type]
    except DOCUMENTED as error:
        assert str(error)
    else:
        assert isinstance(sd, dict)
        assert all(("model." + k) in sd for k in out)
        if strict:
            assert all(bv.classify(k) in (bv.Bucket.UND, bv.Bucket.GEN) for k in out)


@given(odd_keys)
def test_classify_returns_a_bucket_or_type_error(key: object):
    """classify accepts every str and refuses everything else with TypeError."""
    try:
        bucket = bv.classify(key)  # type: ignore[arg-type]
    except TypeError:
        assert not isinstance(key, str)
    else:
        assert isinstance(key, str) and isinstance(bucket, bv.Bucket)


@given(odd_stages)
def test_normalize_stage_returns_a_stage_or_stage_error(stage: object):
    """normalize_stage answers stage1/stage2 or raises StageError (a ValueError)."""
    try:
        assert bv.normalize_stage(stage) in ("stage1", "stage2")
    except bv.StageError as error:
        assert isinstance(error, ValueError) and "'stage1' or 'stage2'" in str(error)


@given(st.lists(bst.keys((bv.Bucket.UND, bv.Bucket.GEN)), unique=True, max_size=12), bst.stages)
def test_real_tensors_pass_through_uncopied(keys: list[str], stage: object):
    """from_hf, to_hf and convert_single_tensor_to_hf return the input tensor objects, sharing
    storage, and leave the input mapping as it was."""
    sd = {k: torch.full((2,), float(i)) for i, k in enumerate(keys)}
    snapshot = {k: (v, v.data_ptr()) for k, v in sd.items()}
    native = ADAPTER.from_hf(sd, stage=stage, strict=False)
    for native_key, tensor in native.items():
        source, pointer = snapshot[native_key[len("model.") :]]
        assert tensor is source and tensor.data_ptr() == pointer
    hf = ADAPTER.to_hf(native)
    assert all(hf[k] is sd[k] for k in hf)
    for native_key, tensor in native.items():
        assert ADAPTER.convert_single_tensor_to_hf(native_key, tensor)[0][1] is tensor
    assert {k: (v, v.data_ptr()) for k, v in sd.items()} == snapshot


def test_invalid_exclude_regex_names_it() -> None:
    with pytest.raises(ValueError, match=r"exclude_key_regex '\(' is not a valid regex"):
        ADAPTER.to_hf({}, exclude_key_regex="(")
    with pytest.raises(TypeError, match="exclude_key_regex must be a str, got int"):
        ADAPTER.to_hf({}, exclude_key_regex=3)  # type: ignore[arg-type]
