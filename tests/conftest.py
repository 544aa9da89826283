"""Tiny saved models shared by the command-line tests (built once per session: saving a pipeline takes seconds)."""

import pytest
import torch

from lssgen import LatentUpsampler
from lssgen.tiny import build_tiny_flux_pipeline


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory):
    """A random-weight FluxPipeline saved with `save_pretrained`, as a user's checkpoint folder is."""
    folder = tmp_path_factory.mktemp("tiny-flux")
    build_tiny_flux_pipeline(seed=0).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_upsampler_dir(tmp_path_factory):
    """A seeded `LatentUpsampler` for the tiny Flux VAE's 4 latent channels, saved like the released weights."""
    folder = tmp_path_factory.mktemp("tiny-upsampler")
    torch.manual_seed(0)
    LatentUpsampler(in_channels=4, out_channels=4, block_out_channels=(16, 16), norm_num_groups=8).save_pretrained(
        folder
    )
    return folder
