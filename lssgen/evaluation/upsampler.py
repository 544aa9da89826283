"""Held-out evaluation of a latent upsampler against the bicubic and pixel-round-trip baselines (DESIGN §1.9)."""

from __future__ import annotations

import json
import logging
import math
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from lssgen.latents import LatentNormalization
from lssgen.scaling import interpolate_latent, upsample_learned
from lssgen.training.data import (
    decode,
    downsample_nearest,
    encode,
    find_images,
    fixed_crops,
    pixel_round_trip,
    to_pil,
    vae_latent_channels,
    vae_spatial_factor,
)

from .metrics import MS_SSIM_WEIGHTS, ms_ssim, ms_ssim_scales, psnr, ssim

LEARNED, BICUBIC, PIXEL, CEILING = "learned", "bicubic_latent", "pixel_round_trip", "vae_round_trip"
METHOD_LABELS = {
    LEARNED: "learned upsampler",
    BICUBIC: "bicubic (latent)",
    PIXEL: "pixel round trip",
    CEILING: "VAE round trip (ceiling)",
}
IMAGE_METRICS = {"psnr": psnr, "ssim": ssim, "ms_ssim": ms_ssim}
# Pixel height of the label band above each grid column.
LABEL_HEIGHT = 14

logger = logging.getLogger(__name__)


@dataclass
class EvalReport:
    r"""
    What [`evaluate_upsampler`] measured.

    Args:
        settings (`dict`): resolution, dtype, device, repeats and the metric conventions.
        vae (`str`): the VAE's class and where it came from.
        upsampler (`str` or `None`): the upsampler's folder or class, `None` when only baselines ran.
        methods (`list[str]`): the x2 methods evaluated, then `"vae_round_trip"` (the ceiling).
        images (`list[str]`): the evaluated image paths.
        crop_sizes (`list[int]`): the side of each evaluated crop, px: `resolution`, or less for smaller images.
        per_image (`list[dict]`): for each image, `{method: {metric: value}}`.
        mean (`dict`): `{method: {metric: mean over images}}`; `None` where a metric does not apply.
        latency_ms (`dict`): median milliseconds per call of each x2 method on one latent.
        grid (`PIL.Image.Image` or `None`): the comparison grid (not serialised into `report.json`).
    """

    settings: dict[str, Any]
    vae: str
    upsampler: str | None
    methods: list[str]
    images: list[str]
    crop_sizes: list[int]
    per_image: list[dict[str, dict[str, float | None]]]
    mean: dict[str, dict[str, float | None]]
    latency_ms: dict[str, float]
    grid: Image.Image | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "vae": self.vae,
            "upsampler": self.upsampler,
            "image_count": len(self.images),
            "methods": self.methods,
            "mean": self.mean,
            "latency_ms": self.latency_ms,
            "images": self.images,
            "crop_sizes": self.crop_sizes,
            "per_image": self.per_image,
        }


def _method_functions(vae: Any, norm: LatentNormalization, upsampler: Any) -> dict[str, Callable]:
    methods = {LEARNED: lambda z: upsample_learned(z, upsampler)} if upsampler is not None else {}
    methods[BICUBIC] = interpolate_latent
    methods[PIXEL] = lambda z: pixel_round_trip(vae, z, norm)
    return methods


def _check_inputs(vae: Any, upsampler: Any, resolution: int) -> None:
    factor = vae_spatial_factor(vae)
    step = 2 * factor
    if not isinstance(resolution, int) or resolution <= 0 or resolution % step:
        nearest = max(1, round(resolution / step)) * step if isinstance(resolution, (int, float)) else 32 * step
        raise ValueError(
            f"--resolution {resolution!r} must be a positive multiple of {step} (2 x the VAE's x{factor} spatial "
            f"factor, so the x2-downsampled image still encodes to whole latent cells), e.g. {nearest}."
        )
    if upsampler is None:
        return
    channels = vae_latent_channels(vae)
    config = upsampler.config
    if config.in_channels != channels or config.out_channels != channels:
        raise ValueError(
            f"The upsampler maps {config.in_channels} → {config.out_channels} latent channels but the VAE has "
            f"{channels}. Pass the upsampler trained for this VAE (--upsampler), or the VAE it was trained with "
            "(--vae)."
        )
    if getattr(upsampler, "scale_factor", 2) != 2:
        raise ValueError(f"The upsampler scales by x{upsampler.scale_factor}; evaluation compares x2 methods only.")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _median_ms(function: Callable, z_low: torch.Tensor, repeats: int, bar: tqdm) -> float:
    function(z_low)  # warm-up: first calls pay for allocation and kernel selection
    bar.update()
    times = []
    for _ in range(repeats):
        _sync(z_low.device)
        start = time.perf_counter()
        function(z_low)
        _sync(z_low.device)
        times.append((time.perf_counter() - start) * 1000)
        bar.update()
    return statistics.median(times)


def _image_metrics(images: torch.Tensor, reference: torch.Tensor, suffix: str) -> list[dict[str, float]]:
    """`{metric_suffix: value}` for each image of the batch `images` against the one `reference`."""
    # Metrics are defined on [0, 1]; the VAE works on [-1, 1].
    a, b = (images + 1) / 2, (reference.expand_as(images) + 1) / 2
    values = {f"{name}_{suffix}": metric(a, b).tolist() for name, metric in IMAGE_METRICS.items()}
    return [dict(zip(values, per_image)) for per_image in zip(*values.values())]


def labelled_grid(rows: list[list[Image.Image]], labels: list[str]) -> Image.Image:
    """Rows of images under a band of column labels."""
    # Images smaller than --resolution are shown at their own size, in the top-left corner of their cell.
    tile = max(row[0].width for row in rows)
    grid = Image.new("RGB", (tile * len(labels), LABEL_HEIGHT + sum(row[0].height for row in rows)), "white")
    draw = ImageDraw.Draw(grid)
    for column, label in enumerate(labels):
        draw.text((column * tile + 2, 1), label, fill="black")
    top = LABEL_HEIGHT
    for row in rows:
        for c, image in enumerate(row):
            grid.paste(image, (c * tile, top))
        top += row[0].height
    return grid


def evaluate_upsampler(
    vae: Any,
    image_paths: Sequence[str | Path] | str | Path,
    *,
    upsampler: Any = None,
    resolution: int = 512,
    limit: int | None = None,
    crops_per_image: int = 1,
    grid: int = 4,
    repeats: int = 10,
    vae_name: str | None = None,
    upsampler_name: str | None = None,
    progress: bool = True,
) -> EvalReport:
    r"""
    Compare x2 latent upsampling methods on held-out images, in the VAE's normalised latent space.

    For each image `x` (the centre crop of `resolution` px, plus seeded random crops with `crops_per_image` > 1;
    an image smaller than that is evaluated at its own size, never scaled up):
    `z_high = encode(x)`, `z_low = encode(nearest_x2_down(x))`; `z_low` is scaled up by the learned upsampler (if
    given), bicubic latent interpolation and the pixel round trip (decode → bicubic x2 → encode), and each result
    is decoded. PSNR, SSIM and MS-SSIM are measured against `decode(z_high)` (`*_vs_vae`, what a perfect x2 in
    latent space would give) and against `x` (`*_vs_image`); `latent_mse` is against `z_high`. The VAE round
    trip `decode(z_high)` vs `x` is reported as the ceiling.

    Args:
        vae (`AutoencoderKL` or another diffusers VAE):
            The VAE of the pipeline the upsampler serves, on the device and dtype to evaluate in. A video VAE
            (`AutoencoderKLWan`) encodes and decodes each image as a one-frame video.
        image_paths (`list[str | Path]`, or a folder):
            Held-out images; a folder is searched recursively.
        upsampler (`LatentUpsampler`, *optional*):
            The learned upsampler. Without it only the two baselines are evaluated.
        resolution (`int`, defaults to `512`):
            Side of the centre crop of each full-size image; a multiple of 2 x the VAE's spatial factor. An image
            whose short side is smaller is cropped to its short side rounded down to that multiple (a warning says
            how many); scaling it up would make every x2 method look better than it is on real images.
        limit (`int`, *optional*): evaluate at most this many images.
        crops_per_image (`int`, defaults to `1`): the centre crop plus `crops_per_image - 1` random crops of each
            image (seeded, the same every run): more samples from few large held-out photos.
        grid (`int`, defaults to `4`): images (rows, each its centre crop) in the comparison grid; `0` for none.
        repeats (`int`, defaults to `10`): timed calls per method; latency is their median, after one warm-up.
        vae_name (`str`, *optional*), upsampler_name (`str`, *optional*): how the report names them.
        progress (`bool`, defaults to `True`): show progress bars (over crops, then over the timed calls).

    Returns:
        [`EvalReport`]

    Example:

    ```py
    >>> from lssgen.training.data import load_vae
    >>> vae = load_vae("black-forest-labs/FLUX.1-dev", subfolder="vae")
    >>> up = lssgen.LatentUpsampler.from_pretrained("path/to/flux-x2")
    >>> report = evaluate_upsampler(vae, "held-out/", upsampler=up, resolution=512, limit=100)
    >>> write_report(report, "eval-flux")
    ```
    """
    _check_inputs(vae, upsampler, resolution)
    paths = find_images(image_paths) if isinstance(image_paths, (str, Path)) else [Path(p) for p in image_paths]
    if limit is not None and limit < 1:
        raise ValueError(f"--limit {limit}: must be at least 1 (or left out for every image).")
    paths = paths[:limit] if limit is not None else paths
    if not paths:
        raise ValueError("No images to evaluate: pass a non-empty list of image paths (--images DIR with images).")
    if repeats < 1:
        raise ValueError(f"--repeats {repeats}: must be at least 1.")
    if crops_per_image < 1:
        raise ValueError(f"--crops-per-image {crops_per_image}: must be at least 1 (the centre crop).")
    norm = LatentNormalization.from_vae_config(vae.config)
    device = next(vae.parameters()).device
    if upsampler is not None:
        upsampler = upsampler.to(device).eval().requires_grad_(False)
    methods = _method_functions(vae, norm, upsampler)

    per_image, rows, names_of_crops, crop_sizes, first_low = [], [], [], [], None
    multiple = 2 * vae_spatial_factor(vae)
    crops = fixed_crops(paths, resolution, crops_per_image, own_size_multiple=multiple)
    bar = tqdm(crops, total=len(paths) * crops_per_image, desc="eval-upsampler", unit="crop", disable=not progress)
    with torch.no_grad():
        for crop_name, crop_index, image in bar:
            names_of_crops.append(crop_name)
            crop_sizes.append(image.shape[-1])
            image = image[None].to(device)
            low = downsample_nearest(image)
            z_high, z_low = encode(vae, image, norm), encode(vae, low, norm)
            first_low = z_low if first_low is None else first_low
            reference = decode(vae, z_high, norm)
            image = image.float()
            decoded, mse = {}, {}
            for name, function in methods.items():
                z = function(z_low)
                decoded[name] = decode(vae, z, norm)
                mse[name] = float(F.mse_loss(z.float(), z_high.float()))
            # One batched call per metric and reference: at small sizes each call's fixed cost outweighs its
            # arithmetic, most of all with several CPU threads.
            outputs = torch.cat(list(decoded.values()))
            vs_vae = _image_metrics(outputs, reference, "vs_vae")
            vs_image = _image_metrics(torch.cat([outputs, reference]), image, "vs_image")
            scores = {name: {**vs_vae[i], **vs_image[i], "latent_mse": mse[name]} for i, name in enumerate(methods)}
            # The ceiling compared with itself would be trivially perfect, so only its error against x is reported.
            scores[CEILING] = {**dict.fromkeys(vs_vae[0]), **vs_image[-1], "latent_mse": None}
            per_image.append(scores)
            if len(rows) < grid and crop_index == 0:  # one row per image: its centre crop
                shown = [F.interpolate(low, scale_factor=2, mode="nearest"), *decoded.values(), reference, image]
                rows.append([to_pil(t[0]) for t in shown])
    _warn_about_small_images(crop_sizes, resolution, crops_per_image, multiple)
    # Timed on the first crop's latent, after the loop, so each bar is one plain line.
    with tqdm(total=len(methods) * (repeats + 1), desc="latency", unit="call", disable=not progress) as bar:
        latency = {name: _median_ms(function, first_low, repeats, bar) for name, function in methods.items()}

    names = [*methods, CEILING]
    mean = {
        name: {
            metric: (None if per_image[0][name][metric] is None else _mean([s[name][metric] for s in per_image]))
            for metric in per_image[0][name]
        }
        for name in names
    }
    labels = ["input (low-res)", *(METHOD_LABELS[n] for n in methods), "VAE round trip", "original"]
    return EvalReport(
        settings={
            "resolution": resolution,
            "crops_per_image": crops_per_image,
            "latency_resolution": crop_sizes[0],
            "downsample": "nearest x2 (half the crop's size)",
            "device": str(device),
            "dtype": str(next(vae.parameters()).dtype).removeprefix("torch."),
            "repeats": repeats,
            "metrics": "PSNR (dB, inf when identical), SSIM, MS-SSIM on [0, 1] RGB (torchmetrics' maps, averaged "
            "over the window positions inside the image, as scikit-image); latent MSE on normalised latents",
        },
        vae=vae_name or type(vae).__name__,
        upsampler=(upsampler_name or type(upsampler).__name__) if upsampler is not None else None,
        methods=names,
        images=names_of_crops,
        crop_sizes=crop_sizes,
        per_image=per_image,
        mean=mean,
        latency_ms=latency,
        grid=labelled_grid(rows, labels) if rows else None,
    )


def _smaller_images(crop_sizes: list[int], resolution: int, crops_per_image: int) -> str | None:
    """How many images were evaluated below `resolution` and at which sizes, or `None` when none was."""
    smaller = [size for size in crop_sizes[::crops_per_image] if size < resolution]
    if not smaller:
        return None
    sizes = ", ".join(f"{size} px" for size in sorted(set(smaller), reverse=True))
    images = len(crop_sizes) // crops_per_image
    return f"{len(smaller)} of {images} images are smaller than {resolution} px: at their own size ({sizes})"


def _warn_about_small_images(crop_sizes: list[int], resolution: int, crops_per_image: int, multiple: int) -> None:
    smaller = _smaller_images(crop_sizes, resolution, crops_per_image)
    if smaller:
        logger.warning(
            f"{smaller}: each is cropped to its short side rounded down to a multiple of {multiple} px, not scaled "
            f"up. Pass --resolution {min(crop_sizes)} to evaluate every image at the same size."
        )


def _mean(values: list[float]) -> float:
    return math.fsum(values) / len(values)


def _json_safe(value: Any) -> Any:
    # Strict JSON has no Infinity (PSNR of identical images); write it as a string a reader can float().
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _crop_summary(report: EvalReport) -> str:
    per_image, resolution = report.settings["crops_per_image"], report.settings["resolution"]
    images = len(report.images) // per_image
    if per_image == 1:
        summary = f"{images} held-out images, centre crop {resolution} px"
    else:
        summary = f"{images} held-out images x {per_image} crops of {resolution} px (centre + seeded random)"
    smaller = _smaller_images(report.crop_sizes, resolution, per_image)
    return f"{summary} ({smaller})" if smaller else summary


def _ms_ssim_note(crop_sizes: list[int]) -> str:
    scales = {size: ms_ssim_scales(size, size) for size in sorted(set(crop_sizes))}
    fewer = [f"{count} at {size} px" for size, count in scales.items() if count < len(MS_SSIM_WEIGHTS)]
    if not fewer:
        return ""
    return f" MS-SSIM scales (too small for {len(MS_SSIM_WEIGHTS)}; weights renormalised): {', '.join(fewer)}."


def _markdown(report: EvalReport) -> str:
    s = report.settings
    lines = [
        "# Latent x2 upsampler evaluation",
        "",
        f"VAE: `{report.vae}`; upsampler: `{report.upsampler or 'none (baselines only)'}`; "
        f"{_crop_summary(report)}, input = nearest x2 downsample (half the crop's size); {s['device']}, {s['dtype']}.",
        "",
        "Means over crops. `vs VAE` = against decode(encode(full image)), the best a latent x2 can do; "
        "`vs image` = against the original crop. Latent MSE is against encode(full image) in normalised latents. "
        f"Latency: median of {s['repeats']} calls on the latent of one {s['latency_resolution']} px crop."
        f"{_ms_ssim_note(report.crop_sizes)}",
        "",
        "| method | PSNR vs VAE (dB) | SSIM vs VAE | MS-SSIM vs VAE | PSNR vs image (dB) | SSIM vs image "
        "| MS-SSIM vs image | latent MSE | latency (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    columns = ["psnr_vs_vae", "ssim_vs_vae", "ms_ssim_vs_vae", "psnr_vs_image", "ssim_vs_image", "ms_ssim_vs_image"]
    for name in report.methods:
        m = report.mean[name]
        cells = [_cell(m[c], 2 if c.startswith("psnr") else 4) for c in columns]
        cells += [_cell(m["latent_mse"], 5), _cell(report.latency_ms.get(name), 2)]
        lines.append(f"| {METHOD_LABELS[name]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def write_report(report: EvalReport, out_dir: str | Path) -> Path:
    r"""
    Write `report.json`, `report.md` and (when the report has one) `grid.png` into `out_dir`.

    The files are written into a temporary sibling folder first and moved in at the end, so a failure leaves no
    half-written report.

    Example:

    ```py
    >>> write_report(evaluate_upsampler(vae, "held-out/"), "eval-out")
    PosixPath('eval-out')
    ```
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        (staging / "report.json").write_text(json.dumps(_json_safe(report.to_dict()), indent=2, allow_nan=False))
        (staging / "report.md").write_text(_markdown(report))
        if report.grid is not None:
            report.grid.save(staging / "grid.png")
        out_dir.mkdir(exist_ok=True)
        for file in staging.iterdir():
            file.replace(out_dir / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir
