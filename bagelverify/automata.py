"""A small, exact automaton engine for the full-match languages of key patterns.

Patterns are parsed with Python's own regex parser (``re._parser``), translated to an NFA over
*atoms* (classes of code points that no pattern can tell apart; the alphabet is all of Unicode,
``0 .. sys.maxunicode``, surrogates included), determinised by subset construction and minimised
(Hopcroft). The language of a pattern ``p`` is ``{s : re.fullmatch(p, s)}`` for ``str`` subjects.

Exact, not approximate: a construct that cannot be translated exactly raises
:class:`UnsupportedPattern` naming the pattern and the construct (lookarounds, backreferences,
conditionals, ``\\b``/``\\B``, atomic groups, possessive repeats, and the flags IGNORECASE, LOCALE,
MULTILINE, DOTALL, VERBOSE, inline or scoped). Anchors are modelled exactly: ``\\A`` and ``^``
hold at position 0 only, ``\\Z`` at the end only, and ``$`` at the end *or* just before a final
``\\n`` (so ``a$\\n`` full-matches ``"a\\n"``; and under ``re.match`` semantics ``\\Aa$``
accepts ``"a\\n"``: the trap that :meth:`DFA.membership`'s ``semantics`` lets a proof expose).
``\\d``, ``\\w``, ``\\s`` and their negations are the exact sets ``re`` itself uses, read from the
running interpreter's ``re`` (in ``str`` mode: hundreds of Unicode digits; with ``(?a)``: ASCII).

The digit-template rule (shared with the compiled matcher; one implementation,
:func:`template_verdict`, built from :func:`template_step`, which ``bagelverify.verify``
obligation P3 explores to prove the rule sound):

* a key's *template* replaces every ASCII digit ``0``-``9`` by one placeholder character
  (Unicode digits are not replaced);
* walk the template through the DFA from ``start``: at a literal character ``step``; at a
  placeholder require :meth:`DFA.digits_agree` of the current state (all ten ASCII digits lead
  to one state) and continue with ``step(state, "0")``;
* if every placeholder position agrees the template is *safe*, and ``label(final_state)`` is the
  verdict of every key with that template (each placeholder position meets a state whose ten
  digit successors coincide, so every such key runs through the very same states).
* precondition: the template was made from a key that does not itself contain the placeholder
  character. No ``str`` character is impossible in a key, so a matcher must send keys that
  contain its placeholder past the memo (otherwise ``"a#"`` and ``"a1"`` share template ``"a#"``);
  the compiled matcher memoises ASCII keys only, with a non-ASCII placeholder.

The parse (:func:`parse`, a small IR of :class:`Chars`, :class:`Seq`, :class:`Alt`,
:class:`Repeat`, :class:`Anchor`) is the one place that decides what is translatable; the NFA
builder here and the z3 translation in :mod:`bagelverify.smt` both read it.
"""

from __future__ import annotations

import importlib
import re
import sys
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, Generic, TypeVar

from .errors import PatternTooComplexError, UnsupportedPattern, format_examples
from .strict_json import short_repr

_parser: Any = importlib.import_module("re._parser" if sys.version_info >= (3, 11) else "sre_parse")
_c: Any = importlib.import_module(
    "re._constants" if sys.version_info >= (3, 11) else "sre_constants"
)

MAX_CHAR = sys.maxunicode
"""Largest code point: the engine's alphabet is ``0 .. MAX_CHAR`` (every Python ``str`` char)."""

ASCII_DIGITS = "0123456789"
SEMANTICS = ("fullmatch", "match", "search")
"""The ``re`` functions whose languages the engine models."""
MAX_REPEAT_EXPANSION = 1000
"""Bounded repeats ``{m,n}`` are expanded; bounds above this are refused (size, not meaning)."""

NodeT = TypeVar("NodeT", bound=Hashable)
EdgeT = TypeVar("EdgeT")

Intervals = tuple[tuple[int, int], ...]
"""A set of code points as sorted, disjoint, non-adjacent inclusive ``(lo, hi)`` intervals."""

# Flags a parsed pattern may carry: UNICODE is the str default, ASCII only narrows \d \w \s.
_ALLOWED_FLAGS = _c.SRE_FLAG_UNICODE | _c.SRE_FLAG_ASCII
_FLAG_NAMES = {
    _c.SRE_FLAG_IGNORECASE: "IGNORECASE (?i)",
    _c.SRE_FLAG_LOCALE: "LOCALE (?L)",
    _c.SRE_FLAG_MULTILINE: "MULTILINE (?m)",
    _c.SRE_FLAG_DOTALL: "DOTALL (?s)",
    _c.SRE_FLAG_VERBOSE: "VERBOSE (?x)",
    _c.SRE_FLAG_DEBUG: "DEBUG",
}

# epsilon-edge kinds
_PLAIN, _BEGIN, _END_STRING, _DOLLAR = 0, 1, 2, 3
# position modes of an NFA configuration: free; "the next char must be the final \n"; at the end
_FREE, _NL, _END = 0, 1, 2
_NEWLINE = ord("\n")


MAX_NFA_STATES = 200_000
"""Budget of NFA states for one automaton (the shipped patterns need about 10,500)."""
MAX_DFA_STATES = 20_000
"""Budget of DFA states before minimisation (the shipped patterns need about 1,000). Subset
construction can need exponentially many (``(?:a|b)*a(?:a|b){n}`` needs 2**(n+1)); past this
budget the build stops with :class:`~bagelverify.errors.PatternTooComplexError`."""


class _BudgetExceeded(Exception):
    """Internal: a construction ran past :data:`MAX_NFA_STATES` or :data:`MAX_DFA_STATES`."""

    def __init__(self, what: str, limit: int) -> None:
        super().__init__(what, limit)
        self.what, self.limit = what, limit


def _refuse(pattern: str, construct: str) -> UnsupportedPattern:
    return UnsupportedPattern(
        f"pattern {pattern!r}: {construct} cannot be translated exactly into an automaton; "
        "rewrite the pattern without it (full-match patterns need only literals, classes, "
        "groups, alternation, repeats and the anchors \\A \\Z)"
    )


def normalize(intervals: Iterable[tuple[int, int]]) -> Intervals:
    """Sort and merge overlapping or adjacent intervals."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(intervals):
        if out and lo <= out[-1][1] + 1:
            if hi > out[-1][1]:
                out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return tuple(out)


def complement(intervals: Intervals) -> Intervals:
    """Every code point not in ``intervals``."""
    out: list[tuple[int, int]] = []
    nxt = 0
    for lo, hi in intervals:
        if lo > nxt:
            out.append((nxt, lo - 1))
        nxt = hi + 1
    if nxt <= MAX_CHAR:
        out.append((nxt, MAX_CHAR))
    return tuple(out)


def _runs(codes: Iterable[int]) -> Intervals:
    return normalize((c, c) for c in codes)


@cache
def _all_chars() -> str:
    return "".join(map(chr, range(MAX_CHAR + 1)))


@cache
def category_set(escape: str, ascii_only: bool) -> Intervals:
    """Exact code points of ``\\d``, ``\\D``, ``\\w``, ... as ``re`` itself matches them."""
    regex = re.compile(escape, re.ASCII if ascii_only else 0)
    return _runs(ord(ch) for ch in regex.findall(_all_chars()))


_CATEGORY_ESCAPES = {
    _c.CATEGORY_DIGIT: r"\d",
    _c.CATEGORY_NOT_DIGIT: r"\D",
    _c.CATEGORY_SPACE: r"\s",
    _c.CATEGORY_NOT_SPACE: r"\S",
    _c.CATEGORY_WORD: r"\w",
    _c.CATEGORY_NOT_WORD: r"\W",
}


def unicode_non_ascii_digits() -> Intervals:
    """Code points that ``str``-mode ``\\d`` matches beyond ``0``-``9``."""
    return tuple(iv for iv in category_set(r"\d", False) if iv[0] > ord("9"))


# -- pattern text -> a small regex IR (the one place that decides what is translatable) --------


@dataclass(frozen=True)
class Chars:
    """One character from a set of code points."""

    intervals: Intervals


@dataclass(frozen=True)
class Seq:
    """Concatenation (the empty sequence matches the empty string)."""

    items: tuple[Node, ...]


@dataclass(frozen=True)
class Alt:
    """Alternation."""

    options: tuple[Node, ...]


@dataclass(frozen=True)
class Repeat:
    """``item{low,high}``; ``high`` is ``None`` when unbounded. Greedy and lazy alike."""

    low: int
    high: int | None
    item: Node


@dataclass(frozen=True)
class Anchor:
    """Zero-width position test: ``"begin"`` (``\\A``, ``^``), ``"end"`` (``\\Z``), ``"dollar"``."""

    kind: str


Node = Chars | Seq | Alt | Repeat | Anchor

_ANCHORS = {
    _c.AT_BEGINNING: "begin",
    _c.AT_BEGINNING_STRING: "begin",
    _c.AT_END_STRING: "end",
    _c.AT_END: "dollar",
}
_REFUSED_OPS = {
    "ASSERT": "a lookahead/lookbehind assertion",
    "ASSERT_NOT": "a negative lookahead/lookbehind assertion",
    "GROUPREF": "a backreference",
    "GROUPREF_EXISTS": "a conditional group (?(id)yes|no)",
    "ATOMIC_GROUP": "an atomic group (?>...)",
    "POSSESSIVE_REPEAT": "a possessive repeat (*+, ++, ?+)",
}


@cache
def parse(pattern: str) -> Node:
    """The IR of ``pattern`` as ``re`` parses it; :class:`UnsupportedPattern` if not exact."""
    if not isinstance(pattern, str):
        raise UnsupportedPattern(
            f"pattern {pattern!r}: only str patterns are supported, got {type(pattern).__name__}"
        )
    try:
        parsed = _parser.parse(pattern, 0)
    except re.error as error:
        raise UnsupportedPattern(
            f"pattern {pattern!r} is not a valid regular expression: {error}"
        ) from error
    flags = parsed.state.flags
    for flag, name in _FLAG_NAMES.items():
        if flags & flag:
            raise _refuse(pattern, f"the flag {name}")
    if flags & ~_ALLOWED_FLAGS:
        raise _refuse(pattern, f"flags {flags:#x}")
    return _Translator(pattern, ascii_only=bool(flags & _c.SRE_FLAG_ASCII)).sequence(parsed)


class _Translator:
    """``re._parser`` tree -> IR for one pattern."""

    def __init__(self, pattern: str, *, ascii_only: bool) -> None:
        self.pattern = pattern
        self.ascii_only = ascii_only

    def sequence(self, items: Iterable[tuple[Any, Any]]) -> Seq:
        return Seq(tuple(self.item(op, av) for op, av in items))

    def item(self, op: Any, av: Any) -> Node:
        if op is _c.LITERAL:
            return Chars(((av, av),))
        if op is _c.NOT_LITERAL:
            return Chars(complement(((av, av),)))
        if op is _c.ANY:  # no DOTALL: everything but "\n"
            return Chars(complement(((_NEWLINE, _NEWLINE),)))
        if op is _c.IN:
            return Chars(self.charset_items(av))
        if op is _c.BRANCH:
            return Alt(tuple(self.sequence(option) for option in av[1]))
        if op is _c.SUBPATTERN:
            _group, add_flags, del_flags, body = av
            if add_flags or del_flags:
                raise _refuse(self.pattern, "a scoped flag group (?flags:...)")
            return self.sequence(body)
        if op is _c.MAX_REPEAT or op is _c.MIN_REPEAT:
            low, high, body = av
            unbounded = high == _c.MAXREPEAT
            if low > MAX_REPEAT_EXPANSION or (not unbounded and high > MAX_REPEAT_EXPANSION):
                raise _refuse(
                    self.pattern, f"a repeat bound above {MAX_REPEAT_EXPANSION} ({{{low},{high}}})"
                )
            return Repeat(low, None if unbounded else high, self.sequence(body))
        if op is _c.AT:
            if av not in _ANCHORS:
                raise _refuse(self.pattern, f"the zero-width assertion {av}")
            return Anchor(_ANCHORS[av])
        raise _refuse(self.pattern, _REFUSED_OPS.get(str(op), f"the construct {op}"))

    def charset_items(self, items: Sequence[tuple[Any, Any]]) -> Intervals:
        negate = False
        parts: list[tuple[int, int]] = []
        for op, av in items:
            if op is _c.NEGATE:
                negate = True
            elif op is _c.LITERAL:
                parts.append((av, av))
            elif op is _c.RANGE:
                parts.append((av[0], av[1]))
            elif op is _c.CATEGORY and av in _CATEGORY_ESCAPES:
                parts.extend(category_set(_CATEGORY_ESCAPES[av], self.ascii_only))
            else:
                raise _refuse(self.pattern, f"the class item {op} {av}")
        merged = normalize(parts)
        return complement(merged) if negate else merged


# -- IR -> NFA ---------------------------------------------------------------------------------

_ANCHOR_EDGES = {"begin": _BEGIN, "end": _END_STRING, "dollar": _DOLLAR}


class _NFA:
    """Thompson NFA: character edges carry a charset id, epsilon edges an anchor kind."""

    def __init__(self) -> None:
        self.eps: list[list[tuple[int, int]]] = []
        self.edges: list[list[tuple[int, int]]] = []
        self.charsets: list[Intervals] = []
        self._charset_ids: dict[Intervals, int] = {}
        self.finals: dict[int, int] = {}  # state -> tag
        self.start = self.new()

    def new(self) -> int:
        if len(self.eps) >= MAX_NFA_STATES:
            raise _BudgetExceeded("NFA states", MAX_NFA_STATES)
        self.eps.append([])
        self.edges.append([])
        return len(self.eps) - 1

    def charset(self, intervals: Intervals) -> int:
        found = self._charset_ids.get(intervals)
        if found is None:
            found = self._charset_ids[intervals] = len(self.charsets)
            self.charsets.append(intervals)
        return found

    def add_pattern(self, pattern: str, tag: int, semantics: str = "fullmatch") -> None:
        """Add ``pattern`` with final tag ``tag``; ``semantics`` is the ``re`` function whose
        accepted subjects form the language: ``fullmatch``, ``match`` or ``search``."""
        if semantics not in SEMANTICS:
            raise ValueError(f"semantics must be one of {SEMANTICS}, got {semantics!r}")
        begin, end = self.fragment(parse(pattern))
        anything = self.charset(((0, MAX_CHAR),))
        if semantics == "search":  # skip any prefix; \A still holds at position 0 only
            skip = self.new()
            self.edges[skip].append((anything, skip))
            self.eps[skip].append((begin, _PLAIN))
            begin = skip
        if semantics != "fullmatch":  # any suffix; $ and \Z still refer to the whole subject
            rest = self.new()
            self.edges[rest].append((anything, rest))
            self.eps[end].append((rest, _PLAIN))
            end = rest
        self.eps[self.start].append((begin, _PLAIN))
        self.finals[end] = tag

    def fragment(self, node: Node) -> tuple[int, int]:
        """A fresh sub-automaton for ``node``: its entry and exit states."""
        begin = self.new()
        if isinstance(node, Chars):
            end = self.new()
            self.edges[begin].append((self.charset(node.intervals), end))
        elif isinstance(node, Anchor):
            end = self.new()
            self.eps[begin].append((end, _ANCHOR_EDGES[node.kind]))
        elif isinstance(node, Alt):
            end = self.new()
            for option in node.options:
                first, last = self.fragment(option)
                self.eps[begin].append((first, _PLAIN))
                self.eps[last].append((end, _PLAIN))
        elif isinstance(node, Seq):
            end = begin
            for item in node.items:
                end = self.append(end, item)
        else:
            end = begin
            for _ in range(node.low):
                end = self.append(end, node.item)
            if node.high is None:
                loop = self.new()
                first, last = self.fragment(node.item)
                self.eps[end].append((loop, _PLAIN))
                self.eps[loop].append((first, _PLAIN))
                self.eps[last].append((loop, _PLAIN))
                end = loop
            else:
                for _ in range(node.high - node.low):
                    # a fresh exit: a skip edge into the item's own exit could re-enter a loop
                    # inside the item (``(?:ab*)?`` must not accept ``"b"``)
                    first, last = self.fragment(node.item)
                    after = self.new()
                    self.eps[end].append((first, _PLAIN))
                    self.eps[end].append((after, _PLAIN))
                    self.eps[last].append((after, _PLAIN))
                    end = after
        return begin, end

    def append(self, end: int, node: Node) -> int:
        """Chain a fragment for ``node`` after state ``end``; return the new exit."""
        first, last = self.fragment(node)
        self.eps[end].append((first, _PLAIN))
        return last


# -- alphabet partition ------------------------------------------------------------------------


class Alphabet:
    """A partition of all code points into atoms: classes no charset of the patterns separates."""

    def __init__(self, charsets: Sequence[Intervals]) -> None:
        cuts = {0, _NEWLINE, _NEWLINE + 1}
        for intervals in charsets:
            for lo, hi in intervals:
                cuts.add(lo)
                cuts.add(hi + 1)
        cuts.discard(MAX_CHAR + 1)
        self.starts: list[int] = sorted(cuts)
        signatures: list[set[int]] = [set() for _ in self.starts]
        signatures[bisect_right(self.starts, _NEWLINE) - 1].add(-1)  # "\n" is always alone
        for index, intervals in enumerate(charsets):
            for lo, hi in intervals:
                for piece in range(
                    bisect_right(self.starts, lo) - 1, bisect_right(self.starts, hi)
                ):
                    signatures[piece].add(index)
        atom_ids: dict[frozenset[int], int] = {}
        self.piece_atom: list[int] = [
            atom_ids.setdefault(frozenset(sig), len(atom_ids)) for sig in signatures
        ]
        self.size = len(atom_ids)
        self.charset_atoms: list[frozenset[int]] = [
            frozenset(
                self.piece_atom[piece]
                for lo, hi in intervals
                for piece in range(bisect_right(self.starts, lo) - 1, bisect_right(self.starts, hi))
            )
            for intervals in charsets
        ]
        self._ascii = [self.piece_atom[bisect_right(self.starts, o) - 1] for o in range(128)]
        self._avoiding: dict[str, list[str | None]] = {}
        self.representatives: list[str] = [c or "" for c in self.members_avoiding("")]
        """One member of each atom (readable when possible), for witnesses."""

    def atom_of(self, char: str) -> int:
        """The atom of one character."""
        code = ord(char)
        if code < 128:
            return self._ascii[code]
        return self.piece_atom[bisect_right(self.starts, code) - 1]

    def pieces(self, atom: int) -> list[tuple[int, int]]:
        """The code-point intervals that make up ``atom``."""
        ends = [*self.starts[1:], MAX_CHAR + 1]
        return [
            (lo, end - 1)
            for lo, end, owner in zip(self.starts, ends, self.piece_atom, strict=True)
            if owner == atom
        ]

    def members_avoiding(self, avoid: str) -> list[str | None]:
        """A readable member of each atom outside ``avoid`` (``None`` if the atom has none):
        for witnesses, a letter, digit or '.' when possible. Cached per ``avoid``."""
        found = self._avoiding.get(avoid)
        if found is None:
            found = self._avoiding[avoid] = self._pick(avoid)
        return found

    def _pick(self, avoid: str) -> list[str | None]:
        preferred = "abcdefghijklmnopqrstuvwxyz0123456789._ABCDEFGHIJKLMNOPQRSTUVWXYZ-/:"
        chosen: dict[int, str] = {}
        for char in preferred:
            if char not in avoid:
                chosen.setdefault(self.atom_of(char), char)
        ends = [*self.starts[1:], MAX_CHAR + 1]
        for start, end, atom in zip(self.starts, ends, self.piece_atom, strict=True):
            if atom not in chosen:
                # at most len(avoid) members of a piece are avoided
                for code in range(start, min(end, start + len(avoid) + 1)):
                    if chr(code) not in avoid:
                        chosen[atom] = chr(code)
                        break
        return [chosen.get(atom) for atom in range(self.size)]


# -- DFA ---------------------------------------------------------------------------------------

Labeller = Callable[[frozenset[int]], Hashable | None]


def _construct(
    tagged: Sequence[tuple[str, int, str]], split: Sequence[Intervals] = ()
) -> tuple[list[list[int]], list[frozenset[int]], int, Alphabet]:
    """NFA of the tagged patterns, then subset construction (within the budgets)."""
    nfa = _NFA()
    for pattern, tag, semantics in tagged:
        nfa.add_pattern(pattern, tag, semantics)
    alphabet = Alphabet([*nfa.charsets, *split])
    delta, tags, start = _determinise(nfa, alphabet)
    return delta, tags, start, alphabet


def _blame(tagged: Sequence[tuple[str, int, str]], budget: _BudgetExceeded) -> str:
    """The message for a blown budget: the first pattern that blows it alone, or all of them."""
    for entry in dict.fromkeys(tagged):
        try:
            _construct([entry])
        except _BudgetExceeded as alone:
            return (
                f"pattern {short_repr(entry[0])} needs more than {alone.limit} {alone.what} to "
                "match exactly; simplify it (a bounded repeat such as {15} after an unbounded "
                "one multiplies the states), or split it into several patterns"
            )
    patterns = list(dict.fromkeys(pattern for pattern, _, _ in tagged))
    return (
        f"the {len(patterns)} patterns together ({format_examples(patterns)}) need more than "
        f"{budget.limit} {budget.what} to match exactly; use fewer or simpler patterns"
    )


class DFA:
    """A minimal, total DFA over an :class:`Alphabet`; accepting states carry a label."""

    def __init__(
        self,
        alphabet: Alphabet,
        delta: list[list[int]],
        labels: list[Hashable | None],
        start: int,
    ) -> None:
        self.alphabet = alphabet
        self.delta = delta
        self.labels = labels
        self.start = start
        digit_atoms = sorted({alphabet.atom_of(d) for d in ASCII_DIGITS})
        self._digit_atoms = digit_atoms
        self._agree = [len({row[a] for a in digit_atoms}) == 1 for row in delta]
        self._distinct_labels = list(dict.fromkeys(labels))
        self._dead = [labels[s] is None and all(t == s for t in row) for s, row in enumerate(delta)]

    # -- construction

    @classmethod
    def from_patterns(cls, labelled: Sequence[tuple[Hashable, Sequence[str]]]) -> DFA:
        """Minimal DFA over the union of all patterns; an accepting state carries the label of the
        FIRST group (in the given order) whose language contains the string, mirroring
        first-match classification. Patterns have ``re.fullmatch`` semantics on ``str``."""
        patterns = [
            (p, group, "fullmatch")
            for group, (_, group_patterns) in enumerate(labelled)
            for p in group_patterns
        ]
        names = [label for label, _ in labelled]

        def first(tags: frozenset[int]) -> Hashable | None:
            return names[min(tags)] if tags else None

        return cls._build(patterns, first)

    @classmethod
    def membership(
        cls,
        patterns: Sequence[str],
        *,
        semantics: Sequence[str] | None = None,
        split: Sequence[Intervals] = (),
    ) -> DFA:
        """Minimal DFA whose label is the frozenset of indices of *every* pattern that accepts
        the string (``None`` when none does). ``semantics[i]`` says how pattern ``i`` accepts
        (``"fullmatch"``, the default, ``"match"`` or ``"search"``). ``split`` adds code-point
        sets that the alphabet must keep in atoms of their own (so a search can ask "contains a
        char of this set")."""

        def every(tags: frozenset[int]) -> Hashable | None:
            return tags or None

        modes = ["fullmatch"] * len(patterns) if semantics is None else list(semantics)
        if len(modes) != len(patterns):
            raise ValueError("semantics must give one entry per pattern")
        tagged = [(p, i, mode) for i, (p, mode) in enumerate(zip(patterns, modes, strict=True))]
        return cls._build(tagged, every, split)

    @classmethod
    def _build(
        cls,
        tagged: Sequence[tuple[str, int, str]],
        labeller: Labeller,
        split: Sequence[Intervals] = (),
    ) -> DFA:
        try:
            delta, tags, start, alphabet = _construct(tagged, split)
        except _BudgetExceeded as budget:
            raise PatternTooComplexError(_blame(tagged, budget)) from None
        labels = [labeller(t) for t in tags]
        delta, labels, start = _minimise(delta, labels, start, alphabet.size)
        return cls(alphabet, delta, labels, start)

    # -- running

    @property
    def num_states(self) -> int:
        """Number of states (the dead state included)."""
        return len(self.delta)

    def step(self, state: int, char: str) -> int:
        """The successor of ``state`` on one character (total: the dead state if nowhere)."""
        return self.delta[state][self.alphabet.atom_of(char)]

    def run(self, text: str, state: int | None = None) -> int:
        """The state reached from ``state`` (default: ``start``) after reading ``text``."""
        current = self.start if state is None else state
        delta, atom_of = self.delta, self.alphabet.atom_of
        for char in text:
            current = delta[current][atom_of(char)]
        return current

    def label(self, state: int) -> Hashable | None:
        """The label of ``state`` if it is accepting, else ``None``."""
        return self.labels[state]

    def classify(self, text: str) -> Hashable | None:
        """The label of the state ``text`` leads to from ``start``."""
        return self.labels[self.run(text)]

    def digits_agree(self, state: int) -> bool:
        """True iff all ten ASCII digits ``'0'``..``'9'`` lead from ``state`` to one state."""
        return self._agree[state]

    def is_dead(self, state: int) -> bool:
        """True iff no string leads from ``state`` to an accepting state."""
        return self._dead[state]

    # -- searching

    def reachable_labels(self) -> set[Hashable]:
        """Every label of a state reachable from ``start`` (all states are reachable)."""
        return {label for label in self.labels if label is not None}

    def shortest(
        self, accept: Callable[[Hashable | None], bool], start: int | None = None
    ) -> str | None:
        """A shortest string leading from ``start`` to a state whose label satisfies ``accept``."""
        if not any(accept(label) for label in self._distinct_labels):
            return None  # no state at all qualifies: skip the search
        search = BreadthFirst(self.start if start is None else start, self.successors)
        for state in search:
            if accept(self.labels[state]):
                return "".join(search.path(state))
        return None

    def successors(self, state: int) -> list[tuple[str, int]]:
        """``(representative char, target)`` for each atom (targets may repeat)."""
        return list(zip(self.alphabet.representatives, self.delta[state], strict=True))

    def __repr__(self) -> str:
        return f"<DFA {self.num_states} states, {self.alphabet.size} atoms>"


class BreadthFirst(Generic[NodeT, EdgeT]):
    """Breadth-first search from ``start``: iterating yields nodes in order of distance, each
    once; :meth:`path` gives the edge labels of a shortest path to a yielded node."""

    def __init__(
        self, start: NodeT, successors: Callable[[NodeT], Iterable[tuple[EdgeT, NodeT]]]
    ) -> None:
        self.start = start
        self.successors = successors
        self.parent: dict[NodeT, tuple[NodeT, EdgeT] | None] = {start: None}

    def __iter__(self) -> Iterator[NodeT]:
        queue = deque([self.start])
        while queue:
            node = queue.popleft()
            yield node
            for edge, target in self.successors(node):
                if target not in self.parent:
                    self.parent[target] = (node, edge)
                    queue.append(target)

    def path(self, node: NodeT) -> list[EdgeT]:
        """Edge labels from ``start`` to ``node`` (a node already yielded)."""
        edges: list[EdgeT] = []
        link = self.parent[node]
        while link is not None:
            node, edge = link
            edges.append(edge)
            link = self.parent[node]
        return edges[::-1]


def _closure(nfa: _NFA, configs: Iterable[int], at_start: bool) -> frozenset[int]:
    """Epsilon closure of configurations ``state * 3 + mode``."""
    seen = set(configs)
    stack = list(seen)
    while stack:
        config = stack.pop()
        state, mode = divmod(config, 3)
        for target, kind in nfa.eps[state]:
            if kind == _PLAIN:
                nexts = [mode]
            elif kind == _BEGIN:
                nexts = [mode] if at_start else []
            elif kind == _END_STRING:
                nexts = [] if mode == _NL else [_END]
            elif mode == _FREE:  # $ at the end, or before a final "\n"
                nexts = [_END, _NL]
            else:
                nexts = [mode]
            for new_mode in nexts:
                item = target * 3 + new_mode
                if item not in seen:
                    seen.add(item)
                    stack.append(item)
    return frozenset(seen)


def _determinise(
    nfa: _NFA, alphabet: Alphabet
) -> tuple[list[list[int]], list[frozenset[int]], int]:
    """Subset construction; returns transitions, accepted tags per state, and the start."""
    newline = alphabet.atom_of("\n")
    moves: list[list[tuple[frozenset[int], int]]] = [
        [(alphabet.charset_atoms[cs], target) for cs, target in edges] for edges in nfa.edges
    ]
    ids: dict[frozenset[int], int] = {}
    sets: list[frozenset[int]] = []

    def intern(configs: frozenset[int]) -> int:
        found = ids.get(configs)
        if found is None:
            if len(sets) >= MAX_DFA_STATES:
                raise _BudgetExceeded("DFA states", MAX_DFA_STATES)
            found = ids[configs] = len(sets)
            sets.append(configs)
        return found

    empty = frozenset[int]()
    dead = intern(empty)
    start = intern(_closure(nfa, [nfa.start * 3 + _FREE], at_start=True))
    closures: dict[frozenset[int], int] = {empty: dead}
    delta: list[list[int]] = []
    index = 0
    while index < len(sets):
        current = sets[index]
        index += 1
        by_atom: dict[int, set[int]] = {}
        for config in current:
            state, mode = divmod(config, 3)
            if mode == _END:
                continue
            for atoms, target in moves[state]:
                if mode == _FREE:
                    for atom in atoms:
                        by_atom.setdefault(atom, set()).add(target * 3 + _FREE)
                elif newline in atoms:
                    by_atom.setdefault(newline, set()).add(target * 3 + _END)
        row = [dead] * alphabet.size
        for atom, targets in by_atom.items():
            key = frozenset(targets)
            found = closures.get(key)
            if found is None:
                found = closures[key] = intern(_closure(nfa, key, at_start=False))
            row[atom] = found
        delta.append(row)
    tags = [
        frozenset(nfa.finals[c // 3] for c in configs if c % 3 != _NL and c // 3 in nfa.finals)
        for configs in sets
    ]
    return delta, tags, start


def _minimise(
    delta: list[list[int]], labels: list[Hashable | None], start: int, atoms: int
) -> tuple[list[list[int]], list[Hashable | None], int]:
    """Hopcroft's partition refinement; every state is reachable, so the result is minimal."""
    n = len(delta)
    inverse: list[list[list[int]]] = [[[] for _ in range(n)] for _ in range(atoms)]
    for source, row in enumerate(delta):
        for atom, target in enumerate(row):
            inverse[atom][target].append(source)
    groups: dict[Hashable | None, list[int]] = {}
    for state, label in enumerate(labels):
        groups.setdefault(label, []).append(state)
    blocks: list[set[int]] = [set(members) for members in groups.values()]
    block_of = [0] * n
    for b, block in enumerate(blocks):
        for state in block:
            block_of[state] = b
    work = list(range(len(blocks)))
    in_work = set(work)
    while work:
        splitter = work.pop()
        in_work.discard(splitter)
        members = list(blocks[splitter])
        for atom in range(atoms):
            inv = inverse[atom]
            touched: dict[int, set[int]] = {}
            for target in members:
                for source in inv[target]:
                    touched.setdefault(block_of[source], set()).add(source)
            for b, hit in touched.items():
                if len(hit) == len(blocks[b]):
                    continue
                blocks[b] -= hit
                new = len(blocks)
                blocks.append(hit)
                for state in hit:
                    block_of[state] = new
                if b in in_work:
                    work.append(new)
                    in_work.add(new)
                else:
                    smaller = new if len(hit) <= len(blocks[b]) else b
                    work.append(smaller)
                    in_work.add(smaller)
    # renumber blocks in BFS order from the start so state ids are deterministic
    order: dict[int, int] = {block_of[start]: 0}
    queue = deque([block_of[start]])
    while queue:
        b = queue.popleft()
        for target in delta[next(iter(blocks[b]))]:
            tb = block_of[target]
            if tb not in order:
                order[tb] = len(order)
                queue.append(tb)
    new_delta = [[0] * atoms for _ in order]
    new_labels: list[Hashable | None] = [None] * len(order)
    for b, new_id in order.items():
        rep = next(iter(blocks[b]))
        new_delta[new_id] = [order[block_of[t]] for t in delta[rep]]
        new_labels[new_id] = labels[rep]
    return new_delta, new_labels, 0


def template_step(dfa: DFA, state: int, char: str, placeholder: str) -> int | None:
    """One step of the template walk: ``step`` on a literal; on ``placeholder``, ``None``
    (unsafe) unless all ten ASCII digits agree at ``state``, then ``step(state, "0")``."""
    if char != placeholder:
        return dfa.step(state, char)
    return dfa.step(state, "0") if dfa.digits_agree(state) else None


def template_verdict(dfa: DFA, template: str, placeholder: str) -> tuple[bool, Hashable | None]:
    """``(safe, label)`` of a digit template (see the module docstring for the rule).

    ``safe`` is True when every ``placeholder`` position meets a state where all ten ASCII
    digits agree; then ``label`` is the DFA's verdict for *every* key with this template.
    When not safe, ``label`` is ``None`` and means nothing: classify the key itself.
    """
    state = dfa.start
    for char in template:
        after = template_step(dfa, state, char, placeholder)
        if after is None:
            return False, None
        if dfa.is_dead(after):  # the dead state absorbs every continuation: verdict None
            return True, None
        state = after
    return True, dfa.label(state)
