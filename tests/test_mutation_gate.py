"""The mutation gate's sample and score (``.ci/mutation_gate.py``, issue 29): the sample is a pure
function of the mutant names and the seed, and a mutant not run counts as not killed."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

GATE = Path(__file__).resolve().parent.parent / ".ci" / "mutation_gate.py"


@pytest.fixture(scope="module")
def gate() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mutation_gate", GATE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["mutation_gate"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _names() -> list[str]:
    """Mutant names as mutmut spells them: functions, methods, an import-time helper."""
    names = [f"bagelverify.engine.x_run__mutmut_{n}" for n in range(1, 60)]
    names += [f"bagelverify.engine.xǁEngineOptionsǁthread_count__mutmut_{n}" for n in range(1, 9)]
    names += [f"bagelverify.families.x_und_twin__mutmut_{n}" for n in range(1, 30)]
    names += [f"bagelverify.families.x__table__mutmut_{n}" for n in range(1, 40)]
    names += [f"bagelverify.keys.x_strip_root__mutmut_{n}" for n in range(1, 4)]
    return names


def test_the_sample_ignores_the_order_and_repetition_of_names(gate: ModuleType) -> None:
    names = _names()
    shuffled = names * 2
    random.Random(3).shuffle(shuffled)
    assert gate.sample(shuffled, 8, 29) == gate.sample(names, 8, 29)
    assert gate.sample(names, 8, 29) == sorted(gate.sample(names, 8, 29))


def test_the_sample_is_the_same_under_any_hash_seed(gate: ModuleType, tmp_path: Path) -> None:
    """Two interpreters with different ``PYTHONHASHSEED`` draw the same sample (a draw through
    set or dict-of-set iteration, or ``hash()``, would differ)."""
    names = tmp_path / "names.json"
    names.write_text(json.dumps(_names()))
    script = (
        "import importlib.util, json, sys\n"
        f"spec = importlib.util.spec_from_file_location('g', {str(GATE)!r})\n"
        "g = importlib.util.module_from_spec(spec); sys.modules['g'] = g\n"
        "spec.loader.exec_module(g)\n"
        f"print(json.dumps(g.sample(json.load(open({str(names)!r})), 8, 29)))\n"
    )
    draws = [
        subprocess.run(
            [sys.executable, "-c", script],
            env=dict(os.environ, PYTHONHASHSEED=seed),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("0", "1", "random")
    ]
    assert draws[0] == draws[1] == draws[2]
    assert json.loads(draws[0]) == gate.sample(_names(), 8, 29)


def test_each_pool_gets_its_share_and_a_pool_draws_only_on_its_own_names(
    gate: ModuleType,
) -> None:
    """8 of each module's mutants (all 3 of ``keys``); import-time mutants are a pool of their
    own; adding mutants to one module leaves the other pools' draws as they were."""
    names = _names()
    chosen = gate.sample(names, 8, 29)
    pools: dict[str, int] = {}
    for name in chosen:
        pools[gate.module_of(name)] = pools.get(gate.module_of(name), 0) + 1
    assert pools == {
        "bagelverify.engine": 8,
        "bagelverify.families": 8,
        "bagelverify.families (import time)": 8,
        "bagelverify.keys": 3,
    }
    grown = names + [f"bagelverify.engine.x_plan_reads__mutmut_{n}" for n in range(1, 50)]
    again = gate.sample(grown, 8, 29)
    assert [n for n in again if "engine" not in n] == [n for n in chosen if "engine" not in n]
    assert gate.sample(names, 0, 29) == sorted(names)
    fewer = gate.sample(names, 8, 29, import_time_size=4)
    assert set(fewer) < set(chosen)
    assert [n for n in fewer if "_table" in n] == [
        n for n in fewer if "(import" in gate.module_of(n)
    ]
    assert len([n for n in fewer if "_table" in n]) == 4
    assert gate.sample(names, 8, 30) != chosen


def test_changing_one_function_keeps_the_rest_of_its_modules_sample(gate: ModuleType) -> None:
    """mutmut numbers mutants per function: when one function's mutants are renumbered (its
    code changed), every chosen mutant of the other functions stays chosen unless a renamed
    one now ranks before it, and none of them that was left out comes in."""
    names = _names()
    chosen = set(gate.sample(names, 8, 29))
    changed = [n for n in names if "thread_count" not in n]
    changed += [
        f"bagelverify.engine.xǁEngineOptionsǁthread_count__mutmut_{n}" for n in range(1, 14)
    ]
    again = set(gate.sample(changed, 8, 29))
    kept = {n for n in chosen if "thread_count" not in n}
    assert {n for n in again if "thread_count" not in n} <= kept
    pushed_out = kept - again  # only by renamed mutants that now rank before them
    assert len({n for n in again if "engine" in n}) == 8
    assert len(pushed_out) <= len({n for n in again - chosen if "thread_count" in n})
    run_only = [n for n in names if "x_run__" in n]
    assert set(gate.sample(run_only, 8, 29)) >= {n for n in chosen if "x_run__" in n}


def test_a_sampled_mutant_not_run_counts_as_not_killed(gate: ModuleType) -> None:
    module = gate.Module(sampled=["a", "b", "c", "d"], killed=3, not_run=["d"])
    assert module.score == 75.0
    assert gate.Module(sampled=["a", "b"], killed=1, equivalent=["b"]).score == 100.0
    assert gate.Module().score == 0.0  # a pool nothing was sampled from fails
