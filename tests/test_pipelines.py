"""The published pipeline names load patched stock pipelines from local folders."""

import diffusers
import pytest
import torch
from test_cogview4 import cogview4_call_kwargs
from test_flux import flux_call_kwargs
from test_sd import sd_call_kwargs
from test_sd3 import sd3_call_kwargs
from test_sdxl import sdxl_call_kwargs

import lssgen
import lssgen.pipelines
from lssgen import tiny

FAMILIES = [
    ("LSSFluxPipeline", "FluxPipeline", tiny.build_tiny_flux_pipeline, flux_call_kwargs),
    ("LSSStableDiffusion3Pipeline", "StableDiffusion3Pipeline", tiny.build_tiny_sd3_pipeline, sd3_call_kwargs),
    ("LSSStableDiffusionXLPipeline", "StableDiffusionXLPipeline", tiny.build_tiny_sdxl_pipeline, sdxl_call_kwargs),
    ("LSSStableDiffusionPipeline", "StableDiffusionPipeline", tiny.build_tiny_sd_pipeline, sd_call_kwargs),
    ("LSSCogView4Pipeline", "CogView4Pipeline", tiny.build_tiny_cogview4_pipeline, cogview4_call_kwargs),
]


@pytest.mark.parametrize(("name", "stock_name", "build", "call_kwargs"), FAMILIES, ids=[f[0] for f in FAMILIES])
def test_published_name_loads_a_patched_stock_pipeline(tmp_path, name, stock_name, build, call_kwargs):
    stock = build()
    stock.save_pretrained(tmp_path / "model")
    channels = lssgen.find_adapter(stock).latent_channels(stock)
    upsampler = lssgen.LatentUpsampler(channels, channels, block_out_channels=(32, 32), norm_num_groups=8)
    upsampler.save_pretrained(tmp_path / "up")

    loader = getattr(lssgen.pipelines, name)
    pipe = loader.from_pretrained(tmp_path / "model", latent_upsampler=tmp_path / "up", torch_dtype=torch.float32)
    assert type(pipe).__name__ == stock_name and isinstance(pipe, getattr(diffusers, stock_name))
    assert lssgen.is_patched(pipe) and isinstance(pipe._lssgen.upsampler, lssgen.LatentUpsampler)
    pipe.set_progress_bar_config(disable=True)
    # The published call arguments.
    kwargs = call_kwargs(pipe, num_inference_steps=8)
    image = pipe(**kwargs, start_sigma=0.75, shorten_intermediate_steps=True, min_resolution=128).images
    assert image.shape == (1, 3, 256, 256) and torch.isfinite(image).all()


def test_published_name_is_a_loader_not_a_pipeline():
    with pytest.raises(TypeError, match=r"LSSFluxPipeline.from_pretrained\(path, latent_upsampler=...\)"):
        lssgen.pipelines.LSSFluxPipeline()
