"""Model sizes that decide every tensor shape of a BAGEL checkpoint.

The defaults are BAGEL-7B-MoT's (Qwen2.5-7B language model, SigLIP so400m/14 vision tower).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .atomic import atomic_open
from .errors import ConfigError
from .strict_json import MAX_CONFIG_BYTES, read_json_file, short_repr

CONFIG_FILE = "config.json"
LLM_CONFIG_FILE = "llm_config.json"
VIT_CONFIG_FILE = "vit_config.json"
CONFIG_FILES = (CONFIG_FILE, LLM_CONFIG_FILE, VIT_CONFIG_FILE)
"""The three JSON files of a BAGEL folder that :meth:`BagelConfig.from_pretrained` reads."""

#: (file, Hugging Face field name, BagelConfig attribute, required). Optional fields fall back to
#: the BAGEL-7B-MoT default. ``vae_config.z_channels`` is a field nested in ``config.json``.
FIELD_SOURCES: tuple[tuple[str, str, str, bool], ...] = (
    (LLM_CONFIG_FILE, "hidden_size", "hidden_size", True),
    (LLM_CONFIG_FILE, "num_hidden_layers", "num_hidden_layers", True),
    (LLM_CONFIG_FILE, "intermediate_size", "intermediate_size", True),
    (LLM_CONFIG_FILE, "num_attention_heads", "num_attention_heads", True),
    (LLM_CONFIG_FILE, "num_key_value_heads", "num_key_value_heads", True),
    (LLM_CONFIG_FILE, "vocab_size", "vocab_size", True),
    (VIT_CONFIG_FILE, "hidden_size", "vit_hidden_size", True),
    (VIT_CONFIG_FILE, "intermediate_size", "vit_intermediate_size", True),
    (VIT_CONFIG_FILE, "num_hidden_layers", "vit_num_hidden_layers", True),
    (VIT_CONFIG_FILE, "patch_size", "vit_patch_size", True),
    (VIT_CONFIG_FILE, "image_size", "vit_image_size", True),
    (VIT_CONFIG_FILE, "num_channels", "vit_num_channels", False),
    (VIT_CONFIG_FILE, "num_attention_heads", "vit_num_attention_heads", False),
    (CONFIG_FILE, "vit_max_num_patch_per_side", "vit_max_num_patch_per_side", False),
    (CONFIG_FILE, "max_latent_size", "max_latent_size", False),
    (CONFIG_FILE, "latent_patch_size", "latent_patch_size", False),
    (CONFIG_FILE, "vae_config.z_channels", "vae_z_channels", False),
    (CONFIG_FILE, "vit_rope", "vit_rope", False),
)

DERIVED_FROM: dict[str, tuple[str, ...]] = {
    "head_dim": ("hidden_size", "num_attention_heads"),
    "q_dim": ("hidden_size", "num_attention_heads"),
    "kv_dim": ("hidden_size", "num_attention_heads", "num_key_value_heads"),
    "vit_positions": ("vit_max_num_patch_per_side",),
    "latent_positions": ("max_latent_size",),
    "vit_layers_used": ("vit_num_hidden_layers",),
    "vit_num_positions": ("vit_image_size", "vit_patch_size"),
    "vit_rope_dim": ("vit_hidden_size", "vit_num_attention_heads"),
    "vit_patch_dim": ("vit_patch_size", "vit_num_channels"),
    "patch_latent_dim": ("latent_patch_size", "vae_z_channels"),
}
"""Each derived :class:`BagelConfig` property -> the attributes it is computed from."""


def field_source(attribute: str) -> tuple[str, str] | None:
    """The config file and field that set a :class:`BagelConfig` attribute (``hidden_size`` ->
    ``("llm_config.json", "hidden_size")``), or ``None`` for one no file sets."""
    for file, field_name, name, _ in FIELD_SOURCES:
        if name == attribute:
            return file, field_name
    return None


def _named(attribute: str) -> str:
    """``llm_config.json hidden_size``: the file and field behind an attribute, as messages
    name it (the attribute itself when no file sets it)."""
    source = field_source(attribute)
    return attribute if source is None else f"{source[0]} {source[1]}"


FLAGS = frozenset({"vit_rope"})
"""BagelConfig attributes that are booleans; every other attribute is a positive int."""

#: Largest accepted value of each size (the smallest is 1). Generous: at least 8x BAGEL-7B-MoT's
#: value and above every released Qwen2 / SigLIP config (Qwen2-72B: hidden 8192, 80 layers,
#: intermediate 29568, 64 heads), yet small enough that the key list, the expected shapes and
#: their messages stay cheap (a million layers would cost minutes and gigabytes to enumerate).
MAX_VALUES: dict[str, int] = {
    "hidden_size": 65_536,
    "num_hidden_layers": 1_024,
    "intermediate_size": 262_144,
    "num_attention_heads": 1_024,
    "num_key_value_heads": 1_024,
    "vocab_size": 4_194_304,
    "vit_hidden_size": 65_536,
    "vit_intermediate_size": 262_144,
    "vit_num_hidden_layers": 1_024,
    "vit_patch_size": 1_024,
    "vit_image_size": 65_536,
    "vit_num_channels": 64,
    "vit_max_num_patch_per_side": 1_024,
    "max_latent_size": 1_024,
    "latent_patch_size": 64,
    "vae_z_channels": 1_024,
    "timestep_frequency_size": 65_536,
    "vit_num_attention_heads": 1_024,
}


def _describe(value: object) -> str:
    """``repr(value)``, except that a huge int is described by its size (``repr`` of an int of
    more than 4,300 digits raises, and a message should not hold thousands of digits)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**18:
        return f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits"
    return short_repr(value)


def _size_fault(attribute: str, value: object, *, flag: str = "true or false") -> str | None:
    """Why ``value`` is not a valid ``attribute``, or ``None`` if it is one (``flag``: how a
    boolean is spelled in the message)."""
    if attribute in FLAGS:
        return None if isinstance(value, bool) else f"must be {flag}, got {_describe(value)}"
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        return f"must be a positive integer, got {_describe(value)}"
    if value > MAX_VALUES[attribute]:
        return (
            f"is {_describe(value)}, above the largest accepted value {MAX_VALUES[attribute]} "
            "(far beyond any BAGEL or Qwen2 model)"
        )
    return None


#: Constant fields written next to the sizes so that Hugging Face tools recognise the files.
_FILE_HEADERS: dict[str, dict[str, Any]] = {
    CONFIG_FILE: {"visual_gen": True, "visual_und": True},
    LLM_CONFIG_FILE: {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]},
    VIT_CONFIG_FILE: {"model_type": "siglip_vision_model"},
}


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: config file not found (a BAGEL folder holds {CONFIG_FILES})"
        )
    document = read_json_file(path, MAX_CONFIG_BYTES, lambda what: ConfigError(f"{path}: {what}"))
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(document).__name__}")
    return document


def _lookup(document: dict[str, Any], dotted: str) -> object:
    value: object = document
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


@dataclass(frozen=True)
class BagelConfig:
    """Sizes of the language model, the vision tower and BAGEL's own parts."""

    # language model (llm_config.json)
    hidden_size: int = 3584
    num_hidden_layers: int = 28
    intermediate_size: int = 18944
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    vocab_size: int = 152064
    # vision tower (vit_config.json); BAGEL drops the tower's last layer
    vit_hidden_size: int = 1152
    vit_intermediate_size: int = 4304
    vit_num_hidden_layers: int = 27
    vit_patch_size: int = 14
    vit_image_size: int = 980
    vit_num_channels: int = 3
    # BAGEL (config.json)
    vit_max_num_patch_per_side: int = 70
    max_latent_size: int = 64
    latent_patch_size: int = 2
    vae_z_channels: int = 16
    timestep_frequency_size: int = 256
    # sets the width of the ViT rope tables (only with vit_rope)
    vit_num_attention_heads: int = 16
    # 2-D rotary ViT positions: four rope buffers replace the learned position table
    vit_rope: bool = False

    def __post_init__(self) -> None:
        for item in fields(self):
            fault = _size_fault(item.name, getattr(self, item.name), flag="a bool")
            if fault is not None:
                raise ConfigError(f"BagelConfig.{item.name} {fault}")
        for size, divisor in (
            ("hidden_size", "num_attention_heads"),
            ("num_attention_heads", "num_key_value_heads"),
        ):
            if getattr(self, size) % getattr(self, divisor):
                raise ConfigError(
                    f"{_named(size)} {getattr(self, size)} is not a multiple of "
                    f"{_named(divisor)} {getattr(self, divisor)}; fix one of the two fields"
                )

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | os.PathLike[str]) -> BagelConfig:
        """Read ``config.json``, ``llm_config.json`` and ``vit_config.json`` of a BAGEL folder.

        The language-model and vision-tower sizes are required under their Hugging Face names;
        BAGEL's own fields (``vit_rope`` a JSON bool, the others integers), ``num_channels`` and
        ViT ``num_attention_heads`` default to BAGEL-7B-MoT's. ``num_hidden_layers`` of
        ``vit_config.json`` is the tower's size before BAGEL drops its last layer (27 for the
        release). Raises ``FileNotFoundError`` naming a missing file and
        :class:`~bagelverify.errors.ConfigError` naming the file and field.
        """
        folder = Path(checkpoint_dir)
        documents = {name: _read_json(folder / name) for name in CONFIG_FILES}
        values: dict[str, Any] = {}
        for file, field_name, attribute, required in FIELD_SOURCES:
            value = _lookup(documents[file], field_name)
            if value is None:
                if required:
                    raise ConfigError(f"{folder / file}: required field {field_name!r} is missing")
                continue
            fault = _size_fault(attribute, value)
            if fault is not None or not isinstance(value, int):  # the second: for mypy
                raise ConfigError(f"{folder / file}: field {field_name!r} {fault}")
            values[attribute] = value
        try:
            return cls(**values)
        except ConfigError as error:
            raise ConfigError(f"{folder}: inconsistent config: {error}") from None

    def to_json_documents(
        self, base: Mapping[str, Mapping[str, Any]] | None = None
    ) -> dict[str, dict[str, Any]]:
        """The three config files' contents (file name -> JSON object), as ``from_pretrained``
        reads them. A flag is written only when set, so rope-free files stay as released.
        ``base`` (file name -> fields) adds fields of its own to each file (the config's sizes
        and the headers win)."""
        documents: dict[str, dict[str, Any]] = {
            name: {**json.loads(json.dumps((base or {}).get(name, {}))), **header}
            for name, header in _FILE_HEADERS.items()
        }
        for file, field_name, attribute, _ in FIELD_SOURCES:
            if attribute in FLAGS and not getattr(self, attribute):
                continue
            *parents, leaf = field_name.split(".")
            target = documents[file]
            for parent in parents:
                target = target.setdefault(parent, {})
            target[leaf] = getattr(self, attribute)
        return documents

    def save_pretrained(
        self,
        checkpoint_dir: str | os.PathLike[str],
        *,
        base: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        """Write the three config files into ``checkpoint_dir`` (each atomically); ``base`` as
        for :meth:`to_json_documents`."""
        for name, document in self.to_json_documents(base).items():
            with atomic_open(Path(checkpoint_dir) / name) as handle:
                handle.write((json.dumps(document, indent=2) + "\n").encode("utf-8"))

    @property
    def head_dim(self) -> int:
        """Width of one attention head of the language model."""
        return self.hidden_size // self.num_attention_heads

    @property
    def q_dim(self) -> int:
        """Output width of the query projection: all heads."""
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Output width of the key and value projections: the key-value heads."""
        return self.num_key_value_heads * self.head_dim

    @property
    def vit_positions(self) -> int:
        """Rows of BAGEL's frozen ViT position table (``vit_pos_embed``)."""
        return self.vit_max_num_patch_per_side**2

    @property
    def latent_positions(self) -> int:
        """Rows of BAGEL's frozen latent position table (``latent_pos_embed``)."""
        return self.max_latent_size**2

    @property
    def vit_layers_used(self) -> int:
        """Vision layers present in the checkpoint: the tower's last layer is dropped."""
        return self.vit_num_hidden_layers - 1

    @property
    def vit_num_positions(self) -> int:
        """Rows of the vision tower's learned position table."""
        return (self.vit_image_size // self.vit_patch_size) ** 2

    @property
    def vit_rope_dim(self) -> int:
        """Columns of each ViT rope table: the frequencies of half a head's width, doubled."""
        half_head = (self.vit_hidden_size // self.vit_num_attention_heads) // 2
        return 2 * ((half_head + 1) // 2)

    @property
    def vit_patch_dim(self) -> int:
        """Input width of the patch embedding stored as a Linear: ``P * P * C``."""
        return self.vit_patch_size * self.vit_patch_size * self.vit_num_channels

    @property
    def patch_latent_dim(self) -> int:
        """Width of one VAE latent patch: ``latent_patch_size**2 * z_channels``."""
        return self.latent_patch_size**2 * self.vae_z_channels


ConfigLike = BagelConfig | str | os.PathLike[str]
"""What a ``config=`` argument takes: a :class:`BagelConfig`, or the folder holding the three
config files (read with :meth:`BagelConfig.from_pretrained`)."""
