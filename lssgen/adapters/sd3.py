"""Stable Diffusion 3 / 3.5 (`StableDiffusion3Pipeline`): unpacked latents patchified 2x2 by the transformer."""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

from ..hookspecs import hookimpl
from .base import Adapter


def sd3_time_shift(scheduler_config: Any, image_seq_len: int) -> float:
    """`mu` for `image_seq_len` patches, with StableDiffusion3Pipeline's defaults; capped at `max_image_seq_len`."""
    max_len = scheduler_config.get("max_image_seq_len", 4096)
    return calculate_shift(
        min(image_seq_len, max_len),
        scheduler_config.get("base_image_seq_len", 256),
        max_len,
        scheduler_config.get("base_shift", 0.5),
        scheduler_config.get("max_shift", 1.16),
    )


class SD3Adapter(Adapter):
    r"""
    Adapter for [`~diffusers.StableDiffusion3Pipeline`] (SD3 and SD3.5).

    Each stage gets `sigmas = linspace(1, 1/n, n)`; with a dynamically shifting scheduler also the `mu` of the
    stage's own patch count, else the scheduler's static `shift` applies. The transformer crops its patch position
    embedding to the shape of the latent it is given, so no conditioning needs replacing per stage.

    Example:

    ```py
    >>> import lssgen
    >>> from diffusers import StableDiffusion3Pipeline

    >>> pipe = StableDiffusion3Pipeline.from_pretrained("stabilityai/stable-diffusion-3.5-medium")
    >>> lssgen.patch(pipe)  # the adapter is chosen by matching the pipeline
    >>> image = pipe("a lighthouse at dusk", num_inference_steps=40, guidance_scale=4.5).images[0]
    ```
    """

    name = "sd3"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    denoiser = "transformer"
    flow = True
    latent_multiple = 2  # the transformer patchifies 2x2 (transformer.config.patch_size)
    shorten_intermediate_steps = True
    default_steps = 40
    default_guidance = 4.5

    def timestep_kwargs(self, scheduler, num_steps, latent_height, latent_width):
        accepted = inspect.signature(scheduler.set_timesteps).parameters
        kwargs: dict[str, Any] = {}
        if "sigmas" in accepted and not scheduler.config.get("use_flow_sigmas", False):
            kwargs["sigmas"] = np.linspace(1.0, 1 / num_steps, num_steps).tolist()
        else:
            kwargs["num_inference_steps"] = num_steps
        # As StableDiffusion3Pipeline: a `mu` only for a dynamically shifting scheduler. The patch size is
        # SD3's 2, the `latent_multiple` the plan already rounded the stage to.
        if scheduler.config.get("use_dynamic_shifting", False) and "mu" in accepted:
            patches = (latent_height // self.latent_multiple) * (latent_width // self.latent_multiple)
            kwargs["mu"] = sd3_time_shift(scheduler.config, patches)
        return kwargs

    def install_hooks(self, pipe, current_stage):
        # Nothing to hook (position embeddings follow the latent's shape), but sizes and token counts assume 2x2.
        patch_size = pipe.transformer.config.patch_size
        if patch_size != self.latent_multiple:
            raise ValueError(
                f"lssgen's SD3 adapter expects a transformer with 2x2 patches, this one has patch_size={patch_size}. "
                "Register an adapter subclass with `latent_multiple` set to the patch size."
            )

    def _vae_stats(self, pipe: Any, like: torch.Tensor) -> tuple[Any, Any, float]:
        # StableDiffusion3Pipeline decodes `latents / scaling_factor + shift_factor`, whatever else the config holds.
        config = pipe.vae.config
        return getattr(config, "shift_factor", None) or 0.0, 1.0, config.scaling_factor


@hookimpl
def register_adapters(register):
    register(SD3Adapter())
