"""bagelverify: verified HF <-> native conversion of BAGEL-7B-MoT checkpoints.

The top level holds what a user needs, grouped as in ``__all__``: load, save, inspect, convert,
the checkpoint doctor (diff, repair), LoRA, keys and stages, the config and argument types, and
the errors. Everything else lives in its submodule (``bagelverify.checkpoint``,
``bagelverify.families``, ``bagelverify.matcher``, ``bagelverify.plan``, ...); a name that used
to be here still resolves, with a ``DeprecationWarning`` naming its module.
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING, Any

from .adapter import BagelStateDictAdapter
from .buckets import Bucket
from .config import BagelConfig, ConfigLike
from .errors import (
    AliasError,
    AllocationError,
    ArgumentError,
    ArgumentTypeError,
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
    WeightsMismatchError,
)
from .families import patterns_of
from .partition import classify, partition
from .stage import Stage, StageLike, normalize_stage

if TYPE_CHECKING:
    from .checkpoint import (
        CheckpointReport,
        IncompatibleKeys,
        Weights,
        convert_checkpoint,
        inspect_checkpoint,
        load_bagel_checkpoint_state_dict,
        load_bagel_vae_state_dict,
        load_into,
        save_bagel_checkpoint,
    )
    from .compose import ComposeReport, compose_checkpoint
    from .diff import CheckpointDiff, diff_checkpoints
    from .distributed import (
        DistributedLoadResult,
        dcp_to_hf,
        hf_to_dcp,
        load_bagel_checkpoint_distributed,
    )
    from .dtypes import CastLike
    from .export import ExportReport, export_checkpoint
    from .lora import check_adapter, merge_adapter
    from .repair import RepairReport, repair_checkpoint
    from .rewrite import RewriteReport, rewrite_checkpoint
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
            "Weights",
            "convert_checkpoint",
            "inspect_checkpoint",
            "load_bagel_checkpoint_state_dict",
            "load_bagel_vae_state_dict",
            "load_into",
            "save_bagel_checkpoint",
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
    "CheckpointDiff": "diff",
    "diff_checkpoints": "diff",
    "CastLike": "dtypes",
    "RepairReport": "repair",
    "repair_checkpoint": "repair",
    "RewriteReport": "rewrite",
    "rewrite_checkpoint": "rewrite",
    "ExportReport": "export",
    "export_checkpoint": "export",
    "check_adapter": "lora",
    "merge_adapter": "lora",
    "ComposeReport": "compose",
    "compose_checkpoint": "compose",
    "make_synthetic_checkpoint": "synthetic",
    "check_patterns": "verify",
}

#: Former top-level names that live in a submodule now: still found here, with a
#: ``DeprecationWarning`` naming their module (one name per job at the top level).
_MOVED: dict[str, str] = {
    "write_bagel_checkpoint": "checkpoint",  # save_bagel_checkpoint's streaming core
    "FAMILIES": "families",
    "Family": "families",
    "expected_shapes": "families",
    "und_twin": "families",
    "Matcher": "matcher",
    "compile_matcher": "matcher",
    "Plan": "plan",
    "plan": "plan",
    "conv_patch_weight_to_linear": "patch_embedding",
    "linear_patch_weight_to_conv": "patch_embedding",
}


def __getattr__(name: str) -> Any:
    """Import the module behind a torch-dependent name on first use; warn for a moved name."""
    module = _LAZY.get(name)
    if module is None and name in _MOVED:
        module = _MOVED[name]
        warnings.warn(
            f"bagelverify.{name} is deprecated at the top level: import it from "
            f"bagelverify.{module}",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(f".{module}", __name__), name)
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
    # Load
    "load_bagel_checkpoint_state_dict",
    "load_into",
    "load_bagel_vae_state_dict",
    "load_bagel_checkpoint_distributed",
    "DistributedLoadResult",
    "IncompatibleKeys",
    "BagelStateDictAdapter",
    # Save
    "save_bagel_checkpoint",
    # Inspect
    "inspect_checkpoint",
    "CheckpointReport",
    # Convert (safetensors and DCP), rewrite dtypes and tables
    "convert_checkpoint",
    "hf_to_dcp",
    "dcp_to_hf",
    "rewrite_checkpoint",
    "RewriteReport",
    "export_checkpoint",
    "ExportReport",
    "compose_checkpoint",
    "ComposeReport",
    # Doctor: compare and repair
    "diff_checkpoints",
    "CheckpointDiff",
    "repair_checkpoint",
    "RepairReport",
    # LoRA adapters
    "check_adapter",
    "merge_adapter",
    # Keys, buckets and stages
    "classify",
    "partition",
    "Bucket",
    "normalize_stage",
    "UND_PATTERNS",
    "GEN_PATTERNS",
    "VAE_PATTERNS",
    "EXTRA_PATTERNS",
    "check_patterns",
    # Config, argument types and a synthetic checkpoint
    "BagelConfig",
    "ConfigLike",
    "Stage",
    "StageLike",
    "Weights",
    "CastLike",
    "make_synthetic_checkpoint",
    # Errors
    "AliasError",
    "AllocationError",
    "ArgumentError",
    "ArgumentTypeError",
    "BagelError",
    "ConfigError",
    "CorruptCheckpointError",
    "DestinationError",
    "DistributedMismatchError",
    "IntegrationError",
    "KeyCollisionError",
    "LoraError",
    "LossyCastError",
    "MissingKeysError",
    "PatternError",
    "PatternTooComplexError",
    "QuantizedCheckpointError",
    "ReadError",
    "RootError",
    "ShapeMismatchError",
    "ShardSizeError",
    "StageError",
    "StageTypeError",
    "UnknownKeysError",
    "UnsupportedPattern",
    "UnsupportedPlatformError",
    "UnsupportedTensorError",
    "WeightsMismatchError",
]
