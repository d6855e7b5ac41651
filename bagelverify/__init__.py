"""bagelverify: verified HF <-> native conversion of BAGEL-7B-MoT checkpoints."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .adapter import BagelStateDictAdapter, Plan, plan
from .buckets import Bucket
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
from .config import BagelConfig
from .errors import (
    BagelError,
    ConfigError,
    CorruptCheckpointError,
    DistributedMismatchError,
    KeyCollisionError,
    MissingKeysError,
    RootError,
    ShapeMismatchError,
    StageError,
    UnknownKeysError,
)
from .families import FAMILIES, Family, expected_shapes, patterns_of, und_twin
from .matcher import Matcher, compile_matcher
from .partition import classify, partition
from .patch_embedding import conv_patch_weight_to_linear, linear_patch_weight_to_conv
from .stage import normalize_stage
from .synthetic import make_synthetic_checkpoint
from .verify import check_patterns

if TYPE_CHECKING:
    from .distributed import (
        DistributedLoadResult,
        dcp_to_hf,
        hf_to_dcp,
        load_bagel_checkpoint_distributed,
    )

_DISTRIBUTED = (
    "DistributedLoadResult",
    "dcp_to_hf",
    "hf_to_dcp",
    "load_bagel_checkpoint_distributed",
)


def __getattr__(name: str) -> Any:
    """Import :mod:`bagelverify.distributed` (torch.distributed.checkpoint) on first use only."""
    if name in _DISTRIBUTED:
        from . import distributed

        return getattr(distributed, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    "BagelConfig",
    "BagelError",
    "BagelStateDictAdapter",
    "Bucket",
    "CheckpointReport",
    "ConfigError",
    "CorruptCheckpointError",
    "DistributedLoadResult",
    "DistributedMismatchError",
    "Family",
    "IncompatibleKeys",
    "KeyCollisionError",
    "Matcher",
    "MissingKeysError",
    "Plan",
    "RootError",
    "ShapeMismatchError",
    "StageError",
    "UnknownKeysError",
    "classify",
    "check_patterns",
    "compile_matcher",
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
    "normalize_stage",
    "partition",
    "plan",
    "save_bagel_checkpoint",
    "und_twin",
    "write_bagel_checkpoint",
]
