"""Distributed loading through torch.distributed.checkpoint: DTensors through the adapter, real
2-rank gloo runs on CPU (spawned processes, hard deadline), DCP conversion round trips.

All 2-rank load scenarios run in one spawned session (``rank_results``) to keep the suite fast;
each test below asserts one of its outcomes.
"""

from __future__ import annotations

import errno
import importlib.util
import math
import os
import pickle
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _dist_workers as workers
import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.filesystem as dcp_filesystem
from _multiprocess import RankFailure, run_ranks
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard

import bagelverify as bv
from bagelverify import cli
from bagelverify import strategies as bst
from bagelverify.buckets import Bucket
from bagelverify.distributed import dcp_to_hf, hf_to_dcp, load_bagel_checkpoint_distributed
from bagelverify.distributed.agreement import _differences, _identity_differences, quietly
from bagelverify.distributed.reader import _byte_span
from bagelverify.errors import CorruptCheckpointError, MissingKeysError, UnknownKeysError
from bagelverify.patch_embedding import PATCH_EMBEDDING_WEIGHT as PATCH
from bagelverify.patch_embedding import linear_patch_weight_to_conv
from bagelverify.safe_pickle import load_dcp_metadata
from bagelverify.safetensors_io import TensorInfo, save_tensors
from bagelverify.stage import STAGE_BUCKETS
from bagelverify.synthetic import make_synthetic_checkpoint

ADAPTER = bv.BagelStateDictAdapter()
FC1_3 = {f"vit_model.vision_model.encoder.layers.3.mlp.fc1.{p}" for p in ("weight", "bias")}


def dtensors(sd: dict[str, Any], mesh: DeviceMesh) -> dict[str, DTensor]:
    """One distinct DTensor per key, alternately row-sharded and replicated."""
    placements = ([Shard(0)], [Replicate()])
    return {
        key: DTensor.from_local(torch.zeros(2, 3), mesh, placements[i % 2])
        for i, key in enumerate(sd)
    }


@pytest.fixture(scope="class")
def mesh() -> Iterator[DeviceMesh]:
    """A one-rank gloo mesh in this process, torn down after the class that uses it."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


class TestAdapterOnOneRankMesh:
    """The adapter converts keys only: DTensor values come back as the very same objects."""

    @settings(deadline=None)  # DTensor construction is slow on a cold start
    @given(sd=bst.state_dicts(bst.any_keys(), max_size=30), stage=bst.stages)
    def test_from_hf_keeps_every_retained_dtensor_as_the_same_object(
        self, mesh: DeviceMesh, sd: dict[str, Any], stage: object
    ) -> None:
        hf = dtensors(sd, mesh)
        native = ADAPTER.from_hf(hf, device_mesh=mesh, stage=stage, strict=False)
        kept = STAGE_BUCKETS[bv.normalize_stage(stage)]
        expected = [k for k in hf if bv.classify(k) in kept]
        assert list(native) == ["model." + k for k in expected]
        assert all(native["model." + k] is hf[k] for k in expected)

    @settings(deadline=None)
    @given(sd=bst.state_dicts(bst.keys((Bucket.UND, Bucket.GEN)), max_size=30), data=st.data())
    def test_to_hf_then_from_hf_returns_the_same_dtensor_objects(
        self, mesh: DeviceMesh, sd: dict[str, Any], data: st.DataObject
    ) -> None:
        native = {"model." + k: v for k, v in dtensors(sd, mesh).items()}
        keys = sorted(native)
        subset = data.draw(st.lists(st.sampled_from(keys), unique=True) if keys else st.just([]))
        chosen = {k: native[k] for k in subset}
        hf = ADAPTER.to_hf(chosen)
        assert all(hf[k.removeprefix("model.")] is v for k, v in chosen.items())
        back = ADAPTER.from_hf(hf, device_mesh=mesh, stage=2, strict=False)
        assert back.keys() == chosen.keys()
        assert all(back[k] is v for k, v in chosen.items())


# -- a synthetic BAGEL folder and its variants --------------------------------------------------

SCALE = 64  # ~7 MB model file: every real key, every family, small tensors


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("distributed")
    synthetic = make_synthetic_checkpoint(root / "checkpoint", scale=SCALE, seed=3)
    config = synthetic.config
    full = bv.load_bagel_checkpoint_state_dict(synthetic.path, stage="stage2")
    hf = ADAPTER.to_hf(full)

    missing = root / "missing"  # loses vision layer 3's fc1 (weight and bias)
    missing.mkdir()
    save_tensors(missing / "ema.safetensors", {k: v for k, v in hf.items() if k not in FC1_3})
    config.save_pretrained(missing)

    bv.save_bagel_checkpoint(full, root / "sharded", max_shard_size="1MB", config=config)

    conv = root / "conv"  # the patch embedding stored as a Conv2d weight
    conv.mkdir()
    patch = dict(hf)
    patch[PATCH] = linear_patch_weight_to_conv(
        hf[PATCH], patch_size=config.vit_patch_size, channels=config.vit_num_channels
    )
    save_tensors(conv / "ema.safetensors", patch)
    config.save_pretrained(conv)

    unknown = root / "unknown"  # the release plus a key of no BAGEL family
    unknown.mkdir()
    save_tensors(unknown / "ema.safetensors", {**hf, "connector.fc3.weight": torch.zeros(2)})
    config.save_pretrained(unknown)

    # same keys, dtypes and shapes (so the same headers), other values
    make_synthetic_checkpoint(root / "twin", scale=SCALE, seed=4)

    hf_to_dcp(synthetic.path, root / "dcp", stage="stage2")
    (root / "scratch").mkdir()
    names = ("checkpoint", "missing", "sharded", "conv", "dcp", "unknown", "scratch", "twin")
    return {name: str(root / name) for name in names}


@pytest.fixture(scope="module")
def rank_results(folders: dict[str, str]) -> list[dict[str, Any]]:
    """The outcome of every scenario of ``_dist_workers.load_scenarios``, per rank."""
    return run_ranks(workers.load_scenarios, folders, world_size=2, timeout=150)


# -- 2-rank loads ------------------------------------------------------------------------------


def test_adapter_keeps_sharded_dtensors_on_two_ranks(rank_results: list[dict[str, Any]]) -> None:
    """On a real 2-rank mesh, from_hf and to_hf hand back each sharded DTensor unchanged."""
    adapter = [r["adapter"] for r in rank_results]
    assert [a["local_rows"] for a in adapter] == [3, 2]  # 5 rows split 3 + 2: really sharded
    assert all(a["same_native"] and a["same_back"] for a in adapter)


@pytest.mark.parametrize("scenario", ["stage1-None", "stage2-None", "stage2-torch.float32"])
def test_every_rank_shard_equals_its_slice_of_the_single_process_load(
    rank_results: list[dict[str, Any]], scenario: str
) -> None:
    """Row-sharded, column-sharded and replicated destinations, bf16 and f32 (master weights)."""
    keys = {"stage1": 821, "stage2": 1223}[scenario.split("-")[0]]
    for outcome in (r[scenario] for r in rank_results):
        assert outcome["keys"] == keys
        assert outcome["wrong"] == []
        missing, unexpected, _, _ = outcome["result"]
        assert (missing, unexpected) == ([], [])


@pytest.mark.parametrize("scenario", ["stage1-None", "stage2-None"])
def test_each_rank_reads_exactly_the_bytes_of_its_own_shards(
    rank_results: list[dict[str, Any]], scenario: str
) -> None:
    """bytes_read is the size of the rank's local shards: less than the kept bytes, and the
    ranks together read each sharded byte once (replicated tensors once per rank)."""
    outcomes = [r[scenario] for r in rank_results]
    for outcome in outcomes:
        _, _, bytes_read, bytes_loaded = outcome["result"]
        assert bytes_read == outcome["local_bytes"]
        assert 0 < bytes_read < bytes_loaded
    total = outcomes[0]["result"][3]
    assert sum(o["result"][2] for o in outcomes) < 2 * total


def test_each_rank_reads_exactly_the_file_ranges_of_its_rows(
    rank_results: list[dict[str, Any]],
) -> None:
    """Recorded reads (offset, length) equal the byte ranges of the rank's rows of each
    row-sharded tensor (computed from the header) and the whole of each replicated one; the only
    other reads are single-row column slices of column-sharded tensors, within their share."""
    for result in rank_results:
        ranges = result["ranges"]
        assert ranges["missing"] == []
        assert ranges["repeated"] == 0
        assert ranges["unexpected_bytes"] <= ranges["column_sharded_bytes"]


def test_f32_destinations_read_the_bf16_bytes_once(rank_results: list[dict[str, Any]]) -> None:
    for result in rank_results:
        outcome = result["stage2-torch.float32"]
        assert outcome["result"][2] * 2 == outcome["local_bytes"]


def test_missing_key_fails_on_every_rank_with_the_same_clear_error(
    rank_results: list[dict[str, Any]],
) -> None:
    errors = [r["missing"] for r in rank_results]
    assert errors[0] == errors[1]
    kind, message = errors[0]
    assert kind == "MissingKeysError"
    assert "vit.fc1: 2 keys missing (layers 3)" in message
    assert "ema.safetensors" in message


def test_one_rank_failing_its_checks_raises_its_error_on_every_rank(
    rank_results: list[dict[str, Any]],
) -> None:
    """Rank 1's destination has a wrong shape; rank 0's is fine but must not enter DCP alone."""
    errors = [r["one_rank_wrong"] for r in rank_results]
    assert errors[0] == errors[1]
    assert errors[0][0] == "ShapeMismatchError"
    found = re.search(r"destination \[(\d+), (\d+)\], file \[(\d+), (\d+)\]", errors[0][1])
    assert found is not None  # rank 1's destination has one row too many
    rows, cols, file_rows, file_cols = map(int, found.groups())
    assert (rows, cols) == (file_rows + 1, file_cols)


def test_ranks_passing_different_keys_are_refused_on_every_rank(
    rank_results: list[dict[str, Any]],
) -> None:
    errors = [r["keys_differ"] for r in rank_results]
    assert errors[0] == errors[1]
    assert errors[0][0] == "DistributedMismatchError"
    assert "rank 1 lacks 1 of rank 0's keys ('model.language_model." in errors[0][1]


def test_ranks_reading_different_folders_of_the_same_shapes_are_refused_on_every_rank(
    rank_results: list[dict[str, Any]], folders: dict[str, str]
) -> None:
    """Rank 1's folder passes every check on its own (same keys, shapes, headers): the ranks
    would load a mix of two checkpoints' rows, so both refuse, naming both folders."""
    errors = [r["folder_differs"] for r in rank_results]
    assert errors[0] == errors[1]
    kind, message = errors[0]
    assert kind == "DistributedMismatchError"
    twin, checkpoint = (str(Path(folders[name]).resolve()) for name in ("twin", "checkpoint"))
    assert f"rank 1: folder {twin} (rank 0: {checkpoint})" in message
    assert "file ema.safetensors" not in message  # same size and header: only the folder differs


def test_ranks_passing_different_load_arguments_are_refused_before_any_read(
    rank_results: list[dict[str, Any]],
) -> None:
    """stage 1 on rank 0 and 2 on rank 1 (strict=False) left rank 0's GEN shards unloaded
    without an error; strict and cast differing are refused the same way."""
    for name, differences in (
        ("stage_differs", ["stage 'stage2' (rank 0: 'stage1')"]),
        ("strict_cast_differ", ["strict False (rank 0: True)", "cast 'any' (rank 0: 'lossless')"]),
    ):
        errors = [r[name] for r in rank_results]
        assert errors[0] == errors[1]
        kind, message = errors[0]
        assert kind == "DistributedMismatchError"
        assert "rank 1: " + ", ".join(differences) in message
        assert all(r[name + "_untouched"] for r in rank_results)


def test_identity_differences_name_each_differing_field_against_rank_0() -> None:
    base = {"folder": "/a", "file ema.safetensors": "10 bytes", "stage": "'stage1'"}
    other = {"folder": "/a", "file model.safetensors": "12 bytes", "stage": "'stage1'"}
    assert _identity_differences([base, dict(base)]) == []
    assert _identity_differences([base, dict(base), other]) == [
        "rank 2: file ema.safetensors absent (rank 0: 10 bytes), "
        "file model.safetensors 12 bytes (rank 0: absent)"
    ]


def _wrapped(*failures: BaseException) -> CheckpointException:
    return CheckpointException(
        "load", {rank: _wrap_exception(e) for rank, e in enumerate(failures)}
    )


@pytest.mark.parametrize(
    ("failures", "raised"),
    [
        ((RuntimeError("x"), OSError(errno.ENOSPC, "full"), KeyboardInterrupt()), 2),
        ((RuntimeError("x"), CorruptCheckpointError("cut"), OSError(errno.EIO, "io")), 1),
        ((RuntimeError("x"), OSError(errno.EIO, "io")), 1),
        ((RuntimeError("x"),), 0),
    ],
)
def test_dcp_failures_are_re_raised_as_themselves_interrupts_first(
    failures: tuple[BaseException, ...], raised: int
) -> None:
    """DCP's CheckpointException (a BaseException) never escapes: an interrupt on any rank
    wins, then a bagelverify error, then an OSError, then whatever failed."""

    def fail() -> None:
        raise _wrapped(*failures)

    with pytest.raises(BaseException) as caught:
        quietly(fail)
    assert caught.value is failures[raised]
    assert isinstance(caught.value.__cause__, CheckpointException)


def test_rank_differences_name_the_keys_that_differ() -> None:
    base = {"a": "[2, 3] torch.bfloat16", "b": "[4] torch.float32"}
    assert _differences([base, dict(base)]) == []
    assert _differences([base, {"a": "[3, 3] torch.bfloat16", "c": "[] int"}]) == [
        "rank 1 lacks 1 of rank 0's keys ('b'), has 1 key rank 0 lacks ('c'), "
        "1 differ from rank 0's ('a [2, 3] torch.bfloat16 vs [3, 3] torch.bfloat16')"
    ]


@pytest.mark.parametrize("scenario", ["sharded_wrong", "conv_wrong", "dcp_resume_wrong"])
def test_sharded_folders_conv_patch_weights_and_dcp_resume_load_correct_shards(
    rank_results: list[dict[str, Any]], scenario: str
) -> None:
    """Index + shards, a Conv2d patch weight converted on load, and dcp.load from hf_to_dcp."""
    assert [r[scenario] for r in rank_results] == [[], []]


# -- single process ---------------------------------------------------------------------------


def test_without_a_process_group_it_loads_like_load_into(folders: dict[str, str]) -> None:
    assert not dist.is_initialized()
    reference = bv.load_bagel_checkpoint_state_dict(folders["checkpoint"], stage="stage2")
    plain = {k: torch.full_like(v, float("nan")) for k, v in reference.items()}
    result = load_bagel_checkpoint_distributed(plain, folders["checkpoint"], stage="stage2")
    assert all(torch.equal(plain[k], v) for k, v in reference.items())
    assert (
        result.bytes_read
        == result.bytes_loaded
        == sum(v.numel() * v.element_size() for v in reference.values())
    )


def test_errors_are_the_single_process_loaders_errors(folders: dict[str, str]) -> None:
    reference = bv.load_bagel_checkpoint_state_dict(folders["checkpoint"], stage="stage1")
    with pytest.raises(MissingKeysError) as single:
        bv.load_into(dict(reference), folders["missing"], stage="stage1")
    with pytest.raises(MissingKeysError) as distributed:
        load_bagel_checkpoint_distributed(dict(reference), folders["missing"], stage="stage1")
    assert str(single.value) == str(distributed.value)


# -- DCP conversion ----------------------------------------------------------------------------


def raw(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...], bytes]]:
    tensors = load_file(str(path))
    return {
        k: (v.dtype, tuple(v.shape), v.contiguous().view(torch.uint8).numpy().tobytes())
        for k, v in tensors.items()
    }


def test_hf_to_dcp_to_hf_round_trip_is_bit_identical(
    folders: dict[str, str], tmp_path: Path
) -> None:
    """Every tensor (key, dtype, shape, bytes) and the config come back unchanged."""
    source = Path(folders["checkpoint"])
    assert dcp_to_hf(folders["dcp"], tmp_path / "back") == 1223
    assert raw(tmp_path / "back" / "ema.safetensors") == raw(source / "ema.safetensors")
    assert bv.BagelConfig.from_pretrained(tmp_path / "back") == bv.BagelConfig.from_pretrained(
        source
    )


def test_dcp_to_hf_stage1_writes_only_und_tensors(folders: dict[str, str], tmp_path: Path) -> None:
    assert dcp_to_hf(folders["dcp"], tmp_path, stage=1) == 821
    written = raw(tmp_path / "ema.safetensors")
    source = raw(Path(folders["checkpoint"]) / "ema.safetensors")
    assert written == {k: v for k, v in source.items() if bv.classify(k) is Bucket.UND}


def test_hf_to_dcp_validates_before_writing(folders: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(MissingKeysError, match=r"vit\.fc1"):
        hf_to_dcp(folders["missing"], tmp_path / "out", stage=1)
    assert not (tmp_path / "out").exists()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dcp_to_hf_refuses_unknown_keys_and_non_tensor_entries(tmp_path: Path) -> None:
    dcp.save(
        {"model.vit_model.typo.weight": torch.zeros(2)}, checkpoint_id=tmp_path / "a", no_dist=True
    )
    with pytest.raises(UnknownKeysError, match="typo"):
        dcp_to_hf(tmp_path / "a", tmp_path / "a_out")
    dcp.save(
        {"model.step": 3, "model.x": torch.zeros(1)}, checkpoint_id=tmp_path / "b", no_dist=True
    )
    with pytest.raises(CorruptCheckpointError, match=r"1 entry is not a tensor: 'model\.step'"):
        dcp_to_hf(tmp_path / "b", tmp_path / "b_out")
    with pytest.raises(FileNotFoundError, match=r"\.metadata"):
        dcp_to_hf(tmp_path / "nothing", tmp_path / "c_out")


def _fail_after(count: int, fault: BaseException) -> Any:
    """A stand-in for a DCP internal that runs the real one ``count`` times, then raises."""

    def install(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        real = getattr(dcp_filesystem, name)
        calls = iter(range(count + 1))

        def failing(*args: Any, **kwargs: Any) -> Any:
            if next(calls, count) == count:
                raise fault
            return real(*args, **kwargs)

        monkeypatch.setattr(dcp_filesystem, name, failing)

    return install


DISK_FULL = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("fault", [DISK_FULL, KeyboardInterrupt()], ids=["enospc", "interrupt"])
def test_hf_to_dcp_failing_inside_dcps_writer_raises_ours_and_leaves_nothing(
    folders: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: BaseException
) -> None:
    """A full disk (injected ENOSPC in DCP's file writes) is the OSError naming the output
    folder, Ctrl-C is KeyboardInterrupt -- not DCP's CheckpointException -- and the files and
    folders the call created are removed; what the folder held before stays."""
    _fail_after(5, fault)(monkeypatch, "_write_item")
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("mine")
    for target in (tmp_path / "new" / "dcp", tmp_path / "kept"):
        with pytest.raises(type(fault)) as raised:
            hf_to_dcp(folders["checkpoint"], target)
        if isinstance(fault, OSError):
            assert raised.value.errno == errno.ENOSPC
            assert f"No space left on device while writing {target};" in str(raised.value)
    assert not (tmp_path / "new").exists()
    assert os.listdir(tmp_path / "kept") == ["notes.txt"]


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dcp_to_hf_names_a_truncated_or_damaged_data_file_and_leaves_nothing(
    folders: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "dcp"
    shutil.copytree(folders["dcp"], source)
    largest = max(source.glob("*.distcp"), key=lambda path: path.stat().st_size)
    data = largest.read_bytes()
    largest.write_bytes(data[: len(data) // 2])  # a copy cut short: refused before any write
    with pytest.raises(CorruptCheckpointError, match=rf"{largest.name} \({len(data) // 2:,} b"):
        dcp_to_hf(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    largest.write_bytes(b"\xff" * len(data))  # the right size, but not DCP data
    with pytest.raises(CorruptCheckpointError, match=rf"^{re.escape(str(largest))}: the data of"):
        dcp_to_hf(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    metadata = load_dcp_metadata(source / ".metadata")  # an entry stored outside the folder
    entry = next(iter(metadata.storage_data.values()))
    entry.relative_path = "../secret"
    (source / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CorruptCheckpointError, match=r"is stored at '\.\./secret'"):
        dcp_to_hf(source, tmp_path / "out")


def test_dcp_to_hf_interrupted_inside_dcps_reader_raises_keyboardinterrupt_and_leaves_nothing(
    folders: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fail_after(10, KeyboardInterrupt())(monkeypatch, "narrow_tensor_by_index")
    with pytest.raises(KeyboardInterrupt):
        dcp_to_hf(folders["dcp"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_convert_to_dcp_on_a_full_disk_prints_one_line(
    folders: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The command line reports DCP's faults as its own errors: one line, exit code 3."""
    _fail_after(5, DISK_FULL)(monkeypatch, "_write_item")
    argv = ["convert", folders["checkpoint"], str(tmp_path / "out"), "--stage", "2", "--to", "dcp"]
    assert cli.main(argv) == 3
    error = capsys.readouterr().err
    assert error.startswith("bagelverify convert: error: [Errno 28] No space left on device")
    assert error.count("\n") == 1
    assert not (tmp_path / "out").exists()


# -- byte ranges of slices ---------------------------------------------------------------------


@st.composite
def slices_of_tensors(draw: st.DrawFn) -> tuple[tuple[int, ...], list[int], list[int]]:
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=4)))
    offsets = [draw(st.integers(0, n - 1)) for n in shape]
    lengths = [draw(st.integers(1, n - o)) for n, o in zip(shape, offsets, strict=True)]
    return shape, offsets, lengths


@given(slices_of_tensors())
def test_byte_span_is_the_slice_bytes_exactly_when_they_are_contiguous(
    case: tuple[tuple[int, ...], list[int], list[int]],
) -> None:
    """_byte_span gives (start, size) iff the slice's elements are one run of the flat tensor,
    and then that run is the slice."""
    shape, offsets, lengths = case
    flat = torch.arange(math.prod(shape))
    picked = flat.reshape(shape)[
        tuple(slice(o, o + n) for o, n in zip(offsets, lengths, strict=True))
    ]
    picked = picked.flatten()
    run = bool(torch.equal(picked, torch.arange(int(picked[0]), int(picked[0]) + picked.numel())))
    info = TensorInfo(Path("x"), "t", "I64", shape, 1000, 1000 + 8 * flat.numel())
    span = _byte_span(info, offsets, lengths)
    assert (span is not None) == run
    if span is not None:
        assert span == (1000 + 8 * int(picked[0]), 8 * picked.numel())


def test_hf_to_dcp_converts_a_conv_patch_weight_when_asked(
    folders: dict[str, str], tmp_path: Path
) -> None:
    """The Conv2d patch weight is refused by default, and converted to the Linear layout with
    the flag: the DCP checkpoint then equals the one made from the Linear original."""
    with pytest.raises(bv.ShapeMismatchError, match="convert_conv_patch_embedding"):
        hf_to_dcp(folders["conv"], tmp_path / "refused")
    hf_to_dcp(folders["conv"], tmp_path / "dcp", convert_conv_patch_embedding=True)
    dcp_to_hf(tmp_path / "dcp", tmp_path / "hf")
    assert raw(tmp_path / "hf" / "ema.safetensors") == raw(
        Path(folders["checkpoint"]) / "ema.safetensors"
    )


def test_importing_the_package_neither_loads_dcp_nor_starts_distributed() -> None:
    """The distributed names are exported lazily: importing bagelverify stays light."""
    code = (
        "import sys, bagelverify, torch.distributed as d; "
        "assert 'bagelverify.distributed' not in sys.modules; "
        "assert 'torch.distributed.checkpoint' not in sys.modules; "
        "assert not d.is_initialized(); "
        "assert bagelverify.load_bagel_checkpoint_distributed.__module__ == "
        "'bagelverify.distributed'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_harness_reports_a_failing_rank_instead_of_hanging() -> None:
    """Rank 1 raises while rank 0 waits in a barrier: run_ranks returns the traceback promptly
    (the waiting rank is released by gloo or killed at the deadline), never hangs."""
    with pytest.raises(RankFailure, match="rank one broke"):
        run_ranks(workers.fail_on_rank_one, timeout=60)


def test_without_strict_the_common_keys_load_and_the_rest_is_reported(
    folders: dict[str, str],
) -> None:
    reference = bv.load_bagel_checkpoint_state_dict(folders["checkpoint"], stage="stage1")
    dropped = next(iter(reference))
    model = {k: torch.zeros_like(v) for k, v in reference.items() if k != dropped}
    model["model.vit_model.vision_model.encoder.layers.99.mlp.fc1.bias"] = torch.zeros(3)
    result = load_bagel_checkpoint_distributed(
        model, folders["checkpoint"], stage="stage1", strict=False
    )
    assert result.missing_keys == ["model.vit_model.vision_model.encoder.layers.99.mlp.fc1.bias"]
    assert result.unexpected_keys == [dropped]
    assert all(torch.equal(model[k], reference[k]) for k in reference if k != dropped)


def test_hf_to_dcp_from_a_sharded_folder_round_trips_to_the_single_file(
    folders: dict[str, str], tmp_path: Path
) -> None:
    """Index + shards are mapped file by file; the way back gives the single-file checkpoint."""
    hf_to_dcp(folders["sharded"], tmp_path / "dcp")
    dcp_to_hf(tmp_path / "dcp", tmp_path / "hf")
    assert raw(tmp_path / "hf" / "ema.safetensors") == raw(
        Path(folders["checkpoint"]) / "ema.safetensors"
    )


needs_automodel = pytest.mark.skipif(
    importlib.util.find_spec("nemo_automodel") is None, reason="nemo_automodel not installed"
)


@needs_automodel
def test_automodels_checkpointer_fills_fsdp2_shards_through_the_engine_on_two_ranks(
    folders: dict[str, str],
) -> None:
    """After install(), ``Checkpointer.load_model(..., is_init_step=True)`` into Automodel's
    BAGEL model under ``fully_shard`` (2 gloo ranks): every rank's ``Shard(0)`` slices equal the
    file's rows, each rank reads through the engine only its own share of the bytes, a
    checkpoint with an unknown key is refused on both ranks before any shard changes, and a read
    failing inside DCP raises bagelverify's error on both ranks."""
    ranks = run_ranks(workers.automodel_fsdp_load, folders, timeout=240.0)
    for result in ranks:
        loaded = result["checkpoint"]
        assert loaded["keys"] == 1223 and loaded["wrong"] == []
        assert loaded["row_sharded"] == 1223
        assert 0 < loaded["read"] <= loaded["share"]
        refused = result["unknown"]
        assert refused["error"][0] == "UnknownKeysError" and "connector.fc3" in refused["error"][1]
        assert refused["untouched"] and refused["read"] == 0
        # a read failing inside Automodel's dcp.load is our error, not DCP's CheckpointException
        assert result["cut"]["error"][0] == "ReadError"
        assert "cut short (injected)" in result["cut"]["error"][1]
    total = sum(
        info.nbytes
        for info in bv.inspect_checkpoint(folders["checkpoint"], stage=2).retained.values()
    )
    assert sum(result["checkpoint"]["read"] for result in ranks) == total
