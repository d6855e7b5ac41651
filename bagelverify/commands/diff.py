"""``bagelverify diff A B``: which tensors two checkpoints hold differently, and by how much.

Headers first (keys only in A or only in B, shape or dtype changes), then the values, streamed
piece by piece (:func:`bagelverify.diff.diff_checkpoints`): per key family, how many tensors
differ and the largest absolute and relative difference; identical families are named.
Exit code 0 when the checkpoints are identical, 1 when anything differs.
"""

from __future__ import annotations

import argparse
import math

from ..checkpoint import open_weights
from ..cli import EXIT_OK, EXIT_PROBLEMS
from ..diff import CheckpointDiff, compare_headers, diff_checkpoints
from ..errors import counted
from .arguments import add_weights_argument, checkpoint_path
from .inspect import shown_key
from .render import Column, Printer, byte_progress, print_json

EXAMPLE = "bagelverify diff /ckpt/BAGEL-7B-MoT /ckpt/my-finetune --limit 20"


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``bagelverify diff``."""
    parser.add_argument("a", metavar="A", help="checkpoint folder or .safetensors file")
    parser.add_argument("b", metavar="B", help="checkpoint folder or .safetensors file")
    parser.add_argument(
        "--keys-only",
        action="store_true",
        help="compare the headers only (keys, shapes, dtypes); no tensor data is read",
    )
    parser.add_argument(
        "--limit",
        type=int,
        default=10,
        metavar="N",
        help="keys listed per item (differing tensors per family; 0 lists all)",
    )
    add_weights_argument(parser)


def _number(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.3g}"


def _listed(printer: Printer, keys: list[str], limit: int) -> None:
    """Up to ``limit`` keys (0: all), escaped, then how many more there are."""
    shown = keys if limit <= 0 else keys[:limit]
    for key in shown:
        printer.line(f"    {shown_key(key)}")
    if len(shown) < len(keys):
        printer.line(f"    ... and {len(keys) - len(shown)} more")


def render(printer: Printer, diff: CheckpointDiff, limit: int) -> None:
    """The human-readable report."""
    printer.line(f"A: {diff.a}")
    printer.line(f"B: {diff.b}")
    printer.heading("Headers")
    for title, keys in (("only in A", diff.only_in_a), ("only in B", diff.only_in_b)):
        printer.line(f"  {title}: {len(keys)}")
        _listed(printer, keys, limit)
    printer.line(f"  shape/dtype changes: {len(diff.header_changes)}")
    for change in diff.header_changes[:limit]:
        printer.line(
            f"    {shown_key(change.key)}: {change.a_dtype} {list(change.a_shape)} -> "
            f"{change.b_dtype} {list(change.b_shape)}"
        )
    if not diff.values_compared:
        printer.line("  (--keys-only: values not compared)")
        return
    rows = [
        [
            name,
            str(family.tensors),
            str(len(family.differing)),
            _number(family.max_abs_diff) if family.differing else "-",
            _number(family.max_rel_diff) if family.differing else "-",
        ]
        for name, family in diff.families.items()
        if family.differing
    ]
    columns = [
        Column("family"),
        Column("tensors", True),
        Column("differ", True),
        Column("max abs", True),
        Column("max rel", True),
    ]
    if rows:
        printer.table("Values that differ, by family", columns, rows)
        printer.heading(f"Tensors that differ (up to {limit} per family; --limit N)")
        for name, family in diff.families.items():
            if family.differing:
                printer.line(f"  {name} ({len(family.differing)})")
                _listed(printer, family.differing, limit)
    identical = diff.identical_families
    printer.heading(f"Identical families ({len(identical)})")
    if identical:
        printer.line("  " + ", ".join(identical))
    printer.line()
    if diff.empty:
        printer.line("identical", style="green")
    else:
        changed = len(diff.changed_keys)
        verb = "differs" if changed == 1 else "differ"
        printer.line(f"{counted(changed, 'key')} {verb}", style="yellow")


def run(args: argparse.Namespace) -> int:
    """Compare; exit 1 when anything differs."""
    checkpoint_path(args.a, "A")
    checkpoint_path(args.b, "B")
    total = 0
    if not args.keys_only:
        left, right = open_weights(args.a, args.weights), open_weights(args.b, args.weights)
        pairs = compare_headers(left, right)[3]
        total = sum(a.nbytes + b.nbytes for _, a, b in pairs)
    quiet = args.quiet or args.json or args.keys_only
    with byte_progress(total, "diff", quiet=quiet) as advance:
        diff = diff_checkpoints(
            args.a,
            args.b,
            keys_only=args.keys_only,
            weights_a=args.weights,
            weights_b=args.weights,
            on_tensor=lambda _, nbytes: advance(nbytes),
        )
    code = EXIT_OK if diff.empty else EXIT_PROBLEMS
    if args.json:
        print_json({"command": "diff", **diff.as_dict()})
    else:
        render(Printer(quiet=args.quiet), diff, args.limit)
    return code
