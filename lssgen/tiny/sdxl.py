"""A tiny random-weight StableDiffusionXLPipeline, as SDXL or as Playground v2.5."""

from __future__ import annotations

import torch
from diffusers import (
    EDMDPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.models.controlnets import MultiControlNetModel

from ..adapters.sdxl import SDXL_SCHEDULER_CONFIG
from .flux import build_tiny_vae
from .sd import build_tiny_unet_controlnet
from .text import build_tiny_clip, character_tokenizer, eval_mode

# Playground v2.5's scheduler config and VAE normalisation (per-channel mean and std).
PLAYGROUND_SCHEDULER_CONFIG = {
    "algorithm_type": "dpmsolver++",
    "euler_at_final": False,
    "final_sigmas_type": "zero",
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "rho": 7.0,
    "sigma_data": 0.5,
    "sigma_max": 80.0,
    "sigma_min": 0.002,
    "solver_order": 2,
    "solver_type": "midpoint",
}
PLAYGROUND_LATENTS_MEAN = [-1.6574, 1.886, -1.383, 2.5155]
PLAYGROUND_LATENTS_STD = [8.4927, 5.9022, 6.5498, 5.2299]


def build_tiny_sdxl_pipeline(
    seed: int = 0, playground: bool = False, unet_in_channels: int = 4
) -> StableDiffusionXLPipeline:
    r"""
    A stock `StableDiffusionXLPipeline` with tiny random weights: UNet, VAE, two CLIP text encoders, tokenizers.

    The VAE has SDXL's x8 spatial compression and scaling factor, so sizes and plans are those of the real model.

    Args:
        seed (`int`, defaults to `0`): seed of the random weights.
        playground (`bool`, defaults to `False`): build it as Playground v2.5 instead (same pipeline class, a VAE
            normalised by per-channel `latents_mean`/`latents_std` and an `EDMDPMSolverMultistepScheduler`).
        unet_in_channels (`int`, defaults to `4`): 9 for an inpainting UNet (latents, mask, masked image latents).

    Example:

    ```py
    >>> pipe = build_tiny_sdxl_pipeline(playground=True)
    >>> image = pipe("a cat", height=256, width=256, num_inference_steps=8).images[0]
    ```
    """
    torch.manual_seed(seed)
    text_dim, time_dim = 32, 8
    # Attention only at the lower resolution, as SDXL has none in its first block; a LoRA can target
    # `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`.
    unet = UNet2DConditionModel(
        sample_size=128,
        in_channels=unet_in_channels,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=4,
        attention_head_dim=2,
        use_linear_projection=True,
        cross_attention_dim=2 * text_dim,  # both encoders' hidden states, concatenated
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + text_dim,  # 6 size numbers + pooled text
    )
    if playground:
        scheduler = EDMDPMSolverMultistepScheduler(**PLAYGROUND_SCHEDULER_CONFIG)
        vae = build_tiny_vae(
            4, scaling_factor=0.5, latents_mean=PLAYGROUND_LATENTS_MEAN, latents_std=PLAYGROUND_LATENTS_STD
        )
    else:
        scheduler = EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG)
        vae = build_tiny_vae(4, scaling_factor=0.13025)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=build_tiny_clip(text_dim),
        text_encoder_2=build_tiny_clip(text_dim, with_projection=True),
        tokenizer=character_tokenizer(77),
        tokenizer_2=character_tokenizer(77),
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
    return eval_mode(pipe)


def build_tiny_sdxl_controlnet_pipeline(seed: int = 0, controlnets: int = 1) -> StableDiffusionXLControlNetPipeline:
    r"""
    A stock `StableDiffusionXLControlNetPipeline`: the tiny SDXL pipeline's components (`build_tiny_sdxl_pipeline`)
    and tiny controlnets made from its UNet (they take its size conditioning too).

    Args:
        seed (`int`, defaults to `0`): seed of the random weights (controlnet `i` is seeded `seed + 1 + i`).
        controlnets (`int`, defaults to `1`): one `ControlNetModel`, or a `MultiControlNetModel` of this many.

    Example:

    ```py
    >>> pipe = build_tiny_sdxl_controlnet_pipeline()
    >>> image = pipe("a cat", image=edges, num_inference_steps=8).images[0]
    ```
    """
    base = build_tiny_sdxl_pipeline(seed=seed)
    nets = [build_tiny_unet_controlnet(base.unet, seed + 1 + index) for index in range(controlnets)]
    return StableDiffusionXLControlNetPipeline(
        **base.components, controlnet=nets[0] if controlnets == 1 else MultiControlNetModel(nets), add_watermarker=False
    )
