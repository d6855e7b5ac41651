"""Fuzzing the file entry points: mutated safetensors files (bytes flipped, cut, extended,
spliced; header fields rewritten; length prefix changed) and odd state-dict values.

Invariant everywhere: a call returns a correct result or raises a documented error
(:class:`~bagelverify.errors.BagelError`; for savers also ``TypeError`` for a non-``str`` key,
as ``check_key`` documents); anything else -- ``KeyError``, ``OverflowError``, ``RuntimeError``
from torch, ``RecursionError``, a crash -- is a bug. Run with ``HYPOTHESIS_PROFILE=stress`` for
the long run (see the README).
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import safetensors
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bagelverify as bv
from bagelverify import safetensors_io
from bagelverify.buckets import Bucket
from bagelverify.checkpoint import build_report
from bagelverify.errors import BagelError, MissingKeysError, UnsupportedTensorError
from bagelverify.manifest import load_manifest
from bagelverify.partition import classify
from bagelverify.plan import plan
from bagelverify.safetensors_io import DTYPES, read_header, save_tensors

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])

EMA = load_manifest()["ema.safetensors"]
UND = [k for k in EMA if classify(k) is Bucket.UND]
GEN = [k for k in EMA if classify(k) is Bucket.GEN]
VAE = list(load_manifest()["ae.safetensors"])

# Small valid files written by our own writer: real keys (so the loaders get past the key
# checks and read data), mixed dtypes, a zero-size and a 0-d tensor, tensors out of order.
MODEL_TENSORS = {
    UND[0]: torch.arange(6, dtype=torch.bfloat16).reshape(2, 3),
    UND[1]: torch.arange(3, dtype=torch.float32),
    GEN[0]: torch.zeros(0, 4, dtype=torch.float16),
    "language_model.model.norm.weight": torch.tensor(2.5, dtype=torch.float64),
    GEN[1]: torch.tensor([1, 2], dtype=torch.int64),
}
VAE_TENSORS = {VAE[0]: torch.ones(2, 2), VAE[1]: torch.arange(4, dtype=torch.bfloat16)}


def _file_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "x.safetensors"
        save_tensors(path, tensors)
        return path.read_bytes()


MODEL_FILE = _file_bytes(MODEL_TENSORS)
VAE_FILE = _file_bytes(VAE_TENSORS)


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    """One folder the examples of a test overwrite (function-scoped tmp_path does not mix with
    Hypothesis)."""
    folder = Path(tempfile.mkdtemp(prefix="bagelverify-fuzz-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


# -- mutations --------------------------------------------------------------------------------


def _header_end(data: bytes) -> int:
    return 8 + struct.unpack("<Q", data[:8])[0]


def positions(data: bytes, header_end: int) -> st.SearchStrategy[int]:
    """Positions in ``data`` (non-empty), mostly in the prefix and the original header span
    (where validation lives)."""
    return st.one_of(
        st.integers(0, min(header_end, len(data)) - 1),
        st.integers(0, len(data) - 1),
        st.integers(0, min(8, len(data)) - 1),
    )


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.sampled_from([0, 1, -1, 2**31, 2**63 - 1, 2**63, 2**64])
    | st.floats()
    | st.text(max_size=6)
    | st.sampled_from([*DTYPES, "F4", "C64", "f32", "__metadata__", "\ud800"]),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)


def _encode(document: dict[str, Any], data: bytes, prefix: int | None = None) -> bytes:
    body = json.dumps(document, ensure_ascii=True).encode()
    return struct.pack("<Q", len(body) if prefix is None else prefix) + body + data


@st.composite
def rewritten(draw: st.DrawFn, base: bytes) -> bytes:
    """The header parsed, one thing in it changed, and re-encoded with a correct prefix."""
    end = _header_end(base)
    document: dict[str, Any] = json.loads(base[8:end])
    data = base[end:]
    names = [n for n in document if n != "__metadata__"]
    name = draw(st.sampled_from(names))
    action = draw(
        st.sampled_from(
            ["set field", "drop field", "add field", "replace entry", "rename", "metadata", "shift"]
        )
    )
    if action == "set field":
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        document[name][field] = draw(
            json_values | st.lists(st.integers(-3, 2**64), min_size=0, max_size=4)
        )
    elif action == "drop field":
        del document[name][draw(st.sampled_from(["dtype", "shape", "data_offsets"]))]
    elif action == "add field":
        document[name][draw(st.text(max_size=5))] = draw(json_values)
    elif action == "replace entry":
        document[name] = draw(json_values)
    elif action == "rename":
        document[draw(st.sampled_from([*names, "__metadata__", "", "\ud800", "x"]))] = document.pop(
            name
        )
    elif action == "metadata":
        document["__metadata__"] = draw(json_values)
    else:  # move one tensor's bytes
        begin, stop = document[name]["data_offsets"]
        delta = draw(st.integers(-16, 16))
        document[name]["data_offsets"] = [begin + delta, stop + draw(st.sampled_from([0, delta]))]
    if draw(st.booleans()):
        data = data + b"\0" * draw(st.integers(0, 16))
    return _encode(document, data)


@st.composite
def mutated(draw: st.DrawFn, base: bytes) -> bytes:
    """``base`` with bytes flipped, cut, extended, spliced or its length prefix replaced, or a
    header field rewritten; sometimes several of these."""
    data = base
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "cut", "extend", "splice", "prefix", "rewrite"]))
        if kind == "rewrite" and data == base:
            data = draw(rewritten(base))
        elif kind == "flip" and data:
            at = draw(positions(data, _header_end(base)))
            data = data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1 :]
        elif kind == "cut":
            data = data[: draw(st.integers(0, len(data)))]
        elif kind == "extend":
            data = data + draw(st.binary(min_size=1, max_size=32))
        elif kind == "splice" and data:
            at = draw(positions(data, _header_end(base)))
            gone = draw(st.integers(0, 8))
            data = data[:at] + draw(st.binary(max_size=8)) + data[at + gone :]
        elif kind == "prefix" and len(data) >= 8:
            length = struct.unpack("<Q", data[:8])[0]
            new = draw(
                st.one_of(
                    st.integers(0, 2**64 - 1),
                    st.integers(max(0, length - 9), min(2**64 - 1, length + 9)),
                )
            )
            data = struct.pack("<Q", new) + data[8:]
    return data


# -- oracles ---------------------------------------------------------------------------------


def check_against_reference(path: Path) -> safetensors_io.SafetensorsHeader | None:
    """``read_header`` accepts or raises CorruptCheckpointError; what it accepts, safetensors'
    own reader accepts too, with the same names, dtypes and shapes."""
    try:
        header = read_header(path)
    except bv.CorruptCheckpointError as error:
        assert str(error).startswith(f"{path}: ")
        return None
    with safetensors.safe_open(str(path), "pt") as theirs:
        assert set(theirs.keys()) == set(header.tensors)
        for name, info in header.tensors.items():
            assert list(theirs.get_slice(name).get_shape()) == list(info.shape)
            assert theirs.get_slice(name).get_dtype() == info.dtype
    return header


def check_loaded(path: Path, loaded: dict[str, torch.Tensor], native: bool) -> None:
    """Every loaded tensor holds exactly its bytes of the file."""
    header = read_header(path)
    raw = path.read_bytes()
    for key, tensor in loaded.items():
        info = header.tensors[key[len("model.") :] if native else key]
        assert tensor.dtype == info.torch_dtype and tuple(tensor.shape) == info.shape
        assert bytes(safetensors_io.byte_view(tensor)) == raw[info.start : info.end]


def documented(call: Callable[[], Any]) -> Any:
    """``call()``'s result, or ``None`` when it raised a BagelError with a message."""
    try:
        return call()
    except BagelError as error:
        assert str(error)
        return None


# -- header fuzzing ----------------------------------------------------------------------------


@FUZZ
@given(data=mutated(MODEL_FILE))
def test_read_header_accepts_only_what_safetensors_reads(workdir: Path, data: bytes) -> None:
    """read_header on mutated bytes: CorruptCheckpointError naming the file, or a header the
    reference reader agrees with."""
    path = workdir / "x.safetensors"
    path.write_bytes(data)
    check_against_reference(path)


@FUZZ
@given(data=mutated(MODEL_FILE), stage=st.sampled_from([1, 2]))
def test_model_entry_points_on_mutated_files(workdir: Path, data: bytes, stage: int) -> None:
    """inspect_checkpoint and load_bagel_checkpoint_state_dict on a mutated ema.safetensors:
    a documented error, or the file's exact bytes for every kept tensor."""
    folder = workdir / "model"
    folder.mkdir(exist_ok=True)
    path = folder / "ema.safetensors"
    path.write_bytes(data)
    documented(lambda: bv.inspect_checkpoint(folder, stage=stage))
    loaded = documented(
        lambda: bv.load_bagel_checkpoint_state_dict(folder, stage=stage, strict=False)
    )
    if loaded is not None:
        check_loaded(path, loaded, native=True)


@FUZZ
@given(data=mutated(VAE_FILE))
def test_vae_loader_on_mutated_files(workdir: Path, data: bytes) -> None:
    """load_bagel_vae_state_dict on a mutated ae.safetensors: a documented error, or the
    file's exact bytes."""
    folder = workdir / "vae"
    folder.mkdir(exist_ok=True)
    path = folder / "ae.safetensors"
    path.write_bytes(data)
    loaded = documented(lambda: bv.load_bagel_vae_state_dict(folder))
    if loaded is not None:
        check_loaded(path, loaded, native=False)


@FUZZ
@given(data=rewritten(MODEL_FILE))
def test_rewritten_header_fields(workdir: Path, data: bytes) -> None:
    """Header fields replaced by arbitrary JSON: read_header agrees with the reference reader
    or raises CorruptCheckpointError; loading reads exact bytes or raises a BagelError."""
    folder = workdir / "rewritten"
    folder.mkdir(exist_ok=True)
    path = folder / "ema.safetensors"
    path.write_bytes(data)
    check_against_reference(path)
    loaded = documented(lambda: bv.load_bagel_checkpoint_state_dict(folder, stage=2, strict=False))
    if loaded is not None:
        check_loaded(path, loaded, native=True)


# -- state-dict values through the saver -------------------------------------------------------


TORCH_DTYPES = [
    getattr(torch, name)
    for name in [
        "float32", "float16", "bfloat16", "float64", "int8", "int16", "int32", "int64", "uint8",
        "uint16", "uint32", "uint64", "bool", "complex64", "float8_e4m3fn", "float8_e5m2",
        "float8_e4m3fnuz",
    ]
    if hasattr(torch, name)
]  # fmt: skip


NEGATABLE = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64)


WRITABLE_DTYPES = [dtype for dtype in TORCH_DTYPES if dtype in safetensors_io.DTYPE_BY_TORCH]


@st.composite
def odd_tensors(draw: st.DrawFn, *, writable: bool = False) -> object:
    """Tensors of every dtype and many memory layouts (transposed, strided, expanded, offset,
    lazily negated or conjugated, zero-size, 0-d, Parameters), plus values that are no dense
    tensor at all; with ``writable``, only dense tensors of safetensors dtypes."""
    kinds = ["tensor"] if writable else ["tensor"] * 25 + ["meta", "sparse", "none", "num", "list"]
    kind = draw(st.sampled_from(kinds))
    if kind in ("none", "num", "list"):
        return {"none": None, "num": 1.5, "list": [1.0, 2.0]}[kind]
    dtype = draw(st.sampled_from(WRITABLE_DTYPES if writable else TORCH_DTYPES))
    shape = draw(st.lists(st.integers(0, 4), max_size=3))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    base = (torch.randn(shape, generator=generator) * 100).to(dtype)
    if kind == "meta":
        return base.to("meta")
    if kind == "sparse":
        return torch.ones(shape).to_sparse()
    for change in draw(
        st.lists(
            st.sampled_from(["t", "step", "expand", "offset", "neg", "conj", "param"]), max_size=3
        )
    ):
        if change == "t" and base.dim() >= 2:
            base = base.transpose(0, 1)
        elif change == "step" and base.dim() >= 1:
            base = base[::2]
        elif change == "expand":
            base = base.unsqueeze(0).expand(2, *base.shape)
        elif change == "offset" and base.dim() >= 1 and base.shape[0] > 1:
            base = base[1:]
        elif change == "neg" and base.dtype in NEGATABLE:  # float8 has no neg to resolve
            base = torch._neg_view(base)
        elif change == "conj" and base.is_complex():
            base = base.conj()
        elif change == "param" and (base.is_floating_point() or base.is_complex()):
            base = torch.nn.Parameter(base.detach().clone(), requires_grad=True)
    return base


ODD_KEYS = [
    "model.__metadata__",
    "model.unknown.weight",
    "model.\ud800",
    "no_root",
    "model.language_model.model.layers.0.self_attn.q_proj._extra_state",
    0,
]
_real_keys = st.sampled_from(UND + GEN).map(lambda k: "model." + k)
native_keys = st.one_of(_real_keys, _real_keys, _real_keys, st.sampled_from(ODD_KEYS))


def _expected_bytes(value: torch.Tensor) -> bytes:
    plain = value.detach().resolve_conj().resolve_neg().contiguous()
    return bytes(safetensors_io.byte_view(plain))


def _fingerprint(sd: dict[Any, Any]) -> list[tuple[Any, Any, bytes | None]]:
    """(key, value object, value bytes when it has any) for every item, in order."""
    return [
        (
            k,
            v,
            _expected_bytes(v)
            if isinstance(v, torch.Tensor) and v.layout == torch.strided and v.device.type != "meta"
            else None,
        )
        for k, v in sd.items()
    ]


def assert_round_trip(folder: Path, sd: dict[str, Any], stage: int = 2) -> None:
    """The saved folder loads back as the entries of ``sd`` the stage keeps, with their values."""
    loaded = bv.load_bagel_checkpoint_state_dict(folder, stage=stage, strict=False)
    kept = (Bucket.UND, Bucket.GEN) if stage == 2 else (Bucket.UND,)
    assert loaded.keys() == {k for k in sd if k.startswith("model.") and classify(k[6:]) in kept}
    for key, tensor in loaded.items():
        value = sd[key]
        assert tensor.dtype == value.dtype and tensor.shape == value.shape
        assert bytes(safetensors_io.byte_view(tensor)) == _expected_bytes(value)


shard_sizes = st.sampled_from([None, 1, "1KB"])


@FUZZ
@given(
    sd=st.dictionaries(native_keys, odd_tensors(), max_size=5),
    strict=st.booleans(),
    shard_size=shard_sizes,
)
def test_save_with_odd_values(
    workdir: Path, sd: dict[Any, Any], strict: bool, shard_size: int | str | None
) -> None:
    """save_bagel_checkpoint on odd values: a documented error with no file under a final name,
    or a checkpoint that loads back bit-identical (views materialised); the input mapping and
    its tensors are never changed."""
    folder = workdir / "saved"
    shutil.rmtree(folder, ignore_errors=True)
    before = _fingerprint(sd)
    try:
        bv.save_bagel_checkpoint(sd, folder, stage=2, strict=strict, max_shard_size=shard_size)
    except (BagelError, TypeError) as error:
        if not isinstance(error, BagelError):
            assert any(not isinstance(k, str) for k in sd)  # check_key's documented TypeError
        assert str(error)
        assert not folder.exists() or not [
            p for p in folder.iterdir() if not p.name.startswith(".")
        ]
    else:
        assert_round_trip(folder, sd)
    after = _fingerprint(sd)
    assert [(k, v) for k, v, _ in after] == [(k, v) for k, v, _ in before]  # same objects
    assert [b for *_, b in after] == [b for *_, b in before]  # same values


@FUZZ
@given(
    sd=st.dictionaries(_real_keys, odd_tensors(writable=True), min_size=1, max_size=5),
    shard_size=shard_sizes,
)
def test_writable_values_round_trip_whatever_their_layout(
    workdir: Path, sd: dict[str, torch.Tensor], shard_size: int | str | None
) -> None:
    """Every dense tensor of a safetensors dtype saves and loads back with its values,
    whatever its memory layout; the input is never changed."""
    folder = workdir / "writable"
    shutil.rmtree(folder, ignore_errors=True)
    before = _fingerprint(sd)
    buckets = {classify(key[len("model.") :]) for key in sd}
    stage = 2 if Bucket.GEN in buckets else 1  # the stage the key set is made for
    # strict=False: a random key set may hold a GEN key without its UND twin
    if Bucket.UND not in buckets:  # no stage is made of GEN weights alone (issue 27)
        with pytest.raises(MissingKeysError, match="understanding weights"):
            bv.save_bagel_checkpoint(sd, folder, stage=stage, strict=False)
    else:
        bv.save_bagel_checkpoint(sd, folder, stage=stage, strict=False, max_shard_size=shard_size)
        assert_round_trip(folder, sd, stage)
    assert _fingerprint(sd) == before


def test_unsupported_dtype_error_names_key_and_remedy(tmp_path: Path) -> None:
    key = UND[0]  # the saver checks HF keys: the native key without its model. root
    with pytest.raises(UnsupportedTensorError, match=rf"'{key}': torch dtype torch.complex64 has"):
        bv.save_bagel_checkpoint({"model." + key: torch.ones(1, dtype=torch.complex64)}, tmp_path)


VIEWS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "negated": torch._neg_view,
    "transposed": lambda t: t.t(),
    "expanded": lambda t: t[:1].expand(3, 4),
    "offset": lambda t: t[1:],
    "parameter": lambda t: torch.nn.Parameter(t.clone()),
}


@pytest.mark.parametrize("view", list(VIEWS))
def test_views_are_written_as_their_values(tmp_path: Path, view: str) -> None:
    """What is written is the tensor's values, not its raw memory."""
    key = "model." + UND[0]
    value = VIEWS[view](torch.arange(12, dtype=torch.float32).reshape(3, 4) + 1)
    bv.save_bagel_checkpoint({key: value}, tmp_path, stage=1, strict=False)
    loaded = bv.load_bagel_checkpoint_state_dict(tmp_path, strict=False)
    assert torch.equal(loaded[key], value.detach().resolve_neg())


# -- aliasing on the key-only paths ---------------------------------------------------------------


@FUZZ
@given(
    keys=st.lists(st.sampled_from(UND + GEN + VAE), unique=True, max_size=10),
    stage=st.sampled_from([1, 2]),
)
def test_key_only_paths_never_copy_or_mutate(keys: list[str], stage: int) -> None:
    """plan(), Adapter.plan(), partition() and build_report() over a real state dict: the
    mapping keeps its items and order, and every tensor keeps its object, storage and values
    (partition returns the very same objects)."""
    sd = {k: torch.full((2,), float(i)) for i, k in enumerate(keys)}
    snapshot = [(k, v, v.data_ptr(), v.clone()) for k, v in sd.items()]
    bv.BagelStateDictAdapter().plan(sd, stage=stage)
    plan(sd, stage=stage)
    parts = bv.partition(sd)
    for bucket_items in parts.values():
        for key, value in bucket_items.items():
            assert value is sd[key]
    specs = {k: safetensors_io.spec_of(k, v) for k, v in sd.items()}
    build_report(specs, stage=stage)
    assert [(k, v, v.data_ptr()) for k, v in sd.items()] == [(k, v, p) for k, v, p, _ in snapshot]
    assert all(torch.equal(v, copy) for _, v, _, copy in snapshot)
