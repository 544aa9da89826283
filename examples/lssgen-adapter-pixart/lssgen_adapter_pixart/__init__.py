"""lssgen adapter for diffusers' stock `PixArtSigmaPipeline`, installed as a plugin (entry point `lssgen: pixart`).

PixArt-Sigma is a diffusion (noise prediction) transformer run with DPM-Solver by default. Its latents are plain
`(B, C, h, w)` tensors, its 2x2 patch embedding needs even latent sides, and its sin-cos position embedding is
computed from the latent's shape, so every stage gets the right positions without a hook. The Sigma pipeline
passes no resolution micro-conditioning (`added_cond_kwargs` stays `None`), so there is none to follow the stage.
"""

from __future__ import annotations

from typing import Any

from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import (
    ASPECT_RATIO_256_BIN,
    ASPECT_RATIO_512_BIN,
    ASPECT_RATIO_1024_BIN,
    ASPECT_RATIO_2048_BIN,
)

import lssgen

__version__ = "0.1.0"

# The aspect-ratio bins the stock call snaps the requested size to, by the transformer's `sample_size`.
ASPECT_RATIO_BINS = {
    256: ASPECT_RATIO_2048_BIN,
    128: ASPECT_RATIO_1024_BIN,
    64: ASPECT_RATIO_512_BIN,
    32: ASPECT_RATIO_256_BIN,
}


class PixArtSigmaAdapter(lssgen.Adapter):
    r"""
    What lssgen needs to know about `PixArtSigmaPipeline`.

    With `use_resolution_binning=True` (the stock default) the pipeline denoises at the aspect-ratio bin closest
    to the requested size and resizes the image back to that size. lssgen plans its stages on the bin, so the
    denoiser sees exactly the sizes a plain call would end at, and the image still comes back at the requested size.

    Example:

    ```py
    >>> import lssgen
    >>> from diffusers import PixArtSigmaPipeline

    >>> pipe = PixArtSigmaPipeline.from_pretrained("PixArt-alpha/PixArt-Sigma-XL-2-1024-MS")
    >>> lssgen.patch(pipe)  # picks this adapter once `lssgen-adapter-pixart` is installed
    >>> image = pipe("a lighthouse at dusk", height=1024, width=1024, start_sigma=0.75).images[0]
    ```
    """

    name = "pixart"
    pipeline_classes = ("PixArtSigmaPipeline",)
    denoiser = "transformer"
    # Noise prediction: later stages restart by the img2img rule and are re-noised with `scheduler.add_noise`.
    flow = False
    latent_multiple = 2  # the transformer's 2x2 patches
    # The method's diffusion models (SD, SDXL) run every stage with all steps; PixArt's 20 are few already.
    shorten_intermediate_steps = False
    base_size = 1024  # PixArt-Sigma-XL-2-1024-MS; pass `base_height`/`base_width` for the 512 and 2K models
    default_steps = 20  # the stock call's defaults
    default_guidance = 4.5

    def default_size(self, pipe: Any) -> tuple[int, int]:
        # The pipeline has no `default_sample_size`; it falls back to the transformer's sample size.
        side = pipe.transformer.config.sample_size * pipe.vae_scale_factor
        return side, side

    def resolution_bin(self, pipe: Any, height: int, width: int, call: dict[str, Any]) -> tuple[int, int] | None:
        if not call.get("use_resolution_binning", True):
            return None
        bins = ASPECT_RATIO_BINS.get(pipe.transformer.config.sample_size)
        if bins is None:
            return None  # the stock call rejects this sample size with its own error
        binned_height, binned_width = pipe.image_processor.classify_height_width_bin(height, width, ratios=bins)
        return binned_height, binned_width


@lssgen.hookimpl
def register_adapters(register):
    register(PixArtSigmaAdapter())
