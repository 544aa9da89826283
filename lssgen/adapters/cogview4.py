"""CogView4 (`CogView4Pipeline`): its own time-shift rule and SDXL-like size conditioning of the transformer."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.hooks import ModelHook
from diffusers.pipelines.cogview4.pipeline_cogview4 import calculate_shift

from ..hookspecs import hookimpl
from ..joined_conditions import ConditionRule, prepared_at_stage
from ..latents import LatentNormalization
from .base import Adapter, Architecture, dummy_tensors

SIZE_CONDITIONING_HOOK = "lssgen_cogview4_size_conditioning"


def _control_at_stage(pipe, run, arguments, stage):
    """CogView4 Control's condition at `stage`'s size, as the pipeline makes it at the target size: `prepare_image` at
    the stage's size (a tensor, which it takes as it is, resized first), sampled from the VAE and scaled. (The stock
    pipeline samples without the call's generator; the stages sample with it, so that a seed repeats them.)"""
    prepared = prepared_at_stage(pipe, arguments, stage)
    return pipe.vae.encode(prepared).latent_dist.sample(generator=run.generator) * pipe.vae.config.scaling_factor


# CogView4-6B's transformer `config.json`, as constructor arguments.
COGVIEW4_6B_CONFIG = {
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 28,
    "attention_head_dim": 128,
    "num_attention_heads": 32,
    "text_embed_dim": 4096,
    "time_embed_dim": 512,
    "condition_dim": 256,
    "pos_embed_max_size": 128,
    "sample_size": 128,
    "rope_axes_dim": (256, 256),
}


# CogView4-6B's scheduler: dynamic shifting of the linear type, with CogView4Pipeline's own `mu` rule.
COGVIEW4_SCHEDULER_CONFIG = {
    "base_image_seq_len": 256,
    "base_shift": 0.25,
    "max_image_seq_len": 4096,
    "max_shift": 0.75,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "time_shift_type": "linear",
    "use_dynamic_shifting": True,
}


def cogview4_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """A fresh scheduler with CogView4-6B's config."""
    return FlowMatchEulerDiscreteScheduler(**COGVIEW4_SCHEDULER_CONFIG)


def cogview4_time_shift(scheduler_config: Any, image_seq_len: int) -> float:
    """`mu` for `image_seq_len` patches, by CogView4Pipeline's rule; the length is capped at `max_image_seq_len`."""
    max_len = scheduler_config.get("max_image_seq_len", 4096)
    return calculate_shift(
        min(image_seq_len, max_len),
        scheduler_config.get("base_image_seq_len", 256),
        scheduler_config.get("base_shift", 0.25),
        scheduler_config.get("max_shift", 0.75),
    )


class CogView4SizeConditioningHook(ModelHook):
    """Gives the transformer the `original_size` and `target_size` of the stage being denoised.

    CogView4Pipeline builds both once, for the size it is called with; a low-resolution stage is conditioned as
    an image of its own size (original = target = the stage's pixel size). `crop_coords` stay as passed.
    """

    def __init__(self, current_stage: Callable):
        super().__init__()
        self.current_stage = current_stage

    def pre_forward(self, module, *args, **kwargs):
        stage = self.current_stage()
        target = kwargs.get("target_size")
        if stage is None or target is None:
            return args, kwargs
        size = torch.tensor([[stage.height, stage.width]], dtype=target.dtype, device=target.device)
        size = size.repeat(target.shape[0], 1)
        kwargs["original_size"] = size
        kwargs["target_size"] = size
        return args, kwargs


class CogView4Adapter(Adapter):
    r"""
    Adapter for [`~diffusers.CogView4Pipeline`].

    Each stage gets CogView4Pipeline's own schedule for its step count: integer timesteps `linspace(1000, 1, n)`,
    sigmas `timesteps / 1000` shifted with the `mu` of the stage's own patch count. The transformer sees the
    stage's size as `original_size` and `target_size` (through a hook named `"lssgen_cogview4_size_conditioning"`).

    Example:

    ```py
    >>> import lssgen
    >>> import torch
    >>> from diffusers import CogView4Pipeline

    >>> pipe = CogView4Pipeline.from_pretrained("THUDM/CogView4-6B", dtype=torch.bfloat16)
    >>> lssgen.patch(pipe)  # the adapter is chosen by matching the pipeline
    >>> image = pipe("a lighthouse at dusk", num_inference_steps=50, guidance_scale=3.5).images[0]
    ```
    """

    name = "cogview4"
    pipeline_classes = ("CogView4Pipeline", "CogView4ControlPipeline")
    # CogView4ControlPipeline joins the encoded control image to the latents along the channels in every step.
    condition_rules = {"CogView4ControlPipeline": ConditionRule("prepare_image", _control_at_stage, "control_image")}
    denoiser = "transformer"
    flow = True
    latent_multiple = 2  # the transformer patchifies 2x2 (transformer.config.patch_size)
    shorten_intermediate_steps = True
    default_steps = 50
    default_guidance = 3.5
    stage_hook = CogView4SizeConditioningHook
    stage_hook_name = SIZE_CONDITIONING_HOOK
    # 128 text tokens: the pipeline pads the GLM prompt to a multiple of 16, and 128 is a typical prompt's length
    # (its cost is small next to 4096 image tokens at 1024²); CFG doubles the batch.
    architectures = (
        Architecture(
            name="CogView4-6B",
            model_class="CogView4Transformer2DModel",
            config=COGVIEW4_6B_CONFIG,
            text_tokens=128,
            cfg_factor=2,
            scheduler=cogview4_scheduler,
        ),
    )

    def latent_channels(self, pipe: Any) -> int:
        # The channels it predicts: a Control transformer takes the control image's in too.
        return pipe.transformer.config.out_channels

    def default_size(self, pipe: Any) -> tuple[int, int]:
        side = pipe.transformer.config.sample_size * pipe.vae_scale_factor
        return side, side

    def latent_dtype(self, pipe: Any) -> torch.dtype:
        # CogView4Pipeline draws its noise in float32 (and casts it for the transformer), whatever the model's dtype.
        return torch.float32

    def timestep_kwargs(self, scheduler, num_steps, latent_height, latent_width):
        # CogView4Pipeline's schedule: the transformer sees the integer timesteps, the scheduler steps on their
        # sigmas after the shift. The plan therefore truncates on unshifted timesteps (as the published code
        # does) while re-noising uses the shifted sigma the stage really starts from.
        train_steps = scheduler.config.num_train_timesteps
        timesteps = np.linspace(train_steps, 1.0, num_steps).astype(np.int64).astype(np.float32)
        patches = (latent_height * latent_width) // self.latent_multiple**2
        return {
            "timesteps": timesteps.tolist(),
            "sigmas": (timesteps / train_steps).tolist(),
            "mu": cogview4_time_shift(scheduler.config, patches),
        }

    def timesteps_for_sigmas(self, scheduler, sigmas, latent_height, latent_width):
        # The transformer is conditioned on the unshifted time: invert the scheduler's shift at this size's `mu`.
        mu = cogview4_time_shift(scheduler.config, (latent_height * latent_width) // self.latent_multiple**2)
        scale = math.exp(mu) if scheduler.config.get("time_shift_type", "exponential") == "exponential" else mu
        unshifted = 1.0 / (1.0 + scale * (1.0 / np.asarray(sigmas, dtype=np.float64) - 1.0))
        return (unshifted * scheduler.config.num_train_timesteps).tolist()

    def install_hooks(self, pipe, current_stage):
        self.check_patch_size(pipe)
        super().install_hooks(pipe, current_stage)

    def latent_normalization(self, pipe: Any) -> LatentNormalization:
        # CogView4Pipeline decodes `latents / scaling_factor`, whatever else the config holds.
        return LatentNormalization(0.0, 1.0, pipe.vae.config.scaling_factor)

    def denoiser_dummy_inputs(self, model, latent_height, latent_width, text_tokens, batch=1):
        zeros, timestep = dummy_tensors(model, batch)
        size = zeros(batch, 2)
        return {
            "hidden_states": zeros(batch, model.config.in_channels, latent_height, latent_width),
            "encoder_hidden_states": zeros(batch, text_tokens, model.config.text_embed_dim),
            "timestep": timestep,
            "original_size": size,
            "target_size": size,
            "crop_coords": size,
        }


@hookimpl
def register_adapters(register):
    register(CogView4Adapter())
