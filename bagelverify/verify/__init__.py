"""Machine-checked properties of the key-pattern languages, for all strings.

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
every obligation; z3's regular-expression theory (:mod:`bagelverify.verify.smt`, alphabet
``U+0000..U+2FFFF``) independently re-decides P1 and P4.

Modules: :mod:`.report` (the certificate), :mod:`.obligations` (the table of obligations),
:mod:`.checker` (the pattern set under check) with the checks by obligation (:mod:`.language`,
:mod:`.coverage`, :mod:`.digits`, :mod:`.roots`), :mod:`.z3_runs` and :mod:`.smt` (the second
engine), :mod:`.prove` (:func:`check_patterns`). The command is :mod:`bagelverify.commands.verify`.
"""

from __future__ import annotations

from .coverage import FLOW_MATCHING_PREFIXES, expected_bucket
from .digits import PLACEHOLDER
from .obligations import OBLIGATIONS, STATEMENTS, Claim
from .prove import check_patterns
from .report import (
    FAILED,
    MAX_WITNESSES,
    PROVED,
    SEMANTICS_NOTE,
    SKIPPED,
    UNKNOWN,
    Obligation,
    PatternReport,
    Witness,
    pattern_hash,
)

__all__ = [
    "FAILED",
    "FLOW_MATCHING_PREFIXES",
    "MAX_WITNESSES",
    "OBLIGATIONS",
    "PLACEHOLDER",
    "PROVED",
    "SEMANTICS_NOTE",
    "SKIPPED",
    "STATEMENTS",
    "UNKNOWN",
    "Claim",
    "Obligation",
    "PatternReport",
    "Witness",
    "check_patterns",
    "expected_bucket",
    "pattern_hash",
]
