"""Rotary position embeddings (RoPE, HF "rotate_half" layout) with Llama-3 and linear frequency scaling.

Angles are computed in float64: a stream of a million tokens has positions where float32's pos * freq would lose
about 0.06 rad, which breaks RoPE's relative-position property; float64 keeps it exact."""

from __future__ import annotations

import math

import torch

from .config import ModelConfig


def inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """(D/2,) float64 inverse frequencies, after the checkpoint's rope scaling."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    # llama3: long wavelengths are stretched by `factor`, short ones kept, the band between interpolated.
    old_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_len / scaling.low_freq_factor
    high_freq_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class Rotary:
    """Computes cos/sin tables for arbitrary (possibly negative, possibly huge) integer positions."""

    def __init__(self, config: ModelConfig, device: torch.device | str = "cpu"):
        self.inv_freq = inverse_frequencies(config).to(device)  # (D/2,) float64

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (T,) int -> cos, sin of shape (T, D) in `dtype`."""
        angles = positions.to(self.inv_freq.device, torch.float64)[:, None] * self.inv_freq[None, :]  # (T, D/2)
        angles = torch.cat([angles, angles], dim=-1)  # (T, D)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply RoPE. x (T, heads, D); cos/sin (T, D)."""
    half = x.shape[-1] // 2
    rotated_half = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rotated_half * sin[:, None, :]
