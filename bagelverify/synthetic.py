"""Synthetic BAGEL-7B-MoT-shaped checkpoints: the real key set and dtypes, smaller sizes.

Nothing is downloaded: keys and dtypes come from the shipped manifest, shapes from the family
table applied to a scaled config, values from a seeded generator.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .backbones import HF_CONFIG, ROOTS, Backbone, sources
from .config import CONFIG_FILES, LLM_CONFIG_FILE, VIT_CONFIG_FILE, BagelConfig
from .dtypes import CastLike, parse_dtype
from .errors import ArgumentError
from .families import expected_shapes
from .manifest import MODEL_FILE, VAE_FILE, load_manifest
from .patch_embedding import conv_shape_of
from .pos_embed import POSITION_TABLE_KEYS, position_table
from .publish import publishing
from .safetensors_io import DTYPES, TensorSpec, write_safetensors

_FULL = BagelConfig()
MODEL_WEIGHTS = "model.safetensors"
"""The weights file of a Hugging Face model folder."""


@dataclass(frozen=True)
class SyntheticCheckpoint:
    """A written synthetic folder, its config and the bytes of its model file."""

    path: Path
    config: BagelConfig
    model_bytes: int


DEFAULT_SCALE = 32
"""The default width divisor of a synthetic checkpoint (``make_synthetic_checkpoint``, ``bagelverify
demo``): the real key set in about 29 MB."""


def scaled_config(scale: float) -> BagelConfig:
    """BAGEL-7B-MoT's config with every width divided by ``scale`` (at least 1).

    Counts that name keys or fix other shapes stay: layer counts, attention and key-value head
    counts (the head width scales instead, so ``hidden = heads * head_dim`` holds exactly), the
    patch size and channels, the latent patch size and the timestep frequency width (which no
    config file records). Position tables scale through their side lengths, so the ViT table
    stays ``(image_size / patch_size)**2`` rows.
    """
    if not scale >= 1:
        raise ArgumentError(f"scale must be a number >= 1 (1: the full model), got {scale!r}")

    def shrink(size: int) -> int:
        return max(1, int(size // scale))

    side = shrink(_FULL.vit_image_size // _FULL.vit_patch_size)
    vit_head_dim = shrink(_FULL.vit_hidden_size // _FULL.vit_num_attention_heads)
    return BagelConfig(
        hidden_size=_FULL.num_attention_heads * shrink(_FULL.head_dim),
        num_hidden_layers=_FULL.num_hidden_layers,
        intermediate_size=shrink(_FULL.intermediate_size),
        num_attention_heads=_FULL.num_attention_heads,
        num_key_value_heads=_FULL.num_key_value_heads,
        vocab_size=shrink(_FULL.vocab_size),
        vit_hidden_size=_FULL.vit_num_attention_heads * vit_head_dim,
        vit_intermediate_size=shrink(_FULL.vit_intermediate_size),
        vit_num_hidden_layers=_FULL.vit_num_hidden_layers,
        vit_patch_size=_FULL.vit_patch_size,
        vit_image_size=side * _FULL.vit_patch_size,
        vit_num_channels=_FULL.vit_num_channels,
        vit_max_num_patch_per_side=shrink(_FULL.vit_max_num_patch_per_side),
        max_latent_size=shrink(_FULL.max_latent_size),
        latent_patch_size=_FULL.latent_patch_size,
        vae_z_channels=shrink(_FULL.vae_z_channels),
        timestep_frequency_size=_FULL.timestep_frequency_size,
        vit_num_attention_heads=_FULL.vit_num_attention_heads,
    )


def synthetic_specs(
    scale: float, *, dtype: CastLike | None = None
) -> tuple[BagelConfig, list[TensorSpec], list[TensorSpec]]:
    """The scaled config and the ``ema.safetensors`` / ``ae.safetensors`` tensor lists.

    Model shapes come from ``expected_shapes(config)``; VAE shapes are the manifest's with each
    dimension divided by ``scale`` (at least 1). ``dtype`` (any spelling
    :func:`~bagelverify.dtypes.parse_dtype` accepts: ``"bf16"``, ``"F32"``, ...) overrides the
    model file's dtype.
    """
    manifest = load_manifest()
    config = scaled_config(scale)
    shapes = expected_shapes(config)
    unknown = [key for key in manifest[MODEL_FILE] if key not in shapes]
    if unknown or len(shapes) != len(manifest[MODEL_FILE]):
        raise AssertionError(
            f"the family table and the manifest disagree: {len(unknown)} manifest keys have no "
            f"family shape (e.g. {unknown[:3]}), table {len(shapes)} keys vs manifest "
            f"{len(manifest[MODEL_FILE])}"
        )
    name = None if dtype is None else parse_dtype(dtype)
    model = [
        TensorSpec(key, name or spec.dtype, shapes[key])
        for key, spec in manifest[MODEL_FILE].items()
    ]
    vae = [
        TensorSpec(key, spec.dtype, tuple(max(1, int(d // scale)) for d in spec.shape))
        for key, spec in manifest[VAE_FILE].items()
    ]
    return config, model, vae


def make_synthetic_checkpoint(
    out_dir: str | os.PathLike[str],
    *,
    scale: float = DEFAULT_SCALE,
    seed: int = 0,
    dtype: CastLike | None = None,
    with_vae: bool = True,
) -> SyntheticCheckpoint:
    """Write a BAGEL-7B-MoT-shaped folder: ``ema.safetensors``, ``ae.safetensors`` and the three
    config files, with the manifest's keys and dtypes and every width divided by ``scale``.

    Values are standard-normal draws (scaled by 0.02) from a generator seeded with ``seed``, so
    the same arguments give the same bytes; the two position tables are the real sine-cosine
    tables for the config (:func:`bagelverify.pos_embed.position_table`). ``scale=1`` is the
    full 29 GB model; ``scale=32`` (the default, as in ``bagelverify demo``) writes about 29 MB
    of model weights, ``scale=64`` about 7 MB. Tensors are
    generated one at a time. The folder is published like every checkpoint write
    (:mod:`bagelverify.publish`): a synthetic checkpoint already there is replaced as a whole.
    """
    config, model, vae = synthetic_specs(scale, dtype=dtype)
    directory = Path(out_dir)
    generator = torch.Generator().manual_seed(seed)
    by_name = {spec.name: spec for spec in (*model, *vae)}
    model_keys = {spec.name for spec in model}

    def draw(name: str) -> torch.Tensor:
        spec = by_name[name]
        target = DTYPES[spec.dtype].torch_dtype
        if name in POSITION_TABLE_KEYS and name in model_keys:
            return position_table(name, config, target)
        if not target.is_floating_point:
            return torch.randint(0, 2, spec.shape, generator=generator).to(target)
        values = torch.randn(spec.shape, generator=generator, dtype=torch.float32)
        return values.mul_(0.02).to(target)

    written = {MODEL_FILE, *CONFIG_FILES} | ({VAE_FILE} if with_vae else set())
    with publishing(directory, replaces=written.__contains__) as staging:
        write_safetensors(staging / MODEL_FILE, model, draw)
        if with_vae:
            write_safetensors(staging / VAE_FILE, vae, draw)
        config.save_pretrained(staging)
    return SyntheticCheckpoint(directory, config, sum(spec.nbytes for spec in model))


#: The key prefix each synthetic backbone is written under (the hub's layouts).
_BACKBONE_ROOTS: dict[Backbone, str] = {"llm": "", "vit": "vision_model."}
_SIGLIP_HEAD = {"head.probe": (1, 1), "head.layernorm.weight": (1,)}
"""A stand-in for SigLIP's pooling head (shape: leading dims, then the ViT width)."""


def backbone_specs(config: BagelConfig, *, dtype: str = "BF16") -> dict[Backbone, list[TensorSpec]]:
    """The tensors of a Qwen2 and a SigLIP (vision-only, ``vision_model.`` keys) folder of
    ``config``'s size: every tensor BAGEL copies (the patch weight as its Conv2d), the vision
    tower's last layer and a pooling-head stand-in (both dropped by a compose)."""
    out: dict[Backbone, list[TensorSpec]] = {"llm": [], "vit": []}
    for source in sources():
        if source.root != _BACKBONE_ROOTS[source.backbone]:
            continue
        root, target = ROOTS[source.backbone], source.target
        assert target.shape is not None
        keys = list(target.keys(config))
        if source.backbone == "vit" and target.layers is not None:  # the last layer: dropped
            keys += [
                target.template.format(layer=config.vit_layers_used, param=param)
                for param in target.params
            ]
        for key in keys:
            shape = target.shape(config, key.rsplit(".", 1)[1])
            if source.convert is not None and key.endswith(".weight"):
                shape = conv_shape_of(
                    shape, patch_size=config.vit_patch_size, channels=config.vit_num_channels
                )
            name = source.root + key[len(root.bagel) :]
            out[source.backbone].append(TensorSpec(name, dtype, shape))
    for name, dims in _SIGLIP_HEAD.items():
        out["vit"].append(
            TensorSpec("vision_model." + name, dtype, (*dims, config.vit_hidden_size))
        )
    return out


def make_synthetic_backbones(
    out_dir: str | os.PathLike[str],
    config: BagelConfig,
    *,
    seed: int = 0,
    dtype: str = "BF16",
) -> dict[Backbone, Path]:
    """Write a Qwen2 (``out_dir/llm``) and a SigLIP (``out_dir/vit``) Hugging Face folder of
    ``config``'s size (:func:`backbone_specs`; ``config.json`` and ``model.safetensors``),
    values standard-normal * 0.02 from a generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    documents = config.to_json_documents()
    files = {"llm": documents[LLM_CONFIG_FILE], "vit": documents[VIT_CONFIG_FILE]}
    folders: dict[Backbone, Path] = {}
    for backbone, specs in backbone_specs(config, dtype=dtype).items():
        by_name = {spec.name: spec for spec in specs}

        def draw(name: str, by_name: dict[str, TensorSpec] = by_name) -> torch.Tensor:
            spec = by_name[name]
            values = torch.randn(spec.shape, generator=generator, dtype=torch.float32)
            return values.mul_(0.02).to(DTYPES[spec.dtype].torch_dtype)

        folder = Path(out_dir) / backbone
        names = {MODEL_WEIGHTS, HF_CONFIG}
        with publishing(folder, replaces=names.__contains__) as staging:
            write_safetensors(staging / MODEL_WEIGHTS, specs, draw)
            (staging / HF_CONFIG).write_text(json.dumps(files[backbone], indent=2) + "\n")
        folders[backbone] = folder
    return folders
