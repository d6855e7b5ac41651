"""``bagelverify export STEP_DIR -o OUT``: an Automodel step folder as the released BAGEL layout.

Reads ``model/`` (DCP or Automodel's safetensors format) and ``ema/`` of the step folder, one
tensor at a time (:func:`bagelverify.export.export_checkpoint`); ``--dry-run`` prints what would
be written and from where.
"""

from __future__ import annotations

import argparse

from ..cli import EXIT_OK
from ..export import ExportReport, export_checkpoint
from .arguments import config_folder, shard_size
from .render import Column, Printer, human_bytes, print_json

EXAMPLE = "bagelverify export ckpt/epoch_0_step_1000 -o export"


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``bagelverify export``."""
    parser.add_argument("step_dir", metavar="STEP_DIR", help="Automodel step folder")
    parser.add_argument("-o", "--out", required=True, metavar="OUT", help="folder to write")
    parser.add_argument(
        "--weights",
        choices=("ema", "model", "both"),
        default="ema",
        help="ema: ema.safetensors (EMA, frozen tensors from the model; the default); "
        "model: model.safetensors; both: the two files",
    )
    parser.add_argument(
        "--dtype",
        choices=("bf16", "f32", "keep"),
        default="bf16",
        help="dtype of the written floating tensors (default bf16, the release's: F32 master "
        "weights are rounded)",
    )
    parser.add_argument(
        "--max-shard-size", type=shard_size, metavar="SIZE", help="write shards of at most SIZE"
    )
    parser.add_argument(
        "--config", metavar="DIR", help="BAGEL config folder (default: the step folder's)"
    )
    parser.add_argument("--vae", metavar="FILE", help="ae.safetensors (default: the step folder's)")
    parser.add_argument(
        "--allow-lossy", action="store_true", help="allow narrowing casts other than F32 to BF16"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an export in OUT")
    parser.add_argument("--dry-run", action="store_true", help="print the plan; write nothing")


def render(printer: Printer, report: ExportReport) -> None:
    """The files, where their tensors come from, the sizes, the notes."""
    rows = [
        [
            f.name,
            str(f.tensors),
            ", ".join(f"{n} from {source}" for source, n in f.sources.items()),
            human_bytes(f.bytes_before),
            human_bytes(f.bytes_after),
        ]
        for f in report.files
    ]
    columns = [
        Column("file"),
        Column("tensors", True),
        Column("from"),
        Column("stored", True),
        Column("written", True),
    ]
    printer.table(f"{report.step_dir} ({report.stage}, {report.dtype})", columns, rows)
    printer.line(f"model: {report.model}; EMA: {report.ema or 'none'}")
    printer.line(f"config: {report.config}; VAE: {report.vae or 'none'}")
    printer.line(f"with: {', '.join(report.other_files)}")
    for note in report.notes():
        printer.line(f"  {note}")
    verb = "would write" if report.dry_run else "wrote"
    printer.line(
        f"{verb} {report.out}: {human_bytes(report.bytes_before)} -> "
        f"{human_bytes(report.bytes_after)}",
        style="green",
    )


def run(args: argparse.Namespace) -> int:
    """Export (or plan it) and print the report."""
    report = export_checkpoint(
        args.step_dir,
        args.out,
        weights=args.weights,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        dry_run=args.dry_run,
        config=config_folder(args.config),
        vae=args.vae,
        allow_lossy=args.allow_lossy,
        overwrite=args.overwrite,
    )
    if args.json:
        print_json({"command": "export", **report.as_dict()})
    else:
        render(Printer(quiet=args.quiet), report)
    return EXIT_OK
