"""Rewriting a checkpoint with per-tensor transforms: dtype casts and resized position tables.

:func:`rewrite_checkpoint` is ``convert`` with transforms on the way through: the source is
validated from its headers like a strict load, then each kept tensor is read, transformed,
written and released (one tensor in memory at a time) by
:func:`bagelverify.checkpoint.write_bagel_checkpoint`. A transform maps a tensor's spec (so the
output header is known before any data is read) and then its values:

- :class:`CastTransform` casts floating tensors to one dtype; a narrowing cast (F32 -> BF16,
  BF16 -> F16, ...) is refused unless ``allow_lossy``;
- :class:`TableResize` regenerates the position tables for a config with another
  ``max_latent_size`` / ``vit_max_num_patch_per_side`` (whose config files are written too).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from .checkpoint import (
    KeyLayout,
    build_report,
    find_config,
    open_weights,
    write_bagel_checkpoint,
)
from .checkpoint.files import Weights
from .checkpoint.save import WrittenTensors
from .config import BagelConfig, ConfigLike
from .dtypes import CastLike, parse_dtype
from .errors import ConfigError, LossyCastError, counted, format_examples
from .keys import strip_root
from .patch_embedding import conv_patch_weight_to_linear
from .pos_embed import POSITION_TABLE_KEYS, compare_table, grid_side, position_table
from .safetensors_io import DTYPES, TensorInfo, TensorSpec, lossless_cast
from .stage import StageLike
from .tensor_reader import TensorReader

logger = logging.getLogger(__name__)


class TensorTransform(Protocol):
    """A per-tensor rewrite: first of the header entry, then of the values."""

    def spec(self, spec: TensorSpec) -> TensorSpec:
        """The written spec of a tensor stored as ``spec`` (HF key, dtype, shape)."""
        ...

    def apply(self, hf_key: str, tensor: torch.Tensor) -> torch.Tensor:
        """The written values of ``tensor``; must match ``spec`` of its spec."""
        ...


def is_lossless(source: str, target: str) -> bool:
    """Whether every value of dtype ``source`` is exactly representable in ``target``."""
    return lossless_cast(DTYPES[source].torch_dtype, DTYPES[target].torch_dtype)


@dataclass(frozen=True)
class CastTransform:
    """Cast every floating tensor to ``dtype`` (a safetensors name); integers stay."""

    dtype: str

    def spec(self, spec: TensorSpec) -> TensorSpec:
        """Floating specs get the new dtype."""
        if not DTYPES[spec.dtype].torch_dtype.is_floating_point:
            return spec
        return TensorSpec(spec.name, self.dtype, spec.shape)

    def apply(self, hf_key: str, tensor: torch.Tensor) -> torch.Tensor:
        """Floating tensors cast (round to nearest even), others unchanged."""
        if not tensor.is_floating_point():
            return tensor
        return tensor.to(DTYPES[self.dtype].torch_dtype)

    def narrowing(self, specs: Sequence[TensorSpec]) -> list[str]:
        """Names of the specs this cast would store with less precision or range."""
        return [s.name for s in specs if not is_lossless(s.dtype, self.spec(s).dtype)]


@dataclass(frozen=True)
class TableResize:
    """Regenerate each position table whose grid side differs between two configs."""

    old: BagelConfig
    new: BagelConfig

    @property
    def keys(self) -> list[str]:
        """HF keys of the tables that change size."""
        return [k for k in POSITION_TABLE_KEYS if grid_side(k, self.old) != grid_side(k, self.new)]

    def spec(self, spec: TensorSpec) -> TensorSpec:
        """Resized tables get the new config's row count."""
        if spec.name not in self.keys:
            return spec
        return TensorSpec(
            spec.name, spec.dtype, (grid_side(spec.name, self.new) ** 2, spec.shape[1])
        )

    def apply(self, hf_key: str, tensor: torch.Tensor) -> torch.Tensor:
        """The regenerated table, in ``tensor``'s dtype; other tensors unchanged."""
        if hf_key not in self.keys:
            return tensor
        check = compare_table(hf_key, tensor, self.old)
        if not check.exact:
            logger.warning(
                "%s is not the sine-cosine table its config implies (%s); it is replaced by the "
                "regenerated table for the new size",
                hf_key,
                check.describe(),
            )
        return position_table(hf_key, self.new, tensor.dtype)


@dataclass
class RewriteReport:
    """What :func:`rewrite_checkpoint` wrote."""

    source: str
    destination: str
    stage: str
    tensors: int = 0
    bytes_before: int = 0
    """Tensor bytes of the kept tensors as stored in the source."""
    bytes_after: int = 0
    """Tensor bytes written."""
    dtype: str | None = None
    narrowed: list[str] = field(default_factory=list)
    """HF keys cast with loss of precision or range (only with ``allow_lossy``)."""
    tables_regenerated: list[str] = field(default_factory=list)
    config: BagelConfig | None = None
    files: list[Path] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "dtype": self.dtype,
            "narrowed": len(self.narrowed),
            "tables_regenerated": list(self.tables_regenerated),
            "max_latent_size": None if self.config is None else self.config.max_latent_size,
            "vit_max_num_patch_per_side": None
            if self.config is None
            else self.config.vit_max_num_patch_per_side,
        }


def resized_config(
    config: BagelConfig,
    *,
    max_latent_size: int | None = None,
    vit_max_num_patch_per_side: int | None = None,
) -> BagelConfig:
    """``config`` with new position-table sides (``None`` keeps a side)."""
    changes: dict[str, Any] = {
        name: value
        for name, value in (
            ("max_latent_size", max_latent_size),
            ("vit_max_num_patch_per_side", vit_max_num_patch_per_side),
        )
        if value is not None
    }
    return dataclasses.replace(config, **changes)


def rewrite_checkpoint(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    stage: StageLike | None = None,
    keys: KeyLayout = "hf",
    dtype: CastLike | torch.dtype | None = None,
    allow_lossy: bool = False,
    max_latent_size: int | None = None,
    vit_max_num_patch_per_side: int | None = None,
    max_shard_size: int | str | None = None,
    strict: bool = True,
    config: ConfigLike | None = None,
    weights: Weights | None = None,
    convert_conv_patch_embedding: bool = False,
    on_tensor: Callable[[str, int], None] | None = None,
    overwrite: bool = False,
) -> RewriteReport:
    """``convert_checkpoint`` with a dtype cast and resized position tables on the way.

    ``dtype`` (``"bf16"``, ``"F32"``, ``torch.float16``, ...) casts every floating tensor; a
    cast that loses precision or range raises :class:`~bagelverify.errors.LossyCastError`
    before anything is written unless ``allow_lossy``. FP8 tensors without quantization
    tensors (plain FP8 casts) are widened exactly; a quantized checkpoint (scale tensors such
    as ``weight_scale``) raises :class:`~bagelverify.errors.QuantizedCheckpointError`.
    ``max_latent_size`` /
    ``vit_max_num_patch_per_side`` write the position tables regenerated for those sizes and a
    config that says so (a config is then required). ``weights`` picks ``ema`` or ``model``
    weights of a training output folder. The output is published like every checkpoint write
    (:func:`bagelverify.save_bagel_checkpoint`): an existing checkpoint in ``dst`` is replaced
    only with ``overwrite``, and a ``dst`` that is ``src`` (or the config folder) by any name --
    a symlink, a bind mount, hard links -- raises :class:`~bagelverify.errors.AliasError`.
    Returns sizes before and after.
    """
    name = None
    if dtype is not None:
        name = parse_dtype(dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch."))
    # the data is read through the descriptors the headers were read through
    with open_weights(src, weights, keep_open=True) as selected:
        found = find_config(selected.directory, config)
        report = build_report(selected.tensors, stage=stage, config=found, source=selected.source)
        report.raise_for_problems(strict=strict, convert_conv=convert_conv_patch_embedding)
        report.plan.log(strict=strict)
        transforms: list[TensorTransform] = []
        new_config = found
        if max_latent_size is not None or vit_max_num_patch_per_side is not None:
            if found is None:
                raise ConfigError(
                    f"{selected.directory}: resizing the position tables needs the source's config "
                    "files (or config=/--config DIR) to know the current sizes"
                )
            new_config = resized_config(
                found,
                max_latent_size=max_latent_size,
                vit_max_num_patch_per_side=vit_max_num_patch_per_side,
            )
        beyond = set(report.beyond_config)
        jobs: dict[str, tuple[TensorInfo, bool]] = {}
        for key in report.plan.native:
            if key in beyond:
                continue
            info = report.tensors[key]
            assert isinstance(info, TensorInfo)
            jobs[strip_root(key)] = (info, key == report.conv_patch_embedding)
        stored = {  # a converted Conv2d patch weight is stored as its Linear form
            hf: TensorSpec(
                hf, info.dtype, (info.shape[0], math.prod(info.shape[1:])) if conv else info.shape
            )
            for hf, (info, conv) in jobs.items()
        }
        result = RewriteReport(selected.source, str(dst), report.stage, config=new_config)
        if name is not None:
            cast = CastTransform(name)
            result.dtype, result.narrowed = name, cast.narrowing(list(stored.values()))
            if result.narrowed and not allow_lossy:
                raise LossyCastError(
                    f"{selected.source}: casting to {name} loses precision or range for "
                    f"{counted(len(result.narrowed), 'tensor')} "
                    f"({format_examples(result.narrowed)}); nothing "
                    "was written. Pass allow_lossy=True (--allow-lossy) to cast anyway."
                )
            transforms.append(cast)
        if found is not None and new_config is not None and new_config != found:
            resize = TableResize(found, new_config)
            result.tables_regenerated = [k for k in resize.keys if k in stored]
            transforms.append(resize)
        specs = {}
        for hf, spec in stored.items():
            for transform in transforms:
                spec = transform.spec(spec)
            specs[hf] = spec
        result.tensors = len(specs)
        result.bytes_before = sum(info.nbytes for info, _ in jobs.values())
        result.bytes_after = sum(spec.nbytes for spec in specs.values())

        written = WrittenTensors(on_tensor)
        with TensorReader(selected.fds) as reader:

            def fetch(hf_key: str) -> torch.Tensor:
                info, conv = jobs[hf_key]
                tensor = reader.read(info)
                if conv:
                    tensor = conv_patch_weight_to_linear(tensor)
                for transform in transforms:
                    tensor = transform.apply(hf_key, tensor)
                return written.fetched(hf_key, tensor)

            result.files = write_bagel_checkpoint(
                specs,
                fetch,
                dst,
                stage=report.stage,
                max_shard_size=max_shard_size,
                strict=strict,
                config=new_config,
                keys=keys,
                overwrite=overwrite,
                inputs=(src, config if isinstance(config, (str, os.PathLike)) else None),
            )
        written.done()
    logger.info(
        "%s: %d tensors, %d -> %d bytes",
        dst,
        result.tensors,
        result.bytes_before,
        result.bytes_after,
    )
    return result
