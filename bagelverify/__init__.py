"""bagelverify: verified HF <-> native conversion of BAGEL-7B-MoT checkpoints."""

from __future__ import annotations

from .adapter import BagelStateDictAdapter, Plan, plan
from .buckets import Bucket
from .config import BagelConfig
from .errors import (
    BagelError,
    CorruptCheckpointError,
    KeyCollisionError,
    MissingKeysError,
    RootError,
    ShapeMismatchError,
    StageError,
    UnknownKeysError,
)
from .families import FAMILIES, Family, expected_shapes, patterns_of, und_twin
from .partition import classify, partition
from .stage import normalize_stage

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
    "CorruptCheckpointError",
    "Family",
    "KeyCollisionError",
    "MissingKeysError",
    "Plan",
    "RootError",
    "ShapeMismatchError",
    "StageError",
    "UnknownKeysError",
    "classify",
    "expected_shapes",
    "normalize_stage",
    "partition",
    "plan",
    "und_twin",
]
