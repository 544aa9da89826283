"""Hypothesis profiles, and tiny saved models shared by the command-line tests.

Hypothesis: CI runs a fixed sample (the same every run, no example database); `HYPOTHESIS_PROFILE=thorough` explores
far more, with fresh random examples each run. The tiny models are built once per session (saving a pipeline takes
seconds).
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

from lssgen import LatentUpsampler
from lssgen.tiny import build_tiny_flux_pipeline

settings.register_profile(
    "ci", max_examples=40, derandomize=True, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("thorough", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module of tiny tensors: extra threads only add synchronisation, which on a shared
    2-core machine costs seconds. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
