"""HF <-> native conversion of BAGEL state dicts: a drop-in for the reference adapter.

HF keys are unrooted (``language_model.model.norm.weight``); native keys are the same keys under
the ``model.`` root that the training framework's wrapper module adds. Values pass through
untouched: the adapter converts keys, never tensors.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .buckets import Bucket
from .config import BagelConfig
from .errors import (
    KeyCollisionError,
    MissingKeysError,
    PatternError,
    RootError,
    UnknownKeysError,
    format_examples,
)
from .families import und_twin
from .partition import check_key, classify
from .stage import STAGE_BUCKETS, Stage, normalize_stage

logger = logging.getLogger(__name__)

V = TypeVar("V")

ROOT = "model."
"""Prefix of every native key."""


def to_native_key(hf_key: str) -> str:
    """``language_model.x`` -> ``model.language_model.x``."""
    return ROOT + hf_key


def strip_root(key: str) -> str:
    """Remove one leading ``model.`` if present; other keys are returned unchanged."""
    return key[len(ROOT) :] if key.startswith(ROOT) else key


def _require_mapping(state_dict: object, what: str) -> Mapping[Any, Any]:
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"{what} must be a mapping of str keys to tensors, got {type(state_dict).__name__}"
        )
    return state_dict


def _compile_exclude(pattern: object) -> re.Pattern[str] | None:
    if pattern is None:
        return None
    if not isinstance(pattern, str):
        raise TypeError(f"exclude_key_regex must be a str, got {type(pattern).__name__}")
    try:
        return re.compile(pattern)
    except re.error as error:
        raise PatternError(
            f"exclude_key_regex {pattern!r} is not a valid regex: {error}; fix the pattern "
            "(it is matched with re.match against native, model.-rooted keys)"
        ) from error


@dataclass
class Plan:
    """What :meth:`BagelStateDictAdapter.from_hf` does with a set of input keys, before doing it.

    Keys in every list are the caller's input keys, in input order.
    """

    stage: Stage
    buckets: dict[Bucket, list[str]] = field(default_factory=lambda: {b: [] for b in Bucket})
    """Input keys per bucket (classified after the ``model.`` root is removed)."""
    native: dict[str, str] = field(default_factory=dict)
    """Kept input key -> native key."""
    collisions: list[tuple[str, str]] = field(default_factory=list)
    """Pairs ``(X, model.X)`` of known keys that both occur in the input (the second is not
    classified further; unknown pairs are simply unknown)."""
    twin_violations: list[tuple[str, str]] = field(default_factory=list)
    """Stage 2 only: ``(GEN key, its absent UND twin)`` as HF keys."""

    @property
    def kept(self) -> list[str]:
        """Input keys the stage returns."""
        return list(self.native)

    @property
    def unknown(self) -> list[str]:
        """Input keys of no known family."""
        return self.buckets[Bucket.UNKNOWN]

    @property
    def dropped(self) -> dict[Bucket, list[str]]:
        """Input keys the stage does not return, per bucket (unknown keys included)."""
        kept = STAGE_BUCKETS[self.stage]
        return {b: keys for b, keys in self.buckets.items() if b not in kept}

    def problems(self, *, strict: bool = True) -> list[Exception]:
        """The errors :meth:`raise_for_problems` would raise, first one first."""
        found: list[Exception] = []
        if self.collisions:
            found.append(
                KeyCollisionError(
                    f"{len(self.collisions)} keys occur both unrooted and under the {ROOT!r} root: "
                    f"{format_examples(self.collisions)}; both would load into the same parameter. "
                    "Remove one of each pair from the state dict.",
                    self.collisions,
                )
            )
        if strict and self.unknown:
            found.append(
                UnknownKeysError(
                    f"{len(self.unknown)} keys match no BAGEL key family: "
                    f"{format_examples(self.unknown)}. Check that this is a BAGEL-7B-MoT "
                    "checkpoint (ema.safetensors), or pass strict=False to drop them with a "
                    "warning.",
                    self.unknown,
                )
            )
        if strict and self.twin_violations:
            missing = [und for _, und in self.twin_violations]
            found.append(
                MissingKeysError(
                    f"{self.stage}: {len(missing)} GEN keys lack their UND twin, e.g. "
                    f"{format_examples(self.twin_violations)} as (GEN key, missing UND key). "
                    "The checkpoint is incomplete; pass strict=False to load it anyway.",
                    missing,
                )
            )
        return found

    def raise_for_problems(self, *, strict: bool = True) -> None:
        """Raise the first problem; collisions are errors even when not strict."""
        found = self.problems(strict=strict)
        if found:
            raise found[0]

    def log(self, *, strict: bool = True) -> None:
        """Log what is dropped: one line per bucket, a WARNING where something is amiss."""
        dropped = self.dropped
        if dropped[Bucket.UNKNOWN] and not strict:
            logger.warning(
                "dropping %d keys that match no BAGEL key family: %s",
                len(self.unknown),
                format_examples(self.unknown),
            )
        if self.twin_violations and not strict:
            logger.warning(
                "%s: %d GEN keys lack their UND twin: %s",
                self.stage,
                len(self.twin_violations),
                format_examples(self.twin_violations),
            )
        if dropped[Bucket.VAE]:
            logger.warning(
                "dropping %d VAE keys (encoder./decoder.) merged into the model "
                "checkpoint; the VAE is loaded separately from ae.safetensors",
                len(dropped[Bucket.VAE]),
            )
        if dropped[Bucket.EXTRA]:
            logger.info(
                "dropping %d Transformer-Engine ._extra_state entries", len(dropped[Bucket.EXTRA])
            )
        if dropped.get(Bucket.GEN):
            logger.info("%s: dropping %d GEN keys", self.stage, len(dropped[Bucket.GEN]))


def plan(keys: Iterable[str], *, stage: object = "stage1") -> Plan:
    """Classify input keys (unrooted or ``model.``-rooted) and decide what ``stage`` keeps."""
    result = Plan(normalize_stage(stage))
    keep = STAGE_BUCKETS[result.stage]
    first_seen: dict[str, str] = {}
    gen_keys: list[str] = []
    for key in keys:
        hf_key = strip_root(check_key(key))
        bucket = classify(hf_key)
        if bucket is not Bucket.UNKNOWN and hf_key in first_seen:
            result.collisions.append((first_seen[hf_key], key))
            continue
        first_seen[hf_key] = key
        result.buckets[bucket].append(key)
        if bucket in keep:
            result.native[key] = to_native_key(hf_key)
            if bucket is Bucket.GEN:
                gen_keys.append(hf_key)
    for hf_key in gen_keys:
        twin = und_twin(hf_key)
        if twin is not None and twin not in first_seen:
            result.twin_violations.append((hf_key, twin))
    return result


def unroot(state_dict: Mapping[str, V], *, exclude_key_regex: str | None = None) -> dict[str, V]:
    """Native keys -> HF keys, with no check of what the keys name.

    Keys matched by ``re.match(exclude_key_regex, key)`` are skipped; every other key must be
    under the ``model.`` root (:class:`~bagelverify.errors.RootError` listing all that are not);
    ``._extra_state`` entries are dropped.
    """
    state_dict = _require_mapping(state_dict, "state_dict")
    exclude = _compile_exclude(exclude_key_regex)
    out: dict[str, V] = {}
    unrooted: list[str] = []
    extra = 0
    for key, value in state_dict.items():
        check_key(key)
        if exclude is not None and exclude.match(key):
            continue
        if not key.startswith(ROOT):
            unrooted.append(key)
            continue
        hf_key = key[len(ROOT) :]
        if classify(hf_key) is Bucket.EXTRA:
            extra += 1
            continue
        out[hf_key] = value
    if unrooted:
        raise RootError(
            f"{len(unrooted)} native keys are not under the {ROOT!r} root: "
            f"{format_examples(unrooted)}. to_hf takes the module's own state dict; "
            "HF-layout keys need no conversion.",
            unrooted,
        )
    if extra:
        logger.info("dropping %d Transformer-Engine ._extra_state entries", extra)
    return out


class BagelStateDictAdapter:
    """HF <-> native state-dict converter for BAGEL-7B-MoT.

    ``from_hf`` keeps the UND keys (stage 1) or UND + GEN keys (stage 2) under the ``model.``
    root; ``to_hf`` strips the root again. Tensors are passed through as the same objects.

    The class has every member of NeMo Automodel's ``StateDictAdapter`` base class (the flags
    below, :meth:`get_hf_state_dict_keys`, ...) without importing it;
    :func:`bagelverify.integrations.automodel.install` registers it as one.
    """

    _supports_low_memory_dcp_load = True
    _supports_write_through_checkpoint_load = True
    _EXTRA_STATE_EXCLUDE = r".*_extra_state.*"
    """What Automodel excludes when it lists HF keys (module metadata, never weights)."""

    def __init__(self, config: Any = None, *, stage: object = "stage1") -> None:
        self.config = config
        self.stage: Stage = normalize_stage(stage)

    # -- flags and hooks of Automodel's base class ------------------------------------------------

    @property
    def supports_low_memory_dcp_load(self) -> bool:
        """``True``: :meth:`to_hf` returns the model's own tensors under HF names, so a
        checkpoint reader fills the model's memory directly (Automodel 0.7.0's flag)."""
        return self._supports_low_memory_dcp_load

    @property
    def supports_write_through_checkpoint_load(self) -> bool:
        """The same guarantee under the name Automodel's later versions read."""
        return self._supports_write_through_checkpoint_load

    @property
    def checkpoint_key_aliases(self) -> dict[str, str]:
        """Legacy checkpoint names to accept: none, BAGEL keys were never renamed."""
        return {}

    def iter_checkpoint_load_parts(
        self, model_state_dict: Mapping[str, Any], device_mesh: Any = None
    ) -> None:
        """``None``: no part-by-part conversion is needed, every tensor loads in place."""
        return None

    def get_hf_state_dict_keys(self, state_dict: Mapping[str, Any]) -> list[str]:
        """The HF keys :meth:`to_hf` produces for ``state_dict``, ``._extra_state`` excluded,
        checked exactly as :meth:`to_hf` checks them. Reads no tensor data."""
        return list(self.to_hf(state_dict, exclude_key_regex=self._EXTRA_STATE_EXCLUDE))

    def map_peft_target_module_to_hf(self, name: str, *, v4_compatible: bool = False) -> str:
        """A native module name in HF layout (the ``model.`` root removed), as :meth:`to_hf`
        renames that module's tensors. ``v4_compatible`` changes nothing for BAGEL."""
        return strip_root(check_key(name))

    # -- conversion ----------------------------------------------------------------------------

    def plan(self, keys: Iterable[str], *, stage: object = None) -> Plan:
        """What :meth:`from_hf` would keep and drop for ``keys``, without converting anything."""
        return plan(keys, stage=self.stage if stage is None else stage)

    def from_hf(
        self,
        hf_state_dict: Mapping[str, V],
        device_mesh: Any = None,
        *,
        stage: object = None,
        strict: bool = True,
    ) -> dict[str, V]:
        """Convert an HF-layout state dict to native layout, keeping the stage's buckets.

        With a :class:`~bagelverify.config.BagelConfig` as the adapter's ``config``, the values'
        shapes are checked like a checkpoint load's (:class:`~bagelverify.errors.
        ShapeMismatchError` listing every mismatch; under ``strict`` expected keys the stage keeps
        must all be present); any other config object is kept for reference only.

        Raises :class:`~bagelverify.errors.KeyCollisionError` when a key occurs both unrooted and
        rooted; under ``strict``, :class:`~bagelverify.errors.UnknownKeysError` (a ``KeyError``)
        for unknown keys and :class:`~bagelverify.errors.MissingKeysError` for a stage-2 GEN key
        whose UND twin is absent. ``device_mesh`` (Automodel passes its expert-parallel mesh)
        changes nothing: BAGEL has no experts, values (DTensors included) are returned as they
        are. Any other keyword is a ``TypeError``.
        """
        hf_state_dict = _require_mapping(hf_state_dict, "hf_state_dict")
        stage = self.stage if stage is None else stage
        if isinstance(self.config, BagelConfig):
            from .checkpoint import state_dict_report  # torch is needed only with a config

            checked = state_dict_report(hf_state_dict, stage=stage, config=self.config)
            checked.raise_for_problems(strict=strict)
            report = checked.plan
        else:
            report = self.plan(hf_state_dict, stage=stage)
            report.raise_for_problems(strict=strict)
        report.log(strict=strict)
        return {native: hf_state_dict[key] for key, native in report.native.items()}

    def to_hf(
        self,
        state_dict: Mapping[str, V],
        *,
        exclude_key_regex: str | None = None,
        strict: bool = True,
        quantization: bool = False,
        device_mesh: Any = None,
        v4_compatible: bool = False,
        legacy_paramwrapper_layout: bool = False,
        for_checkpoint_load: bool = False,
    ) -> dict[str, V]:
        """Convert a native state dict to HF layout.

        Keys for which ``re.match(exclude_key_regex, native_key)`` succeeds are skipped before any
        check. Every other key must start with ``model.`` (:class:`~bagelverify.errors.RootError`
        otherwise); ``._extra_state`` entries are dropped. Under ``strict`` every output key must
        be an UND or GEN key (:class:`~bagelverify.errors.UnknownKeysError` otherwise); without
        it such keys are kept with a warning. Values are the same objects, so a checkpoint reader
        that fills the result fills the model.

        With a :class:`~bagelverify.config.BagelConfig` as ``config``, the shapes are checked
        against it (one :class:`~bagelverify.errors.ShapeMismatchError`); with
        ``for_checkpoint_load`` (Automodel's checkpointer asks for load destinations) the keys
        must also be the stage's complete set under ``strict``, before anything is read.

        Automodel's other keywords: ``quantization`` must be false (BAGEL checkpoints hold no
        quantized tensors; ``ValueError`` otherwise); ``device_mesh``, ``v4_compatible`` and
        ``legacy_paramwrapper_layout`` change nothing for BAGEL (no experts, one layout). Any
        other keyword is a ``TypeError``.
        """
        if quantization:
            raise ValueError(
                "to_hf(quantization=True): BAGEL-7B-MoT checkpoints hold no quantized tensors "
                "(no FP8 scales) to load or dequantize; remove quantization_config from the "
                "model's config"
            )
        out = unroot(state_dict, exclude_key_regex=exclude_key_regex)
        unknown = [ROOT + k for k in out if classify(k) not in (Bucket.UND, Bucket.GEN)]
        if unknown:
            message = (
                f"{len(unknown)} native keys are not BAGEL UND or GEN keys: "
                f"{format_examples(unknown)}"
            )
            if strict:
                raise UnknownKeysError(
                    message + ". Pass strict=False to convert them anyway, or exclude them with "
                    "exclude_key_regex.",
                    unknown,
                )
            logger.warning("%s; converting them unchanged", message)
        if isinstance(self.config, BagelConfig):
            from .checkpoint import state_dict_report  # torch is needed only with a config

            report = state_dict_report(out, stage=self.stage, config=self.config)
            problems = [
                problem
                for problem in report.problems(strict=strict)
                if for_checkpoint_load or not isinstance(problem, MissingKeysError)
            ]
            if problems:
                raise problems[0]
        return out

    def convert_single_tensor_to_hf(
        self,
        fqn: str,
        tensor: V,
        *,
        exclude_key_regex: str | None = None,
        strict: bool = True,
        quantization: bool = False,
        device_mesh: Any = None,
        v4_compatible: bool = False,
        legacy_paramwrapper_layout: bool = False,
    ) -> list[tuple[str, V]]:
        """``[(hf_key, tensor)]`` for one native tensor, ``[]`` for extra state.

        Checked exactly as :meth:`to_hf` checks each key; takes the same keyword arguments.
        """
        converted = self.to_hf(
            {fqn: tensor},
            exclude_key_regex=exclude_key_regex,
            strict=strict,
            quantization=quantization,
            device_mesh=device_mesh,
            v4_compatible=v4_compatible,
            legacy_paramwrapper_layout=legacy_paramwrapper_layout,
        )
        return list(converted.items())

    # Names of the reference adapter's key helpers, for code written against it.
    def _hf_to_nemo_key(self, hf_key: str) -> str:
        return to_native_key(hf_key)

    def _nemo_to_hf_key(self, nemo_key: str) -> str:
        return strip_root(nemo_key)

    def _strip_nemo_root(self, key: str) -> str:
        return strip_root(key)
