"""The proof obligations, as one table: name, statement, the automaton check, the z3 queries.

Everything that names an obligation reads :data:`OBLIGATIONS`: the runner
(:func:`~bagelverify.verify.check_patterns`), the z3 re-check, the certificate and the tests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ..buckets import Bucket
from .checker import Checker, CheckResult, Query
from .coverage import coverage_families, coverage_manifest
from .digits import digit_symmetry
from .language import ascii_keys, disjointness, hygiene, self_contained, z3_disjointness
from .roots import root_mapping, z3_root_mapping

Z3Queries = Callable[[Checker, Any, dict[Bucket, Any]], Iterator[Query]]
"""The z3 queries of one obligation: from the checker, the engine, each bucket's union regex."""


@dataclass(frozen=True)
class Claim:
    """One proof obligation: what it states and how each engine decides it."""

    name: str
    statement: str
    check: Callable[[Checker], CheckResult]
    """The automaton engine's decision (every obligation has one)."""
    z3: Z3Queries | None = None
    """z3's independent re-decision, for the obligations it can express."""
    z3_detail: str = ""
    """What a z3 proof covered, shown when every query is unsat."""


OBLIGATIONS: tuple[Claim, ...] = (
    Claim(
        "S1 self-contained",
        "each pattern accepts the same strings under re.fullmatch, re.match and re.search",
        self_contained,
    ),
    Claim(
        "S2 ASCII keys",
        "no bucket language holds a string with '\\n' or a non-ASCII decimal digit",
        ascii_keys,
    ),
    Claim(
        "P1 disjointness",
        "no string is in two of the und, gen, vae, extra languages",
        disjointness,
        z3_disjointness,
        "6 bucket pairs: unsat",
    ),
    Claim(
        "P2 coverage",
        "every manifest key is in exactly one bucket language: the design's bucket",
        coverage_manifest,
    ),
    Claim(
        "P2 family coverage",
        "each key family (all layer numbers) is inside its bucket's language, outside the others",
        coverage_families,
    ),
    Claim(
        "P3 digit symmetry",
        "a template judged safe by template_verdict has one verdict for all of its keys",
        digit_symmetry,
    ),
    Claim(
        "P4 root mapping",
        "no und/gen/vae key starts with 'model.'; no rooted und/gen key is extra state; hence "
        "strip_root inverts 'model.'+k on und/gen (injective) and rooted keys are in no bucket",
        root_mapping,
        z3_root_mapping,
        "2 symbolic claims: unsat",
    ),
    Claim(
        "P5 hygiene",
        "no pattern language is empty; none is subsumed by another of its bucket",
        hygiene,
    ),
)

STATEMENTS: dict[str, str] = {claim.name: claim.statement for claim in OBLIGATIONS}
"""Obligation name -> statement, in table order."""

Z3_CLAIMS: tuple[Claim, ...] = tuple(claim for claim in OBLIGATIONS if claim.z3 is not None)
"""The obligations z3 re-decides."""
