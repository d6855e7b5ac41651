"""Check a checkpoint's two position tables against the ones its config implies.

Reads the two tables' bytes and nothing else (about 64 MB for BAGEL-7B-MoT in BF16).
"""

from __future__ import annotations

import os

from .checkpoint import find_config
from .config import BagelConfig
from .keys import strip_root
from .pos_embed import POSITION_TABLE_KEYS, TableCheck, compare_table
from .tensor_reader import TensorReader
from .weights import open_weights


def check_position_tables(
    path: str | os.PathLike[str],
    *,
    config: BagelConfig | str | os.PathLike[str] | None = None,
    weights: object = None,
) -> list[TableCheck]:
    """Compare each position table the checkpoint holds with the regenerated one.

    ``path``: a checkpoint folder or one ``.safetensors`` file (HF or native keys); ``config``:
    a :class:`BagelConfig`, a config folder, or ``None`` for the checkpoint folder's own files
    (``FileNotFoundError`` when there are none: the tables' sizes come from the config).
    Tables the checkpoint lacks are left out of the result.
    """
    selected = open_weights(path, weights)
    found = find_config(selected.directory, config)
    if found is None:
        raise FileNotFoundError(
            f"{selected.directory}: no config files; the position tables' sizes come from the "
            "config: pass config= (or --config DIR)"
        )
    tables = {
        strip_root(key): info
        for key, info in selected.tensors.items()
        if strip_root(key) in POSITION_TABLE_KEYS
    }
    with TensorReader() as reader:
        return [
            compare_table(key, reader.read(tables[key]), found)
            for key in POSITION_TABLE_KEYS
            if key in tables
        ]
