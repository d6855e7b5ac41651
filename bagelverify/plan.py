"""What a conversion keeps and drops, decided from the keys alone (no torch).

:func:`plan` classifies input keys (unrooted or ``model.``-rooted) for a stage: the buckets, the
kept keys with their native names, ``X``/``model.X`` collisions and GEN keys without their UND
twin. :func:`unroot` is the reverse key mapping, native -> HF.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .buckets import Bucket
from .errors import (
    ArgumentError,
    ArgumentTypeError,
    KeyCollisionError,
    MissingKeysError,
    PatternError,
    RootError,
    UnknownKeysError,
    agree,
    counted,
    format_examples,
)
from .families import und_twin
from .keys import ROOT, check_key, strip_root, to_native_key
from .lora_keys import PEFT_ROOT, lora_key
from .partition import classify
from .stage import STAGE_BUCKETS, Stage, StageLike, normalize_stage

logger = logging.getLogger(__name__)

V = TypeVar("V")

WRAPPER_PREFIXES: dict[str, str] = {
    "module.": "DistributedDataParallel / DataParallel",
    "_orig_mod.": "torch.compile",
    "_fsdp_wrapped_module.": "FSDP (version 1)",
    "_checkpoint_wrapped_module.": "activation checkpointing (checkpoint_wrapper)",
}
"""Prefixes that wrapping a module adds to every key of its state dict, and who adds each."""

_PREFIX_DEPTH = 4
"""How many leading key components a shared wrapper prefix may span (``module._orig_mod.``)."""
_PREFIX_SAMPLE = 256
"""How many keys :func:`shared_prefix` classifies to decide that a prefix hides BAGEL keys."""


def is_bagel_key(key: str) -> bool:
    """Whether ``key`` (unrooted or ``model.``-rooted) is an UND or GEN key."""
    return classify(strip_root(key)) in (Bucket.UND, Bucket.GEN)


def shared_prefix(keys: Sequence[str], known: Callable[[str], bool] = is_bagel_key) -> str | None:
    """The shortest dotted prefix (at most four components) that every key of ``keys`` starts
    with and that, stripped, leaves keys ``known`` accepts (most of a sample of them): the
    prefix a wrapper such as DDP (``module.``) or ``torch.compile`` (``_orig_mod.``) added.
    ``None`` when there is none."""
    if not keys:
        return None
    parts = keys[0].split(".")
    for depth in range(1, min(_PREFIX_DEPTH, len(parts) - 1) + 1):
        prefix = ".".join(parts[:depth]) + "."
        if not all(key.startswith(prefix) for key in keys):
            return None
        sample = keys[:_PREFIX_SAMPLE]
        if 2 * sum(known(key[len(prefix) :]) for key in sample) > len(sample):
            return prefix
    return None


def describe_prefix(prefix: str) -> str:
    """``'module.' (added by DistributedDataParallel / DataParallel)``: a prefix and the
    wrappers whose prefixes it is made of."""
    parts = [part + "." for part in prefix.rstrip(".").split(".")]
    who = [WRAPPER_PREFIXES[part] for part in parts if part in WRAPPER_PREFIXES]
    return f"{prefix!r}" + (f" (added by {', then '.join(who)})" if who else "")


def strip_prefix_advice(prefix: str) -> str:
    """How to strip a wrapper's prefix, in the library's and the command line's words."""
    return (
        f"pass strip_prefix={prefix!r} (command line: --strip-prefix {prefix}) to remove it, or "
        "save the unwrapped module's state dict"
    )


def without_prefix(mapping: Mapping[str, V], prefix: str | None) -> dict[str, V]:
    """``mapping`` with ``prefix`` removed from the keys that start with it (others unchanged).

    ``prefix`` must end with ``.`` (a module path such as ``module.``); ``None`` changes
    nothing. A stripped key that equals a key already present is a
    :class:`~bagelverify.errors.KeyCollisionError` naming both.
    """
    if prefix is None:
        return dict(mapping)
    if not isinstance(prefix, str) or not prefix.endswith(".") or prefix == ".":
        raise ArgumentError(
            f"strip_prefix must be a module path prefix ending with '.', such as 'module.' or "
            f"'_orig_mod.', got {prefix!r}"
        )
    out: dict[str, V] = {}
    origin: dict[str, str] = {}
    clashes: list[tuple[str, str]] = []
    for key, value in mapping.items():
        new = key[len(prefix) :] if key.startswith(prefix) else key
        if new in out:
            clashes.append((origin[new], key))
            continue
        out[new], origin[new] = value, key
    if clashes:
        raise KeyCollisionError(
            f"{counted(len(clashes), 'key')} name the same tensor once {prefix!r} is stripped: "
            f"{format_examples(clashes)}. Remove one of each pair, or strip no prefix.",
            clashes,
        )
    if len(origin) == sum(1 for new, old in origin.items() if new == old):
        logger.warning("no key starts with %r; strip_prefix changed nothing", prefix)
    return out


def require_mapping(state_dict: object, what: str) -> Mapping[Any, Any]:
    if not isinstance(state_dict, Mapping):
        raise ArgumentTypeError(
            f"{what} must be a mapping of str keys to tensors, got {type(state_dict).__name__}"
        )
    return state_dict


def _compile_exclude(pattern: object) -> re.Pattern[str] | None:
    if pattern is None:
        return None
    if not isinstance(pattern, str):
        raise ArgumentTypeError(f"exclude_key_regex must be a str, got {type(pattern).__name__}")
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
                    f"{counted(len(self.collisions), 'key')} "
                    f"{agree(len(self.collisions), 'occurs', 'occur')} both unrooted and "
                    f"under the {ROOT!r} root: "
                    f"{format_examples(self.collisions)}; both would load into the same parameter. "
                    "Remove one of each pair from the state dict.",
                    self.collisions,
                )
            )
        if strict and self.unknown:
            found.append(
                UnknownKeysError(
                    f"{counted(len(self.unknown), 'key')} "
                    f"{agree(len(self.unknown), 'matches', 'match')} no BAGEL key family: "
                    f"{format_examples(self.unknown)}. {self.unknown_advice()}",
                    self.unknown,
                )
            )
        if strict and self.twin_violations:
            missing = [und for _, und in self.twin_violations]
            found.append(
                MissingKeysError(
                    f"{self.stage}: GEN keys lack their UND twin "
                    f"({counted(len(missing), 'key')}), e.g. "
                    f"{format_examples(self.twin_violations)} as (GEN key, missing UND key). "
                    "The checkpoint is incomplete: fill the UND twins from a complete checkpoint "
                    "(bagelverify repair SRC --base BASE -o OUT --stage 2), or pass strict=False "
                    "(--no-strict) to load it anyway.",
                    missing,
                )
            )
        return found

    def unknown_advice(self) -> str:
        """What to do about the unknown keys: strip the wrapper prefix they share when they
        hide BAGEL keys behind one, else check the checkpoint or drop them."""
        prefix = shared_prefix(self.unknown)
        if prefix is not None:
            return (
                f"Every one starts with {describe_prefix(prefix)}; without it they are BAGEL "
                f"keys: {strip_prefix_advice(prefix)}."
            )
        return (
            "Check that this is a BAGEL-7B-MoT checkpoint (ema.safetensors), or pass "
            "strict=False (--no-strict) to drop them with a warning."
        )

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
                "dropping %s of no BAGEL key family: %s",
                counted(len(self.unknown), "key"),
                format_examples(self.unknown),
            )
        if self.twin_violations and not strict:
            logger.warning(
                "%s: %s without the UND twin: %s",
                self.stage,
                counted(len(self.twin_violations), "GEN key"),
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


def held_stage(keys: Iterable[str]) -> Stage:
    """The stage a set of keys (unrooted or ``model.``-rooted) holds: ``"stage2"`` when any is a
    generation (GEN) key, else ``"stage1"``. What writers and checkers use for ``stage=None``."""
    return "stage2" if any(classify(strip_root(key)) is Bucket.GEN for key in keys) else "stage1"


def plan(keys: Iterable[str], *, stage: StageLike | None = "stage1") -> Plan:
    """Classify input keys (unrooted or ``model.``-rooted) and decide what ``stage`` keeps
    (``None``: the stage the keys hold, :func:`held_stage`)."""
    if stage is None:
        keys = list(keys)
        stage = held_stage(keys)
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
    under the ``model.`` root, once (:class:`~bagelverify.errors.RootError` listing all that are
    not, or are rooted twice), except LoRA factor keys under the PEFT ``base_model.model.``
    root, which are kept as they are (PEFT adapters are saved under that root);
    ``._extra_state`` entries are dropped.
    """
    state_dict = require_mapping(state_dict, "state_dict")
    exclude = _compile_exclude(exclude_key_regex)
    out: dict[str, V] = {}
    unrooted: list[str] = []
    doubly: list[str] = []
    extra = 0
    for key, value in state_dict.items():
        check_key(key)
        if exclude is not None and exclude.match(key):
            continue
        if key.startswith(PEFT_ROOT) and lora_key(key) is not None:
            out[key] = value
            continue
        if not key.startswith(ROOT):
            unrooted.append(key)
            continue
        hf_key = key[len(ROOT) :]
        if hf_key.startswith(ROOT):  # no HF key starts with the root: model.model.x is a slip
            doubly.append(key)
            continue
        if classify(hf_key) is Bucket.EXTRA:
            extra += 1
            continue
        out[hf_key] = value
    if doubly:
        raise RootError(
            f"{counted(len(doubly), 'native key')} {agree(len(doubly), 'is', 'are')} rooted "
            f"twice ({ROOT!r}{ROOT!r}...): "
            f"{format_examples(doubly)}. A native key has one {ROOT!r} root; strip the extra "
            "prefix (a module wrapped in another module adds one).",
            doubly,
        )
    if unrooted:
        raise RootError(
            f"{counted(len(unrooted), 'native key')} {agree(len(unrooted), 'is', 'are')} not "
            f"under the {ROOT!r} root: "
            f"{format_examples(unrooted)}. to_hf takes the module's own state dict; "
            "HF-layout keys need no conversion.",
            unrooted,
        )
    if extra:
        logger.info("dropping %d Transformer-Engine ._extra_state entries", extra)
    return out
