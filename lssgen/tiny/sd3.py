"""A tiny random-weight StableDiffusion3Pipeline."""

from __future__ import annotations

import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    SD3ControlNetModel,
    SD3MultiControlNetModel,
    SD3Transformer2DModel,
    StableDiffusion3ControlNetPipeline,
    StableDiffusion3Pipeline,
)

from ..adapters.sd3 import SD3_SCHEDULER_CONFIG
from .flux import build_tiny_vae
from .text import build_tiny_clip, build_tiny_t5, character_tokenizer, eval_mode


def build_tiny_sd3_pipeline(
    seed: int = 0,
    *,
    latent_channels: int = 16,
    num_layers: int = 2,  # FirstBlockCache needs a head and a tail block
    num_attention_heads: int = 2,
    attention_head_dim: int = 8,
    clip_dim: int = 16,
    scheduler_config: dict | None = None,
    transformer_in_channels: int | None = None,
) -> StableDiffusion3Pipeline:
    r"""
    A stock `StableDiffusion3Pipeline` with tiny random weights: transformer, VAE, two CLIP and a T5 encoder.

    The VAE has SD3's x8 spatial compression and normalisation, the transformer its 2x2 patches; position
    embeddings cover latents up to 64x64 (512 px). Text widths fit SD3's prompt layout: the two CLIP hidden states
    side by side are as wide as T5's (`joint_attention_dim`), the two pooled projections make `pooled_projection_dim`.
    Pass a short `max_sequence_length` (e.g. 32) when calling it: T5 pads prompts to that many tokens.

    Args:
        seed (`int`, defaults to `0`): seed of the random weights.
        scheduler_config (`dict`, *optional*): replaces SD3's scheduler config, e.g. to try dynamic shifting.
        transformer_in_channels (`int`, *optional*): 33 for an inpainting transformer (latents, mask, masked image
            latents); by default the latent's channels.

    Example:

    ```py
    >>> pipe = build_tiny_sd3_pipeline()
    >>> image = pipe("a cat", height=256, width=256, max_sequence_length=32).images[0]
    ```
    """
    torch.manual_seed(seed)
    text_dim = 2 * clip_dim
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=transformer_in_channels or latent_channels,
        out_channels=latent_channels,
        num_layers=num_layers,
        attention_head_dim=attention_head_dim,
        num_attention_heads=num_attention_heads,
        joint_attention_dim=text_dim,
        caption_projection_dim=num_attention_heads * attention_head_dim,
        pooled_projection_dim=text_dim,
        pos_embed_max_size=32,  # in patches: latents up to 64x64
    )
    vae = build_tiny_vae(
        latent_channels,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**(scheduler_config or SD3_SCHEDULER_CONFIG)),
        vae=vae,
        transformer=transformer,
        text_encoder=build_tiny_clip(clip_dim, with_projection=True),
        tokenizer=character_tokenizer(77),
        text_encoder_2=build_tiny_clip(clip_dim, with_projection=True),
        tokenizer_2=character_tokenizer(77),
        text_encoder_3=build_tiny_t5(text_dim),
        tokenizer_3=character_tokenizer(512),
    )
    return eval_mode(pipe)


def build_tiny_sd3_controlnet_pipeline(seed: int = 0, controlnets: int = 1) -> StableDiffusion3ControlNetPipeline:
    r"""
    A stock `StableDiffusion3ControlNetPipeline`: the tiny SD3 pipeline's components (`build_tiny_sd3_pipeline`) and
    tiny `SD3ControlNetModel`s of its transformer's configuration (one block; the control image encoded by the VAE),
    their zero-initialised projections given small random weights so that the control image shows in the result.

    Args:
        seed (`int`, defaults to `0`): seed of the random weights (controlnet `i` is seeded `seed + 1 + i`).
        controlnets (`int`, defaults to `1`): one `SD3ControlNetModel`, or an `SD3MultiControlNetModel` of this many.

    Example:

    ```py
    >>> pipe = build_tiny_sd3_controlnet_pipeline()
    >>> image = pipe("a cat", control_image=edges, height=256, width=256, max_sequence_length=32).images[0]
    ```
    """
    base = build_tiny_sd3_pipeline(seed=seed)
    nets = []
    for index in range(controlnets):
        torch.manual_seed(seed + 1 + index)
        config = {**dict(base.transformer.config), "num_layers": 1, "extra_conditioning_channels": 0}
        net = SD3ControlNetModel.from_config(config)
        with torch.no_grad():
            for layer in [*net.controlnet_blocks, net.pos_embed_input.proj]:
                layer.weight.normal_(std=0.1)
        nets.append(net.eval())
    controlnet = nets[0] if controlnets == 1 else SD3MultiControlNetModel(nets)
    return StableDiffusion3ControlNetPipeline(**base.components, controlnet=controlnet)
