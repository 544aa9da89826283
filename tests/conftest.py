"""Hypothesis profiles, tiny saved models shared by the command-line tests, and taef2's weights for the tests
that need them.

Hypothesis: CI runs a fixed sample (the same every run, no example database); `HYPOTHESIS_PROFILE=thorough` explores
far more, with fresh random examples each run. The tiny models are built once per session (saving a pipeline takes
seconds).
"""

import os
from pathlib import Path

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

# Under pytest-xdist (`make test` runs two workers on a 2-core machine) each worker computes on one thread: two
# workers of two threads each would fight over the cores.
# The command-line tests' child processes inherit one thread too (measured: the subprocess-heavy files ran 8% faster
# on two workers than with two threads per child).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def in_ci() -> bool:
    """Whether the tests run under CI (the `CI` variable that CI services set; empty, 0 and false mean no)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false")


def taef2_or_skip(folder: str | Path | None = None) -> Path:
    """taef2's weights folder, as lssgen finds it (`find_taef2`: `folder`, else $LSSGEN_TAEF2, else
    ../shared/data/taef2). Without one a test skips on a developer's machine; under CI it fails, saying where it
    looked, so that the tests on real weights cannot silently drop out of a CI run."""
    from lssgen.autoencoders.flux2 import find_taef2

    try:
        return find_taef2(folder)
    except FileNotFoundError as error:
        if in_ci():
            pytest.fail(f"CI is set, so the tests on taef2's weights must run, but: {error}", pytrace=False)
        pytest.skip(f"needs taef2's weights: {error}")


@pytest.fixture(scope="session")
def taef2_dir() -> Path:
    """taef2's weights folder; skips the test without one, fails it under CI (`taef2_or_skip`)."""
    return taef2_or_skip()


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
