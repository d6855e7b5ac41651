"""BAGEL's two frozen position tables, regenerated from a config.

``vit_pos_embed.pos_embed`` (``vit_max_num_patch_per_side ** 2`` rows) and
``latent_pos_embed.pos_embed`` (``max_latent_size ** 2`` rows), both ``hidden_size`` wide, are
fixed 2-D sine-cosine tables that the upstream model builds at start-up and stores like
parameters. For a grid of side ``N`` and width ``D`` (a multiple of 4), row ``r`` is the grid
cell ``(y, x) = divmod(r, N)`` and holds

``[sin(x * w), cos(x * w), sin(y * w), cos(y * w)]`` with ``w[k] = 10000 ** (-k / (D / 4))``,
``k = 0 .. D/4 - 1``:

the first half of the width encodes the column ``x``, the second half the row ``y``, each half
sines first. Upstream computes the angles and their sines in float64 and stores the table as
float32 (then the checkpoint's dtype); :func:`position_table` does the same, so a table is
*exact* when it equals the regenerated one rounded to its stored dtype.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .config import BagelConfig
from .errors import ConfigError
from .families import family_of
from .safetensors_io import dtype_name

logger = logging.getLogger(__name__)

VIT_POS_EMBED = "vit_pos_embed.pos_embed"
"""HF key of the ViT position table (``vit_max_num_patch_per_side`` per side)."""
LATENT_POS_EMBED = "latent_pos_embed.pos_embed"
"""HF key of the latent position table (``max_latent_size`` per side)."""

#: HF key -> the grid side a config gives that table.
GRID_SIDE: dict[str, Callable[[BagelConfig], int]] = {
    VIT_POS_EMBED: lambda config: config.vit_max_num_patch_per_side,
    LATENT_POS_EMBED: lambda config: config.max_latent_size,
}
POSITION_TABLE_KEYS: tuple[str, ...] = tuple(GRID_SIDE)
"""The HF keys of the two position tables."""

_TEMPERATURE = 10000.0


def sincos_table(side: int, width: int) -> torch.Tensor:
    """The float32 ``(side * side, width)`` 2-D sine-cosine table (see the module docstring)."""
    if side < 1 or width < 4 or width % 4:
        raise ConfigError(
            f"a 2-D sine-cosine table needs a positive grid side and a width that is a multiple "
            f"of 4; got side {side}, width {width}. Check hidden_size in the config."
        )
    quarter = width // 4
    frequencies = 1.0 / _TEMPERATURE ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    angles = torch.outer(torch.arange(side, dtype=torch.float64), frequencies)
    # (side, width / 2), rounded to float32 before the rows are repeated: the same values as
    # rounding the whole float64 table, at a quarter of the memory
    per_axis = torch.cat([angles.sin(), angles.cos()], dim=1).to(torch.float32)
    column_part = per_axis.repeat(side, 1)  # row r -> x = r % side
    row_part = per_axis.repeat_interleave(side, dim=0)  # row r -> y = r // side
    return torch.cat([column_part, row_part], dim=1)


def grid_side(key: str, config: BagelConfig) -> int:
    """The grid side of the position table ``key`` (an HF key) under ``config``."""
    try:
        return GRID_SIDE[key](config)
    except KeyError:
        raise KeyError(
            f"{key!r} is not a position table; the tables are {', '.join(POSITION_TABLE_KEYS)}"
        ) from None


def position_table(
    key: str, config: BagelConfig, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The table ``key`` as the upstream model builds it for ``config``, rounded to ``dtype``."""
    return sincos_table(grid_side(key, config), config.hidden_size).to(dtype)


@dataclass(frozen=True)
class TableCheck:
    """How a stored position table compares with the regenerated one."""

    key: str
    dtype: str
    """The stored tensor's safetensors dtype, e.g. ``"BF16"``."""
    shape: tuple[int, ...]
    expected_shape: tuple[int, ...]
    exact: bool
    """Bit-identical to the regenerated table rounded to the stored dtype."""
    max_abs_diff: float | None
    """Largest absolute difference from the regenerated table rounded to the stored dtype (0.0
    when exact); ``None`` when not compared."""
    not_compared: str | None = None
    """Why the values were not compared when the shapes agree or no shape was expected."""

    def as_dict(self) -> dict[str, object]:
        """JSON form."""
        return {
            "key": self.key,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "expected_shape": list(self.expected_shape),
            "exact": self.exact,
            "max_abs_diff": self.max_abs_diff,
            "not_compared": self.not_compared,
        }

    def describe(self) -> str:
        """One line: ``KEY: equals the regenerated table (BF16)`` or how it differs."""
        if self.exact:
            return f"{self.key}: equals the regenerated table ({self.dtype})"
        if self.not_compared is not None:
            return f"{self.key}: shape {list(self.shape)}, not compared: {self.not_compared}"
        if self.max_abs_diff is None:
            return (
                f"{self.key}: shape {list(self.shape)}, the config implies "
                f"{list(self.expected_shape)}"
            )
        return f"{self.key}: differs from the regenerated table by up to {self.max_abs_diff:.3g}"


MAX_COMPARED_ELEMENTS = 64 * 2**20
"""The largest table compared (3.6x BAGEL-7B-MoT's larger one): regenerating it takes about 16
bytes an element, so a header or config claiming a huge grid costs no more than 1 GB."""


def check_without_reading(
    key: str, dtype: str, shape: tuple[int, ...], config: BagelConfig | None
) -> TableCheck | None:
    """The check of a stored table (HF key ``key``) that its header alone decides (a shape
    other than the config's, no square grid without a config, too large to regenerate), or
    ``None`` when its values must be read and compared."""
    expected: tuple[int, ...]
    if config is not None:
        family = family_of(key)
        if family is None:
            raise KeyError(f"{key!r} is not a position table: {', '.join(POSITION_TABLE_KEYS)}")
        expected = family.expected_shapes(config)[key]  # the family table's shape
    else:
        rows, width = shape if len(shape) == 2 else (0, 0)
        side = math.isqrt(rows)
        if side * side != rows or side < 1 or width < 4 or width % 4:
            reason = "no square grid's (side * side, width) table; give a config"
            return TableCheck(key, dtype, shape, (), False, None, reason)
        expected = shape
    if shape != expected:
        return TableCheck(key, dtype, shape, expected, False, None)
    if math.prod(shape) > MAX_COMPARED_ELEMENTS:
        reason = f"{math.prod(shape):,} elements, beyond the {MAX_COMPARED_ELEMENTS:,} regenerated"
        return TableCheck(key, dtype, shape, expected, False, None, reason)
    return None


def compare_table(key: str, stored: torch.Tensor, config: BagelConfig | None) -> TableCheck:
    """Compare a stored table (HF key ``key``) with the one ``config`` implies, or without a
    config with the table of the stored one's own grid and width (a square number of rows)."""
    dtype, shape = dtype_name(stored.dtype), tuple(stored.shape)
    decided = check_without_reading(key, dtype, shape, config)
    if decided is not None:
        return decided
    rounded = sincos_table(math.isqrt(shape[0]), shape[1]).to(stored.dtype)
    if torch.equal(stored, rounded):
        return TableCheck(key, dtype, shape, shape, True, 0.0)
    delta = stored.to(torch.float64) - rounded.to(torch.float64)
    return TableCheck(key, dtype, shape, shape, False, float(delta.abs().max()))
