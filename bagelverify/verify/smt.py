"""The second proof engine: z3's regular-expression theory over the same parsed patterns.

Patterns are translated from the IR of :func:`bagelverify.automata.parse` (so both engines read
the very same parse); a construct z3 cannot express exactly raises
:class:`~bagelverify.errors.UnsupportedPattern`. Under ``re.fullmatch`` semantics, anchors at
the very start (``\\A``, ``^``) and very end (``\\Z``, ``$``: a trailing ``$`` cannot match
before a final ``\\n`` when nothing follows it to consume that ``\\n``) are the identity; anchors
anywhere else are refused by this engine.

Alphabet: z3's strings (``encoding=unicode``, the default) range over code points
``0 .. 0x2FFFF`` (:data:`Z3_MAX_CHAR`), not all of Unicode. Character classes are clipped to it,
so every z3 verdict is a statement about strings over that alphabet only; the automaton engine
covers ``0 .. sys.maxunicode``.

Needs the optional ``z3-solver`` dependency (``pip install 'bagelverify[proofs]'``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..automata import Alt, Anchor, Chars, Node, Repeat, Seq, parse
from ..errors import UnsupportedPattern

Z3_MAX_CHAR = 0x2FFFF
"""Largest code point of z3's string alphabet under ``encoding=unicode``."""


def z3_version() -> str | None:
    """The installed z3's version, or ``None`` when ``z3-solver`` is not installed."""
    try:
        import z3
    except ImportError:
        return None
    return str(z3.get_version_string())


@dataclass(frozen=True)
class Answer:
    """Outcome of one query: ``"unsat"``, ``"sat"`` (with a witness) or ``"unknown"``."""

    status: str
    witness: str | None = None
    reason: str = ""


class Z3Engine:
    """Translates patterns to z3 regexes and answers "is there a string such that ..." queries."""

    def __init__(self, timeout_seconds: float = 60.0) -> None:
        import z3

        encoding = str(z3.get_param("encoding"))
        if encoding != "unicode":
            raise RuntimeError(
                f"z3's global parameter encoding is {encoding!r}; the proofs assume 'unicode' "
                "(alphabet 0..0x2FFFF). Reset it with z3.set_param('encoding', 'unicode')."
            )
        self.z3: Any = z3
        # A context of its own: queries of one engine never share solver state with another's
        # (sharing the global context made later queries depend on earlier ones, and slow).
        self.ctx: Any = z3.Context()
        self.timeout_ms = int(timeout_seconds * 1000)
        self._regexes: dict[str, Any] = {}

    # -- translation

    def regex(self, pattern: str) -> Any:
        """The z3 regex of ``{s : re.fullmatch(pattern, s)}`` over z3's alphabet."""
        found = self._regexes.get(pattern)
        if found is None:
            found = self._regexes[pattern] = self._node(_strip_anchors(pattern, parse(pattern)))
        return found

    def union(self, patterns: Sequence[str]) -> Any:
        """The z3 regex of the union of ``patterns`` (the empty language for no pattern)."""
        return self._alt([self.regex(p) for p in patterns])

    def _empty(self) -> Any:
        return self.z3.Empty(self.z3.ReSort(self.z3.StringSort(self.ctx)))

    def _alt(self, parts: list[Any]) -> Any:
        if not parts:
            return self._empty()
        return parts[0] if len(parts) == 1 else self.z3.Union(*parts)

    def _seq(self, parts: list[Any]) -> Any:
        if not parts:
            return self.z3.Re(self.z3.StringVal("", self.ctx))
        return parts[0] if len(parts) == 1 else self.z3.Concat(*parts)

    def _node(self, node: Node) -> Any:
        z3 = self.z3
        if isinstance(node, Chars):
            ranges = [
                z3.Re(z3.StringVal(chr(lo), self.ctx))
                if lo == hi
                else z3.Range(chr(lo), chr(min(hi, Z3_MAX_CHAR)), self.ctx)
                for lo, hi in node.intervals
                if lo <= Z3_MAX_CHAR
            ]
            return self._alt(ranges)
        if isinstance(node, Seq):
            return self._seq([self._node(item) for item in node.items])
        if isinstance(node, Alt):
            return self._alt([self._node(option) for option in node.options])
        if isinstance(node, Repeat):
            item = self._node(node.item)
            parts = [item] * node.low
            if node.high is None:
                parts.append(z3.Star(item))
            else:
                optional = None
                for _ in range(node.high - node.low):
                    optional = z3.Option(item if optional is None else z3.Concat(item, optional))
                if optional is not None:
                    parts.append(optional)
            return self._seq(parts)
        raise AssertionError(f"anchor {node} survived _strip_anchors")  # pragma: no cover

    # -- queries

    def find(self, constraints: Callable[[Any], list[Any]]) -> Answer:
        """Is there a string ``s`` satisfying ``constraints(s)``? A witness when there is."""
        z3 = self.z3
        s = z3.String("s", self.ctx)
        solver = z3.Solver(ctx=self.ctx)
        solver.set("timeout", self.timeout_ms)
        solver.add(*constraints(s))
        result = solver.check()
        if result == z3.unsat:
            return Answer("unsat")
        if result == z3.sat:
            model = solver.model()
            length = model.eval(z3.Length(s)).as_long()
            codes = [
                model.eval(z3.StrToCode(z3.SubString(s, i, 1))).as_long() for i in range(length)
            ]
            return Answer("sat", "".join(map(chr, codes)))
        return Answer("unknown", reason=str(solver.reason_unknown()))

    def common(self, first: Any, second: Any) -> Answer:
        """A string in both regexes?"""
        z3 = self.z3
        return self.find(lambda s: [z3.InRe(s, first), z3.InRe(s, second)])

    def starting_with(self, prefix: str, regex: Any) -> Answer:
        """A string of ``regex`` that starts with ``prefix``?"""
        z3 = self.z3
        start = z3.StringVal(prefix, self.ctx)
        return self.find(lambda s: [z3.InRe(s, regex), z3.PrefixOf(start, s)])

    def prefixed_in(self, prefix: str, inner: Any, outer: Any) -> Answer:
        """A string ``s`` of ``inner`` with ``prefix + s`` in ``outer``?"""
        z3 = self.z3
        start = z3.StringVal(prefix, self.ctx)
        return self.find(lambda s: [z3.InRe(s, inner), z3.InRe(z3.Concat(start, s), outer)])


def _flatten(node: Node) -> list[Node]:
    if isinstance(node, Seq):
        return [leaf for item in node.items for leaf in _flatten(item)]
    return [node]


def _strip_anchors(pattern: str, node: Node) -> Node:
    """Drop leading begin and trailing end anchors; refuse any other anchor."""
    items = _flatten(node)
    while items and isinstance(items[0], Anchor) and items[0].kind == "begin":
        items.pop(0)
    while items and isinstance(items[-1], Anchor) and items[-1].kind in ("end", "dollar"):
        items.pop()
    if _has_anchor(Seq(tuple(items))):
        raise UnsupportedPattern(
            f"pattern {pattern!r}: the z3 engine translates anchors only at the very start "
            "(\\A, ^) and the very end (\\Z, $) of a pattern"
        )
    return Seq(tuple(items))


def _has_anchor(node: Node) -> bool:
    if isinstance(node, Anchor):
        return True
    if isinstance(node, Seq):
        return any(_has_anchor(item) for item in node.items)
    if isinstance(node, Alt):
        return any(_has_anchor(option) for option in node.options)
    if isinstance(node, Repeat):
        return _has_anchor(node.item)
    return False
