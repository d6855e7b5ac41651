"""The examples of the README and of every docs page (``docs/*.md``), run, so that they cannot
drift from the code.

* Every ``python`` block runs (where the optional package of :data:`NEEDS` it needs is
  installed), except the few listed in :data:`NOT_RUN` with the reason; the
  checkpoint paths it names are synthetic stand-ins, and the names it leaves to the reader
  (``hf_state_dict``, ``config``, ``build_bagel``) are defined from them. A statement whose comment
  is a value (``# Bucket.GEN``, ``# MemoStats(...)``) must evaluate to it; ``...`` in a comment
  stands for any text.
* Every ``console`` block's command runs on stand-ins and must print what the block shows.
* Every ``bagelverify`` command line in a ``bash`` block must parse.
"""

from __future__ import annotations

import enum
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from test_cli import TIMEOUT, _env, _script

import bagelverify as bv
from bagelverify import cli
from bagelverify.manifest import MODEL_FILE
from bagelverify.safetensors_io import save_tensors
from bagelverify.synthetic import SyntheticCheckpoint

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
"""The README and the docs site's pages: every example in them is checked here."""

NEEDS = {"from bagelverify.integrations import automodel": "nemo_automodel"}
"""First line of a python block -> the optional package it needs (the test is skipped without)."""

NOT_RUN = {
    "import os, torch, torch.distributed as dist": (
        "needs torchrun and NCCL GPUs; tests/test_distributed.py runs the same load on 2 CPU ranks"
    ),
    "from bagelverify import compose_checkpoint": (
        "needs the real Qwen2.5-7B and SigLIP folders; tests/test_compose.py composes tiny "
        "transformers backbones and checks the release-sized counts on sparse headers"
    ),
    "from bagelverify.compose import read_origins": (
        "reads the folder the compose example writes; tests/test_compose.py reads origins back"
    ),
    "from bagelverify import export_checkpoint, load_bagel_checkpoint_state_dict": (
        "needs an Automodel training run's step folder; tests/test_export.py exports real "
        "Automodel 0.7.0 step folders and loads the result strictly"
    ),
}
"""First line of a python block that is not run here -> why."""


def blocks(language: str) -> list[tuple[str, str]]:
    """(``page:line``, text) of every fenced block in ``language``, in the README and the docs."""
    found = []
    for page in PAGES:
        text = page.read_text()
        name = page.relative_to(ROOT)
        found += [
            (f"{name}:{text[: m.start()].count(chr(10)) + 1}", m.group(1))
            for m in re.finditer(rf"^```{language}\n(.*?)^```", text, re.S | re.M)
        ]
    return found


SIZE = re.compile(r"[0-9]+(?:\.[0-9])? (?:B|kB|MB|GB)")
"""A size as the commands print it; the README's are the real model's, the stand-ins' differ."""


def matches(shown: str, actual: str) -> bool:
    """Whether ``actual`` is ``shown`` with each ``...`` standing for any text and each size
    for any size."""
    parts = []
    for part in re.split(r"\(\.\.\.\)|\.\.\.", shown):
        parts.append(SIZE.pattern.join(re.escape(piece) for piece in SIZE.split(part)))
    return re.fullmatch(".*?".join(parts), actual, re.S) is not None


def shown_value(value: Any) -> str:
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    return repr(value)


VALUE_COMMENT = re.compile(r"[A-Z]\w*(?:\.\w+|\()")
"""A comment that shows a value (``Bucket.GEN``, ``MemoStats(...)``), not prose."""


def statements(code: str) -> list[tuple[str, str | None]]:
    """(statement, the value its comment shows or None); a comment-only line after a statement
    (and its ``#   `` continuation lines) belongs to that statement."""
    out: list[tuple[str, str | None]] = []
    for line in code.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") and out:
            comment = stripped.lstrip("#").strip()
            statement, shown = out[-1]
            if shown is not None and line.startswith("#   "):
                out[-1] = (statement, f"{shown} {comment}")
            elif shown is None and VALUE_COMMENT.match(comment):
                out[-1] = (statement, comment)
            continue
        code_part, _, comment = line.partition("  # ")
        shown = comment.strip() if VALUE_COMMENT.match(comment.strip()) else None
        if code_part.strip():
            out.append((code_part, shown))
    return out


@pytest.fixture(scope="module")
def stand_ins(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """README path -> synthetic folder standing in for it."""
    from safetensors.torch import load_file

    root = tmp_path_factory.mktemp("readme")
    finetune = root / "my-finetune"  # lost one vision-tower key
    finetune.mkdir()
    for config in synthetic_checkpoint.path.glob("*config.json"):
        shutil.copy(config, finetune)
    tensors = load_file(synthetic_checkpoint.path / MODEL_FILE)
    del tensors["vit_model.vision_model.encoder.layers.0.mlp.fc1.weight"]
    save_tensors(finetune / MODEL_FILE, tensors)
    f32 = root / "finetune-f32"
    assert (
        cli.main(
            [
                "convert",
                str(synthetic_checkpoint.path),
                str(f32),
                "-q",
                "--stage",
                "2",
                "--dtype",
                "f32",
            ]
        )
        == 0
    )
    return {
        "/ckpt/BAGEL-7B-MoT": synthetic_checkpoint.path,
        "/ckpt/my-finetune": finetune,
        "/ckpt/finetune-f32": f32,
        "/ckpt/finetune-bf16": root / "finetune-bf16",
        "/ckpt/repaired": root / "repaired",
        "/ckpt/out": root / "out",
        "/tmp/fake": root / "fake",
    }


def substitute(text: str, paths: dict[str, Path]) -> str:
    for shown, real in sorted(paths.items(), key=lambda item: -len(item[0])):
        text = text.replace(shown, str(real))
    return text


PYTHON = blocks("python")
RUN = [(line, code) for line, code in PYTHON if code.splitlines()[0] not in NOT_RUN]


@pytest.mark.parametrize(("line", "code"), RUN, ids=[line for line, _ in RUN])
def test_python_example_runs_and_shows_what_it_gives(
    line: str, code: str, stand_ins: dict[str, Path]
) -> None:
    needed = NEEDS.get(code.splitlines()[0])
    if needed is not None:
        pytest.importorskip(needed, reason=f"{line} needs {needed}, not installed")
    folder = stand_ins["/ckpt/BAGEL-7B-MoT"]
    config = bv.BagelConfig.from_pretrained(folder)
    stage1 = bv.load_bagel_checkpoint_state_dict(folder, stage=1)

    class Model:
        def state_dict(self) -> dict[str, torch.Tensor]:
            return {key: torch.empty_like(value) for key, value in stage1.items()}

    namespace: dict[str, Any] = {
        "hf_state_dict": bv.BagelStateDictAdapter().to_hf(
            bv.load_bagel_checkpoint_state_dict(folder, stage=2)
        ),
        "config": config,
        "build_bagel": lambda _config: Model(),
    }
    for statement, shown in statements(substitute(code, stand_ins)):
        if shown is None:
            exec(statement, namespace)
            continue
        value = eval(statement, namespace)
        assert matches(shown, shown_value(value)), (statement, shown, shown_value(value))


def test_every_python_example_is_run_or_says_why_not() -> None:
    """Each block left out is named in NOT_RUN with its reason, and each NOT_RUN entry is a
    block of the README or a docs page (so the list cannot outlive its blocks)."""
    firsts = [code.splitlines()[0] for _, code in PYTHON]
    assert set(NOT_RUN) <= set(firsts)
    assert len(RUN) == len(PYTHON) - len(NOT_RUN) >= 4


CONSOLE_ELSEWHERE = {
    "$ bagelverify export ": "tests/test_export.py runs it on a full-size step folder's metadata",
}
"""Start of a console block's command run by another test (it needs inputs built there) -> which."""
CONSOLE = [
    (line, text)
    for line, text in blocks("console")
    if not any(text.startswith(start) for start in CONSOLE_ELSEWHERE)
]


@pytest.mark.parametrize(("line", "text"), CONSOLE, ids=[line for line, _ in CONSOLE])
def test_console_example_prints_what_it_shows(
    line: str, text: str, stand_ins: dict[str, Path], tmp_path: Path
) -> None:
    command, *shown = text.splitlines()
    assert command.startswith("$ bagelverify ")
    paths = dict(stand_ins)
    if "/tmp/ckpt/bagel" in command:  # the Quickstart's own checkpoint, as its note says
        paths["/tmp/ckpt/bagel"] = bv.make_synthetic_checkpoint(tmp_path / "bagel", scale=32).path
    words = shlex.split(substitute(command[2:], paths))[1:]
    result = subprocess.run(
        [*_script(), *words], capture_output=True, text=True, env=_env(), timeout=TIMEOUT
    )
    assert result.returncode in (0, 1), result.stderr
    expected = substitute("\n".join(shown), paths)
    if expected:
        assert matches(expected + "\n", result.stdout), result.stdout


def test_every_console_block_left_to_another_test_exists() -> None:
    for start in CONSOLE_ELSEWHERE:
        assert any(text.startswith(start) for _, text in blocks("console")), start


def test_every_bagelverify_command_line_in_a_bash_block_parses() -> None:
    found = 0
    for _, code in blocks("bash"):
        for line in code.splitlines():
            if "bagelverify" not in line.partition("  #")[0]:
                continue
            words = shlex.split(line.partition("  #")[0])
            if words[:1] == ["bagelverify"]:
                words = words[1:]
            elif words[:3] == [sys.executable.rsplit("/", 1)[-1], "-m", "bagelverify"] or words[
                :3
            ] == ["python", "-m", "bagelverify"]:
                words = words[3:]
            else:
                continue
            found += 1
            args = cli.build_parser(words[0]).parse_args(words)
            assert args.command == words[0]
    assert found >= 2
