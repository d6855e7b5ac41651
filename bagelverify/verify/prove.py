""":func:`check_patterns`: every obligation of the table on one pattern set, on both engines."""

from __future__ import annotations

import logging
import platform
import time
import unicodedata
from collections.abc import Sequence
from importlib import metadata

from ..automata import MAX_CHAR
from ..families import FAMILIES
from ..matcher import choose_patterns
from .checker import Checker, Refuted
from .obligations import OBLIGATIONS, Z3_CLAIMS, Claim
from .report import FAILED, MAX_WITNESSES, PROVED, Obligation, PatternReport, pattern_hash
from .z3_runs import z3_obligations

logger = logging.getLogger(__name__)


def check_patterns(
    und: Sequence[str] | None = None,
    gen: Sequence[str] | None = None,
    vae: Sequence[str] | None = None,
    extra: Sequence[str] | None = None,
    *,
    use_z3: bool | None = None,
    z3_timeout: float = 60.0,
) -> PatternReport:
    """Run every obligation on a pattern set and return the report (``report.ok``, ``repr``).

    Each list holds full-match pattern strings (the meaning of the exported ones); ``None``
    takes the shipped list of that bucket, ``[]`` an empty bucket. ``use_z3`` defaults to "if
    installed". Raises :class:`~bagelverify.errors.UnsupportedPattern` for a pattern the
    automaton engine cannot translate exactly (nothing can be proved about it).
    """
    from .smt import z3_version

    began = time.perf_counter()
    patterns = {b: list(p) for b, p in choose_patterns(und, gen, vae, extra).items()}
    z3v = z3_version()
    if use_z3 and z3v is None:
        raise ModuleNotFoundError("use_z3=True needs z3-solver: pip install 'bagelverify[proofs]'")
    built = time.perf_counter()
    checker = Checker(patterns)
    built = time.perf_counter() - built
    obligations = [_automata_obligation(checker, claim) for claim in OBLIGATIONS]
    notes = [
        f"automata built in {built * 1000:.1f} ms: product DFA of {checker.n} patterns + "
        f"{len(FAMILIES)} family patterns, {checker.dfa.num_states} states over "
        f"{checker.dfa.alphabet.size} atoms; matcher DFA {checker.matcher.num_states} states",
        "the extra bucket accepts any stem, rooted or not (model.x._extra_state): by design",
    ]
    if z3v is not None and use_z3 is not False:
        obligations.extend(z3_obligations(checker, z3_timeout))
    return PatternReport(
        patterns={b: tuple(p) for b, p in patterns.items()},
        pattern_hash=pattern_hash(patterns),
        engines=_engines(z3v if use_z3 is not False else None),
        obligations=tuple(obligations),
        seconds=time.perf_counter() - began,
        notes=tuple(notes),
    )


def _automata_obligation(checker: Checker, claim: Claim) -> Obligation:
    start = time.perf_counter()
    try:
        result, detail, witnesses = claim.check(checker)
    except Refuted as error:
        result, detail, witnesses = FAILED, str(error), []
    seconds = time.perf_counter() - start
    shown = witnesses if result == PROVED else witnesses[:MAX_WITNESSES]
    if result == FAILED and len(witnesses) > MAX_WITNESSES:
        detail += f" ({len(witnesses)} counterexamples, {MAX_WITNESSES} shown)"
    logger.debug("%s: %s in %.3fs", claim.name, result, seconds)
    return Obligation(
        claim.name, "automata", claim.statement, result, seconds, detail, tuple(shown)
    )


def _engines(z3_version: str | None) -> dict[str, str]:
    try:
        version = metadata.version("bagelverify")
    except metadata.PackageNotFoundError:  # pragma: no cover - source checkout without install
        version = "unknown"
    engines = {
        "automata": (
            f"bagelverify {version} on Python {platform.python_version()} "
            f"(Unicode {unicodedata.unidata_version}); alphabet U+0000..U+{MAX_CHAR:04X}"
        )
    }
    from .smt import Z3_MAX_CHAR

    what = " and ".join(claim.name.split()[0] for claim in Z3_CLAIMS)
    engines["z3"] = (
        f"z3 {z3_version}; alphabet U+0000..U+{Z3_MAX_CHAR:04X}"
        if z3_version
        else f"not installed (pip install 'bagelverify[proofs]'): {what} not re-checked"
    )
    return engines
