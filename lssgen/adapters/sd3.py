"""Stable Diffusion 3 / 3.5 (`StableDiffusion3Pipeline`): unpacked latents patchified 2x2 by the transformer."""

from __future__ import annotations

from typing import Any

from ..hookspecs import hookimpl
from ..latents import LatentNormalization
from .base import Adapter, linear_time_shift


class SD3Adapter(Adapter):
    r"""
    Adapter for [`~diffusers.StableDiffusion3Pipeline`] (SD3 and SD3.5).

    Each stage gets the schedule `StableDiffusion3Pipeline` itself sets for that stage's step count: the
    scheduler's default n-step schedule (the stock pipeline passes no `sigmas`), with the scheduler's static
    `shift`, or, for a dynamically shifting scheduler, the `mu` of the stage's own patch count. The transformer
    crops its patch position embedding to the shape of the latent it is given, so no conditioning needs replacing
    per stage.

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
        # As StableDiffusion3Pipeline: no custom sigmas (unlike FLUX.1, whose pipeline passes a linspace; that
        # would change SD3's timesteps and, after truncation, its step counts), and a `mu` (max_shift defaulting
        # to 1.16) only for a dynamically shifting scheduler, here of the stage's own 2x2 patch count.
        kwargs: dict[str, Any] = {"num_inference_steps": num_steps}
        if scheduler.config.get("use_dynamic_shifting", False):
            kwargs["mu"] = linear_time_shift(scheduler.config, (latent_height // 2) * (latent_width // 2), 1.16)
        return kwargs

    def install_hooks(self, pipe, current_stage):
        # Nothing to hook: the patch position embedding is cropped to the latent's shape.
        self.check_patch_size(pipe)

    def latent_normalization(self, pipe: Any) -> LatentNormalization:
        # StableDiffusion3Pipeline decodes `latents / scaling_factor + shift_factor`, whatever else the config holds.
        config = pipe.vae.config
        return LatentNormalization(getattr(config, "shift_factor", None) or 0.0, 1.0, config.scaling_factor)


@hookimpl
def register_adapters(register):
    register(SD3Adapter())
