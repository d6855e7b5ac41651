"""bagelverify inside NeMo Automodel 0.7.0: its model, its checkpointer, its VAE loader.

Skipped (one line) where ``nemo_automodel`` is not installed; CI installs it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import safetensors.torch
import torch
import torch.distributed.checkpoint as dcp

import bagelverify as bv
from bagelverify.errors import IntegrationError
from bagelverify.families import expected_shapes
from bagelverify.integrations import automodel
from bagelverify.partition import classify
from bagelverify.safetensors_io import save_tensors
from bagelverify.stage import STAGE_BUCKETS, normalize_stage
from bagelverify.synthetic import SyntheticCheckpoint, scaled_config

needs_automodel = pytest.mark.skipif(
    importlib.util.find_spec("nemo_automodel") is None,
    reason="nemo_automodel not installed (pip install 'bagelverify[automodel]')",
)

TINY = scaled_config(64)
TINY_ROPE = dataclasses.replace(TINY, vit_rope=True)
ROPE_KEYS = [f"model.vit_model.vision_model.rope.{n}" for n in ("cos_h", "sin_h", "cos_w", "sin_w")]


class FallbackCalled(AssertionError):
    """Automodel's full-CPU fallback read the checkpoint."""


@pytest.fixture(scope="module")
def am() -> Iterator[dict[str, ModuleType]]:
    """Automodel's modules, after :func:`automodel.install`."""
    automodel.install()
    yield {
        "model": importlib.import_module("nemo_automodel.components.models.bagel.model"),
        "ae": importlib.import_module("nemo_automodel.components.models.bagel.autoencoder"),
        "ck": importlib.import_module("nemo_automodel.components.checkpoint.checkpointing"),
        "base": importlib.import_module("nemo_automodel.components.checkpoint.state_dict_adapter"),
    }


@pytest.fixture
def no_fallback(am: dict[str, ModuleType], monkeypatch: pytest.MonkeyPatch) -> None:
    """Make Automodel's read-every-file-onto-the-CPU fallback raise if it is ever called."""

    def fallback(*args: object, **kwargs: object) -> None:
        raise FallbackCalled("_load_hf_checkpoint_preserving_dtype was called")

    monkeypatch.setattr(am["ck"], "_load_hf_checkpoint_preserving_dtype", fallback)


def build(
    am: dict[str, ModuleType],
    config: bv.BagelConfig,
    stage: object,
    *,
    meta: bool = False,
    dtype: torch.dtype = torch.bfloat16,
) -> Any:
    """Automodel's BAGEL model for ``config``: on meta, or empty CPU tensors of ``dtype``."""
    with torch.device("meta"):
        model = am["model"].BagelForUnifiedMultimodal(
            automodel.automodel_config(config, stage=stage)
        )
    return model if meta else model.to(dtype).to_empty(device="cpu")


def checkpointer(am: dict[str, ModuleType], tmp_path: Path, **options: Any) -> Any:
    ck = am["ck"]
    config = ck.CheckpointingConfig(
        checkpoint_dir=str(tmp_path / "checkpoints"), model_save_format="safetensors", **options
    )
    return ck.Checkpointer(config, dp_rank=0, tp_rank=0, pp_rank=0)


def file_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(folder / "ema.safetensors"))


# -- without Automodel -----------------------------------------------------------------------


def test_importing_bagelverify_and_the_integration_never_imports_automodel() -> None:
    code = (
        "import sys, bagelverify, bagelverify.integrations.automodel;"
        "print([m for m, v in sys.modules.items() if m.startswith('nemo_automodel') and v])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_install_without_automodel_says_what_to_pip_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(
        sys.modules, "nemo_automodel.components.checkpoint.state_dict_adapter", None
    )
    with pytest.raises(IntegrationError, match=r"pip install 'bagelverify\[automodel\]'") as info:
        automodel.install()
    assert isinstance(info.value, ImportError)
    assert "nemo-automodel==0.7.0" in str(info.value)


# -- the model's keys and shapes -------------------------------------------------------------


@needs_automodel
@pytest.mark.parametrize("stage", ["stage1", "stage2"])
@pytest.mark.parametrize(
    "config",
    [TINY, TINY_ROPE, bv.BagelConfig(), bv.BagelConfig(vit_rope=True)],
    ids=["tiny", "tiny-rope", "full", "full-rope"],
)
def test_automodel_state_dict_is_exactly_our_expected_keys_and_shapes(
    am: dict[str, ModuleType], config: bv.BagelConfig, stage: str
) -> None:
    """For every stage and size (full size on the meta device), Automodel's model has exactly
    the keys and shapes the family table expects, and its adapter is ours with the same config."""
    model = build(am, config, stage, meta=True)
    found = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    keep = STAGE_BUCKETS[normalize_stage(stage)]
    expected = {
        "model." + key: shape
        for key, shape in expected_shapes(config).items()
        if classify(key) in keep
    }
    assert found == expected
    parameters = {name for name, _ in model.named_parameters()}
    assert [key for key in found if key not in parameters] == (ROPE_KEYS if config.vit_rope else [])
    adapter = model.state_dict_adapter
    assert isinstance(adapter, automodel.AutomodelBagelStateDictAdapter)
    assert adapter.config == config and adapter.stage == stage
    assert adapter.get_hf_state_dict_keys(model.state_dict()) == [k[6:] for k in found]


@needs_automodel
def test_installed_adapter_is_automodels_state_dict_adapter_with_every_base_member(
    am: dict[str, ModuleType],
) -> None:
    base = am["base"].StateDictAdapter
    adapter = build(am, TINY, 1, meta=True).state_dict_adapter
    assert isinstance(adapter, base)
    members = [n for n in dir(base) if not n.startswith("__") and not n.startswith("_abc")]
    flags = [flag for flag in automodel.FLAGS if flag in members]
    assert flags and "get_hf_state_dict_keys" in members  # 0.7.0 has the first flag, main the 2nd
    for name in members:
        getattr(adapter, name)  # every member resolves (register() alone broke on the flag)
    assert all(getattr(adapter, flag) is True for flag in flags)
    assert adapter.iter_checkpoint_load_parts(build(am, TINY, 1, meta=True).state_dict()) is None
    assert am["model"].load_bagel_checkpoint_state_dict is bv.load_bagel_checkpoint_state_dict


@needs_automodel
def test_install_refuses_a_base_class_member_the_adapter_lacks(
    am: dict[str, ModuleType], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(am["base"].StateDictAdapter, "future_hook", None, raising=False)
    with pytest.raises(IntegrationError, match="future_hook"):
        automodel.install()


@needs_automodel
def test_config_translation_round_trips(am: dict[str, ModuleType]) -> None:
    for config in (TINY, bv.BagelConfig(), bv.BagelConfig(vit_rope=True)):
        translated = automodel.automodel_config(config, stage=2)
        assert automodel.bagel_config_from_automodel(translated) == config
    no_vision = automodel.automodel_config(TINY)
    no_vision.visual_und = False
    with pytest.raises(bv.ConfigError, match="visual_und"):
        automodel.bagel_config_from_automodel(no_vision)


# -- Automodel's checkpointer ----------------------------------------------------------------


@needs_automodel
@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.usefixtures("no_fallback")
def test_checkpointer_init_load_fills_the_model_in_place_bit_equal(
    am: dict[str, ModuleType],
    synthetic_checkpoint: SyntheticCheckpoint,
    tmp_path: Path,
    stage: int,
) -> None:
    """``Checkpointer.load_model(..., is_init_step=True)`` takes the in-place path: every tensor
    equals the file's bytes, in the model's own memory; the full-CPU fallback is never called."""
    model = build(am, synthetic_checkpoint.config, stage)
    before = {key: value.data_ptr() for key, value in model.state_dict().items()}
    checkpointer(am, tmp_path).load_model(model, str(synthetic_checkpoint.path), is_init_step=True)
    reference = file_tensors(synthetic_checkpoint.path)
    loaded = model.state_dict()
    assert len(loaded) == (821 if stage == 1 else 1223)
    assert {key: value.data_ptr() for key, value in loaded.items()} == before
    unequal = [key for key, value in loaded.items() if not torch.equal(value, reference[key[6:]])]
    assert unequal == []


@needs_automodel
@pytest.mark.usefixtures("no_fallback")
def test_an_adapter_automodel_does_not_recognise_takes_the_full_cpu_fallback(
    am: dict[str, ModuleType], synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    """The control for the test above: the spy catches the fallback when the gate is closed."""

    class Unregistered:
        def __init__(self) -> None:
            self.inner = bv.BagelStateDictAdapter()

        def to_hf(self, state_dict: Any, **kwargs: Any) -> Any:
            return self.inner.to_hf(state_dict, **kwargs)

        def from_hf(self, state_dict: Any, **kwargs: Any) -> Any:
            return self.inner.from_hf(state_dict, **kwargs)

    model = build(am, synthetic_checkpoint.config, 1)
    model.state_dict_adapter = Unregistered()
    with pytest.raises(FallbackCalled):
        checkpointer(am, tmp_path).load_model(
            model, str(synthetic_checkpoint.path), is_init_step=True
        )


@needs_automodel
@pytest.mark.usefixtures("no_fallback")
def test_load_stage1_save_with_automodel_load_back_with_bagelverify_is_bit_identical(
    am: dict[str, ModuleType], synthetic_checkpoint: SyntheticCheckpoint, tmp_path: Path
) -> None:
    model = build(am, synthetic_checkpoint.config, "stage1")
    saver = checkpointer(am, tmp_path, save_consolidated=True)
    saver.load_model(model, str(synthetic_checkpoint.path), is_init_step=True)
    saver.save_model(model, str(tmp_path / "saved"), is_final_checkpoint=True)
    config = automodel.bagel_config_from_automodel(model.config)
    back = bv.load_bagel_checkpoint_state_dict(tmp_path / "saved/model/consolidated", config=config)
    reference = file_tensors(synthetic_checkpoint.path)
    assert len(back) == 821
    assert all(torch.equal(value, reference[key[6:]]) for key, value in back.items())
    assert all(value.dtype == torch.bfloat16 for value in back.values())


@needs_automodel
@pytest.mark.usefixtures("no_fallback")
def test_a_vit_rope_model_round_trips_and_rope_keys_need_a_rope_config(
    am: dict[str, ModuleType], tmp_path: Path
) -> None:
    rope = TINY_ROPE
    with torch.device("cpu"):
        model = am["model"].BagelForUnifiedMultimodal(automodel.automodel_config(rope))
    state = {key: value.clone() for key, value in model.state_dict().items()}
    bv.save_bagel_checkpoint(state, tmp_path / "rope", stage="stage1", config=rope)
    fresh = build(am, rope, 1, dtype=torch.float32)
    checkpointer(am, tmp_path).load_model(fresh, str(tmp_path / "rope"), is_init_step=True)
    assert all(torch.equal(value, state[key]) for key, value in fresh.state_dict().items())
    with pytest.raises(bv.UnknownKeysError, match=r"rope\.cos_h"):
        bv.load_bagel_checkpoint_state_dict(tmp_path / "rope", config=TINY)


# -- the VAE ---------------------------------------------------------------------------------


def small_vae_params(am: dict[str, ModuleType], ch: int = 32) -> Any:
    full = am["ae"].default_autoencoder_params()
    return type(full)(**{**vars(full), "ch": ch, "z_channels": 4})


@needs_automodel
def test_recipe_vae_loader_fills_automodels_autoencoder_bit_equal(
    am: dict[str, ModuleType], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = small_vae_params(am)
    written = {k: v.contiguous() for k, v in am["ae"].AutoEncoder(params).state_dict().items()}
    safetensors.torch.save_file(written, str(tmp_path / "ae.safetensors"))
    monkeypatch.setattr(am["ae"], "default_autoencoder_params", lambda: params)
    recipe_loader = importlib.import_module(
        "nemo_automodel.components.models.bagel"
    ).load_bagel_autoencoder
    assert recipe_loader is automodel.load_bagel_autoencoder
    module, got = recipe_loader(str(tmp_path / "ae.safetensors"))
    assert got is params and len(written) == 244
    loaded = module.state_dict()
    assert not any(value.is_meta for value in loaded.values())
    assert all(torch.equal(loaded[key], value) for key, value in written.items())


@needs_automodel
def test_vae_fill_lists_shape_mismatches_and_changes_nothing(
    am: dict[str, ModuleType], tmp_path: Path
) -> None:
    written = am["ae"].AutoEncoder(small_vae_params(am, 32)).state_dict()
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in written.items()}, str(tmp_path / "ae.safetensors")
    )
    target = am["ae"].AutoEncoder(small_vae_params(am, 64))
    before = {key: value.clone() for key, value in target.state_dict().items()}
    with pytest.raises(bv.ShapeMismatchError, match=r"encoder\.conv_in\.weight: module \[64"):
        automodel.load_autoencoder_into(target, tmp_path)
    assert all(torch.equal(target.state_dict()[k], v) for k, v in before.items())
    del written["decoder.conv_out.bias"]
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in written.items()}, str(tmp_path / "ae.safetensors")
    )
    with pytest.raises(bv.MissingKeysError, match=r"decoder\.conv_out\.bias"):
        automodel.load_autoencoder_into(target, tmp_path / "ae.safetensors")
    with pytest.raises(FileNotFoundError, match=r"ae\.safetensors"):
        automodel.load_autoencoder_into(target, tmp_path / "vae.bin")


# -- the checkpointer's reads go through the read engine -------------------------------------


@pytest.fixture
def engine_reads(
    am: dict[str, ModuleType], monkeypatch: pytest.MonkeyPatch
) -> list[tuple[str, int]]:
    """Every (tensor, byte count) the read engine reads for DCP, as it reads it."""
    from bagelverify.distributed import reader

    calls: list[tuple[str, int]] = []
    original = reader.run_engine

    def recording(transfers: Any, **kwargs: Any) -> Any:
        calls.extend((t.label, t.nbytes) for t in transfers)
        return original(transfers, **kwargs)

    monkeypatch.setattr(reader, "run_engine", recording)
    return calls


def automodels_own_load(am: dict[str, ModuleType], model: Any, folder: Path, tmp: Path) -> None:
    """``Checkpointer.load_model`` as Automodel wrote it (the un-wrapped method)."""
    loader = am["ck"].Checkpointer.load_model.__wrapped__
    loader(checkpointer(am, tmp), model, str(folder), is_init_step=True)


def poisoned(model: Any) -> dict[str, torch.Tensor]:
    """Fill every tensor of ``model`` with a value no checkpoint holds; return copies."""
    with torch.no_grad():
        for value in model.state_dict().values():
            value.fill_(-7.0)
    return {key: value.clone() for key, value in model.state_dict().items()}


@needs_automodel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.usefixtures("no_fallback")
def test_checkpointer_reads_every_kept_byte_through_the_engine_bit_equal_to_automodels_path(
    am: dict[str, ModuleType],
    synthetic_checkpoint: SyntheticCheckpoint,
    engine_reads: list[tuple[str, int]],
    tmp_path: Path,
    stage: int,
    dtype: torch.dtype,
) -> None:
    """After install(), a base-checkpoint load reads each kept tensor once, all through the
    engine, and leaves the model equal to Automodel's own reader's result (BF16 file into BF16
    or F32 parameters, cast as DCP casts)."""
    folder = synthetic_checkpoint.path
    ours = build(am, synthetic_checkpoint.config, stage, dtype=dtype)
    poisoned(ours)
    checkpointer(am, tmp_path).load_model(ours, str(folder), is_init_step=True)
    kept = {k[6:]: v for k, v in ours.state_dict().items()}
    stored = {k: v.numel() * 2 for k, v in file_tensors(folder).items() if k in kept}
    assert sorted(engine_reads) == sorted(stored.items())

    engine_reads.clear()
    theirs = build(am, synthetic_checkpoint.config, stage, dtype=dtype)
    poisoned(theirs)
    automodels_own_load(am, theirs, folder, tmp_path)
    assert engine_reads == []
    reference = theirs.state_dict()
    assert len(reference) == (821 if stage == 1 else 1223)
    unequal = [k for k, v in ours.state_dict().items() if not torch.equal(v, reference[k])]
    assert unequal == [] and all(v.dtype == dtype for v in reference.values())


def hostile_copy(source: Path, target: Path, edit: Any) -> Path:
    """``source``'s checkpoint with its tensors changed by ``edit(dict)`` (in place)."""
    target.mkdir()
    for item in source.iterdir():
        if item.name != "ema.safetensors":
            (target / item.name).symlink_to(item)
    tensors = file_tensors(source)
    edit(tensors)
    save_tensors(target / "ema.safetensors", tensors)
    return target


def _add_unknown(t: dict[str, torch.Tensor]) -> None:
    t["language_model.model.layers.0.mlp.gate_proj.lora_X"] = torch.zeros(2)


def _drop_one(t: dict[str, torch.Tensor]) -> None:
    del t["connector.fc1.bias"]


def _reshape_one(t: dict[str, torch.Tensor]) -> None:
    key = "connector.fc1.weight"
    t[key] = torch.zeros(t[key].shape[0] + 1, t[key].shape[1], dtype=t[key].dtype)


@needs_automodel
@pytest.mark.parametrize(
    ("edit", "error", "named"),
    [
        (_add_unknown, bv.UnknownKeysError, "lora_X"),
        (_drop_one, bv.MissingKeysError, r"connector\.fc1\.bias"),
        (_reshape_one, bv.ShapeMismatchError, r"connector\.fc1\.weight"),
    ],
    ids=["unknown-key", "missing-key", "wrong-shape"],
)
def test_checkpointer_refuses_a_hostile_checkpoint_with_our_error_before_any_tensor_changes(
    am: dict[str, ModuleType],
    synthetic_checkpoint: SyntheticCheckpoint,
    engine_reads: list[tuple[str, int]],
    tmp_path: Path,
    edit: Any,
    error: type[Exception],
    named: str,
) -> None:
    """Automodel's own path loads the unknown key silently and reports the others as DCP's
    17-line CheckpointException; after install() each is bagelverify's error, raised from the
    headers before any read."""
    folder = hostile_copy(synthetic_checkpoint.path, tmp_path / "hostile", edit)
    model = build(am, synthetic_checkpoint.config, 1)
    before = poisoned(model)
    with pytest.raises(error, match=named):
        checkpointer(am, tmp_path).load_model(model, str(folder), is_init_step=True)
    assert engine_reads == []
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@needs_automodel
def test_a_model_without_our_adapter_and_a_dcp_resume_take_automodels_path_unchanged(
    am: dict[str, ModuleType],
    synthetic_checkpoint: SyntheticCheckpoint,
    engine_reads: list[tuple[str, int]],
    tmp_path: Path,
) -> None:
    """Loads that are not BAGEL base-checkpoint loads never reach bagelverify's reader: a
    model of another kind from a safetensors folder, and a BAGEL model resuming from
    Automodel's own DCP checkpoint."""
    plain = torch.nn.Linear(3, 2)
    safetensors.torch.save_file(
        {"weight": torch.ones(2, 3), "bias": torch.ones(2)}, str(tmp_path / "model.safetensors")
    )
    checkpointer(am, tmp_path).load_model(plain, str(tmp_path), is_init_step=True)
    assert torch.equal(plain.weight, torch.ones(2, 3))

    model = build(am, synthetic_checkpoint.config, 1)
    saver = checkpointer(am, tmp_path)
    saver.load_model(model, str(synthetic_checkpoint.path), is_init_step=True)
    # a training checkpoint as Automodel's DCP format holds it: the adapter's keys, .distcp files
    dcp.save(model.state_dict_adapter.to_hf(model.state_dict()), checkpoint_id=tmp_path / "dcp")
    engine_reads.clear()
    resumed = build(am, synthetic_checkpoint.config, 1)
    poisoned(resumed)
    saver.load_model(resumed, str(tmp_path / "dcp"))
    assert engine_reads == []
    expected = model.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in resumed.state_dict().items())


@needs_automodel
def test_from_pretrained_and_the_recipe_vae_loader_read_through_the_engine(
    am: dict[str, ModuleType],
    synthetic_checkpoint: SyntheticCheckpoint,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The model's ``from_pretrained`` and the recipe's ``load_bagel_autoencoder`` read every
    byte they load through bagelverify's engine (the loaders' single reader)."""
    from bagelverify.checkpoint import load as loading

    read: list[int] = []
    original = loading.run_engine

    def recording(transfers: Any, **kwargs: Any) -> Any:
        read.extend(t.nbytes for t in transfers)
        return original(transfers, **kwargs)

    monkeypatch.setattr(loading, "run_engine", recording)
    # Automodel's BagelConfig.from_pretrained reads config.json only (the synthetic folder's
    # sizes are in llm_config.json / vit_config.json): hand it the folder's config
    small = automodel.automodel_config(synthetic_checkpoint.config)
    monkeypatch.setattr(
        am["model"].BagelConfig, "from_pretrained", classmethod(lambda cls, *a, **k: small)
    )
    model = am["model"].BagelForUnifiedMultimodal.from_pretrained(synthetic_checkpoint.path)
    reference = file_tensors(synthetic_checkpoint.path)
    loaded = model.state_dict()
    assert sum(read) == sum(reference[k[6:]].nbytes for k in loaded) and len(loaded) == 821
    assert all(torch.equal(v, reference[k[6:]]) for k, v in loaded.items())

    read.clear()
    params = small_vae_params(am)
    written = {k: v.contiguous() for k, v in am["ae"].AutoEncoder(params).state_dict().items()}
    safetensors.torch.save_file(written, str(tmp_path / "ae.safetensors"))
    monkeypatch.setattr(am["ae"], "default_autoencoder_params", lambda: params)
    module, _ = importlib.import_module(
        "nemo_automodel.components.models.bagel"
    ).load_bagel_autoencoder(str(tmp_path))
    assert sum(read) == sum(v.nbytes for v in written.values())
    assert all(torch.equal(module.state_dict()[k], v) for k, v in written.items())


@needs_automodel
def test_a_routed_load_freezes_older_objects_for_its_duration_only(
    am: dict[str, ModuleType],
    synthetic_checkpoint: SyntheticCheckpoint,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """During a routed load the objects older than it are frozen (Automodel's closing
    ``gc.collect()`` skips them); afterwards nothing is left frozen, and a process that froze
    objects itself keeps its own freeze."""
    import gc

    from bagelverify.distributed import reader

    seen: list[int] = []
    original = reader.run_engine

    def recording(transfers: Any, **kwargs: Any) -> Any:
        seen.append(gc.get_freeze_count())
        return original(transfers, **kwargs)

    monkeypatch.setattr(reader, "run_engine", recording)
    model = build(am, synthetic_checkpoint.config, 1)
    assert gc.get_freeze_count() == 0
    checkpointer(am, tmp_path).load_model(model, str(synthetic_checkpoint.path), is_init_step=True)
    assert seen and seen[0] > 0 and gc.get_freeze_count() == 0

    gc.freeze()
    try:
        seen.clear()
        checkpointer(am, tmp_path).load_model(
            model, str(synthetic_checkpoint.path), is_init_step=True
        )
        assert seen and gc.get_freeze_count() > 0  # the process's own freeze is not undone
    finally:
        gc.unfreeze()


# -- LoRA (Automodel's own PEFT) -------------------------------------------------------------

LORA_TARGETS = ["*.q_proj", "*.v_proj"]


def automodels_own_adapter(am: dict[str, ModuleType]) -> type:
    """Automodel's BAGEL adapter class as it ships (install() replaced it in its module)."""
    name = "nemo_automodel.components.models.bagel.state_dict_adapter"
    source = importlib.util.find_spec(name)
    assert source is not None and source.origin is not None
    spec = importlib.util.spec_from_file_location("_automodels_own_adapter", source.origin)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    own: type = module.BagelStateDictAdapter
    return own


def lora_model(am: dict[str, ModuleType], seed: int) -> Any:
    """A tiny F32 stage-1 model, random weights, Automodel's LoRA on ``*.q_proj``/``*.v_proj``
    with random factors (B too, so a merge changes something)."""
    from nemo_automodel.components._peft.lora import PeftConfig, apply_lora_to_linear_modules

    torch.manual_seed(seed)
    model = build(am, TINY, "stage1", dtype=torch.float32)
    with torch.no_grad():
        for value in model.state_dict().values():
            value.normal_()
    config = PeftConfig(target_modules=LORA_TARGETS, dim=4, alpha=8)
    assert apply_lora_to_linear_modules(model, config) > 0
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if ".lora_" in key:
                value.normal_()
    return model


def lora_save(am: dict[str, ModuleType], model: Any, folder: Path, is_peft: bool) -> Path:
    from nemo_automodel.components._peft.lora import PeftConfig

    config = PeftConfig(target_modules=LORA_TARGETS, dim=4, alpha=8)
    checkpointer(am, folder / "ck", is_peft=is_peft).save_model(
        model, str(folder / "saved"), peft_config=config
    )
    return folder / "saved/model"


@needs_automodel
@pytest.mark.parametrize("is_peft", [False, True], ids=["full", "peft"])
def test_a_lora_model_saves_with_install_exactly_as_automodels_own_adapter_and_loads_back(
    am: dict[str, ModuleType], tmp_path: Path, is_peft: bool
) -> None:
    """Automodel's LoRA on a tiny BAGEL model: the save through bagelverify's adapter writes the
    same files, byte for byte, as Automodel's own adapter; loading that save into a fresh LoRA
    model restores every tensor it holds (all of them, or the factors alone with is_peft)."""
    model = lora_model(am, seed=1)
    ours = lora_save(am, model, tmp_path / "ours", is_peft)
    model.state_dict_adapter = automodels_own_adapter(am)(model.config)
    theirs = lora_save(am, model, tmp_path / "theirs", is_peft)
    model.state_dict_adapter = automodel.AutomodelBagelStateDictAdapter(model.config)

    def files(folder: Path) -> dict[str, bytes]:
        found = {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file()}
        return {n: p.read_bytes() for n, p in found.items() if n != "consolidate.sh"}

    assert files(ours) == files(theirs)
    factors = [n for n in files(ours) if n.endswith(".safetensors")]
    keys = safetensors.torch.load_file(str(ours / factors[0]))
    assert any(".lora_A.weight" in key for key in keys)

    fresh = lora_model(am, seed=2)
    checkpointer(am, tmp_path / "load", is_peft=is_peft).load_model(fresh, str(ours))
    expected, loaded = model.state_dict(), fresh.state_dict()
    restored = [k for k in expected if torch.equal(expected[k], loaded[k])]
    held = [k for k in expected if ".lora_" in k or not is_peft]
    assert sorted(restored) == sorted(held)


@needs_automodel
def test_merging_automodels_saved_adapter_equals_its_lora_modules_effective_weights(
    am: dict[str, ModuleType], tmp_path: Path
) -> None:
    """The real thing end to end: the adapter Automodel saves (is_peft) checks clean against the
    base bagelverify saves from the same model, and ``merge_adapter`` gives every LoRA module's
    weight exactly as Automodel's ``LinearLoRA.materialize_effective_weight`` computes it (F32
    model: both compute W + s*B@A in F32, rounded once); every other tensor is the base's."""
    from nemo_automodel.components._peft.lora import LinearLoRA

    from bagelverify.lora import check_adapter, merge_adapter

    model = lora_model(am, seed=3)
    adapter = lora_save(am, model, tmp_path / "adapter", is_peft=True)
    state = model.state_dict()
    base = {key: value for key, value in state.items() if ".lora_" not in key}
    config = automodel.bagel_config_from_automodel(model.config)
    bv.save_bagel_checkpoint(base, tmp_path / "base", stage="stage1", config=config)
    report = check_adapter(adapter, tmp_path / "base")
    assert report.ok, report.errors
    assert f"q_proj: {TINY.num_hidden_layers} UND, 0 GEN twins" in report.total.summary()
    merge_adapter(tmp_path / "base", adapter, tmp_path / "merged")
    merged = file_tensors(tmp_path / "merged")
    effective = {
        name.removeprefix("model.") + ".weight": module.materialize_effective_weight()
        for name, module in model.named_modules()
        if isinstance(module, LinearLoRA)
    }
    assert len(effective) == report.modules == 2 * (TINY.num_hidden_layers + TINY.vit_layers_used)
    unequal = [
        key
        for key, value in merged.items()
        if not torch.equal(value, effective.get(key, base["model." + key]))
    ]
    assert unequal == []
    assert sum(not torch.equal(merged[k], base["model." + k]) for k in effective) == len(effective)
