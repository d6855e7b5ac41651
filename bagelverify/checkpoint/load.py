"""Reading a validated checkpoint's kept tensors into memory: the read jobs, the destination
check, and the loaders.

Every load goes the same way: the folder's report (:func:`read_jobs`) is built from the headers
and raises if it has problems; then the destinations are checked (:func:`check_destinations`)
and only then are the bytes of the tensors the stage keeps read (:func:`fill`, through
:mod:`bagelverify.engine`), each straight into its destination. Dropped tensors are never read.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Literal, NamedTuple

import torch

from ..buckets import Bucket
from ..config import ConfigLike
from ..dtypes import CastLike, torch_dtype
from ..engine import EngineOptions, EngineStats, Progress, Transfer
from ..engine import run as run_engine
from ..errors import (
    AllocationError,
    DestinationError,
    MissingKeysError,
    ShapeMismatchError,
    UnknownKeysError,
    agree,
    counted,
    format_examples,
)
from ..keys import ROOT, strip_root
from ..manifest import MODEL_FILE, VAE_FILE, load_manifest
from ..partition import classify
from ..patch_embedding import conv_patch_weight_to_linear
from ..plan import describe_prefix, shared_prefix
from ..safetensors_io import TensorInfo, lossless_cast, open_regular, read_header
from ..stage import StageLike
from .files import Weights, open_checkpoint, require_directory
from .report import CheckpointReport, header_buckets, report_files, swapped

logger = logging.getLogger(__name__)

Cast = Literal["exact", "lossless", "any"]
"""How a destination dtype may differ from the file's: ``exact`` never; ``lossless`` when every
stored value is representable (floating widening such as BF16 -> F32); ``any`` always."""


class ReadJob(NamedTuple):
    """One kept tensor to read: where its bytes are, and whether it is a Conv2d patch-embedding
    weight to convert to its Linear form while loading."""

    info: TensorInfo
    convert: bool = False
    fd: int | None = None
    """The descriptor the file's header was read through (the data is read through it too);
    ``None``: the engine opens the file by name."""

    @property
    def shape(self) -> tuple[int, ...]:
        """The tensor's shape once loaded: a converted Conv2d weight becomes (out, P*P*C)."""
        shape = tuple(self.info.shape)
        return (shape[0], math.prod(shape[1:])) if self.convert else shape


ReadJobs = Mapping[str, ReadJob]
"""Native key -> its read job, in checkpoint order."""


@contextlib.contextmanager
def read_jobs(
    checkpoint_dir: str | os.PathLike[str],
    *,
    stage: StageLike | None,
    strict: bool,
    config: ConfigLike | None,
    convert_conv: bool,
    weights: Weights | None = None,
    strip_prefix: str | None = None,
) -> Iterator[tuple[CheckpointReport, dict[str, ReadJob]]]:
    """Validate a folder from its headers (raising its first problem) and yield its report and
    the read jobs of the tensors the stage keeps (keys the config lacks are dropped).
    ``strip_prefix`` is removed from the checkpoint keys that carry it (a wrapper's ``module.``).

    The files stay open for the ``with`` block: the jobs read the data through the descriptors
    the headers were read through, so a save that replaces the files meanwhile cannot mix
    another file's bytes into the load.
    """
    with open_checkpoint(checkpoint_dir, keep_open=True, weights=weights) as files:
        report = report_files(files, stage=stage, config=config, strip_prefix=strip_prefix)
        report.raise_for_problems(strict=strict, convert_conv=convert_conv)
        report.plan.log(strict=strict)
        beyond = {report.plan.native[key] for key in report.beyond_config}
        jobs: dict[str, ReadJob] = {}
        for key, native in report.plan.native.items():
            if native in beyond:
                continue
            info = report.tensors[key]
            assert isinstance(info, TensorInfo)
            jobs[native] = ReadJob(info, key == report.conv_patch_embedding, files.fds[info.path])
        if beyond:
            logger.warning("dropping %d keys the config does not have", len(beyond))
        yield report, jobs


def allocate(
    jobs: ReadJobs, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """An empty tensor per job (its loaded shape; ``dtype`` or the file's), or
    :class:`~bagelverify.errors.AllocationError` naming the tensor, its file and the sizes."""
    out: dict[str, torch.Tensor] = {}
    for key, job in jobs.items():
        try:
            out[key] = torch.empty(job.shape, dtype=dtype or job.info.torch_dtype, device=device)
        except RuntimeError as error:  # torch's "can't allocate" and CUDA out-of-memory
            total = sum(j.info.nbytes for j in jobs.values())
            raise AllocationError(
                f"{job.info.path}: cannot allocate {job.info.name!r} ({job.info.nbytes:,} bytes "
                f"on {device}; the {counted(len(jobs), 'tensor')} to load hold {total:,} bytes): "
                f"{str(error).splitlines()[0]}. Load fewer tensors (stage, strict=False) or "
                "onto a device with more memory."
            ) from None
    return out


def fill(
    jobs: ReadJobs,
    destinations: Mapping[str, torch.Tensor],
    *,
    read_options: EngineOptions | None = None,
    progress: Progress | None = None,
) -> EngineStats:
    """Read each job's bytes into ``destinations[key]`` through the read engine (see
    :mod:`bagelverify.engine`); the destinations must have passed :func:`check_destinations`."""
    fds = {job.info.path: job.fd for job in jobs.values() if job.fd is not None}
    transfers = [
        Transfer(
            job.info.name,
            job.info.path,
            job.info.start,
            job.info.nbytes,
            job.info.torch_dtype,
            job.info.shape,
            destinations[key],
            conv_patch_weight_to_linear if job.convert else None,
        )
        for key, job in jobs.items()
    ]
    return run_engine(transfers, options=read_options, progress=progress, fds=fds)


def read_tensor(job: ReadJob) -> torch.Tensor:
    """One job's tensor, read into a new CPU tensor of the file's dtype."""
    out = allocate({job.info.name: job})
    fill({job.info.name: job}, out)
    return out[job.info.name]


class IncompatibleKeys(NamedTuple):
    """What :func:`load_into` did not load (as ``torch.nn.Module.load_state_dict`` reports it)."""

    missing_keys: list[str]
    """Destination keys the checkpoint does not provide (left untouched)."""
    unexpected_keys: list[str]
    """Checkpoint keys (native) that the destination has no tensor for (not read)."""


def _cast_allowed(source: torch.dtype, target: torch.dtype, cast: Cast) -> bool:
    if source == target or cast == "any":
        return True
    return cast == "lossless" and lossless_cast(source, target)


def _overlaps(tensor: torch.Tensor) -> bool:
    """Whether two of ``tensor``'s elements may share memory (an expanded, stride-0 view, or a
    layout too irregular to tell): such a tensor cannot take a plain element-wise copy."""
    extent = 1
    pairs = zip(tensor.shape, tensor.stride(), strict=True)
    dims = sorted((abs(stride), size) for size, stride in pairs if size > 1)
    for stride, size in dims:
        if stride < extent:
            return True
        extent = stride * size
    return False


def _refusal(key: str, info: TensorInfo, destination: torch.Tensor, cast: Cast) -> str | None:
    """Why ``destination`` cannot take ``info``'s tensor though its shape is right, or None."""
    if not _cast_allowed(info.torch_dtype, destination.dtype, cast):
        return (
            f"  {key}: destination {destination.dtype}, file {info.torch_dtype} "
            f"(not allowed by cast={cast!r})"
        )
    if destination.device.type == "meta":
        return f"  {key}: destination is on the meta device (no memory to fill)"
    if _overlaps(destination):
        return (
            f"  {key}: destination's elements share memory (strides "
            f"{list(destination.stride())}, e.g. an expand() view); pass a tensor with its own "
            "memory for each element"
        )
    return None


def check_destinations(
    jobs: ReadJobs,
    native_state_dict: Mapping[str, torch.Tensor],
    checkpoint_dir: str | os.PathLike[str],
    *,
    strict: bool,
    cast: Cast,
    report: CheckpointReport | None = None,
) -> tuple[dict[str, ReadJob], IncompatibleKeys]:
    """Check destinations against a validated folder's read jobs (see :func:`load_into`).

    Returns the jobs both sides have and what each side lacks. Raises
    :class:`~bagelverify.errors.MissingKeysError` under ``strict`` when the key sets differ, and
    one error listing every destination that cannot hold its tensor: a
    :class:`~bagelverify.errors.ShapeMismatchError` when a (global) shape differs, else a
    :class:`~bagelverify.errors.DestinationError` for dtypes ``cast`` refuses, meta-device
    tensors and layouts whose elements share memory. With the folder's ``report`` (the one
    :func:`read_jobs` returns), the key-set message tells the destination keys that the
    checkpoint holds but the stage does not keep from those it lacks. Reads no tensor data.
    """
    wanted = [k for k in native_state_dict if classify(strip_root(k)) is not Bucket.EXTRA]
    missing = [key for key in wanted if key not in jobs]
    unexpected = [key for key in jobs if key not in native_state_dict]
    layout = _layout_advice(missing, jobs)
    if layout is not None and (strict or len(missing) == len(wanted)):
        raise MissingKeysError(
            f"{checkpoint_dir}: {counted(len(missing), 'destination key')} "
            f"{agree(len(missing), 'is', 'are')} not native keys ({format_examples(missing)}): "
            f"{layout}",
            missing,
            unexpected,
        )
    if jobs and len(missing) == len(wanted):
        held = (
            f"none of its {counted(len(wanted), 'key')} (e.g. {format_examples(wanted, 2)}) is"
            if wanted
            else "it holds no tensor, none"
        )
        raise MissingKeysError(
            f"{checkpoint_dir}: the destination shares no key with the checkpoint's "
            f"{counted(len(jobs), 'kept tensor')} (e.g. {format_examples(list(jobs), 2)}): "
            f"{held} among them. Nothing would be loaded, which is refused, strict or not; pass "
            f"the model's own state dict (keys under {ROOT!r}).",
            missing,
            unexpected,
        )
    if strict and (missing or unexpected):
        stored = set() if report is None else {strip_root(key) for key in report.tensors}
        dropped = [key for key in missing if strip_root(key) in stored]
        absent = [key for key in missing if strip_root(key) not in stored]
        parts = []
        advice = "Check the stage, or pass strict=False to load the keys both have."
        if dropped and report is not None:
            parts.append(
                f"{counted(len(dropped), 'destination key')} {agree(len(dropped), 'is', 'are')} "
                f"in the checkpoint but {report.stage} does not keep "
                f"{agree(len(dropped), 'it', 'them')} ({format_examples(dropped)})"
            )
            if report.stage == "stage1" and any(
                classify(strip_root(key)) is Bucket.GEN for key in dropped
            ):
                advice = (
                    "Pass stage=2 to load them too, or strict=False to load the keys both have."
                )
        if absent:
            parts.append(
                f"{counted(len(absent), 'destination key')} {agree(len(absent), 'is', 'are')} "
                "not in the checkpoint "
                f"({format_examples(absent)})"
            )
        if unexpected:
            parts.append(
                f"{counted(len(unexpected), 'checkpoint key')} "
                f"{agree(len(unexpected), 'has', 'have')} no destination "
                f"({format_examples(unexpected)})"
            )
        raise MissingKeysError(
            f"{checkpoint_dir}: the destination and the checkpoint's {len(jobs):,} kept tensors "
            f"differ: {', '.join(parts)}. {advice}",
            missing,
            unexpected,
        )
    common = {key: jobs[key] for key in jobs if key in native_state_dict}
    shapes: list[str] = []
    refusals: list[str] = []
    for key, job in common.items():
        destination = native_state_dict[key]
        if tuple(destination.shape) != job.shape:
            shapes.append(f"  {key}: destination {list(destination.shape)}, file {list(job.shape)}")
        elif (refusal := _refusal(key, job.info, destination, cast)) is not None:
            refusals.append(refusal)
    if shapes or refusals:
        error = ShapeMismatchError if shapes else DestinationError
        raise error(
            f"{checkpoint_dir}: {counted(len(shapes) + len(refusals), 'destination tensor')} "
            f"cannot hold {agree(len(shapes) + len(refusals), 'its', 'their')} checkpoint "
            f"{agree(len(shapes) + len(refusals), 'tensor', 'tensors')}:\n"
            + "\n".join(shapes + refusals)
            + "\nNothing was read. "
            + _destination_advice(bool(shapes), refusals)
        )
    return common, IncompatibleKeys(missing, unexpected)


def _layout_advice(missing: list[str], jobs: ReadJobs) -> str | None:
    """Why most destination keys that the checkpoint lacks are no native keys, and what to do:
    Hugging Face layout keys (no ``model.`` root), or a wrapper's prefix (``module.``)."""
    if not missing:
        return None
    rooted = sum(ROOT + key in jobs for key in missing)
    if 2 * rooted > len(missing):
        return (
            f"they are Hugging Face layout keys, without the {ROOT!r} root that load_into's "
            f"native destinations carry. Pass the framework module's state dict (keys under "
            f"{ROOT!r}), or root these keys ({{'{ROOT}' + key: tensor}})."
        )
    prefix = shared_prefix(missing, lambda key: key in jobs)
    if prefix is not None:
        return (
            f"every one starts with {describe_prefix(prefix)}; pass the wrapped module's own "
            f"state dict (e.g. model.module.state_dict() under DDP), or the keys with {prefix!r} "
            "removed."
        )
    return None


def _destination_advice(shapes: bool, refusals: list[str]) -> str:
    """What to do about destinations that cannot hold their tensors, by what is wrong."""
    advice = []
    if shapes:
        advice.append(
            "Build the model with the checkpoint's config (BagelConfig.from_pretrained(folder)): "
            "the shapes above are the file's; a dtype cast cannot change a shape."
        )
    if any("not allowed by cast=" in line for line in refusals):
        advice.append("Pass cast='any' to allow narrowing dtype conversions.")
    if any("meta device" in line for line in refusals):
        advice.append(
            "Materialise the model first (model.to_empty(device=...)) so that its parameters "
            "have memory."
        )
    return " ".join(advice)


def load_into(
    native_state_dict: Mapping[str, torch.Tensor],
    checkpoint_dir: str | os.PathLike[str],
    *,
    stage: StageLike = "stage1",
    strict: bool = True,
    config: ConfigLike | None = None,
    cast: Cast = "lossless",
    convert_conv_patch_embedding: bool = False,
    read_options: EngineOptions | None = None,
    progress: Progress | None = None,
    weights: Weights | None = None,
    strip_prefix: str | None = None,
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
    ``weights`` picks ``ema.safetensors`` or ``model.safetensors`` (or its index) in a training
    output folder (see :func:`~bagelverify.checkpoint.files.choose_weights`); ``strip_prefix``
    (e.g. ``"module."``) is removed from checkpoint keys saved from a wrapped module.
    """
    with read_jobs(
        checkpoint_dir,
        stage=stage,
        strict=strict,
        config=config,
        convert_conv=convert_conv_patch_embedding,
        weights=weights,
        strip_prefix=strip_prefix,
    ) as (report, jobs):
        common, incompatible = check_destinations(
            jobs, native_state_dict, checkpoint_dir, strict=strict, cast=cast, report=report
        )
        fill(common, native_state_dict, read_options=read_options, progress=progress)
    logger.info("%s: loaded %d tensors in place", checkpoint_dir, len(common))
    return incompatible


def load_bagel_checkpoint_state_dict(
    checkpoint_dir: str | os.PathLike[str],
    *,
    stage: StageLike = "stage1",
    strict: bool = True,
    config: ConfigLike | None = None,
    device: str | torch.device = "cpu",
    dtype: CastLike | torch.dtype | None = None,
    convert_conv_patch_embedding: bool = False,
    read_options: EngineOptions | None = None,
    progress: Progress | None = None,
    weights: Weights | None = None,
    strip_prefix: str | None = None,
) -> dict[str, torch.Tensor]:
    """Load the tensors a stage keeps as a native (``model.``-rooted) state dict.

    Validates like :func:`inspect_checkpoint` before reading anything (``config``: a
    :class:`BagelConfig`, a folder holding the config files, or ``None`` for the checkpoint
    folder's own; another object, such as a training framework's config, is noted and the
    folder's files are used), allocates each kept tensor on ``device`` (as ``dtype`` if given, else
    the file's dtype) and reads it in place; dropped tensors' bytes are never read.
    ``read_options`` and ``progress`` are the read engine's (see :func:`load_into`).
    ``weights`` picks ``ema.safetensors`` or ``model.safetensors`` (or its index) in a training
    output folder (see :func:`~bagelverify.checkpoint.files.choose_weights`); ``strip_prefix``
    (e.g. ``"module."``) is removed from checkpoint keys saved from a wrapped module.
    """
    with read_jobs(
        checkpoint_dir,
        stage=stage,
        strict=strict,
        config=config,
        convert_conv=convert_conv_patch_embedding,
        weights=weights,
        strip_prefix=strip_prefix,
    ) as (_, jobs):
        out = allocate(jobs, device=device, dtype=None if dtype is None else torch_dtype(dtype))
        fill(jobs, out, read_options=read_options, progress=progress)
    return out


def load_bagel_vae_state_dict(
    checkpoint_dir: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    dtype: CastLike | torch.dtype | None = None,
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
    require_directory(directory, VAE_FILE)
    path = directory / VAE_FILE
    try:
        fd = open_regular(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: VAE file not found") from None
    try:
        cast = None if dtype is None else torch_dtype(dtype)
        return _load_vae(path, fd, device, cast, strict, read_options, progress)
    finally:
        os.close(fd)


def _load_vae(
    path: Path,
    fd: int,
    device: str | torch.device,
    dtype: torch.dtype | None,
    strict: bool,
    read_options: EngineOptions | None,
    progress: Progress | None,
) -> dict[str, torch.Tensor]:
    header = read_header(path, fd=fd)
    other = [key for key in header.tensors if classify(key) is not Bucket.VAE]
    if other:
        raise UnknownKeysError(
            f"{path}: {counted(len(other), 'key')} {agree(len(other), 'is', 'are')} not "
            f"VAE (encoder./decoder.) keys: {format_examples(other)}. {_not_vae(path, other)}",
            other,
        )
    expected = load_manifest()[VAE_FILE]
    missing = [key for key in expected if key not in header.tensors]
    if strict and missing:
        raise MissingKeysError(
            f"{path}: {len(missing):,} of the {len(expected):,} VAE keys "
            f"{agree(len(missing), 'is', 'are')} missing: "
            f"{format_examples(missing)}. The file is incomplete; pass strict=False to load "
            "the keys it has.",
            missing,
        )
    jobs = {key: ReadJob(info, fd=fd) for key, info in header.tensors.items()}
    out = allocate(jobs, device=device, dtype=dtype)
    fill(jobs, out, read_options=read_options, progress=progress)
    return out


def _not_vae(path: Path, other: list[str]) -> str:
    """What to do about a VAE file holding other keys: when they are the model's and the
    folder's model file holds the VAE, the two files are swapped."""
    model = sum(classify(strip_root(key)) in (Bucket.UND, Bucket.GEN) for key in other)
    if not model:
        return f"{VAE_FILE} holds the VAE only; put the release's {VAE_FILE} here."
    model_file = path.parent / MODEL_FILE
    counts = header_buckets(model_file)
    if counts is not None and counts[Bucket.VAE] and not counts[Bucket.UND] + counts[Bucket.GEN]:
        return f"It holds the model's keys and {model_file} holds the VAE: " + swapped(
            model_file, path
        )
    return (
        f"It holds {counted(model, 'model key')}: it is the model's weights, not the VAE; put "
        f"the release's {VAE_FILE} here."
    )
