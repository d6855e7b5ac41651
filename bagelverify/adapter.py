"""HF <-> native conversion of BAGEL state dicts: a drop-in for the reference adapter.

HF keys are unrooted (``language_model.model.norm.weight``); native keys are the same keys under
the ``model.`` root that the training framework's wrapper module adds. Values pass through
untouched: the adapter converts keys, never tensors.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from .buckets import Bucket
from .config import BagelConfig
from .errors import (
    ArgumentError,
    MissingKeysError,
    ShapeMismatchError,
    UnknownKeysError,
    agree,
    counted,
    format_examples,
)
from .keys import ROOT, check_key, strip_root, to_native_key
from .lora_keys import factor_mismatches, lora_key, native_factor_key
from .partition import classify
from .plan import Plan, plan, require_mapping, unroot
from .stage import STAGE_BUCKETS, Stage, StageLike, normalize_stage

logger = logging.getLogger(__name__)

V = TypeVar("V")

__all__ = ["ROOT", "BagelStateDictAdapter", "Plan", "plan", "strip_root", "to_native_key", "unroot"]


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

    def __init__(self, config: Any = None, *, stage: StageLike = "stage1") -> None:
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
        """A PEFT target module name as the saved adapter names it: unchanged, since
        :meth:`to_hf` keeps the keys of LoRA factors under the PEFT root as they are (Automodel's
        own BAGEL adapter does the same). ``v4_compatible`` changes nothing for BAGEL."""
        return check_key(name)

    # -- conversion ----------------------------------------------------------------------------

    def plan(self, keys: Iterable[str], *, stage: StageLike | None = None) -> Plan:
        """What :meth:`from_hf` would keep and drop for ``keys``, without converting anything."""
        return plan(keys, stage=self.stage if stage is None else stage)

    def from_hf(
        self,
        hf_state_dict: Mapping[str, V],
        device_mesh: Any = None,
        *,
        stage: StageLike | None = None,
        strict: bool = True,
    ) -> dict[str, V]:
        """Convert an HF-layout state dict to native layout, keeping the stage's buckets.

        With a :class:`~bagelverify.config.BagelConfig` as the adapter's ``config``, the values'
        shapes are checked like a checkpoint load's (:class:`~bagelverify.errors.
        ShapeMismatchError` listing every mismatch; under ``strict`` expected keys the stage keeps
        must all be present); any other config object is kept for reference only.

        LoRA factor keys (:func:`~bagelverify.lora_keys.lora_key`) of the stage's buckets are
        kept under ``model.``, or ``base_model.model.model.`` when they came under the PEFT root;
        their shapes are checked (:class:`~bagelverify.errors.ShapeMismatchError`). A state dict
        of factors alone (an adapter) needs no base weights.

        Raises :class:`~bagelverify.errors.KeyCollisionError` when a key occurs both unrooted and
        rooted; under ``strict``, :class:`~bagelverify.errors.UnknownKeysError` (a ``KeyError``)
        for unknown keys and :class:`~bagelverify.errors.MissingKeysError` for a stage-2 GEN key
        whose UND twin is absent. ``device_mesh`` (Automodel passes its expert-parallel mesh)
        changes nothing: BAGEL has no experts, values (DTensors included) are returned as they
        are. Any other keyword is a ``TypeError``.
        """
        hf_state_dict = require_mapping(hf_state_dict, "hf_state_dict")
        stage = self.stage if stage is None else stage
        lora = {key: value for key, value in hf_state_dict.items() if lora_key(key) is not None}
        weights = {key: value for key, value in hf_state_dict.items() if key not in lora}
        out: dict[str, V] = {}
        if weights or not lora:  # an adapter alone (only factors) lacks the weights by design
            if isinstance(self.config, BagelConfig):
                from .checkpoint import state_dict_report  # torch is needed only with a config

                checked = state_dict_report(weights, stage=stage, config=self.config)
                checked.raise_for_problems(strict=strict, allow_empty=True)
                report = checked.plan
            else:
                report = self.plan(weights, stage=stage)
                report.raise_for_problems(strict=strict)
            report.log(strict=strict)
            out = {native: weights[key] for key, native in report.native.items()}
        self._check_factors(lora)
        keep = STAGE_BUCKETS[normalize_stage(stage)]
        for key, value in lora.items():
            found = lora_key(key)
            assert found is not None
            if found.bucket in keep:
                out[native_factor_key(found)] = value
        return out

    def _check_factors(self, lora: Mapping[str, Any]) -> None:
        """Raise :class:`~bagelverify.errors.ShapeMismatchError` for LoRA factors that do not
        fit the weights they adapt (ranks of a pair, and the config's shapes when it has one)."""
        config = self.config if isinstance(self.config, BagelConfig) else None
        shapes = {key: tuple(getattr(value, "shape", ())) for key, value in lora.items()}
        wrong = factor_mismatches(shapes, config=config)
        if wrong:
            raise ShapeMismatchError(
                f"{counted(len(wrong), 'LoRA factor')} {agree(len(wrong), 'does', 'do')} "
                "not fit the weight it adapts:\n" + "\n".join(wrong) + "\nThe adapter was "
                "built for another model, or its rank differs between factors."
            )

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
        be an UND or GEN key or a LoRA factor of one (:class:`~bagelverify.errors.
        UnknownKeysError` otherwise); without it such keys are kept with a warning. LoRA factors
        under the PEFT ``base_model.model.`` root keep their key, as Automodel's own adapter
        writes them. Values are the same objects, so a checkpoint reader that fills the result
        fills the model.

        With a :class:`~bagelverify.config.BagelConfig` as ``config``, the shapes are checked
        against it, LoRA factors against the weights they adapt (one
        :class:`~bagelverify.errors.ShapeMismatchError`); with
        ``for_checkpoint_load`` (Automodel's checkpointer asks for load destinations) the keys
        must also be the stage's complete set under ``strict``, before anything is read.

        Automodel's other keywords: ``quantization`` must be false (BAGEL checkpoints hold no
        quantized tensors; ``ValueError`` otherwise); ``device_mesh``, ``v4_compatible`` and
        ``legacy_paramwrapper_layout`` change nothing for BAGEL (no experts, one layout). Any
        other keyword is a ``TypeError``.
        """
        if quantization:
            raise ArgumentError(
                "to_hf(quantization=True): BAGEL-7B-MoT checkpoints hold no quantized tensors "
                "(no FP8 scales) to load or dequantize; remove quantization_config from the "
                "model's config"
            )
        out = unroot(state_dict, exclude_key_regex=exclude_key_regex)
        lora = {key: out[key] for key in out if lora_key(key) is not None}
        unknown = [
            ROOT + key
            for key in out
            if key not in lora and classify(key) not in (Bucket.UND, Bucket.GEN)
        ]
        if unknown:
            what = agree(
                len(unknown), "is not a BAGEL UND or GEN key", "are not BAGEL UND or GEN keys"
            )
            message = f"{counted(len(unknown), 'native key')} {what}: {format_examples(unknown)}"
            if strict:
                raise UnknownKeysError(
                    message + ". Pass strict=False to convert them anyway, or exclude them with "
                    "exclude_key_regex.",
                    unknown,
                )
            logger.warning("%s; converting them unchanged", message)
        self._check_factors(lora)
        weights = {key: value for key, value in out.items() if key not in lora}
        if isinstance(self.config, BagelConfig) and (weights or not lora):
            from .checkpoint import state_dict_report  # torch is needed only with a config

            report = state_dict_report(weights, stage=self.stage, config=self.config)
            problems = [
                problem
                for problem in report.problems(strict=strict, allow_empty=True)
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
