"""Behaviour a mutation run of the core modules showed no test pinned (see MUTATION.md).

Each test names what a user would notice if the code drifted: a bucket, a count in
``memo_stats()``, a log line, a message, the set of family names.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

import pytest

import bagelverify as bv
from bagelverify import Bucket
from bagelverify import matcher as matcher_module
from bagelverify.errors import PatternError, format_examples
from bagelverify.families import FAMILIES, FAMILY_BY_NAME, Family, family_of
from bagelverify.matcher import Matcher, NaiveMatcher, compile_matcher, literal_prefix
from bagelverify.plan import describe_prefix, plan, unroot

# ``bagelverify.partition`` is also the name of a function the package exports
partition_module = importlib.import_module("bagelverify.partition")
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
    assert matcher.classify(_vit_norm(4, 3)) is Bucket.UNKNOWN
    assert matcher.classify(_vit_norm(5, 2)) is Bucket.UND
    assert matcher.memo_stats() == (0, 1, 3, 8192)  # one refined entry per norm digit
    _memo_only(matcher, monkeypatch)
    for norm, bucket in ((1, Bucket.UND), (2, Bucket.UND), (3, Bucket.UNKNOWN)):
        assert matcher.classify(_vit_norm(9, norm)) is bucket


def test_digits_that_do_not_decide_an_unknown_key_are_not_kept_literal() -> None:
    """First met through unknown keys (``layer_norm3``), the template still keeps only the norm
    digit literal: every layer shares the one refined entry."""
    matcher = compile_matcher()
    for layer in range(9):
        assert matcher.classify(_vit_norm(layer, 3)) is Bucket.UNKNOWN
    assert matcher.memo_stats() == (0, 1, 1, 8192)


@pytest.mark.parametrize(("digits", "refined"), [(32, 1), (33, 0)])
def test_unsafe_templates_with_up_to_32_digits_are_refined(digits: int, refined: int) -> None:
    matcher = compile_matcher()
    key = "vit_model.vision_model.encoder.layers." + "1" * (digits - 1) + ".layer_norm1.weight"
    assert matcher.classify(key) is Bucket.UND
    assert matcher.memo_stats() == (0, 1, refined, 8192)


def test_non_ascii_keys_leave_the_memo_untouched() -> None:
    matcher = compile_matcher()
    for key in ("language_model.model.layers.\u0663.x", "é.weight", Q.replace("q_", "q\u00e9")):
        assert matcher.classify(key) is Bucket.UNKNOWN
    assert matcher.memo_stats() == (0, 0, 0, 8192)


def test_a_wrong_automaton_verdict_is_logged_and_not_memoised(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The regexes decide; a verdict whose label disagrees with them is never memoised."""
    matcher = compile_matcher(und=[r"\Aa[0-9]\Z"], gen=[], vae=[], extra=[])
    monkeypatch.setattr(matcher_module, "template_verdict", lambda *args: (True, Bucket.GEN))
    with caplog.at_level(logging.DEBUG, logger="bagelverify"):
        assert matcher.classify("a1") is Bucket.UND
    assert matcher.memo_stats() == (0, 1, 0, 8192)  # remembered as unsafe, unrefinable
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (
            logging.WARNING,
            "automaton and regexes disagree on template 'a\\x80' (gen vs und); not memoised",
        )
    ]


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
    assert repr(matcher) == "Matcher(und=29, gen=17, vae=2, extra=1, memo_size=0)"


def test_the_memo_is_off_for_patterns_the_automaton_cannot_model(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.DEBUG, logger="bagelverify"):
        matcher = compile_matcher(und=[r"(?=a)a[0-9]"], gen=[], vae=[], extra=[])
    assert [r.getMessage() for r in caplog.records] == [
        "digit-template memo off: pattern '(?=a)a[0-9]': a lookahead/lookbehind assertion "
        "cannot be translated exactly into an automaton; rewrite the pattern without it "
        "(full-match patterns need only literals, classes, groups, alternation, repeats and "
        "the anchors \\A \\Z)"
    ]
    assert caplog.records[0].levelno == logging.INFO
    assert matcher.classify("a1") is Bucket.UND
    assert matcher.memo_stats() == (0, 0, 0, 0)
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="bagelverify"):  # memo_size=0: no automaton
        compile_matcher(und=[r"(?=a)a[0-9]"], memo_size=0)
    assert caplog.records == []


def test_patterns_with_inline_flags_are_matched_one_by_one() -> None:
    """Two ``(?i)`` patterns cannot share one alternation (global flags must lead a regex)."""
    matcher = compile_matcher(und=[r"(?i)\Aab\Z", r"(?i)\Acd\Z"], gen=[], vae=[], extra=[])
    assert [matcher.classify(k) for k in ("AB", "cD", "ac")] == [
        Bucket.UND,
        Bucket.UND,
        Bucket.UNKNOWN,
    ]


def test_keys_starting_with_no_literal_prefix_get_only_prefix_less_candidates() -> None:
    matcher = compile_matcher(und=[r"\AX[0-9]*\Z", r"\A.*y\Z"], gen=[], vae=[], extra=[])
    assert matcher.candidates("abc") == [(Bucket.UND, r"\A.*y\Z")]
    assert matcher.candidates("X1") == [(Bucket.UND, r"\AX[0-9]*\Z"), (Bucket.UND, r"\A.*y\Z")]
    assert [matcher.classify(k) for k in ("X12", "aby", "abc")] == [
        Bucket.UND,
        Bucket.UND,
        Bucket.UNKNOWN,
    ]


def test_naive_matcher_defaults_to_the_shipped_patterns() -> None:
    naive = NaiveMatcher()
    assert [naive.classify(k) for k in (Q, Q_GEN, "encoder.x", "_extra_state", "bogus")] == [
        Bucket.UND,
        Bucket.GEN,
        Bucket.VAE,
        Bucket.EXTRA,
        Bucket.UNKNOWN,
    ]


def test_classify_builds_the_shared_matcher_on_first_use(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(partition_module, "_MATCHER", None)
    assert bv.classify(Q) is Bucket.UND
    assert bv.partition([Q_GEN, "bogus"]) == {
        Bucket.UND: [],
        Bucket.GEN: [Q_GEN],
        Bucket.VAE: [],
        Bucket.EXTRA: [],
        Bucket.UNKNOWN: ["bogus"],
    }


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


def test_a_fresh_family_matches_with_named_slots_and_reads_the_layer() -> None:
    family = Family("t", "a.{layer}.{param}", Bucket.UND, ("w", "b"))
    found = family.match("a.12.b")
    assert found is not None and found.groupdict() == {"layer": "12", "param": "b"}
    assert family.layer_of("a.12.b") == 12
    assert family.layer_of("a.x.b") is None
    assert family.regex() == r"a\.[0-9]+\.(?:w|b)"
    assert FAMILY_BY_NAME["q_proj_moe_gen"].layer_of(Q_GEN.replace(".0.", ".27.")) == 27
    assert FAMILY_BY_NAME["lm_head"].layer_of("language_model.lm_head.weight") is None


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


def test_from_hf_non_strict_logs_each_dropped_bucket_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    keys = ["bogus", Q_GEN, "encoder.x", "a._extra_state"]
    with caplog.at_level(logging.DEBUG, logger="bagelverify"):
        out = bv.BagelStateDictAdapter(stage=2).from_hf(dict.fromkeys(keys, 0), strict=False)
    assert out == {"model." + Q_GEN: 0}
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "dropping 1 key of no BAGEL key family: 'bogus'"),
        (logging.WARNING, f"stage2: 1 GEN key without the UND twin: ({Q_GEN!r}, {Q!r})"),
        (
            logging.WARNING,
            "dropping 1 VAE keys (encoder./decoder.) merged into the model checkpoint; "
            "the VAE is loaded separately from ae.safetensors",
        ),
        (logging.INFO, "dropping 1 Transformer-Engine ._extra_state entries"),
    ]


def test_plan_log_defaults_to_strict_and_names_dropped_gen_keys(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Under ``strict`` the unknown keys and missing twins are errors, not log lines."""
    report = plan([Q, Q_GEN, "bogus", "language_model.model.norm_moe_gen.weight"])
    with caplog.at_level(logging.DEBUG, logger="bagelverify"):
        report.log()
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.INFO, "stage1: dropping 2 GEN keys")
    ]
    twinless = plan([Q_GEN], stage=2)
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="bagelverify"):
        twinless.log(strict=True)
    assert caplog.records == []


def test_plan_raise_for_problems_defaults_to_strict() -> None:
    with pytest.raises(bv.UnknownKeysError):
        plan(["bogus"]).raise_for_problems()
    plan(["bogus"]).raise_for_problems(strict=False)


def test_plan_keeps_classifying_after_a_collision() -> None:
    report = plan([Q, "model." + Q, "connector.fc1.bias", "bogus"])
    assert report.collisions == [(Q, "model." + Q)]
    assert report.kept == [Q, "connector.fc1.bias"]
    assert report.unknown == ["bogus"]


def test_adapter_plan_uses_the_adapters_stage() -> None:
    adapter = bv.BagelStateDictAdapter(stage=2)
    assert adapter.plan([Q, Q_GEN]).kept == [Q, Q_GEN]
    assert adapter.plan([Q, Q_GEN], stage=1).kept == [Q]


# -- the messages users see ---------------------------------------------------------------------

ADAPTER = bv.BagelStateDictAdapter()


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (
            lambda: ADAPTER.from_hf({Q: 1, "model." + Q: 2}),
            bv.KeyCollisionError,
            f"1 key occurs both unrooted and under the 'model.' root: ({Q!r}, 'model.{Q}'); "
            "both would load into the same parameter. Remove one of each pair from the state "
            "dict.",
        ),
        (
            lambda: ADAPTER.from_hf({"bogus": 1}),
            bv.UnknownKeysError,
            "1 key matches no BAGEL key family: 'bogus'. Check that this is a BAGEL-7B-MoT "
            "checkpoint (ema.safetensors), or pass strict=False (--no-strict) to drop them with "
            "a warning.",
        ),
        (
            lambda: ADAPTER.from_hf({Q_GEN: 1}, stage=2),
            bv.MissingKeysError,
            f"stage2: GEN keys lack their UND twin (1 key), e.g. ({Q_GEN!r}, {Q!r}) as (GEN key, "
            "missing UND key). The checkpoint is incomplete: fill the UND twins from a complete "
            "checkpoint (bagelverify repair SRC --base BASE -o OUT --stage 2), or pass "
            "strict=False (--no-strict) to load it anyway.",
        ),
        (
            lambda: ADAPTER.to_hf({Q: 1}),
            bv.RootError,
            f"1 native key is not under the 'model.' root: {Q!r}. to_hf takes the module's own "
            "state dict; HF-layout keys need no conversion.",
        ),
        (
            lambda: ADAPTER.to_hf({"model.head.weight": 1}),
            bv.UnknownKeysError,
            "1 native key is not a BAGEL UND or GEN key: 'model.head.weight'. Pass strict=False "
            "to convert them anyway, or exclude them with exclude_key_regex.",
        ),
        (
            lambda: ADAPTER.to_hf({}, quantization=True),
            ValueError,
            "to_hf(quantization=True): BAGEL-7B-MoT checkpoints hold no quantized tensors (no "
            "FP8 scales) to load or dequantize; remove quantization_config from the model's "
            "config",
        ),
        (
            lambda: ADAPTER.convert_single_tensor_to_hf("model." + Q, 1, quantization=True),
            ValueError,
            "to_hf(quantization=True): BAGEL-7B-MoT checkpoints hold no quantized tensors (no "
            "FP8 scales) to load or dequantize; remove quantization_config from the model's "
            "config",
        ),
        (
            lambda: ADAPTER.from_hf([Q]),
            TypeError,
            "hf_state_dict must be a mapping of str keys to tensors, got list",
        ),
        (
            lambda: ADAPTER.to_hf([Q]),
            TypeError,
            "state_dict must be a mapping of str keys to tensors, got list",
        ),
        (
            lambda: bv.partition(Q),
            TypeError,
            "partition() takes an iterable of keys or a mapping, not a single key",
        ),
        (
            lambda: list(FAMILY_BY_NAME["vae.encoder"].keys(bv.BagelConfig())),
            ValueError,
            "family 'vae.encoder' has no enumerable keys",
        ),
        (
            lambda: FAMILY_BY_NAME["extra_state"].expected_shapes(bv.BagelConfig()),
            ValueError,
            "family 'extra_state' has no enumerable keys",
        ),
    ],
    ids=[
        "collision",
        "unknown",
        "missing-twin",
        "root",
        "to_hf-unknown",
        "quantization",
        "single-tensor-quantization",
        "from_hf-mapping",
        "to_hf-mapping",
        "partition-one-key",
        "family-keys",
        "family-shapes",
    ],
)
def test_error_messages_are_pinned(call: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error) as info:
        call()
    assert str(info.value) == message


def test_bad_regex_messages_name_the_pattern_and_say_what_to_do() -> None:
    with pytest.raises(PatternError) as info:
        ADAPTER.to_hf({}, exclude_key_regex="(")
    text = str(info.value)
    assert text.startswith("exclude_key_regex '(' is not a valid regex: ")
    assert text.endswith(
        "; fix the pattern (it is matched with re.match against native, model.-rooted keys)"
    )
    for build in (NaiveMatcher, Matcher):
        with pytest.raises(PatternError) as info:
            build({"gen": ["x", "("]})
        text = str(info.value)
        assert text.startswith("gen pattern #1 '(' is not a valid regex: "), build
        assert text.endswith("; pass full-match patterns such as r'\\Aprefix\\.[0-9]+\\.weight\\Z'")


def test_errors_keep_the_keys_and_pairs_they_name() -> None:
    with pytest.raises(bv.KeyCollisionError) as collision:
        ADAPTER.from_hf({Q: 1, "model." + Q: 2})
    assert collision.value.pairs == [(Q, "model." + Q)]
    with pytest.raises(bv.RootError) as root:
        ADAPTER.to_hf({"a": 1, "model." + Q: 2, "b": 3})
    assert root.value.keys == ["a", "b"]
    with pytest.raises(bv.UnknownKeysError) as unknown:
        ADAPTER.to_hf({"model.head.weight": 1, "model." + Q: 2, "model.tail": 3})
    assert unknown.value.keys == ["model.head.weight", "model.tail"]
    assert str(bv.BagelError()) == ""


def test_to_hf_reads_past_excluded_and_extra_state_keys() -> None:
    native = {"model.head": 0, "model.a._extra_state": 1, "model." + Q: 2, "model." + Q_GEN: 3}
    assert ADAPTER.to_hf(native, exclude_key_regex=r"model\.head") == {Q: 2, Q_GEN: 3}


def test_non_strict_to_hf_warns_with_the_message_it_would_raise(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.DEBUG, logger="bagelverify"):
        out = ADAPTER.to_hf({"model.head.weight": 1, "model." + Q: 2}, strict=False)
    assert out == {"head.weight": 1, Q: 2}
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (
            logging.WARNING,
            "1 native key is not a BAGEL UND or GEN key: 'model.head.weight'; "
            "converting them unchanged",
        )
    ]


def test_to_hf_without_extra_state_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="bagelverify"):
        assert ADAPTER.to_hf({"model." + Q: 1}) == {Q: 1}
    assert caplog.records == []


def test_convert_single_tensor_to_hf_passes_exclude_and_strict_on() -> None:
    assert ADAPTER.convert_single_tensor_to_hf("model.head", 1, exclude_key_regex="model") == []
    assert ADAPTER.convert_single_tensor_to_hf("model.head", 1, strict=False) == [("head", 1)]


def test_family_keys_enumerate_each_key_once() -> None:
    """A family without a ``{layer}`` slot has one key per parameter, not one per layer."""
    config = bv.BagelConfig()
    assert list(FAMILY_BY_NAME["norm_moe_gen"].keys(config)) == [
        "language_model.model.norm_moe_gen.weight"
    ]
    q_proj = list(FAMILY_BY_NAME["q_proj"].keys(config))
    assert len(q_proj) == len(set(q_proj)) == 2 * config.num_hidden_layers
    for family in FAMILIES:
        if family.shape is not None:
            keys = list(family.keys(config))
            assert len(keys) == len(set(keys)), family.name


# -- issue 29: the doubly-rooted refusal and the plural forms of the messages -----------------

K = "language_model.model.layers.1.self_attn.k_proj.weight"


def test_unroot_reports_every_doubly_rooted_key_in_one_error() -> None:
    """Every key rooted twice is listed (in ``.keys`` and the message), and they are reported
    before keys that are not rooted at all."""
    doubly = ["model.model." + Q, "model.model." + K]
    with pytest.raises(bv.RootError) as info:
        unroot({"model." + Q: 1, doubly[0]: 2, "bare": 3, doubly[1]: 4})
    assert info.value.keys == doubly
    assert str(info.value) == (
        f"2 native keys are rooted twice ('model.''model.'...): {format_examples(doubly)}. "
        "A native key has one 'model.' root; strip the extra prefix (a module wrapped in "
        "another module adds one)."
    )
    with pytest.raises(bv.RootError, match=r"^1 native key is rooted twice") as one:
        unroot({doubly[1]: 1})
    assert one.value.keys == [doubly[1]]


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (
            lambda: unroot({Q: 1, "model." + K: 2, K: 3}),
            bv.RootError,
            f"2 native keys are not under the 'model.' root: {format_examples([Q, K])}. to_hf "
            "takes the module's own state dict; HF-layout keys need no conversion.",
        ),
        (
            lambda: ADAPTER.from_hf({Q: 1, "model." + Q: 2, K: 3, "model." + K: 4}),
            bv.KeyCollisionError,
            "2 keys occur both unrooted and under the 'model.' root: "
            f"{format_examples([(Q, 'model.' + Q), (K, 'model.' + K)])}; both would load into "
            "the same parameter. Remove one of each pair from the state dict.",
        ),
        (
            lambda: ADAPTER.to_hf({"model.head.weight": 1, "model.head.bias": 2}),
            bv.UnknownKeysError,
            "2 native keys are not BAGEL UND or GEN keys: 'model.head.weight', "
            "'model.head.bias'. Pass strict=False to convert them anyway, or exclude them with "
            "exclude_key_regex.",
        ),
    ],
    ids=["unrooted", "collisions", "to_hf-unknown"],
)
def test_plural_error_messages_are_pinned(call: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error) as info:
        call()
    assert str(info.value) == message


def test_error_attributes_keep_what_they_are_given() -> None:
    """The lists callers read from the errors, not only their messages."""
    missing = bv.MissingKeysError("m", ("a",), ("b", "c"))
    assert (missing.keys, missing.unexpected) == (["a"], ["b", "c"])
    mismatch = bv.ShapeMismatchError("m", [("k", (1, 2), (2, 1))])
    assert mismatch.mismatches == [("k", (1, 2), (2, 1))]


def test_a_wrapper_prefix_is_described_with_every_wrapper_that_adds_it() -> None:
    assert (
        describe_prefix("module.") == "'module.' (added by DistributedDataParallel / DataParallel)"
    )
    assert describe_prefix("module._orig_mod.") == (
        "'module._orig_mod.' (added by DistributedDataParallel / DataParallel, then torch.compile)"
    )
    assert describe_prefix("wrapper.") == "'wrapper.'"


def test_unknown_keys_behind_one_wrapper_prefix_are_told_to_strip_it() -> None:
    keys = ["module." + Q, "module." + K]
    assert plan(keys).unknown_advice() == (
        "Every one starts with 'module.' (added by DistributedDataParallel / DataParallel); "
        "without it they are BAGEL keys: pass strip_prefix='module.' (command line: "
        "--strip-prefix module.) to remove it, or save the unwrapped module's state dict."
    )
    assert plan(["module." + Q, "head.weight"]).unknown_advice().startswith("Check that this is")
