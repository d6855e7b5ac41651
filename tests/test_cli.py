"""End-to-end tests of the command line: the installed ``bagelverify`` script in a subprocess.

Every subprocess runs with ``FORCE_COLOR=1`` and ``TERM=xterm-256color`` while its output is
piped, so any control code that leaks into piped output fails the tests.
"""

from __future__ import annotations

import json
import os
import pty
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from bagelverify import cli, load_bagel_checkpoint_state_dict
from bagelverify.commands import inspect as inspect_command
from bagelverify.manifest import MODEL_FILE, VAE_FILE
from bagelverify.safetensors_io import (
    DEFAULT_METADATA,
    encode_header,
    layout_order,
    read_header,
    save_tensors,
)
from bagelverify.synthetic import SyntheticCheckpoint, synthetic_specs

ANSI = "\x1b"
TIMEOUT = 120


def _script() -> list[str]:
    beside = Path(sys.executable).with_name("bagelverify")
    found = str(beside) if beside.exists() else shutil.which("bagelverify")
    if found is None:
        pytest.fail("the bagelverify console script is not installed: run `pip install -e .`")
    return [found]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, FORCE_COLOR="1", TERM="xterm-256color", COLUMNS="200")
    env.pop("NO_COLOR", None)
    env.update(extra)
    return env


def bv(*args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the console script with piped output."""
    return subprocess.run(
        [*_script(), *map(str, args)],
        capture_output=True,
        text=True,
        env=env or _env(),
        timeout=TIMEOUT,
        check=False,
    )


def assert_one_line_error(
    result: subprocess.CompletedProcess[str], command: str, code: int = 2
) -> str:
    """Exit ``code`` (2: a usage error), nothing on stdout, one ``bagelverify COMMAND: error:
    ...`` line on stderr."""
    assert result.returncode == code, result
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"bagelverify {command}: error: "), lines[0]
    assert "Traceback" not in result.stderr
    return lines[0]


def no_partial_folders(parent: Path) -> None:
    """Convert's staging folders (``.NAME.partial-*``) never outlive a run."""
    assert not [p.name for p in parent.iterdir() if ".partial-" in p.name]


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unclean(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The synthetic folder with one problem of each kind inspect reports."""
    from safetensors.torch import load_file

    source = synthetic_checkpoint.path
    folder = tmp_path_factory.mktemp("unclean")
    for config in source.glob("*config.json"):
        shutil.copy(config, folder)
    tensors = load_file(source / MODEL_FILE)
    del tensors["language_model.model.layers.3.self_attn.q_proj.weight"]  # missing + twin
    tensors["language_model.model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3).bfloat16()
    tensors["vit_model.vision_model.encoder.layers.0.mlp.fc3.weight"] = torch.zeros(2).bfloat16()
    vae = load_file(source / VAE_FILE)
    tensors["encoder.conv_in.weight"] = vae["encoder.conv_in.weight"]  # merged VAE key
    save_tensors(folder / MODEL_FILE, tensors)
    return folder


@pytest.fixture(scope="module")
def full_size_sparse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder whose ema.safetensors has the real 29 GB header over a sparse (all-hole) data
    section: valid to a header reader, and hours of work for anything that reads the data."""
    config, model, _ = synthetic_specs(1)
    folder = tmp_path_factory.mktemp("sparse")
    header = encode_header(layout_order(model), DEFAULT_METADATA)
    with open(folder / MODEL_FILE, "wb") as handle:
        handle.write(header)
        handle.truncate(len(header) + sum(spec.nbytes for spec in model))
    config.save_pretrained(folder)
    return folder


# -- entry points and help ---------------------------------------------------------------------


def test_console_script_and_module_report_the_same_version() -> None:
    script = bv("--version")
    module = subprocess.run(
        [sys.executable, "-m", "bagelverify", "--version"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert script.returncode == module.returncode == 0
    assert script.stdout == module.stdout
    assert script.stdout.startswith("bagelverify ")


def test_help_of_every_command_shows_its_example() -> None:
    parser = cli.build_parser()
    actions = [a for a in parser._actions if a.dest == "command"]
    commands = actions[0].choices  # type: ignore[union-attr]
    assert set(commands) >= {"inspect", "convert", "demo"}
    for name, sub in commands.items():  # type: ignore[union-attr]
        text = sub.format_help()
        assert "example:\n  bagelverify " + name in text, name


# -- inspect -----------------------------------------------------------------------------------


def test_inspect_clean_checkpoint_prints_plain_tables_when_piped(
    synthetic_checkpoint: SyntheticCheckpoint,
) -> None:
    result = bv("inspect", synthetic_checkpoint.path, "--stage", "1")
    assert result.returncode == 0, result.stderr
    assert ANSI not in result.stdout and ANSI not in result.stderr
    assert not any(char in result.stdout for char in "┏━│")  # no box drawing either
    lines = result.stdout.splitlines()
    rows = {line.split()[0]: line.split() for line in lines if line.startswith("  und")}
    rows |= {line.split()[0]: line.split() for line in lines if line.startswith("  gen")}
    assert rows["und"][1] == "821" and rows["und"][-1] == "kept"
    assert rows["gen"][1] == "402" and rows["gen"][-1] == "dropped"
    assert "clean for stage1: a strict load reads 821 tensors" in result.stdout


def test_inspect_json_matches_the_documented_schema(
    synthetic_checkpoint: SyntheticCheckpoint,
) -> None:
    result = bv("inspect", synthetic_checkpoint.path, "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert_schema(document, INSPECT_SCHEMA)
    assert_schema(document["report"], REPORT_SCHEMA)
    report = document["report"]
    assert document["schema_version"] == 1 and document["clean"] is True
    assert document["stage"] == report["stage"] == "stage2"  # the default stage
    assert report["tensors"] == report["kept"] == 1223
    assert report["buckets"]["und"]["count"] == 821 and report["buckets"]["gen"]["count"] == 402
    assert report["stage2_bytes"] == synthetic_checkpoint.model_bytes
    assert document["vae_file"]["tensors"] == 244
    assert document["files"][0]["bytes"] == (synthetic_checkpoint.path / MODEL_FILE).stat().st_size


def test_inspect_unclean_checkpoint_exits_1_and_shows_every_finding(
    unclean: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = bv("inspect", unclean, "--stage", "2")
    assert text.returncode == 1, text.stderr
    out = text.stdout
    assert "vit_model.vision_model.encoder.layers.0.mlp.fc3.weight" in out  # unknown
    assert "Missing expected keys (1 in 1 families)\n  q_proj: 1 key missing (layers 3)" in out
    assert (
        "language_model.model.layers.3.self_attn.q_proj_moe_gen.weight  "
        "(needs language_model.model.layers.3.self_attn.q_proj.weight)" in out
    )
    assert "layers.0.mlp.up_proj.weight: expected [" in out and "found [3, 3]" in out
    assert "(dropped on load) (1)\n  encoder.conv_in.weight" in out
    assert "NOT clean for stage2: a strict load raises UnknownKeysError, MissingKeysError" in out

    assert cli.main(["inspect", str(unclean), "--stage", "2", "--json"]) == 1
    document = json.loads(capsys.readouterr().out)
    assert_schema(document, INSPECT_SCHEMA)
    assert document["clean"] is False and document["exit_code"] == 1
    assert [p["error"] for p in document["problems"]] == [
        "UnknownKeysError",
        "MissingKeysError",
        "ShapeMismatchError",
    ]
    report = document["report"]
    assert report["unknown"] == ["vit_model.vision_model.encoder.layers.0.mlp.fc3.weight"]
    assert report["missing"] == {"q_proj": 1}
    assert report["vae_keys_in_model_file"] == 1
    assert report["shape_mismatches"][0]["found"] == [3, 3]


def test_every_finding_is_counted_alike_in_text_and_json(unclean: Path) -> None:
    """Invariant: each finding of the findings table has its field in the JSON report, with the
    count the Checks table shows, and the text lists exactly as many lines as it counts."""
    from bagelverify.commands.findings import FINDINGS

    report = inspect_command.inspect_path(unclean, stage=2).report
    document = report.as_dict()
    found = []
    for finding in FINDINGS:
        value = document[finding.json_key]
        counted = sum(value.values()) if isinstance(value, dict) else value
        counted = counted if isinstance(counted, int) else len(counted)
        assert finding.count(report) == counted, finding.label
        if finding.heading_count is None:
            assert len(finding.lines(report)) == counted, finding.label
        found += [finding.json_key] * bool(counted)
    assert found == [
        "unknown",
        "missing",
        "twin_violations",
        "shape_mismatches",
        "vae_keys_in_model_file",
    ]


def test_inspect_reads_headers_only_so_a_29_gb_file_is_instant(full_size_sparse: Path) -> None:
    """The real BAGEL header over 29 GB of never-written data: inspect reports the true sizes
    (in a subprocess), and in-process it succeeds even when every data-reading call raises."""
    result = bv("inspect", full_size_sparse, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)["report"]
    assert report["tensors"] == 1223
    assert 29.0e9 < report["stage2_bytes"] < 29.5e9
    assert 0.54 < report["stage1_bytes"] / report["stage2_bytes"] < 0.56


def test_inspect_headers_only_never_calls_a_data_reader(
    full_size_sparse: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import mmap

    import bagelverify.engine as engine
    import bagelverify.safetensors_io as io

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("inspect read tensor data")

    monkeypatch.setattr(os, "preadv", forbidden)
    monkeypatch.setattr(mmap, "mmap", forbidden)
    monkeypatch.setattr(io, "read_into", forbidden)
    monkeypatch.setattr(engine, "run", forbidden)
    assert cli.main(["inspect", str(full_size_sparse), "--headers-only"]) == 0
    out = capsys.readouterr().out
    assert "clean for stage2: a strict load reads 1,223 tensors (29.2 GB)" in out
    assert "Position tables" not in out


def test_inspect_reads_the_two_position_tables_and_no_other_byte(
    full_size_sparse: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --headers-only the only data read are the two tables' byte ranges; the sparse
    file's all-zero tables differ from the regenerated ones, which warns but exits 0."""
    read: list[tuple[int, int]] = []
    preadv = os.preadv

    def recording(fd: int, buffers: list[memoryview], offset: int) -> int:
        got = preadv(fd, buffers, offset)
        read.append((offset, offset + got))
        return got

    monkeypatch.setattr(os, "preadv", recording)
    assert cli.main(["inspect", str(full_size_sparse)]) == 0
    out = capsys.readouterr().out
    infos = read_header(full_size_sparse / MODEL_FILE).tensors
    tables = [infos[key] for key in ("vit_pos_embed.pos_embed", "latent_pos_embed.pos_embed")]
    assert read, "inspect read no table"
    for begin, end in read:
        assert any(t.start <= begin and end <= t.end for t in tables), (begin, end)
    assert sum(end - begin for begin, end in read) == sum(t.nbytes for t in tables)
    assert "vit_pos_embed.pos_embed: differs from the regenerated table by up to" in out
    assert "latent_pos_embed.pos_embed: differs from the regenerated table by up to" in out
    assert "clean for stage2" in out


def test_inspect_accepts_a_single_safetensors_file(
    synthetic_checkpoint: SyntheticCheckpoint, capsys: pytest.CaptureFixture[str]
) -> None:
    inspection = inspect_command.inspect_path(synthetic_checkpoint.path / MODEL_FILE, stage=1)
    assert inspection.exit_code == 0
    assert inspection.config_source == str(synthetic_checkpoint.path)
    assert inspection.vae_file is not None  # the folder's ae.safetensors is still summarised


def test_shown_keys_cannot_hide_control_codes_or_lookalike_digits() -> None:
    assert inspect_command.shown_key("a.b.weight") == "a.b.weight"
    assert inspect_command.shown_key("layers.\u0663.x") == "'layers.\\u0663.x'"
    assert "\x1b" not in inspect_command.shown_key("x\x1b[31m")
    assert "\n" not in inspect_command.shown_key("x\n")


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "needle", "code"),
    [
        (["inspect", "{tmp}/missing"], "{tmp}/missing does not exist", 2),
        (["inspect", "{tmp}", "--stage", "3"], "unknown stage '3'", 2),
        (["inspect", "{tmp}/corrupt/ema.safetensors"], "header length", 1),
        (["convert", "{tmp}", "{tmp}/out", "--stage", "stage3"], "unknown stage 'stage3'", 2),
    ],
    ids=["missing-path", "bad-stage", "corrupt-file", "convert-bad-stage"],
)
def test_errors_are_one_line_with_their_exit_code(
    tmp_path: Path, args: list[str], needle: str, code: int
) -> None:
    """A usage error exits 2, a bad checkpoint 1 (the codes a script tells apart)."""
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / MODEL_FILE).write_bytes(b"\xff" * 8 + b"{}")
    result = bv(*(arg.format(tmp=tmp_path) for arg in args))
    line = assert_one_line_error(result, args[0], code)
    assert needle.format(tmp=tmp_path) in line


def test_debug_adds_the_traceback_and_keeps_the_exit_code(tmp_path: Path) -> None:
    (tmp_path / MODEL_FILE).write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{}")
    result = bv("--debug", "inspect", tmp_path)
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "CorruptCheckpointError" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("bagelverify inspect: error: ")


def test_terminal_output_uses_rich_tables(synthetic_checkpoint: SyntheticCheckpoint) -> None:
    """On a pseudo-terminal the same command draws rich tables with colour."""
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [*_script(), "inspect", str(synthetic_checkpoint.path)],
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
    assert process.wait(timeout=TIMEOUT) == 0
    output = b"".join(chunks).decode()
    assert "┏" in output and ANSI in output
    assert "clean for stage2" in output


# -- convert -----------------------------------------------------------------------------------


def test_convert_round_trip_hf_native_hf_is_bit_identical(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    source = synthetic_checkpoint.path
    native, back = tmp_path / "native", tmp_path / "back"
    first = bv("convert", source, native, "--stage", "2", "--to", "native")
    assert first.returncode == 0, first.stderr
    assert ANSI not in first.stdout + first.stderr  # no progress bar when piped
    assert "wrote 1,223 tensors" in first.stdout
    keys = read_header(native / MODEL_FILE).tensors
    assert len(keys) == 1223 and all(key.startswith("model.") for key in keys)
    second = bv("convert", native, back, "--stage", "2", "--quiet")
    assert second.returncode == 0 and second.stdout == "" and second.stderr == ""
    assert (back / MODEL_FILE).read_bytes() == (source / MODEL_FILE).read_bytes()
    for name in ("config.json", "llm_config.json", "vit_config.json"):
        assert (back / name).read_bytes() == (source / name).read_bytes()
    no_partial_folders(tmp_path)


def test_convert_stage1_sharded_loads_like_the_source(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    target = tmp_path / "stage1"
    result = bv(
        "convert",
        synthetic_checkpoint.path,
        target,
        "--stage",
        "1",
        "--max-shard-size",
        "1MB",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["schema_version"] == 1 and document["command"] == "convert"
    assert document["tensors"] == 821 and document["to"] == "hf"
    assert len([f for f in document["files"] if "-of-" in f["path"]]) > 1
    assert (target / "model.safetensors.index.json").is_file()
    assert not (target / MODEL_FILE).exists()
    original = load_bagel_checkpoint_state_dict(synthetic_checkpoint.path, stage=1)
    converted = load_bagel_checkpoint_state_dict(target, stage=1)
    assert original.keys() == converted.keys()
    assert all(torch.equal(original[key], converted[key]) for key in original)


def test_convert_refuses_to_overwrite_a_checkpoint_unless_forced(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    target = tmp_path / "dst"
    target.mkdir()
    (target / MODEL_FILE).write_bytes(b"precious")
    (target / "notes.txt").write_text("mine")
    refused = bv("convert", synthetic_checkpoint.path, target, "--stage", "1")
    line = assert_one_line_error(refused, "convert")  # FileExistsError: a usage error, 2
    assert "already holds a checkpoint" in line and "--force" in line
    assert (target / MODEL_FILE).read_bytes() == b"precious"
    assert (
        cli.main(
            [
                "convert",
                str(synthetic_checkpoint.path),
                str(target),
                "-q",
                "--stage",
                "1",
                "--force",
            ]
        )
        == 0
    )
    assert len(read_header(target / MODEL_FILE).tensors) == 821
    assert (target / "notes.txt").read_text() == "mine"  # only checkpoint files are replaced
    no_partial_folders(tmp_path)


def test_force_replaces_a_sharded_checkpoint_without_leaving_stale_shards(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    source, target = str(synthetic_checkpoint.path), tmp_path / "dst"
    argv = ["convert", source, str(target), "-q", "--stage", "1"]
    assert cli.main([*argv, "--max-shard-size", "1MB"]) == 0
    assert cli.main([*argv, "--force"]) == 0
    assert sorted(p.name for p in target.iterdir()) == [
        "ae.safetensors",  # carried from the source (issue 15, item 10)
        "config.json",
        "ema.safetensors",
        "llm_config.json",
        "vit_config.json",
    ]


def test_convert_holds_one_tensor_at_a_time(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Streaming invariant: when a tensor is read, every tensor read before it has been freed
    (so peak memory is about the largest tensor; benchmarks/bench_convert.py measures it)."""
    import weakref

    import bagelverify.checkpoint as checkpoint
    from bagelverify.checkpoint import load

    alive: list[weakref.ref[torch.Tensor]] = []
    real_fill = load.fill

    def fill(jobs: Any, destinations: dict[str, torch.Tensor]) -> None:
        assert [ref() for ref in alive if ref() is not None] == []
        real_fill(jobs, destinations)
        alive.extend(weakref.ref(tensor) for tensor in destinations.values())

    monkeypatch.setattr(load, "fill", fill)
    seen: list[int] = []
    checkpoint.convert_checkpoint(
        synthetic_checkpoint.path, tmp_path / "out", stage=1, on_tensor=lambda _, n: seen.append(n)
    )
    assert len(seen) == len(alive) == 821
    assert sum(seen) == sum(
        i.nbytes for i in read_header(tmp_path / "out" / MODEL_FILE).tensors.values()
    )


def test_convert_of_an_unclean_checkpoint_writes_nothing(unclean: Path, tmp_path: Path) -> None:
    result = bv("convert", unclean, tmp_path / "out", "--stage", "2")
    line = assert_one_line_error(result, "convert", 1)  # a bad checkpoint: 1
    assert "is not clean for stage2 (UnknownKeysError, MissingKeysError" in line
    assert not (tmp_path / "out").exists()
    no_partial_folders(tmp_path)


def test_convert_to_dcp_and_back_is_bit_identical(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    dcp, back = tmp_path / "dcp", tmp_path / "back"
    there = bv("convert", synthetic_checkpoint.path, dcp, "--stage", "2", "--to", "dcp")
    assert there.returncode == 0, there.stderr
    assert (dcp / ".metadata").is_file()
    assert cli.main(["convert", str(dcp), str(back), "--stage", "2", "--from", "dcp", "-q"]) == 0
    assert (back / MODEL_FILE).read_bytes() == (synthetic_checkpoint.path / MODEL_FILE).read_bytes()
    no_partial_folders(tmp_path)


# -- demo --------------------------------------------------------------------------------------


def test_demo_json_runs_every_step_and_removes_its_folder(tmp_path: Path) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    result = bv("demo", "--scale", "64", "--json", env=_env(TMPDIR=str(scratch)))
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["schema_version"] == 1 and document["ok"] is True
    assert [step["name"] for step in document["steps"]] == [
        "build checkpoint",
        "inspect (stage 2)",
        "stage-1 load",
        "stage-2 load",
        "save round trip",
        "convert round trip",
        "pattern proofs",
    ]
    assert all(step["ok"] for step in document["steps"])
    assert "bit-identical" in document["steps"][4]["detail"]
    assert document["inspect"]["clean"] is True
    assert list(scratch.iterdir()) == []


def test_demo_keep_leaves_the_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["demo", "--scale", "64", "--keep", str(tmp_path / "kept")]) == 0
    out = capsys.readouterr().out
    assert "7 of 7 claims held" in out and f"kept in {tmp_path / 'kept'}" in out
    assert "ok   save round trip" in out and "bit-identical" in out
    assert (tmp_path / "kept" / "bagel" / MODEL_FILE).is_file()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_demo_interrupted_removes_its_folder(tmp_path: Path, signum: int) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    process = subprocess.Popen(
        [*_script(), "demo", "--scale", "8"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(TMPDIR=str(scratch)),
    )
    deadline = time.monotonic() + TIMEOUT
    while not list(scratch.glob("bagelverify-demo-*/bagel")) and process.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "bagelverify: interrupted"
    assert list(scratch.iterdir()) == []


# -- the documented JSON schema (docs/json.md) -----------------------------------------------

INSPECT_SCHEMA: dict[str, Any] = {
    "schema_version": int,
    "command": str,
    "ok": bool,
    "seconds": (int, float),
    "format": str,  # "safetensors" or "dcp" (issue 15, item 10)
    "stage": str,
    "clean": bool,
    "exit_code": int,
    "problems": list,
    "config_source": (str, type(None)),
    "files": list,
    "vae_file": (dict, type(None)),
    "weight_files": list,
    "position_tables": (list, type(None)),
    "report": dict,
}
REPORT_SCHEMA: dict[str, Any] = {
    "source": str,
    "weights": (str, type(None)),
    "stage": str,
    "config": (dict, type(None)),
    "tensors": int,
    "buckets": dict,
    "stage1_bytes": int,
    "stage2_bytes": int,
    "kept": int,
    "unknown": list,
    "collisions": list,
    "twin_violations": list,
    "missing": dict,
    "missing_summary": list,
    "shape_mismatches": list,
    "beyond_config": list,
    "conv_patch_embedding": (str, type(None)),
    "vae_keys_in_model_file": int,
    "expected_from": (str, type(None)),
    "quantized": list,
    "vae_file_holds_model": (str, type(None)),
}


def assert_schema(document: dict[str, Any], schema: dict[str, Any]) -> None:
    """Exactly the schema's fields, each of its type (so the README cannot drift silently)."""
    assert set(document) == set(schema), set(document) ^ set(schema)
    for name, kind in schema.items():
        assert isinstance(document[name], kind), (name, document[name])
        assert not isinstance(document[name], bool) or kind is bool, name


def test_listing_commands_and_running_verify_never_import_torch() -> None:
    code = (
        "import sys; from bagelverify.cli import main\n"
        "for argv in (['--version'], ['--help'], ['verify', '--help']):\n"
        "    try: main(argv)\n"
        "    except SystemExit: pass\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    assert done.returncode == 0, done.stderr
