"""The stage switch (lssgen.controller): at the end of each low-resolution stage the latent is unpacked, scaled up x2,
re-noised with fresh noise from the call's generator to the noise level the next stage starts from, and packed; an
interrupt scales the latent to the target size without noise; the user's step-end callback runs first. The
controller is driven here directly, as the stock denoising loop calls it, on stage plans of real schedulers and the
tiny FLUX.1 pipeline's packing."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback, SD3CFGCutoffCallback
from hypothesis import given
from hypothesis import strategies as st

from lssgen import LatentUpsampler
from lssgen.adapters.flux import FluxAdapter
from lssgen.adapters.sd import SDAdapter
from lssgen.controller import Run, StageSwitchCallback, chain_callbacks
from lssgen.plan import plan_stages
from lssgen.schedule import StagedScheduler
from lssgen.tiny import build_tiny_flux_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

BATCH = 2


class CacheRecorder:
    """Stands in for the call's `StageCacheSchedules`: records the stages it is told start."""

    def __init__(self):
        self.started = []

    def start(self, stage):
        self.started.append(stage.index)

    def restore(self):
        pass


class BarRecorder:
    """Stands in for the pipeline's tqdm bar: records its postfix."""

    def __init__(self):
        self.postfixes = []

    def set_postfix_str(self, text, refresh=True):
        self.postfixes.append((text, refresh))


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_flux_pipeline(seed=0)


def flux_plan(pipe):
    """Three stages of FLUX.1's dynamically shifted schedule for 384x256 (oblong, so width and height differ):
    latents 12x8, 24x16, 48x32; 8 steps, the later stages truncated to start_sigma 0.75."""
    return plan_stages(
        256,
        384,
        8,
        scheduler=pipe.scheduler,
        facts=FluxAdapter(),
        vae_scale_factor=8,
        min_resolution=64,
        shorten_intermediate_steps=False,
    )


def make_run(pipe, *, seed=0, space="latent", upsampler=None, plan=None, generator=None) -> Run:
    plan = plan or flux_plan(pipe)
    return Run(
        pipe=pipe,
        adapter=FluxAdapter(),
        plan=plan,
        scheduler=StagedScheduler(plan, pipe.scheduler),
        scaling_space=space,
        upsampler=upsampler,
        generator=torch.Generator().manual_seed(seed) if generator is None else generator,
        batch=BATCH,
        caches=CacheRecorder(),
    )


def packed(pipe, stage, seed=1) -> torch.Tensor:
    """Packed FLUX.1 latents of `stage`'s size: `(B, h/2 * w/2, 16)` tokens."""
    latents = torch.randn(
        BATCH, 4, stage.latent_height, stage.latent_width, generator=torch.Generator().manual_seed(seed)
    )
    return FluxAdapter().pack(pipe, latents)


def bicubic_x2(x):
    return F.interpolate(x.float(), scale_factor=2, mode="bicubic", align_corners=False)


def first_sigma_seen(run: Run, stage_index: int) -> float:
    """The sigma of the first step the denoising loop runs in stage `stage_index` (the staged scheduler's schedule,
    which the stock loop steps through)."""
    return float(run.scheduler.sigmas[run.plan.stage_ends[stage_index - 1]])


def diffusion_run(scheduler, seed=0) -> Run:
    """A two-stage SD plan (192x128, then 384x256, 10 steps, the img2img rule) on `scheduler`."""
    plan = plan_stages(
        256,
        384,
        10,
        scheduler=scheduler,
        facts=SDAdapter(),
        vae_scale_factor=8,
        min_resolution=128,
        shorten_intermediate_steps=False,
    )
    return Run(
        pipe=None,
        adapter=SDAdapter(),
        plan=plan,
        scheduler=StagedScheduler(plan, scheduler),
        scaling_space="latent",
        upsampler=None,
        generator=torch.Generator().manual_seed(seed),
        batch=BATCH,
        caches=CacheRecorder(),
    )


# --- re-noising -----------------------------------------------------------------------------------------------------
def test_flow_renoise_mixes_fresh_noise_in_to_the_next_stages_first_sigma(pipe):
    """Flow models: `(1 - sigma) * x0 + sigma * noise`, sigma the noise level of the next stage's first step (the
    one the denoiser is then called at), the noise drawn from the call's generator."""
    run = make_run(pipe, seed=3)
    draws = torch.Generator().manual_seed(3)
    for index, (height, width) in ((1, (16, 24)), (2, (32, 48))):  # the target-size stage restarts at its own level
        stage = run.plan.stages[index]
        sigma = first_sigma_seen(run, index)
        assert 0.75 <= sigma < 0.9  # the plan's restart level: the first timestep at or above start_sigma * 1000
        clean = torch.randn(BATCH, 4, height, width)
        out = run.renoise(clean, stage)
        noise = torch.randn(BATCH, 4, height, width, generator=draws)
        torch.testing.assert_close(out, (1 - sigma) * clean + sigma * noise)


def test_flow_renoise_draws_each_images_noise_from_its_own_generator(pipe):
    """With one generator per image, image i's noise comes from generator i alone, so an image is reproducible
    from its own seed whatever else is in the batch."""
    run = make_run(pipe, generator=[torch.Generator().manual_seed(11), torch.Generator().manual_seed(12)])
    sigma = first_sigma_seen(run, 1)
    clean = torch.randn(2, 4, 16, 24)
    out = run.renoise(clean, run.plan.stages[1])
    for i, seed in enumerate((11, 12)):
        noise = torch.randn(1, 4, 16, 24, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(out[i : i + 1], (1 - sigma) * clean[i : i + 1] + sigma * noise)


def test_flow_renoise_computes_in_float32_and_keeps_the_latents_dtype(pipe):
    """Half-precision latents are mixed in float32 (with noise drawn in their dtype) and come back in their dtype."""
    run = make_run(pipe, seed=4)
    sigma = first_sigma_seen(run, 1)
    clean = torch.randn(BATCH, 4, 16, 24).to(torch.bfloat16)
    out = run.renoise(clean, run.plan.stages[1])
    noise = torch.randn(BATCH, 4, 16, 24, generator=torch.Generator().manual_seed(4), dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    expected = ((1 - sigma) * clean.float() + sigma * noise.float()).to(torch.bfloat16)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_renoise_draws_on_the_generators_device_and_moves_the_noise_to_the_latents(pipe):
    """The usual setup, a CPU generator with latents on an accelerator: the noise is drawn on the CPU (so a seed
    gives the same image on any device) and mixed in on the latents' device (`meta` stands in for an accelerator:
    mixing a CPU and a `meta` tensor fails)."""
    run = make_run(pipe, seed=3)
    clean = torch.empty(BATCH, 4, 16, 24, device="meta")
    out = run.renoise(clean, run.plan.stages[1])
    assert out.device.type == "meta" and out.shape == clean.shape
    # The generator was drawn from: the next draw is the second of its seed.
    draws = torch.Generator().manual_seed(3)
    torch.randn(BATCH, 4, 16, 24, generator=draws)
    assert torch.equal(torch.randn(3, generator=run.generator), torch.randn(3, generator=draws))


@pytest.mark.parametrize(
    "scheduler",
    [DDIMScheduler(), PNDMScheduler(skip_prk_steps=True), EulerDiscreteScheduler()],
    ids=["DDIM", "PNDM", "Euler"],
)
def test_diffusion_renoise_adds_noise_at_the_next_stages_first_timestep(scheduler):
    """Diffusion models, as img2img does: the noise level of the stage's first timestep t, for every image.
    DDIM and PNDM: `sqrt(a_t) * x0 + sqrt(1 - a_t) * noise`; Euler (sigma scale): `x0 + sigma_t * noise` with
    `sigma_t = sqrt((1 - a_t) / a_t)`; `a_t` the schedule's cumulative alpha product."""
    run = diffusion_run(scheduler, seed=5)
    stage = run.plan.stages[1]
    t = int(stage.timesteps[0])
    assert 600 <= t <= 700  # 7 or 8 of 10 steps kept (start_sigma 0.75)
    alpha = scheduler.alphas_cumprod[t]
    clean = torch.randn(BATCH, 4, 32, 48)
    out = run.renoise(clean, stage)
    noise = torch.randn(BATCH, 4, 32, 48, generator=torch.Generator().manual_seed(5))
    if isinstance(scheduler, EulerDiscreteScheduler):
        expected = clean + ((1 - alpha) / alpha).sqrt() * noise
    else:
        expected = alpha.sqrt() * clean + (1 - alpha).sqrt() * noise
    torch.testing.assert_close(out, expected)


# --- the stage switch -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("space", ["latent", "learned", "pixel"])
def test_next_stage_latents_scale_renoise_and_pack(pipe, space):
    """The switch from stage 0 to stage 1: unpack, scale up x2 in the run's scaling space, re-noise to stage 1's
    first sigma, pack; the caches and the progress bar are told stage 1 starts."""
    torch.manual_seed(0)
    upsampler = LatentUpsampler(in_channels=4, out_channels=4, block_out_channels=(16, 16), norm_num_groups=8).eval()
    run = make_run(pipe, seed=6, space=space, upsampler=upsampler)
    bar = run.progress_bar = BarRecorder()
    stage = run.plan.stages[0]
    latents = packed(pipe, stage)
    with torch.no_grad():
        out = run.next_stage_latents(latents, stage)
        grid = FluxAdapter().unpack(pipe, latents, 8, 12)
        assert grid.shape == (BATCH, 4, 8, 12)
        if space == "pixel":  # FluxPipeline's decode, bicubic x2, encode, normalise
            image = pipe.vae.decode(grid / 0.3611 + 0.1159).sample
            scaled = (pipe.vae.encode(bicubic_x2(image).clamp(-1, 1)).latent_dist.mode() - 0.1159) * 0.3611
        else:
            scaled = upsampler(grid) if space == "learned" else bicubic_x2(grid)
    sigma = first_sigma_seen(run, 1)
    noise = torch.randn(BATCH, 4, 16, 24, generator=torch.Generator().manual_seed(6))
    expected = FluxAdapter().pack(pipe, (1 - sigma) * scaled + sigma * noise)
    assert out.shape == (BATCH, 8 * 12, 16)
    torch.testing.assert_close(out, expected)
    assert run.caches.started == [1]
    assert bar.postfixes == [("stage 2/3 192x128", False)]


def test_latents_at_target_size_scale_without_noise(pipe):
    """After an interrupt: the latent of any stage is scaled up through every later size to the target's, with no
    noise (the generator is not drawn from), so that the pipeline can decode it."""
    run = make_run(pipe, seed=7)
    plan = run.plan
    adapter = FluxAdapter()
    for start in (0, 1):
        stage = plan.stages[start]
        latents = packed(pipe, stage, seed=start)
        expected = adapter.unpack(pipe, latents, stage.latent_height, stage.latent_width)
        for _ in range(2 - start):
            expected = bicubic_x2(expected)
        out = run.latents_at_target_size(latents, stage)
        torch.testing.assert_close(out, adapter.pack(pipe, expected))
    final = packed(pipe, plan.stages[2])
    assert run.latents_at_target_size(final, plan.stages[2]) is final
    assert torch.equal(
        torch.randn(3, generator=run.generator), torch.randn(3, generator=torch.Generator().manual_seed(7))
    )
    assert run.caches.started == []


def test_progress_bar_shows_the_stage_and_its_image_size(pipe):
    """The progress bar's postfix names the stage (1-based, of how many) and its image size, width first; without a
    bar nothing happens."""
    run = make_run(pipe)
    run.show_stage(run.plan.stages[0])  # no bar yet
    bar = run.progress_bar = BarRecorder()
    for stage in run.plan.stages:
        run.show_stage(stage)
    assert bar.postfixes == [
        ("stage 1/3 96x64", False),
        ("stage 2/3 192x128", False),
        ("stage 3/3 384x256", False),
    ]


def test_current_stage_follows_the_scheduler_steps(pipe):
    """`current_stage` is the stage of the step the staged scheduler takes next."""
    run = make_run(pipe)
    stages = []
    sample = torch.zeros(1, 4, 1)
    for timestep in run.scheduler.timesteps:
        stages.append(run.current_stage.index)
        run.scheduler.step(torch.zeros_like(sample), timestep, sample)
    assert stages == [0] * 8 + [1] * 6 + [2] * 6


# --- the callback as the stock loop calls it ------------------------------------------------------------------------
def drive(pipe, run, pipeline, latents_for_step):
    """Call the controller for every step of the plan (and one past it), as the stock loop does; the `timestep`
    argument is junk, since some pipelines pass a sigma there. Returns {step: latents it handed back}."""
    controller = StageSwitchCallback(run)
    results = {}
    for step in range(run.plan.total_steps + 1):
        latents = latents_for_step(step)
        out = controller.callback_fn(pipeline, step, -1.0, {"latents": latents, "other": "kept"})
        assert out["other"] == "kept"
        results[step] = (latents, out["latents"])
    return results


def test_callback_switches_stage_right_after_each_low_resolution_stages_last_step(pipe):
    """The latents are replaced only after steps 7 and 13 (the last steps of stages 0 and 1), by the switch to the
    next stage, whose noise comes from the generator in stage order; every other step's latents pass unchanged,
    the target-size stage's included."""
    run = make_run(pipe, seed=8)
    plan = run.plan
    assert plan.stage_ends == (8, 14, 20)
    reference = make_run(pipe, seed=8)
    results = drive(pipe, run, SimpleNamespace(interrupt=False), lambda step: packed(pipe, plan.stage_at(step), step))
    for step, (given_latents, returned) in results.items():
        if step in (7, 13):
            stage = plan.stage_at(step)
            torch.testing.assert_close(returned, reference.next_stage_latents(given_latents, stage))
            assert returned.shape[1] == 4 * given_latents.shape[1]
        else:
            assert returned is given_latents, step
    assert run.caches.started == [1, 2]


def test_callback_treats_a_pipeline_without_interrupt_as_running(pipe):
    """Pipelines without an `interrupt` property are never interrupted: the latents pass unchanged mid-stage."""
    run = make_run(pipe)
    latents = packed(pipe, run.plan.stages[0])
    out = StageSwitchCallback(run).callback_fn(SimpleNamespace(), 3, 0.5, {"latents": latents})
    assert out["latents"] is latents


@given(step=st.integers(0, 19))
def test_interrupt_scales_the_latent_to_the_target_size_from_any_step(pipe, step):
    """When the user interrupts (`pipe.interrupt`), the step's latent is scaled, without noise, to the target size,
    so the pipeline decodes an image of the requested size; in the target-size stage it is left as it is."""
    run = make_run(pipe, seed=9)
    stage = run.plan.stage_at(step)
    latents = packed(pipe, stage, step)
    out = StageSwitchCallback(run).callback_fn(SimpleNamespace(interrupt=True), step, 0.5, {"latents": latents})
    if stage.index == 2:
        assert out["latents"] is latents
    else:
        torch.testing.assert_close(out["latents"], run.latents_at_target_size(latents, stage))
        assert out["latents"].shape == (BATCH, 16 * 24, 16)
    assert run.caches.started == []


# --- chaining the user's callback -----------------------------------------------------------------------------------
class Marker(PipelineCallback):
    """A user's PipelineCallback that records the calls it gets and scales the latents."""

    tensor_inputs = ["latents", "prompt_embeds"]

    def __init__(self, calls, factor=2.0):
        super().__init__()
        self.calls, self.factor = calls, factor

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        self.calls.append((self.factor, step_index))
        callback_kwargs["latents"] = callback_kwargs["latents"] * self.factor
        return callback_kwargs


def test_no_user_callback_chains_the_controller_alone(pipe):
    """Without a user callback the loop calls the controller alone, which needs the latents only."""
    controller = StageSwitchCallback(make_run(pipe))
    chained, inputs = chain_callbacks(None, None, controller)
    assert isinstance(chained, MultiPipelineCallbacks) and chained.callbacks == [controller]
    assert inputs == ["latents"]


def test_user_function_runs_first_and_its_latents_reach_the_stage_switch(pipe):
    """A plain `callback_on_step_end` function runs before the controller: it sees the stage's final latents, and
    what it returns is merged into the step's kwargs and then scaled up by the switch. The tensor inputs are the
    user's, then the controller's, each once."""
    run = make_run(pipe, seed=10)
    seen = []

    def user(pipeline, step_index, timestep, callback_kwargs):
        seen.append((pipeline, step_index, timestep, callback_kwargs["latents"].shape, sorted(callback_kwargs)))
        return {"latents": callback_kwargs["latents"] * 0.5}

    chained, inputs = chain_callbacks(user, ["prompt_embeds", "latents"], StageSwitchCallback(run))
    assert inputs == ["prompt_embeds", "latents"]
    assert len(chained.callbacks) == 2 and chained.callbacks[0].tensor_inputs == ["prompt_embeds", "latents"]
    latents = packed(pipe, run.plan.stages[0])
    kwargs = {"latents": latents, "prompt_embeds": torch.zeros(1)}
    pipeline = SimpleNamespace(interrupt=False)
    out = chained(pipeline, 7, 0.3, kwargs)
    assert seen == [(pipeline, 7, 0.3, latents.shape, ["latents", "prompt_embeds"])]
    torch.testing.assert_close(
        out["latents"], make_run(pipe, seed=10).next_stage_latents(latents * 0.5, run.plan.stages[0])
    )
    assert out["prompt_embeds"] is kwargs["prompt_embeds"]


def test_user_function_that_returns_nothing_leaves_the_kwargs(pipe):
    """A function that returns None (only looks) changes nothing; without tensor inputs it gets the latents."""
    run = make_run(pipe)
    seen = []
    chained, inputs = chain_callbacks(
        lambda pipeline, step, t, kwargs: seen.append(kwargs["latents"]), None, StageSwitchCallback(run)
    )
    assert inputs == ["latents"]
    assert chained.callbacks[0].tensor_inputs == ["latents"]
    latents = packed(pipe, run.plan.stages[0])
    out = chained(SimpleNamespace(interrupt=False), 2, 0.3, {"latents": latents})
    assert out["latents"] is latents and seen[0] is latents


def test_user_pipeline_callbacks_run_in_order_before_the_controller(pipe):
    """A PipelineCallback, or the callbacks of a MultiPipelineCallbacks in their order, run before the controller;
    the tensor inputs are theirs, then the controller's, without repeats."""
    run = make_run(pipe, seed=12)
    calls = []
    single = Marker(calls, 2.0)
    chained, inputs = chain_callbacks(single, ["latents", "prompt_embeds"], StageSwitchCallback(run))
    assert chained.callbacks[0] is single and isinstance(chained.callbacks[1], StageSwitchCallback)
    assert inputs == ["latents", "prompt_embeds"]

    first, second = Marker(calls, 2.0), Marker(calls, 3.0)
    cutoff = SD3CFGCutoffCallback(cutoff_step_ratio=1.0)
    chained, inputs = chain_callbacks(MultiPipelineCallbacks([first, second, cutoff]), None, StageSwitchCallback(run))
    assert chained.callbacks[:3] == [first, second, cutoff] and len(chained.callbacks) == 4
    assert inputs == ["latents", "prompt_embeds", "pooled_prompt_embeds"]
    latents = packed(pipe, run.plan.stages[0])
    calls.clear()
    chained, _ = chain_callbacks(MultiPipelineCallbacks([first, second]), None, StageSwitchCallback(run))
    out = chained(SimpleNamespace(interrupt=False), 7, 0.3, {"latents": latents})
    assert calls == [(2.0, 7), (3.0, 7)]
    torch.testing.assert_close(
        out["latents"], make_run(pipe, seed=12).next_stage_latents(latents * 6, run.plan.stages[0])
    )


@pytest.mark.parametrize("callback", [42, "callback", [print]])
def test_a_user_callback_of_another_kind_is_refused(pipe, callback):
    """Anything else is a TypeError that names the accepted kinds and what was given."""
    with pytest.raises(
        TypeError,
        match=rf"must be a function, a PipelineCallback or MultiPipelineCallbacks, got {type(callback).__name__}\.",
    ):
        chain_callbacks(callback, None, StageSwitchCallback(make_run(pipe)))
