r"""
FLUX.2's tiny autoencoder (taef2) as a diffusers VAE component of a `Flux2Pipeline` / `Flux2KleinPipeline` folder.

What the FLUX.2 pipelines read from their `vae` (diffusers 0.42.1, `pipeline_flux2_klein.py`):
`config.block_out_channels` (its length gives the x8 `vae_scale_factor`), `bn.running_mean`, `bn.running_var` and
`config.batch_norm_eps` (the latent normalisation over 2x2 patches), `encode(images)` (read by `retrieve_latents`
through `.latents`), `decode(latents, return_dict=False)[0]` with images in [-1, 1], `dtype` and the device of
its parameters. [`TinyFlux2Autoencoder`] has exactly those, around the taef2 encoder and decoder of
`lssgen.tiny_autoencoder`; a pipeline folder records it in `model_index.json` as
`["lssgen.flux2_vae", "TinyFlux2Autoencoder"]`, which diffusers loads once `lssgen` is imported.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from diffusers import ConfigMixin, Flux2Pipeline, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.autoencoder_tiny import AutoencoderTinyOutput
from diffusers.models.autoencoders.vae import DecoderOutput

from .tiny_autoencoder import WIDTH, TinyAutoencoder, build_decoder, build_encoder

# ModelMixin and ConfigMixin stay importable from this module on purpose: diffusers' loader finds the load method of
# a component from a non-diffusers library by looking these base classes up in the component's module.
__all__ = ["ConfigMixin", "ModelMixin", "TinyFlux2Autoencoder"]


class TinyFlux2Autoencoder(ModelMixin, ConfigMixin):
    r"""
    taef2 with FLUX.2's latent normalisation: a drop-in `vae` for the FLUX.2 pipelines.

    Args:
        latent_channels (`int`, defaults to `32`): channels of the latent (32 for FLUX.2).
        encoder_extra_branch_at (`list[int]`), decoder_extra_branch_at (`list[int]`): layers with taef2's extra
            1x1 branch (see `lssgen.tiny_autoencoder`).
        batch_norm_eps (`float`, defaults to `1e-4`): as `AutoencoderKLFlux2`'s.
        block_out_channels (`list[int]`): only its length matters (4: the pipelines' x8 `vae_scale_factor`).

    `bn` holds one running mean and variance per channel of the 2x2-patchified latent (128 for FLUX.2); the
    pipelines divide by them, so set them to the statistics of the latents a model is trained on.

    Example:

    ```py
    >>> vae = TinyFlux2Autoencoder.from_taesd_folder("data/taef2")
    >>> latents = vae.encode(images).latents  # images in [-1, 1]; (B, 32, H/8, W/8)
    >>> images = vae.decode(latents, return_dict=False)[0]
    ```
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        latent_channels: int = 32,
        encoder_extra_branch_at: list[int] = (11, 12, 13),
        decoder_extra_branch_at: list[int] = (2, 3, 4),
        batch_norm_eps: float = 1e-4,
        block_out_channels: list[int] = (WIDTH,) * 4,
        scaling_factor: float = 1.0,
        shift_factor: float = 0.0,
    ):
        super().__init__()
        self.encoder = build_encoder(latent_channels, set(encoder_extra_branch_at))
        self.decoder = build_decoder(latent_channels, set(decoder_extra_branch_at))
        self.bn = nn.BatchNorm2d(4 * latent_channels, eps=batch_norm_eps, affine=False, track_running_stats=True)

    def encode(self, images: torch.Tensor, return_dict: bool = True):
        latents = self.encoder((images + 1) / 2)  # taef2 takes images in [0, 1]
        return AutoencoderTinyOutput(latents=latents) if return_dict else (latents,)

    def decode(self, latents: torch.Tensor, return_dict: bool = True, **kwargs):
        images = self.decoder(latents) * 2 - 1
        return DecoderOutput(sample=images) if return_dict else (images,)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(images).latents).sample

    @classmethod
    def from_taesd_folder(cls, folder: str | Path) -> TinyFlux2Autoencoder:
        """taef2 from the original `taef2_encoder.pth` / `taef2_decoder.pth` in `folder`, BN statistics at 0 / 1."""
        tiny = TinyAutoencoder.from_folder(folder)
        extra = [sorted(i for i, layer in enumerate(part) if getattr(layer, "pool", None) is not None)
                 for part in (tiny.encoder, tiny.decoder)]  # fmt: skip
        model = cls(tiny.config.latent_channels, extra[0], extra[1])
        model.encoder.load_state_dict(tiny.encoder.state_dict())
        model.decoder.load_state_dict(tiny.decoder.state_dict())
        return model.eval().requires_grad_(False)

    @torch.no_grad()
    def set_latent_statistics(self, latents: torch.Tensor) -> None:
        """Set `bn` to the per-channel mean and variance of 2x2-patchified `latents` `(B, C, h, w)`: what the
        pipelines then normalise by (unit-scale latents for a transformer trained on latents like these)."""
        patches = Flux2Pipeline._patchify_latents(latents.float())
        self.bn.running_mean.copy_(patches.mean(dim=(0, 2, 3)))
        self.bn.running_var.copy_(patches.var(dim=(0, 2, 3)))
