"""Machine-checked properties of the key-pattern languages, for all strings; the ``verify`` command.

Semantics: the language of a pattern ``p`` is ``{s : re.fullmatch(p, s)}`` over Python ``str``;
a bucket's language is the union of its patterns'. Obligations (each with a name, a result, its
time and, when it fails, witness keys re-checked against Python's ``re`` before being reported):

S1 self-contained
    every pattern accepts the same strings under ``re.fullmatch``, ``re.match``, ``re.search``.
S2 ASCII keys
    no bucket language holds a string with a ``\\n`` or a non-ASCII (Unicode) decimal digit.
P1 disjointness
    no string is in two bucket languages (six pairs of UND, GEN, VAE, EXTRA).
P2 coverage
    every manifest key is in exactly one bucket language, the expected one (the design's rule);
    every family of the key-family table, for all layer numbers, is a subset of its bucket's
    language and disjoint from the other buckets' languages.
P3 digit symmetry
    which patterns can tell ASCII digits apart (a witness pair of keys each), and the soundness
    of :func:`~bagelverify.automata.template_verdict`: no key whose verdict depends on its digits
    is ever answered from a template judged safe.
P4 root mapping
    no UND/GEN/VAE key starts with ``model.``, so ``strip_root(to_native_key(k)) == k`` for every
    UND/GEN key (the root map is injective, inverted by the strip) and no rooted key is in the UND,
    GEN or VAE language; and no rooted UND/GEN key is in the EXTRA language (which accepts
    ``model.<stem>._extra_state`` by design: extra state is dropped wherever it sits).
P5 hygiene
    no pattern's language is empty; no pattern is subsumed by another of the same bucket.

Engines: our automaton engine (:mod:`bagelverify.automata`, alphabet: all of Unicode) decides
every obligation; z3's regular-expression theory (:mod:`bagelverify.smt`, alphabet
``U+0000..U+2FFFF``) independently re-decides P1 and P4.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import platform
import re
import sys
import time
import unicodedata
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from importlib import metadata
from itertools import combinations
from typing import Any

from .adapter import ROOT, strip_root, to_native_key
from .automata import (
    ASCII_DIGITS,
    DFA,
    MAX_CHAR,
    BreadthFirst,
    UnsupportedPattern,
    parse,
    template_step,
    template_verdict,
    unicode_non_ascii_digits,
)
from .buckets import MATCH_ORDER, Bucket
from .errors import PatternError
from .families import FAMILIES, MOE_SUFFIX
from .manifest import VAE_FILE, load_manifest
from .matcher import PLACEHOLDER as MEMO_PLACEHOLDER
from .matcher import NaiveMatcher, _build_dfa, choose_patterns, compile_matcher
from .strict_json import json_type, parse_json

logger = logging.getLogger(__name__)

EXAMPLE = "bagelverify verify --json"

PROVED, FAILED, UNKNOWN, SKIPPED = "proved", "failed", "unknown", "skipped"
"""Obligation results. ``unknown`` (an engine gave up) counts as not proved; ``skipped`` (an
engine not installed, or a pattern it cannot translate) is shown but fails nothing."""

MAX_WITNESSES = 5
"""Witnesses listed per failed obligation."""

#: Flow-matching parts of the generation path, by the design document (they have no UND twin).
FLOW_MATCHING_PREFIXES = ("time_embedder.", "vae2llm.", "llm2vae.", "latent_pos_embed.")
PLACEHOLDER = MEMO_PLACEHOLDER
"""The compiled matcher's placeholder. Template rule precondition: no key contains it (the matcher
memoises ASCII keys only and its placeholder is not ASCII); P3's literal characters avoid it."""
_LITERALS_AVOID = ASCII_DIGITS + PLACEHOLDER


def expected_bucket(file_name: str, key: str) -> Bucket:
    """The bucket the design document assigns to a manifest key, independently of any regex.

    ``ae.safetensors`` holds the VAE; in ``ema.safetensors`` a key is GEN when it is a
    ``_moe_gen`` twin or a flow-matching part, UND otherwise. Stated apart from the family table
    on purpose: P2 checks the patterns against the design, not against themselves.
    """
    if file_name == VAE_FILE:
        return Bucket.VAE
    if MOE_SUFFIX in key or key.startswith(FLOW_MATCHING_PREFIXES):
        return Bucket.GEN
    return Bucket.UND


# -- report ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Witness:
    """One concrete finding: what it shows, and the keys that show it."""

    claim: str
    keys: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"claim": self.claim, "keys": list(self.keys)}


@dataclass(frozen=True)
class Obligation:
    """The outcome of one proof obligation on one engine."""

    name: str
    engine: str
    statement: str
    result: str
    seconds: float
    detail: str = ""
    witnesses: tuple[Witness, ...] = ()
    """For a failure: the counterexamples; for P3: the digit-sensitive patterns (informative)."""

    @property
    def ok(self) -> bool:
        """Not a failure (proved, or skipped by an engine that could not run)."""
        return self.result in (PROVED, SKIPPED)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "engine": self.engine,
            "statement": self.statement,
            "result": self.result,
            "seconds": round(self.seconds, 4),
            "detail": self.detail,
            "witnesses": [w.to_json() for w in self.witnesses],
        }


@dataclass(frozen=True)
class PatternReport:
    """Every obligation checked on one pattern set; ``ok`` when none failed."""

    patterns: dict[Bucket, tuple[str, ...]]
    pattern_hash: str
    engines: dict[str, str]
    obligations: tuple[Obligation, ...]
    seconds: float = 0.0
    notes: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.obligations)

    @property
    def failures(self) -> list[Obligation]:
        return [o for o in self.obligations if not o.ok]

    def obligation(self, name: str, engine: str = "automata") -> Obligation:
        """The obligation named ``name`` (e.g. ``"P1 disjointness"``) decided by ``engine``."""
        for o in self.obligations:
            if o.name == name and o.engine == engine:
                return o
        raise KeyError(f"no obligation {name!r} on engine {engine!r}")

    def __repr__(self) -> str:
        head = f"PatternReport(ok={self.ok}, sha256={self.pattern_hash[:16]}"
        if self.ok:
            return f"{head}, {len(self.obligations)} obligations proved or skipped)"
        failed = "; ".join(
            f"{o.name} [{o.engine}] {o.result}: "
            + ", ".join(f"{w.claim} {list(w.keys)}" for w in o.witnesses)
            for o in self.failures
        )
        return f"{head}, failed: {failed})"

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "pattern_sha256": self.pattern_hash,
            "patterns": {b.value: list(p) for b, p in self.patterns.items()},
            "semantics": SEMANTICS_NOTE,
            "engines": self.engines,
            "obligations": [o.to_json() for o in self.obligations],
            "seconds": round(self.seconds, 3),
            "notes": list(self.notes),
        }

    def format(self) -> str:
        """The certificate as text."""
        counts = ", ".join(f"{b.value} {len(p)}" for b, p in self.patterns.items())
        lines = [
            "bagelverify pattern-language certificate",
            f"  pattern set  sha256:{self.pattern_hash}  ({counts})",
            f"  semantics    {SEMANTICS_NOTE}",
        ]
        for i, (engine, version) in enumerate(self.engines.items()):
            lines.append(f"  {'engines' if i == 0 else '':<12} {engine:<9} {version}")
        lines.append("  claims")
        for name in dict.fromkeys(o.name for o in self.obligations):
            lines.append(f"    {name:<19} {STATEMENTS[name]}")
        lines.append("  results")
        for o in self.obligations:
            lines.append(
                f"    {o.name:<19} {o.engine:<9} {o.result.upper():<8} "
                f"{o.seconds * 1000:8.1f} ms  {o.detail}"
            )
            shown = o.witnesses if o.result != PROVED else o.witnesses[: 3 * MAX_WITNESSES]
            for w in shown:
                keys = "  ".join(repr(k) for k in w.keys)
                lines.append(
                    f"        {'!' if not o.ok else '-'} {w.claim}" + (f": {keys}" if keys else "")
                )
        lines.extend(f"  note: {note}" for note in self.notes)
        verdict = "every obligation proved" if self.ok else f"{len(self.failures)} FAILED"
        proved = sum(o.result == PROVED for o in self.obligations)
        lines.append("")
        lines.append(
            f"  result: {verdict} ({proved} proved, "
            f"{sum(o.result == SKIPPED for o in self.obligations)} skipped) in {self.seconds:.2f}s"
        )
        return "\n".join(lines)


SEMANTICS_NOTE = (
    "language(p) = {s in Python str : re.fullmatch(p, s)}; first bucket in match order "
    "und, gen, vae, extra wins; patterns parsed by re._parser"
)


def pattern_hash(patterns: Mapping[Bucket, Sequence[str]]) -> str:
    """sha256 of the canonical JSON ``{"und": [...], "gen": [...], "vae": [...], "extra": [...]}``
    (match order, list order kept, UTF-8, no spaces)."""
    canonical = {b.value: list(patterns.get(b, ())) for b in MATCH_ORDER}
    text = json.dumps(canonical, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# -- the checks --------------------------------------------------------------------------------


class _Refuted(Exception):
    """An engine's counterexample that Python's ``re`` does not confirm: an engine bug."""


class _Checker:
    """All obligations on one pattern set."""

    def __init__(self, patterns: Mapping[Bucket, Sequence[str]]) -> None:
        self.patterns = {b: list(patterns.get(b, ())) for b in MATCH_ORDER}
        self.entries: list[tuple[Bucket, str]] = [
            (b, p) for b in MATCH_ORDER for p in self.patterns[b]
        ]
        for _, pattern in self.entries:
            parse(pattern)  # refuse untranslatable patterns before any proof starts
        self.n = len(self.entries)
        self.compiled = {b: [re.compile(p) for p in self.patterns[b]] for b in MATCH_ORDER}
        self.reference = NaiveMatcher(self.patterns)
        self.tags = {
            b: frozenset(i for i, (o, _) in enumerate(self.entries) if o is b) for b in MATCH_ORDER
        }
        family_patterns = [f.pattern for f in FAMILIES]
        self.dfa = DFA.membership(
            [p for _, p in self.entries] + family_patterns, split=[unicode_non_ascii_digits()]
        )
        # P3 is proved on the very automaton the compiled matcher builds for its memo
        matcher_dfa = _build_dfa(self.patterns)
        assert matcher_dfa is not None  # every pattern parsed above
        self.matcher = matcher_dfa

    # helpers

    def tags_of(self, state: int) -> frozenset[int]:
        label = self.dfa.label(state)
        return label if isinstance(label, frozenset) else frozenset()

    def buckets_of_label(self, label: Hashable | None) -> set[Bucket]:
        tags = label if isinstance(label, frozenset) else frozenset()
        return {self.entries[t][0] for t in tags if t < self.n}

    def re_buckets(self, key: str) -> set[Bucket]:
        """Buckets with a pattern that ``re.fullmatch``-es ``key`` (the reference)."""
        return {b for b, regexes in self.compiled.items() if any(r.fullmatch(key) for r in regexes)}

    def re_classify(self, key: str) -> Bucket:
        """First-match bucket by Python's ``re`` (the reference matcher)."""
        return self.reference.classify(key)

    def re_patterns(self, key: str, bucket: Bucket) -> list[str]:
        return [
            p
            for p, r in zip(self.patterns[bucket], self.compiled[bucket], strict=True)
            if r.fullmatch(key)
        ]

    def confirm(self, ok: bool, what: str) -> None:
        if not ok:
            raise _Refuted(f"engine counterexample not confirmed by Python's re: {what}")

    # S1

    def self_contained(self) -> tuple[str, str, list[Witness]]:
        names = ("re.fullmatch", "re.match", "re.search")
        witnesses = []
        for bucket, pattern in self.entries:
            dfa = DFA.membership([pattern] * 3, semantics=["fullmatch", "match", "search"])
            found = dfa.shortest(lambda label: isinstance(label, frozenset) and len(label) != 3)
            if found is None:
                continue
            accepted = [
                n
                for n, f in zip(names, (re.fullmatch, re.match, re.search), strict=True)
                if f(pattern, found)
            ]
            self.confirm(0 < len(accepted) < 3, f"{pattern!r} on {found!r}")
            witnesses.append(
                Witness(
                    f"{bucket.value} pattern {pattern!r}: only {', '.join(accepted)} accept",
                    (found,),
                )
            )
        return _verdict(witnesses), f"{self.n} patterns", witnesses

    # S2

    def ascii_keys(self) -> tuple[str, str, list[Witness]]:
        alphabet = self.dfa.alphabet
        bad = {
            a for a, c in enumerate(alphabet.representatives) if c == "\n" or _non_ascii_digit(c)
        }
        delta = self.dfa.delta

        def successors(node: tuple[int, bool]) -> Iterable[tuple[str, tuple[int, bool]]]:
            state, seen = node
            for atom, target in enumerate(delta[state]):
                yield alphabet.representatives[atom], (target, seen or atom in bad)

        witnesses = []
        for bucket in MATCH_ORDER:
            tags = self.tags[bucket]
            search = BreadthFirst((self.dfa.start, False), successors)
            node = next((n for n in search if n[1] and self.tags_of(n[0]) & tags), None)
            if node is None:
                continue
            key = "".join(search.path(node))
            where = self.re_patterns(key, bucket)
            self.confirm(bool(where) and any(c == "\n" or _non_ascii_digit(c) for c in key), key)
            witnesses.append(
                Witness(
                    f"{bucket.value} pattern {where[0]!r} accepts a newline or non-ASCII digit",
                    (key,),
                )
            )
        return _verdict(witnesses), f"{len(MATCH_ORDER)} bucket languages", witnesses

    # P1

    def disjointness(self) -> tuple[str, str, list[Witness]]:
        witnesses = []
        for a, b in combinations(MATCH_ORDER, 2):
            ta, tb = self.tags[a], self.tags[b]
            key = self.dfa.shortest(_having(ta, tb))
            if key is not None:
                pa, pb = self.re_patterns(key, a), self.re_patterns(key, b)
                self.confirm(bool(pa and pb), f"{key!r} in {a.value} and {b.value}")
                witnesses.append(
                    Witness(f"in {a.value} ({pa[0]!r}) and {b.value} ({pb[0]!r})", (key,))
                )
        return _verdict(witnesses), "6 bucket pairs", witnesses

    # P2

    def coverage_manifest(self) -> tuple[str, str, list[Witness]]:
        witnesses = []
        count = 0
        for file_name, entries in load_manifest().items():
            for key in entries:
                count += 1
                expected = expected_bucket(file_name, key)
                by_re = self.re_buckets(key)
                by_dfa = self.buckets_of_label(self.dfa.classify(key))
                if by_dfa != by_re:
                    raise _Refuted(
                        f"{key!r}: automaton says {sorted(by_dfa)}, re says {sorted(by_re)}"
                    )
                if by_re != {expected}:
                    got = ", ".join(sorted(b.value for b in by_re)) or "no bucket"
                    witnesses.append(
                        Witness(
                            f"{file_name} key expected in {expected.value}, found in {got}", (key,)
                        )
                    )
        return (
            _verdict(witnesses),
            f"{count} manifest keys",
            witnesses,
        )

    def coverage_families(self) -> tuple[str, str, list[Witness]]:
        witnesses = []
        for index, family in enumerate(FAMILIES):
            tag = self.n + index
            own = self.tags[family.bucket]
            others = frozenset(range(self.n)) - own
            outside = self.dfa.shortest(_having({tag}, without=own))
            if outside is not None:
                self.confirm(
                    bool(family.match(outside)) and not self.re_patterns(outside, family.bucket),
                    outside,
                )
                witnesses.append(
                    Witness(f"family {family.name} key outside {family.bucket.value}", (outside,))
                )
            shared = self.dfa.shortest(_having({tag}, others))
            if shared is not None:
                where = sorted(b.value for b in self.re_buckets(shared) - {family.bucket})
                self.confirm(bool(family.match(shared)) and bool(where), shared)
                witnesses.append(
                    Witness(f"family {family.name} key also in {', '.join(where)}", (shared,))
                )
        return (
            _verdict(witnesses),
            f"{len(FAMILIES)} families x (subset, disjoint)",
            witnesses,
        )

    # P3

    def digit_symmetry(self) -> tuple[str, str, list[Witness]]:
        failures: list[Witness] = []
        info: list[Witness] = []
        m = self.matcher
        # (a) digits_agree is exactly "the ten ASCII digits lead to one state"
        for state in range(m.num_states):
            if m.digits_agree(state) != (len({m.step(state, d) for d in ASCII_DIGITS}) == 1):
                failures.append(Witness(f"digits_agree wrong at state {state}"))
        # (b) the safety walk of template_verdict and the run of any key with that template
        #     reach states with one verdict, on every reachable pair
        walk = BreadthFirst((m.start, m.start), lambda node: self._walk_successors(m, node))
        pairs = 0
        for template_state, key_state in walk:
            pairs += 1
            if m.label(template_state) != m.label(key_state):
                edges = walk.path((template_state, key_state))
                template = "".join(t for t, _ in edges)
                key = "".join(k for _, k in edges)
                failures.append(
                    Witness("template judged safe, key verdict differs", (template, key))
                )
        # (c) digit-sensitive patterns and verdict pairs: witnesses, re-checked, judged unsafe
        sensitive = self._sensitive_pairs()
        for tag, (k1, k2) in sensitive.items():
            bucket, pattern = self.entries[tag]
            self.confirm(
                bool(re.fullmatch(pattern, k1)) and not re.fullmatch(pattern, k2),
                f"{pattern!r} {k1!r} {k2!r}",
            )
            safe, _ = template_verdict(m, _template(k1), PLACEHOLDER)
            c1, c2 = self.re_classify(k1), self.re_classify(k2)
            if safe and c1 != c2:
                failures.append(
                    Witness(
                        "memo would answer both keys alike but re classifies them "
                        f"{c1.value}/{c2.value}",
                        (k1, k2),
                    )
                )
            verdict = "template unsafe" if not safe else f"template safe: both keys {c1.value}"
            info.append(
                Witness(
                    f"{bucket.value} pattern {pattern!r} tells digits apart; {verdict}", (k1, k2)
                )
            )
        verdict_pairs = self._verdict_pairs(m)
        for k1, k2 in verdict_pairs:
            c1, c2 = self.re_classify(k1), self.re_classify(k2)
            self.confirm(c1 != c2, f"{k1!r} {k2!r}")
            if template_verdict(m, _template(k1), PLACEHOLDER)[0]:
                failures.append(Witness("digit-dependent verdict judged safe", (k1, k2)))
        # (d) the compiled matcher itself, memo warm, on every witness key
        compiled = compile_matcher(*(self.patterns[b] for b in MATCH_ORDER))
        keys = [k for pair in [*sensitive.values(), *verdict_pairs] for k in pair]
        for key in keys + keys:  # the second pass may be answered from the memo
            if compiled.classify(key) is not self.re_classify(key):
                failures.append(Witness("compiled matcher disagrees with re", (key,)))
        detail = (
            f"{len(sensitive)} of {self.n} patterns digit-sensitive; safety rule sound on "
            f"{pairs} reachable (template, key) state pairs of the {m.num_states}-state "
            "matcher DFA; "
            f"compiled matcher = re on {len(keys)} witness keys"
        )
        return _verdict(failures), detail, failures or info

    @staticmethod
    def _walk_successors(
        m: DFA, node: tuple[int, int]
    ) -> Iterable[tuple[tuple[str, str], tuple[int, int]]]:
        p, q = node
        for char in m.alphabet.members_avoiding(_LITERALS_AVOID):
            if char is not None:
                after = template_step(m, p, char, PLACEHOLDER)
                assert after is not None
                yield (char, char), (after, m.step(q, char))
        after = template_step(m, p, PLACEHOLDER, PLACEHOLDER)
        if after is not None:  # None: the template is judged unsafe, the memo never answers
            for digit in ASCII_DIGITS:
                yield (PLACEHOLDER, digit), (after, m.step(q, digit))

    @staticmethod
    def _pair_successors(
        m: DFA, node: tuple[int, int]
    ) -> Iterable[tuple[tuple[str, str], tuple[int, int]]]:
        """Two keys with one template: same non-digit chars, any ASCII digits each."""
        p, q = node
        p_row, q_row = m.delta[p], m.delta[q]
        for atom, char in enumerate(m.alphabet.members_avoiding(_LITERALS_AVOID)):
            if char is not None:
                yield (char, char), (p_row[atom], q_row[atom])
        # one digit per distinct successor on each side covers every pair of successors
        p_digits = {m.step(p, d): d for d in reversed(ASCII_DIGITS)}
        q_digits = {m.step(q, d): d for d in reversed(ASCII_DIGITS)}
        for p_next, d1 in p_digits.items():
            for q_next, d2 in q_digits.items():
                yield (d1, d2), (p_next, q_next)

    def _sensitive_pairs(self) -> dict[int, tuple[str, str]]:
        """For each digit-sensitive pattern: a shortest pair (in, out) of keys with one template,
        searched on the pattern's own minimal DFA (small, so the pair space stays small)."""
        found: dict[int, tuple[str, str]] = {}
        for tag, (_, pattern) in enumerate(self.entries):
            own = DFA.membership([pattern])
            search = BreadthFirst((own.start, own.start), partial(self._pair_successors, own))
            for p, q in search:
                if own.label(p) is not None and own.label(q) is None:
                    edges = search.path((p, q))
                    found[tag] = ("".join(a for a, _ in edges), "".join(b for _, b in edges))
                    break
        return found

    def _verdict_pairs(self, m: DFA) -> list[tuple[str, str]]:
        """A shortest key pair with one template for each pair of different verdicts."""
        seen: dict[tuple[str, str], tuple[str, str]] = {}
        search = BreadthFirst((m.start, m.start), lambda n: self._pair_successors(m, n))
        for p, q in search:
            a, b = str(m.label(p)), str(m.label(q))
            if a != b and (a, b) not in seen:
                edges = search.path((p, q))
                seen[(a, b)] = ("".join(x for x, _ in edges), "".join(y for _, y in edges))
        return list(seen.values())

    # P4

    def root_mapping(self) -> tuple[str, str, list[Witness]]:
        witnesses = []
        rooted_start = self.dfa.run(ROOT)
        keyed = self.tags[Bucket.UND] | self.tags[Bucket.GEN]
        kept = keyed | self.tags[Bucket.VAE]
        suffix = self.dfa.shortest(_having(kept), start=rooted_start)
        if suffix is not None:
            key = ROOT + suffix
            where = sorted(b.value for b in self.re_buckets(key) - {Bucket.EXTRA})
            self.confirm(bool(where), key)
            witnesses.append(
                Witness(
                    f"a {ROOT!r}-rooted key in {', '.join(where)}: strip_root would change it",
                    (key,),
                )
            )
        extra = self.tags[Bucket.EXTRA]
        both = BreadthFirst(
            (rooted_start, self.dfa.start),
            lambda node: (
                (c, (self.dfa.delta[node[0]][a], self.dfa.delta[node[1]][a]))
                for a, c in enumerate(self.dfa.alphabet.representatives)
            ),
        )
        for p, q in both:
            if _having(extra)(self.dfa.label(p)) and _having(keyed)(self.dfa.label(q)):
                key = "".join(both.path((p, q)))
                self.confirm(
                    bool(self.re_buckets(key) & {Bucket.UND, Bucket.GEN})
                    and bool(self.re_patterns(to_native_key(key), Bucket.EXTRA)),
                    key,
                )
                witnesses.append(
                    Witness(
                        "an UND/GEN key whose rooted form is extra state", (key, to_native_key(key))
                    )
                )
                break
        manifest_keys = 0
        for file_name, entries in load_manifest().items():
            for key in entries:
                if expected_bucket(file_name, key) is not Bucket.VAE:
                    manifest_keys += 1
                    native = to_native_key(key)
                    if strip_root(native) != key or self.re_classify(native) is not Bucket.UNKNOWN:
                        witnesses.append(
                            Witness("manifest key not inverted by strip_root", (key, native))
                        )
        detail = (
            f"2 symbolic claims (no und/gen/vae key starts with {ROOT!r}; no rooted und/gen key "
            f"is extra state) + strip_root(to_native_key(k)) == k on {manifest_keys} manifest keys"
        )
        return _verdict(witnesses), detail, witnesses

    # P5

    def hygiene(self) -> tuple[str, str, list[Witness]]:
        witnesses = []
        labels = [label for label in self.dfa.reachable_labels() if isinstance(label, frozenset)]
        for tag, (bucket, pattern) in enumerate(self.entries):
            holding = [label for label in labels if tag in label]
            if not holding:
                witnesses.append(Witness(f"{bucket.value} pattern {pattern!r} matches no string"))
                continue
            covering = frozenset.intersection(*holding) & self.tags[bucket] - {tag}
            for other in sorted(covering):
                mutual = all(tag in label for label in labels if other in label)
                if mutual and other < tag:
                    continue  # equal languages: reported once, from the first of the two
                sample = self.dfa.shortest(_having({tag}))
                assert sample is not None
                self.confirm(
                    bool(
                        re.fullmatch(pattern, sample)
                        and re.fullmatch(self.entries[other][1], sample)
                    ),
                    sample,
                )
                relation = "equals" if mutual else "is subsumed by"
                witnesses.append(
                    Witness(
                        f"{bucket.value} pattern {pattern!r} {relation} {self.entries[other][1]!r}",
                        (sample,),
                    )
                )
        return (
            _verdict(witnesses),
            f"{self.n} patterns, "
            f"{sum(len(t) * (len(t) - 1) for t in self.tags.values())} same-bucket ordered pairs",
            witnesses,
        )

    # z3

    def z3_obligations(self, timeout: float) -> list[Obligation]:
        """P1 and P4 re-decided by z3 (skipped, with the reason, if z3 cannot translate)."""
        from .smt import Z3Engine

        began = time.perf_counter()
        try:
            engine = Z3Engine(timeout)
            union = {b: engine.union(self.patterns[b]) for b in MATCH_ORDER}
        except (UnsupportedPattern, RuntimeError) as error:
            return [
                Obligation(
                    name, "z3", STATEMENTS[name], SKIPPED, time.perf_counter() - began, str(error)
                )
                for name in ("P1 disjointness", "P4 root mapping")
            ]
        out = []
        for name, queries, detail in (
            ("P1 disjointness", self._z3_disjointness(engine, union), "6 bucket pairs: unsat"),
            ("P4 root mapping", self._z3_root(engine), "2 symbolic claims: unsat"),
        ):
            start = time.perf_counter()
            witnesses: list[Witness] = []
            unknown: list[str] = []
            for claim, answer, confirmed, shown in queries:
                if answer.status == "sat" and answer.witness is not None:
                    key = answer.witness
                    self.confirm(confirmed(key), f"z3: {claim}: {key!r}")
                    witnesses.append(Witness(claim, shown(key)))
                elif answer.status == "unknown":
                    unknown.append(f"{claim}: {answer.reason}")
            seconds = time.perf_counter() - start
            out.append(self._z3_obligation(name, witnesses, unknown, seconds, detail))
        return out

    def _in_all(self, buckets: Sequence[Bucket], key: str) -> bool:
        return all(self.re_patterns(key, b) for b in buckets)

    def _z3_disjointness(self, engine: Any, union: dict[Bucket, Any]) -> Iterator[_Query]:
        for a, b in combinations(MATCH_ORDER, 2):
            answer = engine.common(union[a], union[b])
            yield f"in {a.value} and {b.value}", answer, partial(self._in_all, (a, b)), _alone

    def _z3_root(self, engine: Any) -> Iterator[_Query]:
        keyed = self.patterns[Bucket.UND] + self.patterns[Bucket.GEN]
        kept = engine.union(keyed + self.patterns[Bucket.VAE])
        yield (
            f"a {ROOT!r}-rooted key in und/gen/vae",
            engine.starting_with(ROOT, kept),
            self._rooted_kept,
            _alone,
        )
        yield (
            "an und/gen key whose rooted form is extra state",
            engine.prefixed_in(
                ROOT, engine.union(keyed), engine.union(self.patterns[Bucket.EXTRA])
            ),
            self._nested_extra,
            _with_root,
        )

    def _rooted_kept(self, key: str) -> bool:
        return key.startswith(ROOT) and bool(self.re_buckets(key) - {Bucket.EXTRA})

    def _nested_extra(self, key: str) -> bool:
        keyed = bool(self.re_buckets(key) & {Bucket.UND, Bucket.GEN})
        return keyed and bool(self.re_patterns(to_native_key(key), Bucket.EXTRA))

    @staticmethod
    def _z3_obligation(
        name: str, witnesses: list[Witness], unknown: list[str], seconds: float, detail: str
    ) -> Obligation:
        if witnesses:
            result = FAILED
        elif unknown:
            result, detail = UNKNOWN, "z3 gave up: " + "; ".join(unknown)
        else:
            result = PROVED
        return Obligation(
            name, "z3", STATEMENTS[name], result, seconds, detail, tuple(witnesses[:MAX_WITNESSES])
        )


STATEMENTS = {
    "S1 self-contained": (
        "each pattern accepts the same strings under re.fullmatch, re.match and re.search"
    ),
    "S2 ASCII keys": "no bucket language holds a string with '\\n' or a non-ASCII decimal digit",
    "P1 disjointness": "no string is in two of the und, gen, vae, extra languages",
    "P2 coverage": "every manifest key is in exactly one bucket language: the design's bucket",
    "P2 family coverage": (
        "each key family (all layer numbers) is inside its bucket's language, outside the others"
    ),
    "P3 digit symmetry": (
        "a template judged safe by template_verdict has one verdict for all of its keys"
    ),
    "P4 root mapping": (
        "no und/gen/vae key starts with 'model.'; no rooted und/gen key is extra state; hence "
        "strip_root inverts 'model.'+k on und/gen (injective) and rooted keys are in no bucket"
    ),
    "P5 hygiene": "no pattern language is empty; none is subsumed by another of its bucket",
}


_Query = tuple[str, Any, Callable[[str], bool], Callable[[str], tuple[str, ...]]]
"""A z3 query: claim, answer, re-check of a witness, keys to show for it."""


def _alone(key: str) -> tuple[str, ...]:
    return (key,)


def _with_root(key: str) -> tuple[str, ...]:
    return (key, to_native_key(key))


def _verdict(witnesses: Sequence[Witness]) -> str:
    return FAILED if witnesses else PROVED


def _having(
    *required: Iterable[int], without: Iterable[int] = ()
) -> Callable[[Hashable | None], bool]:
    """Label predicate: a tag of each ``required`` set, none of ``without``."""
    sets = [frozenset(r) for r in required]
    excluded = frozenset(without)

    def accept(label: Hashable | None) -> bool:
        return (
            isinstance(label, frozenset)
            and all(not label.isdisjoint(r) for r in sets)
            and label.isdisjoint(excluded)
        )

    return accept


def _non_ascii_digit(char: str) -> bool:
    return char not in ASCII_DIGITS and re.fullmatch(r"\d", char) is not None


def _template(key: str) -> str:
    return re.sub("[0-9]", PLACEHOLDER, key)


def _engines(z3_version: str | None) -> dict[str, str]:
    try:
        version = metadata.version("bagelverify")
    except metadata.PackageNotFoundError:  # pragma: no cover - source checkout without install
        version = "unknown"
    engines = {
        "automata": (
            f"bagelverify {version} on Python {platform.python_version()} "
            f"(Unicode {unicodedata.unidata_version}); alphabet U+0000..U+{MAX_CHAR:04X}"
        )
    }
    from .smt import Z3_MAX_CHAR

    engines["z3"] = (
        f"z3 {z3_version}; alphabet U+0000..U+{Z3_MAX_CHAR:04X}"
        if z3_version
        else "not installed (pip install 'bagelverify[proofs]'): P1 and P4 not re-checked"
    )
    return engines


def check_patterns(
    und: Sequence[str] | None = None,
    gen: Sequence[str] | None = None,
    vae: Sequence[str] | None = None,
    extra: Sequence[str] | None = None,
    *,
    use_z3: bool | None = None,
    z3_timeout: float = 60.0,
) -> PatternReport:
    """Run every obligation on a pattern set and return the report (``report.ok``, ``repr``).

    Each list holds full-match pattern strings (the meaning of the exported ones); ``None``
    takes the shipped list of that bucket, ``[]`` an empty bucket. ``use_z3`` defaults to "if
    installed". Raises :class:`~bagelverify.automata.UnsupportedPattern` for a pattern the
    automaton engine cannot translate exactly (nothing can be proved about it).
    """
    from .smt import z3_version

    began = time.perf_counter()
    patterns = {b: list(p) for b, p in choose_patterns(und, gen, vae, extra).items()}
    z3v = z3_version()
    if use_z3 and z3v is None:
        raise ModuleNotFoundError("use_z3=True needs z3-solver: pip install 'bagelverify[proofs]'")
    built = time.perf_counter()
    checker = _Checker(patterns)
    built = time.perf_counter() - built
    checks: list[tuple[str, Callable[[], tuple[str, str, list[Witness]]]]] = [
        ("S1 self-contained", checker.self_contained),
        ("S2 ASCII keys", checker.ascii_keys),
        ("P1 disjointness", checker.disjointness),
        ("P2 coverage", checker.coverage_manifest),
        ("P2 family coverage", checker.coverage_families),
        ("P3 digit symmetry", checker.digit_symmetry),
        ("P4 root mapping", checker.root_mapping),
        ("P5 hygiene", checker.hygiene),
    ]
    obligations = []
    for name, check in checks:
        start = time.perf_counter()
        try:
            result, detail, witnesses = check()
        except _Refuted as error:
            result, detail, witnesses = FAILED, str(error), []
        seconds = time.perf_counter() - start
        shown = witnesses if result == PROVED else witnesses[:MAX_WITNESSES]
        if result == FAILED and len(witnesses) > MAX_WITNESSES:
            detail += f" ({len(witnesses)} counterexamples, {MAX_WITNESSES} shown)"
        obligations.append(
            Obligation(name, "automata", STATEMENTS[name], result, seconds, detail, tuple(shown))
        )
        logger.debug("%s: %s in %.3fs", name, result, seconds)
    notes = [
        f"automata built in {built * 1000:.1f} ms: product DFA of {checker.n} patterns + "
        f"{len(FAMILIES)} family patterns, {checker.dfa.num_states} states over "
        f"{checker.dfa.alphabet.size} atoms; matcher DFA {checker.matcher.num_states} states",
        "the extra bucket accepts any stem, rooted or not (model.x._extra_state): by design",
    ]
    if z3v is not None and use_z3 is not False:
        try:
            obligations.extend(checker.z3_obligations(z3_timeout))
        except _Refuted as error:
            obligations.append(
                Obligation(
                    "P1 disjointness", "z3", STATEMENTS["P1 disjointness"], FAILED, 0.0, str(error)
                )
            )
    return PatternReport(
        patterns={b: tuple(p) for b, p in patterns.items()},
        pattern_hash=pattern_hash(patterns),
        engines=_engines(z3v if use_z3 is not False else None),
        obligations=tuple(obligations),
        seconds=time.perf_counter() - began,
        notes=tuple(notes),
    )


# -- command -----------------------------------------------------------------------------------


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``bagelverify verify``."""
    parser.add_argument(
        "--patterns",
        metavar="FILE",
        help='JSON file {"und": [...], "gen": [...], "vae": [...], "extra": [...]} to check '
        "instead of the shipped patterns (a missing bucket means the shipped one)",
    )
    parser.add_argument("--no-z3", action="store_true", help="skip the z3 re-check of P1 and P4")
    parser.add_argument(
        "--z3-timeout", type=float, default=60.0, metavar="SECONDS", help="per z3 query (60)"
    )


def read_pattern_file(path: str) -> dict[str, Any]:
    """The bucket -> pattern-list object of a ``--patterns`` JSON file, checked for shape."""
    with open(path, "rb") as handle:
        document = parse_json(handle.read(), lambda what: PatternError(f"{path}: {what}"))
    if not isinstance(document, dict):
        raise PatternError(
            f"{path}: expected a JSON object with keys und, gen, vae, extra; "
            f"found {json_type(document)}"
        )
    unknown = sorted(set(document) - {b.value for b in MATCH_ORDER})
    if unknown:
        raise PatternError(f"{path}: expected keys und, gen, vae, extra; found {unknown}")
    return document


def run(args: argparse.Namespace) -> int:
    """Print the certificate; exit 1 if any obligation failed."""
    lists = read_pattern_file(args.patterns) if args.patterns else {}
    report = check_patterns(
        **{b.value: lists.get(b.value) for b in MATCH_ORDER},
        use_z3=False if args.no_z3 else None,
        z3_timeout=args.z3_timeout,
    )
    if args.json:
        # ASCII escapes: a witness may hold a lone surrogate, which no terminal encoding prints
        print(json.dumps(report.to_json(), indent=2))
    elif not args.quiet:
        print(report.format())
    elif not report.ok:
        print(report.format(), file=sys.stderr)
    return 0 if report.ok else 1
