"""The latent normalisation pipelines apply between the VAE and the denoiser (and the upsampler)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class LatentNormalization:
    r"""
    `latents = (vae_latents - mean) * scale / std`, per channel where `mean`/`std` are sequences.

    FLUX.1 and SD3 use a shift (`mean`) and a scale, SD and SDXL a scale only, Playground v2.5 per-channel
    `latents_mean`/`latents_std` with a scale, Wan and Qwen-Image per-channel `latents_mean`/`latents_std` alone
    (their VAE configs have no `scaling_factor`; the pipelines compute `(latents - mean) * (1 / std)`).

    Example:

    ```py
    >>> norm = LatentNormalization.from_vae_config(vae.config)
    >>> latents = norm.from_vae(vae.encode(images).latent_dist.mode())
    ```
    """

    mean: float | Sequence[float] = 0.0
    std: float | Sequence[float] = 1.0
    scale: float = 1.0

    @classmethod
    def from_vae_config(cls, config: Any) -> LatentNormalization:
        """What diffusers' pipelines read from a VAE config: `latents_mean/std` if set, else `shift_factor`."""
        scale = getattr(config, "scaling_factor", None) or 1.0
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is not None and std is not None:
            return cls(tuple(mean), tuple(std), scale)
        return cls.shifted_and_scaled(config)

    @classmethod
    def shifted_and_scaled(cls, config: Any) -> LatentNormalization:
        """`latents / scaling_factor + shift_factor` before decoding, whatever else the config holds (SD3, Z-Image)."""
        return cls(getattr(config, "shift_factor", None) or 0.0, 1.0, getattr(config, "scaling_factor", None) or 1.0)

    def _stats(self, like: torch.Tensor) -> tuple[Any, Any]:
        # Channels are axis 1 whatever follows them: `(B, C, h, w)` images, `(B, C, frames, h, w)` videos.
        shape = (1, -1) + (1,) * (like.ndim - 2)

        def channelwise(value):
            if isinstance(value, (int, float)):
                return value
            if len(value) != like.shape[1]:
                raise ValueError(
                    f"The VAE config's latents_mean/latents_std hold {len(value)} values but its latents have "
                    f"{like.shape[1]} channels {tuple(like.shape)}: the config does not belong to these weights."
                )
            return torch.tensor(value, device=like.device, dtype=torch.float32).view(shape)

        return channelwise(self.mean), channelwise(self.std)

    def to_vae(self, latents: torch.Tensor) -> torch.Tensor:
        """Pipeline latents → what `vae.decode` expects (float32)."""
        mean, std = self._stats(latents)
        return latents.float() * std / self.scale + mean

    def from_vae(self, vae_latents: torch.Tensor) -> torch.Tensor:
        """What `vae.encode` gives → pipeline latents (float32)."""
        mean, std = self._stats(vae_latents)
        return (vae_latents.float() - mean) * self.scale / std


def encoded_latents(encoded: Any) -> torch.Tensor:
    """The latents of what `vae.encode` returns: an AutoencoderKL's distribution gives its mode (deterministic: no
    draw from a generator), an AutoencoderTiny's output its `latents`, a tuple its first item."""
    if hasattr(encoded, "latent_dist"):
        return encoded.latent_dist.mode()
    return encoded.latents if hasattr(encoded, "latents") else encoded[0]
