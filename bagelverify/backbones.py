"""Qwen2 and SigLIP backbone keys, and where each one goes in a BAGEL checkpoint.

BAGEL starts from two public Hugging Face folders: a Qwen2 language model (``model.layers.N…``,
``model.embed_tokens``, ``model.norm``, ``lm_head``) and a SigLIP vision tower (a vision-only
``SiglipVisionModel`` folder, its keys under ``vision_model.`` or, as transformers 5 saves
them, without it; or a full ``SiglipModel`` folder, which adds a text tower). Everything here is
declared over the BAGEL family table (:mod:`bagelverify.families`), in four tables:

:data:`ROOTS`
    the prefix a backbone's keys carry where BAGEL's carry theirs;
:data:`COPIED`
    the BAGEL families filled from a backbone tensor (the backbone family is the BAGEL one
    under the backbone's root), and the one conversion (the Conv2d patch weight);
:data:`DROPPED`
    backbone families BAGEL has no place for, each with the reason;
:data:`FILLED`
    every other BAGEL family and where its value comes from (twins, ones, tables, seeded).

A backbone key of no family is an error (:func:`route` returns ``None``); so is a BAGEL family
in none of the tables (the tests check that every family is in exactly one).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal

from .buckets import Bucket
from .config import FIELD_SOURCES, LLM_CONFIG_FILE, VIT_CONFIG_FILE, BagelConfig
from .errors import ConfigError
from .families import FAMILIES, FAMILY_BY_NAME, Family
from .strict_json import MAX_CONFIG_BYTES, read_json_file

Backbone = Literal["llm", "vit"]
BACKBONES: tuple[Backbone, ...] = ("llm", "vit")
HF_CONFIG = "config.json"
"""The config file of a Hugging Face model folder."""


@dataclass(frozen=True)
class Root:
    """Where a backbone's keys sit: BAGEL's prefix, and the prefixes the backbone uses instead
    (several when its layouts differ; a folder uses one of them)."""

    backbone: Backbone
    bagel: str
    found: tuple[str, ...]
    config_file: str
    """The BAGEL config file that records this backbone's sizes."""


ROOTS: dict[Backbone, Root] = {
    "llm": Root("llm", "language_model.", ("",), LLM_CONFIG_FILE),
    # vision_model.: the hub's SigLIP folders and full SiglipModel; none: transformers 5's
    # SiglipVisionModel.save_pretrained
    "vit": Root("vit", "vit_model.vision_model.", ("vision_model.", ""), VIT_CONFIG_FILE),
}

CONV_TO_LINEAR = "conv_to_linear"
"""The one conversion: a SigLIP Conv2d patch weight to BAGEL's Linear layout."""

#: BAGEL family -> conversion of its ``weight`` (``None``: bytes copied as stored).
COPIED: dict[str, str | None] = {
    "embed_tokens": None,
    "lm_head": None,
    "norm": None,
    "q_proj": None,
    "k_proj": None,
    "v_proj": None,
    "o_proj": None,
    "gate_proj": None,
    "up_proj": None,
    "down_proj": None,
    "input_layernorm": None,
    "post_attention_layernorm": None,
    "vit.position_embedding": None,
    "vit.patch_embedding": CONV_TO_LINEAR,
    "vit.q_proj": None,
    "vit.k_proj": None,
    "vit.v_proj": None,
    "vit.out_proj": None,
    "vit.layer_norm1": None,
    "vit.layer_norm2": None,
    "vit.fc1": None,
    "vit.fc2": None,
    "vit.post_layernorm": None,
}

#: (backbone, template under the backbone's root (``{root}``: each of its prefixes), reason).
DROPPED: tuple[tuple[Backbone, str, str], ...] = (
    (
        "vit",
        "{root}head.{path}",
        "SigLIP's attention-pooling head; BAGEL feeds the patch features to its connector",
    ),
    ("vit", "text_model.{path}", "the text tower of a full SigLIP model"),
    ("vit", "logit_scale", "the contrastive logit scale of a full SigLIP model"),
    ("vit", "logit_bias", "the contrastive logit bias of a full SigLIP model"),
)
PAST_SELECT_LAYER = (
    "a vision layer past vit_select_layer=-2: BAGEL keeps the tower's layers but its last"
)
"""Why a SigLIP encoder layer numbered ``vit_layers_used`` or more is dropped."""

Fill = Literal["ones", "zeros", "sincos", "seeded", "twin"]

#: BAGEL family -> where its values come from when no backbone holds it. Every GEN twin
#: (``*_moe_gen``) is ``"twin"``: a copy of its UND family's value.
FILLED: dict[str, Fill] = {
    "q_norm": "ones",  # Qwen2 has no QK norms; BAGEL's start as the identity
    "k_norm": "ones",
    "vit_pos_embed": "sincos",
    "latent_pos_embed": "sincos",
    "connector.fc1": "seeded",
    "connector.fc2": "seeded",
    "time_embedder.0": "seeded",
    "time_embedder.2": "seeded",
    "vae2llm": "seeded",
    "llm2vae": "zeros",  # its seeded draws are taken, then overwritten (see SEED_ORDER)
}

SEED_ORDER: tuple[str, ...] = (
    "time_embedder.0",
    "time_embedder.2",
    "vae2llm",
    "llm2vae",
    "connector.fc1",
    "connector.fc2",
)
"""The order in which the seeded modules draw from one generator (each ``weight`` then
``bias``): NeMo Automodel's ``initialize_bagel_non_backbone_weights`` for a stage-2 model, whose
``llm2vae`` draws are then overwritten by zeros."""

UNSUPPORTED: dict[str, str] = {
    "vit.rope": "vit_rope=True: a SigLIP backbone has a learned position table, not rope buffers",
}
"""BAGEL families no backbone and no fill rule provide: a config that has them is refused."""


@dataclass(frozen=True)
class Source:
    """A backbone key family: the backbone-side family and the BAGEL family it fills."""

    backbone: Backbone
    family: Family
    target: Family
    root: str
    """The backbone prefix this family is written under."""

    @property
    def convert(self) -> str | None:
        """The conversion of the ``weight`` of this family (see :data:`COPIED`)."""
        return COPIED[self.target.name]


@dataclass(frozen=True)
class Drop:
    """A backbone key family BAGEL has no place for."""

    backbone: Backbone
    family: Family
    reason: str


def _backbone_family(family: Family, root: Root, found: str) -> Family:
    template = found + family.template[len(root.bagel) :]
    return Family(f"{root.backbone}:{found}{family.name}", template, family.bucket, family.params)


@cache
def sources() -> tuple[Source, ...]:
    """Every backbone family that fills a BAGEL family, derived from :data:`COPIED`."""
    out = []
    for name in COPIED:
        target = FAMILY_BY_NAME[name]
        for root in ROOTS.values():
            if target.template.startswith(root.bagel):
                for found in root.found:
                    family = _backbone_family(target, root, found)
                    out.append(Source(root.backbone, family, target, found))
    return tuple(out)


@cache
def drops() -> tuple[Drop, ...]:
    """Every dropped backbone family, from :data:`DROPPED`."""
    out = []
    for backbone, template, reason in DROPPED:
        roots = ROOTS[backbone].found if "{root}" in template else ("",)
        for found in roots:
            text = template.replace("{root}", found)
            out.append(Drop(backbone, Family(f"drop:{text}", text, Bucket.UNKNOWN), reason))
    return tuple(out)


@dataclass(frozen=True)
class Routed:
    """Where one backbone key goes: a BAGEL key (``convert`` for the patch weight), or dropped
    with a reason."""

    key: str
    backbone: Backbone
    bagel_key: str | None = None
    convert: bool = False
    reason: str | None = None
    root: str = ""


def route(backbone: Backbone, key: str, config: BagelConfig) -> Routed | None:
    """Where backbone key ``key`` goes for ``config``; ``None`` when it belongs to no family.

    A SigLIP encoder layer past BAGEL's last one is dropped (:data:`PAST_SELECT_LAYER`) if the
    config's tower has it; a layer beyond the config's tower, or a language-model layer beyond
    ``num_hidden_layers``, is routed to the BAGEL key it would be (which the config lacks: the
    caller reports the size).
    """
    for source in sources():
        if source.backbone != backbone:
            continue
        found = source.family.match(key)
        if found is None:
            continue
        slots = found.groupdict()
        bagel_key = source.target.template.format(**slots)
        layer = int(slots["layer"]) if slots.get("layer") is not None else -1
        if backbone == "vit" and config.vit_layers_used <= layer < config.vit_num_hidden_layers:
            return Routed(key, backbone, reason=PAST_SELECT_LAYER, root=source.root)
        convert = source.convert is not None and slots.get("param") == "weight"
        return Routed(key, backbone, bagel_key, convert, root=source.root)
    for drop in drops():
        if drop.backbone == backbone and drop.family.match(key):
            return Routed(key, backbone, reason=drop.reason)
    return None


def fill_of(family: Family) -> Fill | None:
    """How ``family`` is filled when no backbone holds it (``None``: a backbone holds it)."""
    if family.twin is not None:
        return "twin"
    return FILLED.get(family.name)


def composed_families(config: BagelConfig) -> tuple[Family, ...]:
    """The families of a composed (stage 2) checkpoint for ``config``: UND and GEN ones present
    in the config. Raises :class:`~bagelverify.errors.ConfigError` for an unsupported one."""
    out = []
    for family in FAMILIES:
        if family.shape is None or family.bucket not in (Bucket.UND, Bucket.GEN):
            continue
        if family.present is not None and not family.present(config):
            continue
        if family.name in UNSUPPORTED:
            raise ConfigError(
                f"cannot compose a BAGEL checkpoint with {UNSUPPORTED[family.name]}; compose with "
                "vit_rope=False (the release's layout)"
            )
        out.append(family)
    return tuple(out)


# -- the backbones' config files ---------------------------------------------------------------

#: Hugging Face defaults of fields a config.json may leave out (transformers writes only
#: non-default fields of older configs): Qwen2Config's and SiglipVisionConfig's.
HF_DEFAULTS: dict[Backbone, dict[str, int]] = {
    "llm": {
        "vocab_size": 151936,
        "hidden_size": 4096,
        "intermediate_size": 22016,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
    },
    "vit": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "num_channels": 3,
        "image_size": 224,
        "patch_size": 16,
    },
}

MODEL_TYPES: dict[Backbone, tuple[str, ...]] = {
    "llm": ("qwen2",),
    "vit": ("siglip_vision_model", "siglip"),
}
"""The ``model_type`` a backbone's config.json may have (``siglip``: a full SigLIP model)."""


@dataclass(frozen=True)
class BackboneConfig:
    """A backbone folder's ``config.json``: the document (the vision part of a full SigLIP
    model) and the :class:`BagelConfig` attributes it sets."""

    backbone: Backbone
    path: Path
    document: dict[str, Any]
    sizes: dict[str, int]
    """BagelConfig attribute -> value (HF defaults filled in)."""
    defaulted: tuple[str, ...]
    """Fields the file leaves out (their HF default is used)."""
    tied: bool = False
    """``tie_word_embeddings`` of a language model: ``lm_head`` is ``embed_tokens``."""


def read_backbone_config(backbone: Backbone, folder: str | Path) -> BackboneConfig:
    """Read and check the ``config.json`` of a backbone folder.

    Raises ``FileNotFoundError`` without one and :class:`~bagelverify.errors.ConfigError` for a
    ``model_type`` that is not Qwen2 / SigLIP or a size that is not a positive integer.
    """
    path = Path(folder) / HF_CONFIG
    if not path.is_file():
        flag = "--llm" if backbone == "llm" else "--vit"
        raise FileNotFoundError(
            f"{path}: not found; {flag} takes a Hugging Face model folder (config.json and "
            "model.safetensors or its shard index), e.g. one written by save_pretrained"
        )
    document = read_json_file(path, MAX_CONFIG_BYTES, lambda what: ConfigError(f"{path}: {what}"))
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(document).__name__}")
    model_type = document.get("model_type")
    if model_type not in MODEL_TYPES[backbone]:
        kind = "language model is Qwen2" if backbone == "llm" else "vision tower is SigLIP"
        raise ConfigError(
            f"{path}: model_type is {model_type!r}, expected "
            f"{' or '.join(MODEL_TYPES[backbone])} (BAGEL's {kind})"
        )
    if model_type == "siglip":
        vision = document.get("vision_config")
        document = dict(vision) if isinstance(vision, dict) else {}
    wanted = ROOTS[backbone].config_file
    sizes: dict[str, int] = {}
    defaulted = []
    for file, field_name, attribute, _ in FIELD_SOURCES:
        if file != wanted:
            continue
        value = document.get(field_name)
        if value is None:
            value = HF_DEFAULTS[backbone][field_name]
            defaulted.append(field_name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(
                f"{path}: field {field_name!r} must be a positive integer, got {value!r}"
            )
        sizes[attribute] = value
    tied = bool(document.get("tie_word_embeddings", False)) if backbone == "llm" else False
    return BackboneConfig(backbone, path, document, sizes, tuple(defaulted), tied)


def config_mismatches(config: BagelConfig, found: Mapping[Backbone, BackboneConfig]) -> list[str]:
    """One line per size a backbone's config.json gives otherwise than ``config``, naming the
    BAGEL config file and field."""
    lines = []
    for read in found.values():
        for file, field_name, attribute, _ in FIELD_SOURCES:
            if attribute in read.sizes and read.sizes[attribute] != getattr(config, attribute):
                lines.append(
                    f"{file} {field_name}: the config says {getattr(config, attribute)}, "
                    f"{read.path} says {read.sizes[attribute]}"
                )
    return lines
