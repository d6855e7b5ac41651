"""Synthetic BAGEL-7B-MoT-shaped checkpoints: the real key set and dtypes, smaller sizes.

Nothing is downloaded: keys and dtypes come from the shipped manifest, shapes from the family
table applied to a scaled config, values from a seeded generator.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import CONFIG_FILES, BagelConfig
from .dtypes import CastLike, parse_dtype
from .errors import ArgumentError
from .families import expected_shapes
from .manifest import MODEL_FILE, VAE_FILE, load_manifest
from .pos_embed import POSITION_TABLE_KEYS, position_table
from .publish import publishing
from .safetensors_io import DTYPES, TensorSpec, write_safetensors

_FULL = BagelConfig()


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
