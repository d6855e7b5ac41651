"""Verdicts you can trust (issue 27) and exit codes that tell failures apart (issue 26 F): nothing
near-empty passes as clean, every hint names the cause and its remedy, one interrupt path."""

from __future__ import annotations

import errno
import importlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import bagelverify as bv
from bagelverify import cli
from bagelverify.buckets import Bucket
from bagelverify.config import CONFIG_FILES
from bagelverify.errors import CorruptCheckpointError
from bagelverify.manifest import MODEL_FILE
from bagelverify.partition import classify
from bagelverify.safetensors_io import read_header, save_tensors
from bagelverify.synthetic import SyntheticCheckpoint

KEPT = (Bucket.UND, Bucket.GEN)


# -- exit codes and the interrupt path ----------------------------------------------------------


class _Wrapped(BaseException):
    """What a library that wraps every exception (DCP's writer) raises around an interrupt."""


def _raise_from_command(monkeypatch: pytest.MonkeyPatch, error: BaseException) -> None:
    module = importlib.import_module("bagelverify.commands.inspect")

    def run(_: object) -> int:
        raise error

    monkeypatch.setattr(module, "run", run)


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (CorruptCheckpointError("x.safetensors: header length 5 is past the end"), 1),
        (cli.UsageError("PATH x is a file"), 2),
        (FileNotFoundError("checkpoint folder /x does not exist"), 2),
        (OSError(errno.ENOSPC, "No space left on device"), 3),
        (PermissionError(errno.EROFS, "cannot write in /ro"), 3),
        (RuntimeError("an internal error"), 3),
    ],
    ids=["bad-checkpoint", "usage", "missing-path", "disk-full", "read-only", "internal"],
)
def test_each_kind_of_failure_has_its_own_exit_code(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    error: BaseException,
    code: int,
) -> None:
    _raise_from_command(monkeypatch, error)
    assert cli.main(["inspect", "/nowhere"]) == code
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [f"bagelverify inspect: error: {error}"]


def test_an_interrupt_wrapped_by_a_library_is_an_interrupt(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    wrapped = _Wrapped("rank 0 failed")
    wrapped.__context__ = KeyboardInterrupt()
    _raise_from_command(monkeypatch, wrapped)
    assert cli.main(["inspect", "/nowhere"]) == 130
    assert capsys.readouterr().err.splitlines() == ["bagelverify: interrupted"]


def test_ctrl_c_while_the_command_is_still_importing_is_one_line_and_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def slow_import(name: str, package: str | None = None) -> object:
        raise KeyboardInterrupt  # Ctrl-C while `import torch` runs

    monkeypatch.setattr(cli.importlib, "import_module", slow_import)
    assert cli.main(["convert", "a", "b", "--stage", "1"]) == 130
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.splitlines() == ["bagelverify: interrupted"]


def test_usage_errors_exit_2_and_the_help_lists_every_code(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["inspect", "x", "--stage", "3"]) == 2  # returned, no SystemExit (issue 32)
    epilog = cli.build_parser("").epilog or ""
    for words in ("0 clean", "1 problems found in a checkpoint", "2 usage", "130 interrupted"):
        assert words in epilog


# -- nothing near-empty passes as clean ---------------------------------------------------------


def _folder(
    source: SyntheticCheckpoint,
    target: Path,
    tensors: dict[str, torch.Tensor],
    *,
    name: str = MODEL_FILE,
) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for config in CONFIG_FILES:
        shutil.copy(source.path / config, target / config)
    save_tensors(target / name, tensors)
    return target


@pytest.fixture(scope="module")
def tensors(synthetic_checkpoint: SyntheticCheckpoint) -> dict[str, torch.Tensor]:
    """The synthetic checkpoint's model tensors (HF keys), read once."""
    return load_file(synthetic_checkpoint.path / MODEL_FILE)


PREFIXES = [
    ("module.", "DistributedDataParallel"),
    ("_orig_mod.", "torch.compile"),
    ("_fsdp_wrapped_module.", "FSDP"),
    ("_checkpoint_wrapped_module.", "activation checkpointing"),
    ("module._orig_mod.", "DistributedDataParallel / DataParallel, then torch.compile"),
]


@pytest.mark.parametrize(("prefix", "who"), PREFIXES, ids=[p for p, _ in PREFIXES])
def test_a_wrapper_prefix_is_named_with_how_to_strip_it_strict_or_not(
    synthetic_checkpoint: SyntheticCheckpoint,
    tensors: dict[str, torch.Tensor],
    tmp_path: Path,
    prefix: str,
    who: str,
) -> None:
    folder = _folder(
        synthetic_checkpoint, tmp_path / "wrapped", {prefix + k: v for k, v in tensors.items()}
    )
    advice = f"pass strip_prefix={prefix!r} (command line: --strip-prefix {prefix})"
    with pytest.raises(bv.UnknownKeysError) as strict:
        bv.load_bagel_checkpoint_state_dict(folder, stage=2)
    assert f"Every one starts with {prefix!r} (added by {who}" in str(strict.value)
    assert advice in str(strict.value) and "strict=False" not in str(strict.value)
    with pytest.raises(bv.MissingKeysError) as lax:  # strict=False never drops every key
        bv.load_bagel_checkpoint_state_dict(folder, stage=2, strict=False)
    assert "A load of nothing is refused, strict or not" in str(lax.value)
    assert advice in str(lax.value)
    loaded = bv.load_bagel_checkpoint_state_dict(folder, stage=2, strip_prefix=prefix)
    assert loaded.keys() == {"model." + key for key in tensors if classify(key) in KEPT}


def test_the_cli_names_the_prefix_refuses_an_empty_no_strict_convert_and_strips_it(
    synthetic_checkpoint: SyntheticCheckpoint,
    tensors: dict[str, torch.Tensor],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder = _folder(
        synthetic_checkpoint, tmp_path / "ddp", {"module." + k: v for k, v in tensors.items()}
    )
    assert cli.main(["inspect", str(folder), "--headers-only", "--stage", "2"]) == 1
    out = capsys.readouterr().out
    assert "NOT clean for stage2" in out and "--strip-prefix module." in out
    assert cli.main(["inspect", str(folder), "--json", "--headers-only", "--stage", "2"]) == 1
    document = json.loads(capsys.readouterr().out)
    assert document["clean"] is False and document["exit_code"] == 1
    assert "--strip-prefix module." in document["problems"][0]["message"]
    out_dir = tmp_path / "out"
    assert cli.main(["convert", str(folder), str(out_dir), "--stage", "2", "--no-strict"]) == 1
    err = capsys.readouterr().err
    assert "A load of nothing is refused" in err and "--strip-prefix module." in err
    assert not out_dir.exists()
    words = ["convert", str(folder), str(out_dir), "--stage", "2", "--strip-prefix", "module."]
    assert cli.main(words) == 0
    assert "wrote 1,223 tensors" in capsys.readouterr().out
    assert set(read_header(out_dir / MODEL_FILE).tensors) == set(tensors)


def test_an_empty_save_is_refused_and_an_empty_file_is_never_clean(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(bv.MissingKeysError, match=r"holds no tensor at all.*save of nothing"):
        bv.save_bagel_checkpoint({}, tmp_path / "out")
    assert not (tmp_path / "out" / MODEL_FILE).exists()
    (tmp_path / "empty").mkdir()
    save_tensors(tmp_path / "empty" / MODEL_FILE, {})
    assert cli.main(["inspect", str(tmp_path / "empty")]) == 1
    out = capsys.readouterr().out  # issue 32: no GEN key, so the stage it holds is 1
    assert "NOT clean for stage1" in out and "holds no tensor at all" in out
    with pytest.raises(bv.MissingKeysError, match="load of nothing is refused"):
        bv.load_bagel_checkpoint_state_dict(tmp_path / "empty", stage=2, strict=False)


def test_a_stage1_state_dict_saved_as_stage2_without_config_is_refused(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    stage1 = bv.load_bagel_checkpoint_state_dict(synthetic_checkpoint.path, stage=1)
    for strict in (True, False):
        with pytest.raises(bv.MissingKeysError) as info:
            bv.save_bagel_checkpoint(stage1, tmp_path / "out", stage=2, strict=strict)
        message = str(info.value)
        assert "none of the 821 tensors of the state dict is one" in message
        assert "a stage-1 state dict" in message and "Pass stage=1 (--stage 1)" in message
    assert not (tmp_path / "out" / MODEL_FILE).exists()
    written = bv.save_bagel_checkpoint(stage1, tmp_path / "out", stage=1)
    assert [path.name for path in written] == [MODEL_FILE]
    # issue 32: by default a writer writes the stage its input holds
    written = bv.save_bagel_checkpoint(stage1, tmp_path / "default", strict=False)
    assert len(read_header(tmp_path / "default" / MODEL_FILE).tensors) == len(stage1)


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "not-strict"])
def test_load_into_names_hugging_face_layout_destinations(
    synthetic_checkpoint: SyntheticCheckpoint, strict: bool
) -> None:
    native = bv.load_bagel_checkpoint_state_dict(synthetic_checkpoint.path, stage=1)
    hf = {key[len("model.") :]: torch.zeros_like(value) for key, value in native.items()}
    with pytest.raises(bv.MissingKeysError) as info:
        bv.load_into(hf, synthetic_checkpoint.path, strict=strict)
    message = str(info.value)
    assert "821 destination keys are not native keys" in message
    assert "Hugging Face layout keys, without the 'model.' root" in message
    assert "does not keep" not in message and "check the stage" not in message.lower()
    assert all(not value.any() for value in hf.values())


def test_load_into_refuses_loading_nothing_into_unrelated_destinations(
    synthetic_checkpoint: SyntheticCheckpoint,
) -> None:
    with pytest.raises(bv.MissingKeysError, match="Nothing would be loaded, which is refused"):
        bv.load_into({"fc.weight": torch.zeros(2)}, synthetic_checkpoint.path, strict=False)


# -- every hint leads to the fix ----------------------------------------------------------------


def test_a_wrong_destination_shape_names_the_config_not_cast(
    synthetic_checkpoint: SyntheticCheckpoint,
) -> None:
    native = bv.load_bagel_checkpoint_state_dict(synthetic_checkpoint.path, stage=1)
    key = next(iter(native))
    native[key] = torch.zeros(3, 3, dtype=native[key].dtype)
    with pytest.raises(bv.ShapeMismatchError) as info:
        bv.load_into(native, synthetic_checkpoint.path)
    assert "cast=" not in str(info.value)
    assert "Build the model with the checkpoint's config" in str(info.value)
    native = bv.load_bagel_checkpoint_state_dict(synthetic_checkpoint.path, stage=1)
    narrow = {k: v.to(torch.float16) for k, v in native.items()}  # BF16 -> F16: lossy
    with pytest.raises(bv.DestinationError, match="Pass cast='any'") as refused:
        bv.load_into(narrow, synthetic_checkpoint.path)
    assert "config" not in str(refused.value).rsplit("Nothing was read.", 1)[1]


def test_a_lost_vision_tower_names_repair_on_every_surface(
    synthetic_checkpoint: SyntheticCheckpoint,
    tensors: dict[str, torch.Tensor],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder = _folder(
        synthetic_checkpoint,
        tmp_path / "novit",
        {k: v for k, v in tensors.items() if not k.startswith("vit_model.")},
    )
    repair = "bagelverify repair SRC --base BASE -o OUT --stage 1"
    with pytest.raises(bv.MissingKeysError) as info:
        bv.load_bagel_checkpoint_state_dict(folder)
    assert repair in str(info.value)
    assert cli.main(["inspect", str(folder), "--stage", "1", "--headers-only"]) == 1
    assert repair in capsys.readouterr().out
    assert cli.main(["inspect", str(folder), "--stage", "1", "--json", "--headers-only"]) == 1
    assert repair in json.loads(capsys.readouterr().out)["problems"][0]["message"]
    assert cli.main(["convert", str(folder), str(tmp_path / "out"), "--stage", "1"]) == 1
    assert repair in capsys.readouterr().err


def test_a_wrong_config_field_is_diagnosed_in_inspect_text_and_convert(
    synthetic_checkpoint: SyntheticCheckpoint,
    tensors: dict[str, torch.Tensor],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder = _folder(synthetic_checkpoint, tmp_path / "wide", tensors)
    llm = json.loads((folder / "llm_config.json").read_text())
    right = llm["hidden_size"]
    llm["hidden_size"] = right + llm["num_attention_heads"]
    (folder / "llm_config.json").write_text(json.dumps(llm))
    diagnosis = (
        f"llm_config.json hidden_size is {llm['hidden_size']}; the checkpoint's tensors imply "
        f"{right}"
    )
    assert cli.main(["inspect", str(folder), "--headers-only"]) == 1
    out = capsys.readouterr().out
    assert diagnosis in out and "Fix the config field(s) named above" in out
    assert cli.main(["convert", str(folder), str(tmp_path / "out"), "--stage", "2"]) == 1
    err = capsys.readouterr().err
    assert diagnosis in err and "--no-strict" not in err


def test_an_inconsistent_config_names_the_file_and_field(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    folder = tmp_path / "config"
    folder.mkdir()
    for config in CONFIG_FILES:
        shutil.copy(synthetic_checkpoint.path / config, folder / config)
    llm = json.loads((folder / "llm_config.json").read_text())
    llm["hidden_size"] += 1
    (folder / "llm_config.json").write_text(json.dumps(llm))
    with pytest.raises(bv.ConfigError) as info:
        bv.BagelConfig.from_pretrained(folder)
    assert f"llm_config.json hidden_size {llm['hidden_size']} is not a multiple of " in str(
        info.value
    )
    assert "llm_config.json num_attention_heads" in str(info.value)


@pytest.mark.parametrize(
    ("code", "wanted", "unwanted"),
    [
        (errno.EROFS, "read-only: choose another DST on a writable file system", "chmod"),
        (errno.EACCES, "chmod u+w /out", "chattr"),
        (errno.EPERM, "chattr -i /out", "chmod"),
    ],
    ids=["EROFS", "EACCES", "EPERM"],
)
def test_an_unwritable_folder_gets_the_advice_its_errno_allows(
    code: int, wanted: str, unwanted: str
) -> None:
    from bagelverify.commands.arguments import not_writable

    error = not_writable(Path("/out"), OSError(code, os.strerror(code)), "choose another DST")
    assert wanted in str(error) and unwanted not in str(error)


# -- diff names the tensors; the weights file is visible ----------------------------------------


def test_diff_text_names_the_differing_tensors_per_family(
    synthetic_checkpoint: SyntheticCheckpoint,
    tensors: dict[str, torch.Tensor],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fc1 = [k for k in tensors if k.startswith("vit_model.") and ".mlp.fc1.weight" in k]
    changed = {k: (v + 1 if k in fc1 else v) for k, v in tensors.items()}
    folder = _folder(synthetic_checkpoint, tmp_path / "b", changed)
    args = ["diff", str(synthetic_checkpoint.path), str(folder), "--limit", "3"]
    assert cli.main(args) == 1
    out = capsys.readouterr().out
    assert f"  vit.fc1 ({len(fc1)})\n" in out
    for key in fc1[:3]:
        assert f"    {key}\n" in out
    assert fc1[3] not in out and f"... and {len(fc1) - 3} more" in out


def test_inspect_lists_the_weight_files_and_convert_says_what_name_it_writes(
    synthetic_checkpoint: SyntheticCheckpoint,
    tensors: dict[str, torch.Tensor],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder = _folder(synthetic_checkpoint, tmp_path / "run", tensors)
    save_tensors(folder / "model.safetensors", tensors)
    assert cli.main(["inspect", str(folder), "--headers-only"]) == 0
    out = capsys.readouterr().out
    assert "weights: ema.safetensors (the default)" in out
    also = "the folder also holds model.safetensors (not read; --weights model reads model."
    assert also in out
    assert cli.main(["inspect", str(folder), "--json", "--headers-only"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["weight_files"] == [MODEL_FILE, "model.safetensors"]
    words = ["convert", str(folder), str(tmp_path / "out"), "--stage", "1", "--weights", "model"]
    assert cli.main(words) == 0
    out = capsys.readouterr().out
    assert "read model.safetensors (weights='model')" in out
    assert "wrote those weights as ema.safetensors: the one file name BAGEL loaders read" in out


@pytest.mark.parametrize("shards", [None, "1MB"], ids=["one-file", "sharded"])
def test_an_interrupted_library_write_leaves_nothing_behind(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path, shards: str | None
) -> None:
    """Ctrl-C in the middle of convert_checkpoint: the interrupt reaches the caller unchanged,
    and nothing is left: no output folder, no staging folder."""
    seen = []

    def on_tensor(key: str, nbytes: int) -> None:
        seen.append(key)
        if len(seen) == 50:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        bv.convert_checkpoint(
            synthetic_checkpoint.path,
            tmp_path / "out",
            stage=2,
            max_shard_size=shards,
            on_tensor=on_tensor,
        )
    assert len(seen) == 50
    assert os.listdir(tmp_path) == []  # no output folder, no staging folder
