"""A tiny random-weight StableDiffusionPipeline (SD 1.x / 2.x)."""

from __future__ import annotations

import torch
from diffusers import (
    ControlNetModel,
    PNDMScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.models.controlnets import MultiControlNetModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ..adapters.sd import SD_SCHEDULER_CONFIG
from .flux import build_tiny_vae
from .text import build_tiny_clip, character_tokenizer, eval_mode


def build_tiny_sd_pipeline(
    seed: int = 0, scheduler: SchedulerMixin | type[SchedulerMixin] | None = None, unet_in_channels: int = 4
) -> StableDiffusionPipeline:
    r"""
    A stock `StableDiffusionPipeline` with tiny random weights: UNet, VAE, CLIP text encoder and tokenizer.

    The VAE has SD's x8 spatial compression and scaling factor, so sizes and plans are those of the real model.

    Args:
        seed (`int`, defaults to `0`): seed of the random weights.
        scheduler (`SchedulerMixin` or a scheduler class, *optional*): the pipeline's scheduler; a class is built
            from SD 1.5's scheduler config. Defaults to SD's PNDM.
        unet_in_channels (`int`, defaults to `4`): 9 for an inpainting UNet (latents, mask, masked image latents).

    Example:

    ```py
    >>> from diffusers import EulerDiscreteScheduler
    >>> pipe = build_tiny_sd_pipeline(scheduler=EulerDiscreteScheduler)
    >>> image = pipe("a cat", height=256, width=256, num_inference_steps=8).images[0]
    ```
    """
    torch.manual_seed(seed)
    # Attention only at the lower of the two resolutions keeps the UNet cheap; a LoRA can target
    # `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`.
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=unet_in_channels,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=4,
        cross_attention_dim=32,
        attention_head_dim=2,
    )
    if scheduler is None:
        scheduler = PNDMScheduler
    if isinstance(scheduler, type):
        scheduler = scheduler.from_config(SD_SCHEDULER_CONFIG)
    pipe = StableDiffusionPipeline(
        vae=build_tiny_vae(4, scaling_factor=0.18215),
        text_encoder=build_tiny_clip(32),
        tokenizer=character_tokenizer(77),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return eval_mode(pipe)


def build_tiny_unet_controlnet(unet: UNet2DConditionModel, seed: int = 0) -> ControlNetModel:
    """A tiny `ControlNetModel` made from a tiny UNet (`ControlNetModel.from_unet`), its zero-initialised output
    convolutions given small random weights so that the control image shows in the result."""
    torch.manual_seed(seed)
    # Three stride-2 convolutions bring the control image to the latent size (x8, as the real models).
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 8, 8, 16))
    with torch.no_grad():
        for block in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            block.weight.normal_(std=0.1)
    return controlnet.eval()


def build_tiny_sd_controlnet_pipeline(seed: int = 0, controlnets: int = 1) -> StableDiffusionControlNetPipeline:
    r"""
    A stock `StableDiffusionControlNetPipeline`: the tiny SD pipeline's components (`build_tiny_sd_pipeline`) and
    tiny controlnets made from its UNet.

    Args:
        seed (`int`, defaults to `0`): seed of the random weights (controlnet `i` is seeded `seed + 1 + i`).
        controlnets (`int`, defaults to `1`): one `ControlNetModel`, or a `MultiControlNetModel` of this many.

    Example:

    ```py
    >>> pipe = build_tiny_sd_controlnet_pipeline(controlnets=2)
    >>> image = pipe("a cat", image=[edges, depth], num_inference_steps=8).images[0]
    ```
    """
    base = build_tiny_sd_pipeline(seed=seed)
    nets = [build_tiny_unet_controlnet(base.unet, seed + 1 + index) for index in range(controlnets)]
    components = {name: value for name, value in base.components.items() if name != "image_encoder"}
    return StableDiffusionControlNetPipeline(
        **components,
        controlnet=nets[0] if controlnets == 1 else MultiControlNetModel(nets),
        requires_safety_checker=False,
    )
