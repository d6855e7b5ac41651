"""The second engine's runs: each obligation of the table that z3 can express, re-decided by
:class:`~bagelverify.verify.smt.Z3Engine`, every witness re-checked with Python's ``re``."""

from __future__ import annotations

import time

from ..buckets import MATCH_ORDER
from ..errors import UnsupportedPattern, counted
from .checker import Checker, Refuted
from .obligations import Z3_CLAIMS, Claim
from .report import FAILED, MAX_WITNESSES, PROVED, SKIPPED, UNKNOWN, Obligation, Witness

ENGINE = "z3"


def z3_obligations(checker: Checker, timeout: float) -> list[Obligation]:
    """Every z3 claim decided by z3: skipped, with the reason, if z3 cannot translate the
    patterns; one failure if z3 gives a witness that ``re`` does not confirm."""
    try:
        return _run(checker, timeout)
    except Refuted as error:
        first = Z3_CLAIMS[0]
        return [Obligation(first.name, ENGINE, first.statement, FAILED, 0.0, str(error))]


def _run(checker: Checker, timeout: float) -> list[Obligation]:
    from .smt import Z3Engine

    began = time.perf_counter()
    try:
        engine = Z3Engine(timeout)
        union = {b: engine.union(checker.patterns[b]) for b in MATCH_ORDER}
    except (UnsupportedPattern, RuntimeError) as error:
        seconds = time.perf_counter() - began
        return [
            Obligation(claim.name, ENGINE, claim.statement, SKIPPED, seconds, str(error))
            for claim in Z3_CLAIMS
        ]
    out = []
    for claim in Z3_CLAIMS:
        assert claim.z3 is not None
        queries = claim.z3(checker, engine, union)
        start = time.perf_counter()
        witnesses: list[Witness] = []
        unknown: list[str] = []
        for text, answer, confirmed, shown in queries:
            if answer.status == "sat" and answer.witness is not None:
                key = answer.witness
                checker.confirm(confirmed(key), f"z3: {text}: {key!r}")
                witnesses.append(Witness(text, shown(key)))
            elif answer.status == "unknown":
                unknown.append(f"{text}: {answer.reason}")
        out.append(_obligation(claim, witnesses, unknown, time.perf_counter() - start))
    return out


def _obligation(
    claim: Claim, witnesses: list[Witness], unknown: list[str], seconds: float
) -> Obligation:
    detail = claim.z3_detail
    if witnesses:
        result = FAILED
        scope = detail.partition(":")[0]
        first = witnesses[0]
        detail = (
            f"{scope}: sat, z3 found {counted(len(witnesses), 'witness', 'witnesses')} "
            f"(confirmed by re), first {first.claim}: {', '.join(map(repr, first.keys))}"
        )
    elif unknown:
        result, detail = UNKNOWN, "z3 gave up: " + "; ".join(unknown)
    else:
        result = PROVED
    return Obligation(
        claim.name,
        ENGINE,
        claim.statement,
        result,
        seconds,
        detail,
        tuple(witnesses[:MAX_WITNESSES]),
    )
