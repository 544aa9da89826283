"""A tiny random-weight ZImagePipeline, without a text encoder."""

from __future__ import annotations

import zlib

import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    ZImageControlNetModel,
    ZImageControlNetPipeline,
    ZImagePipeline,
    ZImageTransformer2DModel,
)

from ..adapters.zimage import ZIMAGE_SCHEDULER_CONFIG
from .flux import build_tiny_vae
from .text import eval_mode

TEXT_DIM = 32


def build_tiny_zimage_pipeline(
    seed: int = 0,
    *,
    n_layers: int = 2,
    n_heads: int = 2,
    head_dim: int = 16,
    scheduler_config: dict | None = None,
) -> ZImagePipeline:
    r"""
    A stock `ZImagePipeline` with a tiny random transformer and VAE and no text encoder or tokenizer: call it with
    `prompt_embeds` (see [`tiny_zimage_prompt_embeds`]), and for CFG (`guidance_scale` > 0, 5.0 by default) also
    `negative_prompt_embeds`.

    The transformer patchifies the VAE's 16 channels 2x2, the VAE compresses x8 with FLUX.1's scaling and shift
    factors, and the scheduler has Z-Image-Turbo's config (pass `scheduler_config` for another), so latent shapes,
    token counts and plans are those of the real model.

    Example:

    ```py
    >>> pipe = build_tiny_zimage_pipeline()
    >>> image = pipe(prompt_embeds=tiny_zimage_prompt_embeds(pipe, "a cat"), guidance_scale=0.0, height=256, width=256)
    ```
    """
    torch.manual_seed(seed)
    if head_dim % 8:
        raise ValueError("`head_dim` must be a multiple of 8 (rotary axes split it 2:3:3, each even).")
    eighth = head_dim // 8
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=n_heads * head_dim,
        n_layers=n_layers,
        n_refiner_layers=1,
        n_heads=n_heads,
        n_kv_heads=n_heads,
        cap_feat_dim=TEXT_DIM,
        # Z-Image's (32, 48, 48) split of 128, in the same proportions.
        axes_dims=[2 * eighth, 3 * eighth, 3 * eighth],
        axes_lens=[1024, 512, 512],
    )
    # The text encoder (Qwen3-4B) is too heavy for a tiny pipeline, and the pipeline accepts prompt embeddings.
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**(scheduler_config or ZIMAGE_SCHEDULER_CONFIG)),
        vae=build_tiny_vae(16, scaling_factor=0.3611, shift_factor=0.1159),  # FLUX.1's VAE factors
        text_encoder=None,
        tokenizer=None,
        transformer=transformer,
    )
    return eval_mode(pipe)


def tiny_zimage_prompt_embeds(pipe, prompts: str | list[str]) -> list[torch.Tensor]:
    """Deterministic stand-in prompt embeddings shaped as ZImagePipeline's own encoder gives them: a list with one
    `(tokens, cap_feat_dim)` tensor per prompt, one token per word plus two, unpadded. The same text always gives
    the same embedding, different texts different ones (seeded by a checksum of the text)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    transformer = pipe.transformer
    embeds = []
    for text in prompts:
        generator = torch.Generator().manual_seed(zlib.crc32(text.encode()))
        row = torch.randn(len(text.split()) + 2, transformer.config.cap_feat_dim, generator=generator)
        embeds.append(row.to(transformer.device, transformer.dtype))
    return embeds


def build_tiny_zimage_controlnet_pipeline(
    seed: int = 0, controlnets: int = 1, control_in_dim: int | None = None
) -> ZImageControlNetPipeline:
    r"""
    A stock `ZImageControlNetPipeline`: the tiny Z-Image pipeline's components (`build_tiny_zimage_pipeline`: no text
    encoder, call it with `tiny_zimage_prompt_embeds`) and a tiny controlnet (one control block before the
    transformer's first layer, one noise refiner, the transformer's embedders shared as the pipeline shares them), its
    zero-initialised projections given small random weights so that the control image shows in the result.

    Args:
        seed (`int`, defaults to `0`): seed of the random weights (the controlnet's is `seed + 1`).
        controlnets (`int`, defaults to `1`): must be 1: the pipeline takes one controlnet.
        control_in_dim (`int`, *optional*): the controlnet's input channels; by default the latents' (16), as
            Z-Image-Turbo-Fun-Controlnet-Union's; 33 as its version 2.0's, whose extra channels the pipeline zero-fills.

    Example:

    ```py
    >>> pipe = build_tiny_zimage_controlnet_pipeline()
    >>> embeds = tiny_zimage_prompt_embeds(pipe, "a cat")
    >>> image = pipe(prompt_embeds=embeds, guidance_scale=0.0, control_image=edges, height=256, width=256)
    ```
    """
    if controlnets != 1:
        raise ValueError(f"ZImageControlNetPipeline takes one controlnet, not {controlnets}.")
    base = build_tiny_zimage_pipeline(seed=seed)
    config = base.transformer.config
    torch.manual_seed(seed + 1)
    controlnet = ZImageControlNetModel(
        control_layers_places=[0],
        control_in_dim=control_in_dim or config.in_channels,
        all_patch_size=config.all_patch_size,
        all_f_patch_size=config.all_f_patch_size,
        dim=config.dim,
        n_refiner_layers=1,
        n_heads=config.n_heads,
        n_kv_heads=config.n_kv_heads,
    )
    with torch.no_grad():
        for layer in controlnet.control_layers:
            for projection in (layer.before_proj, layer.after_proj):
                projection.weight.normal_(std=0.1)
    return eval_mode(ZImageControlNetPipeline(**base.components, controlnet=controlnet.eval()))
