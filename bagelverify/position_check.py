"""Check a checkpoint's two position tables against the regenerated ones.

Reads the two tables' bytes and nothing else (about 40 MB for BAGEL-7B-MoT in BF16).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from .checkpoint import find_config, open_weights
from .checkpoint.files import Weights
from .config import BagelConfig, ConfigLike
from .keys import strip_root
from .pos_embed import POSITION_TABLE_KEYS, TableCheck, check_without_reading, compare_table
from .safetensors_io import TensorInfo
from .tensor_reader import TensorReader


def check_tables(
    tensors: Mapping[str, TensorInfo],
    config: BagelConfig | None,
    fds: Mapping[Path, int] | None = None,
) -> list[TableCheck]:
    """Compare each position table among ``tensors`` (HF or native keys) with the regenerated
    one: of the size ``config`` gives, or without a config of the stored table's own grid.
    A table whose header decides the check (see :func:`check_without_reading`) is not read.
    Reads through ``fds`` where given (see :class:`~bagelverify.tensor_reader.TensorReader`)."""
    tables = {strip_root(key): info for key, info in tensors.items()}
    checks = []
    with TensorReader(fds) as reader:
        for key in POSITION_TABLE_KEYS:
            info = tables.get(key)
            if info is None:
                continue
            decided = check_without_reading(key, info.dtype, info.shape, config)
            checks.append(decided or compare_table(key, reader.read(info), config))
    return checks


def check_position_tables(
    path: str | os.PathLike[str],
    *,
    config: ConfigLike | None = None,
    weights: Weights | None = None,
) -> list[TableCheck]:
    """Compare each position table the checkpoint holds with the regenerated one.

    ``path``: a checkpoint folder or one ``.safetensors`` file (HF or native keys); ``config``:
    a :class:`BagelConfig`, a config folder, or ``None`` for the checkpoint folder's own files
    (``FileNotFoundError`` when there are none: the tables' sizes come from the config).
    Tables the checkpoint lacks are left out of the result.
    """
    with open_weights(path, weights, keep_open=True) as selected:
        found = find_config(selected.directory, config)
        if found is None:
            raise FileNotFoundError(
                f"{selected.directory}: no config files; the position tables' sizes come from "
                "the config: pass config= (or --config DIR)"
            )
        return check_tables(selected.tensors, found, selected.fds)
