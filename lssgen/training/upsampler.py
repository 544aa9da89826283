"""Training a `LatentUpsampler` for a VAE on a folder of images (DESIGN §1.9)."""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torchmetrics.functional.image import peak_signal_noise_ratio
from tqdm.auto import tqdm

from lssgen.latents import LatentNormalization
from lssgen.outputs import check_writable, save_pretrained_here
from lssgen.upsampler import LatentUpsampler

from .data import (
    decode,
    downsample_nearest,
    encode,
    fixed_crops,
    is_video_vae,
    load_image,
    pixel_round_trip,
    random_crop,
    scale_to_at_least,
    vae_latent_channels,
    vae_spatial_factor,
)

CHECKPOINT = "checkpoint"
CACHE = "cache"
# A fixed share of the images is held out, so the reported margin over bicubic is measured on unseen images.
VAL_EVERY_NTH_IMAGE = 10
VAL_CROPS_PER_IMAGE = 4


@dataclass
class TrainResult:
    r"""
    What [`train_upsampler`] did.

    Args:
        out_dir (`Path`): folder holding the trained upsampler, its model card and the last checkpoint.
        steps (`int`): optimizer steps taken in total (including those of a resumed run).
        train_images (`int`), val_images (`int`): sizes of the two splits.
        val_mse (`float`): latent MSE of the trained upsampler on the held-out pairs.
        bicubic_mse (`float`): latent MSE of x2 bicubic latent interpolation on the same pairs.
        val_psnr (`float`), pixel_round_trip_psnr (`float`): dB of the decoded result against the held-out crops,
            for the upsampler and for the pixel round trip (decode, bicubic x2, encode).
        first_loss (`float`), last_loss (`float`): mean training loss of the first and last few steps of this run.
        seconds (`float`): wall time of this run.
    """

    out_dir: Path
    steps: int
    train_images: int
    val_images: int
    val_mse: float
    bicubic_mse: float
    val_psnr: float
    pixel_round_trip_psnr: float
    first_loss: float
    last_loss: float
    seconds: float


def default_upsampler_config(latent_channels: int) -> dict[str, Any]:
    """The published widths: [128, 64] for 16+ channel VAEs, [64, 32] for 4-channel ones (DESIGN §1.8)."""
    widths = [128, 64] if latent_channels >= 16 else [64, 32]
    return {"in_channels": latent_channels, "out_channels": latent_channels, "block_out_channels": widths}


def split_images(paths: Sequence[Path]) -> tuple[list[Path], list[Path]]:
    """Every 10th image (at least one) is held out for validation; the rest are trained on."""
    if len(paths) < 2:
        raise ValueError(
            f"--images: found {len(paths)} image; training needs at least 2 (one is held out for validation)."
        )
    val = [p for i, p in enumerate(paths) if i % VAL_EVERY_NTH_IMAGE == VAL_EVERY_NTH_IMAGE - 1] or [paths[-1]]
    held_out = set(val)
    return [p for p in paths if p not in held_out], val


def _check_readable(paths: Sequence[Path]) -> None:
    # Fail before any training (and before an output folder exists) rather than hours in.
    for path in paths:
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception as error:  # PIL raises many types for broken files
            message = f"--images: cannot read image {path}: {error}. Remove it or re-save it as png/jpg."
            raise ValueError(message) from None


def _lr_at(step: int, steps: int, lr: float) -> float:
    # Cosine decay to a tenth, a function of the step alone so that --resume continues the same curve.
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(step / steps, 1.0))))


def augmented(image: torch.Tensor, scale: float, flip: bool) -> torch.Tensor:
    """`image` `(3, H, W)` reduced to `scale` of its size (antialiased) and, if `flip`, mirrored left to right."""
    if scale != 1.0:
        size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[2] * scale)))
        image = F.interpolate(image[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
    return image.flip(-1) if flip else image


class _PairSource:
    """Random (low, high, target image) training pairs: crops encoded on the fly, or, with a cache, aligned crops
    cut from latents of whole images encoded once.

    Each image comes in `len(scales) x (2 if hflip else 1)` variants (smaller copies and mirrored ones), so a few
    photos show the upsampler more scales of detail than they hold at one size.

    A crop cut from a whole image's latent is not the crop's own latent: the encoder saw more of the image (as it
    does in generation), and VAEs with GroupNorm (taef2, the KL VAEs) normalise over the whole image. Cutting them
    costs nothing, so every step sees new crops instead of a few fixed ones.
    """

    def __init__(self, vae, norm, paths, resolution, generator, device, factor, *, cache_file=None, pixels=False,
                 latents=True, scales=(1.0,), hflip=False, progress=True):  # fmt: skip
        self.vae, self.norm, self.paths, self.resolution = vae, norm, list(paths), resolution
        self.generator, self.device, self.pixels, self.factor = generator, device, pixels, factor
        self.latents = latents  # on the fly, encoding the targets is skipped when only the pixel loss needs them
        self.variants = [(scale, flip) for scale in scales for flip in ((False, True) if hflip else (False,))]
        self.cache, self.progress = None, progress
        if cache_file is not None:
            if not cache_file.exists():
                cache_file.parent.mkdir(parents=True, exist_ok=True)
                save_file(self._encode_whole_images(), str(cache_file))
            self.cache = load_file(str(cache_file))

    def _encode_whole_images(self) -> dict[str, torch.Tensor]:
        cache = {}
        wholes = [(path, variant) for path in self.paths for variant in self.variants]
        bar = tqdm(wholes, desc="encoding whole images", leave=False, disable=not self.progress)
        for index, (path, variant) in enumerate(bar):
            image = scale_to_at_least(augmented(load_image(path), *variant), self.resolution)
            # Even sides in latent cells, so the half-size image's latent lines up with the full one's.
            cell = 2 * self.factor
            image = image[:, : image.shape[1] // cell * cell, : image.shape[2] // cell * cell][None].to(self.device)
            cache[f"high.{index}"] = encode(self.vae, image, self.norm)[0].cpu()
            cache[f"low.{index}"] = encode(self.vae, downsample_nearest(image), self.norm)[0].cpu()
            if self.pixels:
                cache[f"image.{index}"] = image[0].cpu()
        return {key: value.contiguous() for key, value in cache.items()}  # safetensors stores whole tensors only

    def _cached_crop(self, index: int) -> dict[str, torch.Tensor]:
        high, low = self.cache[f"high.{index}"], self.cache[f"low.{index}"]
        size = self.resolution // self.factor  # latent cells of a crop
        top = 2 * int(torch.randint(0, (high.shape[1] - size) // 2 + 1, (1,), generator=self.generator))
        left = 2 * int(torch.randint(0, (high.shape[2] - size) // 2 + 1, (1,), generator=self.generator))
        pair = {
            "high": high[:, top : top + size, left : left + size],
            "low": low[:, top // 2 : (top + size) // 2, left // 2 : (left + size) // 2],
        }
        if self.pixels:
            y, x, r = top * self.factor, left * self.factor, self.resolution
            pair["images"] = self.cache[f"image.{index}"][:, y : y + r, x : x + r]
        return pair

    def _random_variant(self) -> tuple[float, bool]:
        if len(self.variants) == 1:
            return self.variants[0]
        return self.variants[int(torch.randint(0, len(self.variants), (1,), generator=self.generator))]

    def _crops(self, indices) -> dict[str, torch.Tensor]:
        images = [augmented(load_image(self.paths[i]), *self._random_variant()) for i in indices]
        images = torch.stack([random_crop(image, self.resolution, self.generator) for image in images]).to(self.device)
        pair = {"low": encode(self.vae, downsample_nearest(images), self.norm)}
        if self.latents:
            pair["high"] = encode(self.vae, images, self.norm)
        if self.pixels:
            pair["images"] = images
        return {key: value.cpu() for key, value in pair.items()}

    def batch(self, batch_size: int) -> dict[str, torch.Tensor]:
        if self.cache is not None:
            indices = torch.randint(0, len(self.paths) * len(self.variants), (batch_size,), generator=self.generator)
            crops = [self._cached_crop(i) for i in indices.tolist()]
            picked = {key: torch.stack([c[key] for c in crops]) for key in crops[0]}
        else:
            picked = self._crops(torch.randint(0, len(self.paths), (batch_size,), generator=self.generator).tolist())
        return {key: value.to(self.device) for key, value in picked.items()}


def _validation_pairs(vae, norm, paths, resolution, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    images = torch.stack([crop for _, _, crop in fixed_crops(paths, resolution, VAL_CROPS_PER_IMAGE)]).to(device)
    return encode(vae, downsample_nearest(images), norm), encode(vae, images, norm), images


@torch.no_grad()
def _decoded_psnr(vae, norm, latents: torch.Tensor, images: torch.Tensor) -> float:
    """Mean PSNR (dB) of the decoded `latents` against `images` (both in [-1, 1])."""
    # torchmetrics directly, as `lssgen.evaluation.metrics.psnr` does: evaluation sits above training.
    decoded = (decode(vae, latents, norm) + 1) / 2
    per_image = peak_signal_noise_ratio(decoded, (images + 1) / 2, data_range=1.0, reduction="none", dim=(1, 2, 3))
    return float(per_image.mean())


def _save_checkpoint(folder: Path, upsampler, optimizer, step: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_pretrained_here(upsampler, folder)
    torch.save({"optimizer": optimizer.state_dict(), "step": step}, folder / "optimizer.pt")


def _model_card(path: Path, facts: dict[str, Any]) -> None:
    rows = "\n".join(f"| {name} | {value} |" for name, value in facts.items())
    path.write_text(
        "# LatentUpsampler\n\n"
        "A x2 latent upsampler for lssgen, trained with `lssgen train-upsampler`. Load it with\n"
        "`lssgen.LatentUpsampler.from_pretrained(this_folder)` and pass it to `lssgen.patch(pipe, upsampler)`\n"
        "for a pipeline that uses the VAE below.\n\n"
        f"| | |\n|---|---|\n{rows}\n\n"
        "Validation MSE is measured on held-out images between latents scaled as the VAE config says "
        "(`scaling_factor`, `shift_factor` or `latents_mean`/`latents_std`; none for a tiny autoencoder): "
        "learned upsampler vs x2 bicubic interpolation of the same low-resolution latents.\n"
    )


def train_upsampler(
    vae: Any,
    image_paths: Sequence[str | Path],
    out_dir: str | Path,
    *,
    resolution: int = 256,
    steps: int = 2000,
    batch_size: int = 8,
    lr: float = 1e-3,
    seed: int = 0,
    config: dict[str, Any] | None = None,
    pixel_loss: str = "none",
    pixel_loss_weight: float = 0.1,
    latent_loss_weight: float = 1.0,
    init_from: str | Path | None = None,
    val_every: int = 250,
    save_every: int = 500,
    resume: bool = False,
    cache_latents: bool = False,
    scales: Sequence[float] = (1.0,),
    hflip: bool = False,
    vae_name: str | None = None,
    images_name: str | None = None,
    progress: bool = True,
    log=print,
) -> TrainResult:
    r"""
    Train a [`LatentUpsampler`] for `vae` on random crops of `image_paths` and save it to `out_dir`.

    Each pair is a `resolution` crop (target) and its x2 nearest downsample (input), both encoded by `vae` and
    scaled as the VAE config says; the loss is the latent MSE, plus an optional loss on the decoded image.
    Every 10th image is held out; the final validation MSE is reported next to bicubic latent interpolation's.
    A new `out_dir` is written in a temporary sibling folder and renamed at the end, so a failed run leaves nothing.

    Args:
        vae (`AutoencoderKL`, `AutoencoderTiny`, `AutoencoderKLWan`, ...): the VAE of the pipelines the upsampler
            is for (frozen). A video VAE (Wan's) encodes each image as a one-frame video.
        image_paths (`list[Path]`): training and validation images (see `lssgen.training.data.find_images`).
        out_dir (`str` or `Path`): where the upsampler (`config.json` + safetensors), `README.md` and
            `checkpoint/` go. Must not hold files unless `resume=True`.
        resolution (`int`, defaults to `256`): crop size of the target, a multiple of 2 x the VAE's spatial factor.
        steps (`int`, defaults to `2000`): total optimizer steps (a resumed run continues up to this number).
        batch_size (`int`, defaults to `8`), lr (`float`, defaults to `1e-3`): AdamW with cosine decay to lr / 10.
        seed (`int`, defaults to `0`): seeds the weights and the crops.
        config (`dict`, *optional*): `LatentUpsampler` config keys; defaults to [`default_upsampler_config`].
        pixel_loss (`str`, defaults to `"none"`): `"l1"` or `"mse"` adds `pixel_loss_weight` x that distance
            between `decode(up(z_low))` and the target crop. The latent MSE is the average over latents, which do
            not decode to its average image; the MSE on pixels is what PSNR measures.
        latent_loss_weight (`float`, defaults to `1.0`): weight of the latent MSE; `0` trains on pixels alone.
        init_from (`str` or `Path`, *optional*): a `LatentUpsampler` folder to start from (fine-tuning); its
            config is used, so `config` must not be given.
        val_every (`int`, defaults to `250`), save_every (`int`, defaults to `500`): intervals in steps (0: never).
        resume (`bool`, defaults to `False`): continue from `out_dir/checkpoint`.
        cache_latents (`bool`, defaults to `False`): encode each training image once, whole, at full and half
            size, keep the latents in `out_dir/cache` and cut aligned random crops from them (much cheaper steps).
        scales (`list[float]`, defaults to `(1.0,)`): also train on each image reduced to these fractions of its
            size (antialiased), e.g. `(1.0, 0.75, 0.5)`: more scales of detail from few photos.
        hflip (`bool`, defaults to `False`): also train on each image mirrored left to right.
        vae_name (`str`, *optional*), images_name (`str`, *optional*): recorded in the model card.

    Example:

    ```py
    >>> from lssgen.training.data import find_images, load_vae
    >>> vae = load_vae("black-forest-labs/FLUX.1-dev", subfolder="vae")
    >>> result = train_upsampler(vae, find_images("photos/"), "flux-x2", resolution=256, steps=2000)
    >>> result.val_mse, result.bicubic_mse
    ```
    """
    start_time = time.perf_counter()
    paths = [Path(p) for p in image_paths]
    out_dir = Path(out_dir)
    factor = vae_spatial_factor(vae)
    if resolution <= 0 or resolution % (2 * factor):
        nearest = max(2 * factor, resolution // (2 * factor) * 2 * factor)
        raise ValueError(
            f"--resolution {resolution}: must be a multiple of {2 * factor} (2 x the VAE's spatial factor {factor}), "
            f"so that the half-size input encodes to a whole latent. Try {nearest}."
        )
    if pixel_loss not in ("none", "l1", "mse"):
        raise ValueError(f"--pixel-loss {pixel_loss!r}: choose 'none', 'l1' or 'mse'.")
    if latent_loss_weight < 0 or pixel_loss_weight < 0:
        raise ValueError("--latent-loss-weight and --pixel-loss-weight must not be negative.")
    if latent_loss_weight == 0 and pixel_loss == "none":
        raise ValueError("--latent-loss-weight 0 leaves no loss: add --pixel-loss mse (or l1), or keep the latent MSE.")
    if init_from is not None and (resume or config):
        other = "--resume continues its own checkpoint" if resume else "--config would replace its architecture"
        raise ValueError(f"--init-from: {other}; drop one of the two.")
    scales = tuple(float(scale) for scale in scales)
    if not scales or any(not 0 < scale <= 1 for scale in scales) or len(set(scales)) != len(scales):
        raise ValueError(
            f"--scales {' '.join(f'{scale:g}' for scale in scales) or '(none)'}: give distinct fractions of the "
            "image size in (0, 1], e.g. --scales 1 0.75 0.5."
        )
    if steps < 1 or batch_size < 1:
        raise ValueError(f"--steps and --batch-size must be positive, got {steps} and {batch_size}.")
    channels = vae_latent_channels(vae)
    checkpoint = out_dir / CHECKPOINT
    if resume:
        if not (checkpoint / "optimizer.pt").is_file():
            raise ValueError(f"--resume: no checkpoint in {checkpoint}. Drop --resume to start a new run.")
        config = dict(LatentUpsampler.load_config(checkpoint))
    elif init_from is not None:
        try:
            config = dict(LatentUpsampler.load_config(init_from))
        except (OSError, ValueError) as error:
            raise ValueError(f"--init-from {init_from}: {error}") from None
    else:
        config = {**default_upsampler_config(channels), **(config or {})}
    if config.get("in_channels") != channels or config.get("out_channels", channels) != channels:
        raise ValueError(
            f"--config: in_channels={config.get('in_channels')}, out_channels={config.get('out_channels')}, but the "
            f"VAE has {channels} latent channels. Set both to {channels} (or leave them out to follow the VAE)."
        )
    try:
        if resume or init_from is not None:
            upsampler = LatentUpsampler.from_pretrained(checkpoint if resume else init_from)
        else:
            upsampler = LatentUpsampler.from_config(config)
    except TypeError as error:
        raise ValueError(f"--config: {error}. Use LatentUpsampler's config keys.") from None
    except OSError as error:  # a config without its weights file
        raise ValueError(f"{'--resume' if resume else '--init-from'}: {error}") from None
    if upsampler.scale_factor != 2:
        raise ValueError(f"--config: the upsampler scales by {upsampler.scale_factor}; train-upsampler needs x2.")
    if not resume and out_dir.is_dir() and any(out_dir.iterdir()):
        raise ValueError(f"--out {out_dir}: folder exists and is not empty. Pass --resume or choose a new folder.")
    ancestor = check_writable(out_dir, "--out")
    _check_readable(paths)
    train_paths, val_paths = split_images(paths)

    # A new run works in a sibling folder renamed at the end; a resumed one updates its folder in place.
    work = out_dir if resume else Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=ancestor))
    try:
        settings = _Settings(
            resolution=resolution,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            pixel_loss=pixel_loss,
            pixel_loss_weight=pixel_loss_weight,
            latent_loss_weight=latent_loss_weight,
            val_every=val_every,
            save_every=save_every,
            resume=resume,
            cache_latents=cache_latents,
            scales=scales,
            hflip=hflip,
            progress=progress,
            log=log,
        )
        result = _train(vae, upsampler, work, train_paths, val_paths, settings)
    except BaseException:
        if not resume:
            shutil.rmtree(work, ignore_errors=True)
        raise
    facts = {
        "VAE": f"{vae_name or type(vae).__name__} ({type(vae).__name__}, {channels} latent channels, x{factor}"
        + (", a video VAE: each image encoded as a one-frame video)" if is_video_vae(vae) else ")"),
        "data": f"{images_name or 'images'}: {len(paths)} images, {len(train_paths)} train / {len(val_paths)} val",
        "resolution": f"{resolution} px crops, x2 nearest downsample as input",
        "steps": result["step"],
        "batch size": batch_size,
        "learning rate": f"{lr:g} (AdamW, cosine to {lr / 10:g})",
        "started from": str(init_from) if init_from is not None else "random weights (seeded)",
        "loss": _loss_description(latent_loss_weight, pixel_loss, pixel_loss_weight),
        "augmentation": f"sizes x{', x'.join(f'{scale:g}' for scale in scales)}{', mirrored' if hflip else ''}",
        "latent cache": "whole images encoded once, random aligned crops" if cache_latents else "off",
        "seed": seed,
        "device": str(next(upsampler.parameters()).device),
        "time": f"{time.perf_counter() - start_time:.1f} s",
        "validation MSE, learned": f"{result['val_mse']:.5f}",
        "validation MSE, bicubic": f"{result['bicubic_mse']:.5f}",
        "validation PSNR, learned": f"{result['val_psnr']:.2f} dB",
        "validation PSNR, pixel round trip": f"{result['pixel_round_trip_psnr']:.2f} dB",
        "upsampler config": json.dumps({k: v for k, v in upsampler.config.items() if not k.startswith("_")}),
    }
    try:
        save_pretrained_here(upsampler.to("cpu"), work)
        _model_card(work / "README.md", facts)
        if not resume:
            if out_dir.is_dir():
                out_dir.rmdir()  # empty, checked above
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            work.rename(out_dir)
    except BaseException:
        if not resume:
            shutil.rmtree(work, ignore_errors=True)
        raise
    return TrainResult(
        out_dir=out_dir,
        steps=result["step"],
        train_images=len(train_paths),
        val_images=len(val_paths),
        val_mse=result["val_mse"],
        bicubic_mse=result["bicubic_mse"],
        val_psnr=result["val_psnr"],
        pixel_round_trip_psnr=result["pixel_round_trip_psnr"],
        first_loss=result["first_loss"],
        last_loss=result["last_loss"],
        seconds=time.perf_counter() - start_time,
    )


def _loss_description(latent_weight: float, pixel_loss: str, pixel_weight: float) -> str:
    terms = [f"{latent_weight:g} x latent MSE"] if latent_weight else []
    if pixel_loss != "none":
        terms.append(f"{pixel_weight:g} x pixel {pixel_loss.upper()}")
    return " + ".join(terms)


@dataclass(frozen=True)
class _Settings:
    """The knobs of one training run, as `train_upsampler` received them."""

    resolution: int
    steps: int
    batch_size: int
    lr: float
    seed: int
    pixel_loss: str
    pixel_loss_weight: float
    latent_loss_weight: float
    val_every: int
    save_every: int
    resume: bool
    cache_latents: bool
    scales: tuple[float, ...]
    hflip: bool
    progress: bool
    log: Callable[[str], Any]


def _train(vae, upsampler, work, train_paths, val_paths, settings: _Settings) -> dict[str, Any]:
    device = next(vae.parameters()).device
    norm = LatentNormalization.from_vae_config(vae.config)
    torch.manual_seed(settings.seed)
    upsampler = upsampler.to(device).train()  # float32: built that way, saved that way
    optimizer = torch.optim.AdamW(upsampler.parameters(), lr=settings.lr)
    start = 0
    if settings.resume:
        state = torch.load(work / CHECKPOINT / "optimizer.pt", map_location=device, weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
        if start >= settings.steps:
            raise ValueError(f"--resume: the checkpoint is at step {start} already; pass --steps above {start}.")
        settings.log(f"resuming from step {start}")

    # Resumed runs draw different crops from the first run's, rather than replaying them.
    generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + start)
    pixels = settings.pixel_loss != "none"
    variants = f"x{'-'.join(f'{scale:g}' for scale in settings.scales)}{'-hflip' if settings.hflip else ''}"
    name = f"train-{len(train_paths)}img-{settings.resolution}px-{variants}{'-pixels' if pixels else ''}"
    cache_file = work / CACHE / f"{name}.safetensors"
    source = _PairSource(
        vae,
        norm,
        train_paths,
        settings.resolution,
        generator,
        device,
        vae_spatial_factor(vae),
        cache_file=cache_file if settings.cache_latents else None,
        pixels=pixels,
        latents=settings.latent_loss_weight > 0,
        scales=settings.scales,
        hflip=settings.hflip,
        progress=settings.progress,
    )
    if pixels and settings.cache_latents:
        settings.log(
            "warning: --pixel-loss with --cache-latents decodes crops cut from whole-image latents. VAEs that "
            "normalise over the whole image (GroupNorm: taef2, the KL VAEs) decode such crops worse than the crop's "
            "own latent, and the pixel loss then fits those artefacts. Drop --cache-latents to encode each crop."
        )
    val_low, val_high, val_images = _validation_pairs(vae, norm, val_paths, settings.resolution, device)
    # The baselines do not change during training: measured once.
    bicubic = F.interpolate(val_low, scale_factor=2, mode="bicubic", align_corners=False)
    baselines = {
        "bicubic_mse": F.mse_loss(bicubic, val_high).item(),
        "pixel_round_trip_psnr": _decoded_psnr(vae, norm, pixel_round_trip(vae, val_low, norm), val_images),
    }

    def validate(step: int, write=settings.log) -> dict[str, float]:
        upsampler.eval()
        with torch.no_grad():
            predicted = upsampler(val_low)
        upsampler.train()
        figures = {
            "val_mse": F.mse_loss(predicted, val_high).item(),
            "val_psnr": _decoded_psnr(vae, norm, predicted, val_images),
            **baselines,
        }
        write(
            f"validation at step {step}: latent MSE {figures['val_mse']:.5f} (bicubic {figures['bicubic_mse']:.5f}), "
            f"PSNR {figures['val_psnr']:.2f} dB (pixel round trip {figures['pixel_round_trip_psnr']:.2f} dB)"
        )
        return figures

    validate(start)

    losses = []
    bar = tqdm(
        range(start, settings.steps),
        initial=start,
        total=settings.steps,
        desc="train-upsampler",
        disable=not settings.progress,
    )
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, settings.steps, settings.lr)
        pair = source.batch(settings.batch_size)
        predicted = upsampler(pair["low"])
        loss = settings.latent_loss_weight * F.mse_loss(predicted, pair["high"]) if "high" in pair else 0.0
        if pixels:
            distance = F.l1_loss if settings.pixel_loss == "l1" else F.mse_loss
            loss = loss + settings.pixel_loss_weight * distance(decode(vae, predicted, norm), pair["images"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        done = step + 1
        if settings.val_every and done % settings.val_every == 0 and done < settings.steps:
            validate(done, write=tqdm.write)
        if settings.save_every and done % settings.save_every == 0:
            _save_checkpoint(work / CHECKPOINT, upsampler, optimizer, done)
    bar.close()
    _save_checkpoint(work / CHECKPOINT, upsampler, optimizer, settings.steps)
    window = max(1, min(20, len(losses) // 4))
    return {
        "step": settings.steps,
        **validate(settings.steps),
        "first_loss": sum(losses[:window]) / window,
        "last_loss": sum(losses[-window:]) / window,
    }
