r"""
Inpainting on the stock pipelines: the kept region follows the stage.

A stock inpainting loop prepares, once before the loop and at the target size, the image's latents, the noise and
the mask, and after every step blends the kept region back in:

    latents = (1 - mask) * scheduler.scale_noise(image_latents, next_timestep, noise) + mask * latents

`mask`, `image_latents` and `noise` are locals of the stock `__call__`: no callback can replace them, and at a
smaller stage they no longer fit the latents. lssgen hands the loop its own tensors instead (the pipeline's
`prepare_latents` and `prepare_mask_latents` are stood in for the call) and, at every stage switch, replaces their
contents *in place* (`Tensor.set_`) with the next stage's: the stock blend then runs unchanged at every stage's
size. Per stage:

- the mask is the target-size mask averaged over each stage cell (area resampling, `MASK_RESAMPLING`): a cell that
  is part kept, part repainted is blended in proportion, as the full-size mask would blend its sub-cells on average;
- the image latents are the input image resized to the stage and encoded there, as lssgen's image-to-image
  encodes its first stage (with `padding_mask_crop`, the pipeline's crop of it; given latents instead of pixels,
  the latents resized down); the target-size stage gets the pipeline's own;
- the noise is the noise the stage started from (the first stage's, or the noise its transition drew), so that
  the kept region stays on the path its own noise sets, as in the stock loop.

The staged scheduler's `scale_noise` (`add_noise`) noises the image to the level the last step reached, so the blend
at a stage's last step puts the kept region at the stage's end; after the transition to the next stage, its kept
region is set to the next stage's image noised to the stage's start with the transition's own noise.

Inpainting models (SD's 9-channel U-Nets, SD3's 33-channel transformers) blend nothing in: they read the mask and the
masked image's latents, which the loop holds too; at each stage those are the pipeline's own `prepare_mask_latents`
at the stage's size (`_conditions_at`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from .conditions import first_stage_image_latents
from .joined_conditions import binary_mask_at
from .scaling import scale_down

if TYPE_CHECKING:
    from .adapters.base import Adapter, InpaintLayout
    from .plan import Stage


# How a mask goes to a smaller stage's grid: "area" (a cell's share of repainted sub-cells; shipped), "nearest" (one
# sub-cell decides) or "max" (repainted if any sub-cell is). Compared on the scene model in docs/conditioned.md
# (`scripts/inpaint_scene_model.py` sets it per run).
MASK_RESAMPLING = "area"


def resize_mask(mask: torch.Tensor, latent_height: int, latent_width: int) -> torch.Tensor:
    """An unpacked mask `(B, C, H, W)` (1 = repaint) on a `latent_height` x `latent_width` grid by
    `MASK_RESAMPLING` (at the same size, the mask itself)."""
    size = (latent_height, latent_width)
    if tuple(mask.shape[-2:]) == size:
        return mask
    if MASK_RESAMPLING == "max":
        resized = F.adaptive_max_pool2d(mask.float(), size)
    else:
        resized = F.interpolate(mask.float(), size=size, mode=MASK_RESAMPLING)
    return resized.to(mask.dtype)


@dataclass
class KeptRegion:
    """An inpainting call's kept region: the target-size image latents and mask (unpacked, as the pipeline prepared
    them), the tensors the stock loop holds (`loop`, kept at the size of the stage in force), and what the pipeline
    prepared for the target size in the loop's layout (`stock`), which the last stage gets back as it is."""

    adapter: Adapter
    pipe: Any
    target: Stage
    # The call's input image, encoded at each low-resolution stage's size; with `padding_mask_crop`, replaced by the
    # pipeline's crop of it (`(B, 3, H, W)` in [-1, 1]). None: the call gave latents, resized down instead.
    source: Any = field(default=None, repr=False)
    cropped: bool = False
    # The image as the pipeline preprocessed it for the target size, `(B, 3, H, W)` in [-1, 1] (None: latents).
    pixels: torch.Tensor | None = field(default=None, repr=False)
    image: torch.Tensor | None = field(default=None, repr=False)  # None: the loop blends nothing in
    mask: torch.Tensor | None = field(default=None, repr=False)  # 1 = repaint
    # The denoiser reads the mask and the masked image (SD's 9-channel U-Nets): both prepared by the pipeline's own
    # `prepare_mask_latents` at a stage's size.
    conditions: Any = field(default=None, repr=False)
    stock: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    loop: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    packed: bool = True  # the loop holds its image and noise packed (`InpaintLayout.packed`)
    _cache: dict[tuple, Any] = field(default_factory=dict, repr=False)

    def at_target(self, stage: Stage) -> bool:
        return (stage.latent_height, stage.latent_width) == (self.target.latent_height, self.target.latent_width)

    def image_at(self, stage: Stage, batch: int, dtype: torch.dtype) -> torch.Tensor:
        """The image latents at `stage`'s size, unpacked, `batch` of them."""
        if self.at_target(stage) and self.image is not None:
            return self.image
        key = ("image", stage.latent_height, stage.latent_width)
        if key not in self._cache:
            if self.source is None:
                image = scale_down(self.image, stage.latent_height, stage.latent_width)
            elif self.cropped:
                vae = next(self.pipe.vae.parameters())
                image = self.adapter.encode_pixels(self.pipe, self.pixels_at(stage).to(vae.device, vae.dtype))
                image = image.repeat(batch // image.shape[0], 1, 1, 1)  # one crop for a batch, as the pipeline
            else:
                image = first_stage_image_latents(self.pipe, self.adapter, self.source, stage, batch, dtype)
            self._cache[key] = image.to(dtype)
        return self._cache[key]

    def pixels_at(self, stage: Stage) -> torch.Tensor:
        """The pipeline's preprocessed image resized to `stage` (bicubic, antialiased)."""
        size = (stage.height, stage.width)
        return F.interpolate(self.pixels.float(), size, mode="bicubic", antialias=True).clamp(-1, 1)

    def mask_at(self, stage: Stage) -> torch.Tensor:
        """The mask at `stage`'s size, unpacked."""
        return resize_mask(self.mask, stage.latent_height, stage.latent_width)

    def in_loop_layout(self, name: str, stage: Stage, noise: torch.Tensor | None = None) -> torch.Tensor:
        """What the loop holds as `name` ("image", "noise", "mask" or "masked", the masked image's latents) during
        `stage`."""
        pack = self.adapter.pack if self.packed else (lambda pipe, latents: latents)
        if name == "noise":
            return pack(self.pipe, noise)
        if self.at_target(stage):
            return self.stock[name]
        if self.conditions is not None and name in ("mask", "masked"):
            key = ("conditions", stage.latent_height, stage.latent_width)
            if key not in self._cache:
                self._cache[key] = dict(zip(("mask", "masked"), self.conditions(stage)))
            return self._cache[key][name]
        if name == "image":
            held = self.stock["image"]
            return pack(self.pipe, self.image_at(stage, self.image.shape[0], held.dtype))
        return self.adapter.pack_mask(self.pipe, self.mask_at(stage), self.stock["mask"])

    def hand_over(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A tensor of its own with `tensor`'s contents, for the loop to hold as `name`; `enter` changes it in
        place."""
        self.loop[name] = tensor.clone()
        return self.loop[name]

    def enter(self, stage: Stage, noise: torch.Tensor) -> None:
        """Give the loop's tensors `stage`'s contents and size; `noise` (unpacked) is the noise the stage starts
        from."""
        for name, held in self.loop.items():
            value = self.in_loop_layout(name, stage, noise).to(device=held.device, dtype=held.dtype)
            # In place: the stock loop holds this very tensor in a local.
            held.set_(value.contiguous().clone())

    def keep(self, latents: torch.Tensor, stage: Stage, noised_image: torch.Tensor) -> torch.Tensor:
        """Unpacked `latents` of `stage` with the kept region set to `noised_image` (the stage's image noised to the
        stage's start), blended by the stage's mask as the loop blends; as they are where the loop blends nothing
        in."""
        if self.image is None:
            return latents
        # The first images' mask where the pipeline doubled it for classifier-free guidance (SD3's, SD's).
        mask = self.mask_at(stage)[: latents.shape[0]].to(latents.dtype)
        return (1 - mask) * noised_image.to(latents.dtype) + mask * latents


def stand_in_preparation(pipe: Any, run: Any, layout: InpaintLayout) -> dict[str, Any]:
    """Stand-ins for the pipeline's `prepare_latents` and `prepare_mask_latents` for one lssgen call (set as
    instance attributes; the caller restores what was there). Each runs the pipeline's own method at the target
    size, records what the kept region needs, and gives the loop tensors of the first stage's size: the first
    stage's starting latents (the image at that size noised to the stage's start), its noise, image and mask (and
    the masked image's latents, where the denoiser reads them)."""
    kept, adapter = run.kept, run.adapter
    first = run.plan.stages[0]
    target = kept.target
    prepare_latents, prepare_mask_latents = pipe.prepare_latents, pipe.prepare_mask_latents

    def latents_for_stages(*args, **kwargs):
        bound = inspect.signature(prepare_latents).bind(*args, **kwargs)
        arguments = bound.arguments
        arguments["latents"] = None
        if not layout.draws_noise:
            # Zeros as the call's latents: the stock method then takes them for its noise instead of drawing any
            # from the call's generators (lssgen draws the stages' noise), and still encodes the image.
            patch, channels = layout.latents_patch, adapter.latent_channels(pipe)
            rows, cols = target.latent_height // patch, target.latent_width // patch
            shape = (arguments["batch_size"], channels * patch * patch, rows, cols)
            arguments["latents"] = torch.zeros(shape, device=arguments["device"], dtype=arguments["dtype"])
        outputs = list(prepare_latents(*bound.args, **bound.kwargs))
        pixels = arguments["image"]  # the pipeline's preprocessed image, or the latents it was given
        if isinstance(pixels, torch.Tensor) and pixels.ndim == 4 and pixels.shape[1] == 3:
            kept.pixels = pixels
        else:
            kept.source = None
        held = outputs[layout.latents]
        # A pipeline whose denoiser reads the mask returns no image latents to blend with (SD's 9-channel U-Nets).
        kept.packed = layout.packed
        if len(outputs) > layout.image:
            kept.stock["image"] = image = outputs[layout.image]
            if layout.packed:
                image = adapter.unpack(pipe, image, target.latent_height, target.latent_width)
            kept.image = image
        start = run.renoise(kept.image_at(first, arguments["batch_size"], held.dtype), first)
        outputs[layout.latents] = adapter.pack(pipe, start).to(held.dtype)
        if kept.image is not None:
            noise = kept.in_loop_layout("noise", first, run.noises[first.index])
            outputs[layout.noise] = kept.hand_over("noise", noise)
            outputs[layout.image] = kept.hand_over("image", kept.in_loop_layout("image", first))
        return tuple(outputs)

    def mask_for_stages(*args, **kwargs):
        bound = inspect.signature(prepare_mask_latents).bind(*args, **kwargs)
        outputs = prepare_mask_latents(*args, **kwargs)
        mask = outputs if layout.mask is None else outputs[layout.mask]
        kept.stock["mask"] = mask
        kept.mask = adapter.unpack_mask(pipe, mask, target.latent_height, target.latent_width)
        if adapter.denoiser_reads_mask(pipe):
            kept.stock["masked"] = outputs[layout.masked]
            kept.conditions = lambda stage: _conditions_at(prepare_mask_latents, bound, kept, stage)
        outputs = [outputs] if layout.mask is None else list(outputs)
        outputs[layout.mask or 0] = kept.hand_over("mask", kept.in_loop_layout("mask", first))
        if kept.conditions is not None:
            outputs[layout.masked] = kept.hand_over("masked", kept.in_loop_layout("masked", first))
        return outputs[0] if layout.mask is None else tuple(outputs)

    stand_ins = {"prepare_latents": latents_for_stages, "prepare_mask_latents": mask_for_stages}
    if not layout.packed:
        stock_pack = type(pipe)._pack_latents
        stand_ins["_pack_latents"] = lambda latents, *sizes, **named_sizes: stock_pack(latents, *latents.shape)
    return stand_ins


def _conditions_at(prepare_mask_latents: Any, bound: inspect.BoundArguments, kept: KeptRegion, stage: Stage) -> tuple:
    """The pipeline's own mask and masked image latents at `stage`'s size: its `prepare_mask_latents` with the
    call's arguments but the stage's size, the mask (in pixels) resized to the stage by area and kept binary, and
    the image resized to the stage and masked by it (given latents for the masked image: those resized down)."""
    arguments = dict(bound.arguments)
    mask, masked = arguments["mask"], arguments["masked_image"]
    stage_mask = binary_mask_at(mask, stage)
    if masked is not None and masked.shape[1] == 3 and kept.pixels is not None:
        masked = (kept.pixels_at(stage) * (stage_mask < 0.5)).to(masked.dtype)
    elif masked is not None:
        masked = scale_down(masked, stage.latent_height, stage.latent_width)
    arguments.update(mask=stage_mask, masked_image=masked, height=stage.height, width=stage.width)
    return prepare_mask_latents(**arguments)


def _first(images: Any) -> Any:
    return images[0] if isinstance(images, list) and images else images


def _pixel_size(image: Any) -> tuple[int, int] | None:
    """(height, width) of a PIL image, an array `(H, W[, C])` / `(B, H, W, C)`, or a tensor `(..., H, W)`."""
    if isinstance(image, PIL.Image.Image):
        return image.height, image.width
    if isinstance(image, torch.Tensor) and image.ndim >= 2:
        return tuple(image.shape[-2:])
    if isinstance(image, np.ndarray) and image.ndim >= 2:
        return tuple(image.shape[1:3]) if image.ndim == 4 else tuple(image.shape[:2])
    return None


def check_mask(pipe: Any, call: dict[str, Any]) -> None:
    """Refuse, before anything is encoded, a `mask_image` of another size than `image` (the pipeline would stretch
    it over the image) or with values outside [0, 1]. A missing mask or image is left to the stock pipeline's own
    error."""
    mask, image = _first(call.get("mask_image")), _first(call.get("image"))
    if mask is None or image is None:
        return
    if isinstance(mask, (torch.Tensor, np.ndarray)):
        low, high = float(mask.min()), float(mask.max())
        if low < 0.0 or high > 1.0:
            raise ValueError(
                f"`mask_image` has values in [{low:g}, {high:g}]; a mask's values must be in [0, 1] (1 = repaint). "
                "Scale it, e.g. `mask / 255` for an 8-bit mask."
            )
    mask_size, image_size = _pixel_size(mask), _pixel_size(image)
    # A latent image (the pipeline's VAE latents) has no pixel size to compare.
    latent_image = isinstance(image, torch.Tensor) and image.ndim == 4 and image.shape[1] != 3
    if mask_size and image_size and not latent_image and mask_size != image_size:
        raise ValueError(
            f"`mask_image` is {mask_size[1]}x{mask_size[0]} pixels but `image` is {image_size[1]}x{image_size[0]}: "
            "pass a mask of the image's size (the pipeline would stretch it over the image)."
        )
