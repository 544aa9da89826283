"""Small random-weight stock pipelines, built locally (no download), for the demo, tests and benchmarks.

The weights are random: images are noise. What they show is the machinery (shapes, schedules, timings).
"""

from __future__ import annotations

import string

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast, T5Config, T5EncoderModel

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
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, transformer=transformer, **build_tiny_text_encoders(text_dim))
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()  # built, not loaded, so still in training mode (dropout on)
    return pipe


def build_character_tokenizer(model_max_length: int) -> PreTrainedTokenizerFast:
    """A character-level tokenizer made on the spot (no vocabulary download): one token per character."""
    characters = string.ascii_lowercase + string.digits + " .,;:!?'-()"
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(characters)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=model_max_length,
    )


def build_tiny_text_encoders(text_dim: int) -> dict:
    """Random CLIP and T5 encoders of width `text_dim` with character tokenizers, as FluxPipeline components."""
    clip_tokenizer = build_character_tokenizer(77)
    t5_tokenizer = build_character_tokenizer(512)
    vocab_size = len(clip_tokenizer)
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=text_dim,
            intermediate_size=2 * text_dim,
            num_attention_heads=2,
            num_hidden_layers=1,
            max_position_embeddings=77,
            projection_dim=text_dim,
            pad_token_id=0,
            eos_token_id=1,
        )
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=vocab_size,
            d_model=text_dim,
            d_kv=text_dim // 2,
            d_ff=2 * text_dim,
            num_layers=1,
            num_heads=2,
            pad_token_id=0,
            eos_token_id=1,
        )
    )
    return {"text_encoder": clip, "tokenizer": clip_tokenizer, "text_encoder_2": t5, "tokenizer_2": t5_tokenizer}
