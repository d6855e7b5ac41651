"""What every obligation works on: one pattern set, its product automaton and the ``re`` reference.

The checks themselves live by obligation (:mod:`.language`, :mod:`.coverage`, :mod:`.digits`,
:mod:`.roots`); each takes a :class:`Checker` and returns a :data:`CheckResult`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any

from ..automata import ASCII_DIGITS, DFA, parse, unicode_non_ascii_digits
from ..buckets import MATCH_ORDER, Bucket
from ..families import FAMILIES
from ..matcher import NaiveMatcher, build_dfa
from .report import FAILED, PROVED, Witness

CheckResult = tuple[str, str, list[Witness]]
"""What one automaton check returns: result, detail, witnesses."""

Query = tuple[str, Any, Callable[[str], bool], Callable[[str], tuple[str, ...]]]
"""A z3 query: claim, answer, re-check of a witness, keys to show for it."""


class Refuted(Exception):
    """An engine's counterexample that Python's ``re`` does not confirm: an engine bug."""


class Checker:
    """One pattern set, ready to be checked: the patterns, their product automaton (with the
    family patterns, tagged after the bucket patterns), the compiled matcher's own automaton,
    and Python's ``re`` as the reference every witness is confirmed against."""

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
        matcher_dfa = build_dfa(self.patterns)
        assert matcher_dfa is not None  # every pattern parsed above
        self.matcher = matcher_dfa

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
            raise Refuted(f"engine counterexample not confirmed by Python's re: {what}")


def verdict(witnesses: Sequence[Witness]) -> str:
    return FAILED if witnesses else PROVED


def having(
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


def alone(key: str) -> tuple[str, ...]:
    """A z3 witness shown as itself."""
    return (key,)


def non_ascii_digit(char: str) -> bool:
    return char not in ASCII_DIGITS and re.fullmatch(r"\d", char) is not None
