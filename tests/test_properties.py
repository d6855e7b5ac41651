"""Hypothesis property suite: one named invariant per test, over keys generated from the table."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

import bagelverify as bv
from bagelverify import strategies as bst
from bagelverify.buckets import MATCH_ORDER, Bucket
from bagelverify.errors import UnknownKeysError
from bagelverify.families import FAMILY_BY_NAME, Family, und_twin
from bagelverify.stage import STAGE_BUCKETS

ADAPTER = bv.BagelStateDictAdapter()
PATTERNS = {
    Bucket.UND: bv.UND_PATTERNS,
    Bucket.GEN: bv.GEN_PATTERNS,
    Bucket.VAE: bv.VAE_PATTERNS,
    Bucket.EXTRA: bv.EXTRA_PATTERNS,
}

mixed_state_dicts = bst.state_dicts(bst.any_keys())
model_state_dicts = bst.state_dicts(bst.keys((Bucket.UND, Bucket.GEN)))


def naive_classify(key: str) -> Bucket:
    """The specification: first bucket in match order with a pattern that fully matches."""
    for bucket in MATCH_ORDER:
        if any(re.fullmatch(p, key) for p in PATTERNS[bucket]):
            return bucket
    return Bucket.UNKNOWN


@given(st.lists(bst.any_keys(), unique=True), st.randoms())
def test_partition_is_disjoint_complete_and_order_independent(keys: list[str], rnd) -> None:
    parts = bv.partition(keys)
    flat = [k for bucket in Bucket for k in parts[bucket]]
    assert sorted(flat) == sorted(keys)  # complete, and disjoint: no key twice
    for bucket in Bucket:
        assert parts[bucket] == [k for k in keys if bv.classify(k) is bucket]  # input order
    shuffled = list(keys)
    rnd.shuffle(shuffled)
    assert {b: set(v) for b, v in bv.partition(shuffled).items()} == {
        b: set(v) for b, v in parts.items()
    }


@given(bst.any_keys())
def test_classify_agrees_with_naive_fullmatch_loop(key: str) -> None:
    assert bv.classify(key) is naive_classify(key)


@given(bst.near_miss_keys())
def test_adversarial_near_misses_are_unknown(key: str) -> None:
    assert bv.classify(key) is Bucket.UNKNOWN
    assert naive_classify(key) is Bucket.UNKNOWN


@given(mixed_state_dicts, bst.stages)
def test_to_hf_of_from_hf_is_the_stage_subset_as_same_objects(sd: dict, stage: object) -> None:
    kept = STAGE_BUCKETS[bv.normalize_stage(stage)]
    roundtrip = ADAPTER.to_hf(ADAPTER.from_hf(sd, stage=stage, strict=False))
    expected = {k: v for k, v in sd.items() if bv.classify(k) in kept}
    assert list(roundtrip) == list(expected)
    assert all(roundtrip[k] is expected[k] for k in expected)


@given(model_state_dicts)
def test_from_hf_of_to_hf_is_identity_on_native_retained_keys(sd: dict) -> None:
    native = {"model." + k: v for k, v in sd.items()}
    back = ADAPTER.from_hf(ADAPTER.to_hf(native), stage=2, strict=False)
    assert list(back) == list(native)
    assert all(back[k] is native[k] for k in native)


@given(mixed_state_dicts)
def test_stage1_keys_are_a_subset_of_stage2_keys(sd: dict) -> None:
    stage1 = ADAPTER.from_hf(sd, stage=1, strict=False)
    stage2 = ADAPTER.from_hf(sd, stage=2, strict=False)
    assert set(stage1) <= set(stage2)
    assert all(stage2[k] is v for k, v in stage1.items())


@given(mixed_state_dicts, bst.stages)
def test_strict_raises_unknown_keys_iff_unknown_bucket_nonempty(sd: dict, stage: object) -> None:
    unknown = bv.partition(sd)[Bucket.UNKNOWN]
    try:
        ADAPTER.from_hf(sd, stage=stage, strict=True)
    except UnknownKeysError as error:
        assert unknown and error.keys == list(unknown)
    except KeyError:
        assert not unknown  # only the twin check may raise when nothing is unknown
    else:
        assert not unknown


@given(bst.gen_twin_families().flatmap(lambda f: st.tuples(st.just(f), bst.family_keys(f))))
def test_every_gen_twin_key_maps_to_und_key_of_its_twin_family(pair: tuple[Family, str]) -> None:
    family, gen_key = pair
    und_key = und_twin(gen_key)
    assert und_key is not None
    assert FAMILY_BY_NAME[family.twin or ""].match(und_key)
    assert bv.classify(und_key) is Bucket.UND
    assert und_key == gen_key.replace(bv.families.MOE_SUFFIX, "", 1)


@given(mixed_state_dicts, bst.stages)
def test_from_hf_never_mutates_its_input(sd: dict, stage: object) -> None:
    before = list(sd.items())
    ADAPTER.from_hf(sd, stage=stage, strict=False)
    assert list(sd.items()) == before


@given(st.lists(bst.keys((Bucket.UND, Bucket.GEN)), unique=True, min_size=1), st.data())
def test_rooting_any_subset_of_keys_gives_the_same_result(keys: list[str], data) -> None:
    rooted = data.draw(st.sets(st.sampled_from(keys)))
    sd = {("model." + k if k in rooted else k): bst.FakeTensor(k) for k in keys}
    plain = ADAPTER.from_hf({k: bst.FakeTensor(k) for k in keys}, stage=2, strict=False)
    out = ADAPTER.from_hf(sd, stage=2, strict=False)
    assert list(out) == list(plain)


@pytest.mark.parametrize("bucket", [b for b in Bucket if b is not Bucket.UNKNOWN])
def test_every_bucket_strategy_generates_keys_of_that_bucket(bucket: Bucket) -> None:
    @given(bst.keys((bucket,)))
    def check(key: str) -> None:
        assert bv.classify(key) is bucket

    check()
