"""`noise="shared"` (issue #27): every method re-noises from one field drawn at the target size once per call, read cell
by cell (a cell at its top-left corner), so a cell keeps its noise across stages. Checked on the tiny FLUX.1 (images)
and Wan (videos, the frame axis kept) pipelines against a field drawn independently from the same seeds."""

from __future__ import annotations

import pytest
import scipy.fft
import test_flux
import test_wan
import torch
import torch.nn.functional as F
from test_methods import record_latent_inputs

import lssgen
from lssgen.controller import noise_at_cells
from lssgen.scaling import frame_by_frame, scale_up

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: extra threads only add synchronisation

SEEDS = (51, 52)
THREE_STAGES = {"min_resolution": 64, "base_height": 256, "base_width": 256}


def run_and_capture(family, pipe, options: dict):
    """Generate a batch of two (a generator each) with `options`: the plan, and per stage the unpacked latents its
    first denoiser call received and those its last step ended on."""
    plan = lssgen.plan_for(pipe, 256, 256, 8, **options)
    adapter = lssgen.find_adapter(pipe)
    inputs, hook = record_latent_inputs(family.denoiser(pipe))
    ends = {}

    def on_step(pipeline, step, timestep, callback_kwargs):
        ends[step] = callback_kwargs["latents"].clone()
        return {}

    generators = [torch.Generator().manual_seed(seed) for seed in SEEDS]
    call = family.call_kwargs(pipe, prompts=["a fox", "a boat"], generator=generators, output_type="latent")
    family.images(pipe, **{**call, "height": 256, "width": 256, "num_inference_steps": 8}, **options,
                  callback_on_step_end=on_step)  # fmt: skip
    hook.remove()
    starts, finished = [], []
    for stage, end in zip(plan.stages, plan.stage_ends):
        first_call = (end - stage.num_denoiser_steps) * family.calls_per_step
        starts.append(adapter.denoiser_latents(pipe, inputs[first_call], stage))
        finished.append(adapter.unpack(pipe, ends[end - 1], stage.latent_height, stage.latent_width))
    return plan, starts, finished


def independent_field(shape) -> torch.Tensor:
    """The noise field the call should draw: each image's from its own generator, at the target size."""
    return torch.cat([torch.randn((1, *shape[1:]), generator=torch.Generator().manual_seed(s)) for s in SEEDS])


def scaled(pipe, latents, stage, following):
    """What the transition scales `latents` (the end of `stage`) to before re-noising: down (bottleneck) or x2 up."""
    if following.latent_height < stage.latent_height:
        size = (following.latent_height, following.latent_width)
        return frame_by_frame(lambda x: F.interpolate(x, size=size, mode="bicubic", antialias=True), latents)
    return scale_up(latents, "latent", pipe=pipe, adapter=lssgen.find_adapter(pipe), upsampler=None)


@pytest.mark.parametrize(
    "options",
    [THREE_STAGES, {"method": "refine"}, {"method": "bottleneck:steps=2/3/2"}],
    ids=["lssgen", "refine", "bottleneck"],
)
@pytest.mark.parametrize("family", [test_flux.TestFlux(), test_wan.TestWan()], ids=["flux", "wan"])
def test_every_stage_reads_the_one_field_at_its_cells(family, options):
    pipe = family.build_pipe(seed=0)
    pipe.set_progress_bar_config(disable=True)
    lssgen.patch(pipe, None, noise="shared")
    plan, starts, finished = run_and_capture(family, pipe, options)
    field = independent_field(starts[-1].shape)
    target = plan.stages[-1]
    noises = [starts[0]]  # text-to-image: the first stage starts from its noise itself
    torch.testing.assert_close(starts[0], noise_at_cells(field, *starts[0].shape[-2:]), rtol=0, atol=0)
    for stage, following, start, end in zip(plan.stages, plan.stages[1:], starts[1:], finished):
        sigma = following.first_sigma
        base = (1 - sigma) * scaled(pipe, end, stage, following)
        torch.testing.assert_close(start, base + sigma * field[..., :: target.latent_height // following.latent_height,
                                                               :: target.latent_width // following.latent_width],
                                   rtol=1e-4, atol=1e-4)  # fmt: skip
        noises.append((start - base) / sigma)
    # The property itself, on the noise each stage really got: at the same coordinate, the same value.
    for one, other in zip(noises, noises[1:]):
        small, big = sorted((one, other), key=lambda noise: noise.shape[-1])
        ratio = big.shape[-1] // small.shape[-1]
        torch.testing.assert_close(big[..., ::ratio, ::ratio], small, rtol=1e-3, atol=1e-3)


def test_spectral_fills_the_new_band_with_the_fields_coefficients_at_the_finer_grid():
    family = test_flux.TestFlux()
    pipe = family.build_pipe(seed=0)
    pipe.set_progress_bar_config(disable=True)
    lssgen.patch(pipe, None, noise="shared", method="spectral:delta=0.5")
    plan, starts, finished = run_and_capture(family, pipe, {})
    field = independent_field(starts[-1].shape).double().numpy()
    small, full = plan.stages
    reached = full.first_sigma / (2 - full.first_sigma)  # t_eff = 2 sigma / (1 + sigma), inverted
    torch.testing.assert_close(starts[0], torch.from_numpy(field[..., ::2, ::2]).float(), rtol=0, atol=0)
    coefficients = reached * scipy.fft.dctn(field, norm="ortho", axes=(-2, -1))  # the field's own, at full size
    low = finished[0].double().numpy()
    coefficients[..., : small.latent_height, : small.latent_width] = scipy.fft.dctn(low, norm="ortho", axes=(-2, -1))
    expected = scipy.fft.idctn(coefficients, norm="ortho", axes=(-2, -1)) * 2 / (1 + reached)
    torch.testing.assert_close(starts[1], torch.from_numpy(expected).float(), rtol=1e-4, atol=1e-4)


def test_shared_noise_changes_the_image_keeps_a_seed_and_off_is_stock():
    family = test_flux.TestFlux()
    pipe = family.build_pipe(seed=0)
    pipe.set_progress_bar_config(disable=True)
    stock = family.images(family.build_pipe(seed=0), **family.call_kwargs(pipe))
    lssgen.patch(pipe, None)
    fresh = family.images(pipe, **family.call_kwargs(pipe), **THREE_STAGES)
    shared = family.images(pipe, **family.call_kwargs(pipe), **THREE_STAGES, noise="shared")
    again = family.images(pipe, **family.call_kwargs(pipe), **THREE_STAGES, noise="shared")
    assert not torch.equal(fresh, shared) and torch.equal(shared, again)
    assert torch.equal(family.images(pipe, **family.call_kwargs(pipe), noise="shared", start_sigma=1.0), stock)


def test_an_unknown_noise_mode_is_refused_before_denoising():
    family = test_flux.TestFlux()
    pipe = family.build_pipe(seed=0)
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="`noise` must be one of 'fresh', 'shared', got 'same'"):
        lssgen.patch(pipe, None, noise="same")
    lssgen.patch(pipe, None)
    calls = []
    hook = family.denoiser(pipe).register_forward_pre_hook(lambda module, args: calls.append(1))
    with pytest.raises(ValueError, match="`noise` must be one of"):
        pipe(**family.call_kwargs(pipe), noise="same")
    hook.remove()
    assert not calls and pipe._lssgen.run is None


def test_noise_at_cells_reads_top_left_corners_and_refuses_an_uneven_grid():
    field = torch.arange(2 * 8 * 8, dtype=torch.float32).reshape(1, 2, 8, 8)
    cells = noise_at_cells(field, 2, 4)
    assert cells.shape == (1, 2, 2, 4) and cells[0, 1, 1, 3] == field[0, 1, 4, 6]
    with pytest.raises(ValueError, match="does not divide the 8x8 noise field evenly"):
        noise_at_cells(field, 3, 4)
