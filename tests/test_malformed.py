"""Every malformed file gets exactly CorruptCheckpointError (or ConfigError for config files),
naming the file and the culprit, from every entry point that opens it, before any tensor byte is
read. Complements the basic cases of test_safetensors_io.py."""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors
import safetensors.torch
import torch
from test_safetensors_io import entry, raw_file

import bagelverify as bv
from bagelverify import checkpoint as ckpt
from bagelverify import safetensors_io
from bagelverify.config import CONFIG_FILES
from bagelverify.errors import ConfigError, CorruptCheckpointError, UnsupportedTensorError
from bagelverify.safetensors_io import MAX_HEADER_BYTES, read_header, save_tensors
from bagelverify.synthetic import SyntheticCheckpoint

KEY = "vit_model.vision_model.post_layernorm.weight"  # a real UND key
VAE_KEY = "decoder.conv_in.bias"


def exact(error_class: type[Exception], call: Callable[[], object]) -> Exception:
    """Run ``call``; it must raise exactly ``error_class`` (not a subclass, not a parent)."""
    with pytest.raises(Exception) as info:
        call()
    assert type(info.value) is error_class, f"{type(info.value).__name__}: {info.value}"
    return info.value


# (header, data section, text the message must hold: the culprit and what was found)
MALFORMED: dict[str, tuple[bytes | str | dict[str, Any], bytes, str]] = {
    "empty header": (b"", b"", "not valid JSON"),
    "utf-8 bom": ("\ufeff{}", b"", "not valid JSON"),
    "nested too deep": ("[" * 100_000 + "]" * 100_000, b"", "nested too deeply"),
    "integer too long": ('{"a": ' + "1" * 5000 + "}", b"", "not valid JSON"),
    "header is null": ("null", b"", "the header is null None, not a JSON object"),
    "header is a string": ('"x"', b"", "the header is string 'x', not a JSON object"),
    "lone surrogate name": (
        '{"\\ud800": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
        b"\0" * 4,
        "not valid Unicode ('\\ud800')",
    ),
    "lone surrogate metadata": (
        '{"__metadata__": {"format": "\\udfff"}}',
        b"",
        "a string at '__metadata__' > 'format' is not valid Unicode",
    ),
    "repeated field": (
        '{"a": {"dtype": "F32", "dtype": "F16", "shape": [1], "data_offsets": [0, 4]}}',
        b"\0" * 4,
        "the object at 'a' names 'dtype' twice",
    ),
    "repeated metadata key": (
        '{"__metadata__": {"format": "pt", "format": "np"}}',
        b"",
        "the object at '__metadata__' names 'format' twice",
    ),
    "entry not an object": ({"a": [1, 2]}, b"", "tensor 'a': entry must be an object"),
    "missing field": (
        {"a": {"dtype": "F32", "shape": [1]}},
        b"",
        "tensor 'a': entry must be an object with exactly dtype, shape, data_offsets; "
        "missing ['data_offsets']",
    ),
    "dtype not a string": ({"a": entry(4, [1], 0, 4)}, b"\0" * 4, "tensor 'a': unknown dtype 4"),  # type: ignore[arg-type]
    "dtype lowercase": ({"a": entry("f32", [1], 0, 4)}, b"\0" * 4, "unknown dtype 'f32'"),
    "shape not a list": ({"a": entry("F32", 4, 0, 4)}, b"\0" * 4, "tensor 'a': shape 4 is not"),  # type: ignore[arg-type]
    "float dim": ({"a": entry("F32", [1.0], 0, 4)}, b"\0" * 4, "tensor 'a': shape [1.0] is not"),  # type: ignore[list-item]
    "string dim": ({"a": entry("F32", ["1"], 0, 4)}, b"\0" * 4, "tensor 'a': shape ['1'] is not"),  # type: ignore[list-item]
    "null dim": ({"a": entry("F32", [None], 0, 4)}, b"\0" * 4, "tensor 'a': shape [None] is not"),  # type: ignore[list-item]
    "shape overflows int64": (
        {"a": entry("F32", [0, 2**62, 4], 0, 0)},
        b"",
        "tensor 'a': shape [0, 4611686018427387904, 4] overflows int64",
    ),
    "dim past int64": (
        {"a": entry("U8", [0, 2**63], 0, 0)},
        b"",
        "tensor 'a': shape [0, 9223372036854775808] overflows int64",
    ),
    "offsets of three": (
        {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}},
        b"\0" * 4,
        "tensor 'a': data_offsets [0, 4, 8] is not [begin, end]",
    ),
    "negative offset": ({"a": entry("F32", [0], -4, -4)}, b"", "tensor 'a': data_offsets [-4, -4]"),
    "bool offset": ({"a": entry("U8", [1], False, True)}, b"\0", "tensor 'a': data_offsets [False"),
    "offsets not a list": (
        {"a": {"dtype": "F32", "shape": [1], "data_offsets": "0-4"}},
        b"\0" * 4,
        "tensor 'a': data_offsets '0-4'",
    ),
    "empty tensor inside another": (
        {"a": entry("F32", [2], 0, 8), "e": entry("F32", [0], 4, 4)},
        b"\0" * 8,
        "tensor 'e' (data bytes 4-4) overlaps tensor 'a' (data bytes 0-8)",
    ),
    "same bytes twice": (
        {"a": entry("F32", [1], 0, 4), "b": entry("I32", [1], 0, 4)},
        b"\0" * 4,
        "tensor 'b' (data bytes 0-4) overlaps tensor 'a'",
    ),
    "starts past the end": (
        {"a": entry("F32", [1], 0, 4), "b": entry("F32", [1], 100, 104)},
        b"\0" * 4,
        "tensor 'b' (data bytes 100-104) ends at file byte",
    ),
    "no tensors but data": ({}, b"\0" * 8, "8 bytes after the last tensor (the header)"),
    "metadata null": ({"__metadata__": None}, b"", "__metadata__ must map strings to strings"),
    "metadata nested": (
        {"__metadata__": {"total": {"size": 1}}},
        b"",
        "__metadata__ must map strings to strings, but 'total' is object {'size': 1}",
    ),
    "metadata number": (
        {"__metadata__": {"step": 3}},
        b"",
        "__metadata__ must map strings to strings, but 'step' is number 3",
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_header_is_corrupt_checkpoint_naming_file_and_culprit(
    tmp_path: Path, case: str
) -> None:
    header, data, message = MALFORMED[case]
    path = raw_file(tmp_path / "bad.safetensors", header, data)
    error = exact(CorruptCheckpointError, lambda: read_header(path))
    assert str(error).startswith(f"{path}: ")
    assert message in str(error)
    assert "re-download or re-save it" in str(error)  # what to do


def test_header_length_limits(tmp_path: Path) -> None:
    """The cap is inclusive and checked before the file size; a prefix alone is a 0-byte header."""
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 2**64 - 1))
    exact(CorruptCheckpointError, lambda: read_header(path))
    path.write_bytes(struct.pack("<Q", MAX_HEADER_BYTES))
    error = exact(CorruptCheckpointError, lambda: read_header(path))
    assert f"header length {MAX_HEADER_BYTES} runs past the file end (8 bytes)" in str(error)
    path.write_bytes(struct.pack("<Q", 0))
    assert "not valid JSON" in str(exact(CorruptCheckpointError, lambda: read_header(path)))


def test_long_values_are_cut_in_messages(tmp_path: Path) -> None:
    path = raw_file(tmp_path / "x.safetensors", {"a": entry("F32", [2] * 10_000, 0, 4)}, b"\0" * 4)
    message = str(exact(CorruptCheckpointError, lambda: read_header(path)))
    assert "tensor 'a': shape [2, 2, 2" in message and "..." in message and len(message) < 1000


def test_accepted_edge_cases_agree_with_safetensors(tmp_path: Path) -> None:
    """Valid oddities are accepted exactly as the reference reader reads them: no metadata,
    zero-size and 0-d tensors, tensors listed out of file order, padding spaces."""
    header = {
        "late": entry("F32", [1], 4, 8),
        "early": entry("F32", [], 0, 4),
        "none": entry("BF16", [3, 0], 8, 8),
    }
    body = json.dumps(header) + "   "
    path = raw_file(tmp_path / "x.safetensors", body, struct.pack("<ff", 1.5, -2.0))
    ours = read_header(path)
    with safetensors.safe_open(str(path), "pt") as theirs:
        assert set(theirs.keys()) == set(ours.tensors)
        for name, info in ours.tensors.items():
            assert list(theirs.get_slice(name).get_shape()) == list(info.shape)
    assert ours.metadata == {}
    assert [ours.tensors[n].start - ours.data_start for n in ("early", "late")] == [0, 4]


# -- every entry point that opens a file -----------------------------------------------------


def corrupt_copy(source: Path, target: Path, file: str, garbage: bytes) -> Path:
    """A copy of a checkpoint folder whose ``file`` is replaced by ``garbage``."""
    shutil.copytree(source, target)
    (target / file).write_bytes(garbage)
    return target


def _bad_model_file(key: str) -> bytes:
    """A header naming ``key`` twice."""
    one = f'"{key}": {{"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}'
    body = f"{{{one}, {one}}}".encode()
    return struct.pack("<Q", len(body)) + body + b"\0"


ENTRY_POINTS: dict[str, tuple[str, Callable[[Path], object]]] = {
    "read_header": ("ema.safetensors", lambda d: read_header(d / "ema.safetensors")),
    "inspect_checkpoint": ("ema.safetensors", bv.inspect_checkpoint),
    "load_bagel_checkpoint_state_dict": ("ema.safetensors", bv.load_bagel_checkpoint_state_dict),
    "load_into": ("ema.safetensors", lambda d: ckpt.load_into({}, d, strict=False)),
    "load_bagel_vae_state_dict": ("ae.safetensors", bv.load_bagel_vae_state_dict),
}


@pytest.mark.parametrize("name", list(ENTRY_POINTS))
def test_every_entry_point_rejects_a_repeated_tensor_name(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path, name: str
) -> None:
    file, call = ENTRY_POINTS[name]
    key = VAE_KEY if file == "ae.safetensors" else KEY
    folder = corrupt_copy(synthetic_checkpoint.path, tmp_path / "c", file, _bad_model_file(key))
    error = exact(CorruptCheckpointError, lambda: call(folder))
    assert str(error).startswith(
        f"{folder / file}: unusable header JSON: the object at the top level"
    )
    assert f"names '{key}' twice" in str(error)


@pytest.mark.parametrize("name", list(ENTRY_POINTS))
def test_every_entry_point_rejects_a_short_file(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path, name: str
) -> None:
    file, call = ENTRY_POINTS[name]
    folder = corrupt_copy(synthetic_checkpoint.path, tmp_path / "c", file, b"\1\2\3")
    error = exact(CorruptCheckpointError, lambda: call(folder))
    assert str(error).startswith(f"{folder / file}: the file is 3 bytes, shorter than")


@pytest.mark.parametrize(
    ("name", "file", "key"),
    [
        ("load_bagel_checkpoint_state_dict", "ema.safetensors", KEY),
        ("load_bagel_vae_state_dict", "ae.safetensors", VAE_KEY),
    ],
)
def test_truncated_data_names_file_and_tensor(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    file: str,
    key: str,
) -> None:
    """A file cut short after its header was validated (it changed under us) is reported with
    the file and the tensor being read."""
    folder = tmp_path / "c"
    folder.mkdir()
    path = folder / file
    save_tensors(path, {key: torch.ones(4)})
    real = safetensors_io.read_header

    def then_truncate(target: Any) -> safetensors_io.SafetensorsHeader:
        header = real(target)
        os.truncate(target, header.data_start + 8)
        return header

    monkeypatch.setattr(ckpt.files, "read_header", then_truncate)  # the model file
    monkeypatch.setattr(ckpt.load, "read_header", then_truncate)  # ae.safetensors
    if name == "load_bagel_vae_state_dict":
        error = exact(
            CorruptCheckpointError, lambda: bv.load_bagel_vae_state_dict(folder, strict=False)
        )
    else:
        error = exact(
            CorruptCheckpointError,
            lambda: bv.load_bagel_checkpoint_state_dict(folder, strict=False),
        )
    assert str(error).startswith(f"{path}: {key!r}: unexpected end of file")


def test_no_entry_point_uses_the_unchecked_safetensors_parser(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loading, inspecting, the VAE and sharded folders never call safetensors' own reader."""
    sharded = tmp_path / "sharded"
    native = bv.load_bagel_checkpoint_state_dict(synthetic_checkpoint.path)
    bv.save_bagel_checkpoint(native, sharded, stage=1, max_shard_size="1MB")

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("safetensors' own parser was called")

    for module, attribute in [
        (safetensors, "safe_open"),
        (safetensors.torch, "safe_open"),
        (safetensors.torch, "load_file"),
        (safetensors.torch, "load"),
    ]:
        monkeypatch.setattr(module, attribute, forbidden)
    folder = synthetic_checkpoint.path
    assert bv.inspect_checkpoint(folder).plan.native
    assert bv.load_bagel_checkpoint_state_dict(folder)
    assert bv.load_bagel_vae_state_dict(folder)
    assert bv.load_bagel_checkpoint_state_dict(sharded).keys() == native.keys()


# -- the shard index -------------------------------------------------------------------------


INDEX_CASES: dict[str, tuple[bytes, str]] = {
    "not json": (b"{", "not valid JSON"),
    "not utf-8": (b'{"weight_map": {"\xff": 1}}', "not UTF-8"),
    "no weight_map": (b'{"metadata": {}}', "expected an object with a 'weight_map' object"),
    "weight_map a list": (b'{"weight_map": []}', "found {'weight_map': []}"),
    "repeated key": (
        f'{{"weight_map": {{"{KEY}": "a.safetensors", "{KEY}": "b.safetensors"}}}}'.encode(),
        f"the object at 'weight_map' names '{KEY}' twice",
    ),
    "shard outside the folder": (
        f'{{"weight_map": {{"{KEY}": "../x.safetensors"}}}}'.encode(),
        f"weight_map['{KEY}'] = '../x.safetensors' is not a file name in the folder",
    ),
    "shard not a string": (
        f'{{"weight_map": {{"{KEY}": 3}}}}'.encode(),
        f"weight_map['{KEY}'] = 3 is not a file name",
    ),
}


@pytest.mark.parametrize("case", list(INDEX_CASES))
def test_malformed_index_is_corrupt_checkpoint(tmp_path: Path, case: str) -> None:
    raw, message = INDEX_CASES[case]
    index = tmp_path / "model.safetensors.index.json"
    index.write_bytes(raw)
    for call in (bv.inspect_checkpoint, bv.load_bagel_checkpoint_state_dict):
        error = exact(CorruptCheckpointError, lambda call=call: call(tmp_path))  # type: ignore[misc]
        assert str(error).startswith(f"{index}: ") and message in str(error)


def test_corrupt_shard_is_named(synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path) -> None:
    native = bv.load_bagel_checkpoint_state_dict(synthetic_checkpoint.path)
    bv.save_bagel_checkpoint(native, tmp_path, stage=1, max_shard_size="1MB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    with open(shard, "r+b") as handle:
        handle.truncate(os.path.getsize(shard) - 1)
    error = exact(CorruptCheckpointError, lambda: bv.inspect_checkpoint(tmp_path))
    assert str(error).startswith(f"{shard}: tensor ") and "past the file end" in str(error)


# -- config files ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'{"hidden_size": 1, "hidden_size": 2}', "names 'hidden_size' twice"),
        (b"[" * 50_000, "nested too deeply"),
        (b'{"hidden_size": ' + b"9" * 5000 + b"}", "not valid JSON"),
    ],
)
def test_malformed_config_is_config_error(
    synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path, raw: bytes, message: str
) -> None:
    shutil.copytree(synthetic_checkpoint.path, tmp_path / "c")
    path = tmp_path / "c" / CONFIG_FILES[1]
    path.write_bytes(raw)
    error = exact(ConfigError, lambda: bv.inspect_checkpoint(tmp_path / "c"))
    assert str(error).startswith(f"{path}: ") and message in str(error)


# -- values that cannot be written -------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (KEY, None, "the value is NoneType, not a torch.Tensor"),
        (KEY, [1.0], "the value is list, not a torch.Tensor"),
        (KEY, torch.ones(2, dtype=torch.complex64), "torch dtype torch.complex64 has no"),
        (KEY, torch.ones(2).to_sparse(), "layout is torch.sparse_coo (call .to_dense() first)"),
        (KEY, torch.empty(2, device="meta"), "on the meta device"),
        ("__metadata__", torch.ones(1), "'__metadata__' is reserved"),
        ("\ud800", torch.ones(1), "cannot name a tensor"),
    ],
)
def test_unwritable_entries_are_refused_before_anything_is_written(
    tmp_path: Path, key: str, value: object, message: str
) -> None:
    sd = {"model." + key: value, "model.latent_pos_embed.pos_embed": torch.ones(2)}
    error = exact(
        UnsupportedTensorError,
        lambda: bv.save_bagel_checkpoint(sd, tmp_path / "out", strict=False),  # type: ignore[arg-type]
    )
    assert message in str(error) and "Nothing was written" in str(error)
    assert isinstance(error, TypeError) and isinstance(error, ValueError)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
