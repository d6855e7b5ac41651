"""Mutation-testing gate (issue 29): run mutmut, score each module, fail below the bar.

    python .ci/mutation_gate.py                 # what CI runs: a seeded, time-boxed sample
    python .ci/mutation_gate.py --sample 0 --time-box 0   # every mutant (a long run)

Steps: a fresh ``mutants/`` is generated (no test runs); a sample of every module's mutants is
drawn (a pure function of the mutant names and ``--seed``, see :func:`sample`) and run by
``mutmut run`` (which first collects which tests reach which function), except the
mutants of the helpers that only run while their module is imported (the family table's, the
dtype table), which mutmut cannot switch on in time: each of those runs in a fresh process (the
import-time loop; the gate fails if it tests nothing). Survivors are matched against the
reviewed list ``.ci/mutation_equivalents.toml``; a module fails below ``--bar`` percent of its
sampled non-equivalent mutants killed. A sampled mutant not run before the time box ran out is
counted as not killed. The table is printed and MUTATION.md is rewritten from the run
(``--no-write`` to leave it).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

ROOT = Path(__file__).resolve().parent.parent
MUTANTS = ROOT / "mutants"
EQUIVALENTS = ROOT / ".ci" / "mutation_equivalents.toml"
SAMPLE_FILE = MUTANTS / "mutation-sample.txt"
# Helpers that only run while their module is imported (mutmut cannot switch their mutants on in
# time), with the tests each such mutant runs against in a fresh process.
IMPORT_TIME_TESTS = {
    re.compile(r"^bagelverify\.families\.x__(linear|vector|table|twinned)__mutmut_\d+$"): [
        "tests/test_families.py",
        "tests/test_mutation_gaps.py",
        "--deselect=tests/test_families.py::test_import_stays_light_until_a_torch_name_is_used",
    ],
    re.compile(r"^bagelverify\.safetensors_io\.x__dtype_table__mutmut_\d+$"): [
        "tests/test_mutation_gaps_io.py",
        "tests/test_safetensors_io.py",
    ],
}
TIMEOUTS = {24, -24, 36, 152, 255}  # mutmut's SIGXCPU and wall-clock timeouts
DEFAULT_TIME_BOX = 330.0  # seconds: CI's budget for the gate on 2 cores
KILLED = {1, 3} | TIMEOUTS  # failed tests, pytest's internal error, timeouts
# Writes mutants/ (every mutant of the listed modules, no test run): the first steps of mutmut
# 3.8.1's `run` (mutmut.__main__._run), so that the sample can be drawn before any test runs.
GENERATE = """
import sys
from mutmut.__main__ import create_mutants
from mutmut.mutation.trampoline import set_mutant_under_test
from mutmut.utils.file_utils import copy_also_copy_files, copy_src_dir, setup_source_paths

set_mutant_under_test("mutant_generation")
copy_src_dir()
copy_also_copy_files()
setup_source_paths()
create_mutants(int(sys.argv[1]))
"""


@dataclass
class Module:
    """One mutated module's tally (a pool: its import-time mutants are a pool of their own)."""

    generated: int = 0
    sampled: list[str] = field(default_factory=list)
    killed: int = 0
    timeouts: int = 0
    equivalent: list[str] = field(default_factory=list)
    survivors: list[str] = field(default_factory=list)
    not_run: list[str] = field(default_factory=list)

    @property
    def score(self) -> float:
        """Percent of the sampled non-equivalent mutants killed (one not run counts as not
        killed); 0 when none was sampled (a listed module must be tested)."""
        judged = len(self.sampled) - len(self.equivalent)
        if not self.sampled:
            return 0.0
        return 100.0 if judged == 0 else 100.0 * self.killed / judged


def _env() -> dict[str, str]:
    # A fixed hash seed: mutmut runs a mutant's tests in the order of a set of their names, so
    # that order (and how long a killed mutant takes) would change from run to run.
    env = dict(os.environ, HYPOTHESIS_PROFILE="mutation", PYTHONPATH=str(ROOT), PYTHONHASHSEED="0")
    env.pop("MUTANT_UNDER_TEST", None)
    return env


def _mutmut(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mutmut", *args],
        cwd=ROOT,
        env=_env(),
        text=True,
        capture_output=True,
        check=False,
    )


def _run(names: list[str], children: int, limit: float | None = None) -> bool:
    """``mutmut run`` on ``names``; False when it ran past ``limit`` seconds and was stopped
    (each mutant's result is saved as it ends, so the finished ones count)."""
    command = [sys.executable, "-m", "mutmut", "run", "--max-children", str(children), *names]
    process = subprocess.Popen(
        command, cwd=ROOT, env=_env(), text=True, stdout=subprocess.PIPE, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # mutmut, its fork server and their workers
        process.communicate()
        return False
    if process.returncode != 0:
        sys.exit(f"mutmut run failed ({process.returncode}):\n{_readable(output)}")
    return True


def _readable(output: str, lines: int = 80) -> str:
    """The last ``lines`` lines of mutmut's output without its spinner's redrawn lines."""
    spinner = re.compile("^[\u2800-\u28ff]")  # braille frames, redrawn after a carriage return
    kept = [
        line for line in re.split(r"[\r\n]", output) if line.strip() and not spinner.match(line)
    ]
    return "\n".join(kept[-lines:])


def _exit_codes() -> dict[str, int | None]:
    codes: dict[str, int | None] = {}
    for meta in sorted((MUTANTS / "bagelverify").rglob("*.py.meta")):
        codes.update(json.loads(meta.read_text())["exit_code_by_key"])
    return codes


def _import_tests(name: str) -> list[str] | None:
    """The tests of an import-time mutant, None for one mutmut switches on at call time."""
    return next((t for pattern, t in IMPORT_TIME_TESTS.items() if pattern.match(name)), None)


def module_of(name: str) -> str:
    """The pool a mutant belongs to: its module, or the module's import-time pool."""
    module = name.split(".x_", 1)[0].split(".xǁ", 1)[0]
    return module + " (import time)" if _import_tests(name) else module


def rank(name: str, seed: int) -> str:
    """A mutant's place in the draw: a hash of the seed and its name (SHA-256, not ``hash()``)."""
    return hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()


def sample(
    names: Iterable[str], size: int, seed: int, import_time_size: int | None = None
) -> list[str]:
    """The ``size`` mutants of each pool that rank first (``import_time_size`` of an
    import-time pool, when given; all of a smaller pool; all when the size is 0), sorted.

    A pure function of the set of ``names`` and ``seed``: no dependence on the order of
    ``names``, on ``PYTHONHASHSEED`` or on timing. mutmut numbers mutants per function, so a
    change to one function renames only that function's mutants: every other mutant keeps its
    rank, and stays in the sample unless one of the renamed mutants now ranks before it."""
    pools: dict[str, list[str]] = {}
    for name in set(names):
        pools.setdefault(module_of(name), []).append(name)
    chosen: list[str] = []
    for pool, members in pools.items():
        members.sort(key=lambda name: rank(name, seed))
        take = size if import_time_size is None or "(import time)" not in pool else import_time_size
        chosen += members if take == 0 else members[:take]
    return sorted(chosen)


def digest(names: Iterable[str]) -> str:
    """A short fingerprint of a sample, printed so that two runs can be compared."""
    return hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()[:16]


def _change(name: str) -> str:
    """The mutant's "-" and "+" lines (stripped, joined by " => "), as the equivalents list has."""
    shown = _mutmut("show", name).stdout
    body = shown.split("\n@@", 1)[-1].splitlines()[1:]
    return " => ".join(line[1:].strip() for line in body if line[:1] in "-+")


def _configured() -> dict[str, Any]:
    configured: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]
    return configured["mutmut"]  # type: ignore[no-any-return]


def _equivalents() -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    document = tomllib.loads(EQUIVALENTS.read_text())
    skips, mutants = document.get("skip", []), document.get("mutant", [])
    if [s["pattern"] for s in skips] != _configured().get("do_not_mutate_patterns", []):
        sys.exit(
            f"{EQUIVALENTS.name}'s [[skip]] patterns differ from pyproject's "
            "[tool.mutmut] do_not_mutate_patterns: keep them the same"
        )
    missing = [entry for entry in (*skips, *mutants) if not entry.get("reason")]
    if missing:
        sys.exit(f"{EQUIVALENTS.name}: every entry needs a reason; missing in {missing}")
    return skips, mutants


def _module_name(path: str) -> str:
    return path.removesuffix(".py").replace("/", ".")


def _check_listing() -> list[str]:
    """The modules ``only_mutate`` lists; exits when one's conventional test file
    (``tests/test_<name>.py``) exists but is not in mutmut's test selection."""
    configured = _configured()
    listed = configured.get("only_mutate", [])
    selection = set(configured.get("pytest_add_cli_args_test_selection", []))
    for path in listed:
        tests = f"tests/test_{Path(path).stem}.py"
        if (ROOT / tests).exists() and tests not in selection:
            sys.exit(
                f"{path} is mutated but its tests, {tests}, are not in [tool.mutmut] "
                "pytest_add_cli_args_test_selection: add them there"
            )
    return [_module_name(p) for p in listed]


def _import_time_tests(mutant: str, tests: list[str]) -> subprocess.Popen[bytes]:
    """``tests`` in a fresh process with ``mutant`` on ("": none)."""
    return subprocess.Popen(
        [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
        cwd=MUTANTS,
        env=dict(_env(), MUTANT_UNDER_TEST=mutant, PYTHONPATH=str(MUTANTS)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _import_time_loop(names: list[str], children: int, deadline: float | None) -> dict[str, bool]:
    """Run each import-time mutant in a fresh process, ``children`` at a time; True where the
    tests fail (killed). A mutant still running at ``deadline`` is stopped and left out.

    Exits when there is none to run or when the tests fail with no mutant on (every mutant
    would then look killed)."""
    if not names:
        sys.exit("the import-time loop has no mutant to test")
    clean = [(tests, _import_time_tests("", tests)) for tests in IMPORT_TIME_TESTS.values()]
    for tests, process in clean:
        if process.wait() != 0:
            sys.exit(f"{tests} fail in {MUTANTS} with no mutant on")
    results: dict[str, bool] = {}
    waiting, running = list(names), dict[str, subprocess.Popen[bytes]]()
    while waiting or running:
        while waiting and len(running) < children:
            name = waiting.pop(0)
            running[name] = _import_time_tests(name, _import_tests(name) or [])
        time.sleep(0.2)
        for name, process in list(running.items()):
            if process.poll() is not None:
                results[name] = process.returncode != 0
                del running[name]
            elif deadline is not None and time.monotonic() > deadline:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                del running[name]
        if deadline is not None and time.monotonic() > deadline:
            break
    return results


def _cell(text: str) -> str:
    """``text`` inside a Markdown table cell (its pipes escaped)."""
    return text.replace("|", "\\|")


def _table(modules: dict[str, Module], bar: float) -> list[str]:
    rows = [
        "| module | mutants | sampled | killed (by timeout) | equivalent | survived "
        "| not run in time | score |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for module, m in sorted(modules.items()):
        mark = "" if m.score >= bar else " (below the bar)"
        rows.append(
            f"| {module} | {m.generated} | {len(m.sampled)} | {m.killed} ({m.timeouts}) "
            f"| {len(m.equivalent)} | {len(m.survivors)} | {len(m.not_run)} "
            f"| {m.score:.1f}%{mark} |"
        )
    return rows


def _design(args: argparse.Namespace) -> list[str]:
    """The "How it runs" section (generated, so that it states the options of the run)."""
    box = f"{args.time_box:g} s" if args.time_box else "none"
    sizes = (
        f"{args.sample or 'all'} per pool ({args.import_time_sample or 'all'} per import-time pool)"
    )
    return [
        "## How it runs",
        "",
        "```bash",
        "python .ci/mutation_gate.py   # what CI runs (.ci/run, with --no-write)",
        "python .ci/mutation_gate.py --sample 0 --import-time-sample 0 --time-box 0  # all (hours)",
        "```",
        "",
        "`[tool.mutmut]` in `pyproject.toml` lists the mutated modules (`only_mutate`) and the "
        "test files run against them (`pytest_add_cli_args_test_selection`); mutmut runs, for "
        "each mutant, the selected tests that reach its function, in a process forked from a "
        'server that has run no test (`process_isolation = "forkserver"`). To mutate one more '
        "module, add its path to `only_mutate`; the gate refuses to run while the module's "
        "`tests/test_<name>.py` exists and is not in the test selection, and fails when a listed "
        "module yields no mutant.",
        "",
        f"Design: a seeded sample, judged per module. Each module's mutants (its import-time "
        f"mutants are a pool of their own) are sampled: {sizes}, the mutants that rank first by "
        f"SHA-256 of the seed ({args.seed}) and their name. The sample is a pure function of the "
        "mutant names and the seed (no dependence on hash seeds, listing order or timing; the "
        "run prints its digest, so two runs can be compared). mutmut numbers mutants per "
        "function, so a code change redraws only where the changed functions' mutants now rank "
        "first; the score is then that of another honest sample, and the equivalents list "
        "matches mutants by function and change, not by number. The whole gate "
        f"has a time box (`--time-box`, {DEFAULT_TIME_BOX:g} s by default, as CI runs it; this "
        f"run: {box}); a sampled mutant not run before it ends counts as not killed "
        "and is listed. Mutants of the helpers that only run while their module is imported "
        "(`families`' `_linear`, `_vector`, `_table`, `_twinned`; `safetensors_io._dtype_table`) "
        "run one fresh process each (the gate fails when that loop tests none, or when their "
        "tests fail with no mutant on). The Hypothesis profile `mutation` runs 25 derandomized "
        "examples per property, so every mutant meets the same inputs.",
        "",
        f"Score = killed / (sampled - equivalent); a timeout is a kill (counted apart in the "
        f"table), a mutant no selected test reaches is a survivor. The gate fails when a pool "
        f"scores below {args.bar:g}%: with a sample under 20, any survivor not in the "
        "equivalents list fails it. A small sample judges a module coarsely: one whose score "
        f"over all its mutants is 80% passes a sample of {args.sample or 'all'} with "
        f"probability {0.8**args.sample if args.sample else 0:.0%}; each code change draws "
        "again where it changed, so gaps keep coming to light. `--sample 0` scores every "
        "mutant.",
        "",
    ]


def _markdown(
    modules: dict[str, Module],
    args: argparse.Namespace,
    chosen: list[str],
    seconds: float,
    skips: list[dict[str, str]],
    mutants: list[dict[str, str]],
) -> str:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True, capture_output=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "bagelverify", "tests", "pyproject.toml", ".ci"],
        cwd=ROOT,
        text=True,
        capture_output=True,
    ).stdout.strip()
    version = _mutmut("--version").stdout.strip()
    survivors = sorted(s for m in modules.values() for s in m.survivors)
    not_run = sorted(s for m in modules.values() for s in m.not_run)
    lines = [
        "# Mutation testing",
        "",
        "<!-- Generated by .ci/mutation_gate.py from its last run; do not edit by hand. -->",
        "",
        f"Last run: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit "
        f"`{commit}`{' plus uncommitted changes' if dirty else ''}, {version}, Python "
        f"{sys.version.split()[0]}, {args.max_children} worker(s), {seconds / 60:.1f} minutes; "
        f"sample of {len(chosen)} mutants (seed {args.seed}, digest `{digest(chosen)}`).",
        "",
        *_design(args),
        "## Result",
        "",
        *_table(modules, args.bar),
        "",
    ]
    if survivors:
        lines += ["Non-equivalent survivors (`mutmut show NAME`):", ""]
        lines += [f"- `{name}`" for name in survivors] + [""]
    if not_run:
        lines += ["Sampled but not run in time (counted as not killed):", ""]
        lines += [f"- `{name}`" for name in not_run] + [""]
    lines += [
        "## Equivalent mutants",
        "",
        "From `.ci/mutation_equivalents.toml`, the one reviewed list. Lines skipped whole "
        "(`do_not_mutate_patterns`, kept equal to the list's `[[skip]]` entries by the gate):",
        "",
        "| pattern | why |",
        "|---|---|",
        *(f"| `{_cell(s['pattern'])}` | {s['reason']} |" for s in skips),
        "",
        "Single mutants (matched by function and change):",
        "",
        "| function | change | why |",
        "|---|---|---|",
        *(f"| `{m['function']}` | `{_cell(m['change'])}` | {m['reason']} |" for m in mutants),
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sample", type=int, default=5, help="mutants per pool; 0: all")
    parser.add_argument(
        "--import-time-sample",
        type=int,
        default=3,
        help="mutants per import-time pool (each costs a fresh interpreter); 0: all",
    )
    parser.add_argument("--seed", type=int, default=29)
    parser.add_argument("--max-children", type=int, default=2)
    parser.add_argument(
        "--time-box",
        type=float,
        default=DEFAULT_TIME_BOX,
        help="seconds for the whole gate; 0: none",
    )
    parser.add_argument("--bar", type=float, default=95.0, help="lowest passing score (percent)")
    parser.add_argument("--no-write", action="store_true", help="leave MUTATION.md as it is")
    args = parser.parse_args()
    start = time.monotonic()
    deadline = start + args.time_box if args.time_box else None
    skips, equivalent = _equivalents()
    known = {(e["function"], e["change"]) for e in equivalent}
    listed = _check_listing()

    def phase(text: str) -> None:
        print(f"[{time.monotonic() - start:5.0f} s] {text}", flush=True)

    subprocess.run(["rm", "-rf", str(MUTANTS)], check=True)
    generated = subprocess.run(
        [sys.executable, "-c", GENERATE, str(args.max_children)],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    if generated.returncode != 0:
        sys.exit(f"mutmut could not generate the mutants:\n{generated.stderr[-4000:]}")
    everything = sorted(_exit_codes())
    chosen = sample(everything, args.sample, args.seed, args.import_time_sample)
    SAMPLE_FILE.write_text("".join(f"{name}\n" for name in chosen))
    at_import = [n for n in chosen if _import_tests(n)]
    runtime = [n for n in chosen if not _import_tests(n)]
    phase(
        f"{len(everything)} mutants generated; sample of {len(chosen)} "
        f"(seed {args.seed}, digest {digest(chosen)}, listed in {SAMPLE_FILE.relative_to(ROOT)}),"
        f" {len(at_import)} of them at import time"
    )
    by_import = _import_time_loop(at_import, args.max_children, deadline)
    phase(f"import-time loop: {len(by_import)} of {len(at_import)} run")
    left = None if deadline is None else max(1.0, deadline - time.monotonic())
    in_time = _run(runtime, args.max_children, left) if runtime else True
    codes = _exit_codes()
    phase("mutmut run: " + ("done" if in_time else "stopped by the time box"))

    modules: dict[str, Module] = {}
    for name in everything:
        modules.setdefault(module_of(name), Module()).generated += 1
    for name in chosen:
        m = modules[module_of(name)]
        m.sampled.append(name)
        code = codes[name]
        if name in at_import:
            if name not in by_import:
                m.not_run.append(name)
                continue
            killed = by_import[name]
        elif code is None:
            m.not_run.append(name)
            continue
        else:
            killed = code in KILLED
        if killed:
            m.killed += 1
            m.timeouts += code in TIMEOUTS and name not in at_import
        elif (name.rsplit("__mutmut_", 1)[0], _change(name)) in known:
            m.equivalent.append(name)
        else:
            m.survivors.append(name)
    seconds = time.monotonic() - start
    print("\n".join(_table(modules, args.bar)))
    for m in modules.values():
        for name in m.survivors:
            print(f"survived: {name}: {_change(name)}")
        for name in m.not_run:
            print(f"not run in time (counted as not killed): {name}")
    print(f"{seconds / 60:.1f} minutes")
    if not args.no_write:
        text = _markdown(modules, args, chosen, seconds, skips, equivalent)
        (ROOT / "MUTATION.md").write_text(text)
    pools = {name.removesuffix(" (import time)") for name in modules}
    failing = [name for name, m in modules.items() if m.score < args.bar]
    failing += [f"{name} (listed, no mutant)" for name in listed if name not in pools]
    if failing:
        print(f"below {args.bar:g}%: {', '.join(sorted(failing))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
