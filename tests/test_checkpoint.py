"""Loading, validating and saving checkpoint folders, on synthetic BAGEL-shaped checkpoints.

Expected values always come from ``safetensors.torch.load_file``, an independent reader.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import given
from hypothesis import strategies as st

import bagelverify as bv
from bagelverify import checkpoint as ckpt
from bagelverify import safetensors_io
from bagelverify.buckets import Bucket
from bagelverify.config import CONFIG_FILES
from bagelverify.errors import (
    CorruptCheckpointError,
    MissingKeysError,
    ShapeMismatchError,
    UnknownKeysError,
)
from bagelverify.families import FAMILIES
from bagelverify.manifest import load_manifest
from bagelverify.partition import classify
from bagelverify.patch_embedding import PATCH_EMBEDDING_WEIGHT, linear_patch_weight_to_conv
from bagelverify.safetensors_io import DTYPES, read_header, save_tensors
from bagelverify.synthetic import SyntheticCheckpoint

EMA = load_manifest()["ema.safetensors"]
UND = [k for k in EMA if classify(k) is Bucket.UND]
GEN = [k for k in EMA if classify(k) is Bucket.GEN]
VIT = [k for k in EMA if k.startswith("vit_model.")]


def reference(folder: Path, name: str = "ema.safetensors") -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(folder / name)


def variant(
    source: SyntheticCheckpoint,
    target: Path,
    change: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
) -> Path:
    """A copy of the synthetic folder whose ema.safetensors is ``change(tensors)``."""
    target.mkdir(parents=True, exist_ok=True)
    for name in CONFIG_FILES:
        shutil.copy(source.path / name, target / name)
    save_tensors(target / "ema.safetensors", change(reference(source.path)))
    return target


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, int, int]]]:
    """Every data read as (file, start, end): all tensor bytes go through os.preadv."""
    log: list[tuple[str, int, int]] = []
    real = os.preadv

    def recording(fd: int, buffers: list[memoryview], offset: int) -> int:
        got = real(fd, buffers, offset)
        log.append((os.readlink(f"/proc/self/fd/{fd}"), offset, offset + got))
        return got

    monkeypatch.setattr(os, "preadv", recording)
    yield log


# -- loading ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("stage", "keys"), [("stage1", UND), (2, UND + GEN)])
def test_load_returns_the_stage_keys_with_the_written_values(
    synthetic_checkpoint: SyntheticCheckpoint, stage: object, keys: list[str]
) -> None:
    expected = reference(synthetic_checkpoint.path)
    loaded = bv.load_bagel_checkpoint_state_dict(synthetic_checkpoint.path, stage=stage)
    assert list(loaded) == ["model." + k for k in EMA if k in keys]  # file order
    for key in keys:
        got = loaded["model." + key]
        assert got.dtype == expected[key].dtype and torch.equal(got, expected[key])


def test_dropped_tensors_bytes_are_never_read(
    synthetic_checkpoint: SyntheticCheckpoint, reads: list[tuple[str, int, int]]
) -> None:
    header = read_header(synthetic_checkpoint.path / "ema.safetensors")
    bv.load_bagel_checkpoint_state_dict(synthetic_checkpoint.path, stage=1)
    path = str(header.path.resolve())
    kept = sorted((header.tensors[k].start, header.tensors[k].end) for k in UND)
    # every kept byte is read exactly once, nothing else (touching tensors share a read)
    read_bytes = sorted(b for p, start, end in reads if p == path for b in range(start, end))
    assert read_bytes == [b for start, end in kept for b in range(start, end)]
    for key in GEN:
        info = header.tensors[key]
        assert not any(start < info.end and info.start < end for _, start, end in reads)


def test_unknown_and_vae_tensors_are_dropped_unread(
    synthetic_checkpoint: SyntheticCheckpoint,
    tmp_path: Path,
    reads: list[tuple[str, int, int]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    vae = reference(synthetic_checkpoint.path, "ae.safetensors")
    folder = variant(
        synthetic_checkpoint,
        tmp_path / "merged",
        lambda sd: {**sd, **vae, "bogus.w": torch.ones(9)},
    )
    with pytest.raises(UnknownKeysError, match=r"'bogus\.w'"):
        bv.load_bagel_checkpoint_state_dict(folder)
    assert reads == []  # validation fails before any data is read
    report = bv.inspect_checkpoint(folder)
    assert report.as_dict()["vae_keys_in_model_file"] == 244
    with caplog.at_level(logging.WARNING, logger="bagelverify"):
        loaded = bv.load_bagel_checkpoint_state_dict(folder, strict=False)
    assert len(loaded) == len(UND) and "dropping 244 VAE keys" in caplog.text
    header = read_header(folder / "ema.safetensors")
    dropped = [header.tensors[k] for k in [*vae, "bogus.w"]]
    assert not any(i.start < end and start < i.end for i in dropped for _, start, end in reads)


def test_dict_loader_converts_dtype_when_asked(synthetic_checkpoint: SyntheticCheckpoint) -> None:
    expected = reference(synthetic_checkpoint.path)
    loaded = bv.load_bagel_checkpoint_state_dict(synthetic_checkpoint.path, dtype=torch.float32)
    assert all(v.dtype == torch.float32 for v in loaded.values())
    assert all(torch.equal(loaded["model." + k], expected[k].float()) for k in UND)


def test_vae_loader(synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path) -> None:
    expected = reference(synthetic_checkpoint.path, "ae.safetensors")
    loaded = bv.load_bagel_vae_state_dict(synthetic_checkpoint.path)
    assert list(loaded) == list(load_manifest()["ae.safetensors"])
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    save_tensors(tmp_path / "ae.safetensors", {**expected, UND[0]: torch.ones(1)})
    with pytest.raises(UnknownKeysError, match="1 key is not VAE") as info:
        bv.load_bagel_vae_state_dict(tmp_path)
    assert info.value.keys == [UND[0]]


def test_vae_loader_refuses_an_incomplete_file_unless_not_strict(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    expected = reference(synthetic_checkpoint.path, "ae.safetensors")
    lost = "decoder.conv_out.bias"
    save_tensors(tmp_path / "ae.safetensors", {k: v for k, v in expected.items() if k != lost})
    with pytest.raises(MissingKeysError, match=f"1 of the 244 VAE keys is missing: '{lost}'"):
        bv.load_bagel_vae_state_dict(tmp_path)
    assert len(bv.load_bagel_vae_state_dict(tmp_path, strict=False)) == 243
    save_tensors(tmp_path / "ae.safetensors", {})
    with pytest.raises(MissingKeysError, match="244 of the 244"):
        bv.load_bagel_vae_state_dict(tmp_path)


def test_missing_folder_and_files_name_the_expected_file(tmp_path: Path) -> None:
    with pytest.raises(
        FileNotFoundError, match=re.escape(str(tmp_path / "nope" / "ema.safetensors"))
    ):
        bv.load_bagel_checkpoint_state_dict(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "ema.safetensors"))):
        bv.load_bagel_checkpoint_state_dict(tmp_path)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "ae.safetensors"))):
        bv.load_bagel_vae_state_dict(tmp_path)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "x" / "ae.safetensors"))):
        bv.load_bagel_vae_state_dict(tmp_path / "x")


def test_missing_config_file_is_named(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    folder = variant(synthetic_checkpoint, tmp_path / "c", dict)
    (folder / "vit_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(folder / "vit_config.json"))):
        bv.load_bagel_checkpoint_state_dict(folder)


# -- validation ------------------------------------------------------------------------------


def test_missing_vision_keys_listed_by_family(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    folder = variant(
        synthetic_checkpoint,
        tmp_path / "novit",
        lambda sd: {k: v for k, v in sd.items() if not k.startswith("vit_model.")},
    )
    with pytest.raises(MissingKeysError) as info:
        bv.load_bagel_checkpoint_state_dict(folder)
    message = str(info.value)
    assert "stage1 expects 421 keys that the checkpoint lacks" in message
    assert "vit.fc1: 52 keys missing (layers 0-25)" in message
    assert "vit.q_proj: 52 keys missing (layers 0-25)" in message
    assert (
        "vit.position_embedding: 1 key missing "
        "(vit_model.vision_model.embeddings.position_embedding.weight)"
    ) in message
    assert sorted(info.value.keys) == sorted(VIT)
    report = bv.inspect_checkpoint(folder)
    # every vision family but the rope buffers, which a rope-free config does not have
    vision = {f.name for f in FAMILIES if f.name.startswith("vit.")}
    assert set(report.missing) == vision - {"vit.rope"}
    # not strict: the rest loads
    loaded = bv.load_bagel_checkpoint_state_dict(folder, strict=False)
    assert len(loaded) == len(UND) - len(VIT)


def test_missing_layer_ranges_are_compact(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    gone = {f"language_model.model.layers.{n}.mlp.up_proj.weight" for n in (0, 1, 2, 7)}
    folder = variant(
        synthetic_checkpoint,
        tmp_path / "holes",
        lambda sd: {k: v for k, v in sd.items() if k not in gone},
    )
    report = bv.inspect_checkpoint(folder)
    assert report.missing_summary() == ["up_proj: 4 keys missing (layers 0-2, 7)"]
    assert report.missing_keys == sorted(gone, key=lambda k: int(k.split(".")[3]))


def test_stage2_gen_keys_are_expected_too(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    folder = variant(
        synthetic_checkpoint,
        tmp_path / "nogen",
        lambda sd: {k: v for k, v in sd.items() if k in UND},
    )
    assert len(bv.load_bagel_checkpoint_state_dict(folder)) == len(UND)  # stage 1 is complete
    with pytest.raises(
        MissingKeysError, match="none of the 821 tensors of the checkpoint is one"
    ) as info:
        bv.load_bagel_checkpoint_state_dict(folder, stage=2)
    assert len(info.value.keys) == 402 and "Load it with stage=1" in str(info.value)


def test_shape_mismatches_are_all_listed(synthetic_checkpoint: SyntheticCheckpoint) -> None:
    """Every mismatch is on the error (``mismatches``); the message summarises them."""
    config = synthetic_checkpoint.config
    wrong = dataclasses.replace(config, vit_intermediate_size=config.vit_intermediate_size + 1)
    with pytest.raises(ShapeMismatchError) as info:
        bv.load_bagel_checkpoint_state_dict(synthetic_checkpoint.path, config=wrong)
    message = str(info.value)
    assert "78 tensors do not have the shape the config implies" in message  # 26 x fc1 w+b, fc2 w
    assert len(info.value.mismatches) == 78
    h, i = config.vit_hidden_size, config.vit_intermediate_size
    for layer in (0, 25):
        key = f"vit_model.vision_model.encoder.layers.{layer}.mlp.fc2.weight"
        assert (key, (h, i + 1), (h, i)) in info.value.mismatches
    first = "vit_model.vision_model.encoder.layers.0.mlp.fc2.weight"
    assert f"{first}: expected [{h}, {i + 1}], found [{h}, {i}]" in message


def test_keys_beyond_the_config_are_errors_under_strict(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    extra = "language_model.model.layers.28.input_layernorm.weight"
    folder = variant(
        synthetic_checkpoint, tmp_path / "l28", lambda sd: {**sd, extra: torch.ones(1)}
    )
    with pytest.raises(
        UnknownKeysError, match="1 key does not exist in a model with this config"
    ) as info:
        bv.load_bagel_checkpoint_state_dict(folder)
    assert info.value.keys == [extra]
    assert "model." + extra not in bv.load_bagel_checkpoint_state_dict(folder, strict=False)


def test_without_config_only_keys_are_checked(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "bare"
    folder.mkdir()
    shutil.copy(synthetic_checkpoint.path / "ema.safetensors", folder)
    with caplog.at_level(logging.WARNING, logger="bagelverify"):
        report = bv.inspect_checkpoint(folder, stage=2)
    assert report.config is None and "shapes are not checked" in caplog.text
    assert report.expected_from == "manifest"  # the release's key set: complete, by the manifest
    assert report.problems() == []
    assert len(bv.load_bagel_checkpoint_state_dict(folder, stage=2)) == len(EMA)


def test_report_counts_and_sizes(synthetic_checkpoint: SyntheticCheckpoint) -> None:
    header = read_header(synthetic_checkpoint.path / "ema.safetensors")
    report = bv.inspect_checkpoint(synthetic_checkpoint.path, stage=2)
    und_bytes = sum(header.tensors[k].nbytes for k in UND)
    gen_bytes = sum(header.tensors[k].nbytes for k in GEN)
    assert (report.stage1_bytes, report.stage2_bytes) == (und_bytes, und_bytes + gen_bytes)
    summary = report.as_dict()
    assert summary["buckets"]["und"] == {"count": 821, "bytes": und_bytes, "dtypes": {"BF16": 821}}
    assert summary["buckets"]["gen"]["count"] == 402 and summary["kept"] == 1223
    assert summary["config"]["hidden_size"] == synthetic_checkpoint.config.hidden_size
    json.dumps(summary)  # JSON-ready


# -- patch embedding -------------------------------------------------------------------------


@pytest.fixture
def conv_folder(synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path) -> Path:
    config = synthetic_checkpoint.config

    def to_conv(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        linear = sd[PATCH_EMBEDDING_WEIGHT]
        conv = linear_patch_weight_to_conv(
            linear, patch_size=config.vit_patch_size, channels=config.vit_num_channels
        )
        return {**sd, PATCH_EMBEDDING_WEIGHT: conv}

    return variant(synthetic_checkpoint, tmp_path / "conv", to_conv)


def test_conv_patch_embedding_is_refused_naming_the_conversion(conv_folder: Path) -> None:
    with pytest.raises(ShapeMismatchError) as info:
        bv.load_bagel_checkpoint_state_dict(conv_folder)
    message = str(info.value)
    assert PATCH_EMBEDDING_WEIGHT in message and "is a Conv2d weight [16, 3, 14, 14]" in message
    assert (
        "convert_conv_patch_embedding=True" in message and "conv_patch_weight_to_linear" in message
    )
    assert bv.inspect_checkpoint(conv_folder).conv_patch_embedding == PATCH_EMBEDDING_WEIGHT


def test_conv_patch_embedding_is_converted_on_request(
    conv_folder: Path, synthetic_checkpoint: SyntheticCheckpoint
) -> None:
    linear = reference(synthetic_checkpoint.path)[PATCH_EMBEDDING_WEIGHT]
    key = "model." + PATCH_EMBEDDING_WEIGHT
    loaded = bv.load_bagel_checkpoint_state_dict(conv_folder, convert_conv_patch_embedding=True)
    assert torch.equal(loaded[key], linear)
    destination = {k: torch.zeros_like(v) for k, v in loaded.items()}
    bv.load_into(destination, conv_folder, convert_conv_patch_embedding=True)
    assert torch.equal(destination[key], linear)


# -- load_into -------------------------------------------------------------------------------


def zeros_like_stage(
    folder: Path, stage: object = 1, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    report = bv.inspect_checkpoint(folder, stage=stage)
    return {
        native: torch.zeros(info.shape, dtype=dtype or DTYPES[info.dtype].torch_dtype)
        for native, info in report.retained.items()
    }


def test_load_into_fills_the_same_tensors_in_place(
    synthetic_checkpoint: SyntheticCheckpoint,
) -> None:
    expected = reference(synthetic_checkpoint.path)
    destination = zeros_like_stage(synthetic_checkpoint.path, stage=2)
    params = {k: torch.nn.Parameter(v) for k, v in destination.items()}  # require grad
    pointers = {k: p.data_ptr() for k, p in params.items()}
    result = bv.load_into(params, synthetic_checkpoint.path, stage=2)
    assert result == bv.IncompatibleKeys([], [])
    for key, param in params.items():
        assert param.data_ptr() == pointers[key] and param.requires_grad
        assert torch.equal(param.detach(), expected[key.removeprefix("model.")])


def test_load_into_widens_dtype_losslessly_by_default(
    synthetic_checkpoint: SyntheticCheckpoint,
) -> None:
    expected = reference(synthetic_checkpoint.path)
    master = zeros_like_stage(synthetic_checkpoint.path, dtype=torch.float32)
    bv.load_into(master, synthetic_checkpoint.path)
    assert all(torch.equal(v, expected[k[len("model.") :]].float()) for k, v in master.items())
    with pytest.raises(ShapeMismatchError, match=r"not allowed by cast='exact'"):
        bv.load_into(master, synthetic_checkpoint.path, cast="exact")


def test_load_into_refuses_narrowing_unless_cast_any(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path, reads: list[tuple[str, int, int]]
) -> None:
    folder = variant(
        synthetic_checkpoint, tmp_path / "f32", lambda sd: {k: v.float() for k, v in sd.items()}
    )
    reads.clear()
    half = zeros_like_stage(folder, dtype=torch.float16)
    with pytest.raises(ShapeMismatchError, match="821 destination tensors cannot hold") as info:
        bv.load_into(half, folder)
    assert "destination torch.float16, file torch.float32 (not allowed by cast='lossless')" in str(
        info.value
    )
    assert reads == []
    bv.load_into(half, folder, cast="any")
    expected = reference(folder)
    assert all(torch.equal(v, expected[k[len("model.") :]].half()) for k, v in half.items())


def test_load_into_lists_every_shape_mismatch_before_reading(
    synthetic_checkpoint: SyntheticCheckpoint, reads: list[tuple[str, int, int]]
) -> None:
    destination = zeros_like_stage(synthetic_checkpoint.path)
    bad = [k for k in destination if k.endswith("q_proj.bias")]
    for key in bad:
        destination[key] = torch.zeros(destination[key].numel() + 1, dtype=torch.bfloat16)
    with pytest.raises(ShapeMismatchError, match=f"{len(bad)} destination tensors") as info:
        bv.load_into(destination, synthetic_checkpoint.path)
    assert all(f"  {k}: destination [" in str(info.value) for k in bad)
    assert reads == []


def test_load_into_key_sets(synthetic_checkpoint: SyntheticCheckpoint) -> None:
    destination = zeros_like_stage(synthetic_checkpoint.path)
    first = next(iter(destination))
    del destination[first]
    destination["model.extra"] = torch.zeros(3)
    destination["model.te._extra_state"] = torch.zeros(1)  # ignored like load_state_dict does
    with pytest.raises(MissingKeysError, match="1 destination key is not in the checkpoint"):
        bv.load_into(destination, synthetic_checkpoint.path)
    result = bv.load_into(destination, synthetic_checkpoint.path, strict=False)
    assert result == bv.IncompatibleKeys(["model.extra"], [first])
    assert torch.equal(destination["model.extra"], torch.zeros(3))


def test_load_into_non_contiguous_destination(synthetic_checkpoint: SyntheticCheckpoint) -> None:
    expected = reference(synthetic_checkpoint.path)
    destination = zeros_like_stage(synthetic_checkpoint.path)
    key = "model.language_model.lm_head.weight"
    destination[key] = torch.zeros(
        tuple(reversed(destination[key].shape)), dtype=torch.bfloat16
    ).t()
    bv.load_into(destination, synthetic_checkpoint.path)
    assert torch.equal(destination[key], expected[key[len("model.") :]])


# -- sharded folders -------------------------------------------------------------------------


@pytest.fixture
def sharded(synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path) -> Path:
    native = bv.load_bagel_checkpoint_state_dict(synthetic_checkpoint.path, stage=2)
    folder = tmp_path / "sharded"
    bv.save_bagel_checkpoint(
        native, folder, max_shard_size="1MB", config=synthetic_checkpoint.config
    )
    return folder


def test_sharded_save_and_load(sharded: Path, synthetic_checkpoint: SyntheticCheckpoint) -> None:
    shards = sorted(sharded.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and not (sharded / "ema.safetensors").exists()
    index = json.loads((sharded / ckpt.INDEX_FILE).read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert index["metadata"]["total_size"] == sum(
        s.stat().st_size - read_header(s).data_start for s in shards
    )
    expected = reference(synthetic_checkpoint.path)
    loaded = bv.load_bagel_checkpoint_state_dict(sharded, stage=2)
    assert set(loaded) == {"model." + k for k in EMA}
    assert all(torch.equal(loaded["model." + k], v) for k, v in expected.items())


def edit_index(folder: Path, change: Callable[[dict[str, str]], None]) -> None:
    path = folder / ckpt.INDEX_FILE
    index = json.loads(path.read_text())
    change(index["weight_map"])
    path.write_text(json.dumps(index))


def test_index_entry_absent_from_its_shard(sharded: Path) -> None:
    def add(weight_map: dict[str, str]) -> None:
        weight_map["language_model.model.layers.99.input_layernorm.weight"] = next(
            iter(weight_map.values())
        )

    edit_index(sharded, add)
    with pytest.raises(
        CorruptCheckpointError,
        match=r"1 tensor the index places in model-\S+ is not in its header",
    ):
        bv.inspect_checkpoint(sharded)


def test_shard_tensor_absent_from_index(sharded: Path) -> None:
    edit_index(sharded, lambda weight_map: weight_map.pop(UND[0]))
    with pytest.raises(
        CorruptCheckpointError, match=f"1 tensor of model-\\S+ is not indexed to it: '{UND[0]}'"
    ):
        bv.inspect_checkpoint(sharded)


def test_shard_tensor_indexed_to_another_shard(sharded: Path) -> None:
    def move(weight_map: dict[str, str]) -> None:
        names = sorted(set(weight_map.values()))
        key = next(k for k, v in weight_map.items() if v == names[0])
        weight_map[key] = names[1]

    edit_index(sharded, move)
    with pytest.raises(CorruptCheckpointError, match=r"not in its header.*not indexed to it"):
        bv.inspect_checkpoint(sharded)


def test_index_names_a_missing_or_outside_shard(sharded: Path) -> None:
    edit_index(sharded, lambda weight_map: weight_map.update({UND[0]: "gone.safetensors"}))
    with pytest.raises(FileNotFoundError, match=re.escape(str(sharded / "gone.safetensors"))):
        bv.inspect_checkpoint(sharded)
    edit_index(sharded, lambda weight_map: weight_map.update({UND[0]: "../x.safetensors"}))
    with pytest.raises(CorruptCheckpointError, match="is not a file name in the folder"):
        bv.inspect_checkpoint(sharded)


def test_ema_wins_over_index(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = variant(synthetic_checkpoint, tmp_path / "both", dict)
    (folder / ckpt.INDEX_FILE).write_text(
        json.dumps({"weight_map": {UND[0]: "missing.safetensors"}})
    )
    with caplog.at_level(logging.INFO, logger="bagelverify"):
        loaded = bv.load_bagel_checkpoint_state_dict(folder)
    assert len(loaded) == len(UND)
    assert (
        "reading ema.safetensors (the default); model.safetensors.index.json ignored" in caplog.text
    )


def test_sharded_save_refuses_to_be_shadowed_by_ema(
    synthetic_checkpoint: SyntheticCheckpoint,
) -> None:
    with pytest.raises(FileExistsError, match="would shadow the sharded checkpoint"):
        bv.save_bagel_checkpoint(
            {"model." + UND[0]: torch.ones(1)},
            synthetic_checkpoint.path,
            stage=1,
            max_shard_size=10,
        )


# -- saving ----------------------------------------------------------------------------------


def test_save_is_atomic_when_the_writer_fails(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    native = bv.load_bagel_checkpoint_state_dict(synthetic_checkpoint.path)
    folder = tmp_path / "out"
    bv.save_bagel_checkpoint(native, folder, stage=1)
    before = (folder / "ema.safetensors").read_bytes()
    real = safetensors_io._write_tensor
    calls = 0

    def failing(handle: object, spec: object, tensor: torch.Tensor) -> None:
        nonlocal calls
        calls += 1
        if calls == 100:
            raise OSError("disk full")
        real(handle, spec, tensor)  # type: ignore[arg-type]

    monkeypatch.setattr(safetensors_io, "_write_tensor", failing)
    changed = {k: v + 1 for k, v in native.items()}
    with pytest.raises(OSError, match="disk full"):
        bv.save_bagel_checkpoint(changed, folder, stage=1, overwrite=True)
    assert calls == 100
    assert (folder / "ema.safetensors").read_bytes() == before
    assert sorted(os.listdir(folder)) == ["ema.safetensors"]


def test_save_refuses_unknown_keys_unless_not_strict_then_drops_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    native = {"model." + UND[0]: torch.ones(3), "model.bogus.weight": torch.ones(2)}
    with pytest.raises(
        UnknownKeysError, match=re.escape("1 key matches no BAGEL key family: 'bogus.weight'")
    ):
        bv.save_bagel_checkpoint(native, tmp_path / "strict")
    assert not (tmp_path / "strict" / "ema.safetensors").exists()
    with caplog.at_level(logging.WARNING, logger="bagelverify"):
        bv.save_bagel_checkpoint(native, tmp_path / "lax", stage=1, strict=False)
    assert list(read_header(tmp_path / "lax" / "ema.safetensors").tensors) == [UND[0]]
    assert "dropping 1 key of no BAGEL key family" in caplog.text
    assert "unchanged" not in caplog.text


def test_save_validates_against_config(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    native = bv.load_bagel_checkpoint_state_dict(synthetic_checkpoint.path)
    config = synthetic_checkpoint.config
    with pytest.raises(MissingKeysError, match=r"none of the 821 tensors .* Pass stage=1"):
        bv.save_bagel_checkpoint(native, tmp_path / "a", stage=2, config=config)
    written = bv.save_bagel_checkpoint(native, tmp_path / "b", stage=1, config=config)
    assert {p.name for p in written} == {"ema.safetensors", *CONFIG_FILES}
    assert bv.BagelConfig.from_pretrained(tmp_path / "b") == config
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())


def test_save_stage1_drops_gen_and_writes_format_pt(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    native = bv.load_bagel_checkpoint_state_dict(synthetic_checkpoint.path, stage=2)
    bv.save_bagel_checkpoint(native, tmp_path, stage="stage1")
    header = read_header(tmp_path / "ema.safetensors")
    assert header.metadata == {"format": "pt"} and set(header.tensors) == set(UND)


SAFETENSORS_DTYPES = ["BF16", "F16", "F32", "F64", "I64", "I32", "U8", "BOOL"]


@st.composite
def native_state_dicts(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    """Real BAGEL keys under ``model.`` with arbitrary small shapes, dtypes and bit patterns."""
    keys = draw(st.lists(st.sampled_from(list(EMA)), min_size=1, max_size=12, unique=True))
    for bucket_keys in (UND, GEN):  # stage 2 is made of both: a save needs one of each
        if not set(keys) & set(bucket_keys):
            keys.append(draw(st.sampled_from(bucket_keys)))
    out = {}
    for key in keys:
        dtype = DTYPES[draw(st.sampled_from(SAFETENSORS_DTYPES))]
        shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
        count = int(torch.Size(shape).numel())
        raw = draw(st.binary(min_size=count * dtype.itemsize, max_size=count * dtype.itemsize))
        if dtype.name == "BOOL":
            raw = bytes(b & 1 for b in raw)
        buffer = (
            torch.frombuffer(bytearray(raw), dtype=torch.uint8)
            if raw
            else torch.empty(0, dtype=torch.uint8)
        )
        out["model." + key] = buffer.view(dtype.torch_dtype).reshape(shape)
    return out


@given(native_state_dicts(), st.sampled_from([None, 1, 64]))
def test_load_of_save_is_bit_identical(sd: dict[str, torch.Tensor], shard_size: int | None) -> None:
    """Invariant: load(save(sd)) has the same keys, dtypes, shapes and bytes as sd (NaN payloads
    included), single-file or sharded."""
    with tempfile.TemporaryDirectory() as folder:
        bv.save_bagel_checkpoint(sd, folder, max_shard_size=shard_size, strict=False)
        loaded = bv.load_bagel_checkpoint_state_dict(folder, stage=2, strict=False)
    assert set(loaded) == set(sd)
    for key, tensor in sd.items():
        got = loaded[key]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape
        assert bytes(safetensors_io.byte_view(got)) == bytes(safetensors_io.byte_view(tensor))


def test_config_may_be_a_folder_or_a_foreign_object(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = synthetic_checkpoint.path
    by_path = bv.load_bagel_checkpoint_state_dict(folder, config=str(folder))
    with caplog.at_level(logging.INFO, logger="bagelverify"):
        foreign = bv.load_bagel_checkpoint_state_dict(
            folder, config=types.SimpleNamespace(text_config=None)
        )
    assert by_path.keys() == foreign.keys() and len(foreign) == 821
    assert "config of type SimpleNamespace is not a BagelConfig" in caplog.text
    with pytest.raises(TypeError, match=r"config must be a bagelverify\.BagelConfig"):
        bv.save_bagel_checkpoint(by_path, tmp_path / "out", config={"hidden_size": 8})
