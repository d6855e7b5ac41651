"""The compiled matcher gives the naive reference's answer for every key, on the shipped patterns
and on generated pattern sets; its memo is bounded and safe under concurrent readers."""

from __future__ import annotations

import random
import re
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bagelverify import Bucket, classify
from bagelverify import strategies as bst
from bagelverify.buckets import MATCH_ORDER
from bagelverify.errors import PatternError
from bagelverify.manifest import load_manifest
from bagelverify.matcher import (
    PLACEHOLDER,
    Matcher,
    NaiveMatcher,
    compile_matcher,
    literal_prefix,
    shipped_patterns,
)

NAIVE = NaiveMatcher()
SHARED = compile_matcher()  # shared across examples, so later examples meet a warm memo
TINY = compile_matcher(memo_size=4)  # cleared all the time: mostly cold misses
REAL_KEYS = [key for entries in load_manifest().values() for key in entries]

ASCII_DIGITS = "0123456789"


def digit_variants(key: str) -> st.SearchStrategy[str]:
    """``key`` with each ASCII digit replaced by a drawn ASCII digit (same template)."""
    positions = [i for i, ch in enumerate(key) if ch in ASCII_DIGITS]
    return st.lists(
        st.sampled_from(ASCII_DIGITS), min_size=len(positions), max_size=len(positions)
    ).map(lambda digits: _put(key, positions, digits))


def _put(key: str, positions: list[int], digits: list[str]) -> str:
    chars = list(key)
    for index, digit in zip(positions, digits, strict=True):
        chars[index] = digit
    return "".join(chars)


def with_digit_variants(keys: st.SearchStrategy[str]) -> st.SearchStrategy[list[str]]:
    """A key followed by a few variants that share its digit template."""
    return keys.flatmap(lambda k: st.lists(digit_variants(k), max_size=4).map(lambda v: [k, *v]))


# -- shipped patterns ---------------------------------------------------------------------------


@given(st.lists(with_digit_variants(bst.any_keys()), max_size=6))
def test_compiled_equals_naive_on_any_keys_and_their_digit_variants(
    groups: list[list[str]],
) -> None:
    for key in (k for group in groups for k in group):
        expected = NAIVE.classify(key)
        assert SHARED.classify(key) is expected, key
        assert TINY.classify(key) is expected, key
        assert SHARED.classify_uncached(key) is expected, key


@given(with_digit_variants(bst.near_miss_keys()))
def test_near_misses_and_their_digit_variants_are_unknown_to_the_compiled_matcher(
    keys: list[str],
) -> None:
    for key in keys:
        assert SHARED.classify(key) is NAIVE.classify(key), key


@given(bst.keys())
def test_public_classify_uses_a_matcher_equal_to_naive(key: str) -> None:
    assert classify(key) is NAIVE.classify(key)


def test_compiled_equals_naive_on_every_real_key_twice() -> None:
    matcher = compile_matcher()
    expected = [NAIVE.classify(key) for key in REAL_KEYS]
    assert [matcher.classify(key) for key in REAL_KEYS] == expected  # cold memo
    assert [matcher.classify(key) for key in REAL_KEYS] == expected  # warm memo
    assert Bucket.UNKNOWN not in expected


#: Keys whose digits are part of the family name: a memo keyed on "all digits alike" would
#: answer the second key of each group from the first one (``connector.fc2.weight`` unknown).
LITERAL_DIGIT_GROUPS = [
    [
        ("connector.fc1.weight", Bucket.UND),
        ("connector.fc2.weight", Bucket.UND),
        ("connector.fc3.weight", Bucket.UNKNOWN),
        ("connector.fc2.bias", Bucket.UND),
        ("connector.fc0.bias", Bucket.UNKNOWN),
    ],
    [
        ("time_embedder.mlp.0.weight", Bucket.GEN),
        ("time_embedder.mlp.2.weight", Bucket.GEN),
        ("time_embedder.mlp.1.weight", Bucket.UNKNOWN),
        ("time_embedder.mlp.2.bias", Bucket.GEN),
        ("time_embedder.mlp.9.bias", Bucket.UNKNOWN),
    ],
    [
        ("vae2llm.weight", Bucket.GEN),
        ("llm2vae.weight", Bucket.GEN),
        ("vae3llm.weight", Bucket.UNKNOWN),
        ("llm1vae.bias", Bucket.UNKNOWN),
        ("llm2vae.bias", Bucket.GEN),
    ],
    [
        ("vit_model.vision_model.encoder.layers.0.layer_norm1.weight", Bucket.UND),
        ("vit_model.vision_model.encoder.layers.7.layer_norm2.weight", Bucket.UND),
        ("vit_model.vision_model.encoder.layers.7.layer_norm3.weight", Bucket.UNKNOWN),
        ("vit_model.vision_model.encoder.layers.12.layer_norm1.bias", Bucket.UND),
        ("vit_model.vision_model.encoder.layers.25.mlp.fc2.bias", Bucket.UND),
        ("vit_model.vision_model.encoder.layers.25.mlp.fc3.bias", Bucket.UNKNOWN),
        ("vit_model.vision_model.encoder.layers.3.layer_norm1.weight", Bucket.UND),
    ],
]


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reversed"])
@pytest.mark.parametrize("group", LITERAL_DIGIT_GROUPS, ids=lambda g: g[0][0].split(".")[0])
def test_literal_digits_are_told_apart_in_any_order(
    group: list[tuple[str, Bucket]], reverse: bool
) -> None:
    matcher = compile_matcher()
    for key, bucket in reversed(group) if reverse else group:
        for _ in range(2):  # the second time may come from the memo
            assert matcher.classify(key) is bucket, key
    assert matcher.memo_stats().unsafe >= 1  # their shared template was found unsafe


def test_layer_numbers_share_one_memo_entry() -> None:
    matcher = compile_matcher()
    for layer in range(10, 100):
        key = f"language_model.model.layers.{layer}.mlp_moe_gen.up_proj.weight"
        assert matcher.classify(key) is Bucket.GEN
    assert matcher.memo_stats().safe == 1


def test_non_ascii_keys_and_the_placeholder_character_skip_the_memo() -> None:
    patterns = {Bucket.UND: [r"\Aa[0-9]\Z"], Bucket.GEN: [r"\Aa" + PLACEHOLDER + r"\Z"]}
    matcher = Matcher(patterns)
    assert matcher.classify("a1") is Bucket.UND  # memoises the template of "a1"
    assert matcher.memo_stats().safe == 1
    assert matcher.classify("a" + PLACEHOLDER) is Bucket.GEN  # same bytes, never the memo
    assert matcher.classify("a\u0663") is Bucket.UNKNOWN  # [0-9] is ASCII; no memo either


# -- generated pattern sets ---------------------------------------------------------------------

_LITERAL_TEXT = st.text("ab._", min_size=1, max_size=3).map(re.escape)
_ALTERNATION = st.builds(
    lambda group, alts: group + "|".join(map(re.escape, alts)) + ")",
    st.sampled_from(["(?:", "("]),
    st.lists(st.text("ab0129", min_size=1, max_size=3), min_size=2, max_size=3),
)
_PIECES = st.one_of(
    _LITERAL_TEXT,
    st.sampled_from(["[0-9]+", "[12]", "0", "1", "2", "9", r"\d"]),
    _ALTERNATION,
)

patterns_from_subset: st.SearchStrategy[str] = st.builds(
    lambda pieces, tail: r"\A" + "".join(pieces) + (".*" if tail else "") + r"\Z",
    st.lists(_PIECES, min_size=1, max_size=4),
    st.booleans(),
)
"""Full-match patterns from a regex subset: literals, ``[0-9]+``, ``[12]``, literal digits,
``\\d``, alternation groups (capturing or not) and ``.*`` tails, anchored ``\\A...\\Z``."""

pattern_sets = st.fixed_dictionaries(
    {bucket: st.lists(patterns_from_subset, max_size=3) for bucket in MATCH_ORDER}
)


@st.composite
def keys_hitting(draw: st.DrawFn, patterns: dict[Bucket, list[str]]) -> list[str]:
    """Keys generated from the patterns themselves plus short random text, each followed by
    digit variants (same template) and one key with a digit inserted or removed."""
    every = [p for ps in patterns.values() for p in ps]
    sources = [st.text("ab._0129\n", max_size=8)]
    if every:
        sources.append(st.sampled_from(every).flatmap(lambda p: st.from_regex(p, fullmatch=True)))
    keys: list[str] = []
    for key in draw(st.lists(st.one_of(*sources), min_size=1, max_size=6)):
        keys.append(key)
        keys.extend(draw(st.lists(digit_variants(key), max_size=3)))
        where = draw(st.integers(0, len(key)))
        keys.append(key[:where] + draw(st.sampled_from(ASCII_DIGITS)) + key[where:])
        keys.append(re.sub("[0-9]", "", key, count=1))
    return keys


@settings(deadline=None)
@given(
    pattern_sets.flatmap(lambda ps: st.tuples(st.just(ps), keys_hitting(ps))),
    st.sampled_from([1, 2, 3, 4, 5, 8192]),
)
def test_compiled_equals_naive_on_generated_pattern_sets(
    case: tuple[dict[Bucket, list[str]], list[str]], memo_size: int
) -> None:
    """Also with tiny memos, so that entries are evicted and proven again in every order."""
    patterns, keys = case
    naive = NaiveMatcher(patterns)
    compiled = Matcher(patterns, memo_size=memo_size)
    for key in keys + keys[::-1] + keys:  # later rounds meet a warm (or churned) memo
        assert compiled.classify(key) is naive.classify(key), (key, patterns)


@given(
    patterns_from_subset.flatmap(lambda p: st.tuples(st.just(p), st.from_regex(p, fullmatch=True)))
)
def test_every_full_match_starts_with_the_literal_prefix(case: tuple[str, str]) -> None:
    pattern, key = case
    assert key.startswith(literal_prefix(pattern))


@given(bst.any_keys())
def test_every_pattern_that_matches_a_key_is_a_candidate(key: str) -> None:
    candidates = SHARED.candidates(key)
    for bucket, patterns in shipped_patterns().items():
        for pattern in patterns:
            if re.fullmatch(pattern, key):
                assert (bucket, pattern) in candidates


@pytest.mark.parametrize(
    ("pattern", "prefix"),
    [
        (r"\Aconnector\.fc1\.(?:weight|bias)\Z", "connector.fc1."),
        (r"\Alayers\.[0-9]+\.x\Z", "layers."),
        (r"^abc", "abc"),
        (r"ab*c", "a"),
        (r"\Aab|\Aac", "a"),  # the parser factors out the common prefix
        (r"(?i)\Aabc", ""),
        (r"\A(?:ab)c", "abc"),  # a non-capturing group is flattened by the parser
        (r"\A(ab)c", ""),
        (r"\A[0-9A-Za-z_.]+\._extra_state\Z", ""),
    ],
)
def test_literal_prefix_is_the_literal_run_after_the_start_anchor(
    pattern: str, prefix: str
) -> None:
    assert literal_prefix(pattern) == prefix


# -- memo bound, threads, construction ----------------------------------------------------------


def _distinct_templates(count: int) -> Iterator[str]:
    """Keys with pairwise distinct digit templates: safe ones, unsafe ones, refined ones."""
    for i in range(count):
        yield "language_model.model.layers.1." + "x" * i  # safe (unknown)
        yield f"connector.fc{i % 3}." + "w" * i  # unsafe template, refined per digit
        yield f"vit_model.vision_model.encoder.layers.{i}.layer_norm{i % 3}.weight"


def test_memo_stays_bounded_under_a_stream_of_distinct_templates() -> None:
    matcher = compile_matcher(memo_size=16)
    for key in _distinct_templates(400):
        assert matcher.classify(key) is NAIVE.classify(key)
        stats = matcher.memo_stats()
        assert max(stats.safe, stats.unsafe, stats.refined) <= stats.limit == 16


def test_refined_entries_never_answer_under_a_mask_recomputed_after_eviction() -> None:
    """The literal positions of an unsafe template depend on the key they were computed from
    ("1x2": positions 0, 2; "21x": positions 0, 1). After the masks are evicted and "###" gets
    the other mask, the entry "1#2" -> und must not answer "123" (digits 1, 2 at 0, 1)."""
    patterns = {Bucket.UND: [r"\A1[0-9][12][0-9]*\Z", r"\A2[12][0-9][0-9]*\Z"]}
    matcher, naive = Matcher(patterns, memo_size=4), NaiveMatcher(patterns)
    sequence = ["1122", "11222", "111222", "1132", "1142", "112", "1111222", "215", "123"]
    assert [matcher.classify(k) for k in sequence] == [naive.classify(k) for k in sequence]


def test_a_key_with_thousands_of_digits_is_answered_without_refining_it() -> None:
    matcher = compile_matcher()
    key = "vit_model.vision_model.encoder.layers.1.layer_norm" + "1" * 5000
    for _ in range(2):
        assert matcher.classify(key) is Bucket.UNKNOWN
    assert matcher.memo_stats() == (0, 1, 0, matcher.memo_stats().limit)  # unsafe, not refined
    assert matcher.classify(key[:-4999] + ".weight") is Bucket.UND


def test_concurrent_readers_get_identical_answers() -> None:
    keys = [*REAL_KEYS, *bst.FIXED_NEAR_MISSES, *_distinct_templates(50)]
    expected = [NAIVE.classify(key) for key in keys]
    matcher = compile_matcher(memo_size=32)  # small: threads also race on clearing it

    def reader(seed: int) -> bool:
        order = list(range(len(keys)))
        random.Random(seed).shuffle(order)
        return all(matcher.classify(keys[i]) is expected[i] for _ in range(3) for i in order)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            assert all(pool.map(reader, range(8)))
    finally:
        sys.setswitchinterval(interval)


def test_compile_matcher_defaults_to_the_shipped_patterns_per_bucket() -> None:
    assert compile_matcher().patterns == {b: tuple(p) for b, p in shipped_patterns().items()}
    only_und = compile_matcher(gen=[], vae=[], extra=[])
    assert only_und.classify("language_model.model.layers.0.mlp_moe_gen.up_proj.weight") is (
        Bucket.UNKNOWN
    )
    assert only_und.classify("connector.fc2.weight") is Bucket.UND
    custom = compile_matcher(extra=[r"\Aconnector\.fc2\.weight\Z"], und=[])
    assert custom.classify("connector.fc2.weight") is Bucket.EXTRA


def test_earlier_bucket_wins_when_user_patterns_overlap() -> None:
    matcher = compile_matcher(und=[r"\Aa[0-9]+\Z"], gen=[r"\Aa1\Z"], vae=[], extra=[r".*"])
    assert [matcher.classify(k) for k in ("a1", "a12", "a", "b")] == [
        Bucket.UND,
        Bucket.UND,
        Bucket.EXTRA,
        Bucket.EXTRA,
    ]


def test_patterns_with_backreferences_are_never_merged_into_one_alternation() -> None:
    matcher = compile_matcher(
        und=[r"\A(a)\1\Z", r"\A(b)\1\Z"], gen=[r"\A(?:a|b)+\Z"], vae=[], extra=[]
    )
    assert [matcher.classify(k) for k in ("aa", "bb", "ab", "b")] == [
        Bucket.UND,
        Bucket.UND,
        Bucket.GEN,
        Bucket.GEN,
    ]


def test_patterns_the_automaton_cannot_model_turn_the_memo_off_not_the_answers() -> None:
    patterns = {Bucket.UND: [r"\Aa(?=1)[0-9]\Z"], Bucket.GEN: [r"(?i)\AB[0-9]\Z"]}
    matcher = Matcher(patterns)
    assert matcher.memo_stats().limit == 0
    naive = NaiveMatcher(patterns)
    for key in ("a1", "a2", "b3", "B4", "c"):
        assert matcher.classify(key) is naive.classify(key)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"und": ["\\Aa(\\Z"]}, "und pattern #0 '\\\\Aa(\\\\Z' is not a valid regex"),
        ({"gen": [b"\\Aa\\Z"]}, "gen pattern #0 must be a str regex, got bytes"),
        ({"vae": "\\Aencoder\\..*"}, "vae patterns must be a list of regex strings"),
    ],
)
def test_bad_patterns_raise_pattern_error_naming_them(kwargs: dict, message: str) -> None:
    with pytest.raises(PatternError, match=re.escape(message)):
        compile_matcher(**kwargs)


def test_pattern_sets_may_name_buckets_by_value_but_not_unknown_ones() -> None:
    by_value = Matcher({"und": [r"\Aa\Z"], "extra": [r"\Ab\Z"]})  # type: ignore[dict-item]
    assert [by_value.classify(k) for k in "abc"] == [Bucket.UND, Bucket.EXTRA, Bucket.UNKNOWN]
    for name in ("unknown", Bucket.UNKNOWN, "UND", 1):
        with pytest.raises(PatternError, match="only \\['und', 'gen', 'vae', 'extra'\\]"):
            Matcher({name: [r"\Aa\Z"]})  # type: ignore[dict-item]
        with pytest.raises(PatternError):
            NaiveMatcher({name: [r"\Aa\Z"]})  # type: ignore[dict-item]


@pytest.mark.parametrize("key", [b"connector.fc1.weight", 12, None])
def test_non_str_keys_raise_type_error_naming_them(key: object) -> None:
    with pytest.raises(TypeError, match=re.escape(repr(key))):
        SHARED.classify(key)  # type: ignore[arg-type]


@pytest.mark.parametrize("memo_size", [-1, 1.5, True])
def test_bad_memo_size_is_rejected(memo_size: object) -> None:
    with pytest.raises(ValueError, match="memo_size"):
        compile_matcher(memo_size=memo_size)  # type: ignore[arg-type]
