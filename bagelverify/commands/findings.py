"""The findings of a checkpoint report, as one table that the ``inspect`` output reads.

Each :class:`Finding` says how to count one kind of finding on a
:class:`~bagelverify.checkpoint.CheckpointReport`, the field of ``report.as_dict()`` (the
``inspect --json`` document) that holds it, and how to list it for a person.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..buckets import Bucket
from ..checkpoint import CheckpointReport


def shown_key(key: str) -> str:
    """A key as printed: escaped (``ascii``) unless it is plain printable ASCII, so a key with
    a newline, a terminal control code or a look-alike Unicode digit cannot pass for another."""
    return key if key.isascii() and key.isprintable() else ascii(key)


@dataclass(frozen=True)
class Finding:
    """One kind of finding: its name in the checks, its listing, and where the JSON holds it."""

    label: str
    """Its row in the ``Checks`` table."""
    title: str
    """The heading of its listing."""
    json_key: str
    """The field of ``CheckpointReport.as_dict()`` that holds it."""
    count: Callable[[CheckpointReport], int]
    lines: Callable[[CheckpointReport], list[str]]
    """One printed line per listed item, keys escaped by :func:`shown_key`."""
    unchecked: str | None = None
    """The row's text when the report has nothing to check against (``None``: always checked)."""
    needs_config: bool = True
    """Whether checking needs a config (else expected keys, which the manifest can supply)."""
    heading_count: Callable[[CheckpointReport], str] | None = None
    """The count in the heading, when it is not the number of lines."""

    def row(self, report: CheckpointReport) -> str:
        """The ``Checks`` table's value: the count, or why there is none."""
        available = report.config is not None if self.needs_config else report.expected_from
        if self.unchecked is not None and not available:
            return self.unchecked
        return str(self.count(report))

    def heading(self, report: CheckpointReport, lines: list[str]) -> str:
        """The listing's heading with its count."""
        count = self.heading_count(report) if self.heading_count else str(len(lines))
        return f"{self.title} ({count})"


def _vae_merged(report: CheckpointReport) -> list[str]:
    return list(report.plan.buckets[Bucket.VAE])


def _quantized(report: CheckpointReport) -> dict[str, str]:
    """Key -> dtype of the FP8 tensors and quantization tensors."""
    found = report.quantized
    return {} if found is None else {**found.codes, **found.scales}


FINDINGS: tuple[Finding, ...] = (
    Finding(
        "unknown keys",
        "Unknown keys",
        "unknown",
        lambda r: len(r.plan.unknown),
        lambda r: [shown_key(key) for key in r.plan.unknown],
    ),
    Finding(
        "quantized tensors (FP8, scales)",
        "Quantized tensors: FP8 codes and quantization tensors (dequantize first)",
        "quantized",
        lambda r: len(_quantized(r)),
        lambda r: [f"{shown_key(key)}  ({dtype})" for key, dtype in _quantized(r).items()],
    ),
    Finding(
        "missing expected keys",
        "Missing expected keys",
        "missing",
        lambda r: len(r.missing_keys),
        lambda r: r.missing_summary(),
        unchecked="not checked",
        needs_config=False,
        heading_count=lambda r: f"{len(r.missing_keys)} in {len(r.missing)} families",
    ),
    Finding(
        "GEN keys without UND twin",
        "GEN keys whose UND twin is absent",
        "twin_violations",
        lambda r: len(r.plan.twin_violations),
        lambda r: [
            f"{shown_key(gen)}  (needs {shown_key(und)})" for gen, und in r.plan.twin_violations
        ],
    ),
    Finding(
        "shape mismatches",
        "Shape mismatches against the config",
        "shape_mismatches",
        lambda r: len(r.shape_mismatches),
        lambda r: [
            f"{shown_key(m.key)}: expected {list(m.expected)}, found {list(m.found)}"
            for m in r.shape_mismatches
        ],
        unchecked="not checked",
    ),
    Finding(
        "keys beyond the config",
        "Keys a model with this config does not have",
        "beyond_config",
        lambda r: len(r.beyond_config),
        lambda r: [shown_key(key) for key in r.beyond_config],
        unchecked="n/a",
    ),
    Finding(
        "keys both rooted and unrooted",
        "Keys both rooted and unrooted",
        "collisions",
        lambda r: len(r.plan.collisions),
        lambda r: [f"{shown_key(a)} / {shown_key(b)}" for a, b in r.plan.collisions],
    ),
    Finding(
        "VAE keys merged into the model file",
        "VAE keys merged into the model file (dropped on load)",
        "vae_keys_in_model_file",
        lambda r: len(_vae_merged(r)),
        lambda r: [shown_key(key) for key in _vae_merged(r)],
    ),
)
"""Every finding, in the order the ``inspect`` output shows them."""
