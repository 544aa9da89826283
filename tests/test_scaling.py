"""How a latent doubles in size between stages (lssgen.scaling), in each scaling space: the learned upsampler, latent
interpolation and the pixel round trip, in the pipeline's latent space or (FLUX.2) the VAE's own, for images and
videos. Values are checked against computations written out here: torch's bicubic interpolation, the tiny VAEs'
decode and encode called by hand with the pipelines' own normalisation constants."""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan, AutoencoderTiny
from hypothesis import example, given
from hypothesis import strategies as st

from lssgen import LatentUpsampler
from lssgen.adapters.base import Adapter
from lssgen.adapters.flux import FluxAdapter
from lssgen.adapters.flux2 import Flux2Adapter
from lssgen.adapters.wan import WanAdapter
from lssgen.scaling import (
    SCALING_SPACES,
    frame_by_frame,
    interpolate_latent,
    pixel_round_trip,
    resolve_scaling_space,
    scale_up,
    upsample_learned,
)
from lssgen.tiny import build_tiny_flux2_pipeline, build_tiny_flux_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")


def bicubic_x2(x: torch.Tensor) -> torch.Tensor:
    """The interpolation lssgen promises: bicubic x2, half-pixel centres (`align_corners=False`), in float32."""
    return F.interpolate(x.float(), scale_factor=2, mode="bicubic", align_corners=False)


def small_upsampler(channels: int, seed: int = 0) -> LatentUpsampler:
    torch.manual_seed(seed)
    return LatentUpsampler(
        in_channels=channels, out_channels=channels, block_out_channels=(16, 16), norm_num_groups=8
    ).eval()


@pytest.fixture(scope="module")
def flux_pipe():
    return build_tiny_flux_pipeline(seed=0)


@pytest.fixture(scope="module")
def flux2_pipe():
    return build_tiny_flux2_pipeline(seed=0)


def tiny_autoencoder() -> AutoencoderTiny:
    torch.manual_seed(1)
    return AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
        latent_channels=4,
    ).eval()


class TupleEncoder(torch.nn.Module):
    """A VAE whose `encode` gives a plain tuple `(latents,)` (what diffusers' autoencoders give for
    `return_dict=False`), the rest of it an AutoencoderTiny."""

    def __init__(self, inner: AutoencoderTiny):
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def encode(self, image):
        return self.inner.encode(image, return_dict=False)

    def decode(self, z, return_dict=True):
        return self.inner.decode(z, return_dict=return_dict)


# --- resolve_scaling_space ------------------------------------------------------------------------------------------
def test_default_space_is_learned_with_an_upsampler_and_latent_without():
    """`scaling_space=None` (the default) picks the learned upsampler when one is given, else interpolation."""
    assert resolve_scaling_space(None, object()) == "learned"
    assert resolve_scaling_space(None, None) == "latent"


@pytest.mark.parametrize("upsampler", [None, object()])
def test_latent_and_pixel_spaces_need_no_upsampler(upsampler):
    """'latent' and 'pixel' are accepted as they are, with or without an upsampler."""
    assert resolve_scaling_space("latent", upsampler) == "latent"
    assert resolve_scaling_space("pixel", upsampler) == "pixel"


def test_resnet_is_an_alias_of_learned():
    """The published name 'resnet' and 'learned' mean the learned upsampler."""
    assert SCALING_SPACES == ("learned", "latent", "pixel")
    assert resolve_scaling_space("resnet", object()) == "learned"
    assert resolve_scaling_space("learned", object()) == "learned"


@pytest.mark.parametrize("space", ["learned", "resnet"])
def test_learned_space_without_an_upsampler_says_how_to_get_one(space):
    """Asking for the learned upsampler without one fails with the fix: patch with one, or another space."""
    message = (
        "`scaling_space='learned'` needs a latent upsampler: call `lssgen.patch(pipe, upsampler)` with a "
        "`lssgen.LatentUpsampler`, or use `scaling_space='latent'` or 'pixel'."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        resolve_scaling_space(space, None)


@pytest.mark.parametrize("space", ["bilinear", "Latent", "", 2, ["latent"], ("pixel",)])
def test_unknown_space_is_refused_with_the_choices(space):
    """Anything else, a non-string or an unhashable value included, is a ValueError that lists the choices."""
    message = (
        r"Unknown `scaling_space` .*Choose one of 'learned', 'latent', 'pixel' \('resnet' is an alias of 'learned'\)"
    )
    with pytest.raises(ValueError, match=message):
        resolve_scaling_space(space, object())


# --- frame_by_frame -------------------------------------------------------------------------------------------------
def test_frame_by_frame_hands_images_to_fn_as_they_are():
    """A 4-D `(N, C, h, w)` batch goes to `fn` unchanged, in one call."""
    x = torch.randn(2, 3, 4, 5)
    calls = []

    def fn(images):
        calls.append(images)
        return images * 2

    assert torch.equal(frame_by_frame(fn, x), x * 2)
    assert len(calls) == 1 and calls[0] is x


@given(
    batch=st.integers(1, 3),
    channels=st.integers(1, 4),
    frames=st.integers(1, 4),
    height=st.integers(1, 5),
    width=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
@example(batch=2, channels=3, frames=4, height=5, width=6, seed=0)
def test_frame_by_frame_applies_fn_to_each_frame_of_a_video(batch, channels, frames, height, width, seed):
    """A 5-D `(B, C, frames, h, w)` video: frame f of the result is `fn` of frame f, in one call over all frames;
    `fn` may change the channels and the size, the frame axis stays where it is."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, frames, height, width, generator=generator)
    mix = torch.randn(channels + 1, channels, 1, 1, generator=generator)
    calls = []

    def fn(images):  # mixes channels (C -> C+1) and doubles the size: every axis must land right
        calls.append(images.shape)
        return F.conv2d(F.interpolate(images, scale_factor=2, mode="nearest"), mix)

    out = frame_by_frame(fn, x)
    assert out.shape == (batch, channels + 1, frames, 2 * height, 2 * width)
    assert calls == [(batch * frames, channels, height, width)]
    for f in range(frames):
        torch.testing.assert_close(out[:, :, f], fn(x[:, :, f]))


# --- latent interpolation -------------------------------------------------------------------------------------------
def test_latent_interpolation_is_torch_bicubic_x2():
    """Latent interpolation is torch's bicubic x2 with half-pixel centres, value for value."""
    x = torch.randn(2, 4, 6, 10)
    out = interpolate_latent(x)
    assert out.shape == (2, 4, 12, 20) and out.dtype == torch.float32
    torch.testing.assert_close(out, bicubic_x2(x), rtol=0, atol=0)


def keys_cubic(x: float, a: float = -0.75) -> float:
    """Keys' cubic convolution kernel, with torch's (and OpenCV's) a = -0.75."""
    x = abs(x)
    if x <= 1:
        return (a + 2) * x**3 - (a + 3) * x**2 + 1
    if x < 2:
        return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
    return 0.0


def test_latent_interpolation_is_cubic_convolution_with_half_pixel_centres():
    """Hand-derived: output cell j samples the input at s = (j + 0.5) / 2 - 0.5, from the 4 cells around it weighted
    by Keys' kernel (edge cells repeated). Along a row of a latent constant down its columns, that is all there is."""
    row = torch.randn(7, generator=torch.Generator().manual_seed(0)).double()
    out = interpolate_latent(row.expand(1, 1, 3, 7).float())[0, 0, 1]
    expected = []
    for j in range(14):
        s = (j + 0.5) / 2 - 0.5
        base = math.floor(s)
        expected.append(sum(keys_cubic(s - (base + m)) * row[min(max(base + m, 0), 6)] for m in (-1, 0, 1, 2)))
    torch.testing.assert_close(out, torch.stack(expected).float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_latent_interpolation_keeps_a_half_dtype_and_computes_in_float32(dtype):
    """Half-precision latents come back in their dtype, interpolated in float32 (bicubic is not implemented for
    every half type on every device)."""
    x = torch.randn(1, 4, 5, 7).to(dtype)
    out = interpolate_latent(x)
    assert out.dtype == dtype
    torch.testing.assert_close(out, bicubic_x2(x).to(dtype), rtol=0, atol=0)


# --- the learned upsampler ------------------------------------------------------------------------------------------
def test_learned_upsampler_runs_in_its_dtype_and_returns_the_latents_dtype():
    """The upsampler sees the latents in its own parameters' dtype; the result comes back in the latents' dtype."""
    upsampler = small_upsampler(4)
    x = torch.randn(2, 4, 6, 8).to(torch.bfloat16)
    with torch.no_grad():
        out = upsample_learned(x, upsampler)
        expected = upsampler(x.float()).to(torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 4, 12, 16)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_learned_upsampler_follows_the_latents_to_their_device():
    """The upsampler is not a pipeline component (`pipe.to` and offloading leave it where it is), so it moves to
    the latents' device itself: here from the CPU to the `meta` device, which needs no accelerator."""
    upsampler = small_upsampler(4)
    out = upsample_learned(torch.empty(1, 4, 8, 8, device="meta"), upsampler)
    assert out.device.type == "meta" and out.shape == (1, 4, 16, 16)
    assert {p.device.type for p in upsampler.parameters()} == {"meta"}


# --- the pixel round trip -------------------------------------------------------------------------------------------
def flux_round_trip_by_hand(vae, latents: torch.Tensor) -> torch.Tensor:
    """FluxPipeline's decode (`latents / scaling_factor + shift_factor`), bicubic x2 of the image, clamped to the
    VAE's [-1, 1], encoded to the distribution's mode, and FLUX img2img's normalisation of that."""
    z = latents / 0.3611 + 0.1159
    image = vae.decode(z).sample
    resized = F.interpolate(image, scale_factor=2, mode="bicubic", align_corners=False)
    encoded = vae.encode(resized.clamp(-1, 1)).latent_dist.mode()
    return (encoded - 0.1159) * 0.3611


def test_pixel_round_trip_decodes_resizes_and_encodes_in_the_pipelines_latent_space(flux_pipe):
    """The pixel space: decode the pipeline's latent, bicubic x2 in pixel space, clamp to the VAE's range, encode
    (the distribution's mode, so it is deterministic) and normalise back, as FLUX's own pipelines do."""
    assert flux_pipe.vae.config.scaling_factor == 0.3611 and flux_pipe.vae.config.shift_factor == 0.1159
    latents = torch.randn(2, 4, 4, 6, generator=torch.Generator().manual_seed(0)) * 2
    with torch.no_grad():
        image = flux_pipe.vae.decode(latents / 0.3611 + 0.1159).sample
        assert image.amin() < -1 and image.amax() > 1  # the clamp matters for these latents
        out = pixel_round_trip(latents, flux_pipe, FluxAdapter())
        expected = flux_round_trip_by_hand(flux_pipe.vae, latents)
    assert out.shape == (2, 4, 8, 12) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected)


def test_pixel_round_trip_runs_the_vae_in_its_dtype_and_returns_the_latents_dtype(flux_pipe):
    """A VAE in another dtype than the latents (float64 here) gets its inputs in its dtype; the result comes back
    in the latents' dtype."""
    vae = build_tiny_flux_pipeline(seed=0).vae.to(torch.float64)
    pipe = SimpleNamespace(vae=vae)
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    with torch.no_grad():
        out = pixel_round_trip(latents, pipe, FluxAdapter())
        expected = flux_round_trip_by_hand(vae, latents.double())
    assert out.dtype == torch.bfloat16 and out.shape == (1, 4, 8, 8)
    torch.testing.assert_close(out, expected.to(torch.bfloat16))


@pytest.mark.parametrize("wrap", [False, True], ids=["latents output", "plain tuple"])
def test_pixel_round_trip_reads_the_latents_of_a_tiny_autoencoder(wrap):
    """An AutoencoderTiny's encode gives latents, not a distribution (`.latents`, or the first item of a plain
    tuple); its config has no shift or scale, so the pipeline's latent is the VAE's."""
    vae = tiny_autoencoder()
    pipe = SimpleNamespace(vae=TupleEncoder(vae) if wrap else vae)
    latents = torch.randn(1, 4, 4, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = pixel_round_trip(latents, pipe, Adapter())
        image = vae.decode(latents, return_dict=False)[0]
        expected = vae.encode(bicubic_x2(image).clamp(-1, 1)).latents
    assert out.shape == (1, 4, 8, 12)
    torch.testing.assert_close(out, expected)


def test_pixel_round_trip_of_a_video_resizes_each_frame_and_encodes_the_clip():
    """A video VAE's clip `(B, 3, frames, H, W)`: every frame is resized as an image, and the resized clip is
    encoded as one video (its temporal compression needs the whole clip), with Wan's per-channel normalisation."""
    torch.manual_seed(3)
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    ).eval()
    pipe = SimpleNamespace(vae=vae)
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    latents = torch.randn(1, 16, 2, 2, 3, generator=torch.Generator().manual_seed(3))  # 5 frames of 16x24 px
    with torch.no_grad():
        out = pixel_round_trip(latents, pipe, WanAdapter())
        clip = vae.decode(latents * std + mean).sample
        assert clip.shape == (1, 3, 5, 16, 24)
        resized = torch.stack([bicubic_x2(clip[:, :, f]) for f in range(clip.shape[2])], dim=2)
        encoded = vae.encode(resized.clamp(-1, 1)).latent_dist.mode()
        expected = (encoded - mean) / std
    assert out.shape == (1, 16, 2, 4, 6)
    torch.testing.assert_close(out, expected)


# --- scale_up: the space and the adapter's scaling space ------------------------------------------------------------
def test_scale_up_in_latent_space_interpolates_the_pipelines_latent(flux_pipe):
    """'latent' with a family that scales its own latent (FLUX.1): bicubic x2 of the latent as it is."""
    latents = torch.randn(2, 4, 6, 8)
    out = scale_up(latents, "latent", pipe=flux_pipe, adapter=FluxAdapter(), upsampler=small_upsampler(4))
    torch.testing.assert_close(out, bicubic_x2(latents), rtol=0, atol=0)


def test_scale_up_in_learned_space_runs_the_upsampler_on_the_pipelines_latent(flux_pipe):
    """'learned' with FLUX.1: the upsampler's output for the latent as it is, in the latents' dtype."""
    upsampler = small_upsampler(4)
    latents = torch.randn(2, 4, 6, 8).to(torch.bfloat16)
    with torch.no_grad():
        out = scale_up(latents, "learned", pipe=flux_pipe, adapter=FluxAdapter(), upsampler=upsampler)
        expected = upsampler(latents.float()).to(torch.bfloat16)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_scale_up_in_pixel_space_is_the_pixel_round_trip(flux_pipe):
    """'pixel' decodes, resizes and encodes (the upsampler, if any, is not used)."""
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = scale_up(latents, "pixel", pipe=flux_pipe, adapter=FluxAdapter(), upsampler=small_upsampler(4))
        expected = flux_round_trip_by_hand(flux_pipe.vae, latents)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("space", ["latent", "learned"])
def test_scale_up_of_a_video_latent_scales_each_frame(space):
    """A video latent `(B, C, frames, h, w)` in the latent spaces: each frame scaled as an image, frames kept."""
    upsampler = small_upsampler(16)
    latents = torch.randn(2, 16, 3, 4, 6)
    with torch.no_grad():
        out = scale_up(latents, space, pipe=None, adapter=WanAdapter(), upsampler=upsampler)
        scale = upsampler if space == "learned" else bicubic_x2
        expected = torch.stack([scale(latents[:, :, f]) for f in range(3)], dim=2)
    assert out.shape == (2, 16, 3, 8, 12)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("space", ["latent", "learned"])
def test_flux2_scales_in_the_vaes_own_latent_space(flux2_pipe, space):
    """FLUX.2 (`scale_in_vae_space`): the pipeline's BatchNorm-normalised latent is converted to the VAE's latent,
    scaled there, and converted back, returned in the latents' dtype. Scaling the normalised grid directly gives
    something else (each cell of a 2x2 patch has its own statistics)."""
    adapter = Flux2Adapter()
    upsampler = small_upsampler(32)
    latents = torch.randn(1, 32, 4, 6, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    seen = []
    handle = upsampler.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            out = scale_up(latents, space, pipe=flux2_pipe, adapter=adapter, upsampler=upsampler)
            vae_latents = adapter.latents_to_vae(flux2_pipe, latents)
            scale = upsampler if space == "learned" else bicubic_x2
            expected = adapter.vae_to_latents(flux2_pipe, scale(vae_latents))
            in_pipeline_space = scale(latents.float())
    finally:
        handle.remove()
    if space == "learned":
        torch.testing.assert_close(seen[0], vae_latents)
    assert out.shape == (1, 32, 8, 12) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected.to(torch.bfloat16), rtol=0, atol=0)
    assert not torch.allclose(out.float(), in_pipeline_space, atol=0.1)
