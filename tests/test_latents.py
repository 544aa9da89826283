"""`LatentNormalization` against the stock pipelines' own formulas: what each family's pipeline does to latents
before `vae.decode` (SD, FLUX.1, SDXL/Playground v2.5, Wan/Qwen-Image), read from the VAE configs diffusers' models
carry, and its inverse for `vae.encode`'s output."""

from __future__ import annotations

import inspect

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderKLWan
from diffusers.configuration_utils import FrozenDict
from hypothesis import given
from hypothesis import strategies as st

from lssgen.latents import LatentNormalization

pytestmark = pytest.mark.usefixtures("one_thread")

PLAYGROUND_MEAN = [-1.6574, 1.886, -1.383, 2.5155]
PLAYGROUND_STD = [8.4927, 5.9022, 6.5498, 5.2299]


def vae_config(cls, **overrides) -> FrozenDict:
    """The config a `cls` VAE built with `overrides` carries (its defaults for the rest; no weights are built)."""
    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(cls.__init__).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }
    return FrozenDict({**defaults, **overrides})


def latents(*shape, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def channelwise(values, ndim) -> torch.Tensor:
    return torch.tensor(values).view(1, -1, *([1] * (ndim - 2)))


# --------------------------------------------------------------------------------------------------------------
# Each family's config -> the stock pipeline's decode formula
# --------------------------------------------------------------------------------------------------------------


def test_sd_scale_only():
    """SD/SDXL: `latents / scaling_factor` before decoding (no shift, no per-channel statistics)."""
    norm = LatentNormalization.from_vae_config(vae_config(AutoencoderKL, scaling_factor=0.18215))
    x = latents(2, 4, 3, 5)
    torch.testing.assert_close(norm.to_vae(x), x / 0.18215)
    torch.testing.assert_close(norm.from_vae(x), x * 0.18215)


def test_flux_shift_and_scale():
    """FLUX.1: `latents / scaling_factor + shift_factor` before decoding, `(z - shift) * scaling` after encoding."""
    norm = LatentNormalization.from_vae_config(vae_config(AutoencoderKL, scaling_factor=0.3611, shift_factor=0.1159))
    x = latents(1, 16, 4, 4)
    torch.testing.assert_close(norm.to_vae(x), x / 0.3611 + 0.1159)
    torch.testing.assert_close(norm.from_vae(x), (x - 0.1159) * 0.3611)


def test_playground_per_channel_statistics():
    """Playground v2.5 (StableDiffusionXLPipeline with `latents_mean/std`): `latents * std / scaling_factor + mean`
    per channel, whatever `shift_factor` holds."""
    config = vae_config(
        AutoencoderKL, scaling_factor=0.5, shift_factor=0.3, latents_mean=PLAYGROUND_MEAN, latents_std=PLAYGROUND_STD
    )
    norm = LatentNormalization.from_vae_config(config)
    x = latents(2, 4, 3, 3)
    mean, std = channelwise(PLAYGROUND_MEAN, 4), channelwise(PLAYGROUND_STD, 4)
    torch.testing.assert_close(norm.to_vae(x), x * std / 0.5 + mean)
    torch.testing.assert_close(norm.from_vae(x), (x - mean) * 0.5 / std)
    for channel in range(4):  # axis 1 is the channel
        expected = x[:, channel] * PLAYGROUND_STD[channel] / 0.5 + PLAYGROUND_MEAN[channel]
        torch.testing.assert_close(norm.to_vae(x)[:, channel], expected)


def test_wan_video_statistics_without_scaling_factor():
    """Wan's VAE config has no `scaling_factor`: WanPipeline decodes `latents / (1 / std) + mean` on
    `(B, C, frames, h, w)` latents, channel on axis 1."""
    config = vae_config(AutoencoderKLWan)
    assert "scaling_factor" not in config
    norm = LatentNormalization.from_vae_config(config)
    x = latents(1, 16, 2, 3, 4)
    mean, std = channelwise(config["latents_mean"], 5), channelwise(config["latents_std"], 5)
    torch.testing.assert_close(norm.to_vae(x), x / (1.0 / std) + mean)
    torch.testing.assert_close(norm.from_vae(x), (x - mean) * (1.0 / std))


def test_missing_or_none_factors_mean_no_shift_no_scale():
    """A config without (or with None) `scaling_factor`/`shift_factor` and without statistics: identity."""
    x = latents(1, 4, 2, 2)
    for config in (FrozenDict({}), FrozenDict({"scaling_factor": None, "shift_factor": None})):
        norm = LatentNormalization.from_vae_config(config)
        torch.testing.assert_close(norm.to_vae(x), x, rtol=0, atol=0)
        torch.testing.assert_close(norm.from_vae(x), x, rtol=0, atol=0)
        norm = LatentNormalization.shifted_and_scaled(config)
        torch.testing.assert_close(norm.to_vae(x), x, rtol=0, atol=0)


def test_statistics_need_both_mean_and_std():
    """Per-channel statistics apply only when both `latents_mean` and `latents_std` are set (as the SDXL pipeline
    checks); one alone falls back to shift and scale."""
    x = latents(1, 4, 2, 2)
    for partial in ({"latents_mean": PLAYGROUND_MEAN}, {"latents_std": PLAYGROUND_STD}):
        config = vae_config(AutoencoderKL, scaling_factor=0.5, shift_factor=0.25, **partial)
        norm = LatentNormalization.from_vae_config(config)
        torch.testing.assert_close(norm.to_vae(x), x / 0.5 + 0.25)


def test_shifted_and_scaled_ignores_statistics():
    """SD3/Z-Image decode `latents / scaling_factor + shift_factor` even if the config carries statistics."""
    config = vae_config(
        AutoencoderKL, scaling_factor=1.5305, shift_factor=0.0609, latents_mean=PLAYGROUND_MEAN, latents_std=[2.0] * 4
    )
    x = latents(1, 4, 2, 2)
    torch.testing.assert_close(LatentNormalization.shifted_and_scaled(config).to_vae(x), x / 1.5305 + 0.0609)
    # ... whereas the generic rule takes the statistics.
    torch.testing.assert_close(
        LatentNormalization.from_vae_config(config).to_vae(x), x * 2.0 / 1.5305 + channelwise(PLAYGROUND_MEAN, 4)
    )


# --------------------------------------------------------------------------------------------------------------
# The transform itself
# --------------------------------------------------------------------------------------------------------------


def test_default_is_identity():
    """`LatentNormalization()`: no shift, unit std, unit scale."""
    x = latents(2, 3, 4, 4)
    torch.testing.assert_close(LatentNormalization().to_vae(x), x, rtol=0, atol=0)
    torch.testing.assert_close(LatentNormalization().from_vae(x), x, rtol=0, atol=0)


def test_integer_scalars():
    """Plain ints work as scalars (a config written `shift_factor: 0`, `std: 2`)."""
    norm = LatentNormalization(mean=1, std=2, scale=4)
    x = latents(1, 3, 2, 2)
    torch.testing.assert_close(norm.to_vae(x), x * 2 / 4 + 1)
    torch.testing.assert_close(norm.from_vae(x), (x - 1) * 4 / 2)


def test_results_are_float32():
    """Half-precision latents come back float32, what the VAE decodes in; so do float32 latents under a float64
    default dtype (the statistics are float32 too)."""
    norm = LatentNormalization(tuple(PLAYGROUND_MEAN), tuple(PLAYGROUND_STD), 0.5)
    x = latents(1, 4, 2, 2)
    for dtype in (torch.float16, torch.bfloat16):
        assert norm.to_vae(x.to(dtype)).dtype == torch.float32
        assert norm.from_vae(x.to(dtype)).dtype == torch.float32
        torch.testing.assert_close(norm.to_vae(x.to(dtype)), norm.to_vae(x.to(dtype).float()), rtol=0, atol=0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert norm.to_vae(x).dtype == norm.from_vae(x).dtype == torch.float32
    finally:
        torch.set_default_dtype(default)


def test_statistics_follow_the_latents_device():
    """Per-channel statistics are made on the latents' device (the `meta` device stands in for a GPU here)."""
    norm = LatentNormalization(tuple(PLAYGROUND_MEAN), tuple(PLAYGROUND_STD), 0.5)
    x = torch.empty(2, 4, 3, 3, device="meta")
    assert norm.to_vae(x).device.type == norm.from_vae(x).device.type == "meta"
    assert norm.to_vae(x).shape == (2, 4, 3, 3)


@pytest.mark.parametrize("shape", [(1, 3, 4, 4), (2, 5, 2, 2), (1, 1, 4, 4), (1, 16, 2, 3, 3)])
def test_wrong_channel_count_is_refused(shape):
    """Statistics for another number of channels than the latents have: a clear error naming both counts, not a
    broadcast (or a silent broadcast of 1 channel)."""
    norm = LatentNormalization(tuple(PLAYGROUND_MEAN), tuple(PLAYGROUND_STD), 0.5)
    x = latents(*shape)
    message = rf"hold 4 values but its latents have {shape[1]} channels"
    with pytest.raises(ValueError, match=message):
        norm.to_vae(x)
    with pytest.raises(ValueError, match=message):
        norm.from_vae(x)
    with pytest.raises(ValueError, match="does not belong to these weights"):
        LatentNormalization(0.0, tuple(PLAYGROUND_STD), 1.0).from_vae(x)


def test_one_channel_statistics_on_one_channel_latents():
    """A one-element sequence is per-channel statistics for one-channel latents (no special case)."""
    norm = LatentNormalization((0.5,), (2.0,), 1.0)
    x = latents(2, 1, 3, 3)
    torch.testing.assert_close(norm.to_vae(x), x * 2.0 + 0.5)


@given(
    channels=st.integers(1, 6),
    video=st.booleans(),
    scale=st.floats(0.05, 5.0),
    seed=st.integers(0, 2**16),
)
def test_from_vae_inverts_to_vae(channels, video, scale, seed):
    """Encoding what was decoded gives the latents back (and the reverse), for any per-channel statistics and scale,
    images or videos; the forward map is `(z - mean) * scale / std` channel by channel."""
    generator = torch.Generator().manual_seed(seed)
    mean = (torch.randn(channels, generator=generator) * 2).tolist()
    std = (torch.rand(channels, generator=generator) * 3 + 0.2).tolist()
    norm = LatentNormalization(tuple(mean), tuple(std), scale)
    shape = (2, channels, 2, 3, 3) if video else (2, channels, 3, 3)
    x = torch.randn(*shape, generator=generator)
    torch.testing.assert_close(norm.from_vae(norm.to_vae(x)), x, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(norm.to_vae(norm.from_vae(x)), x, rtol=1e-4, atol=1e-4)
    encoded = norm.from_vae(x)
    for channel in range(channels):
        expected = (x[:, channel] - mean[channel]) * scale / std[channel]
        torch.testing.assert_close(encoded[:, channel], expected, rtol=1e-5, atol=1e-5)
