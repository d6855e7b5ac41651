"""The floating dtypes a checkpoint can be written in, and their accepted spellings."""

from __future__ import annotations

from typing import Literal

import torch

from .errors import ArgumentError, ArgumentTypeError
from .quantized import FP8_DTYPES
from .safetensors_io import DTYPES

CastLike = Literal[
    "bf16",
    "f16",
    "fp16",
    "f32",
    "f64",
    "BF16",
    "F16",
    "F32",
    "F64",
    "bfloat16",
    "float16",
    "float32",
    "float64",
]
"""The dtype spellings a type checker accepts where a function takes a floating dtype (a
``torch.dtype`` is accepted too); :func:`parse_dtype` also takes other cases."""

DTYPE_ALIASES: dict[str, str] = {"bf16": "BF16", "f16": "F16", "fp16": "F16", "f32": "F32"}
"""CLI spellings of the floating dtypes a checkpoint can be cast to."""


def parse_dtype(name: str) -> str:
    """``"bf16"`` / ``"BF16"`` / ``"bfloat16"`` -> the safetensors name ``"BF16"``; any other
    name raises :class:`~bagelverify.errors.ArgumentError` (also a ``ValueError``)."""
    upper = DTYPE_ALIASES.get(name.lower(), name.upper())
    by_torch = {str(d.torch_dtype).removeprefix("torch."): n for n, d in DTYPES.items()}
    upper = by_torch.get(name.lower(), upper)
    if (
        upper not in DTYPES
        or upper in FP8_DTYPES
        or not DTYPES[upper].torch_dtype.is_floating_point
    ):
        raise ArgumentError(f"dtype must be bf16, f16 or f32 (or f64, any case), got {name!r}")
    return upper


def torch_dtype(dtype: CastLike | torch.dtype) -> torch.dtype:
    """The torch dtype of any spelling :func:`parse_dtype` takes, or of a floating
    ``torch.dtype`` itself: how a ``dtype=`` argument reads the same everywhere (the loaders,
    rewrites, synthetic checkpoints and ``--dtype``)."""
    if isinstance(dtype, torch.dtype):
        return DTYPES[parse_dtype(str(dtype).removeprefix("torch."))].torch_dtype
    if not isinstance(dtype, str):
        raise ArgumentTypeError(
            f"dtype must be a str such as 'bf16' or a torch.dtype, got {type(dtype).__name__}"
        )
    return DTYPES[parse_dtype(dtype)].torch_dtype
