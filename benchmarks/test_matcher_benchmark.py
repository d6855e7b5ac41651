"""pytest-benchmark view of the matcher benchmark (not part of the default test run).

Run: ``python -m pytest benchmarks/test_matcher_benchmark.py`` (add
``--benchmark-group-by=group --benchmark-sort=mean``). Each round classifies every key of a set
once, on keys rebuilt as fresh ``str`` objects before the round; the methods, key sets and
their construction are those of ``python -m bagelverify bench``, which prints the side-by-side
ratios in one run.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import pytest

from bagelverify.commands.bench import METHOD_NAMES, KeySet, build_method, key_sets

SIZES = (100_000,)
ROUNDS = 5


@cache
def _sets() -> dict[str, KeySet]:
    return {key_set.name: key_set for key_set in key_sets(SIZES)}


@cache
def _classifier(set_name: str, method: str) -> Callable[[str], object]:
    return build_method(method, _sets()[set_name])


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("set_name", ["manifest", "scaled-100k"])
def test_classify_every_key(benchmark, set_name: str, method: str) -> None:  # type: ignore[no-untyped-def]
    key_set = _sets()[set_name]
    classify = _classifier(set_name, method)
    encoded = [key.encode() for key in key_set.keys]

    def fresh_keys() -> tuple[tuple[list[str]], dict[str, object]]:
        return ([raw.decode() for raw in encoded],), {}

    def classify_all(keys: list[str]) -> None:
        for key in keys:
            classify(key)

    benchmark.group = set_name
    benchmark.extra_info["keys"] = len(encoded)
    benchmark.pedantic(classify_all, setup=fresh_keys, rounds=ROUNDS, warmup_rounds=1)
