r"""
Image-quality metrics in plain torch (no downloads): PSNR, SSIM and MS-SSIM on `(B, 3, H, W)` images in [0, 1].

Every function returns one value per image, shape `(B,)`, and is symmetric in its two arguments.

- SSIM follows Wang et al. 2004: an 11x11 Gaussian window with sigma 1.5, `C1 = (0.01 L)^2`, `C2 = (0.03 L)^2`
  with `L = 1`, statistics over the "valid" part of the image (no padding), channels averaged.
- MS-SSIM follows Wang et al. 2003 with the standard five weights. An image too small for five scales (the
  coarsest must still hold one 11x11 window, i.e. a short side of at least 176 px) uses as many scales as fit,
  with the leading weights renormalised to sum to 1. Negative contrast-structure terms are clamped to 0 so
  fractional powers stay real (as pytorch-msssim does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

WINDOW_SIZE = 11
WINDOW_SIGMA = 1.5
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
_C1 = 0.01**2
_C2 = 0.03**2


def _check(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(
            f"Expected two images of the same `(B, C, H, W)` shape, got {tuple(x.shape)} and {tuple(y.shape)}."
        )


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB for images in [0, 1]; `inf` for identical images (no cap)."""
    _check(x, y)
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(1 / mse)).float()


def _gaussian_window(channels: int, device, dtype) -> torch.Tensor:
    coords = torch.arange(WINDOW_SIZE, device=device, dtype=dtype) - (WINDOW_SIZE - 1) / 2
    g = torch.exp(-(coords**2) / (2 * WINDOW_SIGMA**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, WINDOW_SIZE, WINDOW_SIZE).contiguous()


def _ssim_terms(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image SSIM and contrast-structure term, each averaged over channels and window positions."""
    if min(x.shape[-2:]) < WINDOW_SIZE:
        raise ValueError(
            f"SSIM needs images of at least {WINDOW_SIZE}x{WINDOW_SIZE} pixels, got {tuple(x.shape[-2:])}. "
            "Evaluate at a larger resolution."
        )
    # float64: the variance terms subtract nearly equal numbers and would lose the SSIM == 1 of identical images.
    x, y = x.double(), y.double()
    window = _gaussian_window(x.shape[1], x.device, x.dtype)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window, groups=x.shape[1])

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    luminance = (2 * mu_x * mu_y + _C1) / (mu_x**2 + mu_y**2 + _C1)
    contrast_structure = (2 * cov + _C2) / (var_x + var_y + _C2)
    return (luminance * contrast_structure).flatten(1).mean(1), contrast_structure.flatten(1).mean(1)


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004, 11x11 Gaussian window, sigma 1.5) for images in [0, 1]."""
    _check(x, y)
    return _ssim_terms(x, y)[0].float()


def ms_ssim_scales(height: int, width: int) -> int:
    """How many MS-SSIM scales an image of this size supports (at most 5; each halves the image)."""
    scales, side = 0, min(height, width)
    while scales < len(MS_SSIM_WEIGHTS) and side >= WINDOW_SIZE:
        scales, side = scales + 1, side // 2
    return scales


def ms_ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Multi-scale SSIM with the standard weights; fewer scales, renormalised weights, for small images."""
    _check(x, y)
    scales = ms_ssim_scales(*x.shape[-2:])
    if scales == 0:
        raise ValueError(
            f"MS-SSIM needs images of at least {WINDOW_SIZE}x{WINDOW_SIZE} pixels, got {tuple(x.shape[-2:])}."
        )
    weights = torch.tensor(MS_SSIM_WEIGHTS[:scales], dtype=torch.float64, device=x.device)
    weights = weights / weights.sum()
    factors = []
    for scale in range(scales):
        full, contrast_structure = _ssim_terms(x, y)
        # Coarser scales contribute contrast-structure only; the coarsest contributes the full SSIM.
        factors.append((full if scale == scales - 1 else contrast_structure).clamp(min=0))
        if scale < scales - 1:
            x = F.avg_pool2d(x, 2, ceil_mode=True)
            y = F.avg_pool2d(y, 2, ceil_mode=True)
    return torch.stack(factors, 1).pow(weights).prod(1).float()
