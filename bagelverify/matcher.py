"""Deciding which bucket a key belongs to, from per-bucket lists of full-match patterns.

Two matchers with the same answers:

:class:`NaiveMatcher`
    the reference: every pattern of every bucket, in match order;
:class:`Matcher` (built by :func:`compile_matcher`)
    the fast one, in three steps per key:

    1. **digit-template memo**: the key's ASCII digits are replaced by one placeholder byte and
       the template is looked up in a bounded dict. A template is stored only when
       :func:`bagelverify.automata.template_verdict` proves that no pattern can tell its digit
       variants apart (``connector.fc1.weight`` and ``connector.fc2.weight`` share a template
       that is *not* safe: ``fc3`` is unknown). For an unsafe template the matcher remembers
       which digit positions must stay literal, and memoises the refined template instead, again
       only when ``template_verdict`` proves the refined one safe;
    2. **literal-prefix trie** (pyahocorasick): the literal run that starts each pattern, read from
       the parsed regex, selects the patterns that can match at all;
    3. **compiled full matches** of just those candidates, in bucket order (per bucket, one
       alternation of them where that keeps each pattern's meaning); none -> unknown.
"""

from __future__ import annotations

import importlib
import logging
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from operator import itemgetter
from typing import Any, NamedTuple

import ahocorasick

from .automata import DFA, template_verdict
from .buckets import MATCH_ORDER, Bucket
from .errors import PatternError, PatternTooComplexError, UnsupportedPattern
from .families import patterns_of
from .keys import check_key

logger = logging.getLogger(__name__)

PatternSets = Mapping[Bucket, Sequence[str]]

# ``re._parser`` (``sre_parse`` before Python 3.11) is the parser ``re.compile`` itself uses, so
# the literal prefixes read from it mean exactly what the compiled regex means.
try:
    _sre: Any = importlib.import_module("re._parser")
except ImportError:  # pragma: no cover - Python 3.10
    _sre = importlib.import_module("sre_parse")

DEFAULT_MEMO_SIZE = 8192
"""Default bound on memoised templates (each bounded separately: safe, refined, unsafe)."""

MAX_REFINED_DIGITS = 32
"""An unsafe template with more digits than this is not refined (each digit costs one verdict,
a walk over the whole key): its keys take the regex path. Real keys have a handful."""

PLACEHOLDER = "\x80"
"""What every ASCII digit of a key becomes in its template. It is not ASCII, so it can never be
part of a key that takes the memo path (only ASCII keys do): templates cannot collide with keys
that contain the placeholder itself."""

_DIGITS_TO_PLACEHOLDER = bytes.maketrans(b"0123456789", PLACEHOLDER.encode("latin-1") * 10)
_PLACEHOLDER_BYTE = ord(PLACEHOLDER)


def shipped_patterns() -> dict[Bucket, list[str]]:
    """The pattern lists derived from the family table, per bucket, in match order."""
    return {bucket: patterns_of(bucket) for bucket in MATCH_ORDER}


def pattern_lists(patterns: PatternSets) -> dict[Bucket, tuple[str, ...]]:
    """Every matchable bucket (in match order) -> its patterns; keys may be buckets or their
    values (``"und"``). Raises :class:`PatternError` for another key or a bare ``str`` list."""
    lists: dict[Bucket, tuple[str, ...]] = dict.fromkeys(MATCH_ORDER, ())
    for name, given in patterns.items():
        bucket = next((b for b in MATCH_ORDER if b == name), None)
        if bucket is None:
            raise PatternError(
                f"patterns given for {name!r}; only {[b.value for b in MATCH_ORDER]} take patterns"
            )
        if isinstance(given, str):
            raise PatternError(
                f"{bucket.value} patterns must be a list of regex strings, not one str {given!r}"
            )
        lists[bucket] = tuple(given)
    return lists


def choose_patterns(
    und: Sequence[str] | None = None,
    gen: Sequence[str] | None = None,
    vae: Sequence[str] | None = None,
    extra: Sequence[str] | None = None,
) -> dict[Bucket, tuple[str, ...]]:
    """Per-bucket pattern lists from keyword arguments: ``None`` takes the shipped list of that
    bucket, ``[]`` means no patterns; checked as :func:`pattern_lists` checks them."""
    shipped = shipped_patterns()
    given = dict(zip(MATCH_ORDER, (und, gen, vae, extra), strict=True))
    return pattern_lists({b: shipped[b] if p is None else p for b, p in given.items()})


class NaiveMatcher:
    """The reference semantics: the first bucket (in match order) with a fully matching pattern.

    Correct by construction and slow; the fast matcher is tested against it.
    """

    def __init__(self, patterns: PatternSets | None = None) -> None:
        lists = pattern_lists(shipped_patterns() if patterns is None else patterns)
        self._compiled = [
            (bucket, [_compile(p, bucket, i) for i, p in enumerate(lists[bucket])])
            for bucket in MATCH_ORDER
        ]

    def classify(self, key: str) -> Bucket:
        """Bucket of ``key``; ``Bucket.UNKNOWN`` when no pattern fully matches."""
        for bucket, regexes in self._compiled:
            if any(regex.fullmatch(key) for regex in regexes):
                return bucket
        return Bucket.UNKNOWN


def _compile(pattern: object, bucket: Bucket, index: int) -> Any:
    """``re.compile(pattern)``, with a :class:`PatternError` naming the pattern on failure."""
    if not isinstance(pattern, str):
        raise PatternError(
            f"{bucket.value} pattern #{index} must be a str regex, got "
            f"{type(pattern).__name__} {pattern!r}"
        )
    try:
        return re.compile(pattern)
    except re.error as error:
        raise PatternError(
            f"{bucket.value} pattern #{index} {pattern!r} is not a valid regex: {error}; "
            "pass full-match patterns such as r'\\Aprefix\\.[0-9]+\\.weight\\Z'"
        ) from error


def literal_prefix(pattern: str) -> str:
    """The literal text every full match of ``pattern`` starts with ('' when there is none).

    Read from the parsed regex: after leading start anchors (``\\A``, ``^``, both true at
    position 0), the run of literal characters. Case-insensitive patterns have no prefix.
    """
    parsed = _sre.parse(pattern)
    if parsed.state.flags & _sre.SRE_FLAG_IGNORECASE:
        return ""
    items = list(parsed)
    index = 0
    while index < len(items) and items[index] in (
        (_sre.AT, _sre.AT_BEGINNING_STRING),
        (_sre.AT, _sre.AT_BEGINNING),
    ):
        index += 1
    chars: list[str] = []
    for op, value in items[index:]:
        if op is not _sre.LITERAL:
            break
        chars.append(chr(value))
    return "".join(chars)


class MemoStats(NamedTuple):
    """How many templates a :class:`Matcher` currently remembers, and the bound on each kind."""

    safe: int
    """Templates (all digits replaced) answered from the memo."""
    unsafe: int
    """Templates whose digits a pattern can tell apart, each with the positions kept literal."""
    refined: int
    """Templates with those positions literal, proven safe and answered from the memo."""
    limit: int
    """Bound on each of the three counts; 0 means the memo is off."""


Candidates = tuple[tuple[Any, Bucket], ...]
"""``(compiled_fullmatch, bucket)`` pairs in the order they are tried."""


class _Refinement(NamedTuple):
    """For an unsafe template: the placeholder positions that stay literal, and a getter that
    reads the key's characters at those positions.

    A refined memo entry is keyed ``(getter, characters)``. The getter object stands for this
    template *and* this mask: the mask depends on the key it was first computed from, so after
    an eviction the same template may get another mask, and entries made under the old one must
    never answer for the new one (the entry's key keeps the old getter alive, so no new getter can
    reuse its identity)."""

    literal: Callable[[str], object]
    mask: tuple[int, ...]


def _never_memoised(key: str) -> object:
    return _UNREFINED  # no refined entry is ever keyed with it


_UNREFINED = _Refinement(_never_memoised, ())
"""The refinement of an unsafe template that is not refined (too many digits): regex path."""


class Matcher:
    """Fast, thread-safe classification of keys; build it with :func:`compile_matcher`.

    Gives the same answer as :class:`NaiveMatcher` on the same patterns for every key. Concurrent
    readers (threads) may share one instance: the memo tables are plain dicts whose single
    get/set/clear operations are atomic, and everything else is read-only after construction.
    """

    def __init__(self, patterns: PatternSets, *, memo_size: int = DEFAULT_MEMO_SIZE) -> None:
        if isinstance(memo_size, bool) or not isinstance(memo_size, int) or memo_size < 0:
            raise ValueError(f"memo_size must be an int >= 0, got {memo_size!r}")
        self.patterns: dict[Bucket, tuple[str, ...]] = pattern_lists(patterns)
        """The pattern lists this matcher was built from, per bucket, in match order."""
        compiled = [
            (bucket, pattern, _compile(pattern, bucket, index))
            for bucket in MATCH_ORDER
            for index, pattern in enumerate(self.patterns[bucket])
        ]
        self._trie, (self._anywhere, self._anywhere_listing) = _prefix_trie(compiled)
        self._dfa: Any = build_dfa(self.patterns) if memo_size else None
        self._memo_size = memo_size if self._dfa is not None else 0
        self._memo: dict[bytes, Bucket] = {}
        self._masks: dict[bytes, _Refinement] = {}
        self._refined: dict[tuple[Callable[[str], object], object], Bucket] = {}
        self._write_lock = threading.Lock()

    def __repr__(self) -> str:
        counts = ", ".join(f"{b.value}={len(p)}" for b, p in self.patterns.items())
        return f"Matcher({counts}, memo_size={self._memo_size})"

    def classify(self, key: str) -> Bucket:
        """Bucket of ``key``; ``Bucket.UNKNOWN`` when no pattern fully matches. Non-``str``
        keys raise ``TypeError``."""
        try:
            template = key.encode().translate(_DIGITS_TO_PLACEHOLDER) if key.isascii() else None
        except AttributeError:
            check_key(key)  # raises TypeError naming the key
            raise
        if template is not None:
            hit = self._memo.get(template)
            if hit is not None:
                return hit
            refinement = self._masks.get(template)
            if refinement is not None:
                literal = refinement[0]
                hit = self._refined.get((literal, literal(key)))
                if hit is not None:
                    return hit
            return self._classify_miss(key, template, refinement)
        return self.classify_uncached(key)

    def classify_uncached(self, key: str) -> Bucket:
        """Bucket of ``key`` from the prefix trie and the candidates' regexes, memo bypassed."""
        found = self._trie.longest_prefix(key)
        candidates: Candidates = self._trie.get(key[:found])[0] if found else self._anywhere
        for fullmatch, bucket in candidates:
            if fullmatch(key) is not None:
                return bucket
        return Bucket.UNKNOWN

    def candidates(self, key: str) -> list[tuple[Bucket, str]]:
        """The ``(bucket, pattern)`` pairs step 3 tries for ``key``, in order: every pattern whose
        literal prefix starts ``key``. No other pattern can fully match ``key``."""
        found = self._trie.longest_prefix(key)
        return list(self._trie.get(key[:found])[1] if found else self._anywhere_listing)

    def memo_stats(self) -> MemoStats:
        """Current memo sizes (see :class:`MemoStats`)."""
        return MemoStats(len(self._memo), len(self._masks), len(self._refined), self._memo_size)

    def clear_memo(self) -> None:
        """Forget every memoised template (answers do not change)."""
        with self._write_lock:
            self._memo.clear()
            self._masks.clear()
            self._refined.clear()

    # -- memo misses: rare, so plain Python -------------------------------------------------

    def _classify_miss(self, key: str, template: bytes, refinement: _Refinement | None) -> Bucket:
        """Classify a key whose (refined) template is not memoised, and memoise what is proven."""
        bucket = self.classify_uncached(key)
        if not self._memo_size or refinement is _UNREFINED:
            return bucket
        if refinement is None:
            if self._proven(template, bucket):
                self._store(self._memo, template, bucket)
                return bucket
            mask: tuple[int, ...] = ()
            if template.count(_PLACEHOLDER_BYTE) <= MAX_REFINED_DIGITS:
                mask = self._literal_positions(template, key)
            # An empty mask cannot come from a deterministic verdict; never refine then.
            refinement = _Refinement(itemgetter(*mask), mask) if mask else _UNREFINED
            self._store(self._masks, template, refinement)
            if refinement is _UNREFINED:
                return bucket
        refined = bytearray(template)
        for index in refinement.mask:
            refined[index] = ord(key[index])
        if self._proven(bytes(refined), bucket):
            self._store(self._refined, (refinement.literal, refinement.literal(key)), bucket)
        return bucket

    def _safe(self, template: bytes | bytearray) -> tuple[bool, Any]:
        """:func:`~bagelverify.automata.template_verdict` of a byte template."""
        return template_verdict(self._dfa, template.decode("latin-1"), PLACEHOLDER)

    def _proven(self, template: bytes, bucket: Bucket) -> bool:
        """Whether every key with this template is in ``bucket``: the automaton proves that the
        placeholders cannot change the outcome, and its label agrees with the regexes."""
        safe, label = self._safe(template)
        if not safe:
            return False
        if (Bucket.UNKNOWN if label is None else label) is not bucket:
            logger.warning(
                "automaton and regexes disagree on template %r (%s vs %s); not memoised",
                template.decode("latin-1"),
                label,
                bucket,
            )
            return False
        return True

    def _literal_positions(self, template: bytes, key: str) -> tuple[int, ...]:
        """Placeholder positions of an unsafe ``template`` to keep as the key's own digits.

        Start from the key itself (no placeholder: trivially safe) and put each placeholder back
        while the verdict stays safe. Any answer is sound: the refined template is checked with
        the verdict again before it is memoised.
        """
        current = bytearray(key.encode())
        kept: list[int] = []
        for index, byte in enumerate(template):
            if byte != _PLACEHOLDER_BYTE:
                continue
            current[index] = _PLACEHOLDER_BYTE
            if not self._safe(current)[0]:
                current[index] = ord(key[index])
                kept.append(index)
        return tuple(kept)

    def _store(self, table: dict[Any, Any], template: Any, value: Any) -> None:
        """Insert into one memo table, emptying it first when it is full (the bound)."""
        with self._write_lock:
            if len(table) >= self._memo_size:
                table.clear()
            table[template] = value


def _mergeable(pattern: str) -> bool:
    """Whether ``(?:pattern)`` can sit in an alternation with other patterns and keep its
    meaning: no capturing groups (so no backreferences) and no global inline flags."""
    state = _sre.parse(pattern).state
    return bool(state.groups == 1 and not state.flags & ~_sre.SRE_FLAG_UNICODE)


def _candidate_regexes(
    candidates: Sequence[tuple[Bucket, str]], compiled: Mapping[str, Any]
) -> Candidates:
    """``(fullmatch, bucket)`` pairs trying ``candidates`` in bucket order: per bucket, one
    alternation of its mergeable patterns (``re`` factors out their shared prefix, so the key
    is scanned once) and the others one by one."""
    out: list[tuple[Any, Bucket]] = []
    for bucket in MATCH_ORDER:
        mine = [p for b, p in candidates if b is bucket]
        merged = [p for p in mine if _mergeable(p)]
        if len(merged) > 1:
            out.append((re.compile("|".join(f"(?:{p})" for p in merged)).fullmatch, bucket))
        else:
            merged = []
        out.extend((compiled[p].fullmatch, bucket) for p in mine if p not in merged)
    return tuple(out)


def _prefix_trie(
    compiled: Sequence[tuple[Bucket, str, Any]],
) -> tuple[Any, tuple[Candidates, tuple[tuple[Bucket, str], ...]]]:
    """A trie holding every prefix of every pattern's literal prefix. The value of a word ``w``
    covers exactly the patterns whose literal prefix is a prefix of ``w``, so the longest trie
    word that starts a key names every pattern that can match it: ``(regexes, listing)``, the
    :func:`_candidate_regexes` to run and the ``(bucket, pattern)`` pairs they stand for. The
    second result is that value for keys that start with no trie word."""
    by_pattern = {pattern: regex for _, pattern, regex in compiled}
    entries = [(literal_prefix(pattern), (bucket, pattern)) for bucket, pattern, _ in compiled]
    words = {prefix[:n] for prefix, _ in entries for n in range(1, len(prefix) + 1)}
    # pyahocorasick ends the process from C when longest_prefix() runs on an empty trie. Any
    # extra word keeps the invariant above (its value is the prefix-less patterns), so add one.
    words = words or {"\x00"}
    values: dict[tuple[tuple[Bucket, str], ...], tuple[Candidates, Any]] = {}

    def value(word: str) -> tuple[Candidates, tuple[tuple[Bucket, str], ...]]:
        listing = tuple(c for prefix, c in entries if word.startswith(prefix))
        if listing not in values:
            values[listing] = (_candidate_regexes(listing, by_pattern), listing)
        return values[listing]

    trie = ahocorasick.Automaton(ahocorasick.STORE_ANY)
    for word in words:
        trie.add_word(word, value(word))
    return trie, value("")


def build_dfa(patterns: Mapping[Bucket, Sequence[str]]) -> DFA | None:
    """The automaton that decides template safety, or ``None`` (memo off) when the patterns use
    constructs it cannot model."""
    labelled = [(bucket, patterns[bucket]) for bucket in MATCH_ORDER]
    try:
        return DFA.from_patterns(labelled)
    except (UnsupportedPattern, PatternTooComplexError) as error:  # the regexes alone decide
        logger.info("digit-template memo off: %s", error)
        return None


def compile_matcher(
    und: Sequence[str] | None = None,
    gen: Sequence[str] | None = None,
    vae: Sequence[str] | None = None,
    extra: Sequence[str] | None = None,
    *,
    memo_size: int = DEFAULT_MEMO_SIZE,
) -> Matcher:
    """A fast :class:`Matcher` for per-bucket lists of full-match patterns.

    Each argument left as ``None`` takes the shipped patterns of that bucket; pass ``[]`` for a
    bucket with no patterns. Patterns mean what ``re.fullmatch(pattern, key)`` means, and a key
    goes to the first bucket (und, gen, vae, extra) with a matching pattern. A pattern that
    does not compile raises :class:`~bagelverify.errors.PatternError`.

    ``memo_size`` bounds each table of the digit-template memo. ``0`` turns the memo off and
    skips building its automaton. Patterns the automaton cannot model exactly (lookarounds,
    backreferences, inline flags) or whose automaton would pass the construction budget
    (:data:`~bagelverify.automata.MAX_DFA_STATES`; ``.*a.{30}`` needs some 2**31 states) still
    work: the memo is then off and the regexes alone decide.
    """
    return Matcher(choose_patterns(und, gen, vae, extra), memo_size=memo_size)
