"""``bagelverify bench``: the compiled matcher against naive matching, side by side in one run.

Key sets: the real BAGEL-7B-MoT manifest (``ema`` + ``ae`` keys) and synthetic checkpoints that
scale every layered family of the table to many layers, with Mixture-of-Experts families
(``...mlp.experts.{e}...``, derived from the table's MLP families) added to the pattern set; about
1% of every synthetic set are near misses (unknown keys). Before each repetition the keys are
rebuilt as fresh ``str`` objects, so no method profits from a cached string hash.

Methods, each timed as ``for key in keys: classify(key)`` (process CPU time):

``naive``        every pattern of every bucket in turn (:class:`~bagelverify.matcher.NaiveMatcher`)
``alternation``  one ``(?:p1)|(?:p2)|...`` regex per bucket, buckets in match order
``ac+regex``     the compiled matcher without its memo (prefix trie + candidate regexes)
``compiled``     the full compiled matcher (:func:`~bagelverify.matcher.compile_matcher`)
``dict.get``     the floor: a bare ``dict.get`` per key on a dict of the known answers
"""

from __future__ import annotations

import argparse
import functools
import math
import platform
import re
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..buckets import MATCH_ORDER, Bucket
from ..config import BagelConfig
from ..families import EXTRA_STATE, FAMILIES, FAMILY_BY_NAME, MOE_SUFFIX, Family
from ..manifest import load_manifest
from ..matcher import Matcher, NaiveMatcher, PatternSets, shipped_patterns
from .render import Column, Printer, print_json, step_progress

EXAMPLE = "bagelverify bench --sizes 100000 1000000 --plot matcher.png"

DEFAULT_SIZES = (100_000, 1_000_000)
QUICK_SIZES = (2_000,)
QUICK_MIN_PASS = 2_000
DEFAULT_EXPERTS = 64
NEAR_MISS_EVERY = 100
"""One near miss is added after every this many valid synthetic keys (about 1%)."""

#: The targets the compiled matcher must meet (issue 4).
TARGET_VS_NAIVE_1M = 20.0
TARGET_VS_NAIVE_MANIFEST = 5.0
TARGET_VS_FLOOR_1M = 4.0

Classify = Callable[[str], Bucket | None]

MLP_MODULE = "mlp"
"""The language model's MLP module, which the scaled sets give experts (the benchmark's own
Mixture-of-Experts extension: BAGEL-7B-MoT has none)."""


# -- pattern sets and key sets ------------------------------------------------------------------


def _expert_variants(family: Family) -> tuple[str, str] | None:
    """``(template, pattern)`` of the Mixture-of-Experts variant of an LLM MLP family (the
    ``mlp`` or ``mlp_moe_gen`` module gets an ``experts.{expert}`` level), else ``None``.

    The language model's families are the layered ones of the table's UND/GEN twin pairs; the
    variant's pattern is written by the table's own :class:`~bagelverify.families.Family`."""
    modules = (f".{MLP_MODULE}.", f".{MLP_MODULE}{MOE_SUFFIX}.")
    module = next((m for m in modules if m in family.template), None)
    if family.layers is None or not _twinned(family) or module is None:
        return None

    def with_experts(slot: str) -> str:
        return family.template.replace(module, f"{module}experts.{{{slot}}}.")

    # an expert number is a slot of ASCII digits, like a layer number
    return with_experts("expert"), replace(family, template=with_experts("layer")).pattern


def _twinned(family: Family) -> bool:
    """One of the language model's Mixture-of-Transformers pairs: a GEN twin or its UND family."""
    return family.twin is not None or family.name + MOE_SUFFIX in FAMILY_BY_NAME


def moe_patterns() -> dict[Bucket, list[str]]:
    """The shipped patterns plus one expert-level pattern per MLP family, per bucket."""
    patterns = shipped_patterns()
    for family in FAMILIES:
        variant = _expert_variants(family)
        if variant is not None:
            patterns[family.bucket].append(variant[1])
    return patterns


def manifest_keys() -> list[str]:
    """Every key of the real checkpoint: ``ema.safetensors`` then ``ae.safetensors``."""
    return [key for entries in load_manifest().values() for key in entries]


def near_miss(key: str, kind: int) -> str:
    """One of a few realistic corruptions of a valid UND/GEN key; the result is never valid."""
    if kind % 5 == 0:
        return key + "\n"  # a trailing newline, which `$` would accept
    if kind % 5 == 1 and re.search("[0-9]", key):
        return re.sub("[0-9]", "\u0663", key, count=1)  # an Arabic-Indic digit
    if kind % 5 == 2:
        return "module." + key  # a foreign root
    if kind % 5 == 3 and MOE_SUFFIX in key:
        return key.replace(MOE_SUFFIX, "_moe_gem")
    return key[:-1]  # truncated: "weigh", "bia", "pos_embe"


def scaled_keys(size: int, experts: int = DEFAULT_EXPERTS) -> list[str]:
    """About ``size`` keys of a BAGEL-shaped model scaled to many layers and ``experts`` experts
    per MLP, in checkpoint order: every UND/GEN family, one extra-state key per layer, the real
    VAE keys, and one near miss after every :data:`NEAR_MISS_EVERY` UND/GEN keys."""
    config = BagelConfig()
    layered = [f for f in FAMILIES if f.shape is not None and f.layers is not None]
    expert_families = [
        (variant[0], family.params)
        for family in layered
        if (variant := _expert_variants(family)) is not None
    ]
    singles = [
        k for f in FAMILIES if f.shape is not None and f.layers is None for k in f.keys(config)
    ]
    vae = list(load_manifest()["ae.safetensors"])
    per_layer = 1 + sum(len(f.params) for f in layered)
    per_layer += experts * sum(len(params) for _, params in expert_families)
    layers = max(1, math.ceil((size - len(singles) - len(vae)) / per_layer))
    out: list[str] = []
    emitted = 0

    def emit(keys: Iterator[str]) -> None:
        nonlocal emitted
        for key in keys:
            out.append(key)
            emitted += 1
            if emitted % NEAR_MISS_EVERY == 0:
                out.append(near_miss(key, emitted // NEAR_MISS_EVERY))

    emit(iter(singles))
    for layer in range(layers):
        for family in layered:
            emit(family.template.format(layer=layer, param=p) for p in family.params)
        for template, params in expert_families:
            for expert in range(experts):
                emit(template.format(layer=layer, expert=expert, param=p) for p in params)
        first = layered[0].template.format(layer=layer, param=layered[0].params[0])
        out.append(first.rsplit(".", 1)[0] + "." + EXTRA_STATE)
    return out + vae


@dataclass(frozen=True)
class KeySet:
    """A named list of keys and the pattern set that classifies them."""

    name: str
    keys: list[str]
    patterns: PatternSets


def key_sets(sizes: Sequence[int], experts: int = DEFAULT_EXPERTS) -> Iterator[KeySet]:
    """The manifest, then one scaled set per size (with the expert patterns)."""
    yield KeySet("manifest", manifest_keys(), shipped_patterns())
    moe = moe_patterns()
    for size in sizes:
        yield KeySet(f"scaled-{_short(size)}", scaled_keys(size, experts), moe)


def _short(n: int) -> str:
    for unit, scale in (("M", 1_000_000), ("k", 1_000)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


# -- methods ------------------------------------------------------------------------------------


class AlternationMatcher:
    """One alternation regex per bucket, tried in match order (a common hand-written speed-up)."""

    def __init__(self, patterns: PatternSets) -> None:
        self._regexes = [
            (bucket, re.compile("|".join(f"(?:{p})" for p in patterns[bucket])))
            for bucket in MATCH_ORDER
            if patterns.get(bucket)
        ]

    def classify(self, key: str) -> Bucket:
        """Bucket of ``key``; ``Bucket.UNKNOWN`` when no bucket's regex fully matches."""
        for bucket, regex in self._regexes:
            if regex.fullmatch(key) is not None:
                return bucket
        return Bucket.UNKNOWN


METHOD_NAMES = ("naive", "alternation", "ac+regex", "compiled", "dict.get")


def build_method(
    name: str, key_set: KeySet, answers: Mapping[str, Bucket | None] | None = None
) -> Classify:
    """The per-key classify callable of one method for one key set. Only the ``dict.get`` floor
    needs ``answers`` (every key's bucket; computed with ``naive`` when not given)."""
    patterns = key_set.patterns
    if name == "naive":
        return NaiveMatcher(patterns).classify
    if name == "alternation":
        return AlternationMatcher(patterns).classify
    if name == "ac+regex":
        return Matcher(patterns, memo_size=0).classify_uncached
    if name == "compiled":
        return Matcher(patterns).classify
    if name == "dict.get":
        if answers is None:
            naive = NaiveMatcher(patterns).classify
            answers = {key: naive(key) for key in key_set.keys}
        return dict(answers).get
    raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHOD_NAMES)}")


MIN_PASS_KEYS = 50_000
"""A timed pass classifies at least this many keys (small sets are repeated, fresh each time)."""


# -- timing -------------------------------------------------------------------------------------


@dataclass
class MethodResult:
    """Timings of one method on one key set."""

    build_ms: float
    first_ns: float
    """ns/key of the first pass (for the compiled matcher: the memo starts empty)."""
    median_ns: float
    """Median ns/key over the timed passes that follow the first."""
    runs_ns: list[float] = field(default_factory=list)
    vs_naive: float = 0.0
    """How many times faster than ``naive`` (median against median)."""
    vs_floor: float = 0.0
    """How many times slower than the ``dict.get`` floor."""


@dataclass
class SetResult:
    """Every method on one key set."""

    name: str
    keys: int
    unknown: int
    methods: dict[str, MethodResult]


_clock = time.process_time_ns
"""CPU time of this process: time the scheduler gives to other processes is not counted, which
keeps the ratios stable on a busy machine (every timed section is single-threaded)."""


def _fresh(encoded: Sequence[bytes], copies: int) -> list[str]:
    """``copies`` fresh copies of the keys: new ``str`` objects whose hashes are not cached."""
    return [raw.decode() for _ in range(copies) for raw in encoded]


def _timed_pass(classify: Classify, keys: Sequence[str]) -> float:
    start = _clock()
    for key in keys:
        classify(key)
    return (_clock() - start) / len(keys)


def run_set(
    key_set: KeySet,
    repeat: int,
    min_pass: int = MIN_PASS_KEYS,
    on_pass: Callable[[], None] | None = None,
) -> SetResult:
    """Time every method on one key set.

    Per method: build it (timed), then one first pass over fresh keys (timed; for the compiled
    matcher the memo is empty) whose answers must equal the naive ones. Then ``repeat`` rounds,
    each timing one pass of every method in turn over fresh keys (at least ``min_pass`` keys,
    repeating small sets), so that a load change on the machine hits all methods alike; the
    median pass is the result. ``on_pass`` is called after each pass (for progress).
    """
    encoded = [key.encode() for key in key_set.keys]
    copies = max(1, math.ceil(min_pass / len(encoded)))
    answers: dict[str, Bucket | None] = {}
    classifiers: dict[str, Classify] = {}
    results: dict[str, MethodResult] = {}
    for name in METHOD_NAMES:  # naive first: its answers check the others and feed the floor
        start = _clock()
        classify = classifiers[name] = build_method(name, key_set, answers)
        build_ms = (_clock() - start) / 1e6
        keys = _fresh(encoded, 1)
        start = _clock()
        got = list(map(classify, keys))
        first_ns = (_clock() - start) / len(keys)
        if not answers:
            answers.update(zip(key_set.keys, got, strict=True))
        wrong = [k for k, g in zip(key_set.keys, got, strict=True) if g is not answers[k]]
        if wrong:
            raise AssertionError(f"{name} disagrees with naive on {len(wrong)} keys: {wrong[:3]}")
        results[name] = MethodResult(build_ms, first_ns, 0.0)
        if on_pass is not None:
            on_pass()
    for _ in range(repeat):
        for name, classify in classifiers.items():
            results[name].runs_ns.append(_timed_pass(classify, _fresh(encoded, copies)))
            if on_pass is not None:
                on_pass()
    naive, floor = (statistics.median(results[n].runs_ns) for n in ("naive", "dict.get"))
    for result in results.values():
        result.median_ns = statistics.median(result.runs_ns)
        result.vs_naive = naive / result.median_ns
        result.vs_floor = result.median_ns / floor
    unknown = sum(answer is Bucket.UNKNOWN for answer in answers.values())
    return SetResult(key_set.name, len(key_set.keys), unknown, results)


@dataclass
class Target:
    """One of the issue's targets and whether this run met it."""

    name: str
    goal: str
    value: float
    met: bool


def targets(results: Sequence[SetResult]) -> list[Target]:
    """The targets that this run's key sets can check (the 1M ones need a set of >= 1M keys)."""
    out: list[Target] = []
    for result in results:
        compiled = result.methods["compiled"]
        if result.name == "manifest":
            out.append(
                Target(
                    "compiled vs naive, manifest",
                    f">= {TARGET_VS_NAIVE_MANIFEST:g}x faster",
                    compiled.vs_naive,
                    compiled.vs_naive >= TARGET_VS_NAIVE_MANIFEST,
                )
            )
        elif result.keys >= 1_000_000:
            out.append(
                Target(
                    f"compiled vs naive, {result.name}",
                    f">= {TARGET_VS_NAIVE_1M:g}x faster",
                    compiled.vs_naive,
                    compiled.vs_naive >= TARGET_VS_NAIVE_1M,
                )
            )
            out.append(
                Target(
                    f"compiled vs dict.get floor, {result.name}",
                    f"<= {TARGET_VS_FLOOR_1M:g}x slower",
                    compiled.vs_floor,
                    compiled.vs_floor <= TARGET_VS_FLOOR_1M,
                )
            )
    return out


# -- output -------------------------------------------------------------------------------------


TABLE_COLUMNS = (
    Column("key set"),
    Column("keys", True),
    Column("method"),
    Column("build ms", True),
    Column("first ns/key", True),
    Column("median ns/key", True),
    Column("x naive", True),
    Column("x floor", True),
)
"""The columns of the results table, in the terminal and in Markdown."""


def table_rows(results: Sequence[SetResult]) -> list[list[str]]:
    """One row per key set and method, formatted."""
    return [
        [
            result.name,
            f"{result.keys:,}",
            name,
            f"{m.build_ms:,.1f}",
            f"{m.first_ns:,.0f}",
            f"{m.median_ns:,.0f}",
            f"{m.vs_naive:.1f}",
            f"{m.vs_floor:.2f}",
        ]
        for result in results
        for name, m in result.methods.items()
    ]


def format_table(results: Sequence[SetResult]) -> str:
    """The results as one plain-text table (also valid Markdown)."""
    header = "| " + " | ".join(column.header for column in TABLE_COLUMNS) + " |"
    rule = "| " + " | ".join("---:" if c.numeric else "---" for c in TABLE_COLUMNS) + " |"
    rows = ["| " + " | ".join(row) + " |" for row in table_rows(results)]
    return "\n".join([header, rule, *rows])


def plot(results: Sequence[SetResult], path: str) -> None:
    """ns/key against key count (log axes), one line per method, saved to ``path``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise RuntimeError("--plot needs matplotlib: pip install 'bagelverify[bench]'") from error
    ordered = sorted(results, key=lambda r: r.keys)
    figure, axes = plt.subplots(figsize=(8, 4.5))
    for name in METHOD_NAMES:
        axes.plot(
            [r.keys for r in ordered],
            [r.methods[name].median_ns for r in ordered],
            marker="o",
            label=name,
        )
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("keys in the set")
    axes.set_ylabel("median ns per key")
    axes.set_title(
        "bagelverify key classification\n(smallest set: the real manifest; others: scaled, MoE)",
        fontsize=10,
    )
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="center left", bbox_to_anchor=(1.0, 0.5))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# -- command ------------------------------------------------------------------------------------


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``bagelverify bench``."""
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        metavar="N",
        help=f"sizes of the scaled key sets (default: {' '.join(map(str, DEFAULT_SIZES))})",
    )
    parser.add_argument(
        "--repeat", type=int, default=5, metavar="R", help="timed passes per method (default 5)"
    )
    parser.add_argument(
        "--experts",
        type=int,
        default=DEFAULT_EXPERTS,
        metavar="E",
        help=f"experts per MLP in the scaled sets (default {DEFAULT_EXPERTS})",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: small sets, 2 short passes (seconds)"
    )
    parser.add_argument("--plot", metavar="FILE.png", help="save the scaling chart (matplotlib)")
    parser.add_argument(
        "--check", action="store_true", help="exit 1 when a target that this run covers is missed"
    )


def run(args: argparse.Namespace) -> int:
    """Run the benchmark, print the table (or JSON), and report the targets."""
    sizes = list(QUICK_SIZES if args.quick else (args.sizes or DEFAULT_SIZES))
    repeat = 2 if args.quick else args.repeat
    if repeat < 1 or any(size < 1 for size in sizes) or args.experts < 1:
        raise ValueError("--repeat, --sizes and --experts must be positive")
    results: list[SetResult] = []
    passes = (1 + len(sizes)) * len(METHOD_NAMES) * (1 + repeat)  # the manifest, then each size
    min_pass = QUICK_MIN_PASS if args.quick else MIN_PASS_KEYS
    left: str = ""
    started = time.perf_counter()
    with step_progress(passes, "building key sets", quiet=args.quiet) as advance:
        for index, key_set in enumerate(key_sets(sizes, args.experts)):
            what = f"timing {key_set.name} ({len(key_set.keys):,} keys){left}"
            advance(what, 0)
            on_pass = functools.partial(advance, what, 1)
            results.append(run_set(key_set, repeat, min_pass, on_pass=on_pass))
            if index == 0:  # the manifest's time per key, scaled to the sets still to come
                rate = (time.perf_counter() - started) / max(len(key_set.keys), min_pass)
                estimate = rate * sum(max(size, min_pass) for size in sizes)
                left = f", about {estimate:,.0f} s left"
    checked = targets(results)
    if args.plot:
        plot(results, args.plot)
    if args.json:
        document: dict[str, Any] = {
            "command": "bench",
            "python": platform.python_version(),
            "machine": platform.machine(),
            "repeat": repeat,
            "sets": [asdict(result) for result in results],
            "targets": [asdict(target) for target in checked],
        }
        print_json(document)
    elif not args.quiet:
        printer = Printer()
        if printer.rich:
            printer.table("Key classification", TABLE_COLUMNS, table_rows(results))
        else:
            print(format_table(results))
        for target in checked:
            mark = "met" if target.met else "MISSED"
            print(f"target {target.name}: {target.value:.2f}x ({target.goal}) {mark}")
        if args.plot:
            print(f"chart saved to {args.plot}")
    return 1 if args.check and not all(t.met for t in checked) else 0
