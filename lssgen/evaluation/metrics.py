r"""
PSNR, SSIM and MS-SSIM of `(B, 3, H, W)` images in [0, 1], one value per image (shape `(B,)`), from torchmetrics.

What this module adds to `torchmetrics.functional.image`:

- Per-image values with the data range fixed to 1 (torchmetrics averages over the batch by default and guesses the
  range from the data).
- SSIM averaged over the window positions that lie inside the image, as Wang et al.'s reference code, scikit-image,
  TensorFlow and pytorch-msssim do. torchmetrics (1.9) also averages over a reflect-padded 5 px border, which moves
  SSIM by about 1e-3 on 512 px crops and by 1e-2 on 48 px ones; its full SSIM map, cut to the inside, gives
  scikit-image's value (within 5e-5 in float32, checked in the tests).
- MS-SSIM (Wang et al. 2003, the standard five weights) on the same footing: torchmetrics' contrast-structure term
  at each finer scale, the inside-the-image SSIM at the coarsest. An image too small for five scales (the coarsest
  must still hold one 11x11 window: a short side of at least 176 px) uses as many scales as fit, with the leading
  weights renormalised to sum to 1 (4 scales from 88 px, 3 from 44, 2 from 22, 1, which is plain SSIM, from 11).
  Negative terms are clamped to 0 so fractional powers stay real, as torchmetrics and pytorch-msssim do.

Arithmetic runs in the input's dtype. Keep float32: on a CPU here float64 SSIM was 17x slower at 512 px, and float32
stays within 5e-5 of it on photos (a perfectly flat bright image is the worst case, 3e-4 off).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

WINDOW_SIZE = 11  # torchmetrics' Gaussian window for sigma 1.5 (int(3.5 * sigma + 0.5) * 2 + 1)
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _check(x: torch.Tensor, y: torch.Tensor, needs_window: bool = True) -> None:
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(
            f"Expected two images of the same `(B, C, H, W)` shape, got {tuple(x.shape)} and {tuple(y.shape)}."
        )
    if needs_window and min(x.shape[-2:]) < WINDOW_SIZE:
        raise ValueError(
            f"SSIM needs images of at least {WINDOW_SIZE}x{WINDOW_SIZE} pixels, got {tuple(x.shape[-2:])}. "
            "Evaluate at a larger resolution."
        )


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB for images in [0, 1]; `inf` for identical images (no cap)."""
    _check(x, y, needs_window=False)
    return peak_signal_noise_ratio(x, y, data_range=1.0, reduction="none", dim=(1, 2, 3))


def _inside_mean(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    _, full = structural_similarity_index_measure(x, y, data_range=1.0, reduction="none", return_full_image=True)
    border = WINDOW_SIZE // 2
    return full[..., border:-border, border:-border].flatten(1).mean(1)


# Images per torchmetrics SSIM call: it keeps a score of full-size maps per image at once (96 images of 512 px took
# over 20 GB), and each image's value does not depend on the others in its batch.
SSIM_BATCH = 8


def _in_batches(metric, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.cat([metric(x[i : i + SSIM_BATCH], y[i : i + SSIM_BATCH]) for i in range(0, len(x), SSIM_BATCH)])


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004, 11x11 Gaussian window, sigma 1.5) for images in [0, 1]."""
    _check(x, y)
    return _in_batches(_inside_mean, x, y)


def ms_ssim_scales(height: int, width: int) -> int:
    """How many MS-SSIM scales an image of this size supports (at most 5; each halves the image)."""
    scales, side = 0, min(height, width)
    while scales < len(MS_SSIM_WEIGHTS) and side >= WINDOW_SIZE:
        scales, side = scales + 1, side // 2
    return scales


def ms_ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Multi-scale SSIM with the standard weights; fewer scales, renormalised weights, for small images."""
    _check(x, y)
    return _in_batches(_ms_ssim, x, y)


def _ms_ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    scales = ms_ssim_scales(*x.shape[-2:])
    weights = torch.tensor(MS_SSIM_WEIGHTS[:scales], dtype=x.dtype, device=x.device)
    factors = []
    for _ in range(scales - 1):
        # torchmetrics already averages the contrast-structure term over the inside of the image only.
        _, contrast_structure = structural_similarity_index_measure(
            x, y, data_range=1.0, reduction="none", return_contrast_sensitivity=True
        )
        factors.append(contrast_structure)
        x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    factors.append(_inside_mean(x, y))
    return torch.stack(factors, 1).clamp(min=0).pow(weights / weights.sum()).prod(1)
