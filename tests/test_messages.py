"""Issue 32's messages: a file where a folder is expected, one wording for a missing folder, a
mistyped flag named with its subcommand and the flag meant, a read-only output named as the
folder the user gave (never a staging name)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import _env

import bagelverify as bv
from bagelverify import cli
from bagelverify.manifest import MODEL_FILE
from bagelverify.synthetic import SyntheticCheckpoint

FAULTS = Path(__file__).with_name("_cli_faults.py")


@pytest.mark.parametrize("name", [MODEL_FILE, "config.json"])
def test_a_file_given_for_a_checkpoint_folder_names_the_folder_to_pass(
    synthetic_checkpoint: SyntheticCheckpoint, name: str
) -> None:
    """Before: "checkpoint folder .../ema.safetensors does not exist (expected
    .../ema.safetensors/ema.safetensors)"."""
    given = synthetic_checkpoint.path / name
    for function in (bv.load_bagel_checkpoint_state_dict, bv.inspect_checkpoint):
        with pytest.raises(NotADirectoryError) as raised:
            function(given)
        message = str(raised.value)
        assert message.startswith(f"{given} is a file, not a checkpoint folder")
        assert f"pass its folder {synthetic_checkpoint.path}" in message
        assert f"{MODEL_FILE}/{MODEL_FILE}" not in message


@pytest.mark.parametrize(
    ("words", "what", "expected"),
    [
        (["inspect", "{m}"], "checkpoint folder", MODEL_FILE),
        (["convert", "{m}", "{tmp}/out"], "checkpoint folder", MODEL_FILE),
        (["diff", "{m}", "{m}"], "checkpoint folder", MODEL_FILE),
        (["repair", "{m}", "--base", "{m}", "-o", "{tmp}/r"], "checkpoint folder", MODEL_FILE),
        (["lora", "check", "{m}"], "adapter folder", "adapter_config.json"),
    ],
    ids=["inspect", "convert", "diff", "repair", "lora"],
)
def test_every_command_words_a_missing_folder_alike(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    words: list[str],
    what: str,
    expected: str,
) -> None:
    """Before: convert said "X: no such checkpoint folder", lora a raw errno message."""
    missing = tmp_path / "missing"
    code = cli.main([w.format(m=missing, tmp=tmp_path) for w in words])
    assert code == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert f"error: {what} {missing} does not exist (expected {missing / expected})" in err


@pytest.mark.parametrize(
    ("words", "prog", "meant"),
    [
        (["inspect", ".", "--stgae", "1"], "bagelverify inspect", "--stage"),
        (
            ["convert", "a", "b", "--max-shard-szie", "5GB"],
            "bagelverify convert",
            "--max-shard-size",
        ),
        (["lora", "merge", "a", "b", "-o", "c", "--dryrun"], "bagelverify lora merge", "--dry-run"),
    ],
)
def test_a_mistyped_flag_names_its_subcommand_and_the_flag_meant(
    capsys: pytest.CaptureFixture[str], words: list[str], prog: str, meant: str
) -> None:
    """Before: "bagelverify: error: unrecognized arguments: --stgae 1", no subcommand named,
    nothing suggested."""
    assert cli.main(words) == cli.EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"{prog}: error: unrecognized argument")
    assert f"did you mean {meant}?" in err and f"(see {prog} --help)" in err
    assert len(err.splitlines()) == 1


def test_an_unlike_flag_suggests_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["inspect", ".", "--zzzzzz"]) == cli.EXIT_USAGE
    assert "did you mean" not in capsys.readouterr().err


@pytest.mark.parametrize("errno_name", ["EACCES", "EROFS"])
@pytest.mark.parametrize("command", ["repair", "demo"])
def test_a_read_only_output_is_named_as_given_without_staging_names(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path, command: str, errno_name: str
) -> None:
    """Before: "[Errno 13] Permission denied: '.../.out.partial-...'" and the like."""
    readonly = tmp_path / "ro"
    readonly.mkdir()
    if command == "repair":
        words = ["repair", synthetic_checkpoint.path, "--base", synthetic_checkpoint.path]
        words += ["-o", readonly / "out"]
    else:
        words = ["demo", "--scale", "128", "--keep", readonly / "keep"]
    result = subprocess.run(
        [sys.executable, str(FAULTS), *map(str, words)],
        capture_output=True,
        text=True,
        env=_env(BV_FAULT_READONLY=str(readonly), BV_FAULT_ERRNO=errno_name),
        timeout=120,
        check=False,
    )
    assert result.returncode == cli.EXIT_FAILED, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert f"cannot write in {readonly} (" in line and "nothing was written" in line
    assert ".partial" not in line and "Errno" not in line.split("cannot write")[1]
    assert list(readonly.iterdir()) == []
