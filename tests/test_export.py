"""``export_checkpoint`` / ``bagelverify export`` on real NeMo Automodel 0.7.0 step folders.

Each step folder is written by Automodel itself: a tiny BAGEL model saved by
``Checkpointer.save_model`` (DCP, or Automodel's safetensors format) and an ``EMAManager`` saved
by ``save_distributed_state``, in one process or on 2 gloo ranks under ``fully_shard``.
Skipped (one line) where ``nemo_automodel`` is not installed; CI installs it.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import shutil
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import _dist_workers as workers
import pytest
import safetensors.torch
import torch
import torch.distributed.checkpoint as dcp
from _multiprocess import run_ranks
from hypothesis import given, settings
from hypothesis import strategies as st
from test_automodel import am, build, checkpointer, needs_automodel
from test_json_schema import assert_valid

import bagelverify as bv
from bagelverify import cli, export
from bagelverify.buckets import Bucket
from bagelverify.families import expected_shapes
from bagelverify.partition import classify
from bagelverify.safetensors_io import save_tensors
from bagelverify.synthetic import scaled_config

pytestmark = needs_automodel
__all__ = ["am"]  # the fixture, used by name

SMALL = dataclasses.replace(scaled_config(64), num_hidden_layers=2, vit_num_hidden_layers=3)
"""Two language layers and two vision layers: every family, few tensors (fast saves)."""

State = dict[str, torch.Tensor]


def run(step: Path, *, fmt: str = "torch_save", seed: int = 1, **options: Any) -> Path:
    """A single-process Automodel run of ``SMALL`` saved as ``step`` (see the worker)."""
    workers.automodel_training_save(
        0, 1, str(step), {"config": SMALL, "seed": seed, "format": fmt, **options}
    )
    return step


def reference(config: bv.BagelConfig = SMALL, seed: int = 1, **options: Any) -> tuple[State, State]:
    """The model's and the EMA's state after the same run, built whole in this process (HF
    keys)."""
    from nemo_automodel.components.training.ema import EMAManager

    dtype = options.pop("dtype", None)
    model = workers.seeded_automodel(config, seed, **options)
    if dtype is not None:
        model.to(dtype)
    ema = EMAManager(model, decay=0.75)
    workers.train_step(model, ema)
    weights = {k.removeprefix("model."): v.clone() for k, v in model.state_dict().items()}
    return weights, {k.removeprefix("model."): v for k, v in ema.state_dict().items()}


def released(weights: State, ema: State) -> State:
    """What ``ema.safetensors`` must hold: the EMA's tensors, the model's for the others."""
    return {key: ema.get(key, value) for key, value in weights.items()}


def read(path: Path) -> State:
    return safetensors.torch.load_file(str(path))


def equal(found: State, expected: State) -> bool:
    return found.keys() == expected.keys() and all(
        found[k].dtype == expected[k].dtype and torch.equal(found[k], expected[k]) for k in found
    )


@pytest.fixture(scope="module")
def steps(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Single-process runs of SMALL: DCP and Automodel's safetensors format."""
    root = tmp_path_factory.mktemp("runs")
    return {
        fmt: run(root / fmt / "epoch_0_step_1", fmt=fmt) for fmt in ("torch_save", "safetensors")
    }


@pytest.fixture(scope="module")
def fsdp_steps(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """freeze_und runs of SMALL on 2 gloo ranks under fully_shard, both formats, one session."""
    root = tmp_path_factory.mktemp("fsdp")
    runs = [
        (
            str(root / fmt / "epoch_0_step_1"),
            {"config": SMALL, "seed": 2, "format": fmt, "freeze_und": True},
        )
        for fmt in ("torch_save", "safetensors")
    ]
    tracked = run_ranks(workers.automodel_training_saves, runs, timeout=300.0)
    gen = sum(classify(k) is Bucket.GEN for k in expected_shapes(SMALL))
    # the EMA holds the trainable GEN tensors only: all but the frozen latent position table
    assert tracked == [[gen - 1, gen - 1], [gen - 1, gen - 1]]
    return {fmt: root / fmt / "epoch_0_step_1" for fmt in ("torch_save", "safetensors")}


def config_for(fmt: str) -> bv.BagelConfig | None:
    """DCP step folders carry no model config (Automodel writes it with safetensors only)."""
    return SMALL if fmt == "torch_save" else None


# -- exact values --------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["torch_save", "safetensors"])
def test_export_of_a_run_is_its_training_state_bit_for_bit_through_the_read_engine(
    steps: dict[str, Path], tmp_path: Path, fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ema.safetensors`` holds the EMA's tensors where the EMA has them and the model's
    elsewhere (the two frozen position tables), ``model.safetensors`` the model's; both equal
    the run's state bit for bit, load strictly with bagelverify, and every byte was read by the
    read engine (Automodel's DCP blobs and shards are plain)."""
    read_bytes: list[int] = []
    original = export.run_engine

    def recording(transfers: Any, **kwargs: Any) -> Any:
        read_bytes.extend(t.nbytes for t in transfers)
        return original(transfers, **kwargs)

    monkeypatch.setattr(export, "run_engine", recording)
    threads = torch.get_num_threads()
    report = bv.export_checkpoint(
        steps[fmt], tmp_path / "out", weights="both", dtype="keep", config=config_for(fmt)
    )
    assert torch.get_num_threads() == threads  # the casts' one-thread setting is undone
    weights, ema = reference()
    expected = released(weights, ema)
    assert equal(read(tmp_path / "out/ema.safetensors"), expected)
    assert equal(read(tmp_path / "out/model.safetensors"), weights)
    assert report.from_model == {"und": 1, "gen": 1}  # vit_pos_embed, latent_pos_embed
    assert report.notes()[:2] == [
        "1 UND tensor from the model weights: not trainable in this run",
        "1 GEN tensor from the model weights: not trainable in this run",
    ]
    assert [f.sources for f in report.files] == [
        {"ema/": len(ema), "model/": 2},
        {"model/": len(weights)},
    ]
    assert sum(read_bytes) == sum(t.nbytes for t in [*expected.values(), *weights.values()])
    loaded = bv.load_bagel_checkpoint_state_dict(tmp_path / "out", stage="stage2")
    assert equal({k.removeprefix("model."): v for k, v in loaded.items()}, expected)
    assert bv.BagelConfig.from_pretrained(tmp_path / "out") == SMALL


def test_two_rank_fsdp2_freeze_und_runs_export_to_bf16_and_load_into_a_fresh_automodel_model(
    am: dict[str, ModuleType], fsdp_steps: dict[str, Path], tmp_path: Path
) -> None:
    """Row shards of 2 ranks (DCP files, Automodel's per-rank safetensors) are assembled
    exactly; the EMA of a freeze_und run holds GEN only, so every UND tensor comes from the model
    and is reported; the default dtype rounds the F32 master weights to BF16 (half the bytes),
    and the export loads into a fresh Automodel model through its checkpointer."""
    weights, ema = reference(seed=2, freeze_und=True)
    expected = {k: v.to(torch.bfloat16) for k, v in released(weights, ema).items()}
    und = sum(classify(k) is Bucket.UND for k in weights)
    for fmt, step in fsdp_steps.items():
        out = tmp_path / fmt
        report = bv.export_checkpoint(step, out, config=config_for(fmt))
        assert report.model.endswith("2 files)") and report.ema == "ema/ (DCP, 2 files)"
        assert equal(read(out / "ema.safetensors"), expected)
        assert report.from_model == {"und": und, "gen": 1}
        assert f"{und} UND tensors from the model weights: not trainable in this run" in (
            report.notes()
        )
        assert report.rounded == len(weights) and report.bytes_before == 2 * report.bytes_after
        model = build(am, SMALL, 2)
        checkpointer(am, tmp_path / "ck").load_model(model, str(out), is_init_step=True)
        loaded = {k.removeprefix("model."): v for k, v in model.state_dict().items()}
        assert equal(loaded, expected)


def test_blocks_that_are_not_plain_are_decoded_to_the_same_tensors(
    steps: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The torch.load path (a blob that is not one plain tensor) gives the same export."""
    bv.export_checkpoint(steps["torch_save"], tmp_path / "plain", dtype="keep", config=SMALL)

    def never(*args: object) -> tuple[int, int]:
        raise export._NotPlain("test")

    monkeypatch.setattr(export, "_plain_range", never)
    fds: dict[Path, int] = {}
    assert not any(
        p.plain
        for t in export.read_weights(steps["torch_save"] / "ema", fds).tensors.values()
        for p in t.pieces
    )
    export._close_all(fds)
    bv.export_checkpoint(steps["torch_save"], tmp_path / "decoded", dtype="keep", config=SMALL)
    assert (tmp_path / "plain/ema.safetensors").read_bytes() == (
        tmp_path / "decoded/ema.safetensors"
    ).read_bytes()


def test_the_zip_directory_read_from_a_blobs_ends_is_zipfiles(steps: dict[str, Path]) -> None:
    """The members found by parsing each DCP blob's central directory from its two ends are
    the ones :mod:`zipfile` finds (names, methods, sizes, local header offsets)."""
    import zipfile

    from bagelverify.safe_pickle import load_dcp_metadata

    folder = steps["torch_save"] / "model"
    storage = load_dcp_metadata(folder / ".metadata").storage_data
    fds: dict[Path, int] = {}
    try:
        for info in list(storage.values())[:20]:
            fd = export._open(folder / info.relative_path, fds)
            blob = export._Blob(fd, info.offset, info.length)
            with zipfile.ZipFile(blob) as archive:
                expected = {
                    i.filename: (i.compress_type, i.compress_size, i.file_size, i.header_offset)
                    for i in archive.infolist()
                }
            assert blob.entries() == expected and len(expected) >= 3
    finally:
        export._close_all(fds)


def test_a_tensor_whose_blocks_do_not_tile_it_is_refused_naming_it(
    fsdp_steps: dict[str, Path], tmp_path: Path
) -> None:
    """A DCP step folder whose metadata lost one rank's block of a tensor (a save cut short)
    is refused before anything is written, naming the tensor and what is missing."""
    import pickle

    from bagelverify.safe_pickle import load_dcp_metadata

    step = tmp_path / "step"
    shutil.copytree(fsdp_steps["torch_save"], step)
    metadata = load_dcp_metadata(step / "model/.metadata")
    lost = next(i for i in metadata.storage_data if i.fqn == "connector.fc1.weight" and i.offset[0])
    del metadata.storage_data[lost]
    with open(step / "model/.metadata", "wb") as handle:
        pickle.dump(metadata, handle)
    with pytest.raises(
        bv.CorruptCheckpointError,
        match=r"'connector\.fc1\.weight' of shape .* not stored whole: its blocks hold",
    ):
        bv.export_checkpoint(step, tmp_path / "out", config=SMALL)
    assert not (tmp_path / "out").exists()


# -- refusals ------------------------------------------------------------------------------------


def with_ema(step: Path, target: Path, state: State) -> Path:
    """A copy of ``step`` whose ``ema/`` is ``state`` saved by DCP."""
    shutil.copytree(step, target)
    shutil.rmtree(target / "ema")
    dcp.save({k: v.contiguous() for k, v in state.items()}, checkpoint_id=target / "ema")
    return target


def test_a_model_and_ema_that_disagree_in_keys_or_shapes_are_refused_naming_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stage1 = run(tmp_path / "stage1", stage=1)
    _, ema = reference(stage=1)
    state = {"model." + k: v for k, v in ema.items()}
    state["model.llm2vae.bias"] = torch.zeros(SMALL.patch_latent_dim)  # GEN: not in the model
    state["model.connector.fc1.bias"] = torch.zeros(SMALL.hidden_size + 1)
    step = with_ema(stage1, tmp_path / "step", state)
    with pytest.raises(bv.WeightsMismatchError) as info:
        bv.export_checkpoint(step, tmp_path / "out", config=SMALL)
    message = str(info.value)
    assert "model.llm2vae.bias" in message
    assert f"connector.fc1.bias: model/ [{SMALL.hidden_size}], ema/ [{SMALL.hidden_size + 1}]" in (
        message
    )
    assert not (tmp_path / "out").exists()
    assert cli.main(["export", str(step), "-o", str(tmp_path / "out")]) == 1
    assert "model.llm2vae.bias" in capsys.readouterr().err


def test_wrapper_fragments_are_normalised_and_a_name_no_family_matches_is_refused_naming_it(
    steps: dict[str, Path], tmp_path: Path
) -> None:
    weights, ema = reference()

    def wrapped(key: str) -> str:  # activation checkpointing and torch.compile on each layer
        return "model." + key.replace("layers.0.", "layers.0._checkpoint_wrapped_module.").replace(
            "layers.1.", "layers.1._orig_mod."
        )

    step = with_ema(
        steps["torch_save"], tmp_path / "wrapped", {wrapped(k): v for k, v in ema.items()}
    )
    bv.export_checkpoint(step, tmp_path / "out", dtype="keep", config=SMALL)
    assert equal(read(tmp_path / "out/ema.safetensors"), released(weights, ema))

    unknown = {"model." + k: v for k, v in ema.items()}
    unknown["model.connector.fc3.weight"] = torch.zeros(2, 2)
    step = with_ema(steps["torch_save"], tmp_path / "unknown", unknown)
    with pytest.raises(bv.UnknownKeysError, match=r"model\.connector\.fc3\.weight"):
        bv.export_checkpoint(step, tmp_path / "refused", config=SMALL)
    assert not (tmp_path / "refused").exists()


def test_narrowing_casts_other_than_f32_to_bf16_need_allow_lossy(tmp_path: Path) -> None:
    """An F16 run: BF16 loses precision, so the default is refused before anything is written;
    ``allow_lossy`` rounds; ``keep`` is exact."""
    step = run(tmp_path / "f16", dtype=torch.float16)
    weights, ema = reference(dtype=torch.float16)
    with pytest.raises(bv.LossyCastError, match="from F16 to BF16"):
        bv.export_checkpoint(step, tmp_path / "refused", config=SMALL)
    assert not (tmp_path / "refused").exists()
    bv.export_checkpoint(step, tmp_path / "rounded", config=SMALL, allow_lossy=True)
    rounded = {k: v.to(torch.bfloat16) for k, v in released(weights, ema).items()}
    assert equal(read(tmp_path / "rounded/ema.safetensors"), rounded)
    bv.export_checkpoint(step, tmp_path / "kept", config=SMALL, dtype="keep")
    assert equal(read(tmp_path / "kept/ema.safetensors"), released(weights, ema))


# -- the layout and publishing -------------------------------------------------------------------


def test_sharded_export_writes_an_index_and_loads_strictly(
    steps: dict[str, Path], tmp_path: Path
) -> None:
    report = bv.export_checkpoint(steps["safetensors"], tmp_path / "out", max_shard_size="200KB")
    index = json.loads((tmp_path / "out/model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((tmp_path / "out" / name).is_file() for name in shards)
    assert {p.name for p in report.written} >= {"model.safetensors.index.json", *shards}
    weights, ema = reference()
    loaded = bv.load_bagel_checkpoint_state_dict(tmp_path / "out", stage="stage2")
    expected = {k: v.to(torch.bfloat16) for k, v in released(weights, ema).items()}
    assert equal({k.removeprefix("model."): v for k, v in loaded.items()}, expected)
    with pytest.raises(bv.ShardSizeError, match="weights='both'"):
        bv.export_checkpoint(
            steps["safetensors"], tmp_path / "x", max_shard_size="1MB", weights="both"
        )


def test_vae_sidecar_is_copied_byte_for_byte_and_a_file_of_model_keys_is_refused(
    steps: dict[str, Path], tmp_path: Path
) -> None:
    step = tmp_path / "step"
    shutil.copytree(steps["safetensors"], step)
    vae = {
        "encoder.conv_in.weight": torch.randn(4, 3, 3, 3),
        "decoder.conv_out.bias": torch.ones(3),
    }
    save_tensors(step / "ae.safetensors", vae)
    report = bv.export_checkpoint(step, tmp_path / "out")
    assert report.vae == str(step / "ae.safetensors")
    assert (tmp_path / "out/ae.safetensors").read_bytes() == (step / "ae.safetensors").read_bytes()
    save_tensors(tmp_path / "ae.safetensors", {"connector.fc1.bias": torch.ones(2)})
    with pytest.raises(bv.CorruptCheckpointError, match="not VAE tensors"):
        bv.export_checkpoint(step, tmp_path / "refused", vae=tmp_path / "ae.safetensors")


def test_publishing_keeps_the_users_files_and_replaces_an_export_only_with_overwrite(
    steps: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    bv.export_checkpoint(steps["safetensors"], out, weights="both")
    with pytest.raises(FileExistsError, match="overwrite"):
        bv.export_checkpoint(steps["safetensors"], out)
    bv.export_checkpoint(steps["safetensors"], out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "ema.safetensors",
        "llm_config.json",
        "notes.txt",
        "vit_config.json",
    ]  # the earlier model.safetensors is replaced by nothing: no stale weights are left
    assert (out / "notes.txt").read_text() == "mine"


def test_dry_run_prints_what_would_be_written_and_from_where_and_writes_nothing(
    steps: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code = cli.main(["export", str(steps["safetensors"]), "-o", str(out), "--dry-run", "--json"])
    document = json.loads(capsys.readouterr().out)
    assert code == 0 and not out.exists()
    assert document["command"] == "export" and document["dry_run"] is True
    weights, ema = reference()
    assert document["files"] == [
        {
            "name": "ema.safetensors",
            "tensors": len(weights),
            "bytes_before": sum(v.nbytes for v in weights.values()),
            "bytes_after": sum(v.nbytes for v in weights.values()) // 2,
            "sources": {"ema/": len(ema), "model/": 2},
        }
    ]
    assert document["config"].endswith("model/.hf_metadata/config.json")
    assert_valid(document, "export")  # the envelope, then exactly docs/json.md's fields
    assert cli.main(["export", str(steps["safetensors"]), "-o", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "would write" in text and "from ema/" in text and not out.exists()
    assert cli.main(["export", str(tmp_path / "absent"), "-o", str(out)]) == 2


# -- the property ------------------------------------------------------------------------------


@st.composite
def tiny_configs(draw: st.DrawFn) -> bv.BagelConfig:
    """Random tiny BAGEL configs Automodel can build (widths a multiple of 4: its rotary and 2-D
    sine-cosine tables split them in halves twice)."""
    heads = draw(st.sampled_from([1, 2]))
    vit_heads = draw(st.sampled_from([1, 2]))
    return bv.BagelConfig(
        hidden_size=heads * draw(st.sampled_from([4, 8])),
        num_hidden_layers=draw(st.integers(1, 2)),
        intermediate_size=draw(st.integers(1, 6)),
        num_attention_heads=heads,
        num_key_value_heads=draw(st.sampled_from([k for k in (1, 2) if heads % k == 0])),
        vocab_size=draw(st.integers(2, 9)),
        vit_hidden_size=vit_heads * draw(st.sampled_from([2, 4])),
        vit_intermediate_size=draw(st.integers(1, 5)),
        vit_num_hidden_layers=draw(st.integers(2, 3)),
        vit_patch_size=2,
        vit_image_size=2 * draw(st.integers(1, 2)),
        vit_max_num_patch_per_side=draw(st.integers(1, 2)),
        max_latent_size=draw(st.integers(1, 2)),
        latent_patch_size=draw(st.integers(1, 2)),
        vae_z_channels=draw(st.integers(1, 2)),
        vit_num_attention_heads=vit_heads,
    )


@settings(max_examples=3, derandomize=True, deadline=None)
@given(
    config=tiny_configs(),
    freeze_und=st.booleans(),
    fmt=st.sampled_from(["torch_save", "safetensors"]),
)
def test_export_then_load_into_a_model_is_the_identity_on_the_kept_keys(
    am: dict[str, ModuleType], config: bv.BagelConfig, freeze_und: bool, fmt: str
) -> None:
    """For random tiny configs: loading the export (dtype keep) into a fresh Automodel model
    through its checkpointer gives every kept key its training value (the EMA's, else the
    model's), exactly."""
    with tempfile.TemporaryDirectory() as tmp:
        step = Path(tmp) / "step"
        options = {"config": config, "seed": 5, "format": fmt, "freeze_und": freeze_und}
        workers.automodel_training_save(0, 1, str(step), options)
        given_config = config if fmt == "torch_save" else None  # safetensors runs carry theirs
        bv.export_checkpoint(step, Path(tmp) / "out", dtype="keep", config=given_config)
        model = build(am, config, 2, dtype=torch.float32)
        checkpointer(am, Path(tmp) / "ck").load_model(
            model, str(Path(tmp) / "out"), is_init_step=True
        )
    weights, ema = reference(config, 5, freeze_und=freeze_und)
    loaded = {k.removeprefix("model."): v for k, v in model.state_dict().items()}
    assert equal(loaded, released(weights, ema))


# -- the guide's worked example ------------------------------------------------------------------

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "export.md"


def test_the_guides_worked_example_prints_what_it_shows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/export.md's console block, run on a full-size 2-rank step folder (its metadata and
    sparse data files: a dry run reads no tensor data), prints exactly what the guide shows."""
    (block,) = re.findall(r"^```console\n(.*?)^```", GUIDE.read_text(), re.S | re.M)
    command, *shown = block.splitlines()
    paths = {
        name: tmp_path / name.rsplit("/", 1)[-1]
        for name in ("/ckpt/run", "/ckpt/BAGEL-7B-MoT", "/ckpt/export")
    }

    def substitute(text: str) -> str:
        for name, path in paths.items():
            text = text.replace(name, str(path))
        return text

    workers.full_size_step_folder(str(paths["/ckpt/run"] / "epoch_3_step_12000"), bv.BagelConfig())
    base = paths["/ckpt/BAGEL-7B-MoT"]
    base.mkdir()
    bv.BagelConfig().save_pretrained(base)
    save_tensors(base / "ae.safetensors", {"encoder.conv_in.weight": torch.zeros(4, 3, 3, 3)})
    assert command.startswith("$ bagelverify ")
    assert cli.main(shlex.split(substitute(command.removeprefix("$ bagelverify ")))) == 0
    assert capsys.readouterr().out.strip() == substitute("\n".join(shown)).strip()
    assert not paths["/ckpt/export"].exists()
