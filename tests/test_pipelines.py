"""The published pipeline names load patched stock pipelines from local folders."""

import pytest
import torch
from diffusers import FluxPipeline

import lssgen
from lssgen.pipelines import LSSFluxPipeline
from lssgen.tiny import build_tiny_flux_pipeline


def test_published_name_loads_a_patched_stock_pipeline(tmp_path):
    build_tiny_flux_pipeline().save_pretrained(tmp_path / "model")
    lssgen.LatentUpsampler(4, 4, block_out_channels=(32, 32), norm_num_groups=8).save_pretrained(tmp_path / "up")

    pipe = LSSFluxPipeline.from_pretrained(
        tmp_path / "model", latent_upsampler=tmp_path / "up", torch_dtype=torch.float32
    )
    assert isinstance(pipe, FluxPipeline) and lssgen.is_patched(pipe)
    assert isinstance(pipe._lssgen.upsampler, lssgen.LatentUpsampler)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "a fox",
        height=256,
        width=256,
        num_inference_steps=4,
        max_sequence_length=32,
        start_sigma=0.75,
        shorten_intermediate_steps=True,
        min_resolution=128,
        output_type="pt",
    ).images
    assert image.shape == (1, 3, 256, 256)


def test_published_name_is_a_loader_not_a_pipeline():
    with pytest.raises(TypeError, match=r"LSSFluxPipeline.from_pretrained\(path, latent_upsampler=...\)"):
        LSSFluxPipeline()
