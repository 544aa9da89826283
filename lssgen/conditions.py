"""Call-time conditions that follow the stage: for image-to-image, the input image at the first stage's size.

A stock img2img call encodes its image at the target size and noises it to the strength's timestep. A
multi-resolution call starts smaller: the image is resized to the first stage's size in pixels, encoded there, and
noised to that stage's own start (`Stage.first_sigma` / its first timestep), and the pipeline receives that latent as
its `latents`. Resizing the image rather than the target-size latent costs one small encode instead of a large one,
and gives the latent the VAE would make of that image, not an interpolation of latent cells.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from .adapters.base import Adapter
from .plan import Stage


def takes_image_and_strength(stock_call: Any) -> bool:
    """Whether a pipeline's `__call__` is image-to-image: it starts from `image`, part-way by `strength`."""
    parameters = inspect.signature(stock_call).parameters
    return "image" in parameters and "strength" in parameters


def image_to_image_size(
    pipe: Any, adapter: Adapter, stock_call: Any, call: dict[str, Any]
) -> tuple[int | None, int | None]:
    """The size an img2img call generates at, as the stock pipeline decides it: the adapter's rule where the family
    has its own; else the call's `height`/`width` where the pipeline takes them; else (no such argument, as SD's and
    SDXL's, or none given to a pipeline without a default size, as Z-Image's) the input image's size as its image
    processor reads it. None: the family default."""
    own = adapter.image_to_image_size(pipe, call)
    if own is not None:
        return own
    takes_size = "height" in inspect.signature(stock_call).parameters
    height, width = (call.get("height"), call.get("width")) if takes_size else (None, None)
    if (height is None or width is None) and not (takes_size and hasattr(pipe, "default_sample_size")):
        image_height, image_width = pipe.image_processor.get_default_height_width(call["image"])
        height, width = height or image_height, width or image_width
    return height, width


def first_stage_image_latents(
    pipe: Any, adapter: Adapter, image: Any, stage: Stage, batch: int, dtype: torch.dtype
) -> torch.Tensor:
    """The img2img `image` at `stage`'s size as unpacked pipeline latents, `batch` of them (repeated as the stock
    pipelines repeat an image batch that divides the effective batch)."""
    pixels = pipe.image_processor.preprocess(image, height=stage.height, width=stage.width)
    vae = pipe.vae
    param = next(vae.parameters())
    latents = adapter.encode_pixels(pipe, pixels.to(param.device, param.dtype))
    if batch % latents.shape[0]:
        raise ValueError(
            f"Cannot duplicate `image` of batch size {latents.shape[0]} to an effective batch of {batch} images "
            "(prompts x images per prompt): pass one image, or one per prompt."
        )
    return latents.repeat(batch // latents.shape[0], *([1] * (latents.ndim - 1))).to(dtype)
