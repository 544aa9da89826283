"""Method 'bottleneck' (Bottleneck Sampling, issue #27): spelling its per-stage parameters, its plan against the
published FLUX.1-dev settings, and the method on the tiny pipeline of every flow family through a subset of the
adapter contract plus its own checks (off is stock, each stage's schedule as specified, the downscale and upscale
transitions with each image's own noise, bad input refused before anything is denoised)."""

from __future__ import annotations

import pytest
import test_chroma
import test_cogview4
import test_flux
import test_flux2
import test_qwenimage
import test_sd3
import test_wan
import test_zimage
import torch
import torch.nn.functional as F
from test_methods import PROMISE_TESTS, method_contract, record_latent_inputs

import lssgen
from lssgen.adapters.flux import flux_dev_scheduler
from lssgen.methods import Bottleneck, resolve_method
from lssgen.scaling import frame_by_frame, scale_up
from lssgen.tiny import build_tiny_flux_pipeline, build_tiny_sdxl_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: extra threads only add synchronisation


def shifted_linear(strength: float, steps: int, shift: float) -> list[float]:
    """The sigmas of a stage that starts at `strength` on the linear times to 0, under a static shift."""
    times = [strength * (1 - i / steps) for i in range(steps)]
    return [shift * t / (1 + (shift - 1) * t) for t in times]


# --- spelling and plan ----------------------------------------------------------------------------------------------
def test_bottleneck_parameters_are_one_value_per_stage():
    assert resolve_method("bottleneck") == Bottleneck(steps=None, strengths=(1.0, 0.8, 0.6), shifts=(9.0, 6.0, 9.0))
    given = resolve_method("bottleneck:steps=4/10/5,strengths=1/0.7/0.5,shifts=3/2/3")
    assert given == Bottleneck(steps=(4, 10, 5), strengths=(1.0, 0.7, 0.5), shifts=(3.0, 2.0, 3.0))
    assert given.spelling() == "bottleneck:steps=4/10/5,strengths=1.0/0.7/0.5,shifts=3.0/2.0/3.0"
    assert resolve_method(given.spelling()) == given
    for spelling, match in (
        ("bottleneck:steps=6/20", r"`steps` must be 3 values, one per stage"),
        ("bottleneck:steps=6/x/8", r"`steps` must be an int per stage, separated by `/` \(e.g. 6/20/8\), got '6/x/8'"),
        ("bottleneck:steps=6/0/8", "`steps` must be positive integers, got 6/0/8"),
        ("bottleneck:strengths=0.9/0.8/0.6", r"`strengths` must be in \(0, 1\], the first 1"),
        ("bottleneck:strengths=1/1.2/0.6", r"`strengths` must be in \(0, 1\]"),
        ("bottleneck:shifts=9/0/9", "`shifts` must be positive"),
    ):
        with pytest.raises(ValueError, match=match):
            resolve_method(spelling)


def test_the_default_plan_is_the_published_flux_one():
    """FLUX.1-dev, 1024 px, 50 steps: 1024 -> 512 -> 1024 px in 6, 20 and 8 steps, each stage's sigmas the linear
    times from its strength (1, 0.8, 0.6) under its static shift (9, 6, 9); at 20 steps the stage steps scale."""
    pipe = build_tiny_flux_pipeline(seed=0)
    pipe.scheduler = flux_dev_scheduler()
    lssgen.patch(pipe, None)
    plan = lssgen.plan_for(pipe, 1024, 1024, 50, method="bottleneck")
    assert [(s.height, s.width, s.num_denoiser_steps) for s in plan.stages] == [
        (1024, 1024, 6),
        (512, 512, 20),
        (1024, 1024, 8),
    ]
    for stage, (strength, shift) in zip(plan.stages, ((1.0, 9.0), (0.8, 6.0), (0.6, 9.0))):
        expected = shifted_linear(strength, stage.num_denoiser_steps, shift)
        assert [t / 1000 for t in stage.timesteps] == pytest.approx(expected, abs=1e-6)
        assert stage.first_sigma == pytest.approx(expected[0])
    assert plan.stages[1].first_sigma == pytest.approx(0.96) and plan.stages[2].first_sigma == pytest.approx(
        0.931, abs=1e-3
    )
    short = lssgen.plan_for(pipe, 1024, 1024, 20, method="bottleneck")
    assert [s.num_denoiser_steps for s in short.stages] == [2, 8, 3]
    assert "down: antialiased bicubic in latent space; up: latent interpolation" in plan.describe()


def test_bottleneck_refuses_diffusion_families():
    with pytest.raises(ValueError, match="method 'bottleneck' needs a flow-matching pipeline"):
        lssgen.patch(build_tiny_sdxl_pipeline(seed=0), None, method="bottleneck")


# --- on every flow family -------------------------------------------------------------------------------------------
BAD_BOTTLENECK_CALLS = [
    ({"method": "bottleneck:steps=2/2"}, ValueError, "`steps` must be 3 values"),
    ({"method": "bottleneck:strengths=0.5/0.5/0.5"}, ValueError, "the first 1"),
    ({"method": "bottleneck", "min_resolution": 64}, ValueError, "`min_resolution` .* does not apply to method"),
    ({"method": "bottleneck", "height": 16, "width": 16}, ValueError, "runs a stage at half the size"),
    ({"method": "bottleneck", "scaling_space": "learned"}, ValueError, "needs a latent upsampler"),
]


class BottleneckContract:
    """`bottleneck` on a family's tiny pipeline (mixed into a subclass of the family's contract class)."""

    method = "bottleneck:steps=2/3/2"

    def bottleneck_call(self, pipe, **overrides):
        return self.call_kwargs(pipe, **{"output_type": "latent", **overrides})

    def test_bottleneck_off_is_the_stock_pipeline(self, pipe):
        stock = self.build_pipe(seed=0)
        stock.set_progress_bar_config(disable=True)
        expected = self.images(stock, **self.bottleneck_call(stock))
        lssgen.patch(pipe, None, method=self.method)
        assert torch.equal(self.images(pipe, **self.bottleneck_call(pipe), start_sigma=1.0), expected)

    def test_bottleneck_stages_scale_down_then_up_renoising_each_image_with_its_own_noise(self, pipe):
        """Each stage's denoiser calls are told its shifted linear sigmas; the half-size stage starts from the first
        stage's result resized down (antialiased bicubic) and re-noised, the last from the half-size result scaled
        up x2 (latent space) and re-noised, for a batch of two with a generator each."""
        lssgen.patch(pipe, None, method=self.method)
        plan = self.plan(pipe)
        first, low, last = plan.stages
        ends = {}
        stage_ends = {first.num_denoiser_steps - 1: 0, first.num_denoiser_steps + low.num_denoiser_steps - 1: 1}

        def on_step(pipeline, step, timestep, callback_kwargs):
            if step in stage_ends:
                ends[stage_ends[step]] = callback_kwargs["latents"].clone()
            return {}

        inputs, hook = record_latent_inputs(self.denoiser(pipe))
        records, handle = self.trace(pipe)
        seeds = (41, 42)
        call = self.bottleneck_call(
            pipe, prompts=["a fox", "a boat"], generator=[torch.Generator().manual_seed(s) for s in seeds]
        )
        self.images(pipe, **call, callback_on_step_end=on_step)
        hook.remove()
        handle.remove()

        # CogView4 tells the noise level by its time shift at the stage's own size.
        sizes = [(stage.height, stage.width) for stage in plan.stages for _ in stage.timesteps]
        told = [self.noise_level(pipe, r["timestep"], *size) for r, size in zip(records[:: self.calls_per_step], sizes)]
        expected_sigmas = [
            sigma
            for stage, strength, shift in zip(plan.stages, (1.0, 0.8, 0.6), (9.0, 6.0, 9.0))
            for sigma in shifted_linear(strength, stage.num_denoiser_steps, shift)
        ]
        assert told == pytest.approx(expected_sigmas, abs=1.1e-3)  # Wan's scheduler casts timesteps to integers

        adapter = lssgen.find_adapter(pipe)
        full_end = adapter.unpack(pipe, ends[0], first.latent_height, first.latent_width)
        low_end = adapter.unpack(pipe, ends[1], low.latent_height, low.latent_width)
        down = frame_by_frame(
            lambda x: F.interpolate(x, size=(low.latent_height, low.latent_width), mode="bicubic", antialias=True),
            full_end,
        )
        up = scale_up(low_end, "latent", pipe=pipe, adapter=adapter, upsampler=None)
        low_noise, last_noise = [], []
        for seed in seeds:
            generator = torch.Generator().manual_seed(seed)
            torch.randn((1, *full_end.shape[1:]), generator=generator)  # the image's first-stage noise
            low_noise.append(torch.randn((1, *down.shape[1:]), generator=generator))
            last_noise.append(torch.randn((1, *up.shape[1:]), generator=generator))
        for stage, scaled, noise in ((low, down, low_noise), (last, up, last_noise)):
            expected = (1 - stage.first_sigma) * scaled + stage.first_sigma * torch.cat(noise)
            index = (plan.stage_ends[stage.index] - stage.num_denoiser_steps) * self.calls_per_step
            started = adapter.denoiser_latents(pipe, inputs[index], stage)
            torch.testing.assert_close(started[:2], expected, rtol=1e-4, atol=1e-4)

    def test_bottleneck_bad_input_is_refused_before_denoising(self, pipe):
        stock_scheduler = pipe.scheduler
        lssgen.patch(pipe, None)
        before = self.images(pipe, **self.bottleneck_call(pipe), method=self.method)
        calls = []
        hook = self.denoiser(pipe).register_forward_pre_hook(lambda module, args: calls.append(1))
        for options, error, match in BAD_BOTTLENECK_CALLS:
            with pytest.raises(error, match=match):
                pipe(**{**self.bottleneck_call(pipe), **options})
        hook.remove()
        assert not calls and pipe.scheduler is stock_scheduler and pipe._lssgen.run is None
        assert torch.equal(self.images(pipe, **self.bottleneck_call(pipe), method=self.method), before)

    def test_an_interrupt_in_the_full_size_first_stage_leaves_the_latent_at_its_size(self, pipe):
        lssgen.patch(pipe, None, method=self.method)

        def stop(pipeline, step, timestep, callback_kwargs):
            pipeline._interrupt = True
            return {}

        images = self.images(pipe, **self.call_kwargs(pipe), callback_on_step_end=stop)
        assert images.shape == self.output_shape(1, self.height, self.width)


def bottleneck_contract(family: type, **attributes) -> type:
    trace_cases = [
        (128, 128, 4, {"method": "bottleneck:steps=2/3/2"}),
        (64, 128, 10, {"method": "bottleneck"}),  # the default steps: 1/4/2 of 10
    ]
    # The cache matrix with a longer middle stage: in the contract's 3-step one, TaylorSeer's and FasterCache's skip
    # patterns find no step to reuse on.
    attributes.setdefault("cache_calls", ({"method": "bottleneck:steps=2/8/3", "num_inference_steps": 13},))
    return method_contract(family, BottleneckContract, BottleneckContract.method, trace_cases=trace_cases, **attributes)


TestBottleneckFlux = bottleneck_contract(test_flux.TestFlux, keep=PROMISE_TESTS)
TestBottleneckFlux2 = bottleneck_contract(test_flux2.TestFlux2)
TestBottleneckSD3 = bottleneck_contract(test_sd3.TestSD3)
TestBottleneckChroma = bottleneck_contract(test_chroma.TestChroma)
TestBottleneckCogView4 = bottleneck_contract(test_cogview4.TestCogView4)
TestBottleneckQwenImage = bottleneck_contract(test_qwenimage.TestQwenImage)
TestBottleneckZImage = bottleneck_contract(test_zimage.TestZImage)
TestBottleneckWan = bottleneck_contract(test_wan.TestWan)
