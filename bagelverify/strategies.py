"""Hypothesis strategies for BAGEL checkpoint keys, derived from the key-family table.

Needs the ``hypothesis`` extra (``pip install bagelverify[hypothesis]``). Use them to
property-test your own adapter or loader::

    from hypothesis import given
    from bagelverify import strategies as bst

    @given(bst.state_dicts())
    def test_my_loader_keeps_every_und_key(sd): ...
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from hypothesis import strategies as st

from .buckets import Bucket
from .families import FAMILIES, MOE_SUFFIX, Family, families_of

#: Layer numbers: mostly small (the real model has 28 and 26), sometimes huge.
layer_numbers: st.SearchStrategy[int] = st.one_of(
    st.integers(min_value=0, max_value=31), st.integers(min_value=0, max_value=10**12)
)


def family_keys(family: Family) -> st.SearchStrategy[str]:
    """Keys of one family: its template with generated layer numbers and parameters, or, for
    families without enumerable keys (VAE, extra state), strings generated from its pattern."""
    if family.shape is None:
        return st.from_regex(family.pattern, fullmatch=True)
    return st.builds(
        family.template.format, layer=layer_numbers, param=st.sampled_from(family.params)
    )


def keys(
    buckets: Sequence[Bucket] = (Bucket.UND, Bucket.GEN, Bucket.VAE, Bucket.EXTRA),
) -> st.SearchStrategy[str]:
    """Valid HF keys of the given buckets (unrooted)."""
    chosen = [family for family in FAMILIES if family.bucket in buckets]
    return st.sampled_from(chosen).flatmap(family_keys)


_UNICODE_DIGITS = "٣۷७৯๕໒０𝟙"  # Arabic-Indic, Extended Arabic-Indic, Devanagari, Bengali, ...


def _mutations(key: str) -> list[str]:
    """Near misses of a valid UND/GEN key; none of them is a valid key of any bucket."""
    out = [
        key + "\n",
        key + " ",
        " " + key,
        key.upper(),
        key[:1].upper() + key[1:],
        "model.model." + key,
        key[:-1],
        key + "x",
        key.replace(".", "..", 1),
        key.replace(".", "_", 1),
    ]
    if MOE_SUFFIX in key:
        out.append(key.replace(MOE_SUFFIX, MOE_SUFFIX + "x"))
        out.append(key.replace(MOE_SUFFIX, "_moe_gem"))
    run = re.search("[0-9]+", key)
    if run:
        start, end = run.span()
        out.extend(key[:start] + u + key[start + 1 :] for u in _UNICODE_DIGITS)
        out.append(key[:start] + key[end:])  # the number removed
    return out


#: Hand-picked keys that the reference adapter gets wrong or that sit next to real keys.
FIXED_NEAR_MISSES: tuple[str, ...] = (
    "",
    " ",
    "\n",
    "model.",
    "model",
    "language_model.model.norm.weight\n",
    "language_model.model.layers.٣.self_attn.q_proj.weight",
    "vit_model.vision_model.encoder.layers.0.mlp.fc3.weight",
    "vit_model.vision_model.encoder.layer.0.mlp.fc1.weight",
    "vit_model.vision_model.embeddings.patch_embeding.weight",
    "vit_model.vision_model.post_layernorm.weight.extra",
    "vit_model.anything",
    "vit_model.",
    "connector.fc3.weight",
    "time_embedder.mlp.1.weight",
    "language_model.model.layers.0.self_attn.q_proj_moe_genx.weight",
    "language_model.model.layers..self_attn.q_proj.weight",
    "language_model.model.layers.-1.self_attn.q_proj.weight",
    "language_model.model.layers.0.self_attn.o_proj.bias",
    "language_model.model.embed_tokens.bias",
    "latent_pos_embed.weight",
    "encoder",
    "encoder.",
    "decoder.conv_in.weight\n",
    "encoder.conv in.weight",
    "._extra_state",
    "layers.0._extra_state.weight",
)


def near_miss_keys() -> st.SearchStrategy[str]:
    """Adversarial keys that belong to no bucket: mutated UND/GEN keys and fixed near misses."""
    mutated = keys((Bucket.UND, Bucket.GEN)).flatmap(lambda k: st.sampled_from(_mutations(k)))
    return st.one_of(mutated, st.sampled_from(FIXED_NEAR_MISSES))


def any_keys() -> st.SearchStrategy[str]:
    """A mix of valid keys of every bucket, near misses and arbitrary text."""
    return st.one_of(keys(), keys(), near_miss_keys(), st.text(max_size=40))


class FakeTensor:
    """A stand-in value with identity; the adapter never looks inside values."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"FakeTensor({self.name!r})"


def state_dicts(
    key_strategy: st.SearchStrategy[str] | None = None, *, max_size: int = 60
) -> st.SearchStrategy[dict[str, Any]]:
    """State dicts with unique keys from ``key_strategy`` (default: valid keys of every bucket)
    and one distinct :class:`FakeTensor` per key."""
    return st.lists(
        keys() if key_strategy is None else key_strategy, unique=True, max_size=max_size
    ).map(lambda ks: {k: FakeTensor(k) for k in ks})


def gen_twin_families() -> st.SearchStrategy[Family]:
    """GEN families that mirror an UND family."""
    return st.sampled_from([f for f in families_of(Bucket.GEN) if f.twin is not None])


#: Every accepted spelling of a stage and its normal form.
STAGE_SPELLINGS: dict[object, str] = {
    1: "stage1",
    2: "stage2",
    "1": "stage1",
    "2": "stage2",
    "stage1": "stage1",
    "stage2": "stage2",
    " Stage1 ": "stage1",
    "STAGE2": "stage2",
    "\t2\n": "stage2",
}

stages: st.SearchStrategy[object] = st.sampled_from(list(STAGE_SPELLINGS))
"""Any accepted spelling of a stage."""
