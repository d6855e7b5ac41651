"""The certificate: the result of each obligation on each engine, as text and as JSON."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..buckets import MATCH_ORDER, Bucket

PROVED, FAILED, UNKNOWN, SKIPPED = "proved", "failed", "unknown", "skipped"
"""Obligation results. ``unknown`` (an engine gave up) counts as not proved; ``skipped`` (an
engine not installed, or a pattern it cannot translate) is shown but fails nothing."""

MAX_WITNESSES = 5
"""Witnesses listed per failed obligation."""

SEMANTICS_NOTE = (
    "language(p) = {s in Python str : re.fullmatch(p, s)}; first bucket in match order "
    "und, gen, vae, extra wins; patterns parsed by re._parser"
)


@dataclass(frozen=True)
class Witness:
    """One concrete finding: what it shows, and the keys that show it."""

    claim: str
    keys: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"claim": self.claim, "keys": list(self.keys)}


@dataclass(frozen=True)
class Obligation:
    """The outcome of one proof obligation on one engine."""

    name: str
    engine: str
    statement: str
    result: str
    seconds: float
    detail: str = ""
    witnesses: tuple[Witness, ...] = ()
    """For a failure: the counterexamples; for P3: the digit-sensitive patterns (informative)."""

    @property
    def ok(self) -> bool:
        """Not a failure (proved, or skipped by an engine that could not run)."""
        return self.result in (PROVED, SKIPPED)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "engine": self.engine,
            "statement": self.statement,
            "result": self.result,
            "seconds": round(self.seconds, 4),
            "detail": self.detail,
            "witnesses": [w.to_json() for w in self.witnesses],
        }


@dataclass(frozen=True)
class PatternReport:
    """Every obligation checked on one pattern set; ``ok`` when none failed."""

    patterns: dict[Bucket, tuple[str, ...]]
    pattern_hash: str
    engines: dict[str, str]
    obligations: tuple[Obligation, ...]
    seconds: float = 0.0
    notes: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.obligations)

    @property
    def failures(self) -> list[Obligation]:
        return [o for o in self.obligations if not o.ok]

    def obligation(self, name: str, engine: str = "automata") -> Obligation:
        """The obligation named ``name`` (e.g. ``"P1 disjointness"``) decided by ``engine``."""
        for o in self.obligations:
            if o.name == name and o.engine == engine:
                return o
        raise KeyError(f"no obligation {name!r} on engine {engine!r}")

    def __repr__(self) -> str:
        head = f"PatternReport(ok={self.ok}, sha256={self.pattern_hash[:16]}"
        if self.ok:
            return f"{head}, {len(self.obligations)} obligations proved or skipped)"
        failed = "; ".join(
            f"{o.name} [{o.engine}] {o.result}: "
            + ", ".join(f"{w.claim} {list(w.keys)}" for w in o.witnesses)
            for o in self.failures
        )
        return f"{head}, failed: {failed})"

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "pattern_sha256": self.pattern_hash,
            "patterns": {b.value: list(p) for b, p in self.patterns.items()},
            "semantics": SEMANTICS_NOTE,
            "engines": self.engines,
            "obligations": [o.to_json() for o in self.obligations],
            "seconds": round(self.seconds, 3),
            "notes": list(self.notes),
        }

    def format(self) -> str:
        """The certificate as text."""
        counts = ", ".join(f"{b.value} {len(p)}" for b, p in self.patterns.items())
        lines = [
            "bagelverify pattern-language certificate",
            f"  pattern set  sha256:{self.pattern_hash}  ({counts})",
            f"  semantics    {SEMANTICS_NOTE}",
        ]
        for i, (engine, version) in enumerate(self.engines.items()):
            lines.append(f"  {'engines' if i == 0 else '':<12} {engine:<9} {version}")
        lines.append("  claims")
        claims: dict[str, str] = {}
        for o in self.obligations:
            claims.setdefault(o.name, o.statement)
        lines.extend(f"    {name:<19} {statement}" for name, statement in claims.items())
        lines.append("  results")
        for o in self.obligations:
            lines.append(
                f"    {o.name:<19} {o.engine:<9} {o.result.upper():<8} "
                f"{o.seconds * 1000:8.1f} ms  {o.detail}"
            )
            shown = o.witnesses if o.result != PROVED else o.witnesses[: 3 * MAX_WITNESSES]
            for w in shown:
                keys = "  ".join(repr(k) for k in w.keys)
                lines.append(
                    f"        {'!' if not o.ok else '-'} {w.claim}" + (f": {keys}" if keys else "")
                )
        lines.extend(f"  note: {note}" for note in self.notes)
        verdict = "every obligation proved" if self.ok else f"{len(self.failures)} FAILED"
        proved = sum(o.result == PROVED for o in self.obligations)
        lines.append("")
        lines.append(
            f"  result: {verdict} ({proved} proved, "
            f"{sum(o.result == SKIPPED for o in self.obligations)} skipped) in {self.seconds:.2f}s"
        )
        return "\n".join(lines)


def pattern_hash(patterns: Mapping[Bucket, Sequence[str]]) -> str:
    """sha256 of the canonical JSON ``{"und": [...], "gen": [...], "vae": [...], "extra": [...]}``
    (match order, list order kept, UTF-8, no spaces)."""
    canonical = {b.value: list(patterns.get(b, ())) for b in MATCH_ORDER}
    text = json.dumps(canonical, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
