"""A tiny random-weight WanPipeline (Wan 2.1, or Wan 2.2 with a second expert), text encoder included."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

from ..adapters.wan import WAN_SCHEDULER_CONFIG
from .text import build_tiny_t5, character_tokenizer, eval_mode

TEXT_DIM = 32


def build_tiny_wan_transformer(*, num_layers: int = 2, num_attention_heads: int = 2, attention_head_dim: int = 12):
    """A random `WanTransformer3DModel` with Wan's (1, 2, 2) patches, 16 latent channels and `TEXT_DIM`-channel text
    features. `attention_head_dim` must be a multiple of 6: the rotary embedding splits it into frame, height and
    width parts."""
    if attention_head_dim % 6:
        raise ValueError("`attention_head_dim` must be a multiple of 6 (rotary axes split it between t, h and w).")
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=num_attention_heads,
        attention_head_dim=attention_head_dim,
        in_channels=16,
        out_channels=16,
        text_dim=TEXT_DIM,
        freq_dim=32,
        ffn_dim=32,
        num_layers=num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )


def build_tiny_wan_pipeline(
    seed: int = 0,
    *,
    boundary_ratio: float | None = None,
    scheduler_config: dict | None = None,
    num_layers: int = 2,
) -> WanPipeline:
    r"""
    A stock `WanPipeline` with tiny random components: transformer, video VAE, umT5 text encoder and a
    character tokenizer (made on the spot, no download).

    The VAE compresses 4x in time and 8x in space into 16 channels with Wan 2.1's `latents_mean`/`latents_std`, and
    the scheduler is UniPC on flow sigmas with a fixed shift, so latent shapes and schedules are those of the real
    models. With `boundary_ratio`, it is a Wan 2.2 pipeline: a second, differently seeded expert `transformer_2`
    denoises the steps whose timestep is below `boundary_ratio * 1000`.

    Example:

    ```py
    >>> pipe = build_tiny_wan_pipeline()
    >>> video = pipe("a cat", height=64, width=48, num_frames=9, num_inference_steps=4).frames[0]
    >>> wan22 = build_tiny_wan_pipeline(boundary_ratio=0.875)
    ```
    """
    torch.manual_seed(seed)
    transformer = build_tiny_wan_transformer(num_layers=num_layers)
    transformer_2 = build_tiny_wan_transformer(num_layers=num_layers) if boundary_ratio is not None else None
    # diffusers' own Wan tests use this VAE size: base width 3, no channel growth, one residual block per level; the
    # three spatial and two temporal downsamples of the real one.
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    text_encoder = build_tiny_t5(TEXT_DIM, umt5=True)
    pipe = WanPipeline(
        tokenizer=character_tokenizer(512),
        text_encoder=text_encoder,
        vae=vae,
        scheduler=UniPCMultistepScheduler(**(scheduler_config or WAN_SCHEDULER_CONFIG)),
        transformer=transformer,
        transformer_2=transformer_2,
        boundary_ratio=boundary_ratio,
    )
    return eval_mode(pipe)
