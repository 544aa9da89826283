"""The three ways to scale a latent up x2: a learned upsampler, latent interpolation, a pixel round trip."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .adapters.base import Adapter
from .latents import encoded_latents

SCALING_SPACES = ("learned", "latent", "pixel")
_ALIASES = {"resnet": "learned"}


def resolve_scaling_space(space: str | None, upsampler: Any) -> str:
    """The canonical name of `space`; `None` means learned when an upsampler is given, else latent."""
    if space is None:
        return "learned" if upsampler is not None else "latent"
    if not isinstance(space, str) or _ALIASES.get(space, space) not in SCALING_SPACES:
        raise ValueError(
            f"Unknown `scaling_space` {space!r}. Choose one of {', '.join(map(repr, SCALING_SPACES))} "
            "('resnet' is an alias of 'learned')."
        )
    space = _ALIASES.get(space, space)
    if space == "learned" and upsampler is None:
        raise ValueError(
            "`scaling_space='learned'` needs a latent upsampler: call `lssgen.patch(pipe, upsampler)` with a "
            "`lssgen.LatentUpsampler`, or use `scaling_space='latent'` or 'pixel'."
        )
    return space


def frame_by_frame(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """`fn` on `(N, C, h, w)` images, applied to `x` as it is, or to each frame of a `(B, C, frames, h, w)` video
    (frames folded into the batch): only height and width change, the frame axis comes back untouched."""
    if x.ndim != 5:
        return fn(x)
    batch, channels, frames, height, width = x.shape
    images = fn(x.transpose(1, 2).reshape(batch * frames, channels, height, width))
    return images.reshape(batch, frames, *images.shape[1:]).transpose(1, 2)


def interpolate_latent(latents: torch.Tensor) -> torch.Tensor:
    """Bicubic x2 in latent space (computed in float32: bicubic is not implemented for every half type)."""
    return F.interpolate(latents.float(), scale_factor=2, mode="bicubic", align_corners=False).to(latents.dtype)


def upsample_learned(latents: torch.Tensor, upsampler: torch.nn.Module) -> torch.Tensor:
    param = next(upsampler.parameters())
    if param.device != latents.device:
        # The upsampler is not a pipeline component, so `pipe.to(...)` and offloading do not move it; it is
        # small enough to follow the latents.
        upsampler.to(latents.device)
    return upsampler(latents.to(param.dtype)).to(latents.dtype)


def pixel_round_trip(latents: torch.Tensor, pipe: Any, adapter: Adapter) -> torch.Tensor:
    """Decode, bicubic x2 in pixel space, encode again, all in the pipeline's normalised latent space."""
    vae = pipe.vae
    vae_param = next(vae.parameters())
    z = adapter.latents_to_vae(pipe, latents).to(vae_param.device, vae_param.dtype)
    image = vae.decode(z, return_dict=False)[0]
    # A video VAE decodes `(B, 3, frames, H, W)` (Qwen-Image's one frame, Wan's whole clip): each frame is resized
    # as an image, and the resized clip is encoded back as one video, which its temporal compression needs (a
    # frame encoded alone is not that frame's part of the clip's latent).
    image = frame_by_frame(
        lambda frames: F.interpolate(frames.float(), scale_factor=2, mode="bicubic", align_corners=False), image
    )
    z = encoded_latents(vae.encode(image.clamp(-1, 1).to(vae_param.dtype)))
    return adapter.vae_to_latents(pipe, z).to(latents.device, latents.dtype)


def scale_up(latents: torch.Tensor, space: str, *, pipe: Any, adapter: Adapter, upsampler: Any) -> torch.Tensor:
    """Scale an unpacked `(B, C, h, w)` latent to `(B, C, 2h, 2w)` in `space`; a video latent `(B, C, frames, h,
    w)` to `(B, C, frames, 2h, 2w)`, frame by frame."""
    if space == "pixel":
        return pixel_round_trip(latents, pipe, adapter)
    # The learned and the interpolating upsampler work in the adapter's scaling space (see
    # `Adapter.scale_in_vae_space`): the pipeline's latent, or the VAE's own one, converted there and back.
    x = adapter.latents_to_vae(pipe, latents) if adapter.scale_in_vae_space else latents
    if space == "learned":
        up = frame_by_frame(lambda frames: upsample_learned(frames, upsampler), x)
    else:
        up = frame_by_frame(interpolate_latent, x)
    if adapter.scale_in_vae_space:
        up = adapter.vae_to_latents(pipe, up).to(latents.device, latents.dtype)
    return up


def scale_down(latents: torch.Tensor, latent_height: int, latent_width: int) -> torch.Tensor:
    """Unpacked latents (images or videos, frame by frame) resized down to `latent_height` x `latent_width`:
    bicubic with antialiasing, in float32 (method 'bottleneck' goes down between stages)."""

    def resize(images: torch.Tensor) -> torch.Tensor:
        size = (latent_height, latent_width)
        return F.interpolate(images.float(), size=size, mode="bicubic", antialias=True)

    return frame_by_frame(resize, latents).to(latents.dtype)
