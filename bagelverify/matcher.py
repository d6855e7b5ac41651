"""Deciding which bucket a key belongs to, from per-bucket lists of full-match patterns."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from .buckets import MATCH_ORDER, Bucket
from .families import patterns_of

PatternSets = Mapping[Bucket, Sequence[str]]


def shipped_patterns() -> dict[Bucket, list[str]]:
    """The pattern lists derived from the family table, per bucket, in match order."""
    return {bucket: patterns_of(bucket) for bucket in MATCH_ORDER}


class NaiveMatcher:
    """The reference semantics: the first bucket (in match order) with a fully matching pattern.

    Correct by construction and slow; the fast matcher is tested against it.
    """

    def __init__(self, patterns: PatternSets | None = None) -> None:
        patterns = shipped_patterns() if patterns is None else patterns
        self._compiled = [
            (bucket, [re.compile(p) for p in patterns.get(bucket, ())]) for bucket in MATCH_ORDER
        ]

    def classify(self, key: str) -> Bucket:
        """Bucket of ``key``; ``Bucket.UNKNOWN`` when no pattern fully matches."""
        for bucket, regexes in self._compiled:
            if any(regex.fullmatch(key) for regex in regexes):
                return bucket
        return Bucket.UNKNOWN
