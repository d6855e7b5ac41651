"""Validated, selective loading and atomic saving of BAGEL checkpoint folders.

Every load goes the same way: read the safetensors header(s) (:func:`open_checkpoint`), build a
:class:`CheckpointReport` from the headers alone (adapter plan, config shapes, missing keys by
family), raise if the report has problems, and only then read the bytes of the tensors the
stage keeps, each straight into its destination tensor. The bytes of dropped tensors are never
read.

Folder layouts: ``ema.safetensors`` (the release), or ``model.safetensors.index.json`` plus the
shards it names. When both exist ``ema.safetensors`` wins: the released folder ships an index
that does not describe ``ema.safetensors``, so the index is only used without it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch

from .adapter import Plan, plan, strip_root, to_native_key, unroot
from .atomic import atomic_open, remove_durably
from .buckets import Bucket
from .config import CONFIG_FILES, BagelConfig
from .engine import EngineOptions, EngineStats, Progress, Transfer
from .engine import run as run_engine
from .errors import (
    CorruptCheckpointError,
    MissingKeysError,
    ShapeMismatchError,
    UnknownKeysError,
    format_examples,
)
from .families import FAMILIES
from .manifest import MODEL_FILE, VAE_FILE, load_manifest
from .partition import classify
from .patch_embedding import PATCH_EMBEDDING_WEIGHT, conv_patch_weight_to_linear
from .safetensors_io import (
    TensorInfo,
    TensorSpec,
    dtype_name,
    layout_order,
    read_header,
    spec_of,
    stream_safetensors,
    write_safetensors,
)
from .stage import STAGE_BUCKETS, Stage
from .strict_json import parse_json, short_repr

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
"""Index of a sharded checkpoint: ``{"metadata": {...}, "weight_map": {key: shard file}}``."""

CONVERT_FLAG = "convert_conv_patch_embedding"
"""Name of the loader flag that converts a Conv2d patch-embedding weight."""

Cast = Literal["exact", "lossless", "any"]
"""How a destination dtype may differ from the file's: ``exact`` never; ``lossless`` when every
stored value is representable (floating widening such as BF16 -> F32); ``any`` always."""


# -- the files of a checkpoint -----------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointFiles:
    """The tensors of a checkpoint folder, from its header(s) only."""

    directory: Path
    layout: Literal["single", "sharded"]
    files: tuple[Path, ...]
    tensors: dict[str, TensorInfo]
    """Checkpoint key -> where its bytes are, in file order."""

    @property
    def source(self) -> str:
        """The file the tensors were listed from: ``ema.safetensors`` or the index."""
        return str(self.directory / (MODEL_FILE if self.layout == "single" else INDEX_FILE))


def _require_directory(directory: Path, expected: str) -> None:
    if not directory.is_dir():
        raise FileNotFoundError(
            f"checkpoint folder {directory} does not exist (expected {directory / expected})"
        )


def _shard_path(directory: Path, index_path: Path, key: str, shard: object) -> Path:
    if not isinstance(shard, str) or not shard or Path(shard).name != shard or shard in ("..", "."):
        raise CorruptCheckpointError(
            f"{index_path}: weight_map[{key!r}] = {short_repr(shard)} is not a file name in the "
            "folder; an index may only name shards next to it. Fix the index."
        )
    return directory / shard


def _read_index(directory: Path) -> CheckpointFiles:
    index_path = directory / INDEX_FILE
    document = parse_json(
        index_path.read_bytes(),
        lambda what: CorruptCheckpointError(
            f"{index_path}: {what}. Re-save the checkpoint or fix the index."
        ),
    )
    weight_map = document.get("weight_map") if isinstance(document, dict) else None
    if not isinstance(weight_map, dict):
        raise CorruptCheckpointError(
            f"{index_path}: expected an object with a 'weight_map' object (tensor name -> shard "
            f"file), found {short_repr(document)}. Re-save the checkpoint or fix the index."
        )
    shards: dict[Path, list[str]] = {}
    for key, shard in weight_map.items():
        shards.setdefault(_shard_path(directory, index_path, key, shard), []).append(key)
    tensors: dict[str, TensorInfo] = {}
    problems: list[str] = []
    for shard_path, indexed in shards.items():
        if not shard_path.is_file():
            raise FileNotFoundError(
                f"{shard_path}: shard named by {index_path} for {len(indexed)} tensors "
                f"(e.g. {indexed[0]!r}) does not exist"
            )
        header = read_header(shard_path)
        absent = [key for key in indexed if key not in header.tensors]
        if absent:
            problems.append(
                f"{len(absent)} tensors the index places in {shard_path.name} are not in its "
                f"header: {format_examples(absent)}"
            )
        unindexed = [key for key in header.tensors if weight_map.get(key) != shard_path.name]
        if unindexed:
            problems.append(
                f"{len(unindexed)} tensors of {shard_path.name} are not indexed to it: "
                f"{format_examples(unindexed)}"
            )
        tensors.update((k, v) for k, v in header.tensors.items() if k not in unindexed)
    if problems:
        raise CorruptCheckpointError(
            f"{index_path} disagrees with its shards: " + "; ".join(problems) + ". Re-save the "
            "checkpoint or fix the index."
        )
    return CheckpointFiles(directory, "sharded", tuple(shards), tensors)


def open_checkpoint(checkpoint_dir: str | os.PathLike[str]) -> CheckpointFiles:
    """List a checkpoint folder's tensors from its header(s), reading no tensor data.

    Raises ``FileNotFoundError`` naming the expected file,
    :class:`~bagelverify.errors.CorruptCheckpointError` for a bad header or an index that
    disagrees with its shards (every index entry must be in its shard's header and every shard
    tensor in the index).
    """
    directory = Path(checkpoint_dir)
    _require_directory(directory, MODEL_FILE)
    single, index = directory / MODEL_FILE, directory / INDEX_FILE
    if single.is_file():
        if index.exists():
            logger.info(
                "%s: using %s; %s is ignored (ema.safetensors wins when both exist)",
                directory,
                MODEL_FILE,
                INDEX_FILE,
            )
        header = read_header(single)
        return CheckpointFiles(directory, "single", (single,), header.tensors)
    if index.is_file():
        return _read_index(directory)
    raise FileNotFoundError(
        f"{single}: not found, and no sharded checkpoint ({index}) either; "
        f"is {directory} a BAGEL checkpoint folder?"
    )


def find_config(checkpoint_dir: str | os.PathLike[str], given: object = None) -> BagelConfig | None:
    """The config to validate a checkpoint folder with.

    ``given`` as is when it is a :class:`BagelConfig`; the config files of ``given`` when it is
    a folder path; otherwise the checkpoint folder's own files if any of the three exists, else
    ``None``. Any other ``given`` object (a training framework's own config, which the reference
    adapter took for log context only) is noted in the log and the folder's files are used.
    """
    if isinstance(given, BagelConfig):
        return given
    if isinstance(given, (str, os.PathLike)):
        return BagelConfig.from_pretrained(given)
    directory = Path(checkpoint_dir)
    if given is not None:
        logger.info(
            "config of type %s is not a BagelConfig; validating with %s's own config files",
            type(given).__name__,
            directory,
        )
    if any((directory / name).exists() for name in CONFIG_FILES):
        return BagelConfig.from_pretrained(directory)
    return None


# -- the report ------------------------------------------------------------------------------


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
            layers = sorted({int(m.group(1)) for k in keys if (m := _LAYER.search(k))})
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
        """Raise the first problem; log the others, so one run shows all of them."""
        found = self.problems(strict=strict, convert_conv=convert_conv)
        for other in found[1:]:
            logger.error("%s (also: %s)", type(other).__name__, other)
        if found:
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


_LAYER = re.compile(r"\.layers\.([0-9]+)\.")


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


# -- reading ---------------------------------------------------------------------------------


class IncompatibleKeys(NamedTuple):
    """What :func:`load_into` did not load (as ``torch.nn.Module.load_state_dict`` reports it)."""

    missing_keys: list[str]
    """Destination keys the checkpoint does not provide (left untouched)."""
    unexpected_keys: list[str]
    """Checkpoint keys (native) that the destination has no tensor for (not read)."""


def _target_shape(info: TensorLike, convert: bool) -> tuple[int, ...]:
    """The shape a tensor has after loading: a converted Conv2d weight becomes a Linear one."""
    shape = tuple(info.shape)
    return (shape[0], math.prod(shape[1:])) if convert else shape


def _cast_allowed(source: torch.dtype, target: torch.dtype, cast: Cast) -> bool:
    if source == target or cast == "any":
        return True
    if cast == "lossless":
        return (
            source.is_floating_point
            and target.is_floating_point
            and torch.promote_types(source, target) == target
        )
    return False


def _fill(
    jobs: Mapping[str, tuple[TensorInfo, bool]],
    destinations: Mapping[str, torch.Tensor],
    *,
    read_options: EngineOptions | None = None,
    progress: Progress | None = None,
) -> EngineStats:
    """Read each job's bytes into its destination through the read engine
    (``jobs``: key -> (info, convert Conv2d)); see :mod:`bagelverify.engine`."""
    transfers = [
        Transfer(
            info.name,
            info.path,
            info.start,
            info.nbytes,
            info.torch_dtype,
            info.shape,
            destinations[key],
            conv_patch_weight_to_linear if convert else None,
        )
        for key, (info, convert) in jobs.items()
    ]
    return run_engine(transfers, options=read_options, progress=progress)


def _open_report(
    checkpoint_dir: str | os.PathLike[str],
    stage: object,
    strict: bool,
    config: BagelConfig | None,
    convert_conv: bool,
) -> tuple[CheckpointReport, dict[str, tuple[TensorInfo, bool]]]:
    """Validate a folder and return its report and the read jobs (native key -> info, convert)."""
    report = inspect_checkpoint(checkpoint_dir, stage=stage, config=config)
    report.raise_for_problems(strict=strict, convert_conv=convert_conv)
    report.plan.log(strict=strict)
    beyond = {report.plan.native[key] for key in report.beyond_config}
    jobs: dict[str, tuple[TensorInfo, bool]] = {}
    for key, native in report.plan.native.items():
        if native in beyond:
            continue
        info = report.tensors[key]
        assert isinstance(info, TensorInfo)
        jobs[native] = (info, key == report.conv_patch_embedding)
    if beyond:
        logger.warning("dropping %d keys the config does not have", len(beyond))
    return report, jobs


def check_destinations(
    jobs: Mapping[str, tuple[TensorInfo, bool]],
    native_state_dict: Mapping[str, torch.Tensor],
    checkpoint_dir: str | os.PathLike[str],
    *,
    strict: bool,
    cast: Cast,
) -> tuple[dict[str, tuple[TensorInfo, bool]], IncompatibleKeys]:
    """Check destinations against a validated folder's read jobs (see :func:`load_into`).

    Returns the jobs both sides have and what each side lacks. Raises
    :class:`~bagelverify.errors.MissingKeysError` under ``strict`` when the key sets differ and
    one :class:`~bagelverify.errors.ShapeMismatchError` listing every destination whose
    (global) shape, dtype or device cannot hold its tensor. Reads no tensor data.
    """
    wanted = [k for k in native_state_dict if classify(strip_root(k)) is not Bucket.EXTRA]
    missing = [key for key in wanted if key not in jobs]
    unexpected = [key for key in jobs if key not in native_state_dict]
    if strict and (missing or unexpected):
        raise MissingKeysError(
            f"{checkpoint_dir}: the destination and the checkpoint's {len(jobs)} kept tensors "
            f"differ: {len(missing)} destination keys are not in the checkpoint "
            f"({format_examples(missing)}), {len(unexpected)} checkpoint keys have no "
            f"destination ({format_examples(unexpected)}). Check the stage, or pass "
            "strict=False to load the keys both have.",
            missing + unexpected,
        )
    common = {key: jobs[key] for key in jobs if key in native_state_dict}
    problems: list[str] = []
    for key, (info, convert) in common.items():
        destination = native_state_dict[key]
        want = _target_shape(info, convert)
        if tuple(destination.shape) != want:
            problems.append(f"  {key}: destination {list(destination.shape)}, file {list(want)}")
        elif not _cast_allowed(info.torch_dtype, destination.dtype, cast):
            problems.append(
                f"  {key}: destination {destination.dtype}, file {info.torch_dtype} "
                f"(not allowed by cast={cast!r})"
            )
        elif destination.device.type == "meta":
            problems.append(f"  {key}: destination is on the meta device (no memory to fill)")
    if problems:
        raise ShapeMismatchError(
            f"{checkpoint_dir}: {len(problems)} destination tensors cannot hold their checkpoint "
            "tensors:\n" + "\n".join(problems) + "\nNothing was read. Fix the model's config, or "
            "pass cast='any' to allow narrowing dtype conversions."
        )
    return common, IncompatibleKeys(missing, unexpected)


def load_into(
    native_state_dict: Mapping[str, torch.Tensor],
    checkpoint_dir: str | os.PathLike[str],
    *,
    stage: object = "stage1",
    strict: bool = True,
    config: BagelConfig | None = None,
    cast: Cast = "lossless",
    convert_conv_patch_embedding: bool = False,
    read_options: EngineOptions | None = None,
    progress: Progress | None = None,
) -> IncompatibleKeys:
    """Fill existing tensors (e.g. ``model.state_dict()``) in place from a checkpoint folder.

    The checkpoint is validated from its headers first (as :func:`inspect_checkpoint`), then the
    destinations are checked against it: every shape must match exactly, and a dtype may differ
    only as ``cast`` allows (default ``"lossless"``: BF16 -> F32 master weights are fine, F32 ->
    BF16 needs ``cast="any"``). All mismatches are listed in one
    :class:`~bagelverify.errors.ShapeMismatchError` before any data is read. Then each kept
    tensor's bytes are read straight into its destination's memory when it is a contiguous CPU
    tensor of the file's dtype (no intermediate copy); otherwise through a one-tensor staging
    buffer. Under ``strict`` the destination and the stage's keys must be the same set
    (:class:`~bagelverify.errors.MissingKeysError` otherwise; ``._extra_state`` entries are
    ignored); without it the common keys are loaded and the rest returned.

    The bytes are read by :mod:`bagelverify.engine` on several threads (``read_options``: its
    threads, chunk size and staging budget; ``progress(done, total)``: bytes read so far). CPU
    destinations of the file's dtype are read straight into their memory; CUDA destinations
    through pinned staging buffers copied asynchronously. If a read fails, the destinations
    whose reads had started hold new data, the others are untouched.
    """
    _, jobs = _open_report(checkpoint_dir, stage, strict, config, convert_conv_patch_embedding)
    common, incompatible = check_destinations(
        jobs, native_state_dict, checkpoint_dir, strict=strict, cast=cast
    )
    _fill(common, native_state_dict, read_options=read_options, progress=progress)
    logger.info("%s: loaded %d tensors in place", checkpoint_dir, len(common))
    return incompatible


def load_bagel_checkpoint_state_dict(
    checkpoint_dir: str | os.PathLike[str],
    *,
    stage: object = "stage1",
    strict: bool = True,
    config: BagelConfig | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    convert_conv_patch_embedding: bool = False,
    read_options: EngineOptions | None = None,
    progress: Progress | None = None,
) -> dict[str, torch.Tensor]:
    """Load the tensors a stage keeps as a native (``model.``-rooted) state dict.

    Validates like :func:`inspect_checkpoint` before reading anything (``config``: a
    :class:`BagelConfig`, a folder holding the config files, or ``None`` for the checkpoint
    folder's own; another object, such as a training framework's config, is noted and the
    folder's files are used), allocates each kept tensor on ``device`` (as ``dtype`` if given, else
    the file's dtype) and reads it in place; dropped tensors' bytes are never read.
    ``read_options`` and ``progress`` are the read engine's (see :func:`load_into`).
    """
    _, jobs = _open_report(checkpoint_dir, stage, strict, config, convert_conv_patch_embedding)
    out = {
        key: torch.empty(
            _target_shape(info, convert), dtype=dtype or info.torch_dtype, device=device
        )
        for key, (info, convert) in jobs.items()
    }
    _fill(jobs, out, read_options=read_options, progress=progress)
    return out


def load_bagel_vae_state_dict(
    checkpoint_dir: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    strict: bool = True,
    read_options: EngineOptions | None = None,
    progress: Progress | None = None,
) -> dict[str, torch.Tensor]:
    """Load ``ae.safetensors`` (the FLUX VAE): its ``encoder.*``/``decoder.*`` keys as stored.

    Any other key is an :class:`~bagelverify.errors.UnknownKeysError`: this file holds the VAE
    only. Under ``strict``, every key of the released VAE must be present
    (:class:`~bagelverify.errors.MissingKeysError` otherwise).
    """
    directory = Path(checkpoint_dir)
    _require_directory(directory, VAE_FILE)
    path = directory / VAE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: VAE file not found")
    header = read_header(path)
    other = [key for key in header.tensors if classify(key) is not Bucket.VAE]
    if other:
        raise UnknownKeysError(
            f"{path}: {len(other)} keys are not VAE (encoder./decoder.) keys: "
            f"{format_examples(other)}. Is this the model file rather than ae.safetensors?",
            other,
        )
    expected = load_manifest()[VAE_FILE]
    missing = [key for key in expected if key not in header.tensors]
    if strict and missing:
        raise MissingKeysError(
            f"{path}: {len(missing)} of the {len(expected)} VAE keys are missing: "
            f"{format_examples(missing)}. The file is incomplete; pass strict=False to load "
            "the keys it has.",
            missing,
        )
    jobs = {key: (info, False) for key, info in header.tensors.items()}
    out = {
        key: torch.empty(info.shape, dtype=dtype or info.torch_dtype, device=device)
        for key, info in header.tensors.items()
    }
    _fill(jobs, out, read_options=read_options, progress=progress)
    return out


# -- saving ----------------------------------------------------------------------------------

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as ``"5GB"`` or ``"500MiB"``."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    elif isinstance(size, str) and (m := re.fullmatch(r"\s*([0-9]+)\s*([A-Za-z]*)\s*", size)):
        unit = m.group(2).upper()
        if unit not in _UNITS:
            raise ValueError(f"unknown size unit in {size!r}; use B, KB, MB, GB, KiB, MiB or GiB")
        value = int(m.group(1)) * _UNITS[unit]
    else:
        raise ValueError(
            f"max_shard_size must be a byte count or a string like '5GB', got {size!r}"
        )
    if value < 1:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


def _shards(specs: Iterable[TensorSpec], limit: int) -> list[list[TensorSpec]]:
    """Greedy split in layout order; a tensor larger than ``limit`` gets a shard of its own."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in layout_order(specs):
        if shards[-1] and size + spec.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def save_bagel_checkpoint(
    native_state_dict: Mapping[str, torch.Tensor],
    out_dir: str | os.PathLike[str],
    *,
    stage: object = "stage2",
    max_shard_size: int | str | None = None,
    strict: bool = True,
    config: BagelConfig | None = None,
) -> list[Path]:
    """Write a native state dict as an HF-layout BAGEL checkpoint; return the files written.

    Keys must be under the ``model.`` root (``._extra_state`` entries are dropped); ``stage``
    chooses what is written (``"stage2"``, the default, writes every UND and GEN tensor;
    ``"stage1"`` only UND). Unknown keys raise under ``strict`` and are dropped with a warning
    otherwise, as on loading. With a
    ``config`` the tensors are validated like a load (shapes, missing keys under ``strict``) and
    the three config files are written too. Without ``max_shard_size`` one ``ema.safetensors``
    is written; with it, ``model-0000i-of-0000n.safetensors`` shards and
    ``model.safetensors.index.json`` (written last). Every file is written atomically
    (temporary file, fsync, rename), with ``__metadata__ {"format": "pt"}``; shards are all
    written before any is renamed and the old index is removed first, so a crash never leaves
    an index over shards of two saves. Every value (except dropped ``._extra_state``) must be a
    tensor a safetensors file can hold, kept by the stage or not:
    :class:`~bagelverify.errors.UnsupportedTensorError` otherwise, before anything is written.
    """
    hf = unroot(native_state_dict)  # the report below checks the keys, strict or not
    specs = {key: spec_of(key, tensor) for key, tensor in hf.items()}
    return write_bagel_checkpoint(
        specs,
        hf.__getitem__,
        out_dir,
        stage=stage,
        max_shard_size=max_shard_size,
        strict=strict,
        config=config,
    )


KeyLayout = Literal["hf", "native"]
"""Key names a written checkpoint uses: HF keys, or native keys under the ``model.`` root."""


def write_bagel_checkpoint(
    specs: Mapping[str, TensorSpec],
    fetch: Callable[[str], torch.Tensor],
    out_dir: str | os.PathLike[str],
    *,
    stage: object = "stage2",
    max_shard_size: int | str | None = None,
    strict: bool = True,
    config: BagelConfig | None = None,
    keys: KeyLayout = "hf",
) -> list[Path]:
    """Write a checkpoint described by its specs, fetching one tensor at a time.

    ``specs`` maps HF key -> :class:`TensorSpec`; ``fetch(hf_key)`` returns that tensor and is
    called once per written tensor, in file order, and its result released after writing, so
    peak memory is about the largest tensor. Validation, stage selection, sharding and files
    are those of :func:`save_bagel_checkpoint`; ``keys="native"`` names the tensors by their
    native (``model.``-rooted) keys instead of their HF keys.
    """
    if config is not None and not isinstance(config, BagelConfig):
        raise TypeError(
            f"config must be a bagelverify.BagelConfig (written as the checkpoint's config "
            f"files), got {type(config).__name__}; use BagelConfig.from_pretrained(folder)"
        )
    report = build_report(specs, stage=stage, config=config, source=str(out_dir))
    report.raise_for_problems(strict=strict)
    report.plan.log(strict=strict)
    names = {
        key: (native if keys == "native" else key) for key, native in report.plan.native.items()
    }
    kept = [TensorSpec(names[key], specs[key].dtype, specs[key].shape) for key in names]
    by_name = {name: key for key, name in names.items()}

    def fetch_by_name(name: str) -> torch.Tensor:
        return fetch(by_name[name])

    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if max_shard_size is None:
        target = directory / MODEL_FILE
        write_safetensors(target, kept, fetch_by_name)
        written.append(target)
    else:
        if (directory / MODEL_FILE).exists():
            raise FileExistsError(
                f"{directory / MODEL_FILE} exists and would shadow the sharded checkpoint "
                "(ema.safetensors wins when loading); remove it or save to another folder"
            )
        shards = _shards(kept, parse_size(max_shard_size))
        weight_map: dict[str, str] = {}
        # Every shard is complete and fsync'ed under a temporary name before the old index is
        # removed and the shards renamed: a crash leaves the previous checkpoint, or no index
        # (a loud FileNotFoundError), never an index over a mix of old and new shards.
        with contextlib.ExitStack() as renames:
            for number, shard in enumerate(shards, start=1):
                name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
                handle = renames.enter_context(atomic_open(directory / name))
                stream_safetensors(handle, shard, fetch_by_name)
                handle.flush()
                os.fsync(handle.fileno())
                weight_map.update((spec.name, name) for spec in shard)
                written.append(directory / name)
            remove_durably(directory / INDEX_FILE)
        index = {
            "metadata": {"total_size": sum(spec.nbytes for spec in kept)},
            "weight_map": {spec.name: weight_map[spec.name] for spec in kept},
        }
        with atomic_open(directory / INDEX_FILE) as handle:
            handle.write((json.dumps(index, indent=2) + "\n").encode("utf-8"))
        written.append(directory / INDEX_FILE)
    if config is not None:
        config.save_pretrained(directory)
        written.extend(directory / name for name in CONFIG_FILES)
    logger.info("%s: wrote %d tensors (%s)", directory, len(kept), report.stage)
    return written


def convert_checkpoint(
    src_dir: str | os.PathLike[str],
    dst_dir: str | os.PathLike[str],
    *,
    stage: object = "stage2",
    keys: KeyLayout = "hf",
    max_shard_size: int | str | None = None,
    strict: bool = True,
    config: BagelConfig | None = None,
    convert_conv_patch_embedding: bool = False,
    on_tensor: Callable[[str, int], None] | None = None,
) -> list[Path]:
    """Rewrite a checkpoint folder with HF or native keys, streaming one tensor at a time.

    The source (HF- or native-keyed, single file or sharded) is validated from its headers like
    a load; each kept tensor is then read into a fresh buffer, written and released, so peak
    memory is about the largest tensor, never the checkpoint. The config (``config`` if given,
    else the source's config files) is written with the tensors. ``on_tensor(hf_key, nbytes)``
    is called after each tensor is read (for progress). Returns the files written.
    """
    report, jobs = _open_report(src_dir, stage, strict, config, convert_conv_patch_embedding)
    specs = {
        strip_root(native): TensorSpec(strip_root(native), info.dtype, _target_shape(info, conv))
        for native, (info, conv) in jobs.items()
    }

    def fetch(hf_key: str) -> torch.Tensor:
        native = to_native_key(hf_key)
        info, conv = jobs[native]
        out = torch.empty(_target_shape(info, conv), dtype=info.torch_dtype)
        _fill({native: jobs[native]}, {native: out})
        if on_tensor is not None:
            on_tensor(hf_key, info.nbytes)
        return out

    return write_bagel_checkpoint(
        specs,
        fetch,
        dst_dir,
        stage=report.stage,
        max_shard_size=max_shard_size,
        strict=strict,
        config=report.config,
        keys=keys,
    )
