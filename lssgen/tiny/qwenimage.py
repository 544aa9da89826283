"""A tiny random-weight QwenImagePipeline, without a text encoder."""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImageControlNetModel,
    QwenImageControlNetPipeline,
    QwenImageMultiControlNetModel,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)

from ..adapters.qwenimage import QWENIMAGE_SCHEDULER_CONFIG
from .flux2 import tiny_flux2_prompt_embeds
from .text import eval_mode

TEXT_DIM = 32


def build_tiny_qwenimage_vae() -> AutoencoderKLQwenImage:
    """A random AutoencoderKLQwenImage with the real model's 16 latent channels, x8 compression and per-channel
    `latents_mean`/`latents_std` (its defaults are Qwen-Image's), so the pipeline's normalisation is not trivial.
    Widths as diffusers' own Wan VAE tests build it (base width 3, no channel growth), as the tiny Wan VAE is: its
    causal 3-D convolutions run on torch's slow CPU path, and at 8-16 channels a 256 px decode took most of a tiny
    call's time (0.6 s, 0.1 s at these widths)."""
    return AutoencoderKLQwenImage(
        base_dim=3,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )


def build_tiny_qwenimage_pipeline(
    seed: int = 0,
    *,
    num_layers: int = 2,
    num_attention_heads: int = 2,
    attention_head_dim: int = 16,
    scheduler_config: dict | None = None,
) -> QwenImagePipeline:
    r"""
    A stock `QwenImagePipeline` with a tiny random transformer and VAE and no text encoder or tokenizer: call it
    with `prompt_embeds` and `prompt_embeds_mask` (see [`tiny_qwenimage_prompt_embeds`]), and for true CFG
    (`true_cfg_scale` > 1, 4.0 by default) also `negative_prompt_embeds` and `negative_prompt_embeds_mask`.

    The transformer takes 64-channel tokens (2x2 patches of the VAE's 16 channels), the VAE compresses x8 and the
    scheduler has Qwen-Image's config (pass `scheduler_config` for another), so latent shapes, token counts and
    plans are those of the real model.

    Example:

    ```py
    >>> pipe = build_tiny_qwenimage_pipeline()
    >>> embeds, mask = tiny_qwenimage_prompt_embeds(pipe, "a cat")
    >>> image = pipe(prompt_embeds=embeds, prompt_embeds_mask=mask, height=256, width=256).images[0]
    ```
    """
    torch.manual_seed(seed)
    if attention_head_dim % 16:
        raise ValueError("`attention_head_dim` must be a multiple of 16 (rotary axes split it 2:3:3, each even).")
    eighth = attention_head_dim // 8
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=64,
        out_channels=16,
        num_layers=num_layers,
        attention_head_dim=attention_head_dim,
        num_attention_heads=num_attention_heads,
        joint_attention_dim=TEXT_DIM,
        # Qwen-Image's (16, 56, 56) split of 128, in the same proportions.
        axes_dims_rope=(2 * eighth, 3 * eighth, 3 * eighth),
    )
    # The text encoder (Qwen2.5-VL 7B) is far too heavy to build even a tiny one cheaply, and the pipeline accepts
    # prompt embeddings directly, so the components are None.
    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**(scheduler_config or QWENIMAGE_SCHEDULER_CONFIG)),
        vae=build_tiny_qwenimage_vae(),
        text_encoder=None,
        tokenizer=None,
        transformer=transformer,
    )
    return eval_mode(pipe)


def tiny_qwenimage_prompt_embeds(pipe, prompts: str | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic stand-in prompt embeddings and their mask, shaped as QwenImagePipeline's own encoder gives
    them: one token per word plus two, padded with zeros to the longest prompt of the batch, and a `(batch, tokens)`
    mask (1 = a real token). The same text always gives the same embedding (see `tiny_flux2_prompt_embeds`)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    lengths = [len(text.split()) + 2 for text in prompts]
    longest = max(lengths)
    embeds = torch.zeros(len(prompts), longest, TEXT_DIM, device=pipe.transformer.device, dtype=pipe.transformer.dtype)
    mask = torch.zeros(len(prompts), longest, dtype=torch.long, device=pipe.transformer.device)
    for row, (text, length) in enumerate(zip(prompts, lengths)):
        embeds[row, :length] = tiny_flux2_prompt_embeds(pipe, text, length)[0]
        mask[row, :length] = 1
    return embeds, mask


def build_tiny_qwenimage_controlnet_pipeline(seed: int = 0, controlnets: int = 1) -> QwenImageControlNetPipeline:
    r"""
    A stock `QwenImageControlNetPipeline`: the tiny Qwen-Image pipeline's components (`build_tiny_qwenimage_pipeline`:
    no text encoder, call it with `tiny_qwenimage_prompt_embeds`) and a tiny controlnet of its transformer (one block,
    `QwenImageControlNetModel.from_transformer`), its zero-initialised projections given small random weights so that
    the control image shows in the result.

    Args:
        seed (`int`, defaults to `0`): seed of the random weights (the controlnet's is `seed + 1`).
        controlnets (`int`, defaults to `1`): how many control images a call takes: one, to the controlnet itself;
            more, to the controlnet wrapped in a `QwenImageMultiControlNetModel`, which runs its one controlnet once
            per control image (a union controlnet: the pipeline runs no multi-controlnet of several nets).

    Example:

    ```py
    >>> pipe = build_tiny_qwenimage_controlnet_pipeline()
    >>> embeds, mask = tiny_qwenimage_prompt_embeds(pipe, "a cat")
    >>> image = pipe(prompt_embeds=embeds, prompt_embeds_mask=mask, control_image=edges, height=256, width=256)
    ```
    """
    base = build_tiny_qwenimage_pipeline(seed=seed)
    config = base.transformer.config
    torch.manual_seed(seed + 1)
    net = QwenImageControlNetModel.from_transformer(
        base.transformer,
        num_layers=1,
        attention_head_dim=config.attention_head_dim,
        num_attention_heads=config.num_attention_heads,
    )
    with torch.no_grad():
        for layer in [*net.controlnet_blocks, net.controlnet_x_embedder]:
            layer.weight.normal_(std=0.1)
    controlnet = net.eval() if controlnets == 1 else QwenImageMultiControlNetModel([net.eval()])
    return QwenImageControlNetPipeline(**base.components, controlnet=controlnet)
