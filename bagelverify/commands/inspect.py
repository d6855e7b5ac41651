"""``bagelverify inspect``: validate a checkpoint from its headers and show the report.

Reads the safetensors header(s), the config files and the bytes of the two position tables
(about 40 MB for BAGEL-7B-MoT; ``--headers-only`` skips them): it takes well under a second on
a 29 GB file. Every check is the library's own (:func:`bagelverify.checkpoint.build_report`,
:meth:`CheckpointReport.problems`, :func:`bagelverify.position_check.check_tables`); this module
only renders the result.
"""

from __future__ import annotations

import argparse
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..buckets import Bucket
from ..checkpoint import (
    INDEX_FILE,
    CheckpointReport,
    TensorLike,
    build_report,
    check_swapped_vae,
    find_config,
    open_weights,
)
from ..checkpoint.files import Weights
from ..cli import EXIT_OK, EXIT_PROBLEMS, UsageError, add_stage_argument
from ..config import BagelConfig
from ..errors import CorruptCheckpointError, counted, format_examples
from ..manifest import VAE_FILE
from ..plan import without_prefix
from ..pos_embed import TableCheck
from ..position_check import check_tables
from ..safetensors_io import TensorSpec, dtype_name, read_header
from ..stage import STAGE_BUCKETS, StageLike
from .arguments import (
    DCP_METADATA,
    WEIGHT_FILES,
    add_strip_prefix_argument,
    add_weights_argument,
    checkpoint_path,
    config_folder,
)
from .findings import FINDINGS
from .findings import shown_key as shown_key  # public here since the command began
from .render import Column, Printer, human_bytes, print_json

EXAMPLE = "bagelverify inspect /ckpt/BAGEL-7B-MoT --stage 2"

DEFAULT_LIMIT = 10
"""Keys listed per finding in text output (``--limit``); JSON lists every key."""


@dataclass(frozen=True)
class FileSummary:
    """One safetensors file of the checkpoint: path, tensor count and size on disk."""

    path: str
    tensors: int
    bytes: int

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"path": self.path, "tensors": self.tensors, "bytes": self.bytes}


@dataclass(frozen=True)
class Inspection:
    """A report plus what the folder holds around it (files, VAE file, config source)."""

    report: CheckpointReport
    files: list[FileSummary]
    vae_file: FileSummary | None
    config_source: str | None
    format: str = "safetensors"
    """``"safetensors"`` or ``"dcp"`` (a torch.distributed.checkpoint folder)."""
    position_tables: list[TableCheck] | None = None
    """The position tables the checkpoint holds against the regenerated ones; ``None`` when
    not compared (``--headers-only``, or a DCP checkpoint)."""
    weight_files: tuple[str, ...] = ()
    """Every weights file the folder holds (``ema.safetensors``, ``model.safetensors``, the
    shard index), the one read among them (:attr:`CheckpointReport.weights` says which)."""

    @property
    def problems(self) -> list[Exception]:
        """What a strict load for the report's stage would raise."""
        return self.report.problems(strict=True)

    @property
    def exit_code(self) -> int:
        """0 when a strict load of the stage would succeed, else 1."""
        return EXIT_OK if not self.problems else EXIT_PROBLEMS

    def as_dict(self) -> dict[str, Any]:
        """The ``inspect --json`` document (the fields after the envelope; docs/json.md)."""
        problems = self.problems
        return {
            "command": "inspect",
            "format": self.format,
            "stage": self.report.stage,
            "clean": not problems,
            "problems": [{"error": type(p).__name__, "message": str(p)} for p in problems],
            "config_source": self.config_source,
            "files": [f.as_dict() for f in self.files],
            "vae_file": None if self.vae_file is None else self.vae_file.as_dict(),
            "weight_files": list(self.weight_files),
            "position_tables": None
            if self.position_tables is None
            else [check.as_dict() for check in self.position_tables],
            "report": self.report.as_dict(),
        }


def _summary(path: Path) -> FileSummary:
    header = read_header(path)
    return FileSummary(str(path), len(header.tensors), header.file_size)


def inspect_path(
    path: str | Path,
    *,
    stage: StageLike | None = None,
    config_dir: str | Path | None = None,
    weights: Weights | None = None,
    headers_only: bool = False,
    strip_prefix: str | None = None,
) -> Inspection:
    """Inspect a checkpoint folder (single file or sharded), one ``.safetensors`` file, or a
    DCP folder.

    The config is read from ``config_dir`` if given, else from the checkpoint's folder when its
    config files exist; ``weights`` picks ``ema`` or ``model`` weights in a training output
    folder. Reads headers and config files, and unless ``headers_only`` the two position
    tables, which are compared with the regenerated ones. ``strip_prefix`` removes a
    wrapper's prefix (``module.``) from the keys first.
    """
    path = Path(path)
    if path.is_file() and path.name in (DCP_METADATA, INDEX_FILE):  # the folder's own file
        path = path.parent
    config = None if config_dir is None else BagelConfig.from_pretrained(config_dir)
    if (path / DCP_METADATA).is_file():
        if weights is not None:
            raise UsageError(
                f"{path} is a DCP checkpoint, which holds one set of weights; --weights picks "
                "ema.safetensors or model.safetensors in a safetensors folder: drop --weights"
            )
        tensors, files = _dcp_tensors(path)
        if config_dir is None:
            config = find_config(path)
        report = _report(without_prefix(tensors, strip_prefix), stage, config, str(path))
        source = _config_source(path, config_dir, config)
        return Inspection(report, files, _vae_file(path), source, "dcp")
    with open_weights(path, weights, keep_open=True) as found:
        folder = found.directory
        if config_dir is None:
            config = find_config(folder)
        infos = without_prefix(found.tensors, strip_prefix)
        report = _report(infos, stage, config, found.source)
        report.weights = found.weights
        check_swapped_vae(report, folder)
        tables = None if headers_only else check_tables(infos, config, found.fds)
        held = Counter(info.path for info in found.tensors.values())
        summaries = [
            FileSummary(str(file), held[file], os.fstat(found.fds[file]).st_size)
            for file in found.files
        ]
    source = _config_source(folder, config_dir, config)
    vae_file = _vae_file(folder, found.files)
    held_weights = tuple(name for name in WEIGHT_FILES if (folder / name).is_file())
    return Inspection(report, summaries, vae_file, source, "safetensors", tables, held_weights)


def _vae_file(folder: Path, model_files: tuple[Path, ...] = ()) -> FileSummary | None:
    """``ae.safetensors`` beside the checkpoint, unless it is the file being inspected."""
    vae = folder / VAE_FILE
    return _summary(vae) if vae.is_file() and vae not in model_files else None


def _report(
    tensors: Mapping[str, TensorLike],
    stage: StageLike | None,
    config: BagelConfig | None,
    source: str,
) -> CheckpointReport:
    return build_report(tensors, stage=stage, config=config, source=source, manifest_fallback=True)


def _config_source(
    folder: Path, config_dir: str | Path | None, config: BagelConfig | None
) -> str | None:
    if config_dir is not None:
        return str(config_dir)
    return None if config is None else str(folder)


def _dcp_tensors(folder: Path) -> tuple[dict[str, TensorSpec], list[FileSummary]]:
    """The tensors a DCP folder's metadata lists (its keys as stored, ``model.``-rooted), and
    its files (``.metadata``, then each ``.distcp`` file with the tensors it holds).

    The metadata is read with the restricted unpickler; no tensor data is read."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from ..safe_pickle import load_dcp_metadata

    metadata_file = folder / DCP_METADATA
    metadata = load_dcp_metadata(metadata_file)
    tensors: dict[str, TensorSpec] = {}
    others: list[str] = []
    for key, entry in metadata.state_dict_metadata.items():
        if isinstance(entry, TensorStorageMetadata):
            tensors[key] = TensorSpec(key, dtype_name(entry.properties.dtype), tuple(entry.size))
        else:
            others.append(key)
    if others:
        raise CorruptCheckpointError(
            f"{metadata_file}: {counted(len(others), 'entry', 'entries')} that are not tensors "
            f"({format_examples(others)}); a BAGEL DCP checkpoint holds the model's tensors only"
        )
    held: dict[str, set[str]] = {}
    for index, info in (metadata.storage_data or {}).items():
        held.setdefault(info.relative_path, set()).add(index.fqn)
    files = [FileSummary(str(metadata_file), len(tensors), metadata_file.stat().st_size)]
    for name in sorted(held):
        data = folder / name
        size = data.stat().st_size if data.is_file() else 0
        files.append(FileSummary(str(data), len(held[name]), size))
    return tensors, files


def _keys(printer: Printer, heading: str, items: list[str], limit: int) -> None:
    """A finding: its heading, then up to ``limit`` items (0 = all)."""
    if not items:
        return
    printer.heading(heading)
    shown = items if limit <= 0 else items[:limit]
    for item in shown:
        printer.line(f"  {item}")
    if len(shown) < len(items):
        printer.line(f"  ... and {len(items) - len(shown)} more (--limit 0 lists all)")


def render(printer: Printer, inspection: Inspection, *, limit: int = DEFAULT_LIMIT) -> None:
    """Print an inspection as the ``inspect`` command does."""
    report = inspection.report
    kind = "DCP checkpoint, " if inspection.format == "dcp" else ""
    printer.line(
        f"{report.source}  ({kind}{counted(len(report.tensors), 'tensor')}, "
        f"checked for {report.stage})"
    )
    if report.weights is not None:
        printer.line(f"weights: {report.weights}")
        read = Path(report.source).name
        others = [name for name in inspection.weight_files if name != read]
        if others:
            printer.line(
                f"  the folder also holds {', '.join(others)} (not read; --weights "
                f"{WEIGHT_FILES[others[0]]} reads {others[0]})"
            )
    if inspection.config_source:
        printer.line(f"config: {inspection.config_source}")
    elif report.expected_from == "manifest":
        printer.line(
            "config: none found; completeness checked against the shipped BAGEL-7B-MoT "
            "manifest, shapes not checked (use --config DIR)",
            style="yellow",
        )
    else:
        printer.line(
            "config: none found; shapes and completeness are not checked (use --config DIR)",
            style="yellow",
        )
    _bucket_table(printer, report)
    _sizes(printer, inspection)
    printer.heading(f"Checks ({report.stage})")
    printer.fields(
        [(finding.label, finding.row(report)) for finding in FINDINGS]
        + [("Conv2d patch embedding", report.conv_patch_embedding or "no")]
    )
    for finding in FINDINGS:
        lines = finding.lines(report)
        _keys(printer, finding.heading(report, lines), lines, limit)
    _position_tables(printer, inspection.position_tables)
    _verdict(printer, inspection)


def _position_tables(printer: Printer, checks: list[TableCheck] | None) -> None:
    """Each position table against the regenerated one (frozen tables: a difference is a
    warning, never a load problem)."""
    if not checks:
        return
    printer.heading("Position tables (against the regenerated sine-cosine tables)")
    for check in checks:
        printer.line(f"  {check.describe()}", style=None if check.exact else "yellow")


def _bucket_table(printer: Printer, report: CheckpointReport) -> None:
    """Tensors, bytes and dtypes by bucket, and whether the stage keeps each."""
    kept_buckets = STAGE_BUCKETS[report.stage]
    rows = []
    for bucket, summary in report.buckets.items():
        if summary.count == 0 and bucket in (Bucket.EXTRA, Bucket.UNKNOWN, Bucket.VAE):
            continue
        dtypes = ", ".join(f"{name} {count}" for name, count in sorted(summary.dtypes.items()))
        rows.append(
            [
                str(bucket),
                f"{summary.count:,}",
                human_bytes(summary.nbytes),
                dtypes or "-",
                "kept" if bucket in kept_buckets else "dropped",
            ]
        )
    printer.table(
        "Tensors by bucket",
        [
            Column("bucket"),
            Column("tensors", numeric=True),
            Column("bytes", numeric=True),
            Column("dtypes"),
            Column(report.stage),
        ],
        rows,
    )


def _sizes(printer: Printer, inspection: Inspection) -> None:
    """What each stage reads, and each file of the folder."""
    report = inspection.report
    total = sum(s.nbytes for s in report.buckets.values())
    share = f" ({100 * report.stage1_bytes / total:.1f}% of the tensor bytes)" if total else ""
    printer.heading("Sizes")
    pairs = [
        ("stage 1 reads", human_bytes(report.stage1_bytes) + share),
        ("stage 2 reads", human_bytes(report.stage2_bytes)),
    ]
    pairs += [
        (Path(f.path).name, f"{human_bytes(f.bytes)}, {counted(f.tensors, 'tensor')}")
        for f in inspection.files
    ]
    if inspection.vae_file is not None:
        vae = inspection.vae_file
        pairs.append(
            (
                Path(vae.path).name,
                f"{human_bytes(vae.bytes)}, {counted(vae.tensors, 'tensor')} "
                "(VAE, loaded separately)",
            )
        )
    printer.fields(pairs)


def _verdict(printer: Printer, inspection: Inspection) -> None:
    """Clean, with what a strict load reads, or the errors it raises."""
    report = inspection.report
    problems = inspection.problems
    printer.line()
    if not problems:
        kept = report.stage1_bytes if report.stage == "stage1" else report.stage2_bytes
        printer.line(
            f"clean for {report.stage}: a strict load reads "
            f"{counted(len(report.plan.native), 'tensor')} "
            f"({human_bytes(kept)})",
            style="bold green",
        )
    else:
        kinds = ", ".join(type(p).__name__ for p in problems)
        printer.line(
            f"NOT clean for {report.stage}: a strict load raises {kinds}", style="bold red"
        )
        for problem in problems:  # each with its cause and remedy, as the exception says it
            first, *rest = str(problem).splitlines()
            printer.line(f"  {type(problem).__name__}: {first}")
            for line in rest:
                printer.line(f"    {line.strip()}")


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``bagelverify inspect``."""
    parser.add_argument(
        "path",
        metavar="PATH",
        help="checkpoint folder (ema.safetensors or a sharded index), or one .safetensors file",
    )
    add_stage_argument(parser)
    parser.add_argument(
        "--config",
        metavar="DIR",
        help="folder with config.json, llm_config.json, vit_config.json (default: PATH's own)",
    )
    add_weights_argument(parser)
    add_strip_prefix_argument(parser)
    parser.add_argument(
        "--headers-only",
        action="store_true",
        help="read no tensor data: skip comparing the two position tables with regenerated ones",
    )
    parser.add_argument(
        "--limit",
        type=int,
        default=DEFAULT_LIMIT,
        metavar="N",
        help=f"keys listed per finding ({DEFAULT_LIMIT}; 0 lists all; JSON always lists all)",
    )


def run(args: argparse.Namespace) -> int:
    """Render the report; exit 0 when clean for the stage, 1 otherwise."""
    config_dir = config_folder(args.config)
    path = checkpoint_path(args.path, "PATH")
    inspection = inspect_path(
        path,
        stage=args.stage,
        config_dir=config_dir,
        weights=args.weights,
        headers_only=args.headers_only,
        strip_prefix=args.strip_prefix,
    )
    if args.json:
        print_json(inspection.as_dict())
    else:
        render(Printer(quiet=args.quiet), inspection, limit=args.limit)
    return inspection.exit_code
