"""Small random-weight stock pipelines, built locally (no download), for the demo, tests and benchmarks.

The weights are random: images are noise. What they show is the machinery (shapes, schedules, timings).
"""

from __future__ import annotations

import hashlib

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

# FLUX.1-dev's scheduler and VAE normalisation, so plans and shifts match the real model's.
FLUX_SCHEDULER_CONFIG = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}


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
) -> FluxPipeline:
    r"""
    A stock `FluxPipeline` with tiny random weights and no text encoders (pass `prompt_embeds`).

    The VAE has Flux's x8 spatial compression and normalisation, so sizes and plans are those of the real model.

    Example:

    ```py
    >>> pipe = build_tiny_flux_pipeline()
    >>> embeds, pooled = tiny_prompt_embeds(pipe, "a cat")
    >>> image = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=256, width=256).images[0]
    ```
    """
    torch.manual_seed(seed)
    if attention_head_dim % 4:
        raise ValueError("`attention_head_dim` must be a multiple of 4 (rotary axes split it 1:1:2).")
    quarter = attention_head_dim // 4
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * latent_channels,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=attention_head_dim,
        num_attention_heads=num_attention_heads,
        joint_attention_dim=text_dim,
        pooled_projection_dim=text_dim,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(quarter, quarter, 2 * quarter),
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG)
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer,
    )


def tiny_prompt_embeds(
    pipe: FluxPipeline, prompt: str | list[str], sequence_length: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stand-in text embeddings for a pipeline without text encoders: random, but fixed by the prompt text."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    text_dim = pipe.transformer.config.joint_attention_dim
    pooled_dim = pipe.transformer.config.pooled_projection_dim
    embeds, pooled = [], []
    for text in prompts:
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
        generator = torch.Generator().manual_seed(seed)
        embeds.append(torch.randn(sequence_length, text_dim, generator=generator))
        pooled.append(torch.randn(pooled_dim, generator=generator))
    dtype = pipe.transformer.dtype
    return torch.stack(embeds).to(dtype), torch.stack(pooled).to(dtype)
