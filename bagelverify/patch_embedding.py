"""The ViT patch embedding as a Conv2d weight and as BAGEL's Linear weight.

BAGEL stores ``vit_model.vision_model.embeddings.patch_embedding.weight`` as a Linear weight
``(out, P*P*C)`` whose input is a patch flattened channel-last (row, column, channel). The
SigLIP Conv2d weight ``(out, C, P, P)`` holds the same numbers in another order, so converting
is a permutation, never a plain ``view``.
"""

from __future__ import annotations

import torch

from .errors import ShapeMismatchError
from .families import FAMILY_BY_NAME

PATCH_EMBEDDING_WEIGHT = FAMILY_BY_NAME["vit.patch_embedding"].template.format(param="weight")
"""HF key of the patch-embedding weight (from the family table)."""


def conv_patch_weight_to_linear(weight: torch.Tensor) -> torch.Tensor:
    """Conv2d ``(out, C, P, P)`` -> Linear ``(out, P*P*C)`` in channel-last patch order."""
    if weight.dim() != 4 or weight.shape[2] != weight.shape[3]:
        raise ShapeMismatchError(
            f"{PATCH_EMBEDDING_WEIGHT}: expected a Conv2d weight (out, C, P, P) with square "
            f"patches, got {tuple(weight.shape)}; pass the SigLIP Conv2d weight"
        )
    out = weight.shape[0]
    return weight.permute(0, 2, 3, 1).reshape(out, -1).contiguous()


def linear_patch_weight_to_conv(
    weight: torch.Tensor, *, patch_size: int, channels: int
) -> torch.Tensor:
    """Linear ``(out, P*P*C)`` in channel-last patch order -> Conv2d ``(out, C, P, P)``."""
    expected = patch_size * patch_size * channels
    if weight.dim() != 2 or weight.shape[1] != expected:
        raise ShapeMismatchError(
            f"{PATCH_EMBEDDING_WEIGHT}: expected a Linear weight (out, {expected}) for "
            f"patch_size={patch_size}, channels={channels}, got {tuple(weight.shape)}; check "
            "patch_size and channels against the config"
        )
    out = weight.shape[0]
    return weight.reshape(out, patch_size, patch_size, channels).permute(0, 3, 1, 2).contiguous()


def conv_shape_of(
    linear_shape: tuple[int, ...], *, patch_size: int, channels: int
) -> tuple[int, ...]:
    """The Conv2d weight shape that corresponds to a Linear patch-embedding shape."""
    return (linear_shape[0], channels, patch_size, patch_size)
