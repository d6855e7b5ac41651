"""Fill the keys a checkpoint lacks from a base checkpoint, streaming one tensor at a time.

The usual case: a fine-tune saved by the upstream trainer whose ``ema.safetensors`` lost some
or all ``vit_model.*`` keys, repaired from the release. :func:`repair_checkpoint` validates both
sides from their headers (the source like a load, apart from the keys it lacks; the base's
tensors for those keys against the config's shapes), then writes every tensor of the source
unchanged plus the missing ones from the base through the writer ``convert`` uses
(:func:`bagelverify.checkpoint.write_bagel_checkpoint`), into a hidden staging folder published
as ``out`` only when complete (:mod:`bagelverify.publish`: a killed repair leaves ``out`` as it
was, and the next run removes what it left).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import (
    INDEX_FILE,
    CheckpointFiles,
    build_report,
    find_config,
    open_weights,
    write_bagel_checkpoint,
)
from .checkpoint.files import Weights
from .checkpoint.save import WrittenTensors
from .config import BagelConfig, ConfigLike
from .diff import family_name
from .errors import (
    LossyCastError,
    MissingKeysError,
    ShapeMismatchError,
    agree,
    counted,
    format_examples,
)
from .families import expected_shapes
from .keys import ROOT, strip_root
from .manifest import VAE_FILE
from .plan import held_stage
from .publish import Guard, publishing, refuse_aliasing, visible_entries
from .quantized import find_quantization
from .rewrite import CastTransform
from .safetensors_io import DTYPES, TensorInfo, TensorSpec
from .stage import Stage, StageLike, normalize_stage
from .tensor_reader import TensorReader

logger = logging.getLogger(__name__)


@dataclass
class RepairReport:
    """What :func:`repair_checkpoint` wrote (or, with ``dry_run``, would write)."""

    source: str
    base: str
    out: str
    stage: str
    from_source: dict[str, int] = field(default_factory=dict)
    """Family -> tensors copied from the source."""
    from_base: dict[str, list[str]] = field(default_factory=dict)
    """Family -> HF keys filled from the base."""
    vae_from: str | None = None
    """The ``ae.safetensors`` copied (the source's, else the base's), or ``None`` (neither has
    one): a path, as in ``convert``'s JSON."""
    dry_run: bool = False
    files: list[str] = field(default_factory=list)
    bytes_from_source: int = 0
    bytes_from_base: int = 0
    dtype: str | None = None
    """The source's floating dtype, which every filled tensor is written in (``None``: the
    source holds no tensor, so the base's dtypes stay)."""
    cast: list[str] = field(default_factory=list)
    """HF keys filled from a base tensor of another dtype, cast to :attr:`dtype`."""
    narrowed: list[str] = field(default_factory=list)
    """Those of :attr:`cast` cast with loss of precision or range (only with ``allow_lossy``)."""

    @property
    def filled(self) -> list[str]:
        """Every key taken from the base."""
        return [key for keys in self.from_base.values() for key in keys]

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "source": self.source,
            "base": self.base,
            "out": self.out,
            "stage": self.stage,
            "dry_run": self.dry_run,
            "from_source": dict(self.from_source),
            "from_base": {family: len(keys) for family, keys in self.from_base.items()},
            "filled_keys": self.filled,
            "bytes_from_source": self.bytes_from_source,
            "bytes_from_base": self.bytes_from_base,
            "vae_from": self.vae_from,
            "dtype": self.dtype,
            "cast": list(self.cast),
            "narrowed": len(self.narrowed),
            "files": list(self.files),
        }


def _config_for(
    source: CheckpointFiles, base: CheckpointFiles, given: object
) -> tuple[BagelConfig, Path]:
    for folder in (source.directory, base.directory):
        found = find_config(folder, given)
        if found is not None:
            return found, folder
    raise FileNotFoundError(
        f"neither {source.directory} nor {base.directory} holds config files; the keys a stage "
        "expects come from the config: pass config= (or --config DIR)"
    )


def _check_source(source: CheckpointFiles, config: BagelConfig) -> None:
    """Everything a strict stage-2 load checks, except the keys the source lacks."""
    report = build_report(source.tensors, stage="stage2", config=config, source=source.source)
    problems = [
        problem
        for problem in report.problems(strict=True)
        # a source holding the VAE only is not a checkpoint missing keys
        if not isinstance(problem, MissingKeysError) or report.holds_vae_only
    ]
    if problems:
        raise problems[0]


def _base_tensors(
    base: CheckpointFiles, wanted: dict[str, list[str]], config: BagelConfig
) -> dict[str, TensorInfo]:
    """The base's tensor for every wanted HF key, shape-checked against the config."""
    by_hf = {strip_root(key): info for key, info in base.tensors.items()}
    keys = [key for family_keys in wanted.values() for key in family_keys]
    absent = [key for key in keys if key not in by_hf]
    if absent:
        raise MissingKeysError(
            f"{base.source}: the base lacks {len(absent):,} of the {counted(len(keys), 'key')} "
            "to fill: "
            f"{format_examples(absent)}. Use a complete checkpoint (e.g. the release) as the base.",
            absent,
        )
    shapes = expected_shapes(config)
    wrong = [
        f"{key}: expected {list(shapes[key])}, found {list(by_hf[key].shape)}"
        for key in keys
        if tuple(by_hf[key].shape) != shapes[key]
    ]
    if wrong:
        raise ShapeMismatchError(
            f"{base.source}: {counted(len(wrong), 'base tensor')} to fill "
            f"{agree(len(wrong), 'does', 'do')} not have the shape the config implies "
            f"({format_examples(wrong, show=str)}). The base is a different model size; nothing "
            "was written."
        )
    quantized = find_quantization({key: info.dtype for key, info in by_hf.items()})
    touched = None if quantized is None else quantized.involving(keys)
    if touched is not None:
        raise touched.error(
            base.source, "the base is quantized where the keys to fill are", "nothing was written"
        )
    return {key: by_hf[key] for key in keys}


def _source_dtype(tensors: list[TensorInfo]) -> str | None:
    """The floating dtype most of the source's tensors have (a checkpoint has one), or
    ``None`` when it has no floating tensor."""
    floating = Counter(i.dtype for i in tensors if DTYPES[i.dtype].torch_dtype.is_floating_point)
    return floating.most_common(1)[0][0] if floating else None


def _casts(
    report: RepairReport, filled: dict[str, TensorInfo], allow_lossy: bool
) -> CastTransform | None:
    """The cast of the filled tensors to the source's dtype, recorded in ``report``; refuses
    a lossy one (:class:`~bagelverify.errors.LossyCastError`) unless ``allow_lossy``."""
    if report.dtype is None:
        return None
    cast = CastTransform(report.dtype)
    specs = [TensorSpec(key, info.dtype, info.shape) for key, info in filled.items()]
    report.cast = [spec.name for spec in specs if cast.spec(spec).dtype != spec.dtype]
    report.narrowed = cast.narrowing(specs)
    if report.narrowed and not allow_lossy:
        found = Counter(filled[key].dtype for key in report.narrowed)
        raise LossyCastError(
            f"{report.base}: {counted(len(report.narrowed), 'tensor')} to fill "
            f"{agree(len(report.narrowed), 'is', 'are')} stored as "
            f"{', '.join(f'{name} {count:,}' for name, count in sorted(found.items()))} "
            f"({format_examples(report.narrowed)}) and {report.source} as {report.dtype}: "
            f"casting them to {report.dtype} loses precision or range; nothing was written. "
            f"Pass allow_lossy=True (--allow-lossy) to round them to {report.dtype} (the "
            f"repaired checkpoint is then all {report.dtype}), or use a {report.dtype} base."
        )
    return cast if report.cast else None


def repair_checkpoint(
    src: str | os.PathLike[str],
    *,
    base: str | os.PathLike[str],
    out: str | os.PathLike[str],
    stage: StageLike | None = None,
    config: ConfigLike | None = None,
    weights: Weights | None = None,
    base_weights: Weights | None = None,
    max_shard_size: int | str | None = None,
    dry_run: bool = False,
    allow_lossy: bool = False,
    on_tensor: Callable[[str, int], None] | None = None,
) -> RepairReport:
    """Write ``out``: every UND/GEN tensor of ``src`` unchanged, plus every key ``stage``
    expects that ``src`` lacks, taken from ``base``. ``stage=None`` (the default) is the stage
    the two checkpoints hold: ``"stage2"`` when either has a GEN key.

    ``config`` (a :class:`BagelConfig` or folder) defaults to ``src``'s config files, else
    ``base``'s; it decides the expected keys and shapes and is written to ``out``. ``src`` must
    otherwise pass a strict load (no unknown keys, no wrong shapes); the base must hold every
    key to fill with the config's shape (:class:`~bagelverify.errors.MissingKeysError` /
    :class:`~bagelverify.errors.ShapeMismatchError` otherwise, before anything is written).
    A key ``src`` has is never taken from ``base``. The output keeps ``src``'s key layout (HF
    or native) and tensors' dtypes, and the filled tensors take ``src``'s floating dtype, so
    the output is never mixed: a widening cast (a BF16 base for an F32 source) is done, a
    narrowing one (an F32 base for a BF16 source) raises
    :class:`~bagelverify.errors.LossyCastError` unless ``allow_lossy``. A quantized base (FP8
    codes, scale tensors) for the keys to fill raises
    :class:`~bagelverify.errors.QuantizedCheckpointError`. ``ae.safetensors`` is copied from
    ``src``, else ``base``.
    One tensor is in memory at a time; ``out`` must not exist (or be an empty folder: the
    leftovers of a killed repair do not count) and appears only when complete; an ``out`` that
    is ``src``, ``base`` or the config folder, by any name (symlink, bind mount, hard links),
    raises :class:`~bagelverify.errors.AliasError`. ``dry_run`` checks and plans but writes
    nothing.
    """
    target = Path(out)
    with (  # the data is read through the descriptors the headers were read through
        open_weights(src, weights, keep_open=True) as source,
        open_weights(base, base_weights, keep_open=True) as donor,
    ):
        stage_name = (
            held_stage([*source.tensors, *donor.tensors])
            if stage is None
            else normalize_stage(stage)
        )
        plan = _plan(source, donor, stage_name, config, target, dry_run, allow_lossy)
        if dry_run:
            return plan.report
        plan.report.files = _write(
            plan, target, {**donor.fds, **source.fds}, max_shard_size, on_tensor
        )
    logger.info(
        "%s: %d tensors from %s, %d from %s (config from %s)",
        target,
        len(plan.jobs) - len(plan.report.filled),
        plan.report.source,
        len(plan.report.filled),
        plan.report.base,
        plan.config_folder,
    )
    return plan.report


@dataclass
class _Plan:
    """What a repair writes: every tensor by HF key, where it is read from, and how."""

    report: RepairReport
    jobs: dict[str, TensorInfo]
    config: BagelConfig
    config_folder: Path
    reads: list[Path]
    """What the repair reads: the two folders (or files) and the config folder."""
    native_layout: bool
    """Whether the output keeps the source's ``model.``-rooted keys."""
    vae: Path | None
    cast: CastTransform | None = None
    """The cast of the filled keys of another dtype (``report.cast``) to the source's."""


def _plan(
    source: CheckpointFiles,
    donor: CheckpointFiles,
    stage: Stage,
    config: object,
    target: Path,
    dry_run: bool,
    allow_lossy: bool,
) -> _Plan:
    """Check both sides from their headers and plan the output; nothing is read or written."""
    found, config_folder = _config_for(source, donor, config)
    _check_source(source, found)
    missing = build_report(source.tensors, stage=stage, config=found, source=source.source).missing
    filled = _base_tensors(donor, missing, found)
    reads = [*source.files, source.directory, *donor.files, donor.directory]
    if isinstance(config, (str, os.PathLike)):
        reads.append(Path(config))
    refuse_aliasing(target, reads, _everything)
    if target.exists():
        _empty(target)(visible_entries(target) if target.is_dir() else [target.name])
    kept = build_report(source.tensors, stage="stage2", config=found).plan.native
    jobs: dict[str, TensorInfo] = {strip_root(key): source.tensors[key] for key in kept}
    report = RepairReport(source.source, donor.source, str(target), stage, dry_run=dry_run)
    for key, info in jobs.items():
        family = family_name(key)
        report.from_source[family] = report.from_source.get(family, 0) + 1
        report.bytes_from_source += info.nbytes
    for family, keys in missing.items():
        report.from_base[family] = list(keys)
    report.bytes_from_base = sum(info.nbytes for info in filled.values())
    report.dtype = _source_dtype(list(jobs.values()))
    cast = _casts(report, filled, allow_lossy)
    jobs.update(filled)
    folders = (source.directory, donor.directory)
    vae = next((d / VAE_FILE for d in folders if (d / VAE_FILE).is_file()), None)
    if vae is not None:
        report.vae_from = str(vae)
    native_layout = bool(kept) and all(key.startswith(ROOT) for key in kept)
    return _Plan(report, jobs, found, config_folder, reads, native_layout, vae, cast)


def _everything(name: str) -> bool:
    """A repair's output replaces nothing: it must be new or empty."""
    return True


def _empty(target: Path) -> Guard:
    def guard(entries: list[str]) -> None:
        if entries:
            raise FileExistsError(
                f"{target} exists and is not an empty folder; choose a new folder"
            )

    return guard


def _write(
    plan: _Plan,
    target: Path,
    fds: dict[Path, int],
    max_shard_size: int | str | None,
    on_tensor: Callable[[str, int], None] | None,
) -> list[str]:
    """Write the plan's tensors (read through ``fds``) and ``ae.safetensors`` into a staging
    folder, then publish it as ``target``; the files written, by their final paths."""
    cast, casts = plan.cast, set(plan.report.cast)
    specs = {key: TensorSpec(key, info.dtype, info.shape) for key, info in plan.jobs.items()}
    if cast is not None:
        specs.update({key: cast.spec(specs[key]) for key in casts})
    with publishing(
        target, replaces=_everything, guard=_empty(target), reads=plan.reads, last=(INDEX_FILE,)
    ) as staging:
        progress = WrittenTensors(on_tensor)
        with TensorReader(fds) as reader:

            def fetch(hf_key: str) -> torch.Tensor:
                tensor = reader.read(plan.jobs[hf_key])
                if cast is not None and hf_key in casts:
                    tensor = cast.apply(hf_key, tensor)
                return progress.fetched(hf_key, tensor)

            # not strict: the stage's keys are all there; GEN keys of a stage-1 repair stay
            written = write_bagel_checkpoint(
                specs,
                fetch,
                staging,
                stage="stage2",
                max_shard_size=max_shard_size,
                strict=False,
                config=plan.config,
                keys="native" if plan.native_layout else "hf",
            )
        if plan.vae is not None:
            shutil.copyfile(plan.vae, staging / VAE_FILE)
            written.append(staging / VAE_FILE)
    progress.done()  # published
    return [str(target / path.name) for path in written]
