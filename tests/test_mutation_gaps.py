"""Behaviour a mutation run of the core modules showed no test pinned (see MUTATION.md).

Each test names what a user would notice if the code drifted: a bucket, a count in
``memo_stats()``, a log line, a message, the set of family names.
"""

from __future__ import annotations

import logging

import pytest

import bagelverify as bv
from bagelverify import Bucket, compile_matcher
from bagelverify.errors import format_examples
from bagelverify.families import FAMILIES, FAMILY_BY_NAME, family_of
from bagelverify.matcher import Matcher, literal_prefix
from bagelverify.plan import plan

Q = "language_model.model.layers.0.self_attn.q_proj.weight"
Q_GEN = "language_model.model.layers.0.self_attn.q_proj_moe_gen.weight"


def _vit_norm(layer: int, norm: int) -> str:
    return f"vit_model.vision_model.encoder.layers.{layer}.layer_norm{norm}.weight"


def _memo_only(matcher: Matcher, monkeypatch: pytest.MonkeyPatch) -> None:
    """From now on ``matcher`` can answer only from its memo: the regex path raises."""

    def regex_path(key: str) -> Bucket:
        raise AssertionError(f"{key!r} was not answered from the memo")

    monkeypatch.setattr(matcher, "classify_uncached", regex_path)


# -- the digit-template memo ------------------------------------------------------------------


def test_safe_templates_get_one_memo_entry_each_and_answer_from_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    matcher = compile_matcher()
    keys = [f"language_model.model.layers.1.{'x' * i}" for i in range(10)]  # 10 templates
    assert {matcher.classify(k) for k in keys} == {Bucket.UNKNOWN}
    assert matcher.memo_stats() == (10, 0, 0, 8192)
    _memo_only(matcher, monkeypatch)
    assert matcher.classify("language_model.model.layers.7.xxx") is Bucket.UNKNOWN


def test_an_unsafe_template_is_refined_on_its_literal_digit_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``layers.#.layer_norm#``: the norm digit decides (norm3 is unknown), the layer digit does
    not. Ten layers share one refined entry, and a new layer is answered from it."""
    matcher = compile_matcher()
    for layer in range(9):
        assert matcher.classify(_vit_norm(layer, 1)) is Bucket.UND
    assert matcher.memo_stats() == (0, 1, 1, 8192)
    _memo_only(matcher, monkeypatch)
    assert matcher.classify(_vit_norm(9, 1)) is Bucket.UND
    monkeypatch.undo()
    assert matcher.classify(_vit_norm(4, 3)) is Bucket.UNKNOWN
    assert matcher.classify(_vit_norm(5, 2)) is Bucket.UND
    assert matcher.memo_stats() == (0, 1, 3, 8192)  # one refined entry per norm digit


def test_clear_memo_forgets_every_table_and_keeps_the_answers() -> None:
    matcher = compile_matcher()
    keys = [Q, Q_GEN, _vit_norm(3, 1), _vit_norm(3, 3), "connector.fc2.bias"]
    before = [matcher.classify(k) for k in keys]
    stats = matcher.memo_stats()
    assert stats.safe and stats.unsafe and stats.refined
    matcher.clear_memo()
    assert matcher.memo_stats() == (0, 0, 0, 8192)
    assert [matcher.classify(k) for k in keys] == before
    assert matcher.memo_stats() == stats


def test_memo_tables_fill_up_to_their_bound_before_emptying() -> None:
    matcher = compile_matcher(memo_size=4)
    keys = [f"language_model.model.layers.1.{'x' * i}" for i in range(5)]
    for count, key in enumerate(keys[:4], start=1):
        matcher.classify(key)
        assert matcher.memo_stats().safe == count
    matcher.classify(keys[4])  # full: emptied, then the new entry
    assert matcher.memo_stats() == (1, 0, 0, 4)


def test_memo_size_zero_answers_without_memoising() -> None:
    matcher = compile_matcher(memo_size=0)
    assert [matcher.classify(k) for k in (Q, Q, _vit_norm(1, 1))] == [Bucket.UND] * 3
    assert matcher.memo_stats() == (0, 0, 0, 0)
    assert repr(matcher).endswith("memo_size=0)")


# -- empty and anchor-only patterns -------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["", r"\A", "^", r"\A\Z", r"^\A"])
def test_patterns_without_literal_text_match_what_fullmatch_matches(pattern: str) -> None:
    assert literal_prefix(pattern) == ""
    matcher = compile_matcher(und=[pattern], gen=[], vae=[], extra=[])
    assert matcher.classify("") is Bucket.UND
    assert matcher.classify("a") is Bucket.UNKNOWN
    assert matcher.candidates("abc") == [(Bucket.UND, pattern)]


def test_literal_prefix_skips_every_leading_start_anchor() -> None:
    assert literal_prefix(r"^\A^ab\.c") == "ab.c"
    assert literal_prefix(r"\A\Aab") == "ab"


# -- the family table ---------------------------------------------------------------------------

FAMILY_NAMES = {
    "embed_tokens",
    "lm_head",
    *(
        name + suffix
        for name in (
            "norm",
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "q_norm",
            "k_norm",
            "gate_proj",
            "up_proj",
            "down_proj",
            "input_layernorm",
            "post_attention_layernorm",
        )
        for suffix in ("", "_moe_gen")
    ),
    "time_embedder.0",
    "time_embedder.2",
    "vae2llm",
    "llm2vae",
    "latent_pos_embed",
    "vit.position_embedding",
    "vit.rope",
    "vit.patch_embedding",
    "vit.q_proj",
    "vit.k_proj",
    "vit.v_proj",
    "vit.out_proj",
    "vit.layer_norm1",
    "vit.layer_norm2",
    "vit.fc1",
    "vit.fc2",
    "vit.post_layernorm",
    "connector.fc1",
    "connector.fc2",
    "vit_pos_embed",
    "vae.encoder",
    "vae.decoder",
    "extra_state",
}


def test_family_names_are_pinned() -> None:
    """Family names are public (``FAMILY_BY_NAME``, twin links, reports): renaming one is a
    breaking change this test must be edited for."""
    assert [f.name for f in FAMILIES] == list(FAMILY_BY_NAME)
    assert set(FAMILY_BY_NAME) == FAMILY_NAMES
    assert len(FAMILIES) == len(FAMILY_NAMES) == 49


@pytest.mark.parametrize(
    ("key", "name"),
    [
        (Q, "q_proj"),
        (Q_GEN, "q_proj_moe_gen"),
        ("language_model.model.norm_moe_gen.weight", "norm_moe_gen"),
        ("encoder.weight", "vae.encoder"),  # the optional dotted part of {path} is optional
        ("decoder.conv_in.bias", "vae.decoder"),
        ("_extra_state", "extra_state"),
        ("vit_model.vision_model.rope.sin_w", "vit.rope"),
    ],
)
def test_family_of_names_the_family_of_a_key(key: str, name: str) -> None:
    assert family_of(key) is FAMILY_BY_NAME[name]


@pytest.mark.parametrize("key", ["bogus", "", "encoder.", "encoder._x", "model." + Q])
def test_family_of_an_unknown_key_is_none(key: str) -> None:
    assert family_of(key) is None


# -- plan and the adapter's log lines -------------------------------------------------------------


def test_plan_defaults_to_stage1() -> None:
    report = plan([Q, Q_GEN])
    assert report.stage == "stage1"
    assert report.kept == [Q]
    assert report.dropped[Bucket.GEN] == [Q_GEN]


def test_non_strict_from_hf_without_unknown_keys_logs_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.DEBUG, logger="bagelverify"):
        out = bv.BagelStateDictAdapter().from_hf({Q: 1}, strict=False)
    assert out == {"model." + Q: 1}
    assert caplog.records == []


def test_to_hf_logs_the_number_of_extra_state_entries_it_drops(
    caplog: pytest.LogCaptureFixture,
) -> None:
    native = {"model." + Q: 1, "model.a._extra_state": 2, "model._extra_state": 3}
    with caplog.at_level(logging.DEBUG, logger="bagelverify"):
        assert bv.BagelStateDictAdapter().to_hf(native) == {Q: 1}
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.INFO, "dropping 2 Transformer-Engine ._extra_state entries")
    ]


# -- format_examples ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "expected"),
    [
        (0, ""),
        (1, "'k0'"),
        (5, "'k0', 'k1', 'k2', 'k3', 'k4'"),
        (6, "'k0', 'k1', 'k2', 'k3', 'k4' (and 1 more)"),
        (8, "'k0', 'k1', 'k2', 'k3', 'k4' (and 3 more)"),
    ],
)
def test_format_examples_shows_five_then_counts_the_rest(count: int, expected: str) -> None:
    assert format_examples([f"k{i}" for i in range(count)]) == expected


def test_format_examples_takes_a_limit_and_reprs_pairs() -> None:
    assert format_examples([("a", "b"), ("c", "d")], limit=1) == "('a', 'b') (and 1 more)"
    assert format_examples(["a", "b"], limit=2) == "'a', 'b'"
