"""``bagelverify demo``: the whole tool on a synthetic checkpoint, in a temporary folder.

Builds a BAGEL-7B-MoT-shaped folder (the real 1,223 + 244 keys and dtypes, widths divided by
``--scale``), then inspects it, loads it for stage 1 and stage 2, saves the stage-2 state dict
and checks the file is bit-identical to the original, converts it HF -> native -> HF by
streaming and checks that too, and runs the pattern proofs. The folder is removed afterwards,
also on an error, Ctrl-C or SIGTERM, unless ``--keep DIR`` names where to leave it.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..buckets import Bucket
from ..checkpoint import convert_checkpoint, load_bagel_checkpoint_state_dict, save_bagel_checkpoint
from ..cli import EXIT_OK, EXIT_PROBLEMS, UsageError, one_line, terminate_as_interrupt
from ..manifest import MODEL_FILE, VAE_FILE
from ..publish import visible_entries
from ..stage import STAGE_BUCKETS, Stage
from ..synthetic import DEFAULT_SCALE, make_synthetic_checkpoint
from .arguments import naming_unwritable
from .inspect import Inspection, inspect_path, render
from .render import Column, Printer, human_bytes, print_json

EXAMPLE = "bagelverify demo            # about 15 s; --keep DIR leaves the checkpoint in DIR"


@dataclass
class Step:
    """One demonstrated claim: its name, whether it held, how long it took, what was seen."""

    name: str
    ok: bool
    seconds: float
    detail: str

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "name": self.name,
            "ok": self.ok,
            "seconds": round(self.seconds, 3),
            "detail": self.detail,
        }


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(16 * 2**20):
            digest.update(block)
    return digest.hexdigest()


def _nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def _identical(original: Path, copy: Path) -> tuple[bool, str]:
    a, b = sha256(original), sha256(copy)
    if a == b:
        return True, f"bit-identical to the original (sha256 {a[:16]}...)"
    return False, f"DIFFERS from the original: sha256 {a[:16]}... vs {b[:16]}..."


class Demo:
    """Runs the steps in a work folder, recording each one."""

    def __init__(self, work: Path, scale: float, printer: Printer, *, debug: bool = False) -> None:
        self.work = work
        self.scale = scale
        self.printer = printer
        self.debug = debug
        self.steps: list[Step] = []
        self.inspection: Inspection | None = None
        self.proofs: dict[str, Any] | None = None
        self.loaded: dict[str, dict[str, torch.Tensor]] = {}

    def step(self, name: str, action: Callable[[], tuple[bool, str]]) -> None:
        """Run one step, record it and print its line; an exception fails the step only."""
        started = time.perf_counter()
        try:
            ok, detail = action()
        except Exception as error:
            if self.debug:
                raise
            ok, detail = False, f"{type(error).__name__}: {one_line(error)}"
        step = Step(name, ok, time.perf_counter() - started, detail)
        self.steps.append(step)
        mark, style = ("ok  ", "green") if ok else ("FAIL", "bold red")
        self.printer.line(f"{mark} {name:<22} {step.seconds:6.2f}s  {detail}", style=style)

    @property
    def checkpoint(self) -> Path:
        """The synthetic BAGEL folder."""
        return self.work / "bagel"

    def build(self) -> tuple[bool, str]:
        """Write the synthetic checkpoint."""
        made = make_synthetic_checkpoint(self.checkpoint, scale=self.scale, seed=0)
        vae = (self.checkpoint / VAE_FILE).stat().st_size
        return True, (
            f"{MODEL_FILE} {human_bytes(made.model_bytes)} + {VAE_FILE} {human_bytes(vae)}, "
            f"real key set, widths / {self.scale:g}, in {self.checkpoint}"
        )

    def inspect(self) -> tuple[bool, str]:
        """Header-only report for stage 2."""
        self.inspection = inspect_path(self.checkpoint, stage="stage2")
        report = self.inspection.report
        problems = self.inspection.problems
        verdict = (
            "clean"
            if not problems
            else "NOT clean: " + ", ".join(type(p).__name__ for p in problems)
        )
        return not problems, (
            f"{len(report.tensors):,} tensors from the header only; {verdict} for stage 2"
        )

    def load(self, stage: Stage) -> tuple[bool, str]:
        """Load a stage; check it holds exactly the stage's buckets (stage 2: and stage 1's
        tensors, equal)."""
        if self.inspection is None:
            raise RuntimeError("the inspect step did not run")
        report = self.inspection.report
        plan = report.plan
        native = {b: {plan.native[k] for k in plan.buckets[b]} for b in STAGE_BUCKETS["stage2"]}
        state = load_bagel_checkpoint_state_dict(self.checkpoint, stage=stage)
        self.loaded[stage] = state
        expected = set().union(*(native[bucket] for bucket in STAGE_BUCKETS[stage]))
        gen = len(native[Bucket.GEN] & set(state))
        ok = set(state) == expected
        total = sum(s.nbytes for s in report.buckets.values())
        share = 100 * _nbytes(state) / total if total else 0.0
        detail = (
            f"{len(state):,} tensors under 'model.', {human_bytes(_nbytes(state))} "
            f"({share:.0f}% of the bytes), {gen} GEN"
        )
        if not ok:
            return False, detail + "; the key set differs from the report's plan"
        first = self.loaded.get("stage1")
        if stage == "stage2" and first is not None:
            same = all(torch.equal(tensor, state[key]) for key, tensor in first.items())
            detail += "; stage-1 tensors equal" if same else "; stage-1 tensors DIFFER"
            ok = same
        return ok, detail

    def save_round_trip(self) -> tuple[bool, str]:
        """Save the stage-2 state dict and compare the written file with the original."""
        out = self.work / "resaved"
        assert self.inspection is not None
        save_bagel_checkpoint(
            self.loaded["stage2"], out, stage=2, config=self.inspection.report.config
        )
        return _identical(self.checkpoint / MODEL_FILE, out / MODEL_FILE)

    def convert_round_trip(self) -> tuple[bool, str]:
        """Stream HF -> native -> HF and compare the result with the original."""
        native, back = self.work / "native", self.work / "hf-again"
        convert_checkpoint(self.checkpoint, native, stage=2, keys="native")
        convert_checkpoint(native, back, stage=2, keys="hf")
        ok, detail = _identical(self.checkpoint / MODEL_FILE, back / MODEL_FILE)
        return ok, "HF -> native -> HF, " + detail

    def prove(self) -> tuple[bool, str]:
        """The pattern-language proofs, if the verify module is available."""
        try:
            from ..verify import check_patterns
        except ImportError as error:
            return True, f"skipped: bagelverify.verify is not importable ({error})"
        report = check_patterns()
        self.proofs = report.to_json()
        engines = sorted({o.engine for o in report.obligations})
        results = [o.result for o in report.obligations]
        summary = ", ".join(f"{results.count(r)} {r}" for r in sorted(set(results)))
        failed = ", ".join(f"{o.name} [{o.engine}]" for o in report.failures)
        return report.ok, (
            f"{len(results)} obligations ({summary}) by {' + '.join(engines)}"
            + (f"; FAILED: {failed}" if failed else "")
        )


_terminate_as_interrupt = terminate_as_interrupt  # the demo's name since it began


def _work_folder(keep: str | None) -> Path:
    if keep is None:
        return Path(tempfile.mkdtemp(prefix="bagelverify-demo-"))
    folder = Path(keep)
    if folder.exists() and visible_entries(folder):  # a killed demo's own leftovers do not count
        raise FileExistsError(f"--keep {folder}: the folder is not empty; name a new one")
    folder.mkdir(parents=True, exist_ok=True)
    os.rmdir(tempfile.mkdtemp(dir=folder))  # fails now, not in the first step, if read-only
    return folder


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``bagelverify demo``."""
    parser.add_argument(
        "--keep",
        metavar="DIR",
        help="write the demo folders into DIR (new or empty) and leave them there",
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=DEFAULT_SCALE,
        help=f"divide every width by this (default {DEFAULT_SCALE}; 64 is quicker, 1 is the "
        "full 29 GB model)",
    )


def run(args: argparse.Namespace) -> int:
    """Run every step; exit 0 when every claim held, 1 otherwise."""
    if not args.scale >= 1:
        raise UsageError(f"--scale must be at least 1 (1: the full model), got {args.scale:g}")
    printer = Printer(quiet=args.quiet or args.json)
    started = time.perf_counter()
    with _terminate_as_interrupt():
        keep = Path(args.keep) if args.keep is not None else None
        with naming_unwritable(keep or Path.cwd(), "choose another --keep DIR"):
            work = _work_folder(args.keep)
        try:
            demo = Demo(work, args.scale, printer, debug=args.debug)
            printer.line("bagelverify demo: a synthetic BAGEL-7B-MoT checkpoint, end to end")
            printer.line()
            demo.step("build checkpoint", demo.build)
            demo.step("inspect (stage 2)", demo.inspect)
            if demo.inspection is not None:
                render(printer, demo.inspection, limit=5)
                printer.line()
            demo.step("stage-1 load", lambda: demo.load("stage1"))
            demo.step("stage-2 load", lambda: demo.load("stage2"))
            demo.step("save round trip", demo.save_round_trip)
            demo.step("convert round trip", demo.convert_round_trip)
            demo.step("pattern proofs", demo.prove)
        finally:
            if args.keep is None:
                shutil.rmtree(work, ignore_errors=True)
    ok = all(step.ok for step in demo.steps)
    seconds = time.perf_counter() - started
    if args.json:
        print_json(
            {
                "command": "demo",
                "scale": args.scale,
                "kept": None if args.keep is None else str(work),
                "steps": [step.as_dict() for step in demo.steps],
                "inspect": None if demo.inspection is None else demo.inspection.as_dict(),
                "proofs": demo.proofs,
            }
        )
        return EXIT_OK if ok else EXIT_PROBLEMS
    if demo.proofs is not None:
        printer.table(
            "Pattern proofs (bagelverify verify prints the full certificate)",
            [Column("obligation"), Column("engine"), Column("result"), Column("statement")],
            [
                [o["name"], o["engine"], o["result"], o["statement"]]
                for o in demo.proofs["obligations"]
            ],
        )
        printer.line()
    where = f"kept in {work}" if args.keep else "temporary folder removed"
    held = sum(step.ok for step in demo.steps)
    verdict = f"{held} of {len(demo.steps)} claims held"
    printer.line(f"{verdict} in {seconds:.1f}s ({where})", style="bold green" if ok else "bold red")
    return EXIT_OK if ok else EXIT_PROBLEMS
