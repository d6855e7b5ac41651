"""LoRA factor keys in the key model, derived from the family table.

Every family whose ``weight`` is 2-D ``(out, in)`` can carry a LoRA adapter: the factor keys
``<module>.lora_A.weight`` of shape ``(r, in)`` and ``<module>.lora_B.weight`` of shape
``(out, r)``, where ``<module>.weight`` is a key of that family. A factor key may sit under the
native ``model.`` root, the PEFT ``base_model.model.`` root, or both (Automodel's ``is_peft``
saves write ``base_model.model.model.<hf key>``; Hugging Face ``peft`` writes
``base_model.model.<hf key>``). :func:`lora_key` says which weight a key adapts;
:func:`classify` keeps calling factor keys unknown, they are not checkpoint weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Literal

from .buckets import Bucket
from .config import BagelConfig
from .families import FAMILIES, Family, family_of
from .keys import ROOT, check_key

PEFT_ROOT = "base_model.model."
"""The root PEFT puts in front of the wrapped model's own keys."""

Factor = Literal["lora_A", "lora_B"]
FACTORS: tuple[Factor, ...] = ("lora_A", "lora_B")
_SUFFIX = ".weight"


@cache
def lora_families() -> tuple[Family, ...]:
    """The families LoRA can adapt: those with a 2-D ``weight``, in table order."""
    return tuple(
        family
        for family in FAMILIES
        if family.shape is not None
        and "weight" in family.params
        and len(family.shape.dims("weight")) == 2
    )


@dataclass(frozen=True)
class LoraKey:
    """What one LoRA factor key names."""

    key: str
    """The key as given."""
    root: str
    """The prefix in front of the HF key: ``""``, ``"model."``, ``"base_model.model."`` or
    ``"base_model.model.model."``."""
    module: str
    """The adapted module's HF path (``language_model.model.layers.0.self_attn.q_proj``)."""
    factor: Factor
    family: Family

    @property
    def weight(self) -> str:
        """The HF key of the weight this factor adapts."""
        return self.module + _SUFFIX

    @property
    def bucket(self) -> Bucket:
        """The bucket of the adapted weight (UND or GEN)."""
        return self.family.bucket


def split_root(key: str) -> tuple[str, str]:
    """``(root, hf_key)``: at most one ``base_model.model.`` and then one ``model.`` removed."""
    rest = key[len(PEFT_ROOT) :] if key.startswith(PEFT_ROOT) else key
    rest = rest[len(ROOT) :] if rest.startswith(ROOT) else rest
    return key[: len(key) - len(rest)], rest


def lora_key(key: str) -> LoraKey | None:
    """What LoRA factor key ``key`` adapts, or ``None`` when it is no factor of a BAGEL weight.

    >>> lora_key("base_model.model.model.connector.fc1.lora_B.weight").weight
    'connector.fc1.weight'
    """
    root, hf_key = split_root(check_key(key))
    for factor in FACTORS:
        tail = f".{factor}{_SUFFIX}"
        if hf_key.endswith(tail):
            module = hf_key[: -len(tail)]
            family = family_of(module + _SUFFIX)
            if family is not None and family in lora_families():
                return LoraKey(key, root, module, factor, family)
    return None


def native_factor_key(found: LoraKey) -> str:
    """The key a BAGEL module tree gives the factor: ``model.`` + HF key, under the PEFT root
    when the factor came under it (the layout Automodel's ``is_peft`` checkpoints use)."""
    native = ROOT + found.module + f".{found.factor}{_SUFFIX}"
    return PEFT_ROOT + native if found.root.startswith(PEFT_ROOT) else native


def factor_shape(family: Family, config: BagelConfig, factor: Factor, rank: int) -> tuple[int, int]:
    """The shape of ``factor`` for a module of ``family``: ``(rank, in)`` or ``(out, rank)``."""
    assert family.shape is not None
    out, inner = family.shape(config, "weight")
    return (rank, inner) if factor == "lora_A" else (out, rank)


def factor_mismatches(
    shapes: Mapping[str, tuple[int, ...]], *, config: BagelConfig | None = None
) -> list[str]:
    """One line per LoRA factor of ``shapes`` (factor key -> shape) that is wrong: not 2-D, a
    pair whose ranks differ, or (with ``config``) dimensions that are not the adapted weight's.

    Keys that are no LoRA factor are ignored.
    """
    ranks: dict[str, tuple[str, int]] = {}
    wrong: list[str] = []
    for key, shape in shapes.items():
        found = lora_key(key)
        if found is None:
            continue
        if len(shape) != 2:
            wrong.append(f"  {key}: {list(shape)}, a LoRA factor is 2-D")
            continue
        rank = shape[0] if found.factor == "lora_A" else shape[1]
        other = ranks.setdefault(found.root + found.module, (key, rank))
        if other[1] != rank:
            wrong.append(f"  {key}: rank {rank}, its pair {other[0]} has rank {other[1]}")
            continue
        if config is not None:
            expected = factor_shape(found.family, config, found.factor, rank)
            if tuple(shape) != expected:
                wrong.append(
                    f"  {key}: {list(shape)}, expected {list(expected)} for rank {rank} "
                    f"(it adapts {found.weight})"
                )
    return wrong
