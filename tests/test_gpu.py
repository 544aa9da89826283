"""Checks that need a CUDA device; skipped on machines without one (CI has none)."""

import pytest
import torch
from test_flux import flux_call_kwargs

import lssgen
from lssgen.tiny import build_tiny_flux_pipeline

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_bfloat16_on_cuda_with_learned_upsampler_and_model_offload():
    pipe = build_tiny_flux_pipeline().to("cuda", torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    upsampler = lssgen.LatentUpsampler(4, 4, block_out_channels=(32, 32), norm_num_groups=8)
    lssgen.patch(pipe, upsampler.to("cuda", torch.bfloat16), min_resolution=64)
    kwargs = {**flux_call_kwargs(pipe), "generator": torch.Generator("cuda").manual_seed(0)}
    images = pipe(**kwargs).images
    assert images.shape == (1, 3, 256, 256) and torch.isfinite(images).all()

    pipe.to("cpu")
    pipe.enable_model_cpu_offload()
    kwargs["generator"] = torch.Generator("cuda").manual_seed(0)
    offloaded = pipe(**kwargs).images
    torch.testing.assert_close(offloaded.cpu(), images.cpu(), atol=2e-2, rtol=0)
