"""The report on a checkpoint for one stage, built from its headers alone.

:func:`build_report` runs the adapter's key plan over a tensor list, compares every kept shape
with the family table's for a config, and collects the expected keys that are absent;
:meth:`CheckpointReport.problems` turns its findings into the errors a load raises.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch

from ..buckets import Bucket
from ..config import CONFIG_FILES, DERIVED_FROM, BagelConfig, ConfigLike, field_source
from ..errors import (
    BagelError,
    ConfigError,
    MissingKeysError,
    ShapeMismatchError,
    UnknownKeysError,
    agree,
    counted,
    format_examples,
)
from ..families import FAMILIES, FAMILY_BY_NAME, family_of
from ..keys import strip_root
from ..manifest import MODEL_FILE, VAE_FILE, load_manifest
from ..partition import classify
from ..patch_embedding import PATCH_EMBEDDING_WEIGHT
from ..plan import Plan, describe_prefix, plan, shared_prefix, strip_prefix_advice, without_prefix
from ..quantized import Quantization, find_quantization
from ..safetensors_io import TensorInfo, TensorSpec, dtype_name, read_header
from ..stage import STAGE_BUCKETS, Stage, StageLike
from .files import CheckpointFiles, Weights, find_config, open_checkpoint

logger = logging.getLogger(__name__)

CONVERT_FLAG = "convert_conv_patch_embedding"
"""Name of the loader flag that converts a Conv2d patch-embedding weight."""


class ShapeMismatch(NamedTuple):
    """A tensor whose shape differs from the expected one."""

    key: str
    expected: tuple[int, ...]
    found: tuple[int, ...]


@dataclass
class BucketSummary:
    """Count, bytes and dtypes (name -> count) of a checkpoint's tensors in one bucket."""

    count: int = 0
    nbytes: int = 0
    dtypes: Counter[str] = field(default_factory=Counter)


TensorLike = TensorInfo | TensorSpec

ExpectedFrom = Literal["config", "manifest"] | None
"""Where a report's expected key list came from: the config, the shipped BAGEL-7B-MoT manifest
(key set only, no shapes), or nowhere (only the key checks ran)."""

MISMATCH_EXAMPLES = 3
"""How many mismatching tensors a shape-mismatch message shows, each of another family."""


@dataclass
class CheckpointReport:
    """Everything known about a checkpoint for one stage, from its headers only.

    Built by :func:`build_report`; :func:`inspect_checkpoint` builds it for a folder, the
    loaders use it to decide what to read, and the ``inspect`` command renders it.
    """

    source: str
    stage: Stage
    config: BagelConfig | None
    tensors: Mapping[str, TensorLike]
    """Every tensor of the checkpoint, by checkpoint key."""
    plan: Plan
    buckets: dict[Bucket, BucketSummary]
    missing: dict[str, list[str]]
    """Family name -> expected HF keys the stage keeps that are absent (needs a config)."""
    shape_mismatches: list[ShapeMismatch]
    """Kept tensors whose shape differs from the config's (checkpoint keys)."""
    beyond_config: list[str]
    """Kept keys of known families that a model with this config does not have (e.g. layer 40)."""
    conv_patch_embedding: str | None
    """Checkpoint key of a patch-embedding weight stored as a 4-D Conv2d weight, if any."""
    expected_from: ExpectedFrom = None
    """Source of ``missing``'s expected keys: ``"config"``, ``"manifest"`` (no config; the
    checkpoint looks like BAGEL-7B-MoT, so the shipped key list stands in) or ``None``."""
    weights: str | None = None
    """Which weights file of the folder was read and why (``None`` for a state dict)."""
    quantized: Quantization | None = None
    """The checkpoint's quantization tensors (``weight_scale``, ...) and FP8 tensors, when it
    has quantization tensors: a quantized checkpoint, which no load, conversion or repair reads
    as weights."""
    vae_file_holds_model: str | None = None
    """The folder's ``ae.safetensors`` when it holds model (UND/GEN) keys while the model file
    holds only VAE keys: the two files are swapped (set by :func:`check_swapped_vae`)."""

    @property
    def holds_vae_only(self) -> bool:
        """The model file holds VAE keys and no UND or GEN key (``ae.safetensors``' content)."""
        counts = {bucket: summary.count for bucket, summary in self.buckets.items()}
        return counts[Bucket.VAE] > 0 and counts[Bucket.UND] == counts[Bucket.GEN] == 0

    @property
    def retained(self) -> dict[str, TensorLike]:
        """Native key -> tensor, for the tensors the stage keeps, in checkpoint order."""
        return {native: self.tensors[key] for key, native in self.plan.native.items()}

    @property
    def stage1_bytes(self) -> int:
        """Bytes a stage-1 load reads (UND)."""
        return self.buckets[Bucket.UND].nbytes

    @property
    def stage2_bytes(self) -> int:
        """Bytes a stage-2 load reads (UND + GEN)."""
        return self.buckets[Bucket.UND].nbytes + self.buckets[Bucket.GEN].nbytes

    @property
    def missing_keys(self) -> list[str]:
        """Every missing expected key, family by family."""
        return [key for keys in self.missing.values() for key in keys]

    def missing_summary(self) -> list[str]:
        """One line per family with missing keys: ``vit.fc1: 52 keys missing (layers 0-25)``."""
        lines = []
        for name, keys in self.missing.items():
            family = FAMILY_BY_NAME[name]
            layers = sorted({n for k in keys if (n := family.layer_of(k)) is not None})
            where = f"layers {_ranges(layers)}" if layers else ", ".join(keys)
            lines.append(f"{name}: {counted(len(keys), 'key')} missing ({where})")
        return lines

    def emptiness(self, verb: str = "load") -> MissingKeysError | None:
        """The error for a checkpoint (or state dict) without the tensors its stage is made of:
        no UND tensor, or for stage 2 no GEN tensor. Strict or not, reading or writing such a
        checkpoint is never a success (``strict=False`` may drop unknown keys, never all)."""
        absent = [b for b in STAGE_BUCKETS[self.stage] if self.buckets[b].count == 0]
        if not absent:
            return None
        what = "the state dict" if verb == "save" else "the checkpoint"
        total = len(self.tensors)
        if len(absent) == len(STAGE_BUCKETS[self.stage]):
            if total == 0:
                head = f"{what} holds no tensor at all: there is nothing to {verb} for {self.stage}"
            else:
                held = ", ".join(
                    counted(s.count, f"{bucket} tensor")
                    for bucket, s in self.buckets.items()
                    if s.count
                )
                head = (
                    f"none of the {counted(total, 'tensor')} of {what} is a BAGEL weight that "
                    f"{self.stage} keeps (it holds {held})"
                )
            prefix = shared_prefix(self.plan.unknown)
            if prefix is not None:
                advice = (
                    f"Every unknown key starts with {describe_prefix(prefix)}; without it they "
                    f"are BAGEL keys: {strip_prefix_advice(prefix)}."
                )
            elif total == 0 and verb == "save":
                advice = "Pass the model's state dict (model.state_dict(), keys under 'model.')."
            else:
                advice = (
                    "Is this a BAGEL-7B-MoT checkpoint (ema.safetensors, HF or model.-rooted keys)?"
                )
            message = f"{head}. A {verb} of nothing is refused, strict or not. {advice}"
        elif absent == [Bucket.GEN]:
            message = (
                f"{self.stage} keeps the generation weights (GEN: the *_moe_gen twins, "
                "time_embedder, vae2llm, llm2vae, latent_pos_embed), and none of the "
                f"{counted(total, 'tensor')} of {what} is one (it holds "
                f"{counted(self.buckets[Bucket.UND].count, 'UND tensor')}: a stage-1 "
                f"{'state dict' if verb == 'save' else 'checkpoint'}). "
                + (
                    "Pass stage=1 (--stage 1) to save its UND weights."
                    if verb == "save"
                    else "Load it with stage=1 (--stage 1), or fill the GEN weights from a "
                    "base checkpoint: bagelverify repair SRC --base BASE -o OUT --stage 2."
                )
            )
        else:
            message = (
                f"{self.stage} keeps the understanding weights (UND: language model, vision "
                f"tower, connector), and none of the {counted(total, 'tensor')} of {what} is "
                "one. Fill them from a base checkpoint: bagelverify repair SRC --base BASE "
                "-o OUT."
            )
        return MissingKeysError(f"{self.source}: {message}", self.missing_keys)

    def problems(
        self,
        *,
        strict: bool = True,
        convert_conv: bool = False,
        verb: str = "load",
        allow_empty: bool = False,
    ) -> list[Exception]:
        """The errors a load (or, with ``verb="save"``, a save) with these settings raises, most
        fundamental first.

        A checkpoint without the tensors its stage is made of (:meth:`emptiness`) is a problem
        strict or not, unless ``allow_empty`` (the adapter, which maps the keys of whatever part
        of a state dict it is given). A quantized checkpoint is a problem even when not
        ``strict`` (its codes read as weights give a wrong model); under ``strict``, a model
        file holding only the VAE is named as such instead of its missing keys.
        """
        found: list[Exception] = []
        quantized = self.quantized
        if quantized is not None:
            found.append(quantized.error(self.source))
        if strict and self.holds_vae_only:
            found.append(self._vae_only_error())
        found += [
            problem
            for problem in self.plan.problems(strict=strict)
            # with expected keys, a missing UND twin is reported with the other missing keys
            if not (self.expected_from is not None and isinstance(problem, MissingKeysError))
            # quantization tensors are reported as such, not as keys of no family
            and not (
                quantized is not None
                and isinstance(problem, UnknownKeysError)
                and set(problem.keys) <= set(quantized.scales)
            )
        ]
        if strict and self.beyond_config:
            found.append(
                UnknownKeysError(
                    f"{self.source}: {counted(len(self.beyond_config), 'key')} "
                    f"{agree(len(self.beyond_config), 'does', 'do')} not exist in a model "
                    f"with this config: {format_examples(self.beyond_config)}. Check the config "
                    "files (layer counts) or pass strict=False to drop them.",
                    self.beyond_config,
                )
            )
        empty = None if allow_empty or (strict and self.holds_vae_only) else self.emptiness(verb)
        if empty is not None:
            found.append(empty)
        if strict and self.missing and empty is None and not self.holds_vae_only:
            count = len(self.missing_keys)
            by_manifest = self.expected_from == "manifest"
            found.append(
                MissingKeysError(
                    f"{self.source}: {self.stage} expects {counted(count, 'key')} that the "
                    "checkpoint lacks"
                    + (
                        f" (expected keys from the shipped BAGEL-7B-MoT manifest: no "
                        f"{'/'.join(CONFIG_FILES)} was found)"
                        if by_manifest
                        else ""
                    )
                    + ":\n  "
                    + "\n  ".join(self.missing_summary())
                    + (
                        "\nThe checkpoint is incomplete (or it is another model: add its config "
                        "files)"
                        if by_manifest
                        else "\nThe checkpoint is incomplete (or the config describes a bigger "
                        "model)"
                    )
                    + self._missing_advice(verb),
                    self.missing_keys,
                )
            )
        if self.shape_mismatches:
            found.append(
                ShapeMismatchError(
                    shape_mismatch_message(self.source, self.shape_mismatches, self.config),
                    self.shape_mismatches,
                )
            )
        if self.conv_patch_embedding is not None and not convert_conv:
            shape = list(self.tensors[self.conv_patch_embedding].shape)
            found.append(
                ShapeMismatchError(
                    f"{self.source}: {self.conv_patch_embedding!r} is a Conv2d weight {shape}; "
                    "BAGEL stores it as a Linear weight (out, P*P*C) flattened channel-last. "
                    f"Pass {CONVERT_FLAG}=True to convert it while loading "
                    "(bagelverify.conv_patch_weight_to_linear)."
                )
            )
        return found

    def _vae_only_error(self) -> MissingKeysError:
        """The model file holds the VAE: swapped with ``ae.safetensors``, or a copy of it."""
        vae_keys = counted(self.buckets[Bucket.VAE].count, "VAE key")
        if self.vae_file_holds_model is not None:
            detail = f"and {self.vae_file_holds_model} holds the model's keys: " + swapped(
                Path(self.source), Path(self.vae_file_holds_model)
            )
        else:
            detail = (
                f"it is a copy of {VAE_FILE}, not the model's weights. Put the model's weights "
                f"({MODEL_FILE} of the release) in its place"
            )
        return MissingKeysError(
            f"{self.source} holds the VAE ({vae_keys}, encoder./decoder.) and none of the "
            f"model's keys, {detail}; nothing was read.",
            self.missing_keys,
        )

    def _missing_advice(self, verb: str) -> str:
        """What to do about missing keys: a save of UND weights alone under the default stage 2
        is told to pass ``stage=1``."""
        gen_only = all(FAMILY_BY_NAME[name].bucket is Bucket.GEN for name in self.missing)
        if verb == "save" and self.stage == "stage2" and gen_only:
            return (
                "; the state dict has no GEN weights: pass stage=1 to save its UND weights, or "
                "strict=False to save what it has."
            )
        if verb == "save":
            return "; pass strict=False to save the rest anyway."
        return (
            f". Fill the missing tensors from a complete checkpoint of the same model: "
            f"bagelverify repair SRC --base BASE -o OUT --stage {self.stage[-1]} "
            "(bagelverify.repair.repair_checkpoint), or pass strict=False (--no-strict) to load "
            "the rest without them."
        )

    def raise_for_problems(
        self,
        *,
        strict: bool = True,
        convert_conv: bool = False,
        verb: str = "load",
        allow_empty: bool = False,
    ) -> None:
        """Raise the first problem, the others attached to it as notes (shown with its
        traceback), so one run shows all of them and nothing is logged for a caught error."""
        found = self.problems(
            strict=strict, convert_conv=convert_conv, verb=verb, allow_empty=allow_empty
        )
        if found:
            for other in found[1:]:
                found[0].add_note(f"also: {type(other).__name__}: {other}")
            raise found[0]

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (no tensor-by-tensor listing)."""
        return {
            "source": self.source,
            "weights": self.weights,
            "stage": self.stage,
            "config": None if self.config is None else vars(self.config),
            "tensors": len(self.tensors),
            "buckets": {
                str(bucket): {
                    "count": s.count,
                    "bytes": s.nbytes,
                    "dtypes": dict(sorted(s.dtypes.items())),
                }
                for bucket, s in self.buckets.items()
            },
            "stage1_bytes": self.stage1_bytes,
            "stage2_bytes": self.stage2_bytes,
            "kept": len(self.plan.native),
            "unknown": list(self.plan.unknown),
            "collisions": [list(pair) for pair in self.plan.collisions],
            "twin_violations": [list(pair) for pair in self.plan.twin_violations],
            "missing": {name: len(keys) for name, keys in self.missing.items()},
            "missing_summary": self.missing_summary(),
            "shape_mismatches": [
                {"key": m.key, "expected": list(m.expected), "found": list(m.found)}
                for m in self.shape_mismatches
            ],
            "beyond_config": list(self.beyond_config),
            "conv_patch_embedding": self.conv_patch_embedding,
            "vae_keys_in_model_file": len(self.plan.buckets[Bucket.VAE]),
            "expected_from": self.expected_from,
            "quantized": [] if self.quantized is None else self.quantized.keys,
            "vae_file_holds_model": self.vae_file_holds_model,
        }


def _ranges(numbers: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    runs: list[list[int]] = []
    for number in numbers:
        if runs and number == runs[-1][1] + 1:
            runs[-1][1] = number
        else:
            runs.append([number, number])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _config_shape(key: str, config: BagelConfig) -> tuple[int, ...] | None:
    """The family table's shape of a key for ``config``, or ``None`` for a key it does not size."""
    hf_key = strip_root(key)
    family = family_of(hf_key)
    if family is None or family.shape is None:
        return None
    return family.shape(config, hf_key.rsplit(".", 1)[1])


def _implied_values(mismatches: Sequence[ShapeMismatch]) -> dict[str, Counter[int]]:
    """Config attribute -> the values the checkpoint's tensors give the dimensions it sizes,
    where those differ from the config's (with how many tensors give each)."""
    implied: dict[str, Counter[int]] = {}
    for mismatch in mismatches:
        hf_key = strip_root(mismatch.key)
        family = family_of(hf_key)
        if family is None or family.shape is None:
            continue
        dims = family.shape.dims(hf_key.rsplit(".", 1)[1])
        if len(dims) != len(mismatch.found):
            continue
        for name, want, have in zip(dims, mismatch.expected, mismatch.found, strict=True):
            if want != have:
                implied.setdefault(name, Counter())[have] += 1
    return implied


def _where(attribute: str) -> str:
    """The config file and field behind an attribute, as a message names it."""
    source = field_source(attribute)
    if source is not None:
        return f"{source[0]} {source[1]}"
    if attribute in DERIVED_FROM:
        return f"{attribute} (from " + ", ".join(map(_where, DERIVED_FROM[attribute])) + ")"
    return f"{attribute} (set by no config file)"


def _explanations(mismatches: Sequence[ShapeMismatch], config: BagelConfig) -> list[str]:
    """Which config fields explain the mismatches: each field that the tensors consistently
    give another value, and whether those values account for every mismatch."""
    implied = _implied_values(mismatches)
    fixes: dict[str, Any] = {
        name: next(iter(values))
        for name, values in implied.items()
        if len(values) == 1 and field_source(name) is not None
    }
    lines = [
        f"{_where(name)} is {getattr(config, name)}; the checkpoint's tensors imply {value}"
        for name, value in fixes.items()
    ]
    rest = implied
    if fixes:
        try:
            fixed = dataclasses.replace(config, **fixes)
        except ConfigError:
            fixed = None
        if fixed is not None:
            left = [m for m in mismatches if _config_shape(m.key, fixed) != m.found]
            done = len(mismatches) - len(left)
            lines.append(
                f"(with {'that value' if len(fixes) == 1 else 'those values'} "
                + (
                    f"all {len(mismatches)} shapes match)"
                    if not left
                    else f"{done} of the {len(mismatches)} shapes match)"
                )
            )
            rest = {k: v for k, v in _implied_values(left).items() if k not in fixes}
        else:
            rest = {k: v for k, v in implied.items() if k not in fixes}
    lines += [
        f"{_where(name)} is {getattr(config, name)}; the checkpoint's tensors give "
        + format_examples(sorted(values), show=str)
        for name, values in rest.items()
    ]
    return lines


def shape_mismatch_message(
    source: str, mismatches: Sequence[ShapeMismatch], config: BagelConfig | None
) -> str:
    """A few lines for any number of shape mismatches: the count per family, a few examples,
    and the config file fields that explain them (the full list stays with the caller)."""
    by_family: dict[str, list[ShapeMismatch]] = {}
    for mismatch in mismatches:
        family = family_of(strip_root(mismatch.key))
        by_family.setdefault("other" if family is None else family.name, []).append(mismatch)
    counts = [f"{name} {len(items)}" for name, items in by_family.items()]
    families = counted(len(by_family), "family", "families")
    lines = [
        f"{source}: {counted(len(mismatches), 'tensor')} {agree(len(mismatches), 'does', 'do')} "
        f"not have the shape the config implies, in {families} "
        f"({format_examples(counts, show=str)}), e.g.:"
    ]
    # a mismatching key matched a family template (ASCII digits only), so it prints as is
    lines += [
        f"  {items[0].key}: expected {list(items[0].expected)}, found {list(items[0].found)}"
        for items in list(by_family.values())[:MISMATCH_EXAMPLES]
    ]
    if config is not None:
        lines += [f"  {line}" for line in _explanations(mismatches, config)]
    lines.append(
        "Fix the config field(s) named above, or use the config files saved with this "
        "checkpoint (config=, --config DIR); strict=False does not change shapes (every mismatch "
        "is listed in the error's .mismatches and in the report's shape_mismatches)."
    )
    return "\n".join(lines)


@cache
def _manifest_families() -> dict[str, tuple[str, ...]]:
    """Family name -> the shipped manifest's model-file keys of that family, in file order."""
    by_family: dict[str, list[str]] = {}
    for key in load_manifest()[MODEL_FILE]:
        family = family_of(key)
        if family is not None:
            by_family.setdefault(family.name, []).append(key)
    return {name: tuple(keys) for name, keys in by_family.items()}


def _top_layers(keys: Sequence[str] | set[str]) -> dict[str, int]:
    """Layer-stack prefix (``language_model.model.layers.``) -> the highest layer among keys."""
    tops: dict[str, int] = {}
    for key in keys:
        family = family_of(key)
        layer = None if family is None else family.layer_of(key)
        if family is not None and layer is not None:
            stack = family.template.split("{layer}", 1)[0]
            tops[stack] = max(tops.get(stack, layer), layer)
    return tops


def _unlike_manifest(present: set[str]) -> str | None:
    """Why the shipped BAGEL-7B-MoT key list does not describe a checkpoint with these (HF) UND
    and GEN keys, or ``None`` when it does: every sized key is one of the release's, and each
    layer stack present is as deep as the release's (so a smaller model, or one with extra
    layers, is not judged by BAGEL-7B-MoT's key list)."""
    manifest = load_manifest()[MODEL_FILE]
    outside = [
        key
        for key in present
        if key not in manifest and (family := family_of(key)) is not None and family.shape
    ]
    if outside:
        return (
            f"{len(outside):,} of its keys {agree(len(outside), 'is', 'are')} not BAGEL-7B-MoT's "
            f"({format_examples(outside)})"
        )
    release = _top_layers(list(manifest))
    tops = _top_layers(present)
    if not tops:
        return "it has no layer keys"
    for stack, top in tops.items():
        if top != release[stack]:
            return f"its {stack}* go up to layer {top}, BAGEL-7B-MoT's to {release[stack]}"
    return None


def _is_conv_patch_weight(
    shape: tuple[int, ...], expected: tuple[int, ...] | None, config: BagelConfig | None
) -> bool:
    if len(shape) != 4 or shape[2] != shape[3]:
        return False
    if config is None or expected is None:
        return True
    return shape == (
        expected[0],
        config.vit_num_channels,
        config.vit_patch_size,
        config.vit_patch_size,
    )


def build_report(
    tensors: Mapping[str, TensorLike],
    *,
    stage: StageLike | None = None,
    config: BagelConfig | None = None,
    source: str = "<state dict>",
    manifest_fallback: bool = False,
) -> CheckpointReport:
    """Validate a checkpoint's tensor list (names, shapes, dtypes) for ``stage``.

    With a ``config``, every kept tensor's shape is compared with the family table's, and the
    expected keys the stage keeps but the checkpoint lacks are collected family by family.
    Without one, ``manifest_fallback`` lets the shipped BAGEL-7B-MoT key list stand in for the
    config's when the checkpoint looks like that model (its sized keys are all the release's,
    its layer stacks as deep): the missing keys are collected from it, shapes are not compared
    (a scaled or fine-tuned model's widths may differ). ``expected_from`` records which was used.
    """
    key_plan = plan(tensors, stage=stage)
    buckets = {bucket: BucketSummary() for bucket in Bucket}
    for bucket, keys in key_plan.buckets.items():
        summary = buckets[bucket]
        for key in keys:
            summary.count += 1
            summary.nbytes += tensors[key].nbytes
            summary.dtypes[tensors[key].dtype] += 1
    missing: dict[str, list[str]] = {}
    mismatches: list[ShapeMismatch] = []
    beyond: list[str] = []
    conv: str | None = None
    expected: dict[str, tuple[int, ...]] = {}
    expected_from: ExpectedFrom = None
    kept_buckets = STAGE_BUCKETS[key_plan.stage]
    present = {strip_root(key) for key in key_plan.buckets[Bucket.UND]}
    present |= {strip_root(key) for key in key_plan.buckets[Bucket.GEN]}
    if config is not None:
        expected_from = "config"
        for family in FAMILIES:
            if family.shape is None or family.bucket not in kept_buckets:
                continue
            shapes = family.expected_shapes(config)
            expected.update(shapes)
            absent = [hf_key for hf_key in shapes if hf_key not in present]
            if absent:
                missing[family.name] = absent
    elif manifest_fallback and (unlike := _unlike_manifest(present)) is not None:
        logger.info("%s: the shipped BAGEL-7B-MoT key list does not apply: %s", source, unlike)
    elif manifest_fallback:
        expected_from = "manifest"
        for name, release_keys in _manifest_families().items():
            if FAMILY_BY_NAME[name].bucket in kept_buckets:
                absent = [hf_key for hf_key in release_keys if hf_key not in present]
                if absent:
                    missing[name] = absent
    for key in key_plan.native:
        hf_key, shape = strip_root(key), tuple(tensors[key].shape)
        want = expected.get(hf_key)
        if hf_key == PATCH_EMBEDDING_WEIGHT and _is_conv_patch_weight(shape, want, config):
            conv = key
        elif config is None:
            continue
        elif want is None:
            beyond.append(key)
        elif shape != want:
            mismatches.append(ShapeMismatch(key, want, shape))
    return CheckpointReport(
        source,
        key_plan.stage,
        config,
        tensors,
        key_plan,
        buckets,
        missing,
        mismatches,
        beyond,
        conv,
        expected_from,
        quantized=find_quantization({key: info.dtype for key, info in tensors.items()}),
    )


def state_dict_report(
    state_dict: Mapping[str, object], *, stage: StageLike | None, config: BagelConfig
) -> CheckpointReport:
    """:func:`build_report` for an in-memory HF state dict, reading shapes and dtypes from its
    values (the global shape of a DTensor). A value that is not a tensor counts as an empty one:
    only its key is checked."""
    specs = {
        key: TensorSpec(key, dtype_name(value.dtype), tuple(value.shape))
        if isinstance(value, torch.Tensor)
        else TensorSpec(key, "U8", (0,))
        for key, value in state_dict.items()
    }
    return build_report(specs, stage=stage, config=config)


def inspect_checkpoint(
    checkpoint_dir: str | os.PathLike[str],
    *,
    stage: StageLike | None = None,
    config: ConfigLike | None = None,
    weights: Weights | None = None,
    strip_prefix: str | None = None,
) -> CheckpointReport:
    """Validate a checkpoint folder from its headers alone, reading no tensor data.

    ``config`` defaults to the folder's own config files when they exist. Without any config,
    a checkpoint that looks like BAGEL-7B-MoT is checked for completeness against the shipped
    manifest's key list (shapes are not checked); any other only gets the key checks.
    ``weights`` picks ``ema.safetensors`` or ``model.safetensors`` (or its index) in a training
    output folder (see :func:`~bagelverify.checkpoint.files.choose_weights`).
    :attr:`CheckpointReport.weights` says which file was read and why. ``strip_prefix``
    (such as ``"module."``) is removed from the keys that carry it, for checkpoints saved from a
    wrapped module (see :func:`~bagelverify.plan.without_prefix`).
    """
    files = open_checkpoint(checkpoint_dir, weights=weights)
    return report_files(files, stage=stage, config=config, strip_prefix=strip_prefix)


def report_files(
    files: CheckpointFiles,
    *,
    stage: StageLike | None,
    config: ConfigLike | None,
    strip_prefix: str | None = None,
) -> CheckpointReport:
    """:func:`inspect_checkpoint` for a folder already opened by
    :func:`~bagelverify.checkpoint.files.open_checkpoint`."""
    config = find_config(files.directory, config)
    report = build_report(
        without_prefix(files.tensors, strip_prefix),
        stage=stage,
        config=config,
        source=files.source,
        manifest_fallback=True,
    )
    report.weights = files.weights
    check_swapped_vae(report, files.directory)
    if config is None:
        logger.warning(
            "%s: no config given and no %s in the folder; %s",
            files.directory,
            "/".join(CONFIG_FILES),
            "completeness is checked against the shipped BAGEL-7B-MoT key list, shapes are not "
            "checked"
            if report.expected_from == "manifest"
            else "shapes and completeness are not checked",
        )
    return report


def swapped(model_file: Path, vae_file: Path) -> str:
    """The end of a message about a model file and a VAE file whose contents are swapped."""
    model, vae = model_file.name, vae_file.name
    return (
        f"the two files are swapped. Swap them back (in {model_file.parent}: mv {model} "
        f"{model}.tmp && mv {vae} {model} && mv {model}.tmp {vae})"
    )


def header_buckets(path: Path) -> Counter[Bucket] | None:
    """Tensors per bucket in a safetensors file's header, or ``None`` when there is no such
    file or its header cannot be read (used as evidence only, never to load)."""
    if not path.is_file():
        return None
    try:
        keys = read_header(path).tensors
    except (BagelError, OSError) as error:
        logger.debug("%s: header not read: %s", path, error)
        return None
    return Counter(classify(strip_root(key)) for key in keys)


def check_swapped_vae(report: CheckpointReport, directory: Path) -> None:
    """When the report's model file holds only VAE keys, record in
    :attr:`CheckpointReport.vae_file_holds_model` whether the folder's ``ae.safetensors`` holds
    model keys (the files are swapped). Reads that file's header only, and only then."""
    vae = directory / VAE_FILE
    if not report.holds_vae_only or str(vae) == report.source:
        return
    counts = header_buckets(vae)
    if counts is not None and counts[Bucket.UND] + counts[Bucket.GEN] > 0:
        report.vae_file_holds_model = str(vae)
