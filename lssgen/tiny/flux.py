"""A tiny random-weight FluxPipeline."""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxControlNetModel,
    FluxControlNetPipeline,
    FluxMultiControlNetModel,
    FluxPipeline,
    FluxTransformer2DModel,
)

from ..adapters.flux import FLUX_SCHEDULER_CONFIG
from .text import build_tiny_clip, build_tiny_t5, character_tokenizer, eval_mode

# FLUX.1's VAE normalisation (and no quant convs), shared by the families that use its VAE (Chroma).
FLUX_VAE_CONFIG = {
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}


def flux_layout_transformer_config(
    latent_channels: int,
    num_layers: int,
    num_single_layers: int,
    num_attention_heads: int,
    attention_head_dim: int,
    text_dim: int,
) -> dict:
    """Constructor arguments shared by the tiny transformers of FLUX.1's layout (FLUX.1, Chroma): 2x2-packed
    latent tokens, `num_layers` double- and `num_single_layers` single-stream blocks, rotary axes split 1:1:2."""
    if attention_head_dim % 4:
        raise ValueError("`attention_head_dim` must be a multiple of 4 (rotary axes split it 1:1:2).")
    quarter = attention_head_dim // 4
    return {
        "patch_size": 1,
        "in_channels": 4 * latent_channels,
        "num_layers": num_layers,
        "num_single_layers": num_single_layers,
        "attention_head_dim": attention_head_dim,
        "num_attention_heads": num_attention_heads,
        "joint_attention_dim": text_dim,
        "axes_dims_rope": (quarter, quarter, 2 * quarter),
    }


def build_tiny_vae(latent_channels: int, **config) -> AutoencoderKL:
    """A random AutoencoderKL with the x8 spatial compression of the real models."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=32,
        **config,
    )


def build_tiny_flux_pipeline(
    seed: int = 0,
    *,
    latent_channels: int = 4,
    num_layers: int = 1,
    num_single_layers: int = 1,
    num_attention_heads: int = 2,
    attention_head_dim: int = 16,
    text_dim: int = 32,
    guidance_embeds: bool = False,
    condition_channels: int = 0,
) -> FluxPipeline:
    r"""
    A stock `FluxPipeline` with tiny random weights: transformer, VAE, CLIP and T5 encoders, tokenizers.

    The VAE has Flux's x8 spatial compression and normalisation, so sizes and plans are those of the real model.
    Pass a short `max_sequence_length` (e.g. 32) when calling it: T5 pads prompts to that many tokens.
    `condition_channels`: packed channels the transformer takes beside the latents' (FLUX.1 Control: as many as the
    latents'; Fill: the latents' and 256 for the mask), which it does not predict.

    Example:

    ```py
    >>> pipe = build_tiny_flux_pipeline()
    >>> image = pipe("a cat", height=256, width=256, max_sequence_length=32).images[0]
    ```
    """
    torch.manual_seed(seed)
    config = flux_layout_transformer_config(
        latent_channels, num_layers, num_single_layers, num_attention_heads, attention_head_dim, text_dim
    )
    config.update(in_channels=config["in_channels"] + condition_channels, out_channels=config["in_channels"])
    transformer = FluxTransformer2DModel(**config, pooled_projection_dim=text_dim, guidance_embeds=guidance_embeds)
    vae = build_tiny_vae(latent_channels, **FLUX_VAE_CONFIG)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG),
        vae=vae,
        transformer=transformer,
        text_encoder=build_tiny_clip(text_dim),
        tokenizer=character_tokenizer(77),
        text_encoder_2=build_tiny_t5(text_dim),
        tokenizer_2=character_tokenizer(512),
    )
    return eval_mode(pipe)


def build_tiny_flux_controlnet_pipeline(seed: int = 0, controlnets: int = 1) -> FluxControlNetPipeline:
    r"""
    A stock `FluxControlNetPipeline`: the tiny FLUX.1 pipeline's components (`build_tiny_flux_pipeline`) and tiny
    InstantX-style controlnets (`FluxControlNetModel.from_transformer`: one double and one single block, the control
    image encoded by the VAE), their zero-initialised projections given small random weights so that the control
    image shows in the result.

    Args:
        seed (`int`, defaults to `0`): seed of the random weights (controlnet `i` is seeded `seed + 1 + i`).
        controlnets (`int`, defaults to `1`): one `FluxControlNetModel`, or a `FluxMultiControlNetModel` of this many.

    Example:

    ```py
    >>> pipe = build_tiny_flux_controlnet_pipeline()
    >>> image = pipe("a cat", control_image=edges, height=256, width=256, max_sequence_length=32).images[0]
    ```
    """
    base = build_tiny_flux_pipeline(seed=seed)
    config = base.transformer.config
    nets = []
    for index in range(controlnets):
        torch.manual_seed(seed + 1 + index)
        net = FluxControlNetModel.from_transformer(
            base.transformer,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=config.attention_head_dim,
            num_attention_heads=config.num_attention_heads,
        )
        with torch.no_grad():
            for layer in [*net.controlnet_blocks, *net.controlnet_single_blocks, net.controlnet_x_embedder]:
                layer.weight.normal_(std=0.1)
        nets.append(net.eval())
    controlnet = nets[0] if controlnets == 1 else FluxMultiControlNetModel(nets)
    return FluxControlNetPipeline(**base.components, controlnet=controlnet)
