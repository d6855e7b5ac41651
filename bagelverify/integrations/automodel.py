"""NeMo Automodel integration: one call makes Automodel's BAGEL model use bagelverify.

>>> from bagelverify.integrations import automodel
>>> automodel.install()  # before building the model  # doctest: +SKIP

After :func:`install`, ``BagelForUnifiedMultimodal`` builds :class:`~bagelverify.
BagelStateDictAdapter` (with its config translated to a :class:`~bagelverify.BagelConfig`, so
every conversion checks shapes), the adapter counts as an instance of Automodel's
``StateDictAdapter`` (so its checkpointer takes the load path that fills the model's tensors in
place instead of reading every file onto the CPU), ``from_pretrained`` uses bagelverify's loader,
the recipe's ``load_bagel_autoencoder`` fills the VAE through bagelverify's checks, and the
checkpointer's base-checkpoint loads are checked and read by bagelverify's read engine
(:mod:`.checkpointer`).

Importing this module does not import Automodel; :func:`install` does.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..adapter import BagelStateDictAdapter
from ..config import BagelConfig
from ..errors import (
    IntegrationError,
    MissingKeysError,
    ShapeMismatchError,
    agree,
    counted,
    format_examples,
)
from ..manifest import VAE_FILE
from ..stage import StageLike
from .checkpointer import route_checkpointer

logger = logging.getLogger(__name__)

SUPPORTED = "0.7.0"
"""The Automodel release this integration is tested against."""

INSTALL_HINT = (
    "pip install 'bagelverify[automodel]' (or, without its heavy dependencies: "
    f"pip install --no-deps nemo-automodel=={SUPPORTED} && "
    "pip install transformers==5.18.0 einops torchdata)"
)

FLAGS = ("supports_low_memory_dcp_load", "supports_write_through_checkpoint_load")
"""Names Automodel versions read for "checkpoint reads may write into the model's tensors"
(0.7.0 reads the first, later versions the second); the adapter sets both."""

_BAGEL = "nemo_automodel.components.models.bagel"
_BASE = "nemo_automodel.components.checkpoint.state_dict_adapter"
_CHECKPOINTING = "nemo_automodel.components.checkpoint.checkpointing"
_SEAMS = ("load_model", "_get_storage_reader")
"""The ``Checkpointer`` methods :func:`install` wraps (:mod:`.checkpointer`)."""


def _import(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise IntegrationError(
            f"bagelverify.integrations.automodel needs NeMo Automodel ({name} could not be "
            f"imported: {error}); install it with {INSTALL_HINT}"
        ) from error


def bagel_config_from_automodel(config: Any) -> BagelConfig:
    """The :class:`~bagelverify.BagelConfig` of an Automodel ``BagelConfig``.

    Reads the text and vision sub-configs and BAGEL's own fields. The vision layer count is the
    one the model is built with (Automodel applies ``vit_select_layer`` to the config in place
    and marks it; an unmarked config is counted as Automodel will build it). Raises
    :class:`~bagelverify.errors.ConfigError` for a config without a vision tower
    (``visual_und=False``), which has no BAGEL-7B-MoT key layout.
    """
    from ..errors import ConfigError

    text, vision = config.text_config, config.vision_config
    if vision is None or not getattr(config, "visual_und", True):
        raise ConfigError(
            "Automodel BagelConfig has no vision tower (visual_und=False or vision_config=None); "
            "bagelverify checks the BAGEL-7B-MoT layout, which has one"
        )
    built_layers = vision.num_hidden_layers
    if not getattr(config, "_bagel_vit_select_layer_applied", False):
        built_layers += 1 + config.vit_select_layer
    vae = getattr(config, "vae_config", None) or {}
    return BagelConfig(
        hidden_size=text.hidden_size,
        num_hidden_layers=text.num_hidden_layers,
        intermediate_size=text.intermediate_size,
        num_attention_heads=text.num_attention_heads,
        num_key_value_heads=text.num_key_value_heads,
        vocab_size=text.vocab_size,
        vit_hidden_size=vision.hidden_size,
        vit_intermediate_size=vision.intermediate_size,
        # BagelConfig counts the tower before BAGEL drops its last layer
        vit_num_hidden_layers=built_layers + 1,
        vit_patch_size=vision.patch_size,
        vit_image_size=vision.image_size,
        vit_num_channels=vision.num_channels,
        vit_num_attention_heads=vision.num_attention_heads,
        vit_max_num_patch_per_side=config.vit_max_num_patch_per_side,
        max_latent_size=config.max_latent_size,
        latent_patch_size=config.latent_patch_size,
        vae_z_channels=int(vae.get("z_channels", BagelConfig.vae_z_channels)),
        vit_rope=bool(getattr(config, "vit_rope", False)),
    )


class AutomodelBagelStateDictAdapter(BagelStateDictAdapter):
    """The adapter Automodel's model builds after :func:`install`: Automodel's config is
    translated (:func:`bagel_config_from_automodel`) so every conversion checks shapes; the
    original is kept as :attr:`automodel_config`."""

    def __init__(self, config: Any = None, *, stage: StageLike = "stage1") -> None:
        checked = config
        if config is not None and not isinstance(config, BagelConfig):
            checked = bagel_config_from_automodel(config)
        super().__init__(checked, stage=stage)
        self.automodel_config = config


BACKBONE_LOADER = f"{_BAGEL}.hf_backbone_loader"
"""Automodel's module that initialises BAGEL from Qwen2 + SigLIP folders (``hf_backbones``)."""
BACKBONE_FUNCTIONS = ("load_bagel_hf_backbone_weights", "initialize_bagel_non_backbone_weights")
_ORIGINALS: dict[str, Any] = {}
"""Automodel's own functions that :func:`install` replaced, by name."""


def automodel_originals() -> dict[str, Any]:
    """Automodel's own ``hf_backbones`` functions (:data:`BACKBONE_FUNCTIONS`), as they were
    before :func:`install` (for comparisons)."""
    loader = _import(BACKBONE_LOADER)
    return {name: _ORIGINALS.get(name, getattr(loader, name)) for name in BACKBONE_FUNCTIONS}


def _missing_members(base: type) -> list[str]:
    """Members of Automodel's base class (flags, hooks, methods) that the adapter lacks."""
    names = [n for n in dir(base) if not n.startswith("__") and not n.startswith("_abc")]
    return [n for n in names if not hasattr(BagelStateDictAdapter, n)]


def install() -> None:
    """Make Automodel's BAGEL model use bagelverify's adapter and loaders (idempotent).

    Registers :class:`~bagelverify.BagelStateDictAdapter` as a virtual subclass of Automodel's
    ``StateDictAdapter`` (it provides every member of that base class itself) and replaces, in
    Automodel's BAGEL modules, the adapter class, ``load_bagel_checkpoint_state_dict`` and
    ``load_bagel_autoencoder``, and routes the checkpointer's BAGEL base-checkpoint loads
    through bagelverify's checks and read engine (:func:`.checkpointer.route_checkpointer`).
    Models built before the call keep their adapter. Raises
    :class:`~bagelverify.errors.IntegrationError` (an ``ImportError``) naming what to install
    when Automodel is missing, and when the installed version's base class has a member the
    adapter does not provide or none of the known in-place load flags, or its checkpointer
    lacks the methods the routing wraps.
    """
    base_module = _import(_BASE)
    base = base_module.StateDictAdapter
    checkpointing = _import(_CHECKPOINTING)
    seams = [name for name in _SEAMS if not hasattr(checkpointing.Checkpointer, name)]
    if seams:
        raise IntegrationError(
            f"the installed NeMo Automodel's Checkpointer ({checkpointing.__file__}) has no "
            f"{format_examples(seams)}, through which bagelverify reads BAGEL checkpoints; "
            f"bagelverify is tested with nemo-automodel=={SUPPORTED}: {INSTALL_HINT}"
        )
    missing = _missing_members(base)
    if missing or not any(hasattr(base, flag) for flag in FLAGS):
        raise IntegrationError(
            f"the installed NeMo Automodel's StateDictAdapter "
            f"({base_module.__file__}) has members bagelverify's adapter lacks: "
            f"{format_examples(missing)} (in-place load flags known: {FLAGS}); bagelverify is "
            f"tested with nemo-automodel=={SUPPORTED}: {INSTALL_HINT}"
        )
    from .. import checkpoint
    from ..partition import classify

    # Build the key matcher now (once: about 0.1 s and 6 MB, as Automodel compiles its own
    # adapter's patterns at import), not inside the first checkpoint load.
    classify("connector.fc1.weight")
    base.register(BagelStateDictAdapter)
    model = _import(f"{_BAGEL}.model")
    adapter_module = _import(f"{_BAGEL}.state_dict_adapter")
    autoencoder = _import(f"{_BAGEL}.autoencoder")
    package = _import(_BAGEL)
    for module in (model, adapter_module):
        module.BagelStateDictAdapter = AutomodelBagelStateDictAdapter
        module.load_bagel_checkpoint_state_dict = checkpoint.load_bagel_checkpoint_state_dict
    for module in (autoencoder, package):
        module.load_bagel_autoencoder = load_bagel_autoencoder
    route_checkpointer(checkpointing)
    _route_backbones()
    logger.info("NeMo Automodel's BAGEL model now uses bagelverify's adapter and loaders")


_RECIPE = "nemo_automodel.recipes.multimodal.finetune"
"""Automodel's recipe module, which imports ``load_bagel_hf_backbone_weights`` by name."""


def _route_backbones() -> None:
    """Make Automodel's ``hf_backbones`` initialisation load through bagelverify (in the loader
    module, and in the recipe module if it is already imported; one imported later takes the
    loader module's function)."""
    loader = _import(BACKBONE_LOADER)
    name = "load_bagel_hf_backbone_weights"
    _ORIGINALS.setdefault(name, getattr(loader, name))
    loader.load_bagel_hf_backbone_weights = load_bagel_hf_backbone_weights
    recipe: Any = sys.modules.get(_RECIPE)
    if recipe is not None and hasattr(recipe, name):
        recipe.load_bagel_hf_backbone_weights = load_bagel_hf_backbone_weights


def load_bagel_hf_backbone_weights(model: Any, model_cfg: Any) -> None:
    """Drop-in for Automodel's ``load_bagel_hf_backbone_weights`` (``init_mode: hf_backbones``).

    Reads ``llm_path``, ``vit_path``, ``visual_und`` and ``copy_init_moe`` from ``model_cfg``
    as Automodel does (a path that is not a local folder is resolved by Automodel's own
    resolver). The backbones are routed and checked against the built model's config
    (:func:`bagel_config_from_automodel`) and read into its parameters in place by
    :func:`.backbone_loader.load_backbones_into`: no backbone state dict is loaded whole onto
    the CPU, and each rank of a sharded model reads its own rows. A model without a vision
    tower (``visual_und=False``) is not BAGEL's layout and takes Automodel's own loader.
    """
    from .backbone_loader import load_backbones_into
    from .checkpointer import destinations_of

    llm_path = model_cfg.get("llm_path", None)
    vit_path = model_cfg.get("vit_path", None)
    if not bool(model_cfg.get("visual_und", True)):
        automodel_originals()["load_bagel_hf_backbone_weights"](model, model_cfg)
        return
    if llm_path is None:
        raise ValueError("model.init_mode='hf_backbones' requires model.llm_path")
    if vit_path is None:
        raise ValueError(
            "model.init_mode='hf_backbones' with visual_und=True requires model.vit_path"
        )
    loader = _import(BACKBONE_LOADER)
    load_backbones_into(
        destinations_of(model),
        loader._resolve_hf_weight_path(llm_path),
        loader._resolve_hf_weight_path(vit_path),
        bagel_config_from_automodel(model.config),
        copy_twins=bool(model_cfg.get("copy_init_moe", True)),
    )


def _vae_folder(path: Path) -> Path:
    if path.is_dir():
        return path
    if path.name != VAE_FILE:
        raise FileNotFoundError(
            f"{path}: expected the BAGEL VAE file {VAE_FILE!r} or the folder holding it; "
            f"bagelverify reads it by that name (link or rename the file)"
        )
    return path.parent


def load_autoencoder_into(
    autoencoder: Any, checkpoint_dir: str | os.PathLike[str], *, strict: bool = True
) -> Any:
    """Fill an Automodel ``AutoEncoder`` from ``ae.safetensors`` (a file or its folder).

    The file is checked by :func:`bagelverify.load_bagel_vae_state_dict` (VAE keys only; under
    ``strict`` all of the release's), then against the module: every key the module has must be
    in the file and every shape must match (:class:`~bagelverify.errors.MissingKeysError` /
    :class:`~bagelverify.errors.ShapeMismatchError`, all listed) before the module changes. A
    module on the meta device (no memory yet) takes the loaded tensors as its own; any other is
    filled in place. Returns ``autoencoder``.
    """
    from .. import checkpoint

    folder = _vae_folder(Path(checkpoint_dir))
    loaded: Mapping[str, Any] = checkpoint.load_bagel_vae_state_dict(folder, strict=strict)
    wanted = autoencoder.state_dict()
    absent = [key for key in wanted if key not in loaded]
    extra = [key for key in loaded if key not in wanted]
    if absent or (strict and extra):
        raise MissingKeysError(
            f"{folder / VAE_FILE}: the autoencoder and the file differ: "
            f"{counted(len(absent), 'module key')} {agree(len(absent), 'is', 'are')} not in the "
            f"file ({format_examples(absent)}), {counted(len(extra), 'file key')} "
            f"{agree(len(extra), 'has', 'have')} no module tensor ({format_examples(extra)}). "
            "Check that the file is BAGEL's VAE.",
            absent + extra,
        )
    wrong = [
        f"  {key}: module {list(wanted[key].shape)}, file {list(loaded[key].shape)}"
        for key in wanted
        if tuple(wanted[key].shape) != tuple(loaded[key].shape)
    ]
    if wrong:
        raise ShapeMismatchError(
            f"{folder / VAE_FILE}: {counted(len(wrong), 'autoencoder tensor')} "
            f"{agree(len(wrong), 'does', 'do')} not have the file's shape:\n"
            + "\n".join(wrong)
            + "\nThe module's AutoEncoderParams do not describe "
            "this file; nothing was loaded."
        )
    on_meta = any(tensor.is_meta for tensor in wanted.values())
    autoencoder.load_state_dict({key: loaded[key] for key in wanted}, strict=True, assign=on_meta)
    return autoencoder


def load_bagel_autoencoder(local_path: str | os.PathLike[str] | None) -> tuple[Any, Any]:
    """Drop-in for Automodel's ``load_bagel_autoencoder``: ``(AutoEncoder, params)``.

    With a path, the module is built on the meta device and takes the tensors
    :func:`load_autoencoder_into` loads and checks, so the VAE is held once (Automodel's own
    builds a randomly initialised copy first). Without one it is Automodel's randomly
    initialised module.
    """
    import torch

    autoencoder = _import(f"{_BAGEL}.autoencoder")
    params = autoencoder.default_autoencoder_params()
    if local_path is None:
        return autoencoder.AutoEncoder(params), params
    with torch.device("meta"):
        module = autoencoder.AutoEncoder(params)
    return load_autoencoder_into(module, local_path), params


def automodel_config(config: BagelConfig, *, stage: StageLike = "stage1") -> Any:
    """An Automodel ``BagelConfig`` that builds a model with ``config``'s shapes for ``stage``.

    The inverse of :func:`bagel_config_from_automodel` (for tests, benchmarks and synthetic
    checkpoints; real runs read the checkpoint's own config). The padding token is the
    release's, or the last token when the vocabulary is smaller.
    """
    from ..stage import normalize_stage

    configuration = _import(f"{_BAGEL}.configuration")
    pad = min(151643, config.vocab_size - 1)
    return configuration.BagelConfig(
        text_config={
            "hidden_size": config.hidden_size,
            "num_hidden_layers": config.num_hidden_layers,
            "intermediate_size": config.intermediate_size,
            "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.num_key_value_heads,
            "vocab_size": config.vocab_size,
            "pad_token_id": pad,
            "tie_word_embeddings": False,
        },
        vision_config={
            "hidden_size": config.vit_hidden_size,
            "intermediate_size": config.vit_intermediate_size,
            "num_hidden_layers": config.vit_num_hidden_layers,
            "num_attention_heads": config.vit_num_attention_heads,
            "patch_size": config.vit_patch_size,
            "image_size": config.vit_image_size,
            "num_channels": config.vit_num_channels,
        },
        stage=1 if normalize_stage(stage) == "stage1" else 2,
        vit_select_layer=-2,
        vit_patch_size=config.vit_patch_size,
        vit_max_num_patch_per_side=config.vit_max_num_patch_per_side,
        max_latent_size=config.max_latent_size,
        latent_patch_size=config.latent_patch_size,
        vae_config={"z_channels": config.vae_z_channels, "downsample": 8},
        vit_rope=config.vit_rope,
        pad_token_id=pad,
    )
