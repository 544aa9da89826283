"""`StagedScheduler`, the scheduler that stands in for `pipe.scheduler` during an lssgen call, against stock diffusers
schedulers run by hand: every stage must step exactly as a fresh stock scheduler set up for that stage's size and
step count, started at the stage's begin index, would.

The stock denoising loop is imitated by `denoising_loop` (what every diffusers pipeline does: `set_timesteps`, then
for each timestep `scale_model_input` -> denoiser -> `step`, then the step-end callback), with a cheap deterministic
stand-in for the denoiser. The references build their schedulers directly from diffusers with the pipelines' own
arguments (FLUX.1's `sigmas = linspace(1, 1/n, n)` and `mu = calculate_shift(tokens)`, SD/SDXL's step count).
"""

from __future__ import annotations

import inspect
import itertools

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    PNDMScheduler,
)
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from lssgen.adapters import FluxAdapter
from lssgen.adapters.sd import SD_SCHEDULER_CONFIG, SDAdapter
from lssgen.adapters.sdxl import SDXL_SCHEDULER_CONFIG, SDXLAdapter
from lssgen.plan import StagePlan, plan_stages
from lssgen.schedule import StagedScheduler, StepPosition
from lssgen.tiny import FLUX_SCHEDULER_CONFIG

pytestmark = pytest.mark.usefixtures("one_thread")

VAE_SCALE = 8


# --------------------------------------------------------------------------------------------------------------
# Plans and their independent references
# --------------------------------------------------------------------------------------------------------------


def flux_template() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG)


def flux_plan(steps: int = 12, min_resolution: int = 256, size: int = 1024, **options) -> StagePlan:
    return plan_stages(
        size,
        size,
        steps,
        scheduler=flux_template(),
        facts=FluxAdapter(),
        vae_scale_factor=VAE_SCALE,
        min_resolution=min_resolution,
        **options,
    )


def sd_plan(template, steps: int = 10, adapter=None) -> StagePlan:
    """SD-style (diffusion, img2img truncation) plan of 3 stages, 256 -> 512 -> 1024, shortened."""
    return plan_stages(
        1024,
        1024,
        steps,
        scheduler=template,
        facts=adapter or SDAdapter(),
        vae_scale_factor=VAE_SCALE,
        min_resolution=256,
        shorten_intermediate_steps=True,
        base_height=1024,
        base_width=1024,
    )


def flux_reference_scheduler(stage) -> FlowMatchEulerDiscreteScheduler:
    """FluxPipeline's own schedule for a stock call of this stage's size and full step count."""
    scheduler = flux_template()
    n = stage.num_steps
    tokens = (stage.latent_height // 2) * (stage.latent_width // 2)
    mu = calculate_shift(tokens, 256, 4096, 0.5, 1.15)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / n, n), mu=mu)
    return scheduler


def stock_reference_scheduler(template, stage):
    """SD/SDXL pipelines' schedule for a stock call of this stage's full step count."""
    scheduler = type(template).from_config(template.config)
    scheduler.set_timesteps(num_inference_steps=stage.num_steps)
    return scheduler


def reference_schedulers(plan: StagePlan, template) -> list:
    """A fresh stock scheduler per stage, started at the stage's begin index as img2img starts one."""
    schedulers = []
    for stage in plan.stages:
        if isinstance(template, FlowMatchEulerDiscreteScheduler):
            scheduler = flux_reference_scheduler(stage)
        else:
            scheduler = stock_reference_scheduler(template, stage)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(stage.begin_index)
        schedulers.append(scheduler)
    return schedulers


# --------------------------------------------------------------------------------------------------------------
# The stock loop, imitated
# --------------------------------------------------------------------------------------------------------------


def denoiser(sample: torch.Tensor, t) -> torch.Tensor:
    """A deterministic stand-in for a denoiser: depends on the input and the timestep."""
    return 0.3 * sample - 0.2 + 1e-3 * torch.as_tensor(t, dtype=torch.float32)


def switch(latents: torch.Tensor, stage) -> torch.Tensor:
    """Stands in for the controller's scale-up and re-noise: x2 nearest upsampling plus a fixed perturbation."""
    up = latents.repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)
    return 0.8 * up + 0.1 * torch.linspace(-1, 1, up.numel()).view(up.shape)


def first_latents(plan: StagePlan) -> torch.Tensor:
    first = plan.stages[0]
    return torch.randn(1, 4, first.latent_height, first.latent_width, generator=torch.Generator().manual_seed(0))


def denoising_loop(scheduler, latents, *, on_step_end=None, return_dict=False, record=None):
    """What a diffusers pipeline does with `pipe.scheduler` (positional `t`, `step(..., return_dict=False)[0]`)."""
    scheduler.set_timesteps(7, device="cpu")  # the pipeline's own N: the staged scheduler must ignore it
    for i, t in enumerate(scheduler.timesteps):
        if record is not None:
            record(i, t, scheduler)
        model_input = scheduler.scale_model_input(latents, t)
        output = scheduler.step(denoiser(model_input, t), t, latents, return_dict=return_dict)
        latents = output.prev_sample if return_dict else output[0]
        if on_step_end is not None:
            latents = on_step_end(i, latents)
    return latents


def staged_with_callback(plan: StagePlan, template, **loop_kwargs):
    """A staged run switching stages from the step-end callback, as `StageSwitchCallback` does."""
    staged = StagedScheduler(plan, template)

    def on_step_end(i, latents):
        stage = plan.stage_at(i)
        if stage is not plan.stages[-1] and i == plan.stage_ends[stage.index] - 1:
            return switch(latents, stage)
        return latents

    return staged, denoising_loop(staged, first_latents(plan), on_step_end=on_step_end, **loop_kwargs)


def reference_run(plan: StagePlan, template) -> tuple[torch.Tensor, list[float]]:
    """Every stage on its own fresh stock scheduler from its begin index, switching with `switch` in between."""
    latents, timesteps = first_latents(plan), []
    for stage, scheduler in zip(plan.stages, reference_schedulers(plan, template)):
        for t in scheduler.timesteps[stage.begin_index :]:
            timesteps.append(float(t))
            model_input = (
                scheduler.scale_model_input(latents, t) if hasattr(scheduler, "scale_model_input") else latents
            )
            latents = scheduler.step(denoiser(model_input, t), t, latents, return_dict=False)[0]
        if stage is not plan.stages[-1]:
            latents = switch(latents, stage)
    return latents, timesteps


TEMPLATES = {
    "flux-flow-euler": (flux_template, flux_plan),
    "sdxl-euler": (lambda: EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG), None),
    "sd-pndm": (lambda: PNDMScheduler.from_config(SD_SCHEDULER_CONFIG), None),
    "sd-ddim": (lambda: DDIMScheduler.from_config(SD_SCHEDULER_CONFIG), None),
    "dpm-multistep": (lambda: DPMSolverMultistepScheduler.from_config(SDXL_SCHEDULER_CONFIG), None),
}


def template_and_plan(name: str):
    make, planner = TEMPLATES[name]
    template = make()
    plan = planner() if planner else sd_plan(template, adapter=SDXLAdapter() if "sdxl" in name else SDAdapter())
    assert len(plan.stages) == 3
    return template, plan


# --------------------------------------------------------------------------------------------------------------
# The schedule the loop sees
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TEMPLATES)
def test_timesteps_are_each_stages_stock_schedule_from_its_start(name):
    """The loop iterates the concatenation of every stage's own stock timesteps (its size's shift, its own step
    count), each from the stage's begin index; `set_timesteps` with the pipeline's own N changes nothing."""
    template, plan = template_and_plan(name)
    staged = StagedScheduler(plan, template)
    expected = torch.cat(
        [s.timesteps[stage.begin_index :] for s, stage in zip(reference_schedulers(plan, template), plan.stages)]
    )
    torch.testing.assert_close(staged.timesteps, expected, rtol=0, atol=0)
    staged.set_timesteps(num_inference_steps=3, sigmas=[1.0, 0.5, 0.1], mu=0.2)
    staged.set_timesteps(50, device=torch.device("cpu"))
    torch.testing.assert_close(staged.timesteps, expected, rtol=0, atol=0)
    assert len(staged.timesteps) == staged.num_inference_steps == plan.total_steps


def test_set_timesteps_moves_the_schedule_to_the_pipelines_device():
    """The pipeline's `set_timesteps(..., device=...)` puts the concatenated timesteps on its device (the `meta`
    device stands in for a GPU here); without a device they stay where they are."""
    plan = flux_plan()
    staged = StagedScheduler(plan, flux_template())
    expected = staged.timesteps.clone()
    staged.set_timesteps(7)
    assert staged.timesteps.device.type == "cpu"
    staged.set_timesteps(7, device="meta")
    assert staged.timesteps.device.type == "meta"
    assert staged.timesteps.shape == expected.shape


def test_flux_timesteps_by_hand():
    """Hand check of one plan: 1024 px, N = 12, min 512 -> stages 512 (6 steps, mu 0.63) and 1024 (12 steps, mu 1.15
    restarting at the last shifted timestep >= 750). Shifted sigma s' = e^mu / (e^mu + 1/s - 1)."""
    plan = flux_plan(steps=12, min_resolution=512)
    staged = StagedScheduler(plan, flux_template())

    def shifted(s, mu):
        return np.exp(mu) / (np.exp(mu) + 1 / s - 1)

    low = [shifted(s, 0.63) for s in np.linspace(1, 1 / 6, 6)]
    high = [shifted(s, 1.15) for s in np.linspace(1, 1 / 12, 12)]
    begin = max(i for i, s in enumerate(high) if s >= 0.75)
    assert begin == 6  # s = 1 - 6/12 = 0.5 gives s' = 3.1582 / 4.1582 = 0.7595; s = 5/12 gives 0.6929
    expected = np.array(low + high[begin:]) * 1000
    np.testing.assert_allclose(staged.timesteps.numpy(), expected, rtol=1e-5)
    # Sigmas: the same values, then the final 0 of the last stage.
    np.testing.assert_allclose(staged.sigmas.numpy(), [*(expected / 1000), 0.0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["flux-flow-euler", "sdxl-euler", "dpm-multistep"])
def test_sigmas_are_concatenated_like_timesteps(name):
    """`scheduler.sigmas[i]` (CogView4 hands it to callbacks) is the sigma of loop step i: each stage's sigmas from
    its begin index for its own steps, then the last stage's remaining ones (its final sigma)."""
    template, plan = template_and_plan(name)
    staged = StagedScheduler(plan, template)
    references = reference_schedulers(plan, template)
    pieces = [
        s.sigmas[stage.begin_index : stage.begin_index + stage.num_denoiser_steps]
        for s, stage in zip(references[:-1], plan.stages[:-1])
    ]
    pieces.append(references[-1].sigmas[plan.stages[-1].begin_index :])
    torch.testing.assert_close(staged.sigmas, torch.cat(pieces), rtol=0, atol=0)
    assert len(staged.sigmas) == plan.total_steps + 1


@pytest.mark.parametrize("name", ["sd-pndm", "sd-ddim"])
def test_schedulers_without_sigmas(name):
    """PNDM and DDIM have no sigmas: `sigmas` is then the stage in force's (none), and positions carry no sigma."""
    template, plan = template_and_plan(name)
    staged = StagedScheduler(plan, template)
    assert getattr(staged, "sigmas", None) is None
    assert staged.position().sigma is None


def test_sigmas_after_switch_follow_the_stage_in_force_without_sigmas():
    """Without sigmas, `sigmas` is read from the stage in force (and stays None for every stage of PNDM)."""
    template, plan = template_and_plan("sd-pndm")
    staged = StagedScheduler(plan, template)
    for _ in range(plan.stage_ends[0]):
        staged.step(torch.zeros(1), staged.timesteps[staged.steps_taken], torch.zeros(1))
    assert staged.stage_index == 1
    assert getattr(staged, "sigmas", None) is None


def test_flow_sigmas_match_the_timesteps():
    """Flow matching: sigma_i = t_i / 1000 at every loop step, across stage boundaries."""
    plan = flux_plan(steps=20)
    staged = StagedScheduler(plan, flux_template())
    torch.testing.assert_close(staged.sigmas[:-1] * 1000, staged.timesteps, rtol=1e-6, atol=1e-3)
    assert float(staged.sigmas[-1]) == 0.0


# --------------------------------------------------------------------------------------------------------------
# Denoising through the staged scheduler = stock schedulers stage by stage
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TEMPLATES)
def test_loop_matches_fresh_stock_scheduler_per_stage(name):
    """A whole staged generation gives exactly what running every stage on a fresh stock scheduler (its own step
    count and shift, started at its begin index, no multistep history from the stage before) gives; the loop sees
    every stage's timesteps in order."""
    template, plan = template_and_plan(name)
    seen = []
    staged, latents = staged_with_callback(plan, template, record=lambda i, t, s: seen.append(float(t)))
    expected, timesteps = reference_run(plan, template)
    assert seen == timesteps
    assert latents.shape == expected.shape == (1, 4, plan.stages[-1].latent_height, plan.stages[-1].latent_width)
    torch.testing.assert_close(latents, expected, rtol=1e-5, atol=1e-5)
    assert staged.steps_taken == plan.total_steps
    assert staged.stage_index == len(plan.stages) - 1


@pytest.mark.parametrize("return_dict", [False, True])
@pytest.mark.parametrize("name", ["dpm-multistep", "sdxl-euler"])
def test_on_stage_end_switches_inside_step(name, return_dict):
    """For pipelines without a step-end callback (PixArt, whose scheduler is DPM-Solver): `on_stage_end` gets the
    latents after the last step of every stage but the last, with that stage, and `step` returns what it gives back
    (as `prev_sample`, or first in the tuple); the result equals the callback-switched run."""
    template, plan = template_and_plan(name)
    staged = StagedScheduler(plan, template)
    calls = []

    def on_stage_end(latents, stage):
        calls.append((staged.steps_taken, stage, latents.shape))
        return switch(latents, stage)

    staged.on_stage_end = on_stage_end
    latents = denoising_loop(staged, first_latents(plan), return_dict=return_dict)
    expected, _ = reference_run(plan, template)
    torch.testing.assert_close(latents, expected, rtol=1e-5, atol=1e-5)
    assert [(steps, stage.index) for steps, stage, _ in calls] == [(plan.stage_ends[0], 0), (plan.stage_ends[1], 1)]
    assert [shape[-1] for _, _, shape in calls] == [plan.stages[0].latent_width, plan.stages[1].latent_width]


def test_on_stage_end_keeps_the_steps_other_outputs():
    """With `return_dict=False` the step's tuple keeps its other entries (Euler's `pred_original_sample`) when
    `on_stage_end` replaces the latents."""
    template, plan = template_and_plan("sdxl-euler")
    staged = StagedScheduler(plan, template)
    reference = reference_schedulers(plan, template)[0]
    staged.on_stage_end = lambda latents, stage: torch.full_like(latents, 7.0)
    sample = first_latents(plan)
    last = plan.stage_ends[0] - 1
    for i, t in enumerate(staged.timesteps[: last + 1]):
        output = staged.step(denoiser(sample, t), t, sample, return_dict=False)
        expected = reference.step(denoiser(sample, t), t, sample, return_dict=False)
        assert len(output) == len(expected) == 2
        torch.testing.assert_close(output[1], expected[1])
        if i < last:
            torch.testing.assert_close(output[0], expected[0])
    assert torch.equal(output[0], torch.full_like(sample, 7.0))


def test_without_on_stage_end_step_returns_the_stock_output():
    """With no `on_stage_end` (pipelines with a step-end callback), the step at a stage's end returns the stage's own
    stock result, unchanged, and later steps run on the next stage's scheduler."""
    template, plan = template_and_plan("flux-flow-euler")
    staged = StagedScheduler(plan, template)
    assert staged.on_stage_end is None
    reference = reference_schedulers(plan, template)
    sample = first_latents(plan)
    for t in staged.timesteps[: plan.stage_ends[0]]:
        output = staged.step(denoiser(sample, t), t, sample)
        expected = reference[0].step(denoiser(sample, t), t, sample)
        torch.testing.assert_close(output.prev_sample, expected.prev_sample)
        sample = output.prev_sample
    assert staged.stage_index == 1
    assert staged.current is staged.stage_schedulers[1]


def test_step_accepts_keywords_and_positionals():
    """The pipelines call `step` positionally or by keyword (`return_dict=False`, `generator=`): both reach the
    stage's scheduler."""
    template, plan = template_and_plan("flux-flow-euler")
    staged = StagedScheduler(plan, template)
    reference = reference_schedulers(plan, template)[0]
    sample = first_latents(plan)
    t = staged.timesteps[0]
    output = staged.step(model_output=denoiser(sample, t), timestep=t, sample=sample, return_dict=False)
    expected = reference.step(denoiser(sample, t), t, sample, False)
    assert isinstance(output, tuple)
    torch.testing.assert_close(output[0], expected[0])


@pytest.mark.parametrize("name", TEMPLATES)
def test_step_has_the_stock_signature(name):
    """Pipelines inspect `scheduler.step`'s parameters to decide whether to pass `eta` and `generator`: the staged
    step shows the stock scheduler's signature."""
    template, plan = template_and_plan(name)
    staged = StagedScheduler(plan, template)
    assert inspect.signature(staged.step) == inspect.signature(template.step)
    accepts_eta = "eta" in set(inspect.signature(staged.step).parameters)
    assert accepts_eta == isinstance(template, DDIMScheduler)


# --------------------------------------------------------------------------------------------------------------
# Where the loop is: position, step and begin indices
# --------------------------------------------------------------------------------------------------------------


def test_position_at_every_step():
    """Before each denoiser call `position()` names the stage that step belongs to, the step within it, its sigma
    (the timestep / 1000 for flow models) and the loop's step counter; past the end it stays on the last step."""
    plan = flux_plan(steps=12)
    positions = []
    staged, _ = staged_with_callback(
        plan, flux_template(), record=lambda i, t, s: positions.append((i, float(t), s.position()))
    )
    starts = [0, *plan.stage_ends[:-1]]
    for i, t, position in positions:
        stage = plan.stage_at(i)
        assert isinstance(position, StepPosition)
        assert position.stage is stage
        assert position.step == i
        assert position.stage_step == i - starts[stage.index]
        assert position.sigma == pytest.approx(t / 1000, rel=1e-6)
        assert stage.timesteps[position.stage_step] == pytest.approx(t, rel=1e-6)
    assert [p.stage_step for _, _, p in positions].count(0) == len(plan.stages)
    # After the last step: still the last step of the last stage.
    final = staged.position()
    assert (final.stage, final.step, final.stage_step) == (
        plan.stages[-1],
        plan.total_steps - 1,
        plan.stages[-1].num_denoiser_steps - 1,
    )
    assert final.sigma == pytest.approx(float(staged.sigmas[plan.total_steps - 1]))


def test_position_for_diffusion_schedulers_with_sigmas():
    """Euler's sigmas are not t / 1000: the position carries the sigma of the loop step, from the stage's own
    schedule."""
    template, plan = template_and_plan("sdxl-euler")
    staged = StagedScheduler(plan, template)
    references = reference_schedulers(plan, template)
    sample = first_latents(plan)
    for i, t in enumerate(staged.timesteps):
        position = staged.position()
        stage = plan.stage_at(i)
        assert (position.stage, position.step) == (stage, i)
        expected = references[stage.index].sigmas[stage.begin_index + position.stage_step]
        assert position.sigma == pytest.approx(float(expected))
        staged.step(torch.zeros_like(sample), t, sample)


def test_step_and_begin_index_are_the_stage_in_force():
    """`step_index` and `begin_index` (read by pipelines, e.g. to add noise at the current step) are those of the
    stage in force, as its own stock scheduler's would be after the same steps."""
    template, plan = template_and_plan("sdxl-euler")
    staged = StagedScheduler(plan, template)
    sample = first_latents(plan)
    for i, t in enumerate(staged.timesteps):
        stage = plan.stage_at(i)
        assert staged.begin_index == stage.begin_index
        staged.scale_model_input(sample, t)
        assert staged.step_index == stage.begin_index + i - (plan.stage_ends[stage.index] - stage.num_denoiser_steps)
        staged.step(torch.zeros_like(sample), t, sample)


def test_init_noise_sigma_is_the_first_stages():
    """The pipeline scales its starting noise by `init_noise_sigma`: the first stage's (Euler's depends on the step
    count, so the target stage's would be wrong)."""
    template, plan = template_and_plan("sdxl-euler")
    staged = StagedScheduler(plan, template)
    expected = stock_reference_scheduler(template, plan.stages[0]).init_noise_sigma
    assert float(staged.init_noise_sigma) == pytest.approx(float(expected))
    assert float(expected) != pytest.approx(float(stock_reference_scheduler(template, plan.stages[1]).init_noise_sigma))


def test_single_stage_plan_is_the_stock_schedule():
    """A one-stage plan (`start_sigma=1.0`) runs the stock schedule: same timesteps, sigmas, order, length, result."""
    plan = flux_plan(steps=9, start_sigma=1.0)
    assert len(plan.stages) == 1
    template = flux_template()
    staged = StagedScheduler(plan, template)
    reference = flux_reference_scheduler(plan.stages[0])
    torch.testing.assert_close(staged.timesteps, reference.timesteps, rtol=0, atol=0)
    torch.testing.assert_close(staged.sigmas, reference.sigmas, rtol=0, atol=0)
    assert staged.order == reference.order == 1
    assert staged.num_inference_steps == 9
    latents = denoising_loop(staged, first_latents(plan))
    expected, _ = reference_run(plan, template)
    torch.testing.assert_close(latents, expected, rtol=0, atol=0)


def test_config_order_and_length_are_the_stock_schedulers():
    """`config`, `order` and `len(scheduler)` are what the pipeline's own scheduler reports."""
    template, plan = template_and_plan("sd-pndm")
    staged = StagedScheduler(plan, template)
    assert staged.config is template.config
    assert staged.order == template.order
    assert len(staged) == len(template) == 1000


# --------------------------------------------------------------------------------------------------------------
# The stock scheduler's other methods
# --------------------------------------------------------------------------------------------------------------


def test_scale_model_input_is_the_stage_in_forces():
    """`scale_model_input` scales as the stage in force's scheduler does (Euler divides by sqrt(sigma^2 + 1) of
    that stage's own sigma); positional or keyword timestep."""
    template, plan = template_and_plan("sdxl-euler")
    staged = StagedScheduler(plan, template)
    references = reference_schedulers(plan, template)
    sample = torch.ones(1, 4, 2, 2)
    for i, t in enumerate(staged.timesteps):
        stage = plan.stage_at(i)
        sigma = float(references[stage.index].sigmas[stage.begin_index + staged.position().stage_step])
        scaled = staged.scale_model_input(sample, t) if i % 2 else staged.scale_model_input(sample, timestep=t)
        torch.testing.assert_close(scaled, sample / (sigma**2 + 1) ** 0.5)
        staged.step(torch.zeros_like(sample), t, sample)


def test_scale_model_input_without_one_returns_the_sample():
    """Flow-matching Euler has no `scale_model_input`: the sample goes to the denoiser unchanged."""
    plan = flux_plan()
    staged = StagedScheduler(plan, flux_template())
    sample = torch.randn(1, 4, 2, 2)
    assert staged.scale_model_input(sample, staged.timesteps[0]) is sample


def test_other_attributes_come_from_the_stage_in_force():
    """Anything else (`shift`, ...) is the stage in force's."""
    template, plan = template_and_plan("flux-flow-euler")
    staged = StagedScheduler(plan, template)
    assert staged.shift == template.shift
    assert staged.num_inference_steps == plan.total_steps  # its own, not the stage's
    with pytest.raises(AttributeError):
        _ = staged.no_such_attribute


def test_scale_noise_noises_to_the_level_the_last_step_reached():
    """`scale_noise`, `(1 - s) * x + s * noise`: before any step at the first stage's start (img2img); after a step
    at the level that step reached, by the stage that made it: at a stage's end the stage's last sigma, not the next
    stage's first (an inpainting loop blends its image in there before the latent is scaled up)."""
    template, plan = template_and_plan("flux-flow-euler")
    staged = StagedScheduler(plan, template)
    sample, noise = torch.ones(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)
    t = staged.timesteps[:1]
    torch.testing.assert_close(staged.scale_noise(sample, t, noise), noise)  # stage 1 starts from pure noise
    for _ in range(plan.stage_ends[0]):
        staged.step(torch.zeros_like(sample), staged.timesteps[staged.steps_taken], sample)
    first, second = plan.stages[:2]
    end = float(staged.stage_schedulers[0].sigmas[first.begin_index + first.num_denoiser_steps])
    torch.testing.assert_close(staged.scale_noise(sample, t, noise), (1 - end) * sample)
    staged.step(torch.zeros_like(sample), staged.timesteps[staged.steps_taken], sample)
    reached = float(staged.stage_schedulers[1].sigmas[second.begin_index + 1])
    assert 0 < reached < second.first_sigma < 1
    torch.testing.assert_close(staged.scale_noise(sample, t, noise), (1 - reached) * sample)


def test_set_begin_index_refuses_part_way_starts():
    """A pipeline may reset the begin index to 0 (no-op); starting part-way (img2img strength) is refused."""
    template, plan = template_and_plan("flux-flow-euler")
    staged = StagedScheduler(plan, template)
    staged.set_begin_index()
    staged.set_begin_index(0)
    with pytest.raises(ValueError, match="cannot start it part-way"):
        staged.set_begin_index(3)
    assert staged.begin_index == 0


def test_stage_schedulers_get_the_pipelines_device():
    """Every stage's schedule is built on the device the pipeline runs on (here recorded: CPU only in tests)."""
    devices = []

    class Recording(FlowMatchEulerDiscreteScheduler):
        def set_timesteps(self, *args, device=None, **kwargs):
            devices.append(device)
            return super().set_timesteps(*args, device=device, **kwargs)

    plan = flux_plan()
    StagedScheduler(plan, Recording(**FLUX_SCHEDULER_CONFIG), device=torch.device("cpu"))
    assert devices == [torch.device("cpu")] * len(plan.stages)


def test_a_half_built_scheduler_raises_attribute_error():
    """Copy, pickle and debuggers read attributes of a scheduler whose `__init__` has not (fully) run: every read
    answers or raises an AttributeError naming the attribute read, never recursing, and the staged scheduler's own
    attributes are never borrowed from a stage's scheduler."""
    template, plan = template_and_plan("flux-flow-euler")
    built = StagedScheduler(plan, template)
    own = ["plan", "template", "stage_schedulers", "steps_taken", "stage_index", "step"]
    for kept in itertools.chain.from_iterable(itertools.combinations(own, k) for k in range(len(own))):
        half = object.__new__(StagedScheduler)
        half.__dict__.update({name: built.__dict__[name] for name in kept})
        for name in own:
            if name not in kept:
                with pytest.raises(AttributeError, match=name):
                    getattr(half, name)
        for name in ["__setstate__", "__deepcopy__"]:  # what copy and pickle look for
            with pytest.raises(AttributeError, match=name):
                getattr(half, name)
        for name in ["current", "add_noise", "timesteps", "sigmas"]:
            try:
                getattr(half, name)
            except AttributeError:
                pass
