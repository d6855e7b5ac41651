"""P4 root mapping (on both engines): no UND/GEN/VAE key starts with ``model.``, and no rooted
UND/GEN key is extra state, so ``strip_root`` inverts the root map on UND/GEN keys."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ..automata import BreadthFirst
from ..buckets import Bucket
from ..keys import ROOT, strip_root, to_native_key
from ..manifest import load_manifest
from .checker import Checker, CheckResult, Query, alone, having, verdict
from .coverage import expected_bucket
from .report import Witness

_KEYED = (Bucket.UND, Bucket.GEN)


def root_mapping(c: Checker) -> CheckResult:
    """P4 on the automaton, plus ``strip_root(to_native_key(k)) == k`` on the manifest keys."""
    witnesses = []
    rooted_start = c.dfa.run(ROOT)
    keyed = c.tags[Bucket.UND] | c.tags[Bucket.GEN]
    kept = keyed | c.tags[Bucket.VAE]
    suffix = c.dfa.shortest(having(kept), start=rooted_start)
    if suffix is not None:
        key = ROOT + suffix
        where = sorted(b.value for b in c.re_buckets(key) - {Bucket.EXTRA})
        c.confirm(bool(where), key)
        witnesses.append(
            Witness(
                f"a {ROOT!r}-rooted key in {', '.join(where)}: strip_root would change it", (key,)
            )
        )
    extra = c.tags[Bucket.EXTRA]
    both = BreadthFirst(
        (rooted_start, c.dfa.start),
        lambda node: (
            (ch, (c.dfa.delta[node[0]][a], c.dfa.delta[node[1]][a]))
            for a, ch in enumerate(c.dfa.alphabet.representatives)
        ),
    )
    for p, q in both:
        if having(extra)(c.dfa.label(p)) and having(keyed)(c.dfa.label(q)):
            key = "".join(both.path((p, q)))
            c.confirm(_nested_extra(c, key), key)
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
                if strip_root(native) != key or c.re_classify(native) is not Bucket.UNKNOWN:
                    witnesses.append(
                        Witness("manifest key not inverted by strip_root", (key, native))
                    )
    detail = (
        f"2 symbolic claims (no und/gen/vae key starts with {ROOT!r}; no rooted und/gen key "
        f"is extra state) + strip_root(to_native_key(k)) == k on {manifest_keys} manifest keys"
    )
    return verdict(witnesses), detail, witnesses


def z3_root_mapping(c: Checker, engine: Any, union: dict[Bucket, Any]) -> Iterator[Query]:
    """P4 on z3: the two symbolic claims as "is there a string" queries."""
    keyed = c.patterns[Bucket.UND] + c.patterns[Bucket.GEN]
    kept = engine.union(keyed + c.patterns[Bucket.VAE])
    yield (
        f"a {ROOT!r}-rooted key in und/gen/vae",
        engine.starting_with(ROOT, kept),
        lambda key: _rooted_kept(c, key),
        alone,
    )
    yield (
        "an und/gen key whose rooted form is extra state",
        engine.prefixed_in(ROOT, engine.union(keyed), engine.union(c.patterns[Bucket.EXTRA])),
        lambda key: _nested_extra(c, key),
        _with_root,
    )


def _rooted_kept(c: Checker, key: str) -> bool:
    return key.startswith(ROOT) and bool(c.re_buckets(key) - {Bucket.EXTRA})


def _nested_extra(c: Checker, key: str) -> bool:
    keyed = bool(c.re_buckets(key) & set(_KEYED))
    return keyed and bool(c.re_patterns(to_native_key(key), Bucket.EXTRA))


def _with_root(key: str) -> tuple[str, ...]:
    return (key, to_native_key(key))
