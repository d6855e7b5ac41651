"""The key-family table: the one place that says which checkpoint keys exist.

Every other fact about keys is derived from :data:`FAMILIES`: the exported regex patterns, the
GEN -> UND twin rule, the expected key set and shapes for a config, and the Hypothesis strategies.

A template is literal text with slots:

``{layer}``
    a layer number, ASCII digits only (``[0-9]+``);
``{param}``
    one of the family's parameter names;
``{path}``, ``{owner}``
    a dotted module path (VAE and extra-state families only, whose keys are not enumerated).

A template written with ``{moe}`` declares a twinned pair: the UND family (``{moe}`` removed) and
its GEN twin (``{moe}`` replaced by ``_moe_gen``), with the same shapes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property

from .buckets import Bucket
from .config import BagelConfig

MOE_SUFFIX = "_moe_gen"
"""Text that turns an UND parameter path into its GEN twin."""

EXTRA_STATE = "_extra_state"
"""Name of a module's Transformer-Engine extra-state entry."""

#: Regex of each slot other than ``{param}``. ``{path}`` is a dotted path whose last component
#: starts with a letter or digit, so ``encoder.x._extra_state`` is extra state, not VAE.
#: ``{owner}`` is the dotted module path owning an extra state, empty for the root module.
SLOT_REGEX: dict[str, str] = {
    "layer": "[0-9]+",
    "path": "(?:[0-9A-Za-z_.]*\\.)?[0-9A-Za-z][0-9A-Za-z_]*",
    "owner": "(?:[0-9A-Za-z_.]+\\.)?",
}

_SLOT_SPLIT = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True)
class Family:
    """One kind of checkpoint key: its template, bucket, parameters and shapes."""

    name: str
    template: str
    bucket: Bucket
    params: tuple[str, ...] = ()
    shape: ShapeRule | None = field(default=None, compare=False, repr=False)
    """Shape of ``param`` for a config; ``None`` for families whose keys are not enumerated."""
    layers: Callable[[BagelConfig], int] | None = field(default=None, compare=False, repr=False)
    """How many layers the ``{layer}`` slot ranges over for a config."""
    twin: str | None = None
    """For a GEN twin: the name of the UND family it mirrors."""
    present: Callable[[BagelConfig], bool] | None = field(default=None, compare=False, repr=False)
    """Whether a model with a config has this family's keys at all; ``None``: always."""

    def regex(self, *, capture: bool = False) -> str:
        """The template as a regex body (no anchors); ``capture`` names each slot's group."""
        pieces = _SLOT_SPLIT.split(self.template)
        out: list[str] = []
        for index, piece in enumerate(pieces):
            if index % 2 == 0:
                out.append(re.escape(piece))
                continue
            if piece == "param":
                body = "|".join(re.escape(p) for p in self.params)
                body = body if len(self.params) == 1 else f"(?:{body})"
            else:
                body = SLOT_REGEX[piece]
            out.append(f"(?P<{piece}>{body})" if capture else body)
        return "".join(out)

    @property
    def pattern(self) -> str:
        """Self-contained full-match pattern: ``re.fullmatch``/``re.match`` agree on it."""
        return f"\\A{self.regex()}\\Z"

    @cached_property
    def _compiled(self) -> re.Pattern[str]:
        return re.compile(self.regex(capture=True))

    def match(self, key: str) -> re.Match[str] | None:
        """Full match of ``key`` against this family, with named slot groups."""
        return self._compiled.fullmatch(key)

    def layer_of(self, key: str) -> int | None:
        """The ``{layer}`` number of ``key`` if it is a key of this family with a layer slot."""
        found = self.match(key)
        layer = found.groupdict().get("layer") if found else None
        return None if layer is None else int(layer)

    def keys(self, config: BagelConfig) -> Iterator[str]:
        """Every key of this family for ``config`` (layer-major, then parameter order)."""
        if self.shape is None:
            raise ValueError(f"family {self.name!r} has no enumerable keys")
        if self.present is not None and not self.present(config):
            return
        layers = range(self.layers(config)) if self.layers is not None else (None,)
        for layer in layers:
            for param in self.params:
                yield self.template.format(layer=layer, param=param)

    def expected_shapes(self, config: BagelConfig) -> dict[str, tuple[int, ...]]:
        """Every key of this family for ``config`` with its shape."""
        shape = self.shape
        if shape is None:
            raise ValueError(f"family {self.name!r} has no enumerable keys")
        return {key: shape(config, key.rsplit(".", 1)[1]) for key in self.keys(config)}


# -- shape rules: dimensions are named by BagelConfig attributes -------------------------------


@dataclass(frozen=True)
class ShapeRule:
    """Each parameter's dimensions, named by :class:`BagelConfig` attributes: ``weight``'s, and
    every other parameter's. Calling it gives a parameter's shape for a config."""

    weight: tuple[str, ...]
    other: tuple[str, ...]

    def dims(self, param: str) -> tuple[str, ...]:
        """The config attributes that size ``param``'s dimensions, in order."""
        return self.weight if param == "weight" else self.other

    def __call__(self, config: BagelConfig, param: str) -> tuple[int, ...]:
        return tuple(getattr(config, name) for name in self.dims(param))


def _linear(out_dim: str, in_dim: str) -> ShapeRule:
    """``weight`` is ``(out, in)``, ``bias`` is ``(out,)``."""
    return ShapeRule((out_dim, in_dim), (out_dim,))


def _vector(dim: str) -> ShapeRule:
    """Every parameter is ``(dim,)`` (norm weights and biases)."""
    return ShapeRule((dim,), (dim,))


def _table(rows: str, cols: str) -> ShapeRule:
    """A ``(rows, cols)`` table (embeddings, position tables)."""
    return ShapeRule((rows, cols), (rows, cols))


def _llm_layers(config: BagelConfig) -> int:
    return config.num_hidden_layers


def _vit_layers(config: BagelConfig) -> int:
    return config.vit_layers_used


def _with_rope(config: BagelConfig) -> bool:
    return config.vit_rope


def _without_rope(config: BagelConfig) -> bool:
    return not config.vit_rope


def _twinned(name: str, template: str, params: tuple[str, ...], shape: ShapeRule) -> list[Family]:
    """An UND family and its ``_moe_gen`` GEN twin."""
    layers = _llm_layers if "{layer}" in template else None
    und = Family(name, template.replace("{moe}", ""), Bucket.UND, params, shape, layers)
    gen = Family(
        name + MOE_SUFFIX,
        template.replace("{moe}", MOE_SUFFIX),
        Bucket.GEN,
        params,
        shape,
        layers,
        twin=name,
    )
    return [und, gen]


_W = ("weight",)
_WB = ("weight", "bias")
_LLM = "language_model.model."
_LAYER = _LLM + "layers.{layer}."
_VIT = "vit_model.vision_model."
_VIT_LAYER = _VIT + "encoder.layers.{layer}."


FAMILIES: tuple[Family, ...] = (
    # language model: shared by both paths
    Family(
        "embed_tokens",
        _LLM + "embed_tokens.{param}",
        Bucket.UND,
        _W,
        _table("vocab_size", "hidden_size"),
    ),
    Family(
        "lm_head",
        "language_model.lm_head.{param}",
        Bucket.UND,
        _W,
        _table("vocab_size", "hidden_size"),
    ),
    # language model: one UND/GEN pair per Mixture-of-Transformers module
    *_twinned("norm", _LLM + "norm{moe}.{param}", _W, _vector("hidden_size")),
    *_twinned(
        "q_proj", _LAYER + "self_attn.q_proj{moe}.{param}", _WB, _linear("q_dim", "hidden_size")
    ),
    *_twinned(
        "k_proj", _LAYER + "self_attn.k_proj{moe}.{param}", _WB, _linear("kv_dim", "hidden_size")
    ),
    *_twinned(
        "v_proj", _LAYER + "self_attn.v_proj{moe}.{param}", _WB, _linear("kv_dim", "hidden_size")
    ),
    *_twinned(
        "o_proj", _LAYER + "self_attn.o_proj{moe}.{param}", _W, _linear("hidden_size", "q_dim")
    ),
    *_twinned("q_norm", _LAYER + "self_attn.q_norm{moe}.{param}", _W, _vector("head_dim")),
    *_twinned("k_norm", _LAYER + "self_attn.k_norm{moe}.{param}", _W, _vector("head_dim")),
    *_twinned(
        "gate_proj",
        _LAYER + "mlp{moe}.gate_proj.{param}",
        _W,
        _linear("intermediate_size", "hidden_size"),
    ),
    *_twinned(
        "up_proj",
        _LAYER + "mlp{moe}.up_proj.{param}",
        _W,
        _linear("intermediate_size", "hidden_size"),
    ),
    *_twinned(
        "down_proj",
        _LAYER + "mlp{moe}.down_proj.{param}",
        _W,
        _linear("hidden_size", "intermediate_size"),
    ),
    *_twinned(
        "input_layernorm", _LAYER + "input_layernorm{moe}.{param}", _W, _vector("hidden_size")
    ),
    *_twinned(
        "post_attention_layernorm",
        _LAYER + "post_attention_layernorm{moe}.{param}",
        _W,
        _vector("hidden_size"),
    ),
    # flow matching (GEN, no twin)
    Family(
        "time_embedder.0",
        "time_embedder.mlp.0.{param}",
        Bucket.GEN,
        _WB,
        _linear("hidden_size", "timestep_frequency_size"),
    ),
    Family(
        "time_embedder.2",
        "time_embedder.mlp.2.{param}",
        Bucket.GEN,
        _WB,
        _linear("hidden_size", "hidden_size"),
    ),
    Family(
        "vae2llm", "vae2llm.{param}", Bucket.GEN, _WB, _linear("hidden_size", "patch_latent_dim")
    ),
    Family(
        "llm2vae", "llm2vae.{param}", Bucket.GEN, _WB, _linear("patch_latent_dim", "hidden_size")
    ),
    Family(
        "latent_pos_embed",
        "latent_pos_embed.{param}",
        Bucket.GEN,
        ("pos_embed",),
        _table("latent_positions", "hidden_size"),
    ),
    # vision tower (UND): a learned position table, or with vit_rope four persistent 2-D rope
    # buffers (cos/sin over the patch grid's rows and columns) instead
    Family(
        "vit.position_embedding",
        _VIT + "embeddings.position_embedding.{param}",
        Bucket.UND,
        _W,
        _table("vit_num_positions", "vit_hidden_size"),
        present=_without_rope,
    ),
    Family(
        "vit.rope",
        _VIT + "rope.{param}",
        Bucket.UND,
        ("cos_h", "sin_h", "cos_w", "sin_w"),
        _table("vit_num_positions", "vit_rope_dim"),
        present=_with_rope,
    ),
    Family(
        "vit.patch_embedding",
        _VIT + "embeddings.patch_embedding.{param}",
        Bucket.UND,
        _WB,
        _linear("vit_hidden_size", "vit_patch_dim"),
    ),
    *(
        Family(
            f"vit.{proj}",
            _VIT_LAYER + f"self_attn.{proj}.{{param}}",
            Bucket.UND,
            _WB,
            _linear("vit_hidden_size", "vit_hidden_size"),
            _vit_layers,
        )
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj")
    ),
    *(
        Family(
            f"vit.{norm}",
            _VIT_LAYER + f"{norm}.{{param}}",
            Bucket.UND,
            _WB,
            _vector("vit_hidden_size"),
            _vit_layers,
        )
        for norm in ("layer_norm1", "layer_norm2")
    ),
    Family(
        "vit.fc1",
        _VIT_LAYER + "mlp.fc1.{param}",
        Bucket.UND,
        _WB,
        _linear("vit_intermediate_size", "vit_hidden_size"),
        _vit_layers,
    ),
    Family(
        "vit.fc2",
        _VIT_LAYER + "mlp.fc2.{param}",
        Bucket.UND,
        _WB,
        _linear("vit_hidden_size", "vit_intermediate_size"),
        _vit_layers,
    ),
    Family(
        "vit.post_layernorm",
        _VIT + "post_layernorm.{param}",
        Bucket.UND,
        _WB,
        _vector("vit_hidden_size"),
    ),
    # vision -> language bridge (UND)
    Family(
        "connector.fc1",
        "connector.fc1.{param}",
        Bucket.UND,
        _WB,
        _linear("hidden_size", "vit_hidden_size"),
    ),
    Family(
        "connector.fc2",
        "connector.fc2.{param}",
        Bucket.UND,
        _WB,
        _linear("hidden_size", "hidden_size"),
    ),
    Family(
        "vit_pos_embed",
        "vit_pos_embed.{param}",
        Bucket.UND,
        ("pos_embed",),
        _table("vit_positions", "hidden_size"),
    ),
    # the VAE of ae.safetensors: prefix-level, recognised only to be reported
    Family("vae.encoder", "encoder.{path}", Bucket.VAE),
    Family("vae.decoder", "decoder.{path}", Bucket.VAE),
    # Transformer-Engine extra state under any module: dropped
    Family("extra_state", "{owner}" + EXTRA_STATE, Bucket.EXTRA),
)

FAMILY_BY_NAME: dict[str, Family] = {family.name: family for family in FAMILIES}


def families_of(bucket: Bucket) -> tuple[Family, ...]:
    """The families of one bucket, in table order."""
    return tuple(family for family in FAMILIES if family.bucket is bucket)


def patterns_of(bucket: Bucket) -> list[str]:
    """Exported pattern strings of one bucket, one per family."""
    return [family.pattern for family in families_of(bucket)]


def family_of(key: str) -> Family | None:
    """The family whose template ``key`` fully matches, or ``None``."""
    for family in FAMILIES:
        if family.match(key):
            return family
    return None


def und_twin(gen_key: str) -> str | None:
    """The UND key that a GEN ``*_moe_gen`` key mirrors; ``None`` for keys without a twin."""
    for family in families_of(Bucket.GEN):
        if family.twin is None:
            continue
        found = family.match(gen_key)
        if found:
            return FAMILY_BY_NAME[family.twin].template.format(**found.groupdict())
    return None


def expected_shapes(config: BagelConfig | None = None) -> dict[str, tuple[int, ...]]:
    """Every UND and GEN key of a checkpoint for ``config`` with its shape, in table order."""
    config = config or BagelConfig()
    shapes: dict[str, tuple[int, ...]] = {}
    for family in FAMILIES:
        if family.shape is not None:
            shapes.update(family.expected_shapes(config))
    return shapes
