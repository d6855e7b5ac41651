"""The report on a checkpoint for one stage, built from its headers alone.

:func:`build_report` runs the adapter's key plan over a tensor list, compares every kept shape
with the family table's for a config, and collects the expected keys that are absent;
:meth:`CheckpointReport.problems` turns its findings into the errors a load raises.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from ..buckets import Bucket
from ..config import CONFIG_FILES, BagelConfig
from ..errors import MissingKeysError, ShapeMismatchError, UnknownKeysError, format_examples
from ..families import FAMILIES, FAMILY_BY_NAME
from ..keys import strip_root
from ..patch_embedding import PATCH_EMBEDDING_WEIGHT
from ..plan import Plan, plan
from ..safetensors_io import TensorInfo, TensorSpec, dtype_name
from ..stage import STAGE_BUCKETS, Stage
from .files import find_config, open_checkpoint

logger = logging.getLogger(__name__)

CONVERT_FLAG = "convert_conv_patch_embedding"
"""Name of the loader flag that converts a Conv2d patch-embedding weight."""


class ShapeMismatch(NamedTuple):
    """A tensor whose shape differs from the expected one."""

    key: str
    expected: tuple[int, ...]
    found: tuple[int, ...]


@dataclass
class BucketSummary:
    """Count, bytes and dtypes (name -> count) of a checkpoint's tensors in one bucket."""

    count: int = 0
    nbytes: int = 0
    dtypes: Counter[str] = field(default_factory=Counter)


TensorLike = TensorInfo | TensorSpec


@dataclass
class CheckpointReport:
    """Everything known about a checkpoint for one stage, from its headers only.

    Built by :func:`build_report`; :func:`inspect_checkpoint` builds it for a folder, the
    loaders use it to decide what to read, and the ``inspect`` command renders it.
    """

    source: str
    stage: Stage
    config: BagelConfig | None
    tensors: Mapping[str, TensorLike]
    """Every tensor of the checkpoint, by checkpoint key."""
    plan: Plan
    buckets: dict[Bucket, BucketSummary]
    missing: dict[str, list[str]]
    """Family name -> expected HF keys the stage keeps that are absent (needs a config)."""
    shape_mismatches: list[ShapeMismatch]
    """Kept tensors whose shape differs from the config's (checkpoint keys)."""
    beyond_config: list[str]
    """Kept keys of known families that a model with this config does not have (e.g. layer 40)."""
    conv_patch_embedding: str | None
    """Checkpoint key of a patch-embedding weight stored as a 4-D Conv2d weight, if any."""

    @property
    def retained(self) -> dict[str, TensorLike]:
        """Native key -> tensor, for the tensors the stage keeps, in checkpoint order."""
        return {native: self.tensors[key] for key, native in self.plan.native.items()}

    @property
    def stage1_bytes(self) -> int:
        """Bytes a stage-1 load reads (UND)."""
        return self.buckets[Bucket.UND].nbytes

    @property
    def stage2_bytes(self) -> int:
        """Bytes a stage-2 load reads (UND + GEN)."""
        return self.buckets[Bucket.UND].nbytes + self.buckets[Bucket.GEN].nbytes

    @property
    def missing_keys(self) -> list[str]:
        """Every missing expected key, family by family."""
        return [key for keys in self.missing.values() for key in keys]

    def missing_summary(self) -> list[str]:
        """One line per family with missing keys: ``vit.fc1: 52 keys missing (layers 0-25)``."""
        lines = []
        for name, keys in self.missing.items():
            family = FAMILY_BY_NAME[name]
            layers = sorted({n for k in keys if (n := family.layer_of(k)) is not None})
            where = f"layers {_ranges(layers)}" if layers else ", ".join(keys)
            noun = "key" if len(keys) == 1 else "keys"
            lines.append(f"{name}: {len(keys)} {noun} missing ({where})")
        return lines

    def problems(self, *, strict: bool = True, convert_conv: bool = False) -> list[Exception]:
        """The errors a load with these settings raises, most fundamental first."""
        found = [
            problem
            for problem in self.plan.problems(strict=strict)
            # with a config, a missing UND twin is reported with the other missing keys
            if not (self.config is not None and isinstance(problem, MissingKeysError))
        ]
        if strict and self.beyond_config:
            found.append(
                UnknownKeysError(
                    f"{self.source}: {len(self.beyond_config)} keys do not exist in a model with "
                    f"this config: {format_examples(self.beyond_config)}. Check the config files "
                    "(layer counts) or pass strict=False to drop them.",
                    self.beyond_config,
                )
            )
        if strict and self.missing:
            count = len(self.missing_keys)
            found.append(
                MissingKeysError(
                    f"{self.source}: {self.stage} expects {count} keys that the checkpoint lacks:"
                    "\n  " + "\n  ".join(self.missing_summary()) + "\nThe checkpoint is "
                    "incomplete (or the config describes a bigger model); pass strict=False to "
                    "load the rest anyway.",
                    self.missing_keys,
                )
            )
        if self.shape_mismatches:
            found.append(
                ShapeMismatchError(
                    f"{self.source}: {len(self.shape_mismatches)} tensors do not have the shape "
                    "the config implies:\n"
                    + "\n".join(
                        f"  {m.key}: expected {list(m.expected)}, found {list(m.found)}"
                        for m in self.shape_mismatches
                    )
                    + "\nCheck that the config files belong to this checkpoint."
                )
            )
        if self.conv_patch_embedding is not None and not convert_conv:
            shape = list(self.tensors[self.conv_patch_embedding].shape)
            found.append(
                ShapeMismatchError(
                    f"{self.source}: {self.conv_patch_embedding!r} is a Conv2d weight {shape}; "
                    "BAGEL stores it as a Linear weight (out, P*P*C) flattened channel-last. "
                    f"Pass {CONVERT_FLAG}=True to convert it while loading "
                    "(bagelverify.conv_patch_weight_to_linear)."
                )
            )
        return found

    def raise_for_problems(self, *, strict: bool = True, convert_conv: bool = False) -> None:
        """Raise the first problem, the others attached to it as notes (shown with its
        traceback), so one run shows all of them and nothing is logged for a caught error."""
        found = self.problems(strict=strict, convert_conv=convert_conv)
        if found:
            for other in found[1:]:
                found[0].add_note(f"also: {type(other).__name__}: {other}")
            raise found[0]

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (no tensor-by-tensor listing)."""
        return {
            "source": self.source,
            "stage": self.stage,
            "config": None if self.config is None else vars(self.config),
            "tensors": len(self.tensors),
            "buckets": {
                str(bucket): {
                    "count": s.count,
                    "bytes": s.nbytes,
                    "dtypes": dict(sorted(s.dtypes.items())),
                }
                for bucket, s in self.buckets.items()
            },
            "stage1_bytes": self.stage1_bytes,
            "stage2_bytes": self.stage2_bytes,
            "kept": len(self.plan.native),
            "unknown": list(self.plan.unknown),
            "collisions": [list(pair) for pair in self.plan.collisions],
            "twin_violations": [list(pair) for pair in self.plan.twin_violations],
            "missing": {name: len(keys) for name, keys in self.missing.items()},
            "missing_summary": self.missing_summary(),
            "shape_mismatches": [
                {"key": m.key, "expected": list(m.expected), "found": list(m.found)}
                for m in self.shape_mismatches
            ],
            "beyond_config": list(self.beyond_config),
            "conv_patch_embedding": self.conv_patch_embedding,
            "vae_keys_in_model_file": len(self.plan.buckets[Bucket.VAE]),
        }


def _ranges(numbers: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    runs: list[list[int]] = []
    for number in numbers:
        if runs and number == runs[-1][1] + 1:
            runs[-1][1] = number
        else:
            runs.append([number, number])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _is_conv_patch_weight(
    shape: tuple[int, ...], expected: tuple[int, ...] | None, config: BagelConfig | None
) -> bool:
    if len(shape) != 4 or shape[2] != shape[3]:
        return False
    if config is None or expected is None:
        return True
    return shape == (
        expected[0],
        config.vit_num_channels,
        config.vit_patch_size,
        config.vit_patch_size,
    )


def build_report(
    tensors: Mapping[str, TensorLike],
    *,
    stage: object = "stage1",
    config: BagelConfig | None = None,
    source: str = "<state dict>",
) -> CheckpointReport:
    """Validate a checkpoint's tensor list (names, shapes, dtypes) for ``stage``.

    With a ``config``, every kept tensor's shape is compared with the family table's, and the
    expected keys the stage keeps but the checkpoint lacks are collected family by family.
    """
    key_plan = plan(tensors, stage=stage)
    buckets = {bucket: BucketSummary() for bucket in Bucket}
    for bucket, keys in key_plan.buckets.items():
        summary = buckets[bucket]
        for key in keys:
            summary.count += 1
            summary.nbytes += tensors[key].nbytes
            summary.dtypes[tensors[key].dtype] += 1
    missing: dict[str, list[str]] = {}
    mismatches: list[ShapeMismatch] = []
    beyond: list[str] = []
    conv: str | None = None
    expected: dict[str, tuple[int, ...]] = {}
    if config is not None:
        kept_buckets = STAGE_BUCKETS[key_plan.stage]
        present = {strip_root(key) for key in key_plan.buckets[Bucket.UND]}
        present |= {strip_root(key) for key in key_plan.buckets[Bucket.GEN]}
        for family in FAMILIES:
            if family.shape is None or family.bucket not in kept_buckets:
                continue
            shapes = family.expected_shapes(config)
            expected.update(shapes)
            absent = [hf_key for hf_key in shapes if hf_key not in present]
            if absent:
                missing[family.name] = absent
    for key in key_plan.native:
        hf_key, shape = strip_root(key), tuple(tensors[key].shape)
        want = expected.get(hf_key)
        if hf_key == PATCH_EMBEDDING_WEIGHT and _is_conv_patch_weight(shape, want, config):
            conv = key
        elif config is None:
            continue
        elif want is None:
            beyond.append(key)
        elif shape != want:
            mismatches.append(ShapeMismatch(key, want, shape))
    return CheckpointReport(
        source,
        key_plan.stage,
        config,
        tensors,
        key_plan,
        buckets,
        missing,
        mismatches,
        beyond,
        conv,
    )


def state_dict_report(
    state_dict: Mapping[str, object], *, stage: object, config: BagelConfig
) -> CheckpointReport:
    """:func:`build_report` for an in-memory HF state dict, reading shapes and dtypes from its
    values (the global shape of a DTensor). A value that is not a tensor counts as an empty one:
    only its key is checked."""
    specs = {
        key: TensorSpec(key, dtype_name(value.dtype), tuple(value.shape))
        if isinstance(value, torch.Tensor)
        else TensorSpec(key, "U8", (0,))
        for key, value in state_dict.items()
    }
    return build_report(specs, stage=stage, config=config)


def inspect_checkpoint(
    checkpoint_dir: str | os.PathLike[str],
    *,
    stage: object = "stage1",
    config: BagelConfig | None = None,
) -> CheckpointReport:
    """Validate a checkpoint folder from its headers alone, reading no tensor data.

    ``config`` defaults to the folder's own config files when they exist; without any config
    only the key checks run (no shapes, no missing-key listing).
    """
    files = open_checkpoint(checkpoint_dir)
    config = find_config(files.directory, config)
    if config is None:
        logger.warning(
            "%s: no config given and no %s in the folder; shapes and completeness are not checked",
            files.directory,
            "/".join(CONFIG_FILES),
        )
    return build_report(files.tensors, stage=stage, config=config, source=files.source)
