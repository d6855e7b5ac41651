"""``bagelverify repair SRC --base BASE -o OUT``: fill the keys SRC lacks from BASE.

Checks both sides from their headers, then streams one tensor at a time
(:func:`bagelverify.repair.repair_checkpoint`); ``--dry-run`` prints the plan only.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

from ..checkpoint import WEIGHTS_CHOICES
from ..cli import add_stage_argument
from ..errors import counted
from ..repair import RepairReport, repair_checkpoint
from .arguments import (
    add_weights_argument,
    checkpoint_path,
    config_folder,
    naming_unwritable,
    shard_size,
)
from .render import Column, Printer, byte_progress, human_bytes, print_json

EXAMPLE = "bagelverify repair /ckpt/my-finetune --base /ckpt/BAGEL-7B-MoT -o /ckpt/repaired"


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``bagelverify repair``."""
    parser.add_argument("src", metavar="SRC", help="checkpoint folder with missing keys")
    parser.add_argument("--base", required=True, metavar="BASE", help="complete checkpoint")
    parser.add_argument("-o", "--out", required=True, metavar="OUT", help="new folder to write")
    add_stage_argument(parser)
    parser.add_argument(
        "--config", metavar="DIR", help="config folder (default: SRC's, else BASE's)"
    )
    parser.add_argument(
        "--max-shard-size", type=shard_size, metavar="SIZE", help="write shards of at most SIZE"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the plan; write nothing")
    parser.add_argument(
        "--allow-lossy",
        action="store_true",
        help="round BASE tensors of a wider dtype (F32) to SRC's (BF16) instead of refusing",
    )
    add_weights_argument(parser)
    parser.add_argument(
        "--base-weights", choices=WEIGHTS_CHOICES, help="--weights for BASE (default: its ema)"
    )


def render(printer: Printer, report: RepairReport) -> None:
    """The families filled from BASE (the others came whole from SRC), then the totals."""
    rows = [
        [name, str(report.from_source.get(name, 0)), str(len(keys))]
        for name, keys in report.from_base.items()
        if keys
    ]
    columns = [Column("family"), Column("from SRC", True), Column("from BASE", True)]
    if rows:
        printer.table("Families filled from BASE", columns, rows)
    else:
        printer.line(f"nothing to fill: SRC holds every key {report.stage} expects")
    printer.line()
    verb = "would write" if report.dry_run else "wrote"
    printer.line(
        f"{verb} {report.out}: {counted(sum(report.from_source.values()), 'tensor')} "
        f"({human_bytes(report.bytes_from_source)}) from {report.source}, "
        f"{len(report.filled)} ({human_bytes(report.bytes_from_base)}) from {report.base}",
        style="green",
    )
    if report.cast:
        lossy = f", {len(report.narrowed)} with rounding" if report.narrowed else ""
        printer.line(
            f"  {counted(len(report.cast), 'tensor')} from BASE cast to {report.dtype}{lossy}"
        )
    if report.vae_from:
        printer.line(f"  ae.safetensors from {report.vae_from}")


def run(args: argparse.Namespace) -> int:
    """Repair (or plan it); print which families came from where."""
    repair = functools.partial(
        repair_checkpoint,
        checkpoint_path(args.src, "SRC"),
        base=checkpoint_path(args.base, "--base"),
        out=args.out,
        stage=args.stage,
        config=config_folder(args.config),
        weights=args.weights,
        base_weights=args.base_weights,
        max_shard_size=args.max_shard_size,
        allow_lossy=args.allow_lossy,
    )
    plan = repair(dry_run=True)
    if not args.dry_run:
        total = plan.bytes_from_source + plan.bytes_from_base
        with (
            naming_unwritable(Path(args.out), "choose another -o OUT"),
            byte_progress(total, "repair", quiet=args.quiet or args.json) as advance,
        ):
            report = repair(on_tensor=lambda _, nbytes: advance(nbytes))
    else:
        report = plan
    if args.json:
        files = [{"path": p, "bytes": Path(p).stat().st_size} for p in report.files]
        print_json({"command": "repair", **report.as_dict(), "files": files})
    else:
        render(Printer(quiet=args.quiet), report)
    return 0
