"""Compose a BAGEL initialisation from its backbones: a Qwen2 and a SigLIP Hugging Face folder.

Where each BAGEL tensor comes from is declared in :mod:`bagelverify.backbones`. Every backbone
key is routed (an unknown one is an error naming it) and every shape is checked against the
config before anything is written; then the checkpoint is streamed, one tensor at a time,
through :func:`bagelverify.checkpoint.write_bagel_checkpoint` (validated like a load, published
atomically): backbone tensors are read by the read engine and written byte for byte (the SigLIP
Conv2d patch weight permuted to BAGEL's Linear layout), GEN twins are their UND tensors again,
QK norms are ones, the two position tables are regenerated, and the connector, time embedder and
``vae2llm`` are drawn from one seeded generator the way NeMo Automodel's ``hf_backbones``
initialisation draws them (``llm2vae`` zero).
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .backbones import (
    BACKBONES,
    CONV_TO_LINEAR,
    COPIED,
    SEED_ORDER,
    Backbone,
    BackboneConfig,
    composed_families,
    config_mismatches,
    fill_of,
    read_backbone_config,
    route,
)
from .checkpoint import (
    INDEX_FILE,
    MODEL_WEIGHTS_FILE,
    ReadJob,
    fill,
    open_checkpoint,
    write_bagel_checkpoint,
)
from .config import (
    CONFIG_FILE,
    DERIVED_FROM,
    LLM_CONFIG_FILE,
    VIT_CONFIG_FILE,
    BagelConfig,
    field_source,
)
from .errors import (
    ConfigError,
    KeyCollisionError,
    MissingKeysError,
    ShapeMismatchError,
    UnknownKeysError,
    agree,
    counted,
    format_examples,
)
from .families import FAMILY_BY_NAME, Family
from .patch_embedding import conv_shape_of
from .pos_embed import position_table
from .safetensors_io import DEFAULT_METADATA, DTYPES, TensorInfo, TensorSpec, dtype_name

logger = logging.getLogger(__name__)

ORIGINS_METADATA = "bagelverify_origins"
"""``__metadata__`` field of a composed file: JSON object, tensor key -> its origin."""
COMPOSE_METADATA = "bagelverify_compose"
"""``__metadata__`` field of a composed file: JSON object with the seed and created dtype."""

LLM_OVERRIDES: dict[str, Any] = {
    "qk_norm": True,
    "tie_word_embeddings": False,
    "layer_module": "Qwen2MoTDecoderLayer",
}
"""Fields BAGEL sets in ``llm_config.json`` over the Qwen2 config (Automodel's
``build_bagel_from_hf_backbones`` sets the same on the config it builds from)."""

TIED_LM_HEAD = "embed_tokens"
"""The family ``lm_head`` is copied from when the Qwen2 config ties them and the folder has no
``lm_head.weight`` (BAGEL's language model is untied)."""


@dataclass(frozen=True)
class Origin:
    """Where one composed tensor's values come from.

    ``kind``: ``"llm"`` / ``"vit"`` (a backbone tensor, ``source`` its key), ``"twin"`` (the
    UND tensor ``source``), ``"ones"``, ``"zeros"``, ``"sincos"`` (the position table) or
    ``"seeded"``.
    """

    kind: str
    source: str | None = None
    convert: str | None = None

    def describe(self) -> str:
        """``llm:model.norm.weight``, ``vit:…patch_embedding.weight (conv_to_linear)``,
        ``twin:language_model.model.norm.weight``, ``ones``, ``seeded``…"""
        text = self.kind if self.source is None else f"{self.kind}:{self.source}"
        return text if self.convert is None else f"{text} ({self.convert})"


@dataclass
class ComposeReport:
    """What :func:`compose_checkpoint` wrote (or, dry, would write)."""

    llm: str
    vit: str
    out: str
    config: BagelConfig
    seed: int
    dtype: str
    """Dtype of the tensors no backbone holds (backbone tensors keep theirs)."""
    origins: dict[str, Origin]
    """Every BAGEL key written -> its origin, in table order."""
    dropped: dict[str, str]
    """``llm:KEY`` / ``vit:KEY`` of each backbone tensor not used -> why."""
    defaulted: list[str] = field(default_factory=list)
    """``llm:FIELD`` / ``vit:FIELD``: config.json fields left out, their HF default used."""
    bytes: int = 0
    files: list[str] = field(default_factory=list)
    dry_run: bool = False

    def counts(self) -> dict[str, int]:
        """Origin kind -> tensors, e.g. ``{"llm": 339, "twin": 338, …}``."""
        out: dict[str, int] = {}
        for origin in self.origins.values():
            out[origin.kind] = out.get(origin.kind, 0) + 1
        return out

    def dropped_counts(self) -> dict[str, int]:
        """Reason -> backbone tensors dropped for it."""
        out: dict[str, int] = {}
        for reason in self.dropped.values():
            out[reason] = out.get(reason, 0) + 1
        return out

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data."""
        return {
            "llm": self.llm,
            "vit": self.vit,
            "out": self.out,
            "dry_run": self.dry_run,
            "seed": self.seed,
            "dtype": self.dtype,
            "bytes": self.bytes,
            "config": self.config.to_json_documents(),
            "counts": self.counts(),
            "origins": {key: origin.describe() for key, origin in self.origins.items()},
            "dropped": self.dropped,
            "defaulted": self.defaulted,
            "files": self.files,
        }


# -- planning ----------------------------------------------------------------------------------


def _resolve_config(
    given: object, found: Mapping[Backbone, BackboneConfig]
) -> tuple[BagelConfig, bool]:
    """The config to compose for (and whether it was given): ``given`` (a BagelConfig or a BAGEL
    folder), else the backbones' sizes with BAGEL's own fields at the release's values."""
    if given is None:
        sizes: dict[str, Any] = {k: v for read in found.values() for k, v in read.sizes.items()}
        try:
            return BagelConfig(**sizes), False
        except ConfigError as error:
            raise ConfigError(f"the backbones' config.json files: {error}") from None
    if isinstance(given, BagelConfig):
        return given, True
    if isinstance(given, (str, os.PathLike)):
        return BagelConfig.from_pretrained(given), True
    raise TypeError(
        f"config must be a bagelverify.BagelConfig, a BAGEL folder or None, got "
        f"{type(given).__name__}"
    )


def _sized_by(family: Family, param: str, config: BagelConfig, dim: int) -> str:
    """The config field behind dimension ``dim`` of ``param``: ``llm_config.json
    hidden_size = 3584`` (a derived size names the fields it is computed from)."""
    assert family.shape is not None
    attribute = family.shape.dims(param)[dim]
    names = DERIVED_FROM.get(attribute, (attribute,))
    parts = []
    for name in names:
        source = field_source(name)
        where = f"{source[0]} {source[1]}" if source else name
        parts.append(f"{where} = {getattr(config, name)}")
    derived = "" if attribute in names else f"{attribute} = {getattr(config, attribute)} from "
    return derived + ", ".join(parts)


_Wrong = tuple[str, tuple[int, ...], tuple[int, ...], str]
"""A backbone tensor of another size: its label, the expected shape (``()``: a layer the config
does not have), its shape, and the config fields that size the dimension that differs."""


def _size_error(wrong: list[_Wrong], given: bool) -> ShapeMismatchError:
    """One error for backbone tensors of another size: the fields first, then examples."""
    fields = list(dict.fromkeys(why for *_, why in wrong))
    lines = [
        f"  {key}: {list(found)}, "
        + (f"expected {list(expected)}" if expected else "a layer the config does not have")
        for key, expected, found, _ in wrong
    ]
    fix = (
        "compose with a config of the backbones' size (leave config out to take it from their "
        "config.json files) or pass backbones of the config's size"
        if given
        else "the backbone's tensors disagree with its own config.json; fix the folder"
    )
    return ShapeMismatchError(
        f"the backbones are another size than the BAGEL config: "
        f"{counted(len(wrong), 'tensor')} {agree(len(wrong), 'does', 'do')} not have the shape "
        f"the config field{'s' if len(fields) > 1 else ''} {'; '.join(fields)} "
        f"{agree(len(fields), 'gives', 'give')}:\n"
        + "\n".join(lines[:8])
        + (f"\n  (and {len(lines) - 8:,} more)" if len(lines) > 8 else "")
        + f"\nNothing was written; {fix}.",
        [(key, expected, found) for key, expected, found, _ in wrong],
    )


@dataclass
class CompositionPlan:
    """Every composed tensor's origin and shape, checked against the backbones' headers, and
    the read job of every backbone tensor used (its file open until the plan's ``with`` ends).
    """

    config: BagelConfig
    origins: dict[str, Origin]
    shapes: dict[str, tuple[int, ...]]
    jobs: dict[str, ReadJob]
    """Backbone ``kind:key`` -> its read job."""
    dropped: dict[str, str]
    defaulted: list[str]
    found: dict[Backbone, BackboneConfig]

    def source_of(self, key: str) -> str:
        """The key whose value ``key`` holds: a twin's UND key, else ``key`` itself."""
        origin = self.origins[key]
        return origin.source if origin.kind == "twin" and origin.source else key

    def job(self, key: str) -> ReadJob | None:
        """The read job of the backbone tensor ``key`` is copied from (``None``: no backbone
        tensor; a twin names its UND key's job through :meth:`source_of`)."""
        origin = self.origins[key]
        return self.jobs[f"{origin.kind}:{origin.source}"] if origin.kind in BACKBONES else None


def _stored_shape(info: TensorInfo, convert: bool, config: BagelConfig) -> tuple[int, ...]:
    """A backbone tensor's shape once composed; a patch weight not in the conv shape the config
    implies keeps its own (and fails the shape check)."""
    shape = tuple(info.shape)
    if convert and len(shape) == 4:
        conv = conv_shape_of(
            (shape[0],), patch_size=config.vit_patch_size, channels=config.vit_num_channels
        )
        if shape == conv:
            return (shape[0], math.prod(shape[1:]))
    return shape


def _plan(folders: Mapping[Backbone, Path], given: object, stack: ExitStack) -> CompositionPlan:
    found = {backbone: read_backbone_config(backbone, folders[backbone]) for backbone in BACKBONES}
    config, was_given = _resolve_config(given, found)
    if was_given:
        mismatched = config_mismatches(config, found)
        if mismatched:
            raise ConfigError(
                "the backbones are another size than the BAGEL config ("
                + "; ".join(mismatched)
                + "). Nothing was written; compose with a config of the backbones' size (leave "
                "config out to take it from their config.json files) or pass backbones of the "
                "config's size."
            )
    families = composed_families(config)
    expected = {key: (f, key) for f in families for key in f.keys(config)}
    shapes = {key: shape for f in families for key, shape in f.expected_shapes(config).items()}

    mapped: dict[str, tuple[str, ReadJob]] = {}  # BAGEL key -> (kind:key, job)
    jobs: dict[str, ReadJob] = {}
    dropped: dict[str, str] = {}
    unknown: list[str] = []
    collisions: list[tuple[str, str]] = []
    roots: dict[Backbone, dict[str, str]] = {"llm": {}, "vit": {}}  # root -> a key under it
    for backbone in BACKBONES:
        folder = folders[backbone]
        if not any((folder / name).is_file() for name in (MODEL_WEIGHTS_FILE, INDEX_FILE)):
            raise FileNotFoundError(
                f"{folder}: no {MODEL_WEIGHTS_FILE} and no {INDEX_FILE}; compose reads "
                "safetensors backbones (re-save a .bin folder with transformers' save_pretrained)"
            )
        files = stack.enter_context(open_checkpoint(folder, keep_open=True))
        for key, info in files.tensors.items():
            routed = route(backbone, key, config)
            label = f"{backbone}:{key}"
            if routed is None:
                unknown.append(label)
                continue
            if routed.bagel_key is None:
                dropped[label] = routed.reason or ""
                continue
            roots[backbone].setdefault(routed.root, label)
            job = ReadJob(info, routed.convert, files.fds[info.path])
            if routed.bagel_key in mapped:
                collisions.append((mapped[routed.bagel_key][0], label))
                continue
            mapped[routed.bagel_key] = (label, job)
            jobs[label] = job
    if unknown:
        raise UnknownKeysError(
            f"{counted(len(unknown), 'backbone key')} {agree(len(unknown), 'maps', 'map')} to no "
            f"BAGEL key and no declared drop rule: {format_examples(unknown)}. Is --llm a Qwen2 "
            "folder and --vit a SigLIP one? (bagelverify.backbones declares what each key maps "
            "to.) Nothing was written.",
            unknown,
        )
    mixed = [tuple(found.values()) for found in roots.values() if len(found) > 1]
    if collisions or mixed:
        same = " (each pair fills one BAGEL tensor)" if collisions else ""
        raise KeyCollisionError(
            f"a backbone folder names its tensors two ways (with and without vision_model.): "
            f"{format_examples(collisions or mixed)}{same}; re-save it with one naming. Nothing "
            "was written.",
            collisions,
        )
    tied = found["llm"].tied
    lm_head = FAMILY_BY_NAME["lm_head"].template.format(param="weight")
    embed = FAMILY_BY_NAME[TIED_LM_HEAD].template.format(param="weight")
    if tied and lm_head not in mapped and embed in mapped:
        mapped[lm_head] = mapped[embed]

    beyond = [key for key in mapped if key not in expected]
    origins: dict[str, Origin] = {}
    missing: list[str] = []
    wrong: list[_Wrong] = []
    for key, (family, _) in expected.items():
        if family.name in COPIED:
            if key not in mapped:
                missing.append(key)
                continue
            label, job = mapped[key]
            kind, source = label.split(":", 1)
            convert = CONV_TO_LINEAR if job.convert else None
            origins[key] = Origin(kind, source, convert)
            stored = _stored_shape(job.info, job.convert, config)
            if stored != shapes[key]:
                param = key.rsplit(".", 1)[1]
                dims = [
                    d
                    for d in range(len(shapes[key]))
                    if d >= len(stored) or stored[d] != shapes[key][d]
                ] or [0]
                why = _sized_by(family, param, config, dims[0])
                wrong.append((label, shapes[key], tuple(job.info.shape), why))
            continue
        fill = fill_of(family)
        assert fill is not None, family.name  # the tests check every family has a rule
        if fill == "twin":
            assert family.twin is not None
            und = FAMILY_BY_NAME[family.twin]
            found_slots = family.match(key)
            assert found_slots is not None
            origins[key] = Origin("twin", und.template.format(**found_slots.groupdict()))
        else:
            origins[key] = Origin(fill)
    for key in beyond:  # only layer keys can be beyond: every other family is enumerated
        label = mapped[key][0]
        attribute = "num_hidden_layers" if label.startswith("llm:") else "vit_num_hidden_layers"
        named = field_source(attribute)
        assert named is not None
        why = f"{named[0]} {named[1]} = {getattr(config, attribute)}"
        wrong.append((label, (), tuple(mapped[key][1].info.shape), why))
    if wrong:
        raise _size_error(wrong, was_given)
    if missing:
        raise MissingKeysError(
            f"the backbones lack {counted(len(missing), 'tensor')} BAGEL copies from them: "
            f"{format_examples(missing)}; check that the folders hold whole Qwen2 and SigLIP "
            "models (a sharded folder needs every shard its index names). Nothing was written.",
            missing,
        )
    defaulted = [f"{b}:{name}" for b in BACKBONES for name in found[b].defaulted]
    return CompositionPlan(config, origins, shapes, jobs, dropped, defaulted, found)


# -- values ------------------------------------------------------------------------------------


class _Buffers:
    """Memory that read tensors reuse: a tensor read is a view of a free buffer, which is free
    again once the tensor is released. Pages are faulted in once instead of for every tensor
    (a fresh allocation per tensor makes the kernel zero gigabytes of pages, under memory
    pressure by reclaiming page cache). At most two buffers are kept (two tensors are in flight
    with read-ahead)."""

    KEPT = 2

    def __init__(self) -> None:
        self._free: list[torch.Tensor] = []
        self._count = 0
        self._lock = threading.Lock()

    def read(self, job: ReadJob) -> torch.Tensor:
        """``job``'s tensor (its loaded shape and the file's dtype) in a reused buffer."""
        nbytes = job.info.nbytes
        with self._lock:
            fitting = [i for i, b in enumerate(self._free) if b.numel() >= nbytes]
            best = min(fitting, key=lambda i: self._free[i].numel(), default=None)
            buffer = None if best is None else self._free.pop(best)
        if buffer is None:
            buffer = torch.empty(nbytes, dtype=torch.uint8)
            with self._lock:
                self._count += 1
        tensor = buffer[:nbytes].view(job.info.torch_dtype).view(job.shape)
        weakref.finalize(tensor, self._give, buffer)
        fill({job.info.name: job}, {job.info.name: tensor})
        return tensor

    def _give(self, buffer: torch.Tensor) -> None:
        with self._lock:
            self._free.append(buffer)
            if self._count > self.KEPT:  # drop the smallest free buffer
                smallest = min(range(len(self._free)), key=lambda i: self._free[i].numel())
                del self._free[smallest]
                self._count -= 1


def seeded_values(config: BagelConfig, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The seeded modules' tensors (HF key -> tensor of ``dtype``): one CPU generator seeded
    with ``seed``, the modules drawn in :data:`~bagelverify.backbones.SEED_ORDER`, each
    ``weight`` Kaiming-uniform (``a = sqrt(5)``, torch's Linear default) then ``bias`` uniform in
    ``±1/sqrt(fan_in)``, drawn in ``dtype``; ``llm2vae``'s draws are replaced by zeros."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name in SEED_ORDER:
        family = FAMILY_BY_NAME[name]
        shapes = family.expected_shapes(config)
        weight_key, bias_key = (family.template.format(param=p) for p in ("weight", "bias"))
        weight = torch.empty(shapes[weight_key], dtype=dtype)
        torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
        fan_in = weight.shape[1]
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        bias = torch.empty(shapes[bias_key], dtype=dtype)
        torch.nn.init.uniform_(bias, -bound, bound, generator=generator)
        if fill_of(family) == "zeros":
            weight.zero_()
            bias.zero_()
        out[weight_key], out[bias_key] = weight, bias
    return out


def _dtype(given: object, plan: CompositionPlan) -> torch.dtype:
    if given is None:
        embed = plan.job(FAMILY_BY_NAME["embed_tokens"].template.format(param="weight"))
        assert embed is not None
        return embed.info.torch_dtype
    if isinstance(given, torch.dtype):
        return given
    if isinstance(given, str) and given.upper() in DTYPES:
        return DTYPES[given.upper()].torch_dtype
    aliases = {"bf16": "BF16", "bfloat16": "BF16", "f32": "F32", "float32": "F32", "f16": "F16"}
    if isinstance(given, str) and given.lower() in aliases:
        return DTYPES[aliases[given.lower()]].torch_dtype
    raise ConfigError(f"dtype {given!r}: use a torch dtype or bf16, f16, f32")


@contextmanager
def plan_composition(
    llm: str | os.PathLike[str], vit: str | os.PathLike[str], config: object = None
) -> Iterator[CompositionPlan]:
    """Route and check two backbone folders for ``config`` (see :func:`compose_checkpoint`,
    which raises the same errors); the backbone files stay open for the ``with`` block."""
    with ExitStack() as stack:
        yield _plan({"llm": Path(llm), "vit": Path(vit)}, config, stack)


def compose_checkpoint(
    *,
    llm: str | os.PathLike[str],
    vit: str | os.PathLike[str],
    out: str | os.PathLike[str],
    config: BagelConfig | str | os.PathLike[str] | None = None,
    seed: int = 0,
    dtype: torch.dtype | str | None = None,
    dry_run: bool = False,
    overwrite: bool = False,
    on_tensor: Callable[[str, int], None] | None = None,
    read_ahead: bool = True,
) -> ComposeReport:
    """Write a BAGEL checkpoint (stage 2: UND and GEN) composed from a Qwen2 and a SigLIP folder.

    Args:
        llm: a Hugging Face Qwen2 folder (``config.json``, ``model.safetensors`` or its index).
        vit: a SigLIP folder: vision-only (keys with or without ``vision_model.``) or a full
            ``SiglipModel`` (its text tower and logit scale are dropped).
        out: the folder to write: ``ema.safetensors``, ``config.json``, ``llm_config.json``,
            ``vit_config.json`` (no ``ae.safetensors``: no backbone holds BAGEL's VAE).
        config: the BAGEL config to compose for (a :class:`BagelConfig` or a BAGEL folder); the
            backbones must have its sizes. ``None``: the backbones' sizes, BAGEL's own fields at
            BAGEL-7B-MoT's values.
        seed: seeds the connector, time embedder and ``vae2llm`` initialisation.
        dtype: dtype of the tensors no backbone holds (default: the language model's
            ``embed_tokens`` dtype); backbone tensors keep their stored dtype and bytes.
        dry_run: check everything and return the report, writing nothing.
        overwrite: replace a checkpoint already in ``out``.
        on_tensor: ``on_tensor(key, nbytes)`` after each tensor is read (progress; called on
            the reading thread).
        read_ahead: read the next tensor while one is written (at most 1.5 times the largest
            tensor in memory instead of once; faster where writing waits on the disk).

    Returns:
        A :class:`ComposeReport`: every tensor's origin (also in the file's ``__metadata__``
        under :data:`ORIGINS_METADATA`), what was dropped and why, the files written.

    Every backbone key is routed and every shape checked before anything is written:
    :class:`~bagelverify.errors.UnknownKeysError` names backbone keys of no family,
    :class:`~bagelverify.errors.ShapeMismatchError` / :class:`~bagelverify.errors.ConfigError`
    name the config fields a backbone of another size disagrees with,
    :class:`~bagelverify.errors.MissingKeysError` the BAGEL tensors no backbone key fills.

    Example:
        >>> report = compose_checkpoint(llm="Qwen2.5-7B", vit="siglip", out="bagel-init")
        ... # doctest: +SKIP
    """
    with plan_composition(llm, vit, config) as plan:
        made = _dtype(dtype, plan)
        made_name = dtype_name(made)
        specs: dict[str, TensorSpec] = {}
        for key in plan.origins:
            job = plan.job(plan.source_of(key))
            stored = made_name if job is None else job.info.dtype
            specs[key] = TensorSpec(key, stored, plan.shapes[key])
        report = ComposeReport(
            str(llm),
            str(vit),
            str(out),
            plan.config,
            seed,
            made_name,
            plan.origins,
            plan.dropped,
            plan.defaulted,
            bytes=sum(spec.nbytes for spec in specs.values()),
            dry_run=dry_run,
        )
        if dry_run:
            return report
        seeded: dict[str, torch.Tensor] = {}
        buffers = _Buffers()

        def value(key: str) -> torch.Tensor:
            source = plan.source_of(key)
            origin, job = plan.origins[source], plan.job(source)
            if job is not None:
                return buffers.read(job)
            shape = plan.shapes[key]
            if origin.kind == "ones":
                return torch.ones(shape, dtype=made)
            if origin.kind == "zeros":
                return torch.zeros(shape, dtype=made)
            if origin.kind == "sincos":
                return position_table(source, plan.config, made)
            if not seeded:
                seeded.update(seeded_values(plan.config, seed, made))
            return seeded[source]

        def fetch(key: str) -> torch.Tensor:
            tensor = value(key)
            if on_tensor is not None:
                on_tensor(key, specs[key].nbytes)
            return tensor

        metadata = {
            **DEFAULT_METADATA,
            ORIGINS_METADATA: json.dumps(
                {key: origin.describe() for key, origin in plan.origins.items()},
                separators=(",", ":"),
            ),
            COMPOSE_METADATA: json.dumps({"seed": seed, "dtype": made_name}),
        }
        written = write_bagel_checkpoint(
            specs,
            fetch,
            out,
            stage="stage2",
            strict=True,
            config=plan.config,
            overwrite=overwrite,
            inputs=(llm, vit),
            metadata=metadata,
            config_base=_config_documents(plan.found),
            read_ahead=read_ahead,
        )
        report.files = [str(path) for path in written]
        logger.info("%s: composed %d tensors from %s and %s", out, len(specs), llm, vit)
        return report


def _config_documents(found: Mapping[Backbone, BackboneConfig]) -> dict[str, dict[str, Any]]:
    """The backbones' own config fields, kept in the BAGEL config files they become."""
    llm = {**found["llm"].document, **LLM_OVERRIDES}
    vit = {**found["vit"].document, "model_type": "siglip_vision_model"}
    return {LLM_CONFIG_FILE: llm, VIT_CONFIG_FILE: vit, CONFIG_FILE: {}}


def read_origins(metadata: Mapping[str, str]) -> dict[str, str]:
    """The origins a composed file's ``__metadata__`` records (key -> origin text)."""
    text = metadata.get(ORIGINS_METADATA)
    return {} if text is None else dict(json.loads(text))


__all__ = [
    "COMPOSE_METADATA",
    "ORIGINS_METADATA",
    "ComposeReport",
    "CompositionPlan",
    "Origin",
    "compose_checkpoint",
    "plan_composition",
    "read_origins",
    "seeded_values",
]
