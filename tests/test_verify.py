"""The proof obligations: green on the shipped patterns, witnesses for planted bugs."""

from __future__ import annotations

import json
import re
import runpy
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bagelverify as bv
from bagelverify import verify
from bagelverify.automata import DFA, template_verdict
from bagelverify.buckets import MATCH_ORDER
from bagelverify.cli import main
from bagelverify.commands.verify import read_pattern_file
from bagelverify.errors import PatternError, UnsupportedPattern
from bagelverify.families import FAMILY_BY_NAME
from bagelverify.manifest import load_manifest
from bagelverify.matcher import shipped_patterns
from bagelverify.verify import (
    FAILED,
    PROVED,
    SKIPPED,
    PatternReport,
    check_patterns,
)
from bagelverify.verify import digits as p3_digits
from bagelverify.verify.smt import Z3_MAX_CHAR, Z3Engine

ALL_SHIPPED = bv.UND_PATTERNS + bv.GEN_PATTERNS + bv.VAE_PATTERNS + bv.EXTRA_PATTERNS
DIGIT_SENSITIVE_FAMILIES = [
    "vit.layer_norm1",
    "vit.layer_norm2",
    "vit.fc1",
    "vit.fc2",
    "connector.fc1",
    "connector.fc2",
    "time_embedder.0",
    "time_embedder.2",
    "vae2llm",
    "llm2vae",
]


@pytest.fixture(scope="module")
def shipped() -> PatternReport:
    return check_patterns()


def failed_keys(report: PatternReport, name: str, engine: str = "automata") -> list[str]:
    obligation = report.obligation(name, engine)
    assert obligation.result == FAILED, obligation
    keys = [key for w in obligation.witnesses for key in w.keys]
    assert keys or obligation.name == "P5 hygiene", obligation
    return keys


# -- the shipped patterns ----------------------------------------------------------------------


def test_every_obligation_is_proved_on_the_shipped_patterns_by_both_engines(
    shipped: PatternReport,
) -> None:
    assert shipped.ok, shipped
    assert {(o.name, o.engine): o.result for o in shipped.obligations} == {
        **{(name, "automata"): PROVED for name in verify.STATEMENTS},
        ("P1 disjointness", "z3"): PROVED,
        ("P4 root mapping", "z3"): PROVED,
    }
    assert shipped.pattern_hash == verify.pattern_hash(
        {b: bv.__dict__[f"{b.name}_PATTERNS"] for b in MATCH_ORDER}
    )


def test_digit_sensitive_patterns_are_exactly_the_literal_digit_families(
    shipped: PatternReport,
) -> None:
    """The witness pairs name exactly the patterns whose text carries a literal digit."""
    witnesses = shipped.obligation("P3 digit symmetry").witnesses
    named = {FAMILY_BY_NAME[name].pattern for name in DIGIT_SENSITIVE_FAMILIES}
    assert {p for p in ALL_SHIPPED for w in witnesses if repr(p) in w.claim} == named
    dfa = DFA.from_patterns([(b, shipped_patterns()[b]) for b in MATCH_ORDER])
    for w in witnesses:
        inside, outside = w.keys
        pattern = next(p for p in named if repr(p) in w.claim)
        assert re.fullmatch(pattern, inside) and not re.fullmatch(pattern, outside)
        assert re.sub("[0-9]", "#", inside) == re.sub("[0-9]", "#", outside)
        assert template_verdict(dfa, re.sub("[0-9]", "#", inside), "#")[0] is False
        assert "template unsafe" in w.claim


def test_certificate_lists_engines_alphabets_and_hash(shipped: PatternReport) -> None:
    text = shipped.format()
    assert shipped.pattern_hash in text
    assert "U+0000..U+10FFFF" in text and "U+0000..U+2FFFF" in text
    assert "every obligation proved" in text
    document = shipped.to_json()
    assert document["ok"] is True and len(document["obligations"]) == len(shipped.obligations)


# -- semantics assumptions ---------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ALL_SHIPPED)
def test_shipped_pattern_is_full_match_with_ascii_digits(pattern: str) -> None:
    """Trailing '\\n' and Unicode digits are outside the language; no flags; anchors inside."""
    assert re.compile(pattern).flags == re.UNICODE
    assert pattern.startswith("\\A") and pattern.endswith("\\Z")
    members = [k for entries in load_manifest().values() for k in entries if re.match(pattern, k)]
    for key in members:
        assert not re.match(pattern, key + "\n") and not re.search(pattern, key + "\n")
        if re.search("[0-9]", key):
            assert not re.match(pattern, re.sub("[0-9]", "\u0663", key))
            assert not re.match(pattern, re.sub("[0-9]", "\uff11", key))


@pytest.mark.parametrize(
    "pattern",
    [r"(?=lm)lm_head", r"(?<!x)a", r"(a)\1", r"(?i)lm_head", r"(?m)^a$", r"(?s)a.b", r"a\bb"],
)
def test_both_engines_refuse_untranslatable_constructs(pattern: str) -> None:
    with pytest.raises(UnsupportedPattern, match=re.escape(repr(pattern))):
        check_patterns(und=[*bv.UND_PATTERNS, pattern])
    with pytest.raises(UnsupportedPattern):
        Z3Engine().regex(pattern)


def test_z3_refuses_inner_anchors_and_the_report_says_it_skipped() -> None:
    with pytest.raises(UnsupportedPattern, match="anchors only at the very start"):
        Z3Engine().regex(r"\Aa$\n")
    report = check_patterns(und=[*bv.UND_PATTERNS, r"\Alanguage_model\.x$\n"])
    z3_p1 = report.obligation("P1 disjointness", "z3")
    assert z3_p1.result == SKIPPED and "anchors only" in z3_p1.detail
    assert report.obligation("P1 disjointness").result == PROVED


def test_z3_alphabet_stops_at_0x2ffff_and_the_automaton_does_not() -> None:
    """Honesty check: a language of characters above U+2FFFF is empty for z3, not for us."""
    high = f"[\\U{Z3_MAX_CHAR + 1:08x}-\\U0010ffff]"
    engine = Z3Engine()
    assert engine.common(engine.regex(high), engine.regex(".")).status == "unsat"
    witness = DFA.membership([high]).shortest(lambda label: label is not None)
    assert witness is not None and re.fullmatch(high, witness)


_Z3_LEAVES = st.sampled_from(
    ["a", "b", "0", "1", "\\n", "\\.", "\u0663", ".", "[ab]", "[^a]", "[0-9]", "\\d", "\\w", ""]
)
Z3_PATTERNS = st.recursive(
    _Z3_LEAVES,
    lambda children: st.one_of(
        st.tuples(children, children).map("".join),
        st.tuples(children, children).map(lambda ab: f"(?:{ab[0]}|{ab[1]})"),
        st.tuples(children, st.sampled_from(["*", "+", "?", "{1,2}"])).map(
            lambda ab: f"(?:{ab[0]}){ab[1]}"
        ),
    ),
    max_leaves=5,
).flatmap(lambda body: st.sampled_from([body, f"\\A{body}\\Z", f"^{body}$"]))


@settings(max_examples=40, deadline=None)
@given(
    pattern=Z3_PATTERNS,
    subjects=st.lists(st.text(alphabet="ab01\n.\u0663", max_size=5), min_size=1, max_size=8),
)
def test_z3_translation_accepts_exactly_what_re_fullmatch_accepts(
    pattern: str, subjects: list[str]
) -> None:
    """Invariant: for strings over z3's alphabet, s in z3regex(p) iff re.fullmatch(p, s)."""
    engine = Z3Engine()
    regex = engine.regex(pattern)
    for text in subjects:
        single = engine.regex(re.escape(text))
        expected = re.fullmatch(pattern, text) is not None
        assert (engine.common(regex, single).status == "sat") == expected, (pattern, text)


# -- planted bugs (mutation tests) -------------------------------------------------------------


def test_language_model_wildcard_in_und_overlaps_gen_with_a_concrete_key() -> None:
    wildcard = r"language_model\..*"
    report = check_patterns(und=[*bv.UND_PATTERNS, wildcard])
    assert not report.ok
    for engine in ("automata", "z3"):
        keys = failed_keys(report, "P1 disjointness", engine)
        overlap = [k for k in keys if any(re.fullmatch(p, k) for p in bv.GEN_PATTERNS)]
        assert overlap, keys
        assert all(re.fullmatch(wildcard, k) for k in overlap)
        assert repr(overlap[0]) in repr(report)
    assert "P1 disjointness [automata] failed" in repr(report)
    # the wildcard also swallows every GEN key of the manifest and makes UND patterns redundant
    assert len(failed_keys(report, "P2 coverage")) == verify.MAX_WITNESSES
    assert "is subsumed by" in repr(report)


def test_dollar_pattern_is_not_self_contained_witness_is_key_plus_newline() -> None:
    dollar = bv.UND_PATTERNS[0].removesuffix("\\Z") + "$"
    report = check_patterns(und=[dollar, *bv.UND_PATTERNS[1:]], use_z3=False)
    (key,) = failed_keys(report, "S1 self-contained")
    assert key.endswith("\n") and re.match(dollar, key) and not re.fullmatch(dollar, key)


def test_unicode_digit_class_lets_in_a_non_ascii_layer_number() -> None:
    loose = bv.GEN_PATTERNS[1].replace("[0-9]", "\\d")
    report = check_patterns(gen=[bv.GEN_PATTERNS[0], loose, *bv.GEN_PATTERNS[2:]], use_z3=False)
    (key,) = failed_keys(report, "S2 ASCII keys")
    assert re.fullmatch(loose, key)
    assert any(c.isdecimal() and not c.isascii() for c in key)


def test_vae_pattern_overlapping_extra_state_is_found_by_both_engines() -> None:
    report = check_patterns(vae=[*bv.VAE_PATTERNS, r"\Aencoder\.[a-z]+\._extra_state\Z"])
    for engine in ("automata", "z3"):
        (key,) = failed_keys(report, "P1 disjointness", engine)
        assert any(re.fullmatch(p, key) for p in bv.EXTRA_PATTERNS)
        assert key.startswith("encoder.") and key.endswith("._extra_state")
    assert "family extra_state key also in vae" in repr(report)


def test_redundant_and_empty_patterns_are_reported() -> None:
    narrower = r"\Aencoder\.down\.[0-9]+\.weight\Z"
    report = check_patterns(vae=[*bv.VAE_PATTERNS, narrower, r"\Aa\Zb"], use_z3=False)
    claims = [w.claim for w in report.obligation("P5 hygiene").witnesses]
    assert any(repr(narrower) in c and "is subsumed by" in c for c in claims), claims
    assert any("matches no string" in c for c in claims), claims
    duplicate = check_patterns(und=[*bv.UND_PATTERNS, bv.UND_PATTERNS[3]], use_z3=False)
    assert [w.claim for w in duplicate.obligation("P5 hygiene").witnesses] == [
        f"und pattern {bv.UND_PATTERNS[3]!r} equals {bv.UND_PATTERNS[3]!r}"
    ]


def test_missing_pattern_leaves_manifest_keys_uncovered() -> None:
    dropped = FAMILY_BY_NAME["connector.fc2"].pattern
    report = check_patterns(und=[p for p in bv.UND_PATTERNS if p != dropped], use_z3=False)
    keys = failed_keys(report, "P2 coverage")
    assert set(keys) == {"connector.fc2.weight", "connector.fc2.bias"}
    assert failed_keys(report, "P2 family coverage") == ["connector.fc2.bias"]


def test_rooted_pattern_breaks_the_root_mapping() -> None:
    rooted = r"\Amodel\.language_model\.lm_head\.weight\Z"
    report = check_patterns(und=[*bv.UND_PATTERNS, rooted])
    for engine in ("automata", "z3"):
        keys = failed_keys(report, "P4 root mapping", engine)
        assert keys[0] == "model.language_model.lm_head.weight"


def test_unsound_memo_rule_would_be_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """P3 fails if the template walk treated every digit position as safe."""

    def always_safe(dfa: DFA, state: int, char: str, placeholder: str) -> int:
        return dfa.step(state, "0" if char == placeholder else char)

    monkeypatch.setattr(p3_digits, "template_step", always_safe)
    report = check_patterns(use_z3=False)
    obligation = report.obligation("P3 digit symmetry")
    assert obligation.result == FAILED
    template, key = obligation.witnesses[0].keys
    assert verify.PLACEHOLDER in template and re.sub("[0-9]", verify.PLACEHOLDER, key) == template


def test_report_repr_shows_each_failed_obligation_with_witness_keys() -> None:
    report = check_patterns(vae=[*bv.VAE_PATTERNS, r"\Aencoder\.[a-z]+\._extra_state\Z"])
    text = repr(report)
    assert text.startswith("PatternReport(ok=False")
    for o in report.failures:
        assert f"{o.name} [{o.engine}] failed" in text
        for w in o.witnesses:
            assert all(repr(k) in text for k in w.keys)


def test_check_patterns_rejects_a_bare_string() -> None:
    with pytest.raises(PatternError, match="must be a list of regex strings, not one str"):
        check_patterns(und=bv.UND_PATTERNS[0])  # type: ignore[arg-type]


# -- command line ------------------------------------------------------------------------------


def test_cli_json_certificate_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["ok"] is True
    assert {o["result"] for o in document["obligations"]} == {PROVED}


def test_cli_failure_prints_witness_and_exits_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    patterns = tmp_path / "patterns.json"
    patterns.write_text(json.dumps({"und": [*bv.UND_PATTERNS, r"language_model\..*"]}))
    assert main(["verify", "--patterns", str(patterns), "--no-z3"]) == 1
    out = capsys.readouterr().out
    assert "P1 disjointness" in out and "FAILED" in out
    assert "'language_model.model.norm_moe_gen.weight'" in out


def test_cli_rejects_unknown_bucket_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    patterns = tmp_path / "patterns.json"
    patterns.write_text(json.dumps({"udn": []}))
    assert main(["verify", "--patterns", str(patterns)]) == 2
    assert "udn" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "complaint"),
    [
        (b"[1, 2]", "found array"),
        (b'{"und": [], "und": []}', "'und'"),
        (b"{not json", "not valid JSON"),
        (b"\xff", "not UTF-8"),
    ],
)
def test_cli_pattern_file_faults_are_one_line_pattern_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, complaint: str
) -> None:
    patterns = tmp_path / "patterns.json"
    patterns.write_bytes(content)
    assert main(["verify", "--patterns", str(patterns)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(patterns) in err and complaint in err
    with pytest.raises(PatternError, match=complaint):
        read_pattern_file(str(patterns))


def test_proofs_script_prints_the_certificate(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    script = Path(__file__).resolve().parents[1] / "proofs" / "verify_patterns.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--no-z3"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(script), run_name="__main__")
    assert done.value.code == 0
    assert "every obligation proved" in capsys.readouterr().out


def test_check_patterns_is_exported() -> None:
    assert bv.check_patterns is check_patterns and "check_patterns" in bv.__all__
