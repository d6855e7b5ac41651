"""Conv2d <-> Linear patch-embedding weights in BAGEL's channel-last patch order."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from bagelverify.patch_embedding import conv_patch_weight_to_linear, linear_patch_weight_to_conv


def channel_last_patches(image: torch.Tensor, patch: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, patches, P*P*C): each patch flattened row, column, channel."""
    n, c, h, w = image.shape
    grid = image.reshape(n, c, h // patch, patch, w // patch, patch)
    return grid.permute(0, 2, 4, 3, 5, 1).reshape(n, (h // patch) * (w // patch), patch * patch * c)


@given(
    out=st.integers(1, 6),
    channels=st.integers(1, 4),
    patch=st.integers(1, 5),
    grid=st.integers(1, 3),
    seed=st.integers(0, 2**31),
)
def test_linear_on_channel_last_patches_equals_conv(
    out: int, channels: int, patch: int, grid: int, seed: int
) -> None:
    """Invariant: F.conv2d(image, w, stride=P) == linear(channel_last_patches(image)), and the
    two conversions are inverse."""
    generator = torch.Generator().manual_seed(seed)
    conv = torch.randn(out, channels, patch, patch, generator=generator, dtype=torch.float64)
    bias = torch.randn(out, generator=generator, dtype=torch.float64)
    image = torch.randn(
        2, channels, grid * patch, grid * patch, generator=generator, dtype=torch.float64
    )
    linear = conv_patch_weight_to_linear(conv)
    assert linear.shape == (out, patch * patch * channels)
    expected = F.conv2d(image, conv, bias, stride=patch).flatten(2).transpose(1, 2)
    assert torch.allclose(F.linear(channel_last_patches(image, patch), linear, bias), expected)
    assert torch.equal(
        linear_patch_weight_to_conv(linear, patch_size=patch, channels=channels), conv
    )


def test_plain_view_would_be_wrong() -> None:
    conv = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    assert not torch.equal(conv_patch_weight_to_linear(conv), conv.reshape(2, 12))
    # BAGEL's order: row 0 col 0 holds channels 0, 1, 2 first
    assert conv_patch_weight_to_linear(conv)[0, :3].tolist() == [0.0, 4.0, 8.0]


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="Conv2d weight"):
        conv_patch_weight_to_linear(torch.zeros(2, 3, 2, 3))
    with pytest.raises(ValueError, match=r"Linear weight \(out, 12\)"):
        linear_patch_weight_to_conv(torch.zeros(2, 11), patch_size=2, channels=3)
