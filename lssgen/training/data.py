"""Images and VAE latents for training and evaluating latent upsamplers (DESIGN §1.9)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from lssgen.latents import LatentNormalization

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def find_images(root: str | Path) -> list[Path]:
    """Every jpg/png/webp file under `root` (recursively), in a stable order."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"--images {root}: no such folder.")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ValueError(f"--images {root}: no {'/'.join(s[1:] for s in IMAGE_SUFFIXES)} images in it or below it.")
    return paths


def load_image(path: str | Path) -> torch.Tensor:
    """An RGB image as a float tensor `(3, H, W)` in [-1, 1]."""
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"), dtype=np.float32)
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"Cannot read image {path}: {error}. Remove it or convert it to png/jpg.") from None
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def to_pil(image: torch.Tensor) -> Image.Image:
    """`(3, H, W)` in [-1, 1] → PIL image."""
    array = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def scale_to_at_least(image: torch.Tensor, size: int) -> torch.Tensor:
    """`image` `(3, H, W)`, scaled up (bicubic) so that its short side is at least `size`."""
    _, height, width = image.shape
    if min(height, width) >= size:
        return image
    factor = size / min(height, width)
    new_size = (max(size, round(height * factor)), max(size, round(width * factor)))
    return F.interpolate(image[None], size=new_size, mode="bicubic", align_corners=False)[0].clamp(-1, 1)


def random_crop(image: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """A `size` x `size` crop at a random place; smaller images are first scaled up to fit (bicubic)."""
    image = scale_to_at_least(image, size)
    _, height, width = image.shape
    top = int(torch.randint(0, height - size + 1, (1,), generator=generator))
    left = int(torch.randint(0, width - size + 1, (1,), generator=generator))
    return image[:, top : top + size, left : left + size]


def fixed_crops(
    paths: Sequence[Path], size: int, per_image: int, *, own_size_multiple: int | None = None
) -> Iterator[tuple[str, int, torch.Tensor]]:
    """`(name, index, crop)`: each image's centre crop (index 0), then `per_image - 1` seeded random ones.

    The same crops on every call (one generator seeded 0 for all images), so reports and validations compare.
    An image smaller than `size` is scaled up to fit, unless `own_size_multiple` is given: then its crops are as
    large as it is (its short side rounded down to that multiple), never scaled, since scaling up would hand the
    x2 methods a smooth image that is easier to upsample than real ones.
    """
    generator = torch.Generator().manual_seed(0)
    for path in paths:
        image = load_image(path)
        side = size if own_size_multiple is None else own_size(path, image, size, own_size_multiple)
        yield str(path), 0, center_crop(image, side)
        for index in range(1, per_image):
            yield f"{path} (crop {index})", index, random_crop(image, side, generator)


def own_size(path: str | Path, image: torch.Tensor, size: int, multiple: int) -> int:
    """`size`, or the image's short side rounded down to a multiple of `multiple` when that is smaller."""
    short = min(image.shape[-2:])
    if short < multiple:
        raise ValueError(
            f"Image {path} is {image.shape[-1]}x{image.shape[-2]} px, smaller than the {multiple} px this VAE needs "
            "(2 x its spatial factor, so that the x2 downsample still encodes to whole latent cells). Remove it."
        )
    return min(size, short // multiple * multiple)


def center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """The central `size` x `size` crop (scaled up first when the image is smaller)."""
    _, height, width = image.shape
    if min(height, width) < size:
        return random_crop(image, size, torch.Generator().manual_seed(0))
    top, left = (height - size) // 2, (width - size) // 2
    return image[:, top : top + size, left : left + size]


def downsample_nearest(images: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """The x`factor` nearest-neighbour downsample the method trains on (DESIGN §1.9)."""
    return F.interpolate(images, scale_factor=1 / factor, mode="nearest")


def check_vae(vae: str, subfolder: str | None = None) -> None:
    """Fail early on a local `--vae` folder (with `--subfolder`) that cannot hold a VAE, before `load_vae` loads it:
    only names, `config.json` and safetensors headers are read. Here rather than in `lssgen.loading`, because a
    VAE folder may be a tiny autoencoder's (`lssgen.autoencoders`), which the runtime core does not import."""
    from lssgen.autoencoders.taesd import is_tiny_autoencoder_folder
    from lssgen.loading import _check_weights, _hub_id, _json_object, _local_folder

    if not Path(vae).expanduser().exists() and _hub_id(vae):
        return  # the hub's to check
    folder = _local_folder(Path(vae, subfolder or ""), "--vae")
    if folder is None or is_tiny_autoencoder_folder(folder):
        return
    hint = "a diffusers VAE folder" + ("" if subfolder else " (for a whole pipeline folder, add --subfolder vae)")
    _json_object(folder / "config.json", "--vae", folder, hint)
    _check_weights(sorted(folder.glob("*.safetensors")), "--vae")


def load_vae(path_or_id: str, subfolder: str | None = None, dtype: torch.dtype = torch.float32, device="cpu"):
    """A VAE in eval mode: a diffusers VAE (`AutoencoderKL`, `AutoencoderTiny`, `AutoencoderKLWan`, ...: the class
    its `config.json` names) from a folder or hub id, or a tiny autoencoder in the original `.pth` layout (a folder
    with one `*encoder.pth` and one `*decoder.pth`, such as taef2's)."""
    from diffusers import AutoModel

    from lssgen.autoencoders.taesd import TinyAutoencoder, is_tiny_autoencoder_folder

    folder = Path(path_or_id, subfolder or "")
    if is_tiny_autoencoder_folder(folder):
        return TinyAutoencoder.from_folder(folder).to(device, dtype)
    try:
        vae = AutoModel.from_pretrained(path_or_id, subfolder=subfolder, dtype=dtype)
    except (OSError, ValueError) as error:
        hint = "" if subfolder else " For a whole pipeline folder, add --subfolder vae."
        raise ValueError(f"Cannot load a VAE from {path_or_id!r}: {error}.{hint}") from None
    if not hasattr(vae, "encode") or not hasattr(vae, "decode"):
        raise ValueError(f"{path_or_id!r} holds a {type(vae).__name__}, not a VAE with encode/decode.")
    return vae.to(device).eval().requires_grad_(False)


# Config keys that only video VAEs have: `scale_factor_temporal` and `temperal_downsample` (diffusers' spelling) in
# `AutoencoderKLWan`'s, `temperal_downsample` in `AutoencoderKLQwenImage`'s, `temporal_compression_ratio` in
# HunyuanVideo's, LTX's, ... Such a VAE takes `(B, C, frames, H, W)`. Wan's and Qwen-Image's encoders are causal
# in time: one frame encodes to one latent frame, which decodes to one frame (`encode`/`decode` check that).
VIDEO_VAE_CONFIG_KEYS = ("scale_factor_temporal", "temperal_downsample", "temporal_compression_ratio")


def is_video_vae(vae: Any) -> bool:
    """Whether `vae` takes videos `(B, C, frames, H, W)`: lssgen then passes each image as a one-frame video."""
    config = vae.config
    return any(getattr(config, key, None) is not None for key in VIDEO_VAE_CONFIG_KEYS)


def vae_latent_channels(vae: Any) -> int:
    """Channels of the VAE's latent: `latent_channels` (image VAEs) or `z_dim` (Wan's and Qwen-Image's)."""
    config = vae.config
    channels = getattr(config, "latent_channels", None) or getattr(config, "z_dim", None)
    if not isinstance(channels, int):
        raise ValueError(
            f"{type(vae).__name__}: its config has neither `latent_channels` nor `z_dim`, so the number of latent "
            "channels is unknown. Pass a diffusers VAE (AutoencoderKL, AutoencoderKLWan, ...) or a tiny autoencoder."
        )
    return channels


def vae_spatial_factor(vae: Any) -> int:
    """How many pixels one latent cell covers per side: `scale_factor_spatial` where the config has it (Wan: 8,
    or 16 for Wan 2.2's TI2V-5B VAE, which patchifies 2x2 first; what WanPipeline reads), else 2 per down block
    (8 for the VAEs of SD, SDXL, SD3, Flux and the tiny ones)."""
    config = vae.config
    factor = getattr(config, "scale_factor_spatial", None)
    if factor:
        return int(factor)
    blocks = getattr(config, "block_out_channels", None) or getattr(config, "encoder_block_out_channels", None)
    return 2 ** (len(blocks) - 1) if blocks else 8


def _frameless(vae: Any, tensor: torch.Tensor, what: str) -> torch.Tensor:
    """`(B, C, H, W)` as given, or a video VAE's one-frame `(B, C, 1, H, W)` without its frame axis."""
    video = is_video_vae(vae)
    if tensor.ndim == 4:
        return tensor
    if tensor.ndim == 5 and video:
        if tensor.shape[2] == 1:
            return tensor[:, :, 0]
        raise ValueError(
            f"{what} of shape {tuple(tensor.shape)} hold {tensor.shape[2]} frames; lssgen's upsamplers work on "
            f"images, so {type(vae).__name__} (a video VAE) takes one frame at a time: pass (B, C, H, W) or "
            "(B, C, 1, H, W)."
        )
    shapes = "(B, C, H, W) or, for this video VAE, (B, C, 1, H, W)" if video else "(B, C, H, W)"
    raise ValueError(f"{what} of shape {tuple(tensor.shape)} for {type(vae).__name__}: expected {shapes}.")


def _vae_input(vae: Any, tensor: torch.Tensor) -> torch.Tensor:
    """`(B, C, H, W)` as the VAE takes it: as it is, or as a one-frame video `(B, C, 1, H, W)` for a video VAE."""
    return tensor[:, :, None] if is_video_vae(vae) else tensor


def _vae_result(vae: Any, tensor: torch.Tensor, what: str) -> torch.Tensor:
    """A video VAE's result for one frame, `(B, C, 1, h, w)`, → `(B, C, h, w)`; an image VAE's as it is."""
    if not is_video_vae(vae):
        return tensor
    if tensor.ndim != 5 or tensor.shape[2] != 1:
        raise ValueError(
            f"{type(vae).__name__} gave {what} of shape {tuple(tensor.shape)} for a one-frame video; expected "
            "(B, C, 1, h, w): lssgen needs a video VAE that maps one frame to one (causal first frame)."
        )
    return tensor[:, :, 0]


@torch.no_grad()
def encode(vae: Any, images: torch.Tensor, normalization: LatentNormalization) -> torch.Tensor:
    """Images `(B, 3, H, W)` in [-1, 1] → latents `(B, C, h, w)` in the upsampler's space, the VAE's scaled as
    its config says (float32). A video VAE encodes each image as a one-frame video."""
    param = next(vae.parameters())
    images = _frameless(vae, images, "images").to(param.device, param.dtype)
    encoded = vae.encode(_vae_input(vae, images))
    latents = encoded.latent_dist.mode() if hasattr(encoded, "latent_dist") else encoded.latents
    return normalization.from_vae(_vae_result(vae, latents, "latents"))


@torch.no_grad()
def pixel_round_trip(vae: Any, latents: torch.Tensor, normalization: LatentNormalization) -> torch.Tensor:
    """The x2 baseline of the pixel round trip: decode, bicubic x2 in pixels, encode again."""
    image = F.interpolate(decode(vae, latents, normalization), scale_factor=2, mode="bicubic", align_corners=False)
    return encode(vae, image.clamp(-1, 1), normalization)


def decode(vae: Any, latents: torch.Tensor, normalization: LatentNormalization) -> torch.Tensor:
    """Latents `(B, C, h, w)` in the upsampler's space → images `(B, 3, H, W)` in [-1, 1] (float32); a video VAE
    decodes them as one-frame videos. Differentiable, for a pixel loss."""
    param = next(vae.parameters())
    vae_latents = normalization.to_vae(_frameless(vae, latents, "latents")).to(param.device, param.dtype)
    images = vae.decode(_vae_input(vae, vae_latents), return_dict=False)[0]
    return _vae_result(vae, images, "images").float().clamp(-1, 1)
