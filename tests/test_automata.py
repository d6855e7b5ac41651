"""The automaton engine against Python's ``re``: same languages, exact anchors, honest refusals."""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bagelverify.automata import (
    DFA,
    MAX_CHAR,
    UnsupportedPattern,
    category_set,
    complement,
    normalize,
    template_verdict,
    unicode_non_ascii_digits,
)
from bagelverify.buckets import MATCH_ORDER, Bucket
from bagelverify.errors import BagelError
from bagelverify.manifest import load_manifest
from bagelverify.matcher import NaiveMatcher, shipped_patterns

ALPHABET = "ab01\n._٣"
"""Subject characters: letters, ASCII digits, a newline, a Unicode digit (ARABIC-INDIC THREE)."""


def first_match(groups: Sequence[tuple[object, Sequence[str]]], text: str) -> object:
    """The reference: label of the first group with a pattern that ``re.fullmatch``-es ``text``."""
    for label, patterns in groups:
        if any(re.fullmatch(p, text) for p in patterns):
            return label
    return None


def all_strings(alphabet: str, max_len: int) -> list[str]:
    return [
        "".join(chars)
        for n in range(max_len + 1)
        for chars in itertools.product(alphabet, repeat=n)
    ]


# -- generated patterns ------------------------------------------------------------------------

_LEAVES = st.sampled_from(
    [
        "a",
        "b",
        "0",
        "1",
        "\\n",
        "\\.",
        "٣",
        ".",
        "[ab]",
        "[^a]",
        "[0-9]",
        "[a0-1]",
        "[^\\n0]",
        "\\d",
        "\\D",
        "\\w",
        "\\s",
        "\\W",
        "\\A",
        "\\Z",
        "^",
        "$",
        "",
    ]
)


def _combine(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.one_of(
        st.tuples(children, children).map("".join),
        st.tuples(children, children).map(lambda ab: f"(?:{ab[0]}|{ab[1]})"),
        children.map(lambda a: f"({a})"),
        st.tuples(children, st.sampled_from(["*", "+", "?", "*?", "{2}", "{0,2}", "{1,}"])).map(
            lambda ab: f"(?:{ab[0]}){ab[1]}"
        ),
    )


PATTERNS = st.recursive(_LEAVES, _combine, max_leaves=6)
SUBJECTS = st.text(alphabet=ALPHABET, max_size=6)


@settings(max_examples=300, deadline=None)
@given(
    groups=st.lists(st.lists(PATTERNS, min_size=1, max_size=3), min_size=1, max_size=3),
    subjects=st.lists(SUBJECTS, min_size=1, max_size=25),
)
def test_first_match_label_equals_re_fullmatch_reference(
    groups: list[list[str]], subjects: list[str]
) -> None:
    """Invariant: DFA.classify(s) == label of the first group with a re.fullmatch-ing pattern."""
    labelled = [(f"g{i}", patterns) for i, patterns in enumerate(groups)]
    dfa = DFA.from_patterns(labelled)
    for text in subjects:
        assert dfa.classify(text) == first_match(labelled, text), (labelled, text)


@settings(max_examples=200, deadline=None)
@given(pattern=PATTERNS, subjects=st.lists(SUBJECTS, min_size=1, max_size=25))
def test_membership_models_fullmatch_match_and_search(pattern: str, subjects: list[str]) -> None:
    """Invariant: index 0/1/2 is in the label iff re.fullmatch/re.match/re.search accepts."""
    dfa = DFA.membership([pattern] * 3, semantics=["fullmatch", "match", "search"])
    for text in subjects:
        label = dfa.classify(text) or frozenset()
        expected = {
            i
            for i, accepts in enumerate((re.fullmatch, re.match, re.search))
            if accepts(pattern, text)
        }
        assert label == expected, (pattern, text)


@settings(max_examples=150, deadline=None)
@given(
    groups=st.lists(st.lists(PATTERNS, min_size=1, max_size=3), min_size=1, max_size=3),
    keys=st.lists(st.text(alphabet="ab0123456789٣\n", max_size=6), min_size=1, max_size=25),
)
def test_safe_template_verdict_is_every_key_verdict(
    groups: list[list[str]], keys: list[str]
) -> None:
    """Invariant: template_verdict safe => its label is the re reference verdict of the key."""
    labelled = [(f"g{i}", patterns) for i, patterns in enumerate(groups)]
    dfa = DFA.from_patterns(labelled)
    for key in keys:
        safe, label = template_verdict(dfa, re.sub("[0-9]", "#", key), "#")
        if safe:
            assert label == first_match(labelled, key), (labelled, key)


def moore_classes(dfa: DFA) -> int:
    """Number of Myhill-Nerode classes, by plain Moore refinement (independent of Hopcroft)."""
    block: dict[int, object] = {s: dfa.label(s) for s in range(dfa.num_states)}
    while True:
        signature = {s: (block[s], tuple(block[t] for t in dfa.delta[s])) for s in block}
        ids = {sig: i for i, sig in enumerate(dict.fromkeys(signature.values()))}
        refined = {s: ids[signature[s]] for s in block}
        if len(set(refined.values())) == len(set(block.values())):
            return len(ids)
        block = dict(refined)


@settings(max_examples=100, deadline=None)
@given(groups=st.lists(st.lists(PATTERNS, min_size=1, max_size=3), min_size=1, max_size=3))
def test_dfa_is_minimal_and_every_state_reachable(groups: list[list[str]]) -> None:
    """Invariant: no two states are equivalent, and BFS from start reaches every state."""
    dfa = DFA.from_patterns([(f"g{i}", patterns) for i, patterns in enumerate(groups)])
    assert moore_classes(dfa) == dfa.num_states
    reached = {dfa.start}
    frontier = [dfa.start]
    while frontier:
        frontier = [t for s in frontier for t in dfa.delta[s] if t not in reached]
        reached.update(frontier)
    assert len(reached) == dfa.num_states


TRICKY = [
    r"\Aa$",
    r"a$",
    r"a$\n",
    r"a$\n$",
    r"a\Z\n",
    r"a$$",
    r"(?:a$|b)\n?",
    r"^a|b$",
    r"a^",
    r"(?:^|a)b",
    r"\A\Z",
    r"$",
    r"\n$",
    r"(?:a|\Z)*",
    r"(?:$\n)*",
    r"(?:a*)*b",
    r"(?:a|ab)(?:c|bcd)?",
    r"[^a]*",
    r"\d+",
    r"(?a)\d+",
    r"\w\W",
    r"\s?a",
    r"(?:a|b|)+?",
    r"a{0}b",
    r"(?:ab){1,3}",
    r"(?:ab*)?",
    r"(?:a(?:1|b)*){0,2}",
    r"(?:a*b|1)?a",
]


@pytest.mark.parametrize("pattern", TRICKY)
def test_tricky_patterns_agree_with_re_on_every_short_string(pattern: str) -> None:
    dfa = DFA.membership([pattern] * 3, semantics=["fullmatch", "match", "search"])
    for text in all_strings("ab\n٣ 1", 4):
        label = dfa.classify(text) or frozenset()
        expected = {
            i
            for i, accepts in enumerate((re.fullmatch, re.match, re.search))
            if accepts(pattern, text)
        }
        assert label == expected, (pattern, text)


# -- the traps ---------------------------------------------------------------------------------


def test_dollar_trap_full_match_excludes_newline_but_match_accepts_it() -> None:
    key = "language_model.model.norm.weight"
    pattern = r"\Alanguage_model\.model\.norm\.weight$"
    dfa = DFA.membership([pattern, pattern], semantics=["fullmatch", "match"])
    assert dfa.classify(key) == {0, 1}
    assert dfa.classify(key + "\n") == {1}  # re.match accepts the trailing newline
    assert re.match(pattern, key + "\n") and not re.fullmatch(pattern, key + "\n")
    assert DFA.from_patterns([("x", [r"a$\n"])]).classify("a\n") == "x"


def test_backslash_z_is_the_only_end() -> None:
    dfa = DFA.membership([r"\Aab\Z"] * 2, semantics=["fullmatch", "match"])
    assert dfa.classify("ab") == {0, 1}
    assert dfa.classify("ab\n") is None


def test_str_digit_class_is_unicode_and_ascii_flag_narrows_it() -> None:
    unicode_dfa = DFA.from_patterns([("d", [r"layers\.\d+"])])
    ascii_dfa = DFA.from_patterns([("d", [r"(?a)layers\.\d+"]), ("r", [r"layers\.[0-9]+"])])
    assert unicode_dfa.classify("layers.٣") == "d"
    assert ascii_dfa.classify("layers.٣") is None
    assert ascii_dfa.classify("layers.3") == "d"
    extra = unicode_non_ascii_digits()
    assert len(extra) > 50 and all(chr(lo).isdecimal() for lo, _ in extra)
    assert normalize([*category_set(r"\d", False), *category_set(r"\D", False)]) == ((0, MAX_CHAR),)


def test_dot_excludes_only_newline_and_classes_cover_all_unicode() -> None:
    dfa = DFA.from_patterns([("dot", ["."]), ("neg", ["[^a]"])])
    assert dfa.classify("\n") == "neg"
    assert dfa.classify(chr(MAX_CHAR)) == "dot"
    assert dfa.classify("\ud800") == "dot"  # lone surrogates are str characters too
    assert complement(((0, 9), (11, MAX_CHAR))) == ((10, 10),)


REFUSED = {
    "(?=a)a": "lookahead",
    "(?!b)a": "negative lookahead",
    "(?<=a)b": "lookahead/lookbehind",
    "(?<!a)b": "negative lookahead",
    "(a)\\1": "backreference",
    "(?P<x>a)(?P=x)": "backreference",
    "(a)?(?(1)b|c)": "conditional",
    "(?i)layers": "IGNORECASE",
    "(?m)^a$": "MULTILINE",
    "(?s)a.b": "DOTALL",
    "(?x)a b": "VERBOSE",
    "(?L)a": "'L' flag",  # re itself rejects LOCALE on str
    "(?i:a)b": "scoped flag",
    "a\\b": "zero-width assertion",
    "\\Ba": "zero-width assertion",
    "(?>a*)a": "atomic group",
    "a*+a": "possessive",
    "a{2000}": "repeat bound",
    "(": "not a valid regular expression",
}


@pytest.mark.parametrize(("pattern", "construct"), sorted(REFUSED.items()))
def test_untranslatable_constructs_are_refused_naming_pattern_and_construct(
    pattern: str, construct: str
) -> None:
    with pytest.raises(UnsupportedPattern) as info:
        DFA.from_patterns([("x", ["\\Aok\\Z", pattern])])
    message = str(info.value)
    assert repr(pattern) in message and construct in message
    assert isinstance(info.value, ValueError) and isinstance(info.value, BagelError)


def test_bytes_patterns_are_refused() -> None:
    with pytest.raises(UnsupportedPattern, match="only str patterns"):
        DFA.from_patterns([("x", [b"a"])])  # type: ignore[list-item]


# -- the shipped patterns ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped_dfa() -> DFA:
    patterns = shipped_patterns()
    return DFA.from_patterns([(bucket, patterns[bucket]) for bucket in MATCH_ORDER])


def test_shipped_dfa_classifies_every_manifest_key_like_the_naive_matcher(
    shipped_dfa: DFA,
) -> None:
    naive = NaiveMatcher()
    for entries in load_manifest().values():
        for key in entries:
            expected = naive.classify(key)
            got = shipped_dfa.classify(key)
            assert (got if got is not None else Bucket.UNKNOWN) == expected, key
            assert shipped_dfa.classify(key + "\n") is None
            if re.search("[0-9]", key) and expected is not Bucket.VAE:
                assert shipped_dfa.classify(re.sub("[0-9]", "٣", key)) is None, key


def test_step_is_total_and_dead_state_absorbs(shipped_dfa: DFA) -> None:
    state = shipped_dfa.run("no such key")
    assert shipped_dfa.is_dead(state) and shipped_dfa.label(state) is None
    assert shipped_dfa.step(state, "x") == state and shipped_dfa.digits_agree(state)
    assert shipped_dfa.step(shipped_dfa.start, chr(MAX_CHAR)) == state


@pytest.mark.parametrize(
    ("template", "safe", "label"),
    [
        ("language_model.model.layers.##.mlp.up_proj.weight", True, Bucket.UND),
        ("language_model.model.layers.#.mlp_moe_gen.up_proj.weight", True, Bucket.GEN),
        ("vit_model.vision_model.encoder.layers.#.mlp.fc#.bias", False, None),
        ("vit_model.vision_model.encoder.layers.#.layer_norm#.bias", False, None),
        ("connector.fc#.weight", False, None),
        ("time_embedder.mlp.#.bias", False, None),
        ("vae#llm.weight", False, None),
        ("llm#vae.bias", False, None),
        ("encoder.down.#.block.#.conv#.weight", True, Bucket.VAE),
        ("nothing.#", True, None),
        ("language_model.model.layers.٣.mlp.up_proj.weight", True, None),
    ],
)
def test_template_verdict_on_shipped_patterns(
    shipped_dfa: DFA, template: str, safe: bool, label: Bucket | None
) -> None:
    assert template_verdict(shipped_dfa, template, "#") == (safe, label)


def test_digits_agree_means_all_ten_successors_coincide(shipped_dfa: DFA) -> None:
    for state in range(shipped_dfa.num_states):
        successors = {shipped_dfa.step(state, d) for d in "0123456789"}
        assert shipped_dfa.digits_agree(state) == (len(successors) == 1)


def test_shortest_finds_a_shortest_member() -> None:
    dfa = DFA.membership([r"\Aab+c\Z", r"x|yy"])
    assert dfa.shortest(lambda label: label is not None and 0 in label) == "abc"
    assert dfa.shortest(lambda label: label is not None and 1 in label) == "x"
    assert dfa.shortest(lambda label: label == frozenset({0, 1})) is None
