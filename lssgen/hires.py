"""Hires fix: enlarge an image beyond the model's native size by an image-to-image pass at the larger size; and a
family's image-to-image and inpainting pipelines on a pipe's own components.

The stock recipe resizes the image in pixels to the target size and runs img2img there at a `strength` (every step
at the large size). Through lssgen the same call starts at the input image's own size, where the model is at home:
the first stage denoises the image from the strength's noise level at that size, the upsampler doubles it in latent
space, and the later stages restart at `start_sigma` times that level (docs/how-it-works.md#image-to-image).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import diffusers
from PIL import Image

from .adapters import find_adapter
from .conditions import takes_image_and_strength
from .patch import is_patched, patch, unpatch

# The share of noise an enlargement starts from when none is given: enough for the model to redraw detail at the
# new size, little enough to keep the composition.
DEFAULT_STRENGTH = 0.6


def image_to_image_pipeline(pipe: Any) -> Any:
    r"""
    The stock image-to-image pipeline of `pipe`'s family on `pipe`'s own components (the same modules, nothing
    copied), patched with `pipe`'s lssgen settings if `pipe` is patched. An image-to-image
    pipe is returned as it is.

    Example:

    ```py
    >>> img2img = lssgen.image_to_image_pipeline(pipe)  # FluxPipeline -> FluxImg2ImgPipeline
    ```
    """
    return _family_pipeline(pipe, "image_to_image_pipelines", "image-to-image", takes_image_and_strength)


def inpainting_pipeline(pipe: Any) -> Any:
    r"""
    The stock inpainting pipeline of `pipe`'s family on `pipe`'s own components (the same modules, nothing copied),
    patched with `pipe`'s lssgen settings if `pipe` is patched. An inpainting pipe is returned as it is.

    Example:

    ```py
    >>> inpaint = lssgen.inpainting_pipeline(pipe)  # FluxPipeline -> FluxInpaintPipeline
    >>> image = inpaint("a red boat", image=photo, mask_image=mask, strength=1.0).images[0]
    ```
    """
    return _family_pipeline(
        pipe, "inpainting_pipelines", "inpainting", lambda call: "mask_image" in inspect.signature(call).parameters
    )


def _family_pipeline(pipe: Any, mapping: str, kind: str, is_kind) -> Any:
    """The pipeline the adapter's `mapping` names for `pipe`'s class (or a base class), on `pipe`'s components and
    patched as `pipe` is; `pipe` itself where its stock `__call__` already `is_kind`."""
    state = pipe._lssgen if is_patched(pipe) else None
    stock_class = type(pipe) if state is None else state.original_class
    if is_kind(stock_class.__call__):
        return pipe
    adapter = find_adapter(pipe) if state is None else state.adapter
    names = getattr(adapter, mapping)
    name = next((names[cls.__name__] for cls in stock_class.__mro__ if cls.__name__ in names), None)
    if name is None:
        raise ValueError(
            f"lssgen knows no {kind} pipeline for {stock_class.__name__} (its {adapter.name} adapter maps "
            f"{sorted(names) or 'none'}): load the family's {kind} pipeline yourself and pass it instead."
        )
    new = _same_components(getattr(diffusers, name), pipe)
    if state is not None:
        patch(new, state.upsampler, adapter=state.adapter, **dataclasses.asdict(state.defaults))
    return new


def _same_components(pipeline_class: type, pipe: Any) -> Any:
    """A `pipeline_class` on `pipe`'s very modules and settings. Not diffusers' `from_pipe`: that casts the shared
    modules to float32 unless told a dtype (in place, so `pipe` too), and leaves out a component whose class is
    not the one the new pipeline's signature names (a model folder's own denoiser, as the scene model's)."""
    accepted = inspect.signature(pipeline_class.__init__).parameters
    settings = {**pipe.config, **pipe.components}
    new = pipeline_class(**{name: settings[name] for name in accepted if name in settings})
    new.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    return new


def hires_fix_call(
    pipe: Any, image: Image.Image, height: int, width: int, strength: float = DEFAULT_STRENGTH
) -> tuple[Any, dict[str, Any]]:
    """The image-to-image pipe and the call arguments of a Hires fix of `image` to `height` x `width`: the image
    resized in pixels to that size (Lanczos; what the stock recipe denoises from, and what pipelines that take
    their size from the image need), the strength, the size where the pipeline takes one, the family's own
    arguments, and `min_resolution` so that the first stage is the input image's size (at most half the target)."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"`image` must be a PIL image, got {type(image).__name__}; open it with PIL.Image.open.")
    for name, side in (("height", height), ("width", width)):
        if isinstance(side, bool) or not isinstance(side, int) or side < 1:
            raise ValueError(f"`{name}` must be a positive number of pixels, got {side!r}.")
    img2img = image_to_image_pipeline(pipe)
    resized = image.convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
    adapter = find_adapter(img2img)
    call = {"image": resized, "strength": strength, **adapter.image_to_image_arguments(img2img, resized)}
    stock_class = img2img._lssgen.original_class if is_patched(img2img) else type(img2img)
    if "height" in inspect.signature(stock_class.__call__).parameters:
        call.update(height=height, width=width)
    if is_patched(img2img):
        call["min_resolution"] = min(min(image.size), min(height, width) // 2)
    return img2img, call


def hires_fix(
    pipe: Any,
    image: Image.Image,
    prompt: str | list[str] | None = None,
    *,
    height: int,
    width: int,
    strength: float = DEFAULT_STRENGTH,
    **call: Any,
) -> Any:
    r"""
    Enlarge `image` to `height` x `width` with `pipe`'s model (Hires fix). On a patched pipe the call starts at the
    image's own size and finishes at the target size (`start_sigma=1.0` runs the stock recipe: every step at the
    target size, from the image resized in pixels); on an unpatched one it is the stock recipe.

    Args:
        pipe: a text-to-image or image-to-image pipeline lssgen supports, patched or not.
        image (`PIL.Image.Image`): the image to enlarge, usually generated at the model's native size.
        prompt: the prompt (or pass `prompt_embeds` in `call`).
        height (`int`), width (`int`): the target size in pixels.
        strength (`float`, *optional*, defaults to 0.6): how much noise the enlargement starts from.
        **call: further arguments of the pipeline's call and lssgen options (`num_inference_steps`, `generator`,
            `start_sigma`, ...; a `min_resolution` given here replaces the one that starts at the image's size).

    Returns:
        The image-to-image pipeline's output.

    Example:

    ```py
    >>> image = pipe("a lighthouse at dusk", height=1024, width=1024).images[0]
    >>> large = lssgen.hires_fix(pipe, image, "a lighthouse at dusk", height=2048, width=2048).images[0]
    ```
    """
    img2img, arguments = hires_fix_call(pipe, image, height, width, strength)
    if prompt is not None:
        arguments["prompt"] = prompt
    try:
        return img2img(**{**arguments, **call})
    finally:
        if img2img is not pipe:
            unpatch(img2img)  # it shares `pipe`'s modules: their hooks stay only for `pipe`
