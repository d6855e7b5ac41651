"""``mypy --strict`` on a user's script: the public API's types accept what the docs show and
refuse what the functions refuse (``stage=3``, ``weights="emaa"``, ...), each on its line."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

TYPING = Path(__file__).parent / "typing"
ROOT = Path(__file__).parents[1]

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("mypy") is None, reason="mypy is not installed"
)


def _mypy(script: Path) -> subprocess.CompletedProcess[str]:
    # MYPYPATH: this checkout's package (.ci/run checks the installed one, from another folder)
    env = dict(os.environ, MYPYPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-error-summary", str(script)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        check=False,
    )


def test_the_user_script_type_checks_and_runs(tmp_path: Path) -> None:
    result = _mypy(TYPING / "user_script.py")
    assert result.returncode == 0, result.stdout + result.stderr
    spec = importlib.util.spec_from_file_location("user_script", TYPING / "user_script.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(tmp_path / "ckpt")  # and what it type-checks does run


def test_every_bad_call_of_the_negative_script_is_flagged() -> None:
    """Before: ``stage: object`` and ``weights: object`` let mypy accept ``stage=3``."""
    script = TYPING / "bad_user_script.py"
    marked = {
        number: line.split("# error: ")[1]
        for number, line in enumerate(script.read_text().splitlines(), start=1)
        if "# error: " in line
    }
    result = _mypy(script)
    flagged = {
        int(match[1]): match[2]
        for match in re.finditer(r":(\d+): error: Argument \"(\w+)\"", result.stdout)
    }
    assert flagged == marked, result.stdout
