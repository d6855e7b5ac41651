"""The five buckets a checkpoint key can fall into."""

from __future__ import annotations

from enum import Enum


class Bucket(str, Enum):
    """Where a key belongs. Compares equal to its string value (``Bucket.UND == "und"``)."""

    UND = "und"
    """Understanding path: kept by stage 1 and stage 2."""
    GEN = "gen"
    """Generation path (``*_moe_gen`` twins and flow-matching parts): kept by stage 2."""
    VAE = "vae"
    """VAE weights from ``ae.safetensors``: recognised, never returned as model weights."""
    EXTRA = "extra"
    """Transformer-Engine ``._extra_state`` entries: dropped."""
    UNKNOWN = "unknown"
    """Anything else."""

    def __str__(self) -> str:
        return self.value


#: Buckets in the order a matcher tries them. The languages are disjoint, so the order only
#: matters for user-supplied pattern sets that overlap.
MATCH_ORDER: tuple[Bucket, ...] = (Bucket.UND, Bucket.GEN, Bucket.VAE, Bucket.EXTRA)
