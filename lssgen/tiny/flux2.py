"""Tiny random-weight FLUX.2 pipelines (`Flux2Pipeline`, `Flux2KleinPipeline`), without text encoders."""

from __future__ import annotations

import zlib

import torch
from diffusers import (
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Pipeline,
    Flux2Transformer2DModel,
)

from ..adapters.flux import FLUX_SCHEDULER_CONFIG
from .text import eval_mode

# FLUX.2 checkpoints ship FLUX.1's dynamic-shifting Euler scheduler config; their pipelines pass the time shift `mu`
# themselves (`compute_empirical_mu`), so `use_dynamic_shifting=True` is what matters here.
FLUX2_SCHEDULER_CONFIG = dict(FLUX_SCHEDULER_CONFIG)
TEXT_DIM = 32


def build_tiny_flux2_vae() -> AutoencoderKLFlux2:
    """A random AutoencoderKLFlux2 with the real model's 32 latent channels and x8 compression.

    Its BatchNorm gets deterministic, non-trivial running statistics (a fresh one has mean 0 and variance 1, which
    would make the pipeline's normalisation, and so any mistake in undoing it, invisible).
    """
    vae = AutoencoderKLFlux2(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=32,
        norm_num_groups=4,
        sample_size=32,
        mid_block_add_attention=False,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    features = vae.bn.num_features  # 4 * 32: one statistic per channel of the 2x2-patchified latent
    with torch.no_grad():
        vae.bn.running_mean.copy_(torch.linspace(-0.6, 0.4, features))
        vae.bn.running_var.copy_(torch.linspace(0.25, 2.5, features).flip(0))
    return vae


def build_tiny_flux2_pipeline(
    seed: int = 0,
    *,
    klein: bool = False,
    num_layers: int = 1,
    num_single_layers: int = 1,
    num_attention_heads: int = 2,
    attention_head_dim: int = 16,
) -> Flux2Pipeline | Flux2KleinPipeline:
    r"""
    A stock `Flux2Pipeline` (or `Flux2KleinPipeline` with `klein=True`) with a tiny random transformer and VAE and
    no text encoder or tokenizer: call it with `prompt_embeds` (see [`tiny_flux2_prompt_embeds`]), and for Klein
    with `guidance_scale > 1` also `negative_prompt_embeds`.

    The transformer takes 128-channel tokens (2x2 patches of the VAE's 32 channels) and the VAE compresses x8, so
    latent shapes, token counts and plans are those of the real models.

    Example:

    ```py
    >>> pipe = build_tiny_flux2_pipeline()
    >>> embeds = tiny_flux2_prompt_embeds(pipe, "a cat")
    >>> image = pipe(prompt_embeds=embeds, height=256, width=256).images[0]
    ```
    """
    torch.manual_seed(seed)
    if attention_head_dim % 4:
        raise ValueError("`attention_head_dim` must be a multiple of 4 (rotary axes t, h, w, l split it evenly).")
    quarter = attention_head_dim // 4
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=128,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=attention_head_dim,
        num_attention_heads=num_attention_heads,
        joint_attention_dim=TEXT_DIM,
        timestep_guidance_channels=32,
        axes_dims_rope=(quarter,) * 4,
        # FLUX.2 [dev] is guidance-distilled (embedded guidance); Klein runs true CFG instead.
        guidance_embeds=not klein,
    )
    vae = build_tiny_flux2_vae()
    pipeline_class = Flux2KleinPipeline if klein else Flux2Pipeline
    # The text encoders (Mistral 3, Qwen 3) are far too heavy to build even tiny ones cheaply, and both pipelines
    # accept prompt embeddings directly, so the components are None.
    pipe = pipeline_class(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        transformer=transformer,
    )
    return eval_mode(pipe)


def tiny_flux2_prompt_embeds(pipe, prompts: str | list[str], tokens: int = 8) -> torch.Tensor:
    """Deterministic stand-in prompt embeddings `(len(prompts), tokens, joint_attention_dim)`: the same text always
    gives the same embedding, different texts different ones (seeded by a checksum of the text)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    dim = pipe.transformer.config.joint_attention_dim
    rows = []
    for text in prompts:
        generator = torch.Generator().manual_seed(zlib.crc32(text.encode()))
        rows.append(torch.randn(tokens, dim, generator=generator))
    return torch.stack(rows).to(pipe.transformer.device, pipe.transformer.dtype)
