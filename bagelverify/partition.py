"""Classifying keys into buckets: ``classify`` for one key, ``partition`` for many."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TypeVar, overload

from .buckets import Bucket
from .errors import ArgumentTypeError
from .keys import check_key
from .matcher import Matcher, compile_matcher

V = TypeVar("V")

__all__ = ["check_key", "classify", "partition"]

_MATCHER: Matcher | None = None
"""The compiled matcher of the shipped patterns, built on first use (its automaton takes about
0.1 s, which ``import bagelverify`` should not pay)."""


def _default_matcher() -> Matcher:
    global _MATCHER
    if _MATCHER is None:
        _MATCHER = compile_matcher()  # threads racing here each build an equal one: harmless
    return _MATCHER


def classify(key: str) -> Bucket:
    """The bucket of one HF-layout (unrooted) key. Non-``str`` keys raise ``TypeError``."""
    return (_MATCHER or _default_matcher()).classify(check_key(key))


@overload
def partition(keys: Mapping[str, V]) -> dict[Bucket, dict[str, V]]: ...  # type: ignore[overload-overlap]
@overload
def partition(keys: Iterable[str]) -> dict[Bucket, list[str]]: ...
def partition(
    keys: Mapping[str, V] | Iterable[str],
) -> dict[Bucket, dict[str, V]] | dict[Bucket, list[str]]:
    """Split keys into all five buckets, keeping input order.

    A mapping (a state dict) gives one sub-dict per bucket holding the same value objects;
    any other iterable of keys gives one list per bucket. Every bucket is present, possibly empty.
    """
    if isinstance(keys, Mapping):
        parts: dict[Bucket, dict[str, V]] = {bucket: {} for bucket in Bucket}
        for key, value in keys.items():
            parts[classify(key)][key] = value
        return parts
    if isinstance(keys, (str, bytes)):
        raise ArgumentTypeError(
            "partition() takes an iterable of keys or a mapping, not a single key"
        )
    lists: dict[Bucket, list[str]] = {bucket: [] for bucket in Bucket}
    for key in keys:
        lists[classify(key)].append(key)
    return lists
