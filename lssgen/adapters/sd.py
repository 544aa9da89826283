"""Stable Diffusion 1.x / 2.x (`StableDiffusionPipeline`): a diffusion UNet with no resolution conditioning."""

from __future__ import annotations

from typing import Any

from ..hookspecs import hookimpl
from .base import Adapter


class SDAdapter(Adapter):
    r"""
    Adapter for [`~diffusers.StableDiffusionPipeline`] (SD 1.x and 2.x).

    Each stage runs the scheduler's own n-step schedule, later stages truncated by the img2img rule and re-noised
    with the stage scheduler's `add_noise`; any scheduler SD ships with or is given works (PNDM, Euler, DDIM,
    DPM-Solver++, UniPC, ...), each stage on a fresh one. The UNet takes no size conditioning, so no hook is needed.

    Published settings: 50 steps, guidance 7.5, no shortening, native size 512 px. For SD 2.x models made at
    768 px, pass `base_height=768, base_width=768` (to `lssgen.patch` or the call) when shortening steps.

    Example:

    ```py
    >>> import lssgen
    >>> from diffusers import StableDiffusionPipeline

    >>> pipe = StableDiffusionPipeline.from_pretrained("stabilityai/stable-diffusion-2-1")
    >>> lssgen.patch(pipe, base_height=768, base_width=768)
    >>> image = pipe("a lighthouse at dusk", height=1536, width=1536, min_resolution=768).images[0]
    ```
    """

    name = "sd"
    pipeline_classes = ("StableDiffusionPipeline",)
    denoiser = "unet"
    flow = False
    latent_multiple = 1
    shorten_intermediate_steps = False
    base_size = 512
    default_steps = 50
    default_guidance = 7.5

    def default_size(self, pipe: Any) -> tuple[int, int]:
        # StableDiffusionPipeline has no `default_sample_size`; it reads the UNet's (an int or a pair).
        size = pipe.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else size
        return height * pipe.vae_scale_factor, width * pipe.vae_scale_factor


@hookimpl
def register_adapters(register):
    register(SDAdapter())
