"""Issue 32: one rule for defaults, the CLI agreeing with the API, stage spellings on the
command line. The rule (docs/defaults.md): functions that hand tensors to a model default to
stage 1 (as Automodel's adapter); everything that checks or writes a checkpoint defaults to
``stage=None``, the stage its input holds."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch

import bagelverify as bv
from bagelverify import cli
from bagelverify.checkpoint import open_weights
from bagelverify.synthetic import SyntheticCheckpoint

READERS = ("load_bagel_checkpoint_state_dict", "load_into", "load_bagel_checkpoint_distributed")
CHECKERS_AND_WRITERS = (
    "inspect_checkpoint",
    "save_bagel_checkpoint",
    "convert_checkpoint",
    "hf_to_dcp",
    "dcp_to_hf",
    "merge_adapter",
)


def test_every_function_follows_the_defaults_rule() -> None:
    """Readers default to stage 1, checkers and writers to None (the input's stage)."""
    for name in READERS:
        assert inspect.signature(getattr(bv, name)).parameters["stage"].default == "stage1"
    assert bv.BagelStateDictAdapter().stage == "stage1"
    from bagelverify.repair import repair_checkpoint
    from bagelverify.rewrite import rewrite_checkpoint

    for function in (*(getattr(bv, n) for n in CHECKERS_AND_WRITERS), repair_checkpoint):
        assert inspect.signature(function).parameters["stage"].default is None, function
    assert inspect.signature(rewrite_checkpoint).parameters["stage"].default is None


@pytest.fixture(scope="module")
def stage1_folder(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    out = tmp_path_factory.mktemp("s1") / "s1"
    bv.convert_checkpoint(synthetic_checkpoint.path, out, stage="stage1")
    return out


def _cli_json(capsys: pytest.CaptureFixture[str], *words: str) -> dict[str, object]:
    code = cli.main([*words, "--json"])
    document = json.loads(capsys.readouterr().out)
    assert isinstance(document, dict)
    assert code == 0
    return document


def test_cli_inspect_and_inspect_checkpoint_agree_on_the_default_stage(
    synthetic_checkpoint: SyntheticCheckpoint,
    stage1_folder: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Before: the CLI checked stage 2 and the API stage 1 for the same folder."""
    for folder, held in ((synthetic_checkpoint.path, "stage2"), (stage1_folder, "stage1")):
        document = _cli_json(capsys, "inspect", str(folder))
        report = document["report"]
        assert isinstance(report, dict)
        assert report["stage"] == bv.inspect_checkpoint(folder).stage == held


def test_save_writes_what_its_input_holds(stage1_folder: Path, tmp_path: Path) -> None:
    """Before: the default stage 2 refused a stage-1 state dict (MissingKeysError)."""
    state = bv.load_bagel_checkpoint_state_dict(stage1_folder)
    bv.save_bagel_checkpoint(state, tmp_path / "out")
    with open_weights(tmp_path / "out") as files:
        assert len(files.tensors) == len(state)


def test_cli_convert_without_stage_keeps_what_the_source_holds(
    synthetic_checkpoint: SyntheticCheckpoint,
    stage1_folder: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Before: ``--stage`` was required."""
    for folder, held, count in (
        (synthetic_checkpoint.path, "stage2", 1223),
        (stage1_folder, "stage1", 821),
    ):
        document = _cli_json(capsys, "convert", str(folder), str(tmp_path / held))
        assert (document["stage"], document["tensors"]) == (held, count)


@pytest.mark.parametrize("spelling", ["Stage1", "STAGE1", " stage1 ", "1"])
def test_stage_flag_accepts_what_normalize_stage_accepts(
    stage1_folder: Path, capsys: pytest.CaptureFixture[str], spelling: str
) -> None:
    """Before: ``--stage Stage1`` was refused while ``normalize_stage("Stage1")`` worked."""
    assert bv.normalize_stage(spelling) == "stage1"
    document = _cli_json(capsys, "inspect", str(stage1_folder), "--stage", spelling)
    report = document["report"]
    assert isinstance(report, dict) and report["stage"] == "stage1"


def test_stage_flag_refuses_what_normalize_stage_refuses(
    stage1_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["inspect", str(stage1_folder), "--stage", "stage3"]) == cli.EXIT_USAGE
    assert "unknown stage 'stage3'; expected 1, 2" in capsys.readouterr().err


def test_bad_weights_argument_is_a_bagel_error(synthetic_checkpoint: SyntheticCheckpoint) -> None:
    """Before: a plain ValueError, although bad input raises BagelError."""
    with pytest.raises(bv.ArgumentError, match=r"weights must be 'ema'.*got 'emaa'"):
        bv.inspect_checkpoint(synthetic_checkpoint.path, weights="emaa")  # type: ignore[arg-type]
    with pytest.raises(bv.BagelError):
        bv.load_bagel_checkpoint_state_dict(
            synthetic_checkpoint.path,
            weights="emaa",  # type: ignore[arg-type]
            dtype=torch.float32,
        )


def test_the_top_level_exports_the_documented_api_and_every_name_resolves() -> None:
    """Before: ``bagelverify.diff_checkpoints`` was an AttributeError although the README used
    it, and both ``save_bagel_checkpoint`` and ``write_bagel_checkpoint`` were exported."""
    for name in bv.__all__:
        assert getattr(bv, name) is not None, name
    assert len(set(bv.__all__)) == len(bv.__all__)
    documented = {"diff_checkpoints", "repair_checkpoint", "rewrite_checkpoint", "StageLike"}
    assert documented <= set(bv.__all__)
    # the DESIGN.md / Automodel names stay
    assert {
        "BagelStateDictAdapter",
        "load_bagel_checkpoint_state_dict",
        "classify",
        "partition",
        "Bucket",
        "normalize_stage",
        "UND_PATTERNS",
        "GEN_PATTERNS",
        "VAE_PATTERNS",
    } <= set(bv.__all__)
    assert "write_bagel_checkpoint" not in bv.__all__
    errors = [name for name in bv.__all__ if name.endswith("Error")]
    assert all(issubclass(getattr(bv, name), bv.BagelError) for name in errors)


def test_a_moved_name_still_resolves_with_a_deprecation_warning() -> None:
    from bagelverify.checkpoint import write_bagel_checkpoint

    with pytest.warns(DeprecationWarning, match=r"import it from bagelverify\.checkpoint"):
        assert bv.write_bagel_checkpoint is write_bagel_checkpoint
    with pytest.raises(AttributeError):
        bv.no_such_name  # noqa: B018


def test_dtype_is_spelled_alike_everywhere(synthetic_checkpoint: SyntheticCheckpoint) -> None:
    """Before: the loaders took only a torch.dtype, make_synthetic_checkpoint only "F32" and the
    CLI only "f32"."""
    folder = synthetic_checkpoint.path
    by_name = bv.load_bagel_checkpoint_state_dict(folder, dtype="f32")
    by_torch = bv.load_bagel_checkpoint_state_dict(folder, dtype=torch.float32)
    assert {t.dtype for t in by_name.values()} == {torch.float32}
    assert by_name.keys() == by_torch.keys()
    vae = bv.load_bagel_vae_state_dict(folder, dtype="BF16")
    assert {t.dtype for t in vae.values()} == {torch.bfloat16}
    with pytest.raises(bv.ArgumentError, match="dtype must be bf16, f16 or f32"):
        bv.load_bagel_checkpoint_state_dict(folder, dtype="int8")  # type: ignore[arg-type]
    parser = cli.build_parser("convert")
    assert parser.parse_args(["convert", "a", "b", "--dtype", "F32"]).dtype == "f32"
