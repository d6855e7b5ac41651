"""``bagelverify lora check|merge``: LoRA adapters against BAGEL's layout.

``check ADAPTER [--base CKPT]`` reports, per ``target_modules`` entry, how many modules of each
family it binds in UND and in GEN (exit 1 on an error: a target binding nothing, factors that
do not fit); ``merge BASE ADAPTER -o OUT [--dry-run]`` writes ``W + s*B@A`` into a copy of the
base, one tensor at a time.
"""

from __future__ import annotations

import argparse

from ..cli import EXIT_OK, EXIT_PROBLEMS
from ..lora import AdapterReport, check_adapter, merge_adapter
from .arguments import add_weights_argument, checkpoint_path
from .render import Printer, print_json

LISTED_TARGETS = 20
"""Targets listed one by one in the text report (Automodel lists every module it wrapped)."""

EXAMPLE = "bagelverify lora check ./my-adapter --base /ckpt/BAGEL-7B-MoT"


def _shared(parser: argparse.ArgumentParser) -> None:
    # also accepted after the action (`lora check X --json`); SUPPRESS keeps `lora --json check X`
    parser.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print one JSON document"
    )
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print nothing but errors",
    )


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``bagelverify lora``."""
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    check = actions.add_parser("check", help="check where an adapter binds (UND and GEN twins)")
    check.add_argument("adapter", metavar="ADAPTER", help="PEFT adapter folder")
    check.add_argument("--base", metavar="CKPT", help="base checkpoint to check shapes against")
    _shared(check)
    add_weights_argument(check)
    merge = actions.add_parser("merge", help="merge an adapter into a base checkpoint")
    merge.add_argument("base", metavar="BASE", help="base checkpoint folder")
    merge.add_argument("adapter", metavar="ADAPTER", help="PEFT adapter folder")
    merge.add_argument("-o", "--out", required=True, metavar="OUT", help="folder to write")
    merge.add_argument("--dry-run", action="store_true", help="check and print the plan only")
    merge.add_argument("--overwrite", action="store_true", help="replace a checkpoint in OUT")
    _shared(merge)
    add_weights_argument(merge)


def render_check(printer: Printer, report: AdapterReport) -> None:
    """The human-readable check report."""
    settings = report.settings
    printer.line(f"adapter: {report.adapter}" + (f" (base {report.base})" if report.base else ""))
    printer.line(
        f"r={settings.r} lora_alpha={settings.lora_alpha:g} scale={settings.scale:g}"
        f"{' (rsLoRA)' if settings.use_rslora else ''}, {report.modules} adapted modules"
    )
    printer.heading("Modules bound, per family")
    for line in report.total.summary():
        printer.line(f"  {line}")
    if len(report.bindings) > LISTED_TARGETS:
        printer.line(f"({len(report.bindings)} targets; --json lists each one's binds)")
    else:
        printer.heading("Binds per target")
        for binding in report.bindings:
            lines = binding.summary() or ["binds nothing"]
            printer.line(f"  {binding.target}: " + "; ".join(lines))
    for warning in report.warnings:
        printer.line(f"warning: {warning}", style="yellow")
    for error in report.errors:
        printer.line(f"error: {error}", style="red")
    printer.line("ok" if report.ok else "problems found", style="green" if report.ok else "red")


def run(args: argparse.Namespace) -> int:
    """Check or merge; exit 1 when the check finds errors."""
    as_json, quiet = getattr(args, "json", False), getattr(args, "quiet", False)
    if args.action == "check":
        if args.base is not None:
            checkpoint_path(args.base, "--base")
        report = check_adapter(args.adapter, args.base, weights=args.weights)
        code = EXIT_OK if report.ok else EXIT_PROBLEMS
        if as_json:
            print_json({"command": "lora check", **report.as_dict()})
        else:
            render_check(Printer(quiet=quiet), report)
        return code
    checkpoint_path(args.base, "BASE")
    plan = merge_adapter(
        args.base,
        args.adapter,
        args.out,
        dry_run=args.dry_run,
        weights=args.weights,
        overwrite=args.overwrite,
    )
    if as_json:
        print_json({"command": "lora merge", "dry_run": args.dry_run, **plan.as_dict()})
    else:
        printer = Printer(quiet=quiet)
        verb = "would merge" if args.dry_run else "merged"
        printer.line(f"{verb} {len(plan.weights)} weights (scale {plan.scale:g}) into {plan.out}")
        for weight in plan.weights:
            printer.line(f"  {weight}")
    return EXIT_OK
