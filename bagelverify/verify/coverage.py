"""P2 coverage: the manifest's keys land in the design's buckets, and every key family of the
table lies inside its bucket's language and outside the others'."""

from __future__ import annotations

from ..buckets import Bucket
from ..families import FAMILIES, MOE_SUFFIX
from ..manifest import VAE_FILE, load_manifest
from .checker import Checker, CheckResult, Refuted, having, verdict
from .report import Witness

#: Flow-matching parts of the generation path, by the design document (they have no UND twin).
FLOW_MATCHING_PREFIXES = ("time_embedder.", "vae2llm.", "llm2vae.", "latent_pos_embed.")


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


def coverage_manifest(c: Checker) -> CheckResult:
    """Every manifest key is in exactly one bucket language, the expected one."""
    witnesses = []
    count = 0
    for file_name, entries in load_manifest().items():
        for key in entries:
            count += 1
            expected = expected_bucket(file_name, key)
            by_re = c.re_buckets(key)
            by_dfa = c.buckets_of_label(c.dfa.classify(key))
            if by_dfa != by_re:
                raise Refuted(f"{key!r}: automaton says {sorted(by_dfa)}, re says {sorted(by_re)}")
            if by_re != {expected}:
                got = ", ".join(sorted(b.value for b in by_re)) or "no bucket"
                witnesses.append(
                    Witness(f"{file_name} key expected in {expected.value}, found in {got}", (key,))
                )
    return verdict(witnesses), f"{count} manifest keys", witnesses


def coverage_families(c: Checker) -> CheckResult:
    """Each family, for all layer numbers, is inside its bucket's language, outside the others'."""
    witnesses = []
    for index, family in enumerate(FAMILIES):
        tag = c.n + index
        own = c.tags[family.bucket]
        others = frozenset(range(c.n)) - own
        outside = c.dfa.shortest(having({tag}, without=own))
        if outside is not None:
            c.confirm(
                bool(family.match(outside)) and not c.re_patterns(outside, family.bucket), outside
            )
            witnesses.append(
                Witness(f"family {family.name} key outside {family.bucket.value}", (outside,))
            )
        shared = c.dfa.shortest(having({tag}, others))
        if shared is not None:
            where = sorted(b.value for b in c.re_buckets(shared) - {family.bucket})
            c.confirm(bool(family.match(shared)) and bool(where), shared)
            witnesses.append(
                Witness(f"family {family.name} key also in {', '.join(where)}", (shared,))
            )
    return verdict(witnesses), f"{len(FAMILIES)} families x (subset, disjoint)", witnesses
