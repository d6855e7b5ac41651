"""Obligations on the languages themselves: S1 self-contained, S2 ASCII keys, P1 disjointness
(on both engines) and P5 hygiene."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from functools import partial
from itertools import combinations
from typing import Any

from ..automata import DFA, BreadthFirst
from ..buckets import MATCH_ORDER, Bucket
from .checker import Checker, CheckResult, Query, alone, having, non_ascii_digit, verdict
from .report import Witness


def self_contained(c: Checker) -> CheckResult:
    """S1: each pattern accepts the same strings under ``re.fullmatch``, ``match``, ``search``."""
    names = ("re.fullmatch", "re.match", "re.search")
    witnesses = []
    for bucket, pattern in c.entries:
        dfa = DFA.membership([pattern] * 3, semantics=["fullmatch", "match", "search"])
        found = dfa.shortest(lambda label: isinstance(label, frozenset) and len(label) != 3)
        if found is None:
            continue
        accepted = [
            n
            for n, f in zip(names, (re.fullmatch, re.match, re.search), strict=True)
            if f(pattern, found)
        ]
        c.confirm(0 < len(accepted) < 3, f"{pattern!r} on {found!r}")
        witnesses.append(
            Witness(
                f"{bucket.value} pattern {pattern!r}: only {', '.join(accepted)} accept",
                (found,),
            )
        )
    return verdict(witnesses), f"{c.n} patterns", witnesses


def ascii_keys(c: Checker) -> CheckResult:
    """S2: no bucket language holds a string with a newline or a non-ASCII decimal digit."""
    alphabet = c.dfa.alphabet
    bad = {a for a, ch in enumerate(alphabet.representatives) if ch == "\n" or non_ascii_digit(ch)}
    delta = c.dfa.delta

    def successors(node: tuple[int, bool]) -> Iterable[tuple[str, tuple[int, bool]]]:
        state, seen = node
        for atom, target in enumerate(delta[state]):
            yield alphabet.representatives[atom], (target, seen or atom in bad)

    witnesses = []
    for bucket in MATCH_ORDER:
        tags = c.tags[bucket]
        search = BreadthFirst((c.dfa.start, False), successors)
        node = next((n for n in search if n[1] and c.tags_of(n[0]) & tags), None)
        if node is None:
            continue
        key = "".join(search.path(node))
        where = c.re_patterns(key, bucket)
        c.confirm(bool(where) and any(ch == "\n" or non_ascii_digit(ch) for ch in key), key)
        witnesses.append(
            Witness(
                f"{bucket.value} pattern {where[0]!r} accepts a newline or non-ASCII digit",
                (key,),
            )
        )
    return verdict(witnesses), f"{len(MATCH_ORDER)} bucket languages", witnesses


def disjointness(c: Checker) -> CheckResult:
    """P1: no string is in two bucket languages."""
    witnesses = []
    for a, b in combinations(MATCH_ORDER, 2):
        ta, tb = c.tags[a], c.tags[b]
        key = c.dfa.shortest(having(ta, tb))
        if key is not None:
            pa, pb = c.re_patterns(key, a), c.re_patterns(key, b)
            c.confirm(bool(pa and pb), f"{key!r} in {a.value} and {b.value}")
            witnesses.append(Witness(f"in {a.value} ({pa[0]!r}) and {b.value} ({pb[0]!r})", (key,)))
    return verdict(witnesses), "6 bucket pairs", witnesses


def _in_all(c: Checker, buckets: tuple[Bucket, ...], key: str) -> bool:
    return all(c.re_patterns(key, b) for b in buckets)


def z3_disjointness(c: Checker, engine: Any, union: dict[Bucket, Any]) -> Iterator[Query]:
    """P1 on z3: one "a string in both" query per bucket pair."""
    for a, b in combinations(MATCH_ORDER, 2):
        answer = engine.common(union[a], union[b])
        yield f"in {a.value} and {b.value}", answer, partial(_in_all, c, (a, b)), alone


def hygiene(c: Checker) -> CheckResult:
    """P5: no pattern's language is empty or inside another pattern's of the same bucket."""
    witnesses = []
    labels = [label for label in c.dfa.reachable_labels() if isinstance(label, frozenset)]
    for tag, (bucket, pattern) in enumerate(c.entries):
        holding = [label for label in labels if tag in label]
        if not holding:
            witnesses.append(Witness(f"{bucket.value} pattern {pattern!r} matches no string"))
            continue
        covering = frozenset.intersection(*holding) & c.tags[bucket] - {tag}
        for other in sorted(covering):
            mutual = all(tag in label for label in labels if other in label)
            if mutual and other < tag:
                continue  # equal languages: reported once, from the first of the two
            sample = c.dfa.shortest(having({tag}))
            assert sample is not None
            c.confirm(
                bool(re.fullmatch(pattern, sample) and re.fullmatch(c.entries[other][1], sample)),
                sample,
            )
            relation = "equals" if mutual else "is subsumed by"
            witnesses.append(
                Witness(
                    f"{bucket.value} pattern {pattern!r} {relation} {c.entries[other][1]!r}",
                    (sample,),
                )
            )
    return (
        verdict(witnesses),
        f"{c.n} patterns, "
        f"{sum(len(t) * (len(t) - 1) for t in c.tags.values())} same-bucket ordered pairs",
        witnesses,
    )
