"""Stable Diffusion 1.x / 2.x (`StableDiffusionPipeline`): a diffusion UNet with no resolution conditioning."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import PNDMScheduler

from ..hookspecs import hookimpl
from .base import Adapter, Architecture, InpaintLayout, dummy_tensors

# SD1.5's UNet `config.json`, as constructor arguments.
SD15_UNET_CONFIG = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
}


# Stable Diffusion 1.5's scheduler config (PNDM, PLMS steps only), so plans match the real model's.
SD_SCHEDULER_CONFIG = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
}


def sd_scheduler() -> PNDMScheduler:
    """A fresh scheduler with SD1.5's config."""
    return PNDMScheduler.from_config(SD_SCHEDULER_CONFIG)  # the config holds keys PNDM ignores


def unet_dummy_inputs(
    model: torch.nn.Module, latent_height: int, latent_width: int, text_tokens: int, batch: int = 1
) -> dict[str, Any]:
    """`Adapter.denoiser_dummy_inputs` of a `UNet2DConditionModel` as the SD and SDXL pipelines call it: SDXL's
    added conditioning too where the UNet's config has it (so either adapter serves any such UNet)."""
    config = model.config
    zeros, timestep = dummy_tensors(model, batch)
    kwargs: dict[str, Any] = {
        "sample": zeros(batch, config.in_channels, latent_height, latent_width),
        "timestep": timestep,
        "encoder_hidden_states": zeros(batch, text_tokens, config.cross_attention_dim),
    }
    if config.addition_embed_type == "text_time":
        # SDXL: pooled text embedding plus 6 size/crop ids, each embedded in `addition_time_embed_dim`.
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": zeros(batch, pooled), "time_ids": zeros(batch, 6)}
    return kwargs


class SDAdapter(Adapter):
    r"""
    Adapter for [`~diffusers.StableDiffusionPipeline`] (SD 1.x and 2.x).

    Each stage runs the scheduler's own n-step schedule, later stages truncated by the img2img rule and re-noised
    with the stage scheduler's `add_noise`; any scheduler SD ships with or is given works (PNDM, Euler, DDIM,
    DPM-Solver++, UniPC, ...), each stage on a fresh one. The UNet takes no size conditioning, so no hook is needed.

    Published settings: 50 steps, guidance 7.5, no shortening, native size 512 px. For SD 2.x models made at
    768 px, pass `base_height=768, base_width=768` (to `lssgen.patch` or the call) when shortening steps.

    Example:

    ```py
    >>> import lssgen
    >>> from diffusers import StableDiffusionPipeline

    >>> pipe = StableDiffusionPipeline.from_pretrained("stabilityai/stable-diffusion-2-1")
    >>> lssgen.patch(pipe, base_height=768, base_width=768)
    >>> image = pipe("a lighthouse at dusk", height=1536, width=1536, min_resolution=768).images[0]
    ```
    """

    name = "sd"
    pipeline_classes = (
        "StableDiffusionPipeline",
        "StableDiffusionImg2ImgPipeline",
        "StableDiffusionInpaintPipeline",
        "StableDiffusionControlNetPipeline",
    )
    image_to_image_pipelines = {"StableDiffusionPipeline": "StableDiffusionImg2ImgPipeline"}
    inpainting_pipelines = {"StableDiffusionPipeline": "StableDiffusionInpaintPipeline"}
    # `prepare_latents` gives (latents, noise[, image latents: 4-channel U-Nets only, which blend]);
    # `prepare_mask_latents` (mask, masked image latents), each doubled for classifier-free guidance.
    inpaint_layouts = {"StableDiffusionInpaintPipeline": InpaintLayout()}
    denoiser = "unet"
    flow = False
    latent_multiple = 1
    shorten_intermediate_steps = False
    base_size = 512
    default_steps = 50
    default_guidance = 7.5
    # StableDiffusionControlNetPipeline's `prepare_image` resizes, repeats and doubles (CFG) the control image.
    control_image_method = "prepare_image"
    # 77 CLIP text tokens; CFG doubles the batch.
    architectures = (
        Architecture(
            name="SD1.5",
            model_class="UNet2DConditionModel",
            config=SD15_UNET_CONFIG,
            text_tokens=77,
            cfg_factor=2,
            scheduler=sd_scheduler,
        ),
    )

    def default_size(self, pipe: Any) -> tuple[int, int]:
        # StableDiffusionPipeline has no `default_sample_size`; it reads the UNet's (an int or a pair).
        size = pipe.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else size
        return height * pipe.vae_scale_factor, width * pipe.vae_scale_factor

    def latent_channels(self, pipe):
        return pipe.unet.config.out_channels  # an inpainting U-Net takes 9 channels in, gives the latent's 4 out

    def denoiser_reads_mask(self, pipe):
        # Inpainting U-Nets (stable-diffusion-inpainting) take the latents, the mask and the masked image's latents.
        return pipe.unet.config.in_channels == 9

    def denoiser_dummy_inputs(self, model, latent_height, latent_width, text_tokens, batch=1):
        return unet_dummy_inputs(model, latent_height, latent_width, text_tokens, batch)


@hookimpl
def register_adapters(register):
    register(SDAdapter())
