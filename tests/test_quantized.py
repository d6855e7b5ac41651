"""Hostile bases and quantized files: FP8 exports, bases of another dtype, swapped model/VAE
files, through the loaders, ``inspect``, ``repair`` and ``convert --dtype``."""

from __future__ import annotations

import itertools
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bagelverify import (
    cli,
    inspect_checkpoint,
    load_bagel_checkpoint_state_dict,
    load_bagel_vae_state_dict,
    load_into,
    make_synthetic_checkpoint,
)
from bagelverify.commands.inspect import inspect_path
from bagelverify.diff import diff_checkpoints
from bagelverify.errors import (
    LossyCastError,
    MissingKeysError,
    QuantizedCheckpointError,
    UnknownKeysError,
)
from bagelverify.manifest import MODEL_FILE, VAE_FILE, load_manifest
from bagelverify.quantized import find_quantization, is_quantization_key
from bagelverify.repair import repair_checkpoint
from bagelverify.rewrite import parse_dtype, rewrite_checkpoint
from bagelverify.safetensors_io import DTYPES, lossless_cast, read_header, save_tensors
from bagelverify.synthetic import SyntheticCheckpoint

VIT_KEY = "vit_model.vision_model.encoder.layers.0.mlp.fc1.weight"


def _folder(synthetic: SyntheticCheckpoint, folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True)
    save_tensors(folder / MODEL_FILE, tensors)
    synthetic.config.save_pretrained(folder)
    return folder


def _fp8_export(synthetic: SyntheticCheckpoint, folder: Path, scale: str | None) -> Path:
    """The synthetic checkpoint with every 2-D ``vit_model`` weight stored as F8_E4M3 codes,
    each with a per-tensor F32 ``scale`` tensor beside it (none when ``scale`` is None)."""
    out = {}
    for key, tensor in load_file(synthetic.path / MODEL_FILE).items():
        if key.startswith("vit_model.") and key.endswith(".weight") and tensor.dim() == 2:
            out[key] = tensor.to(torch.float8_e4m3fn)
            if scale is not None:
                out[key.removesuffix("weight") + scale] = torch.ones(())
        else:
            out[key] = tensor
    return _folder(synthetic, folder, out)


def _lacking_vit(synthetic: SyntheticCheckpoint, folder: Path, dtype: torch.dtype) -> Path:
    tensors = load_file(synthetic.path / MODEL_FILE)
    kept = {k: v.to(dtype) for k, v in tensors.items() if not k.startswith("vit_model.")}
    return _folder(synthetic, folder, kept)


@pytest.fixture(scope="module")
def fp8_export(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    return _fp8_export(synthetic_checkpoint, tmp_path_factory.mktemp("q") / "fp8", "weight_scale")


# -- recognition -------------------------------------------------------------------------------


def test_an_fp8_export_is_named_as_quantized_by_inspect_and_every_loader(
    fp8_export: Path,
) -> None:
    """Before: 158 'keys of no BAGEL key family ... pass strict=False', which then returned
    the raw FP8 codes without their scales."""
    problems = inspect_checkpoint(fp8_export, stage=2).problems()
    assert [type(p) for p in problems] == [QuantizedCheckpointError]  # no generic unknown keys
    message = str(problems[0])
    assert message.startswith(f"{fp8_export / MODEL_FILE}: a quantized checkpoint: 158 tensors")
    first = problems[0].keys[0]  # type: ignore[attr-defined]
    for needle in ("F8_E4M3 158", "weight_scale 158", first, "BF16, F16 and F32", "Dequantize"):
        assert needle in message, needle
    assert VIT_KEY in problems[0].keys  # type: ignore[attr-defined]
    assert "strict=False" not in message
    for strict in (True, False):  # strict=False must not hand out codes as weights either
        with pytest.raises(QuantizedCheckpointError, match="a quantized checkpoint"):
            load_bagel_checkpoint_state_dict(fp8_export, stage=1, strict=strict)
    document = inspect_path(fp8_export).as_dict()
    assert document["problems"][0]["error"] == "QuantizedCheckpointError"
    assert len(document["report"]["quantized"]) == 316


@pytest.mark.parametrize(
    ("keys", "found"),
    [
        ({"a.weight": "F8_E4M3", "a.weight_scale_inv": "F32"}, 2),  # block-scaled FP8
        ({"a.weight": "F8_E5M2", "a.input_scale": "F32", "a.k_scale": "F32"}, 3),
        ({"a.weight": "I8", "a.weight_scale": "BF16", "a.weight_zero_point": "I8"}, 2),
        ({"a.weight": "F8_E4M3", "a.scale_weight": "F32", "scaled_fp8": "F8_E4M3"}, 3),
        ({"a.weight": "U8", "a.weight.absmax": "F32", "a.weight.quant_map": "F32"}, 2),
        ({"a.weight": "BF16", "a.bias": "BF16"}, 0),
    ],
)
def test_the_names_quantized_exports_use_are_recognised(keys: dict[str, str], found: int) -> None:
    quantization = find_quantization(keys)
    assert (0 if quantization is None else len(quantization.keys)) == found


def test_no_bagel_key_is_taken_for_a_quantization_tensor() -> None:
    assert not [k for keys in load_manifest().values() for k in keys if is_quantization_key(k)]


# -- convert --dtype ----------------------------------------------------------------------------


def test_convert_dtype_of_an_fp8_export_names_the_file_and_keys(
    fp8_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: the generic unknown-keys line, naming no file; without scales, torch's
    'Promotion for Float8 Types is not supported'."""
    out = tmp_path / "out"
    code = cli.main(["convert", str(fp8_export), str(out), "--stage", "2", "--dtype", "f32"])
    error = capsys.readouterr().err
    assert code == 1 and not out.exists()  # a problem found in the checkpoint
    assert f"{fp8_export / MODEL_FILE}: a quantized checkpoint" in error
    assert ".weight'" in error and ".weight_scale'" in error and "Promotion" not in error


def test_plain_fp8_casts_are_widened_exactly_by_load_into_and_convert_dtype(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    """FP8 without any scale tensor is plain FP8 values, not a quantized checkpoint. Before:
    torch's 'Promotion for Float8 Types is not supported' from both, naming no key or file."""
    plain = _fp8_export(synthetic_checkpoint, tmp_path / "plain", None)
    assert inspect_checkpoint(plain, stage=2).problems() == []
    codes = load_file(plain / MODEL_FILE)
    model = {"model." + k: torch.zeros(v.shape, dtype=torch.bfloat16) for k, v in codes.items()}
    load_into(model, plain, stage=2)  # the default cast="lossless": FP8 -> BF16 is exact
    assert all(torch.equal(model["model." + k], v.bfloat16()) for k, v in codes.items())
    rewrite_checkpoint(plain, tmp_path / "f32", dtype="f32")
    widened = load_file(tmp_path / "f32" / MODEL_FILE)
    assert {t.dtype for t in widened.values()} == {torch.float32}
    assert all(torch.equal(widened[k], v.float()) for k, v in codes.items())
    assert not diff_checkpoints(plain, tmp_path / "f32").differing_keys  # equal by value
    src = _lacking_vit(synthetic_checkpoint, tmp_path / "src", torch.bfloat16)
    repair_checkpoint(src, base=plain, out=tmp_path / "repaired")  # a plain FP8 base widens
    repaired = load_file(tmp_path / "repaired" / MODEL_FILE)
    assert {t.dtype for t in repaired.values()} == {torch.bfloat16}
    assert torch.equal(repaired[VIT_KEY], codes[VIT_KEY].bfloat16())


def test_diff_warns_that_a_quantized_side_is_compared_as_stored(
    synthetic_checkpoint: SyntheticCheckpoint, fp8_export: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="bagelverify.diff"):
        diff = diff_checkpoints(synthetic_checkpoint.path, fp8_export)
    assert len(diff.only_in_b) == 158 and len(diff.header_changes) == 158
    assert f"{fp8_export / MODEL_FILE}: 158 tensors stored as FP8" in caplog.text
    assert "compared as stored" in caplog.text


def test_fp8_is_not_a_cast_target() -> None:
    for name in ("F8_E4M3", "float8_e5m2"):
        with pytest.raises(ValueError, match="dtype must be bf16, f16 or f32"):
            parse_dtype(name)


def test_the_lossless_rule_widens_fp8_and_keeps_torch_promotion_elsewhere() -> None:
    floats = [d.torch_dtype for d in DTYPES.values() if d.torch_dtype.is_floating_point]
    fp8 = {torch.float8_e4m3fn, torch.float8_e5m2}
    for a, b in itertools.product(floats, floats):
        if a not in fp8 and b not in fp8:
            assert lossless_cast(a, b) == (a == b or torch.promote_types(a, b) == b), (a, b)
    codes = torch.arange(256, dtype=torch.uint8)
    for source, target in itertools.product(fp8, (torch.bfloat16, torch.float16, torch.float32)):
        assert lossless_cast(source, target) and not lossless_cast(target, source)
        values = codes.view(source)
        back = values.to(target).to(source)
        finite = ~values.float().isnan()
        assert torch.equal(back.view(torch.uint8)[finite], codes[finite]), (source, target)


# -- repair ------------------------------------------------------------------------------------


def test_repair_refuses_an_fp8_base_naming_the_base_and_keys(
    synthetic_checkpoint: SyntheticCheckpoint, fp8_export: Path, tmp_path: Path
) -> None:
    """Before: exit 0, with 158 vision weights copied as raw FP8 codes without their scales."""
    src = _lacking_vit(synthetic_checkpoint, tmp_path / "src", torch.bfloat16)
    with pytest.raises(QuantizedCheckpointError) as caught:
        repair_checkpoint(src, base=fp8_export, out=tmp_path / "out")
    message = str(caught.value)
    assert message.startswith(f"{fp8_export / MODEL_FILE}: the base is quantized")
    assert caught.value.keys[0] in message and "nothing was written" in message
    assert VIT_KEY in caught.value.keys and VIT_KEY + "_scale" in caught.value.keys
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def f32_base(tmp_path_factory: pytest.TempPathFactory) -> SyntheticCheckpoint:
    return make_synthetic_checkpoint(tmp_path_factory.mktemp("f32"), scale=64, dtype="F32")


def test_repair_from_an_f32_base_writes_one_dtype_that_load_into_takes(
    synthetic_checkpoint: SyntheticCheckpoint, f32_base: SyntheticCheckpoint, tmp_path: Path
) -> None:
    """Before: a mixed BF16/F32 checkpoint that load_into's default cast refused."""
    src = _lacking_vit(synthetic_checkpoint, tmp_path / "src", torch.bfloat16)
    with pytest.raises(LossyCastError) as refused:
        repair_checkpoint(src, base=f32_base.path, out=tmp_path / "refused")
    assert str(refused.value).startswith(f"{f32_base.path / MODEL_FILE}: 421 tensors to fill")
    assert "F32 421" in str(refused.value) and "--allow-lossy" in str(refused.value)
    assert not (tmp_path / "refused").exists()

    out = tmp_path / "out"
    report = repair_checkpoint(src, base=f32_base.path, out=out, allow_lossy=True)
    assert report.dtype == "BF16" and len(report.cast) == len(report.narrowed) == 421
    header = read_header(out / MODEL_FILE)
    assert {info.dtype for info in header.tensors.values()} == {"BF16"}
    model = {
        "model." + k: torch.zeros(info.shape, dtype=torch.bfloat16)
        for k, info in header.tensors.items()
    }
    load_into(model, out, stage=2)  # the default cast="lossless"
    base = load_file(f32_base.path / MODEL_FILE)
    assert torch.equal(model["model." + VIT_KEY], base[VIT_KEY].bfloat16())


def test_repair_widens_a_bf16_base_for_an_f32_source_without_asking(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    src = _lacking_vit(synthetic_checkpoint, tmp_path / "src", torch.float32)
    report = repair_checkpoint(src, base=synthetic_checkpoint.path, out=tmp_path / "out")
    assert report.dtype == "F32" and len(report.cast) == 421 and not report.narrowed
    repaired = load_file(tmp_path / "out" / MODEL_FILE)
    assert {t.dtype for t in repaired.values()} == {torch.float32}
    base = load_file(synthetic_checkpoint.path / MODEL_FILE)
    assert torch.equal(repaired[VIT_KEY], base[VIT_KEY].float())


# -- swapped files -----------------------------------------------------------------------------


def test_swapped_model_and_vae_files_are_named_as_such(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    """Before: 1,223 missing keys listed by family, and the advice to pass strict=False."""
    folder = tmp_path / "swapped"
    shutil.copytree(synthetic_checkpoint.path, folder)
    (folder / MODEL_FILE).rename(folder / "tmp")
    (folder / VAE_FILE).rename(folder / MODEL_FILE)
    (folder / "tmp").rename(folder / VAE_FILE)
    with pytest.raises(MissingKeysError) as caught:
        load_bagel_checkpoint_state_dict(folder, stage=2)
    message = str(caught.value)
    assert message.startswith(f"{folder / MODEL_FILE} holds the VAE (244 VAE keys")
    assert f"{folder / VAE_FILE} holds the model's keys: the two files are swapped" in message
    assert "mv ema.safetensors ema.safetensors.tmp" in message and "strict=False" not in message
    problems = inspect_path(folder).problems
    assert [str(p) for p in problems] == [message]
    with pytest.raises(UnknownKeysError, match="the two files are swapped"):
        load_bagel_vae_state_dict(folder)
    (folder / VAE_FILE).unlink()  # a VAE copy in place of the model, no evidence of a swap
    with pytest.raises(MissingKeysError, match=r"it is a copy of ae\.safetensors"):
        load_bagel_checkpoint_state_dict(folder)
