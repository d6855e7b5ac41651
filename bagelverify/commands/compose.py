"""``bagelverify compose --llm DIR --vit DIR -o OUT``: a BAGEL initialisation from its backbones.

Reads a Qwen2 and a SigLIP Hugging Face folder, checks every key and shape against the BAGEL
layout, and writes ``ema.safetensors`` with the three config files (stage 2: UND and GEN), one
tensor at a time. ``--dry-run`` prints the plan and writes nothing.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from ..cli import EXIT_OK
from ..compose import ComposeReport, compose_checkpoint
from .render import Printer, byte_progress, human_bytes, print_json

EXAMPLE = "bagelverify compose --llm ./Qwen2.5-7B --vit ./siglip-so400m-14-980 -o ./bagel-init"

DESCRIBED = {
    "llm": "copied from the Qwen2 folder",
    "vit": "copied from the SigLIP folder",
    "twin": "GEN twins: copies of their UND tensor",
    "ones": "QK norms: ones",
    "zeros": "llm2vae: zeros",
    "sincos": "position tables: regenerated",
    "seeded": "connector, time embedder, vae2llm: seeded",
}
"""Origin kind -> how the text report names it."""


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``bagelverify compose``."""
    parser.add_argument("--llm", required=True, metavar="DIR", help="Qwen2 Hugging Face folder")
    parser.add_argument(
        "--vit",
        required=True,
        metavar="DIR",
        help="SigLIP Hugging Face folder (vision-only SiglipVisionModel or a full SiglipModel)",
    )
    parser.add_argument("-o", "--out", required=True, metavar="OUT", help="folder to write")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the connector/time-embedder init (0)"
    )
    parser.add_argument(
        "--dtype",
        choices=("bf16", "f16", "f32"),
        help="dtype of the tensors no backbone holds (default: the Qwen2 embeddings' dtype); "
        "backbone tensors keep theirs",
    )
    parser.add_argument(
        "--config",
        metavar="DIR",
        help="BAGEL folder whose config files the backbones must match (default: their own "
        "sizes, BAGEL's own fields at BAGEL-7B-MoT's values)",
    )
    parser.add_argument("--dry-run", action="store_true", help="check and print the plan only")
    parser.add_argument("--overwrite", action="store_true", help="replace a checkpoint in OUT")


def render(printer: Printer, report: ComposeReport) -> None:
    """The human-readable report: origins and drops counted, then the files."""
    verb = "would compose" if report.dry_run else "composed"
    printer.line(
        f"{verb} {len(report.origins):,} tensors ({human_bytes(report.bytes)}) into {report.out}"
    )
    printer.heading("Where the tensors come from")
    for kind, count in report.counts().items():
        printer.line(f"  {count:>6,}  {DESCRIBED.get(kind, kind)}")
    if report.dropped:
        printer.heading("Backbone tensors not used")
        for reason, count in report.dropped_counts().items():
            printer.line(f"  {count:>6,}  {reason}")
    if report.defaulted:
        printer.line(f"config.json fields left out, Hugging Face defaults used: {report.defaulted}")
    for name in report.files:
        printer.line(f"wrote {name}")
    printer.line(f"seed {report.seed}, created tensors {report.dtype}; --json lists every origin")


def run(args: argparse.Namespace) -> int:
    """Compose (or plan) and report."""

    def compose(dry_run: bool, advance: Callable[[int], None] | None = None) -> ComposeReport:
        return compose_checkpoint(
            llm=args.llm,
            vit=args.vit,
            out=args.out,
            config=args.config,
            seed=args.seed,
            dtype=args.dtype,
            dry_run=dry_run,
            overwrite=args.overwrite,
            on_tensor=None if advance is None else lambda _, nbytes: advance(nbytes),
        )

    report = compose(dry_run=True)  # headers only: every check, and the bytes to write
    if not args.dry_run:
        with byte_progress(report.bytes, "compose", quiet=args.quiet or args.json) as advance:
            report = compose(dry_run=False, advance=advance)
    if args.json:
        print_json({"command": "compose", **report.as_dict()})
    else:
        render(Printer(quiet=args.quiet), report)
    return EXIT_OK
