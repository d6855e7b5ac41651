"""Which weights file of a folder to read: ``ema.safetensors`` or ``model.safetensors``.

Upstream training output folders hold the EMA weights (``ema.safetensors``) *and* the raw
weights (``model.safetensors``, or ``model.safetensors.index.json`` with its shards).
:func:`choose_weights` picks one from file names alone; :func:`open_weights` reads its
header(s). The default stays ``ema.safetensors``; a folder with only the model weights is read
without being asked, and :attr:`WeightsChoice.reason` says which file was used and why.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .checkpoint import INDEX_FILE, CheckpointFiles, open_checkpoint
from .manifest import MODEL_FILE
from .safetensors_io import TensorInfo, read_header

logger = logging.getLogger(__name__)

Weights = Literal["ema", "model"]
"""``"ema"``: ``ema.safetensors``; ``"model"``: ``model.safetensors`` or its sharded index."""
WEIGHTS_CHOICES: tuple[Weights, ...] = ("ema", "model")

MODEL_WEIGHTS_FILE = "model.safetensors"
"""The non-EMA weights of an upstream training output folder (one file)."""


@dataclass(frozen=True)
class WeightsChoice:
    """The weights file chosen in a folder, and why."""

    weights: Weights
    layout: Literal["single", "sharded"]
    path: Path
    """The file read: ``ema.safetensors``, ``model.safetensors`` or the index."""
    reason: str


def _normalize(weights: object) -> Weights | None:
    if weights is None or weights in WEIGHTS_CHOICES:
        return weights
    raise ValueError(f"weights must be 'ema', 'model' or None (the default), got {weights!r}")


def choose_weights(directory: str | os.PathLike[str], weights: object = None) -> WeightsChoice:
    """Pick the weights file of ``directory`` from file names alone (nothing is read).

    ``weights=None``: ``ema.safetensors`` when present, else ``model.safetensors``, else
    ``model.safetensors.index.json``. ``"ema"`` requires ``ema.safetensors``; ``"model"``
    takes ``model.safetensors``, else the index. Raises ``FileNotFoundError`` naming what was
    looked for and what the folder holds.
    """
    wanted = _normalize(weights)
    folder = Path(directory)
    ema, single, index = folder / MODEL_FILE, folder / MODEL_WEIGHTS_FILE, folder / INDEX_FILE
    if wanted != "model" and ema.is_file():
        why = "asked for" if wanted == "ema" else "the default"
        return WeightsChoice("ema", "single", ema, f"{ema.name} ({why})")
    if wanted != "ema":
        why = "asked for" if wanted == "model" else f"no {MODEL_FILE} in the folder"
        if single.is_file():
            return WeightsChoice("model", "single", single, f"{single.name} ({why})")
        if index.is_file():
            return WeightsChoice("model", "sharded", index, f"{index.name} ({why})")
    looked = {
        None: (MODEL_FILE, MODEL_WEIGHTS_FILE, INDEX_FILE),
        "ema": (MODEL_FILE,),
        "model": (MODEL_WEIGHTS_FILE, INDEX_FILE),
    }[wanted]
    held = sorted(p.name for p in folder.glob("*.safetensors*")) if folder.is_dir() else []
    raise FileNotFoundError(
        f"{folder}: no {' or '.join(looked)} (weights={wanted!r}); the folder holds "
        f"{', '.join(held) if held else 'no safetensors files'}. "
        + ("Pass weights='model' (--weights model) for the non-EMA weights." if held else "")
    )


@dataclass(frozen=True)
class SelectedWeights:
    """The tensors of the chosen weights file(s), from their headers only."""

    choice: WeightsChoice
    files: tuple[Path, ...]
    tensors: dict[str, TensorInfo]

    @property
    def source(self) -> str:
        """The file the tensors were listed from."""
        return str(self.choice.path)

    @property
    def directory(self) -> Path:
        """The checkpoint folder."""
        return self.choice.path.parent


def open_weights(path: str | os.PathLike[str], weights: object = None) -> SelectedWeights:
    """Headers of the chosen weights of a folder (see :func:`choose_weights`), or of one
    ``.safetensors`` file given directly (``weights`` must then be ``None``)."""
    path = Path(path)
    if path.is_file():
        if _normalize(weights) is not None:
            raise ValueError(f"{path} is a file; weights={weights!r} only selects within a folder")
        choice = WeightsChoice("ema", "single", path, f"{path.name} (given)")
        return SelectedWeights(choice, (path,), read_header(path).tensors)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint folder or file")
    choice = choose_weights(path, weights)
    logger.info("%s: reading %s", path, choice.reason)
    if choice.layout == "single":
        return SelectedWeights(choice, (choice.path,), read_header(choice.path).tensors)
    if (path / MODEL_FILE).is_file():
        # open_checkpoint prefers ema.safetensors over the index (see the report's wiring note)
        raise FileNotFoundError(
            f"{path}: weights='model' selects {INDEX_FILE}, but this version reads an index only "
            f"in a folder without {MODEL_FILE}; move {MODEL_FILE} aside or convert the shards"
        )
    files: CheckpointFiles = open_checkpoint(path)
    return SelectedWeights(choice, files.files, files.tensors)
