"""A tiny random-weight CogView4Pipeline."""

from __future__ import annotations

import torch
from diffusers import CogView4Pipeline, CogView4Transformer2DModel, FlowMatchEulerDiscreteScheduler
from transformers import GlmConfig, GlmModel

from ..adapters.cogview4 import COGVIEW4_SCHEDULER_CONFIG
from .flux import build_tiny_vae
from .text import VOCAB_SIZE, character_tokenizer, eval_mode


def build_tiny_glm(width: int) -> GlmModel:
    """A random GLM text encoder of hidden size `width` (CogView4 reads its second-to-last hidden state)."""
    config = GlmConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=width // 2,
        max_position_embeddings=1024,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    return GlmModel(config).eval()


def build_tiny_cogview4_pipeline(
    seed: int = 0,
    *,
    latent_channels: int = 16,
    num_layers: int = 2,  # FirstBlockCache needs a head and a tail block
    num_attention_heads: int = 2,
    attention_head_dim: int = 8,
    text_dim: int = 32,
    condition_channels: int = 0,
) -> CogView4Pipeline:
    r"""
    A stock `CogView4Pipeline` with tiny random weights: transformer, VAE, a GLM text encoder and a character-level
    tokenizer (the pipeline's tokenizer calls work with it, so prompts can be passed as text).

    The VAE has CogView4's x8 spatial compression, the transformer its 2x2 patches, the scheduler CogView4-6B's
    config, so sizes, shifts and plans are those of the real model.

    Example:

    ```py
    >>> pipe = build_tiny_cogview4_pipeline()
    >>> image = pipe("a cat", height=256, width=256).images[0]
    ```
    """
    torch.manual_seed(seed)
    transformer = CogView4Transformer2DModel(
        patch_size=2,
        in_channels=latent_channels + condition_channels,  # CogView4 Control: the control image's latents too
        out_channels=latent_channels,
        num_layers=num_layers,
        attention_head_dim=attention_head_dim,
        num_attention_heads=num_attention_heads,
        text_embed_dim=text_dim,
        time_embed_dim=16,
        condition_dim=8,
        pos_embed_max_size=32,
        sample_size=32,
    )
    vae = build_tiny_vae(latent_channels, scaling_factor=1.0, use_quant_conv=False, use_post_quant_conv=False)
    pipe = CogView4Pipeline(
        tokenizer=character_tokenizer(1024),
        text_encoder=build_tiny_glm(text_dim),
        vae=vae,
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**COGVIEW4_SCHEDULER_CONFIG),
    )
    return eval_mode(pipe)
