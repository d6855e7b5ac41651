"""The command line as a new user meets it (issue 15): each test is one item of the issue.

Conditions that cannot be made for real here (a mount point, a folder that even root cannot
write, a convert slow enough to signal mid-write) come from ``tests/_cli_faults.py``, which runs
the same command line in a subprocess with that one fault injected.
"""

from __future__ import annotations

import errno
import json
import os
import pty
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import edited_copy
from test_cli import (
    ANSI,
    INSPECT_SCHEMA,
    REPORT_SCHEMA,
    TIMEOUT,
    _env,
    _script,
    assert_one_line_error,
    assert_schema,
    bv,
)
from test_json_schema import assert_valid, documented_fields

import bagelverify as bv_api
from bagelverify import atomic, publish
from bagelverify.cli import ENVELOPE_FIELDS
from bagelverify.errors import UnknownKeysError
from bagelverify.manifest import MODEL_FILE, VAE_FILE
from bagelverify.safetensors_io import read_header, save_tensors
from bagelverify.synthetic import SyntheticCheckpoint

FAULTS = Path(__file__).with_name("_cli_faults.py")
README = Path(__file__).resolve().parents[1] / "README.md"


def faulty(*args: object, **faults: str) -> subprocess.CompletedProcess[str]:
    """The command line in a subprocess with the faults of ``tests/_cli_faults.py``."""
    return subprocess.run(
        [sys.executable, str(FAULTS), *map(str, args)],
        capture_output=True,
        text=True,
        env=_env(**faults),
        timeout=TIMEOUT,
        check=False,
    )


def partial_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if ".partial-" in p.name)


# -- 1. convert into a mount point -------------------------------------------------------------


def test_convert_into_a_mount_point_stages_on_its_own_file_system(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    """A DST that is a mount point (renames into or out of it fail with EXDEV) is written."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    result = faulty(
        "convert", synthetic_checkpoint.path, mount, "--stage", "1", BV_FAULT_MOUNT=mount
    )
    assert result.returncode == 0, result.stderr
    assert len(read_header(mount / MODEL_FILE).tensors) == 821
    assert partial_folders(mount) == [] and partial_folders(tmp_path) == []


def test_move_into_place_copies_then_renames_when_the_rename_crosses_file_systems(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Invariant: across file systems the target is still replaced in one rename on its own
    file system (a copy under a temporary name beside it first), and the source is removed."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    source, target = tmp_path / "a" / "x.bin", tmp_path / "b" / "x.bin"
    source.write_bytes(b"new" * 1000)
    source.chmod(0o640)
    target.write_bytes(b"old")
    real = os.replace
    renames: list[tuple[str, str]] = []

    def replace(src: Any, dst: Any) -> None:
        if Path(src).parent != Path(dst).parent:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        renames.append((Path(src).name, Path(dst).name))
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    atomic.move_into_place(source, target)
    assert target.read_bytes() == b"new" * 1000 and not source.exists()
    assert target.stat().st_mode & 0o777 == 0o640
    assert [dst for _, dst in renames] == ["x.bin"] and atomic.is_temporary_name(
        target, renames[0][0]
    )
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.bin"]


# -- 2. a killed convert ------------------------------------------------------------------------


def _start_slow_convert(source: Path, target: Path) -> subprocess.Popen[str]:
    """A convert that waits 20 ms per tensor; returns once its staging folder holds a file."""
    process = subprocess.Popen(
        [sys.executable, str(FAULTS), "convert", str(source), str(target), "--stage", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(BV_FAULT_SLOW="0.02"),
    )
    deadline = time.monotonic() + TIMEOUT
    while process.poll() is None:
        staged = partial_folders(target.parent)
        if staged and any(staged[0].iterdir()):
            return process
        assert time.monotonic() < deadline, "convert never started writing"
        time.sleep(0.02)
    raise AssertionError(f"convert ended before it was signalled: {process.communicate()}")


def test_sigterm_stops_convert_like_ctrl_c_and_removes_its_staging_folder(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    process = _start_slow_convert(synthetic_checkpoint.path, tmp_path / "out")
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "bagelverify: interrupted"
    assert partial_folders(tmp_path) == [] and not (tmp_path / "out").exists()


def test_the_next_convert_removes_the_staging_folder_of_a_killed_one_and_nothing_else(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    """Right away (a retry need not wait): staging folders are created and locked under the
    publishing lock, so one that nobody holds, however young, is a dead run's."""
    target = tmp_path / "out"
    process = _start_slow_convert(synthetic_checkpoint.path, target)
    process.kill()  # SIGKILL: no clean-up can run
    process.communicate(timeout=TIMEOUT)
    [killed] = partial_folders(tmp_path)
    old = time.time() - 2 * atomic.STALE_AFTER_SECONDS
    mine = tmp_path / ".out.partial-notes"  # not of convert's exact naming
    mine.mkdir()
    os.utime(mine, (old, old))
    young = tmp_path / f".out.partial-{'0' * 16}"  # convert's naming, just made, unlocked
    young.mkdir()
    other = tmp_path / f".other.partial-{'1' * 16}"  # another destination's
    other.mkdir()
    os.utime(other, (old, old))
    result = bv("convert", synthetic_checkpoint.path, target, "--stage", "1")
    assert result.returncode == 0, result.stderr
    assert not killed.exists() and not young.exists()
    assert mine.is_dir() and other.is_dir()


def test_a_staging_folder_that_its_writer_holds_is_never_removed(tmp_path: Path) -> None:
    """Invariant: while a writer holds its staging folder, no clean-up removes it, however old."""
    target = tmp_path / "out"
    with publish.publishing(target, replaces=lambda name: True) as staging:
        old = time.time() - 2 * atomic.STALE_AFTER_SECONDS
        os.utime(staging, (old, old))
        assert publish.recover(target, wait=True) == []
        assert staging.is_dir()
    assert not staging.exists() and target.is_dir()


# -- 4. one JSON envelope, documented ------------------------------------------------------------


def assert_documented(document: dict[str, Any], command: str) -> None:
    """The envelope and the schema, then exactly docs/json.md's fields for the command."""
    assert_valid(document, command)


def json_of(*args: object) -> dict[str, Any]:
    result = bv(*args, "--json")
    assert result.returncode in (0, 1), result.stderr
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def test_every_command_prints_one_documented_json_envelope(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    source = synthetic_checkpoint.path
    lacking = tmp_path / "lacking"
    lacking.mkdir()
    for config in source.glob("*config.json"):
        shutil.copy(config, lacking)
    tensors = {k: v for k, v in bv_api.load_bagel_checkpoint_state_dict(source, stage=2).items()}
    hf = bv_api.BagelStateDictAdapter().to_hf(tensors)
    del hf["vit_model.vision_model.encoder.layers.0.mlp.fc1.weight"]
    save_tensors(lacking / MODEL_FILE, hf)
    assert_documented(json_of("inspect", source), "inspect")
    assert_documented(json_of("convert", source, tmp_path / "c", "--stage", "1"), "convert")
    assert_documented(
        json_of("convert", source, tmp_path / "f32", "--stage", "1", "--dtype", "f32"), "convert"
    )
    assert_documented(json_of("diff", source, lacking), "diff")
    assert_documented(json_of("repair", lacking, "--base", source, "-o", tmp_path / "r"), "repair")
    assert_documented(json_of("verify", "--no-z3"), "verify")
    assert_documented(json_of("bench", "--quick"), "bench")


def test_demo_json_is_the_documented_envelope(tmp_path: Path) -> None:
    result = bv("demo", "--scale", "64", "--json", env=_env(TMPDIR=str(tmp_path)))
    assert result.returncode == 0, result.stderr
    assert_documented(json.loads(result.stdout), "demo")


def test_the_inspect_table_of_the_docs_is_the_tested_schema() -> None:
    every, always = documented_fields("inspect")
    assert every == always == set(INSPECT_SCHEMA) - set(ENVELOPE_FIELDS)


# -- 5. a failed z3 obligation shows its witness ----------------------------------------------


def test_verify_prints_what_z3_found_for_a_failed_obligation(tmp_path: Path) -> None:
    pytest.importorskip("z3")
    patterns = tmp_path / "patterns.json"
    patterns.write_text(json.dumps({"und": [*bv_api.UND_PATTERNS, r"\Alanguage_model\..*\Z"]}))
    result = bv("verify", "--patterns", patterns)
    assert result.returncode == 1, result.stderr
    [line] = [ln for ln in result.stdout.splitlines() if "P1 disjointness" in ln and " z3 " in ln]
    assert "FAILED" in line and "unsat" not in line
    assert "sat, z3 found" in line and "'language_model." in line


# -- 6. a model file where a folder is expected ------------------------------------------------


def test_convert_accepts_the_model_file_for_its_folder(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    result = bv("convert", synthetic_checkpoint.path / MODEL_FILE, tmp_path / "out", "--stage", "1")
    assert result.returncode == 0, result.stderr
    assert len(read_header(tmp_path / "out" / MODEL_FILE).tensors) == 821


def test_a_file_that_is_no_weights_file_is_told_a_folder_is_needed(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    config = synthetic_checkpoint.path / "config.json"
    line = assert_one_line_error(bv("convert", config, tmp_path / "out", "--stage", "1"), "convert")
    assert f"SRC {config} is a file; SRC is a checkpoint folder" in line
    assert "does not exist" not in line


@pytest.mark.parametrize(
    ("args", "what"),
    [
        (["inspect", "{config}"], "PATH"),
        (["diff", "{config}", "{ckpt}"], "A"),
        (["repair", "{config}", "--base", "{ckpt}", "-o", "{tmp}/r"], "SRC"),
    ],
    ids=["inspect", "diff", "repair"],
)
def test_commands_reading_a_checkpoint_say_what_a_wrong_file_is(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path, args: list[str], what: str
) -> None:
    config = synthetic_checkpoint.path / "config.json"
    words = [a.format(config=config, ckpt=synthetic_checkpoint.path, tmp=tmp_path) for a in args]
    line = assert_one_line_error(bv(*words), args[0])
    assert f"{what} {config} is not a checkpoint file; {what} is a checkpoint folder" in line
    assert "header length" not in line


def test_config_accepts_a_config_file_for_its_folder(
    synthetic_checkpoint: SyntheticCheckpoint,
) -> None:
    result = bv(
        "inspect", synthetic_checkpoint.path, "--config", synthetic_checkpoint.path / "config.json"
    )
    assert result.returncode == 0, result.stderr
    assert f"config: {synthetic_checkpoint.path}\n" in result.stdout


# -- 8. folders that cannot be written -----------------------------------------------------------


@pytest.mark.parametrize("code", ["EACCES", "EPERM", "EROFS"])
def test_a_folder_that_cannot_be_written_is_named_with_what_to_do(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path, code: str
) -> None:
    """Read-only (EACCES), immutable (EPERM) and read-only-mounted (EROFS) output folders, as a
    new DST inside one and as DST itself."""
    locked = tmp_path / "locked"
    locked.mkdir()
    for target in (locked / "out", locked):
        result = faulty(
            "convert",
            synthetic_checkpoint.path,
            target,
            "--stage",
            "1",
            BV_FAULT_READONLY=str(locked),
            BV_FAULT_ERRNO=code,
        )
        line = assert_one_line_error(result, "convert", 3)  # the system refused: exit 3
        assert f"cannot write in {locked} (" in line and "nothing was written" in line
        assert "another DST" in line or "a DST under a folder you can write to" in line
        # a read-only file system cannot be fixed with permissions (issue 27)
        assert ("chmod" in line or "chattr" in line) == (code != "EROFS")
        assert ".partial-" not in line  # no hidden temporary path
    assert list(locked.iterdir()) == []


# -- 9. --no-strict messages, warnings once ------------------------------------------------------


@pytest.fixture(scope="module")
def twinless_and_unknown(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The synthetic folder with one unknown key and one GEN key whose UND twin is gone."""
    folder = edited_copy(
        synthetic_checkpoint,
        tmp_path_factory.mktemp("twinless"),
        drop=["language_model.model.layers.3.self_attn.q_proj.weight"],
        add={"vit_model.vision_model.encoder.layers.0.mlp.fc3.weight": torch.zeros(2).bfloat16()},
    )
    return folder


def test_no_strict_warns_once_per_finding(twinless_and_unknown: Path, tmp_path: Path) -> None:
    result = bv("convert", twinless_and_unknown, tmp_path / "out", "--stage", "2", "--no-strict")
    assert result.returncode == 0, result.stderr
    warnings = result.stderr.splitlines()
    assert len(warnings) == len(set(warnings)) == 2, warnings
    assert "1 GEN key without the UND twin" in result.stderr
    assert "dropping 1 key of no BAGEL key family" in result.stderr


def test_no_strict_is_not_suggested_to_a_run_that_used_it(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    folder = tmp_path / "bad-shape"
    folder.mkdir()
    for config in synthetic_checkpoint.path.glob("*config.json"):
        shutil.copy(config, folder)
    tensors = load_file(synthetic_checkpoint.path / MODEL_FILE)
    tensors["language_model.model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3).bfloat16()
    save_tensors(folder / MODEL_FILE, tensors)
    strict = assert_one_line_error(
        bv("convert", folder, tmp_path / "a", "--stage", "2"), "convert", 1
    )
    # a wrong shape is a config matter: --no-strict would not help, so it is not suggested
    assert "Fix the config field(s) named above" in strict and "--no-strict" not in strict
    lax = bv("convert", folder, tmp_path / "b", "--stage", "2", "--no-strict")
    line = assert_one_line_error(lax, "convert", 1)
    assert "ShapeMismatchError" in line and "--no-strict" not in line


# -- 10. output the rest of the tool can use ------------------------------------------------------


def test_convert_carries_the_vae_so_the_vae_loader_reads_the_output(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    result = bv("convert", synthetic_checkpoint.path, tmp_path / "out", "--stage", "1", "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["vae_from"] == str(synthetic_checkpoint.path / VAE_FILE)
    vae = bv_api.load_bagel_vae_state_dict(tmp_path / "out")
    original = bv_api.load_bagel_vae_state_dict(synthetic_checkpoint.path)
    assert vae.keys() == original.keys() and all(torch.equal(vae[k], original[k]) for k in vae)


def test_inspect_recognises_and_reports_a_dcp_folder(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    dcp = tmp_path / "dcp"
    made = bv("convert", synthetic_checkpoint.path, dcp, "--stage", "2", "--to", "dcp", "-q")
    assert made.returncode == 0, made.stderr
    text = bv("inspect", dcp, "--stage", "1")
    assert text.returncode == 0, text.stderr
    assert text.stdout.startswith(f"{dcp}  (DCP checkpoint, 1,223 tensors, checked for stage1)")
    assert "clean for stage1: a strict load reads 821 tensors" in text.stdout
    document = json_of("inspect", dcp)
    assert_schema(document, INSPECT_SCHEMA)
    assert_schema(document["report"], REPORT_SCHEMA)
    assert document["format"] == "dcp" and document["clean"] is True
    assert document["report"]["kept"] == 1223
    assert Path(document["files"][0]["path"]).name == ".metadata"
    assert document["vae_file"]["tensors"] == 244


# -- 11. progress on a terminal, nothing when piped ---------------------------------------------


def on_terminal(*args: object) -> tuple[int, str]:
    """Run the console script on a pseudo-terminal; its exit code and everything it wrote."""
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [*_script(), *map(str, args)],
        stdin=follower,
        stdout=follower,
        stderr=follower,
        env=_env(COLUMNS="120"),
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    return process.wait(timeout=TIMEOUT), b"".join(chunks).decode(errors="replace")


def test_bench_shows_progress_on_a_terminal_and_nothing_when_piped() -> None:
    """Was flaky: the manifest's phase can end before rich's 10 Hz refresh draws it; each new
    description is now drawn at once (render.step_progress). Issue 32: after the first set the
    description says how long the rest takes, and the results are a terminal table."""
    code, output = on_terminal("bench", "--quick")
    assert code == 0, output
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output)
    assert re.search(r"timing manifest \(1,467 keys\) [━╸╺ ]+ *\d+/30", plain), output
    assert re.search(r"timing scaled-2k \(2,433 keys\), about [\d,]+ s left", plain), output
    assert "Key classification" in plain and "| --- |" not in plain
    piped = bv("bench", "--quick")
    assert piped.returncode == 0 and piped.stderr == ""
    assert ANSI not in piped.stdout


def test_dcp_conversions_show_progress_on_a_terminal_and_nothing_when_piped(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    code, output = on_terminal(
        "convert", synthetic_checkpoint.path, tmp_path / "d", "--stage", "2", "--to", "dcp"
    )
    assert code == 0, output
    assert "stage2: safetensors -> dcp" in output and "0:00:" in output
    piped = bv("convert", tmp_path / "d", tmp_path / "back", "--stage", "2", "--from", "dcp")
    assert piped.returncode == 0 and piped.stderr == ""
    assert ANSI not in piped.stdout


# -- 13. --max-shard-size -------------------------------------------------------------------------


def test_max_shard_size_errors_name_the_option(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    for value in ("banana", "0", "5XB"):
        result = bv(
            "convert",
            synthetic_checkpoint.path,
            tmp_path / "o",
            "--stage",
            "1",
            "--max-shard-size",
            value,
        )
        line = assert_one_line_error(result, "convert")
        assert f"argument --max-shard-size: invalid size {value!r}" in line
        assert "max_shard_size" not in line
    assert not (tmp_path / "o").exists()


def test_many_shards_are_summarised_not_listed(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    result = bv(
        "convert",
        synthetic_checkpoint.path,
        tmp_path / "o",
        "--stage",
        "1",
        "--max-shard-size",
        "1KB",
    )
    assert result.returncode == 0, result.stderr
    shards = sorted((tmp_path / "o").glob("model-*.safetensors"))
    assert len(shards) > 100
    files_line = result.stdout.splitlines()[1]
    assert f"{len(shards)} shards {shards[0].name} .. {shards[-1].name} (" in files_line
    assert len(files_line) < 400


# -- 16. counts -----------------------------------------------------------------------------------


def test_counts_agree_with_their_nouns_and_have_thousands_separators(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    one = tmp_path / "one"
    one.mkdir()
    norm = "language_model.model.norm.weight"
    save_tensors(one / MODEL_FILE, {norm: torch.ones(4).bfloat16()})
    inspected = bv("inspect", one, "--stage", "1")
    assert inspected.returncode == 0, inspected.stderr
    assert "(1 tensor, checked for stage1)" in inspected.stdout
    assert re.search(r"\n  ema\.safetensors  \d+ B, 1 tensor\n", inspected.stdout)
    assert "a strict load reads 1 tensor (8 B)" in inspected.stdout
    converted = bv("convert", one, tmp_path / "out", "--stage", "1")
    assert converted.stdout.startswith("wrote 1 tensor (8 B)"), converted
    full = bv("inspect", synthetic_checkpoint.path, "--stage", "1")
    assert "(1,223 tensors, checked for stage1)" in full.stdout
    adapter = bv_api.BagelStateDictAdapter()
    with pytest.raises(UnknownKeysError, match=r"\A1 key matches no BAGEL key family"):
        adapter.from_hf({"bogus.weight": torch.ones(1)})


# -- 17. the skipped test says what and why -------------------------------------------------------


def test_the_shared_manifest_skip_says_what_is_skipped_and_why() -> None:
    import test_families

    [mark] = test_families.test_shipped_manifest_is_the_shared_one.pytestmark
    reason = mark.kwargs["reason"]
    assert reason.startswith("shipped manifest not compared with the project's reference key list")
    assert "is absent" in reason


# -- 18. --stage and its help agree ---------------------------------------------------------------


@pytest.mark.parametrize("spelling", ["three", "stage 1", "0"])
def test_stage_spellings_normalize_stage_refuses_are_refused(
    synthetic_checkpoint: SyntheticCheckpoint, spelling: str
) -> None:
    """Issue 32 changed this: ``--stage`` takes what ``normalize_stage`` takes (any case,
    spaces around), and refuses what it refuses with its message."""
    line = assert_one_line_error(
        bv("inspect", synthetic_checkpoint.path, "--stage", spelling), "inspect"
    )
    assert f"unknown stage {spelling!r}" in line


def test_stage_accepts_what_the_help_names(
    synthetic_checkpoint: SyntheticCheckpoint,
) -> None:
    help_text = " ".join(bv("inspect", "--help").stdout.split())
    assert "--stage {1,2}" in help_text and "stage1/stage2 in any case too" in help_text
    for spelling, stage in [
        ("1", "stage1"),
        ("2", "stage2"),
        ("stage1", "stage1"),
        ("Stage2", "stage2"),
        (" 1", "stage1"),
    ]:
        assert json_of("inspect", synthetic_checkpoint.path, "--stage", spelling)["stage"] == stage


def test_repair_into_a_mount_point_stages_on_its_own_file_system(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    lacking = tmp_path / "lacking"
    lacking.mkdir()
    for config in synthetic_checkpoint.path.glob("*config.json"):
        shutil.copy(config, lacking)
    tensors = load_file(synthetic_checkpoint.path / MODEL_FILE)
    del tensors["vit_model.vision_model.encoder.layers.0.mlp.fc1.weight"]
    save_tensors(lacking / MODEL_FILE, tensors)
    mount = tmp_path / "mnt"
    mount.mkdir()
    result = faulty(
        "repair", lacking, "--base", synthetic_checkpoint.path, "-o", mount, BV_FAULT_MOUNT=mount
    )
    assert result.returncode == 0, result.stderr
    assert len(read_header(mount / MODEL_FILE).tensors) == 1223
    assert (mount / VAE_FILE).is_file()
    assert partial_folders(mount) == [] and partial_folders(tmp_path) == []
