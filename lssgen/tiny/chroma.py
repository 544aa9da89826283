"""A tiny random-weight ChromaPipeline."""

from __future__ import annotations

import torch
from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

from ..adapters.chroma import CHROMA_SCHEDULER_CONFIG
from .flux import FLUX_VAE_CONFIG, build_tiny_vae, flux_layout_transformer_config
from .text import build_tiny_t5, character_tokenizer, eval_mode


def build_tiny_chroma_pipeline(
    seed: int = 0,
    *,
    latent_channels: int = 4,
    num_layers: int = 1,
    num_single_layers: int = 1,
    num_attention_heads: int = 2,
    attention_head_dim: int = 16,
    text_dim: int = 32,
    scheduler_config: dict | None = None,
) -> ChromaPipeline:
    r"""
    A stock `ChromaPipeline` with tiny random weights: transformer (with its small timestep approximator), VAE, a T5
    encoder and its tokenizer (Chroma has no CLIP encoder).

    The VAE has FLUX.1's x8 spatial compression and normalisation, the scheduler Chroma1-HD's config (pass
    `scheduler_config` for another, e.g. a dynamically shifting one), so sizes and plans are those of the real model.
    Pass a short `max_sequence_length` (e.g. 32) when calling it: T5 pads prompts to that many tokens.

    Example:

    ```py
    >>> pipe = build_tiny_chroma_pipeline()
    >>> image = pipe("a cat", height=256, width=256, max_sequence_length=32).images[0]
    ```
    """
    torch.manual_seed(seed)
    transformer = ChromaTransformer2DModel(
        **flux_layout_transformer_config(
            latent_channels, num_layers, num_single_layers, num_attention_heads, attention_head_dim, text_dim
        ),
        approximator_num_channels=16,
        approximator_hidden_dim=32,
        approximator_layers=1,
    )
    pipe = ChromaPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**(scheduler_config or CHROMA_SCHEDULER_CONFIG)),
        vae=build_tiny_vae(latent_channels, **FLUX_VAE_CONFIG),
        text_encoder=build_tiny_t5(text_dim),
        tokenizer=character_tokenizer(512),
        transformer=transformer,
    )
    return eval_mode(pipe)
