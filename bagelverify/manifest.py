"""The shipped list of BAGEL-7B-MoT's real keys, shapes and dtypes (no weights)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources

MANIFEST_NAME = "bagel-7b-mot.manifest.json"
MODEL_FILE = "ema.safetensors"
VAE_FILE = "ae.safetensors"


@dataclass(frozen=True)
class ManifestEntry:
    """Shape and safetensors dtype name (``"BF16"``, ``"F32"``...) of one tensor."""

    shape: tuple[int, ...]
    dtype: str


@cache
def load_manifest() -> dict[str, dict[str, ManifestEntry]]:
    """File name (``ema.safetensors``, ``ae.safetensors``) -> key -> spec, in file order."""
    text = resources.files("bagelverify").joinpath("data", MANIFEST_NAME).read_text("utf-8")
    raw = json.loads(text)
    return {
        name: {
            key: ManifestEntry(tuple(spec["shape"]), spec["dtype"]) for key, spec in entries.items()
        }
        for name, entries in raw.items()
        if name.endswith(".safetensors")
    }
