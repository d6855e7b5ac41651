"""Model sizes that decide every tensor shape of a BAGEL checkpoint.

The defaults are BAGEL-7B-MoT's (Qwen2.5-7B language model, SigLIP so400m/14 vision tower).
"""

from __future__ import annotations

from dataclasses import dataclass


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
    def vit_patch_dim(self) -> int:
        """Input width of the patch embedding stored as a Linear: ``P * P * C``."""
        return self.vit_patch_size * self.vit_patch_size * self.vit_num_channels

    @property
    def patch_latent_dim(self) -> int:
        """Width of one VAE latent patch: ``latent_patch_size**2 * z_channels``."""
        return self.latent_patch_size**2 * self.vae_z_channels
