"""Each adapter's latent packing and VAE-space normalisation against the stock pipeline's own functions.

The stages move latents between three layouts: the loop's (FLUX-style 2x2-packed tokens), the unpacked
`(B, C, h, w)` grid the upsampler and interpolation work on, and the VAE's own latent (what `vae.decode` takes and
`vae.encode` gives). Here every family's adapter (the one `lssgen.patch` picks for the pipe) is checked against what
the stock pipeline does: its `_pack_latents`/`_unpack_latents`, the layout of its `prepare_latents` noise, its
img2img/inpaint `_encode_vae_image`, and the decode formula of its `__call__` (written out per family below from the
VAE config: `scaling_factor`, `shift_factor`, `latents_mean`/`latents_std`, FLUX.2's BatchNorm statistics).

The tiny random-weight pipelines are built once per module, on demand.
"""

from __future__ import annotations

import copy
import types

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lssgen.adapters import find_adapter
from lssgen.tiny import build_tiny_flux2_pipeline, build_tiny_flux_pipeline, build_tiny_sd_pipeline
from lssgen.tiny.chroma import build_tiny_chroma_pipeline
from lssgen.tiny.cogview4 import build_tiny_cogview4_pipeline
from lssgen.tiny.qwenimage import build_tiny_qwenimage_pipeline
from lssgen.tiny.sd3 import build_tiny_sd3_pipeline
from lssgen.tiny.sdxl import build_tiny_sdxl_pipeline
from lssgen.tiny.wan import build_tiny_wan_pipeline
from lssgen.tiny.zimage import build_tiny_zimage_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")


def build_cogview4():
    # The tiny CogView4 VAE has scaling_factor 1.0 and no shift, which would hide any mix-up; CogView4Pipeline
    # decodes `latents / scaling_factor` and ignores a `shift_factor`, so give it both, non-trivial.
    pipe = build_tiny_cogview4_pipeline()
    pipe.vae.register_to_config(scaling_factor=0.7, shift_factor=0.2)
    return pipe


def build_sd3():
    # StableDiffusion3Pipeline decodes `latents / scaling_factor + shift_factor` even when the config also holds
    # per-channel statistics (which `LatentNormalization.from_vae_config` would prefer).
    pipe = build_tiny_sd3_pipeline()
    pipe.vae.register_to_config(latents_mean=[0.5] * 16, latents_std=[2.0] * 16)
    return pipe


BUILDERS = {
    "flux": build_tiny_flux_pipeline,
    "chroma": build_tiny_chroma_pipeline,
    "flux2": build_tiny_flux2_pipeline,
    "qwenimage": build_tiny_qwenimage_pipeline,
    "sd3": build_sd3,
    "zimage": build_tiny_zimage_pipeline,
    "cogview4": build_cogview4,
    "sd": build_tiny_sd_pipeline,
    "sdxl": build_tiny_sdxl_pipeline,
    "playground": lambda: build_tiny_sdxl_pipeline(playground=True),
    "wan": build_tiny_wan_pipeline,
}
FLUX_PACKED = ["flux", "chroma", "qwenimage"]  # FluxPipeline's 2x2 `_pack_latents`


@pytest.fixture(scope="module")
def pipes():
    """`pipes(name)`: the tiny stock pipeline of a family, built on first use and kept for the module."""
    built = {}

    def get(name):
        if name not in built:
            built[name] = BUILDERS[name]()
        return built[name]

    return get


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def channel_view(values, ndim):
    """A config list as a `(1, C, 1, ...)` tensor for latents of `ndim` dims."""
    return torch.tensor(values, dtype=torch.float32).view(1, -1, *([1] * (ndim - 2)))


def stock_decode_input(name, pipe, latents):
    """What the stock pipeline's `__call__` hands `vae.decode` for its unpacked (B, C, h, w) latents (B, C, f, h, w
    for Wan), written out from diffusers 0.42's pipelines."""
    config = pipe.vae.config
    if name in ("flux", "chroma", "sd3", "zimage"):  # e.g. pipeline_flux.py: latents / scaling_factor + shift_factor
        return latents / config.scaling_factor + config.shift_factor
    if name in ("cogview4", "sd", "sdxl"):  # latents / scaling_factor
        return latents / config.scaling_factor
    if name == "playground":  # pipeline_stable_diffusion_xl.py with latents_mean/std
        mean, std = channel_view(config.latents_mean, 4), channel_view(config.latents_std, 4)
        return latents * std / config.scaling_factor + mean
    if name in ("qwenimage", "wan"):  # latents / (1 / latents_std) + latents_mean, on (B, C, frames, h, w)
        video = latents[:, :, None] if name == "qwenimage" else latents
        mean, std = channel_view(config.latents_mean, 5), channel_view(config.latents_std, 5)
        return video / (1.0 / std) + mean
    if name == "flux2":  # pipeline_flux2.py: BatchNorm statistics on the 2x2-patchified latent
        patches = pipe._patchify_latents(latents)
        bn = pipe.vae.bn
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + config.batch_norm_eps)
        return pipe._unpatchify_latents(patches * std + bn.running_mean.view(1, -1, 1, 1))
    raise AssertionError(name)


def unpacked_shape(name, pipe, batch, height, width):
    """The adapter's unpacked latent shape for `height` x `width` latent cells (Wan: 3 latent frames)."""
    channels = {"flux": 4, "chroma": 4, "flux2": 32, "sd": 4, "sdxl": 4, "playground": 4}.get(name, 16)
    if name == "wan":
        return (batch, channels, 3, height, width)
    return (batch, channels, height, width)


def fake_vae_self(pipe, vae_latent, **extra):
    """A stand-in `self` for a stock `_encode_vae_image` whose VAE encodes to `vae_latent` exactly (what
    `retrieve_latents` reads from an output with `.latents`), with the pipe's VAE config."""
    output = types.SimpleNamespace(latents=vae_latent)
    vae = types.SimpleNamespace(config=pipe.vae.config, encode=lambda image: output, **extra)
    return types.SimpleNamespace(vae=vae)


# --------------------------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------------------------


def test_each_pipeline_gets_its_familys_adapter(pipes):
    """The adapters below are the ones `lssgen.patch` picks for each stock pipeline."""
    for name in BUILDERS:
        expected = {"playground": "sdxl"}.get(name, name)
        assert find_adapter(pipes(name)).name == expected


@pytest.mark.parametrize("name", FLUX_PACKED)
def test_flux_style_pack_is_the_layout_of_the_pipelines_own_noise(pipes, name):
    """`pack` lays an unpacked latent out exactly as `prepare_latents` lays out the noise it draws (row-major 2x2
    patches, channels fastest), and `unpack` recovers the drawn noise: non-square, batch 2."""
    pipe, batch, height, width = pipes(name), 2, 6, 10  # latent cells: a 48x80 px image
    adapter = find_adapter(pipe)
    channels = adapter.latent_channels(pipe)
    packed = pipe.prepare_latents(
        batch, channels, height * 8, width * 8, torch.float32, "cpu", torch.Generator().manual_seed(3)
    )
    packed = packed[0] if isinstance(packed, tuple) else packed
    shape = (batch, 1, channels, height, width) if name == "qwenimage" else (batch, channels, height, width)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(3)).reshape(batch, channels, height, width)
    assert packed.shape == (batch, (height // 2) * (width // 2), channels * 4)
    assert torch.equal(adapter.pack(pipe, noise), packed)
    assert torch.equal(adapter.unpack(pipe, packed, height, width), noise)


@pytest.mark.parametrize("name", FLUX_PACKED)
def test_flux_style_unpack_is_the_pipelines_unpack(pipes, name):
    """`unpack` is the pipeline's `_unpack_latents` for a stage of that size (Qwen-Image's frame axis dropped)."""
    pipe = pipes(name)
    adapter = find_adapter(pipe)
    tokens = randn(1, 3 * 4, adapter.latent_channels(pipe) * 4)  # a 6x8-cell latent, 48x64 px
    stock = pipe._unpack_latents(tokens, 48, 64, pipe.vae_scale_factor)
    if name == "qwenimage":
        stock = stock[:, :, 0]
    assert torch.equal(adapter.unpack(pipe, tokens, 6, 8), stock)


@pytest.mark.parametrize("name", [*FLUX_PACKED, "flux2"])
@given(batch=st.integers(1, 3), half_height=st.integers(1, 6), half_width=st.integers(1, 6), seed=st.integers(0, 99))
def test_unpack_inverts_pack(pipes, name, batch, half_height, half_width, seed):
    """Packing and unpacking lose nothing, for any batch and any even latent size, square or not."""
    pipe = pipes(name)
    adapter = find_adapter(pipe)
    height, width = 2 * half_height, 2 * half_width
    latents = randn(*unpacked_shape(name, pipe, batch, height, width), seed=seed)
    packed = adapter.pack(pipe, latents)
    assert packed.shape == (batch, half_height * half_width, latents.shape[1] * 4)
    assert torch.equal(adapter.unpack(pipe, packed, height, width), latents)
    assert torch.equal(adapter.pack(pipe, adapter.unpack(pipe, packed, height, width)), packed)


def test_flux2_pack_is_the_layout_of_the_pipelines_own_noise(pipes):
    """FLUX.2's `prepare_latents` draws patchified noise `(B, 128, h/2, w/2)` and packs it into tokens: `pack` of the
    unpatchified noise gives those tokens, contiguous like the scheduler's output, and `unpack` gives it back."""
    pipe, batch, height, width = pipes("flux2"), 2, 6, 10
    adapter = find_adapter(pipe)
    packed, ids = pipe.prepare_latents(
        batch, 32, height * 8, width * 8, torch.float32, "cpu", torch.Generator().manual_seed(4)
    )
    noise = pipe._unpatchify_latents(
        torch.randn(batch, 128, height // 2, width // 2, generator=torch.Generator().manual_seed(4))
    )
    ours = adapter.pack(pipe, noise)
    assert torch.equal(ours, packed)
    assert ours.is_contiguous()
    assert torch.equal(adapter.unpack(pipe, packed, height, width), noise)
    # The pipeline's own unpacking scatters tokens by their position ids; `unpack` agrees with it.
    by_ids = torch.stack(list(pipe._unpack_latents_with_ids(packed, ids)))
    assert torch.equal(adapter.unpack(pipe, packed, height, width), pipe._unpatchify_latents(by_ids))


@pytest.mark.parametrize("name", ["sd3", "zimage", "cogview4", "sd", "sdxl", "wan"])
def test_unpacked_families_keep_the_latent_as_it_is(pipes, name):
    """Families whose loop carries the `(B, C, h, w)` grid itself (a video's `(B, C, f, h, w)`) pack to it."""
    pipe = pipes(name)
    adapter = find_adapter(pipe)
    latents = randn(*unpacked_shape(name, pipe, 2, 6, 10))
    assert adapter.pack(pipe, latents) is latents
    assert adapter.unpack(pipe, latents, 6, 10) is latents


# --------------------------------------------------------------------------------------------------------------
# VAE-space normalisation
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BUILDERS))
def test_latents_to_vae_is_what_the_pipeline_decodes(pipes, name):
    """`latents_to_vae` of an unpacked latent is what the stock pipeline passes to `vae.decode` (float32; Qwen-Image's
    with its single frame axis), and `vae_to_latents` undoes it."""
    pipe = pipes(name)
    adapter = find_adapter(pipe)
    latents = randn(*unpacked_shape(name, pipe, 2, 6, 10), seed=1)
    expected = stock_decode_input(name, pipe, latents)
    vae_latents = adapter.latents_to_vae(pipe, latents)
    assert vae_latents.dtype == torch.float32
    assert vae_latents.shape == expected.shape
    torch.testing.assert_close(vae_latents, expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(vae_latents, latents.reshape(expected.shape))  # the normalisation is not trivial here
    torch.testing.assert_close(adapter.vae_to_latents(pipe, expected), latents, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_normalisation_is_computed_in_float32(pipes, name):
    """Half-precision latents are normalised in float32 (the result the VAE decodes, and the latent the upsampler
    scales, are float32 whatever the loop's dtype)."""
    pipe = pipes(name)
    adapter = find_adapter(pipe)
    latents = randn(*unpacked_shape(name, pipe, 1, 4, 6), seed=2).bfloat16()
    vae_latents = adapter.latents_to_vae(pipe, latents)
    assert vae_latents.dtype == torch.float32
    torch.testing.assert_close(vae_latents, stock_decode_input(name, pipe, latents.float()), rtol=1e-6, atol=1e-6)
    back = adapter.vae_to_latents(pipe, vae_latents.bfloat16())
    assert back.dtype == torch.float32


@pytest.mark.parametrize(
    ("name", "stock"),
    [
        ("flux", "diffusers.pipelines.flux.pipeline_flux_img2img.FluxImg2ImgPipeline"),
        ("chroma", "diffusers.pipelines.chroma.pipeline_chroma_img2img.ChromaImg2ImgPipeline"),
        (
            "sd3",
            "diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3_inpaint.StableDiffusion3InpaintPipeline",
        ),
        ("sd", "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint.StableDiffusionInpaintPipeline"),
        ("qwenimage", "diffusers.pipelines.qwenimage.pipeline_qwenimage_img2img.QwenImageImg2ImgPipeline"),
    ],
)
def test_vae_to_latents_is_the_stock_image_encoding(pipes, name, stock):
    """`vae_to_latents` normalises a VAE latent as the family's stock img2img/inpaint pipeline does in its
    `_encode_vae_image` (Qwen-Image's VAE latent has a frame axis, which goes; a frame-less one works too)."""
    import importlib

    module, _, cls = stock.rpartition(".")
    encode = getattr(importlib.import_module(module), cls)._encode_vae_image
    pipe = pipes(name)
    adapter = find_adapter(pipe)
    shape = unpacked_shape(name, pipe, 2, 6, 10)
    vae_latent = randn(shape[0], shape[1], 1, *shape[2:], seed=5) if name == "qwenimage" else randn(*shape, seed=5)
    expected = encode(fake_vae_self(pipe, vae_latent), torch.zeros(2, 3, 48, 80), None)
    if name == "qwenimage":
        expected = expected[:, :, 0]
        torch.testing.assert_close(adapter.vae_to_latents(pipe, vae_latent[:, :, 0]), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(adapter.vae_to_latents(pipe, vae_latent), expected, rtol=1e-6, atol=1e-6)


def test_flux2_vae_to_latents_is_the_pipelines_image_encoding(pipes):
    """FLUX.2's `vae_to_latents` is its pipeline's `_encode_vae_image` normalisation (BatchNorm statistics on the
    patchified latent), unpatchified: the layout `pack` takes."""
    from diffusers import Flux2Pipeline

    pipe = pipes("flux2")
    adapter = find_adapter(pipe)
    vae_latent = randn(2, 32, 6, 10, seed=6)
    fake = fake_vae_self(pipe, vae_latent, bn=pipe.vae.bn)
    fake._patchify_latents = pipe._patchify_latents
    expected = Flux2Pipeline._encode_vae_image(fake, torch.zeros(2, 3, 48, 80), None)
    torch.testing.assert_close(pipe._patchify_latents(adapter.vae_to_latents(pipe, vae_latent)), expected)


def test_flux2_normalisation_is_the_vaes_own_batch_norm(pipes):
    """The statistics are those of the VAE's BatchNorm (per channel of the 2x2-patchified latent, variance plus the
    config's `batch_norm_eps`): `vae_to_latents` is the BatchNorm layer itself in eval mode, the tiny VAE's
    statistics being non-trivial (means -0.6..0.4, variances 2.5..0.25)."""
    pipe = pipes("flux2")
    adapter = find_adapter(pipe)
    bn = pipe.vae.bn
    assert not bn.affine and bn.eps == pipe.vae.config.batch_norm_eps
    vae_latent = randn(2, 32, 6, 10, seed=7)
    was_training = bn.training
    bn.eval()
    try:
        with torch.no_grad():
            expected = pipe._unpatchify_latents(bn(pipe._patchify_latents(vae_latent)))
    finally:
        bn.train(was_training)
    torch.testing.assert_close(adapter.vae_to_latents(pipe, vae_latent), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_flux2_statistics_are_used_in_float32_whatever_the_vaes_dtype(pipes, dtype):
    """With the VAE in bfloat16 (as FLUX.2 is usually run) or float64, its BatchNorm buffers are too; the
    normalisation still computes `sqrt(var + eps)` and the rest in float32 and returns float32, so a latent goes to
    the VAE's space and back with float32 accuracy, not bfloat16's."""
    pipe = pipes("flux2")
    adapter = find_adapter(pipe)
    vae = copy.deepcopy(pipe.vae).to(dtype)
    assert vae.bn.running_var.dtype == dtype
    other = types.SimpleNamespace(
        vae=vae, _patchify_latents=pipe._patchify_latents, _unpatchify_latents=pipe._unpatchify_latents
    )
    latents = randn(2, 32, 6, 10, seed=8)
    patches = pipe._patchify_latents(latents.double())
    mean = vae.bn.running_mean.double().view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.double().view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    expected = pipe._unpatchify_latents(patches * std + mean)
    vae_latents = adapter.latents_to_vae(other, latents)
    assert vae_latents.dtype == torch.float32
    torch.testing.assert_close(vae_latents.double(), expected, rtol=1e-6, atol=1e-6)
    back = adapter.vae_to_latents(other, expected.float())
    assert back.dtype == torch.float32
    torch.testing.assert_close(back, latents, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["flux2", "qwenimage", "wan", "playground", "flux"])
def test_normalisation_follows_the_latents_device(pipes, name):
    """The VAE's statistics are moved to the latent's device (a VAE offloaded to the CPU while the latents are on
    the accelerator): on the `meta` device here, shapes come out right and no device clash is raised."""
    pipe = pipes(name)
    adapter = find_adapter(pipe)
    latents = torch.empty(unpacked_shape(name, pipe, 2, 6, 10), device="meta")
    vae_latents = adapter.latents_to_vae(pipe, latents)
    assert vae_latents.device.type == "meta"
    assert vae_latents.shape == stock_decode_input(name, pipe, torch.zeros(latents.shape)).shape
    assert adapter.vae_to_latents(pipe, vae_latents).shape == latents.shape


@pytest.mark.parametrize("name", [name for name in BUILDERS if name != "flux2"])
def test_latent_normalization_reads_the_stock_pipelines_statistics(pipes, name):
    """`latent_normalization` (what the pixel round trip and the encode path use) holds the statistics the stock
    pipeline decodes with: shift and scale, scale only, or per-channel mean and std (FLUX.2 has BatchNorm statistics
    instead and is checked above)."""
    pipe = pipes(name)
    config = pipe.vae.config
    norm = find_adapter(pipe).latent_normalization(pipe)
    if name in ("flux", "chroma", "sd3", "zimage"):
        expected = (config.shift_factor, 1.0, config.scaling_factor)
    elif name in ("cogview4", "sd", "sdxl"):
        expected = (0.0, 1.0, config.scaling_factor)
    else:  # per-channel statistics: Playground v2.5 with its scaling factor, Qwen-Image and Wan without one
        scale = config.scaling_factor if name == "playground" else 1.0
        expected = (tuple(config.latents_mean), tuple(config.latents_std), scale)
    assert (norm.mean, norm.std, norm.scale) == expected
