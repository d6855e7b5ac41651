"""LoRA adapters for BAGEL: check where they bind, and merge them into a checkpoint.

An adapter folder is PEFT's layout: ``adapter_config.json`` (``r``, ``lora_alpha``,
``use_rslora``, ``target_modules``) and ``adapter_model.safetensors`` (factor keys under the
``base_model.model.`` root, with or without the native ``model.`` root after it: Hugging Face
``peft`` and Automodel's ``is_peft`` saves). Which weight a factor adapts, and the shapes it must
have, come from the key-family table (:mod:`bagelverify.lora_keys`).
"""

from __future__ import annotations

import fnmatch
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import convert_checkpoint, find_config, open_weights, require_directory
from .checkpoint.files import Weights
from .config import BagelConfig
from .errors import (
    BagelError,
    CorruptCheckpointError,
    LoraError,
    MissingKeysError,
    UnknownKeysError,
    agree,
    counted,
    format_examples,
)
from .families import FAMILIES, Family
from .lora_keys import PEFT_ROOT, factor_mismatches, lora_families, lora_key
from .partition import classify
from .plan import held_stage
from .safetensors_io import TensorInfo, open_regular, read_header, read_into
from .stage import STAGE_BUCKETS, StageLike, normalize_stage
from .strict_json import read_json_file

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_MAX_CONFIG_BYTES = 16 * 2**20
_GEN_TWIN: dict[str, Family] = {f.twin: f for f in FAMILIES if f.twin is not None}


@dataclass(frozen=True)
class LoraSettings:
    """The parts of ``adapter_config.json`` a check and a merge use."""

    r: int
    lora_alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...] | str
    """A list of module names or name suffixes (Automodel's ``*`` wildcards allowed), or one
    regex a module name must match whole (PEFT's string form)."""
    exclude_modules: tuple[str, ...] | str = ()
    """Modules no target binds, written like :attr:`target_modules`."""

    @property
    def scale(self) -> float:
        """``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def binds(self, target: str, module: str) -> bool:
        """Whether ``target`` (one entry, or the regex) selects the module named ``module``
        and no :attr:`exclude_modules` entry excludes it."""
        excluded = self.exclude_modules
        entries = (excluded,) if isinstance(excluded, str) else excluded
        return _selects(target, module, regex=isinstance(self.target_modules, str)) and not any(
            _selects(entry, module, regex=isinstance(excluded, str)) for entry in entries
        )


def _selects(entry: str, module: str, *, regex: bool) -> bool:
    """PEFT's rule: a regex matches the whole name; a list entry is the name or a dotted
    suffix of it; Automodel's entries may hold ``*`` wildcards."""
    if regex:
        return re.fullmatch(entry, module) is not None
    if "*" in entry:
        return fnmatch.fnmatchcase(module, entry)
    return module == entry or module.endswith("." + entry)


def _config_error(path: Path) -> Callable[[str], BagelError]:
    return lambda what: CorruptCheckpointError(f"{path}: {what}")


def read_settings(adapter_dir: str | os.PathLike[str]) -> LoraSettings:
    """Parse and check ``adapter_config.json`` of an adapter folder."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    document = read_json_file(path, _MAX_CONFIG_BYTES, _config_error(path))
    if not isinstance(document, dict):
        raise LoraError(f"{path}: must hold a JSON object, found {type(document).__name__}")

    def field_of(name: str, kinds: tuple[type, ...], default: object = None) -> Any:
        value = document.get(name, default)
        if not isinstance(value, kinds) or isinstance(value, bool) != (bool in kinds):
            raise LoraError(
                f"{path}: {name!r} must be {' or '.join(k.__name__ for k in kinds)}, found "
                f"{value!r}; write the adapter with PEFT or Automodel, which set it"
            )
        return value

    if field_of("peft_type", (str,), "LORA") != "LORA":
        raise LoraError(f"{path}: peft_type is {document['peft_type']!r}; only LORA adapters")
    for unsupported in ("rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern"):
        if document.get(unsupported):
            raise LoraError(
                f"{path}: {unsupported!r} is set; bagelverify supports adapters with one r and "
                "lora_alpha for every module, bound by target_modules (and exclude_modules) alone"
            )
    if document.get("use_dora"):
        raise LoraError(f"{path}: use_dora is set; DoRA adapters cannot be merged as W + s*B@A")
    r = field_of("r", (int,))
    if r < 1:
        raise LoraError(f"{path}: r is {r}; a LoRA rank is at least 1")
    return LoraSettings(
        r=r,
        lora_alpha=float(field_of("lora_alpha", (int, float))),
        use_rslora=field_of("use_rslora", (bool,), False),
        target_modules=_module_set(path, "target_modules", field_of("target_modules", (list, str))),
        exclude_modules=_module_set(
            path, "exclude_modules", field_of("exclude_modules", (list, str, type(None))) or []
        ),
    )


def _module_set(path: Path, name: str, value: list[Any] | str) -> tuple[str, ...] | str:
    """A checked ``target_modules``/``exclude_modules`` value: a compilable regex, or a tuple
    of non-empty strings."""
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as error:
            raise LoraError(f"{path}: {name} {value!r} is not a valid regex ({error})") from None
        return value
    if not all(isinstance(entry, str) and entry for entry in value):
        raise LoraError(f"{path}: {name} must list non-empty strings, found {value}")
    return tuple(value)


@dataclass(frozen=True)
class Adapter:
    """An adapter folder, checked: its settings and its factor pairs by adapted HF weight key."""

    directory: Path
    settings: LoraSettings
    pairs: dict[str, tuple[TensorInfo, TensorInfo]]
    """HF weight key -> (``lora_A``, ``lora_B``) of the module adapting it."""
    root: str
    """The root the adapter names modules under (its factor keys' prefix, PEFT root removed)."""


def read_adapter(adapter_dir: str | os.PathLike[str]) -> Adapter:
    """Read an adapter folder's config and header (no tensor data) and pair its factors.

    Raises :class:`~bagelverify.errors.UnknownKeysError` for keys that are no factor of a BAGEL
    weight, :class:`~bagelverify.errors.MissingKeysError` for a factor without its pair and
    :class:`~bagelverify.errors.LoraError` for factor shapes that disagree with each other or
    with ``r``, and for factor keys under several roots.
    """
    directory = Path(adapter_dir)
    require_directory(directory, ADAPTER_CONFIG, "adapter folder")
    settings = read_settings(directory)
    header = read_header(directory / ADAPTER_WEIGHTS)
    found = {key: lora_key(key) for key in header.tensors}
    unknown = [key for key, what in found.items() if what is None]
    if unknown:
        raise UnknownKeysError(
            f"{directory / ADAPTER_WEIGHTS}: {counted(len(unknown), 'key')} "
            f"{agree(len(unknown), 'is', 'are')} no LoRA factor (<module>.lora_A.weight or "
            f".lora_B.weight) of a 2-D BAGEL weight: {format_examples(unknown)}. Check that the "
            "adapter was trained on BAGEL-7B-MoT.",
            unknown,
        )
    factors: dict[str, dict[str, TensorInfo]] = {}
    roots = set()
    for key, what in found.items():
        assert what is not None
        factors.setdefault(what.weight, {})[what.factor] = header.tensors[key]
        roots.add(what.root.removeprefix(PEFT_ROOT))
    unpaired = [
        f"{weight} has only {', '.join(pair)}" for weight, pair in factors.items() if len(pair) < 2
    ]
    if unpaired:
        raise MissingKeysError(
            f"{directory / ADAPTER_WEIGHTS}: {counted(len(unpaired), 'module')} "
            f"{agree(len(unpaired), 'lacks', 'lack')} a factor: {format_examples(unpaired)}. "
            "Each adapted module needs lora_A and lora_B.",
            unpaired,
        )
    shapes = {key: header.tensors[key].shape for key in header.tensors}
    wrong = factor_mismatches(shapes)
    wrong += [
        f"  {pair['lora_A'].name}: rank {pair['lora_A'].shape[0]}, adapter_config.json says "
        f"r={settings.r}"
        for pair in factors.values()
        if len(pair["lora_A"].shape) == 2 and pair["lora_A"].shape[0] != settings.r
    ]
    if wrong:
        raise LoraError(
            f"{directory / ADAPTER_WEIGHTS}: {counted(len(wrong), 'factor')} "
            f"{agree(len(wrong), 'has', 'have')} the wrong shape:\n" + "\n".join(wrong)
        )
    if len(roots) > 1:
        raise LoraError(
            f"{directory / ADAPTER_WEIGHTS}: factor keys under several roots ({sorted(roots)}); "
            "an adapter names every module the same way"
        )
    pairs = {weight: (pair["lora_A"], pair["lora_B"]) for weight, pair in factors.items()}
    return Adapter(directory, settings, pairs, roots.pop() if roots else "")


# -- check -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Binding:
    """What one ``target_modules`` entry binds, counted per family."""

    target: str
    families: dict[str, int]
    """Family name -> modules of that family the target binds (families with binds only)."""

    def summary(self) -> list[str]:
        """One line per bound family, in table order: ``q_proj: 28 UND, 0 GEN twins``;
        ``vit.fc1: 26 UND``."""
        lines = []
        for family in FAMILIES:
            count = self.families.get(family.name, 0)
            if family.twin is not None:
                if count and family.twin not in self.families:
                    lines.append(f"{family.twin}: 0 UND twins, {count} GEN")
            elif family.name in _GEN_TWIN and count:
                gen = self.families.get(_GEN_TWIN[family.name].name, 0)
                lines.append(f"{family.name}: {count} UND, {gen} GEN twins")
            elif count:
                lines.append(f"{family.name}: {count} {family.bucket.value.upper()}")
        return lines


@dataclass
class AdapterReport:
    """The result of :func:`check_adapter`: per-target binds, errors and warnings."""

    adapter: str
    base: str | None
    settings: LoraSettings
    modules: int
    bindings: list[Binding]
    total: Binding
    """Every module the targets bind together, per family."""
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No errors (warnings allowed)."""
        return not self.errors

    def raise_for_errors(self) -> None:
        """Raise :class:`~bagelverify.errors.LoraError` listing the errors, if any."""
        if self.errors:
            raise LoraError(f"{self.adapter}: " + "; ".join(self.errors))

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data."""
        targets = self.settings.target_modules
        return {
            "adapter": self.adapter,
            "base": self.base,
            "r": self.settings.r,
            "lora_alpha": self.settings.lora_alpha,
            "use_rslora": self.settings.use_rslora,
            "scale": self.settings.scale,
            "target_modules": targets if isinstance(targets, str) else list(targets),
            "modules": self.modules,
            "binds_total": {"families": self.total.families, "summary": self.total.summary()},
            "binds": {
                b.target: {"families": b.families, "summary": b.summary()} for b in self.bindings
            },
            "errors": self.errors,
            "warnings": self.warnings,
        }


def _binding(target: str, families: Iterable[Family]) -> Binding:
    counts: dict[str, int] = {}
    for family in families:
        counts[family.name] = counts.get(family.name, 0) + 1
    return Binding(target, counts)


def _modules(config: BagelConfig, root: str) -> dict[str, Family]:
    """Every LoRA-able module of a model with ``config``, named under ``root``, with its family."""
    return {
        root + key.removesuffix(".weight"): family
        for family in lora_families()
        for key in family.keys(config)
        if key.endswith(".weight")
    }


def _twin_module(module: str, family: Family, root: str) -> str:
    """The GEN twin's module path of an UND module of a twinned family, under ``root``."""
    found = family.match(module[len(root) :] + ".weight")
    assert found is not None
    twin = _GEN_TWIN[family.name].template.format(**found.groupdict())
    return root + twin.removesuffix(".weight")


def check_adapter(
    adapter_dir: str | os.PathLike[str],
    base: str | os.PathLike[str] | None = None,
    *,
    weights: Weights | None = None,
) -> AdapterReport:
    """Check a PEFT adapter folder against BAGEL's layout (and a base checkpoint if given).

    Structural faults raise (see :func:`read_adapter`). The report then holds as errors: a
    ``target_modules`` entry that binds no BAGEL module, factors whose shapes do not fit the
    weights they adapt (with ``base``: its config and its tensors' shapes), and adapted
    weights the base lacks; as warnings: UND modules bound without their ``*_moe_gen`` GEN twins
    (or the reverse), naming the twins left out, and bound modules the file holds no factors
    for. Modules are enumerated for the base's config, else the default BAGEL-7B-MoT config.
    """
    return _check(read_adapter(adapter_dir), base, weights)


def _check(
    adapter: Adapter, base: str | os.PathLike[str] | None, weights: Weights | None
) -> AdapterReport:
    settings = adapter.settings
    shape_config = find_config(base) if base is not None else None
    config = shape_config or BagelConfig()
    modules = _modules(config, adapter.root)
    targets = (
        (settings.target_modules,)
        if isinstance(settings.target_modules, str)
        else settings.target_modules
    )
    bound: dict[str, Family] = {}
    bindings = []
    for target in targets:
        hits = {m: f for m, f in modules.items() if settings.binds(target, m)}
        bound.update(hits)
        bindings.append(_binding(target, hits.values()))
    report = AdapterReport(
        str(adapter.directory),
        None if base is None else str(base),
        settings,
        len(adapter.pairs),
        bindings,
        _binding("all targets", bound.values()),
    )
    for binding in bindings:
        if not binding.families:
            report.errors.append(
                f"target_modules entry {binding.target!r} binds no BAGEL module (a typo, or a "
                f"name of another model; modules are named like "
                f"{adapter.root}language_model.model.layers.0.self_attn.q_proj)"
            )
    _twin_warnings(report, bound, adapter.root)
    missing = [m for m in bound if m[len(adapter.root) :] + ".weight" not in adapter.pairs]
    if missing:
        report.warnings.append(
            f"{counted(len(missing), 'bound module')} {agree(len(missing), 'has', 'have')} no "
            f"factors in {ADAPTER_WEIGHTS}: {format_examples(missing)}"
        )
    shapes = {info.name: info.shape for pair in adapter.pairs.values() for info in pair}
    wrong = factor_mismatches(shapes, config=shape_config)
    if wrong:
        report.errors.append(
            f"{counted(len(wrong), 'factor')} {agree(len(wrong), 'does', 'do')} not fit the "
            f"base's config: {format_examples([line.strip() for line in wrong])}"
        )
    if base is not None:
        _against_base(report, adapter, base, weights)
    return report


def _twin_warnings(report: AdapterReport, bound: Mapping[str, Family], root: str) -> None:
    """Warn about UND modules bound without their GEN twin, and GEN twins without their UND."""
    und_alone: list[str] = []
    gen_alone: list[str] = []
    for module, family in bound.items():
        if family.name in _GEN_TWIN:
            twin = _twin_module(module, family, root)
            if twin not in bound:
                und_alone.append(twin)
        elif family.twin is not None:
            twin = module.replace("_moe_gen", "", 1)
            if twin not in bound:
                gen_alone.append(twin)
    if und_alone:
        report.warnings.append(
            f"{counted(len(und_alone), 'UND module')} {agree(len(und_alone), 'is', 'are')} "
            f"adapted but not {agree(len(und_alone), 'its', 'their')} GEN twin; twins left out: "
            f"{format_examples(und_alone)} (add e.g. '{und_alone[0].rsplit('.', 1)[-1]}' to "
            "target_modules if the generation path should be adapted too)"
        )
    if gen_alone:
        report.warnings.append(
            f"{counted(len(gen_alone), 'GEN twin')} {agree(len(gen_alone), 'is', 'are')} "
            f"adapted but not {agree(len(gen_alone), 'its', 'their')} UND module; UND modules "
            f"left out: {format_examples(gen_alone)}"
        )


def _against_base(
    report: AdapterReport, adapter: Adapter, base: str | os.PathLike[str], weights: Weights | None
) -> None:
    """Errors for adapted weights the base lacks or whose shape the factors do not fit."""
    with open_weights(base, weights) as files:
        tensors = files.tensors
        absent = [weight for weight in adapter.pairs if weight not in tensors]
        if absent:
            report.errors.append(
                f"{counted(len(absent), 'adapted weight')} {agree(len(absent), 'is', 'are')} "
                f"not in the base {files.source}: {format_examples(absent)}"
            )
        misfits = [
            f"{weight} {list(tensors[weight].shape)}: B@A is {[b.shape[0], a.shape[1]]}"
            for weight, (a, b) in adapter.pairs.items()
            if weight in tensors and tuple(tensors[weight].shape) != (b.shape[0], a.shape[1])
        ]
        if misfits:
            report.errors.append(
                f"{counted(len(misfits), 'adapted weight')} of the base {files.source} "
                f"{agree(len(misfits), 'does', 'do')} not have the shape of B@A: "
                f"{format_examples(misfits)}"
            )


# -- merge -------------------------------------------------------------------------------------


def _read(fd: int, info: TensorInfo) -> torch.Tensor:
    out = torch.empty(info.shape, dtype=info.torch_dtype)
    read_into(fd, info, out)
    return out


def merged_weight(
    weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float
) -> torch.Tensor:
    """``W + scale * B @ A`` computed in F32 and rounded once to ``W``'s dtype."""
    delta = b.to(torch.float32) @ a.to(torch.float32)
    return (weight.to(torch.float32) + scale * delta).to(weight.dtype)


@dataclass(frozen=True)
class MergePlan:
    """What :func:`merge_adapter` changes: the adapted weights, the scale, the files written."""

    base: str
    adapter: str
    out: str
    scale: float
    weights: list[str]
    files: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """The plan as JSON-ready data."""
        return {
            "base": self.base,
            "adapter": self.adapter,
            "out": self.out,
            "scale": self.scale,
            "merged": self.weights,
            "files": self.files,
        }


def merge_adapter(
    base: str | os.PathLike[str],
    adapter: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    dry_run: bool = False,
    stage: StageLike | None = None,
    weights: Weights | None = None,
    overwrite: bool = False,
) -> MergePlan:
    """Merge a LoRA adapter into a base checkpoint: ``W + s * B @ A`` for every adapted weight.

    ``s`` is ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``). The adapter is
    checked first (:func:`check_adapter` against the base; any error raises
    :class:`~bagelverify.errors.LoraError`). The base is streamed one tensor at a time through
    :func:`bagelverify.convert_checkpoint` (validated like a load, written atomically with the
    base's config); each adapted weight is computed in F32 and rounded once to its stored
    dtype. ``stage`` picks what is written (default: ``"stage2"`` when the base holds GEN
    weights, else ``"stage1"``); an adapted weight the stage drops is an error. ``dry_run``
    checks and returns the plan, writing nothing.
    """
    checked = read_adapter(adapter)
    report = _check(checked, base, weights)
    report.raise_for_errors()
    for warning in report.warnings:
        logger.warning("%s: %s", adapter, warning)
    if stage is None:
        with open_weights(base, weights) as files:
            stage = held_stage(files.tensors)
    keep = STAGE_BUCKETS[normalize_stage(stage)]
    dropped = [weight for weight in checked.pairs if classify(weight) not in keep]
    if dropped:
        raise LoraError(
            f"{adapter}: {counted(len(dropped), 'adapted weight')} "
            f"{agree(len(dropped), 'is', 'are')} not written for {stage}: "
            f"{format_examples(dropped)}; merge for stage2"
        )
    scale = checked.settings.scale
    plan = MergePlan(str(base), str(adapter), str(out), scale, sorted(checked.pairs))
    if dry_run:
        return plan
    fd = open_regular(checked.directory / ADAPTER_WEIGHTS)
    try:

        def transform(hf_key: str, tensor: torch.Tensor) -> torch.Tensor:
            pair = checked.pairs.get(hf_key)
            if pair is None:
                return tensor
            return merged_weight(tensor, _read(fd, pair[0]), _read(fd, pair[1]), scale)

        written = convert_checkpoint(
            base, out, stage=stage, weights=weights, transform=transform, overwrite=overwrite
        )
    finally:
        os.close(fd)
    return MergePlan(
        plan.base, plan.adapter, plan.out, scale, plan.weights, [str(p) for p in written]
    )


__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "Adapter",
    "AdapterReport",
    "Binding",
    "LoraSettings",
    "MergePlan",
    "check_adapter",
    "merge_adapter",
    "merged_weight",
    "read_adapter",
    "read_settings",
]
