"""Tiny random text encoders with tokenizers made on the spot (no vocabulary or weight download)."""

from __future__ import annotations

import string

import torch
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
    UMT5Config,
    UMT5EncoderModel,
)

CHARACTERS = string.ascii_lowercase + string.digits + " .,;:!?'-()"
VOCAB_SIZE = len(CHARACTERS) + 3


def character_tokenizer(model_max_length: int) -> PreTrainedTokenizerFast:
    """A character-level tokenizer: one token per character, `</s>` appended, `<pad>` = 0."""
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(CHARACTERS)}}
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


def _clip_config(width: int, projection_dim: int | None) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=width,
        intermediate_size=2 * width,
        num_attention_heads=2,
        num_hidden_layers=2,
        max_position_embeddings=77,
        projection_dim=projection_dim or width,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,  # the character tokenizer has none; CLIP's default (49406) is outside this vocabulary
    )


def build_tiny_clip(width: int, *, projection_dim: int | None = None, with_projection: bool = False):
    """A random CLIP text encoder of hidden size `width` (with a text projection when asked)."""
    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return model_class(_clip_config(width, projection_dim)).eval()


def build_tiny_t5(width: int, *, umt5: bool = False) -> T5EncoderModel | UMT5EncoderModel:
    """A random T5 encoder of model width `width`; with `umt5`, the UMT5 encoder (Wan's text encoder)."""
    config_class, model_class = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    config = config_class(
        vocab_size=VOCAB_SIZE,
        d_model=width,
        d_kv=width // 2,
        d_ff=2 * width,
        num_layers=1,
        num_heads=2,
        pad_token_id=0,
        eos_token_id=1,
        **({"relative_attention_num_buckets": 8} if umt5 else {}),  # the value Wan's tiny builder always had
    )
    return model_class(config).eval()


def eval_mode(pipe):
    """Built, not loaded, models start in training mode (dropout on): switch every component to eval."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe
