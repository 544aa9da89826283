r"""
The scene model's denoiser: a small convolutional U-Net (diffusers' `UNet2DConditionModel`) behind the call of
FLUX.2's transformer, so that a stock `Flux2KleinPipeline` runs it.

Why not a `Flux2Transformer2DModel`: the scene model needs a denoiser that learns to draw eight shapes on a 2-core
CPU in a few hours. A 2M-parameter FLUX.2 transformer trained for 31,000 steps (docs/scene-model.md) learnt
colours and textures but drew every shape as a blob, at chance accuracy, with its loss and caption gap flat from
step 26,000 on. A convolution sees the 8 px latent cells of an outline directly (a FLUX.2 token is 16 px
and holds a whole piece of it), which is the prior this task needs.

What it keeps of the pipeline's contract: it takes the packed 2x2 patches (`(B, H/16 * W/16, 128)`), the
timestep as the pipeline passes it (sigma), the stacked text states and the position ids, and returns packed
velocities. It reads the image grid from `img_ids` and checks them, so a stage denoised with another stage's
ids fails instead of drawing the wrong size.

Reference images: FLUX.2's pipelines append a reference image's tokens after the generated image's, with a time
id of 10, 20, ... (the generated image's is 0); `Flux2KleinInpaintPipeline` always appends its input image so. The
scene model was trained without references: it denoises the generated image's tokens alone and returns zeros for
the reference tokens (the pipelines keep only the first, generated, part of the prediction).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers import Flux2Transformer2DModel, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.cache_utils import CacheMixin
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin

from lssgen.console import declare_drop_in

PATCH = 2  # FLUX.2 packs 2x2 latent cells into one token


def scene_unet_config(text_width: int, channels: tuple[int, ...] = (32, 64, 128), latent_channels: int = 32) -> dict:
    """A `UNet2DConditionModel` config over taef2's latent cells: plain convolutions at full latent resolution,
    self- and cross-attention (to the prompt) at the two coarser levels and the middle."""
    return {
        "in_channels": latent_channels,
        "out_channels": latent_channels,
        "down_block_types": ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (len(channels) - 1),
        "up_block_types": ["CrossAttnUpBlock2D"] * (len(channels) - 1) + ["UpBlock2D"],
        "block_out_channels": list(channels),
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "cross_attention_dim": text_width,
        "attention_head_dim": 4,  # diffusers' UNet reads this as the number of heads
        "sample_size": 32,
    }


class SceneDenoiser(ModelMixin, ConfigMixin, CacheMixin):
    r"""
    A `UNet2DConditionModel` with `Flux2Transformer2DModel`'s call.

    Args:
        unet_config (`dict`): the U-Net's config (see `scene_unet_config`); its `in_channels` are the VAE's latent
            channels.

    Example:

    ```py
    >>> denoiser = SceneDenoiser(scene_unet_config(text_width=96))
    >>> denoiser.config.in_channels  # what Flux2KleinPipeline reads: latent channels x 4
    128
    ```
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(self, unet_config: dict, in_channels: int | None = None):
        super().__init__()
        # `in_channels` is what the pipeline reads (`config.in_channels // 4` latent channels); it is derived, and
        # saved in the config only so that a loaded model reads the same.
        self.register_to_config(in_channels=unet_config["in_channels"] * PATCH * PATCH)
        self.unet = UNet2DConditionModel(**unet_config)

    @staticmethod
    def _grid(img_ids: torch.Tensor, tokens: int) -> tuple[int, int]:
        ids = img_ids[0] if img_ids.ndim == 3 else img_ids
        height, width = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
        rows, columns = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        expected = torch.stack([rows.flatten(), columns.flatten()], dim=-1).to(ids.device)
        if tokens != height * width or not torch.equal(ids[:, 1:3].long(), expected):
            raise ValueError(
                f"img_ids describe a {height}x{width} token grid in an order SceneDenoiser does not read, for "
                f"{tokens} image tokens: pass the ids Flux2KleinPipeline._prepare_latent_ids makes for these latents."
            )
        return height, width

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
    ):
        batch, tokens, channels = hidden_states.shape
        ids = img_ids[0] if img_ids.ndim == 3 else img_ids
        if ids.shape[0] != tokens:
            self._grid(ids, tokens)  # raises: the ids are another latent's
        generated = int((ids[:, 0] == 0).sum())  # time id 0: the generated image; references follow it
        if not bool((ids[:generated, 0] == 0).all()):
            raise ValueError(
                "img_ids put reference tokens (time id > 0) before the generated image's (time id 0): pass the "
                "generated image's tokens first, as FLUX.2's pipelines do."
            )
        references = hidden_states[:, generated:]
        hidden_states, tokens = hidden_states[:, :generated], generated
        height, width = self._grid(ids[:generated], tokens)
        patches = hidden_states.transpose(1, 2).reshape(batch, channels, height, width)
        # FLUX.2's patch channels are (latent channel, row, column), pixel_shuffle's order.
        latents = F.pixel_shuffle(patches, PATCH)
        # The pipeline passes sigma in [0, 1]; the U-Net's sinusoidal embedding is laid out for 0-1000.
        sample = self.unet(latents, timestep * 1000, encoder_hidden_states=encoder_hidden_states).sample
        out = F.pixel_unshuffle(sample, PATCH).reshape(batch, channels, tokens).transpose(1, 2)
        out = torch.cat([out, torch.zeros_like(references)], dim=1)
        if not return_dict:
            return (out,)
        return Transformer2DModelOutput(sample=out)


# Flux2KleinPipeline annotates its `transformer` as `Flux2Transformer2DModel`; this model takes and returns what the
# pipeline passes that transformer, and nothing else of it: a subclass would carry its tensor- and
# context-parallel plans, device-map hints, block names and single-file conversion over modules it does not have.
declare_drop_in(SceneDenoiser, stands_for=Flux2Transformer2DModel)
