"""P3 digit symmetry: which patterns tell ASCII digits apart, and the soundness of the compiled
matcher's digit-template memo rule (:func:`~bagelverify.automata.template_verdict`), proved on
the very automaton the matcher builds."""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import partial

from ..automata import ASCII_DIGITS, DFA, BreadthFirst, template_step, template_verdict
from ..buckets import MATCH_ORDER
from ..matcher import PLACEHOLDER as MEMO_PLACEHOLDER
from ..matcher import compile_matcher
from .checker import Checker, CheckResult, verdict
from .report import Witness

PLACEHOLDER = MEMO_PLACEHOLDER
"""The compiled matcher's placeholder. Template rule precondition: no key contains it (the matcher
memoises ASCII keys only and its placeholder is not ASCII); P3's literal characters avoid it."""
_LITERALS_AVOID = ASCII_DIGITS + PLACEHOLDER

Edges = Iterable[tuple[tuple[str, str], tuple[int, int]]]


def digit_symmetry(c: Checker) -> CheckResult:
    """P3: (a) ``digits_agree`` is exact, (b) no template judged safe has two verdicts, (c) the
    digit-sensitive patterns and verdict pairs, re-checked, are judged unsafe, (d) the compiled
    matcher agrees with ``re`` on every witness key, memo warm."""
    failures: list[Witness] = []
    info: list[Witness] = []
    m = c.matcher
    # (a) digits_agree is exactly "the ten ASCII digits lead to one state"
    for state in range(m.num_states):
        if m.digits_agree(state) != (len({m.step(state, d) for d in ASCII_DIGITS}) == 1):
            failures.append(Witness(f"digits_agree wrong at state {state}"))
    # (b) the safety walk of template_verdict and the run of any key with that template
    #     reach states with one verdict, on every reachable pair
    walk = BreadthFirst((m.start, m.start), lambda node: _walk_successors(m, node))
    pairs = 0
    for template_state, key_state in walk:
        pairs += 1
        if m.label(template_state) != m.label(key_state):
            edges = walk.path((template_state, key_state))
            template = "".join(t for t, _ in edges)
            key = "".join(k for _, k in edges)
            failures.append(Witness("template judged safe, key verdict differs", (template, key)))
    # (c) digit-sensitive patterns and verdict pairs: witnesses, re-checked, judged unsafe
    sensitive = _sensitive_pairs(c)
    for tag, (k1, k2) in sensitive.items():
        bucket, pattern = c.entries[tag]
        c.confirm(
            bool(re.fullmatch(pattern, k1)) and not re.fullmatch(pattern, k2),
            f"{pattern!r} {k1!r} {k2!r}",
        )
        safe, _ = template_verdict(m, _template(k1), PLACEHOLDER)
        c1, c2 = c.re_classify(k1), c.re_classify(k2)
        if safe and c1 != c2:
            failures.append(
                Witness(
                    "memo would answer both keys alike but re classifies them "
                    f"{c1.value}/{c2.value}",
                    (k1, k2),
                )
            )
        judged = "template unsafe" if not safe else f"template safe: both keys {c1.value}"
        info.append(
            Witness(f"{bucket.value} pattern {pattern!r} tells digits apart; {judged}", (k1, k2))
        )
    verdict_pairs = _verdict_pairs(m)
    for k1, k2 in verdict_pairs:
        c1, c2 = c.re_classify(k1), c.re_classify(k2)
        c.confirm(c1 != c2, f"{k1!r} {k2!r}")
        if template_verdict(m, _template(k1), PLACEHOLDER)[0]:
            failures.append(Witness("digit-dependent verdict judged safe", (k1, k2)))
    # (d) the compiled matcher itself, memo warm, on every witness key
    compiled = compile_matcher(*(c.patterns[b] for b in MATCH_ORDER))
    keys = [k for pair in [*sensitive.values(), *verdict_pairs] for k in pair]
    for key in keys + keys:  # the second pass may be answered from the memo
        if compiled.classify(key) is not c.re_classify(key):
            failures.append(Witness("compiled matcher disagrees with re", (key,)))
    detail = (
        f"{len(sensitive)} of {c.n} patterns digit-sensitive; safety rule sound on "
        f"{pairs} reachable (template, key) state pairs of the {m.num_states}-state "
        "matcher DFA; "
        f"compiled matcher = re on {len(keys)} witness keys"
    )
    return verdict(failures), detail, failures or info


def _template(key: str) -> str:
    return re.sub("[0-9]", PLACEHOLDER, key)


def _walk_successors(m: DFA, node: tuple[int, int]) -> Edges:
    """The template walk (placeholder: one step for every digit, or none when unsafe) beside the
    run of a key with that template."""
    p, q = node
    for char in m.alphabet.members_avoiding(_LITERALS_AVOID):
        if char is not None:
            after = template_step(m, p, char, PLACEHOLDER)
            assert after is not None
            yield (char, char), (after, m.step(q, char))
    after = template_step(m, p, PLACEHOLDER, PLACEHOLDER)
    if after is not None:  # None: the template is judged unsafe, the memo never answers
        for digit in ASCII_DIGITS:
            yield (PLACEHOLDER, digit), (after, m.step(q, digit))


def _pair_successors(m: DFA, node: tuple[int, int]) -> Edges:
    """Two keys with one template: same non-digit chars, any ASCII digits each."""
    p, q = node
    p_row, q_row = m.delta[p], m.delta[q]
    for atom, char in enumerate(m.alphabet.members_avoiding(_LITERALS_AVOID)):
        if char is not None:
            yield (char, char), (p_row[atom], q_row[atom])
    # one digit per distinct successor on each side covers every pair of successors
    p_digits = {m.step(p, d): d for d in reversed(ASCII_DIGITS)}
    q_digits = {m.step(q, d): d for d in reversed(ASCII_DIGITS)}
    for p_next, d1 in p_digits.items():
        for q_next, d2 in q_digits.items():
            yield (d1, d2), (p_next, q_next)


def _sensitive_pairs(c: Checker) -> dict[int, tuple[str, str]]:
    """For each digit-sensitive pattern: a shortest pair (in, out) of keys with one template,
    searched on the pattern's own minimal DFA (small, so the pair space stays small)."""
    found: dict[int, tuple[str, str]] = {}
    for tag, (_, pattern) in enumerate(c.entries):
        own = DFA.membership([pattern])
        search = BreadthFirst((own.start, own.start), partial(_pair_successors, own))
        for p, q in search:
            if own.label(p) is not None and own.label(q) is None:
                edges = search.path((p, q))
                found[tag] = ("".join(a for a, _ in edges), "".join(b for _, b in edges))
                break
    return found


def _verdict_pairs(m: DFA) -> list[tuple[str, str]]:
    """A shortest key pair with one template for each pair of different verdicts."""
    seen: dict[tuple[str, str], tuple[str, str]] = {}
    search = BreadthFirst((m.start, m.start), lambda n: _pair_successors(m, n))
    for p, q in search:
        a, b = str(m.label(p)), str(m.label(q))
        if a != b and (a, b) not in seen:
            edges = search.path((p, q))
            seen[(a, b)] = ("".join(x for x, _ in edges), "".join(y for _, y in edges))
    return list(seen.values())
