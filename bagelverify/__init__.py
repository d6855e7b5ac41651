"""bagelverify: verified HF <-> native conversion of BAGEL-7B-MoT checkpoints."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .adapter import BagelStateDictAdapter
from .buckets import Bucket
from .config import BagelConfig
from .errors import (
    AliasError,
    AllocationError,
    BagelError,
    ConfigError,
    CorruptCheckpointError,
    DestinationError,
    DistributedMismatchError,
    IntegrationError,
    KeyCollisionError,
    LoraError,
    LossyCastError,
    MissingKeysError,
    PatternError,
    PatternTooComplexError,
    QuantizedCheckpointError,
    ReadError,
    RootError,
    ShapeMismatchError,
    ShardSizeError,
    StageError,
    StageTypeError,
    UnknownKeysError,
    UnsupportedPattern,
    UnsupportedPlatformError,
    UnsupportedTensorError,
)
from .families import FAMILIES, Family, expected_shapes, patterns_of, und_twin
from .matcher import Matcher, compile_matcher
from .partition import classify, partition
from .plan import Plan, plan
from .stage import normalize_stage

if TYPE_CHECKING:
    from .checkpoint import (
        CheckpointReport,
        IncompatibleKeys,
        convert_checkpoint,
        inspect_checkpoint,
        load_bagel_checkpoint_state_dict,
        load_bagel_vae_state_dict,
        load_into,
        save_bagel_checkpoint,
        write_bagel_checkpoint,
    )
    from .compose import ComposeReport, compose_checkpoint
    from .distributed import (
        DistributedLoadResult,
        dcp_to_hf,
        hf_to_dcp,
        load_bagel_checkpoint_distributed,
    )
    from .lora import check_adapter, merge_adapter
    from .patch_embedding import conv_patch_weight_to_linear, linear_patch_weight_to_conv
    from .synthetic import make_synthetic_checkpoint
    from .verify import check_patterns

#: Names whose modules import torch (or, for ``check_patterns``, the proof machinery), loaded on
#: first use so that ``import bagelverify`` (and the key-only API: adapter, classify, patterns)
#: stays light.
_LAZY: dict[str, str] = {
    **dict.fromkeys(
        (
            "CheckpointReport",
            "IncompatibleKeys",
            "convert_checkpoint",
            "inspect_checkpoint",
            "load_bagel_checkpoint_state_dict",
            "load_bagel_vae_state_dict",
            "load_into",
            "save_bagel_checkpoint",
            "write_bagel_checkpoint",
        ),
        "checkpoint",
    ),
    **dict.fromkeys(
        (
            "DistributedLoadResult",
            "dcp_to_hf",
            "hf_to_dcp",
            "load_bagel_checkpoint_distributed",
        ),
        "distributed",
    ),
    "check_adapter": "lora",
    "merge_adapter": "lora",
    "ComposeReport": "compose",
    "compose_checkpoint": "compose",
    "conv_patch_weight_to_linear": "patch_embedding",
    "linear_patch_weight_to_conv": "patch_embedding",
    "make_synthetic_checkpoint": "synthetic",
    "check_patterns": "verify",
}


def __getattr__(name: str) -> Any:
    """Import the module behind a torch-dependent name on first use."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


UND_PATTERNS: list[str] = patterns_of(Bucket.UND)
"""Full-match patterns of the understanding keys (stage 1)."""
GEN_PATTERNS: list[str] = patterns_of(Bucket.GEN)
"""Full-match patterns of the generation keys (added by stage 2)."""
VAE_PATTERNS: list[str] = patterns_of(Bucket.VAE)
"""Full-match patterns of VAE keys (recognised and dropped)."""
EXTRA_PATTERNS: list[str] = patterns_of(Bucket.EXTRA)
"""Full-match pattern of Transformer-Engine extra state (dropped)."""

__all__ = [
    "EXTRA_PATTERNS",
    "FAMILIES",
    "GEN_PATTERNS",
    "UND_PATTERNS",
    "VAE_PATTERNS",
    "AliasError",
    "AllocationError",
    "BagelConfig",
    "BagelError",
    "BagelStateDictAdapter",
    "Bucket",
    "CheckpointReport",
    "ComposeReport",
    "ConfigError",
    "CorruptCheckpointError",
    "DestinationError",
    "DistributedLoadResult",
    "DistributedMismatchError",
    "IntegrationError",
    "LoraError",
    "Family",
    "IncompatibleKeys",
    "KeyCollisionError",
    "LossyCastError",
    "QuantizedCheckpointError",
    "Matcher",
    "MissingKeysError",
    "PatternError",
    "PatternTooComplexError",
    "Plan",
    "RootError",
    "ReadError",
    "ShapeMismatchError",
    "ShardSizeError",
    "StageError",
    "StageTypeError",
    "UnknownKeysError",
    "UnsupportedPattern",
    "UnsupportedPlatformError",
    "UnsupportedTensorError",
    "check_adapter",
    "classify",
    "check_patterns",
    "compile_matcher",
    "compose_checkpoint",
    "conv_patch_weight_to_linear",
    "convert_checkpoint",
    "dcp_to_hf",
    "expected_shapes",
    "hf_to_dcp",
    "inspect_checkpoint",
    "linear_patch_weight_to_conv",
    "load_bagel_checkpoint_distributed",
    "load_bagel_checkpoint_state_dict",
    "load_bagel_vae_state_dict",
    "load_into",
    "make_synthetic_checkpoint",
    "merge_adapter",
    "normalize_stage",
    "partition",
    "plan",
    "save_bagel_checkpoint",
    "und_twin",
    "write_bagel_checkpoint",
]
