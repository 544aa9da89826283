"""Latents in frequency space: the orthonormal 2-D DCT, upsampling by zero-padding it, and the power law of a VAE's
latent spectrum, for method 'spectral' (`lssgen.methods.Spectral`, DESIGN.md §1b)."""

from __future__ import annotations

import math

import torch


def dct_matrix(size: int, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
    """The orthonormal DCT-II matrix `D` of `size` points: `D @ x` transforms `x` along its first axis, `D.T @ X`
    transforms back (scipy's `dct(x, norm="ortho")` and `idct`)."""
    n = torch.arange(size, dtype=torch.float64)
    matrix = torch.cos(math.pi * (2 * n[None, :] + 1) * n[:, None] / (2 * size)) * math.sqrt(2 / size)
    matrix[0] /= math.sqrt(2)
    return matrix.to(device=device, dtype=dtype)


def dct_2d(x: torch.Tensor) -> torch.Tensor:
    """The orthonormal DCT-II over the last two axes (height, width); any leading axes (batch, channel, frame)."""
    rows = dct_matrix(x.shape[-2], device=x.device, dtype=x.dtype)
    columns = dct_matrix(x.shape[-1], device=x.device, dtype=x.dtype)
    return rows @ x @ columns.T


def idct_2d(coefficients: torch.Tensor) -> torch.Tensor:
    """The inverse of [`dct_2d`]."""
    rows = dct_matrix(coefficients.shape[-2], device=coefficients.device, dtype=coefficients.dtype)
    columns = dct_matrix(coefficients.shape[-1], device=coefficients.device, dtype=coefficients.dtype)
    return rows.T @ coefficients @ columns


def dct_upsample(x: torch.Tensor, high_band: torch.Tensor) -> torch.Tensor:
    r"""
    `x` (`[..., h, w]`) on the grid of `high_band` (`[..., H, W]`, H >= h, W >= w): its DCT coefficients in the low
    corner of `high_band`'s, which are taken as DCT coefficients themselves (the new high band), then the inverse
    DCT. The energy of `x` is kept, spread over more points: at 2x a side its amplitude halves.
    """
    height, width = x.shape[-2:]
    coefficients = high_band.clone()
    coefficients[..., :height, :width] = dct_2d(x)
    return idct_2d(coefficients)


def spectral_stage_end_sigma(a: float, beta: float, delta: float, nyquist: int) -> float:
    r"""
    The noise level at which a stage of a latent grid whose short side is `2 * nyquist` has resolved what it can
    (DESIGN.md §1b): $\sigma = 1 / (1 + \sqrt{\delta / (P (1 + P - \delta))})$ with $P = a \cdot w^{-\beta}$ the
    latent spectrum's power at the grid's Nyquist index $w$.
    """
    power = a * nyquist**-beta
    return 1.0 / (1.0 + math.sqrt(delta / (power * (1.0 + power - delta))))


def fit_latent_spectrum(latents: torch.Tensor) -> tuple[float, float]:
    r"""
    `(a, beta)` of the power law $P(w) = a \cdot w^{-\beta}$ fitted to clean latents (`[N, C, H, W]`, as the
    denoiser sees them, i.e. scaled and shifted like the pipeline's): $P(w)$ is the power $|F|^2 / (H W)$ of the 2-D
    Fourier transform (on which unit white noise has power 1) averaged over images, channels and the frequencies
    whose radius in cycles per image rounds to $w$, for $1 \le w \le \min(H, W) / 2$; the fit is least squares on
    $\log P$ against $\log w$.

    This is lssgen's estimator: the published constants' own estimator is not documented, so constants fitted here
    for a new VAE are consistent with each other, not necessarily with the published ones.
    """
    if latents.ndim != 4:
        raise ValueError(f"`latents` must be [N, C, H, W], got shape {tuple(latents.shape)}.")
    height, width = latents.shape[-2:]
    power = torch.fft.fft2(latents.double()).abs().square().mean(dim=(0, 1)) / (height * width)
    fy = torch.fft.fftfreq(height, d=1 / height, dtype=torch.float64)
    fx = torch.fft.fftfreq(width, d=1 / width, dtype=torch.float64)
    radius = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2).round().long()
    sides = torch.arange(1, min(height, width) // 2 + 1)
    mean_power = torch.stack([power[radius == w].mean() for w in sides])
    x, y = torch.log(sides.double()), torch.log(mean_power)
    slope = ((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()
    return float(torch.exp(y.mean() - slope * x.mean())), float(-slope)
