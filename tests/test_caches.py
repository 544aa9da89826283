"""lssgen with diffusers' caches on the denoiser: every stage starts with an empty cache, and within a stage the
cache works as without lssgen."""

import logging

import pytest
import torch
from diffusers.hooks import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
)
from test_cogview4 import cogview4_call_kwargs
from test_flux import flux_call_kwargs

import lssgen
from lssgen.caches import STEP_CONTEXT_HOOK, diffusers_hooks, sea_cache_config
from lssgen.plan import fresh_scheduler
from lssgen.tiny import build_tiny_flux_pipeline
from lssgen.tiny.cogview4 import build_tiny_cogview4_pipeline

THREE_STAGES = {"min_resolution": 64, "base_height": 256, "base_width": 256}
CACHES = {
    "first block": lambda pipe: FirstBlockCacheConfig(threshold=0.5),
    "pyramid attention broadcast": lambda pipe: PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2,
        spatial_attention_timestep_skip_range=(0, 1000),
        current_timestep_callback=lambda: pipe.current_timestep,
    ),
    "taylorseer": lambda pipe: TaylorSeerCacheConfig(),
    "mag": lambda pipe: MagCacheConfig(mag_ratios=[1.0] * 8, num_inference_steps=8),
    "faster (guidance-distilled)": lambda pipe: FasterCacheConfig(
        spatial_attention_block_skip_range=2,
        spatial_attention_timestep_skip_range=(-1, 681),
        current_timestep_callback=lambda: pipe.current_timestep,
        is_guidance_distilled=True,
    ),
    "sea": lambda pipe: sea_cache_config(pipe, threshold=10.0),
}


@pytest.mark.parametrize("cache", list(CACHES))
@pytest.mark.parametrize("start_sigma", [0.75, 0.667])
def test_every_cache_runs_through_every_stage(cache, start_sigma):
    # Before: FirstBlockCache, PAB, TaylorSeer and FasterCache failed at a stage switch with a size mismatch.
    pipe = build_tiny_flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer.enable_cache(CACHES[cache](pipe))
    lssgen.patch(pipe, **THREE_STAGES)
    images = pipe(**flux_call_kwargs(pipe), start_sigma=start_sigma).images
    assert images.shape == (1, 3, 256, 256) and torch.isfinite(images).all()


def test_first_block_cache_recomputes_the_first_step_of_each_stage_and_caches_the_rest():
    pipe = build_tiny_flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    # A threshold no change reaches: after a stage's first step, every step reuses the cached residual.
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=1e9))
    lssgen.patch(pipe, **THREE_STAGES)
    # The last block's attention runs only when the block really computes (the cache wraps the block's forward).
    tail_calls = []
    tail = pipe.transformer.single_transformer_blocks[-1].attn
    handle = tail.register_forward_pre_hook(lambda module, args, kwargs: tail_calls.append(1), with_kwargs=True)
    for _ in range(2):  # and again: nothing carries over from the first call
        tail_calls.clear()
        pipe(**flux_call_kwargs(pipe))
        assert len(tail_calls) == len(lssgen.plan_for(pipe, 256, 256, 8, **THREE_STAGES).stages) == 3
    handle.remove()


def test_mag_cache_ratios_follow_each_stage_by_noise_level_and_are_restored():
    # Ratios calibrated for the stock 8-step schedule, all different, so the test can tell which one applies.
    calibrated = torch.linspace(1.0, 0.65, 8)
    pipe = build_tiny_flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer.enable_cache(MagCacheConfig(mag_ratios=calibrated, num_inference_steps=8, retention_ratio=0.5))
    (head,) = [hook for hook in diffusers_hooks(pipe.transformer) if type(hook).__name__ == "MagCacheHeadHook"]
    lssgen.patch(pipe, **THREE_STAGES)
    seen = []

    def record(module, args, kwargs):
        config = head.config
        seen.append((config.num_inference_steps, config.retention_ratio, config.mag_ratios.tolist()))

    handle = pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
    pipe(**flux_call_kwargs(pipe))
    handle.remove()

    plan = lssgen.plan_for(pipe, 256, 256, 8, **THREE_STAGES)
    stock = build_tiny_flux_pipeline().scheduler
    stock.set_timesteps(
        sigmas=[1 - i / 8 for i in range(8)], mu=lssgen.find_adapter(pipe).timestep_kwargs(stock, 8, 32, 32)["mu"]
    )
    reference = [float(t) for t in stock.timesteps]
    calls = iter(seen)
    for stage in plan.stages:
        nearest = [min(range(8), key=lambda i: abs(reference[i] - t)) for t in stage.timesteps]
        for _ in stage.timesteps:
            steps, retention, ratios = next(calls)
            assert steps == stage.num_denoiser_steps
            assert ratios == pytest.approx([calibrated[i].item() for i in nearest])
            # Calibration steps 0-3 are never skipped (retention 0.5 of 8): as many of this stage's steps are kept.
            assert int(retention * steps + 0.5) == sum(i < 4 for i in nearest)
    final = plan.stages[-1]  # the stock schedule itself, from its begin index: the calibration's own steps
    assert seen[-1][2] == pytest.approx(calibrated[final.begin_index :].tolist())
    config = head.config
    assert (config.num_inference_steps, config.retention_ratio) == (8, 0.5)
    assert torch.equal(config.mag_ratios, calibrated)


def test_taylorseer_stops_caching_at_the_same_noise_level_in_every_stage():
    pipe = build_tiny_flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    # Steps 6 and 7 of the stock 8-step schedule always compute fully.
    pipe.transformer.enable_cache(TaylorSeerCacheConfig(disable_cache_before_step=1, disable_cache_after_step=6))
    hooks = [hook for hook in diffusers_hooks(pipe.transformer) if type(hook).__name__ == "TaylorSeerCacheHook"]
    lssgen.patch(pipe, **THREE_STAGES)
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append({hook.disable_cache_after_step for hook in hooks}), with_kwargs=True
    )
    pipe(**flux_call_kwargs(pipe))
    handle.remove()
    plan = lssgen.plan_for(pipe, 256, 256, 8, **THREE_STAGES)
    stock = lssgen.plan_for(pipe, 256, 256, 8, start_sigma=1.0).stages[0].timesteps  # the stock 8-step schedule
    expected = []
    for stage in plan.stages:
        nearest = [min(range(8), key=lambda i: abs(stock[i] - t)) for t in stage.timesteps]
        local = next((j for j, i in enumerate(nearest) if i >= 6), len(nearest))
        expected += [{local}] * stage.num_denoiser_steps
    assert seen == expected
    assert seen[-1] == {6 - plan.stages[-1].begin_index}  # the full-size stage: the stock steps, from its start
    assert {hook.disable_cache_after_step for hook in hooks} == {6}  # restored after the call


@pytest.mark.parametrize("skip_range", [(-1, 900), (-1, 1001)])
def test_faster_cache_whose_skip_range_covers_a_stage_start_computes_each_stages_first_step(skip_range):
    # Before: the first step of a later stage (t ~ 750) lies in the skip range (-1, 900) with the cache just
    # cleared, and FasterCache failed with "'NoneType' object is not subscriptable". A range over every timestep
    # failed the same way in the first stage.
    pipe = build_tiny_flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer.enable_cache(
        FasterCacheConfig(
            spatial_attention_block_skip_range=2,
            spatial_attention_timestep_skip_range=skip_range,
            current_timestep_callback=lambda: pipe.current_timestep,
            is_guidance_distilled=True,
        )
    )
    lssgen.patch(pipe, **THREE_STAGES)
    # The attention's projection runs only when FasterCache computes the block (its hook wraps the forward).
    computed = []
    attention = pipe.transformer.transformer_blocks[0].attn
    handles = [
        pipe.transformer.register_forward_pre_hook(lambda module, args: computed.append(False)),
        attention.to_q.register_forward_pre_hook(lambda module, args: computed.__setitem__(-1, True)),
    ]
    expected = []
    for stage in lssgen.plan_for(pipe, 256, 256, 8, **THREE_STAGES).stages:
        # Each stage as a stock schedule: outside the range every step computes; inside it, the stage's first step
        # computes (filling the cache) and then every second step (the block skip range).
        expected += [not skip_range[0] < t < skip_range[1] or index % 2 == 0 for index, t in enumerate(stage.timesteps)]
    for _ in range(2):  # and again: nothing carries over from the first call
        computed.clear()
        images = pipe(**flux_call_kwargs(pipe)).images
        assert images.shape == (1, 3, 256, 256) and torch.isfinite(images).all()
        assert computed == expected
        assert not all(computed)  # some steps reused the cache
    for handle in handles:
        handle.remove()


def test_a_cache_with_torch_compile():
    # Dynamo traces the cache's hooks with the model (its `.item()` decisions break the graph, which is allowed);
    # the compiled, cached, staged call gives the images of the eager one.
    def cached_pipe():
        pipe = build_tiny_flux_pipeline()
        pipe.set_progress_bar_config(disable=True)
        pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.5))
        return lssgen.patch(pipe, **THREE_STAGES)

    torch._dynamo.reset()
    eager, compiled = cached_pipe(), cached_pipe()
    compiled.transformer.compile(backend="aot_eager")
    expected = eager(**flux_call_kwargs(eager)).images
    for _ in range(2):
        torch.testing.assert_close(compiled(**flux_call_kwargs(compiled)).images, expected, atol=1e-4, rtol=1e-4)
    torch._dynamo.reset()


def test_caches_imports_nothing_from_patch_or_controller():
    # The cache schedule is handed the running call's state (`StageCacheSchedule`'s `position` and
    # `denoiser_latents`): it sits below patch and controller, which import it. Before, `StageRawVision` imported
    # `patch` to find the call, a circle.
    from test_layout import imports_of

    assert imports_of("lssgen.caches") & {"lssgen.patch", "lssgen.controller"} == set()


def _sea_cache_computes(steps: int, retention: int = 1, end: int = 1, max_cached: int = 2) -> list[bool]:
    """Which steps of an n-step schedule SeaCache computes in full when its threshold is never reached."""
    computes, cached = [], 0
    for index in range(steps):
        full = index < retention or index >= steps - end or cached >= max_cached
        cached = 0 if full else cached + 1
        computes.append(full)
    return computes


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def sea_cache_warnings():
    logger, records = logging.getLogger("diffusers.hooks.sea_cache"), _Records()
    level = logger.level
    logger.setLevel(logging.WARNING)
    logger.addHandler(records)
    yield records.messages
    logger.removeHandler(records)
    logger.setLevel(level)


def test_sea_cache_gets_each_stages_steps_and_caches_within_every_stage(sea_cache_warnings):
    pipe = build_tiny_flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    # A threshold no change reaches: SeaCache reuses its residual wherever its step rules allow.
    pipe.transformer.enable_cache(sea_cache_config(pipe, threshold=1e9))
    (root,) = [hook for hook in diffusers_hooks(pipe.transformer) if type(hook).__name__ == "SeaCacheRootHook"]
    # The stock FluxPipeline passes no step metadata: SeaCache computes every step and says so.
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda module, args: calls.append(1))
    pipe(**flux_call_kwargs(pipe))
    assert len(calls) == 8 and any("fail-open" in message for message in sea_cache_warnings)
    sea_cache_warnings.clear()
    handle.remove()

    lssgen.patch(pipe, **THREE_STAGES)
    forward = pipe.transformer.forward
    # Per denoiser call: the cache context SeaCache sees (read inside the model, after every hook's pre_forward)
    # and whether the last block computed (its attention runs only then).
    seen = []
    first = pipe.transformer.transformer_blocks[0]
    tail = pipe.transformer.single_transformer_blocks[-1].attn
    handles = [
        first.register_forward_pre_hook(
            lambda module, args, kwargs: seen.append([root.state_manager._context, False]), with_kwargs=True
        ),
        tail.register_forward_pre_hook(lambda module, args, kwargs: seen[-1].__setitem__(1, True), with_kwargs=True),
    ]
    plan = lssgen.plan_for(pipe, 256, 256, 8, **THREE_STAGES)
    for _ in range(2):  # and again: nothing carries over from the first call
        seen.clear()
        images = pipe(**flux_call_kwargs(pipe)).images
        assert images.shape == (1, 3, 256, 256) and torch.isfinite(images).all()
        calls = iter(seen)
        for stage in plan.stages:
            # Each stage is a schedule of its own: SeaCache's first step and its end step compute in full,
            # the steps between reuse the cached residual (at most twice in a row, SeaCache's default).
            n = stage.num_denoiser_steps
            for index, (timestep, computes) in enumerate(zip(stage.timesteps, _sea_cache_computes(n))):
                context, computed = next(calls)
                assert (context.step_index, context.num_inference_steps) == (index, n)
                assert context.sigma == pytest.approx(timestep / 1000)  # the noise level of this stage's step
                assert computed == computes, (stage.index, index)
        assert next(calls, None) is None
        assert sum(computed for _, computed in seen) < len(seen)  # some steps were cached
        assert sea_cache_warnings == []  # no fail-open warning under lssgen
        # The pipe is as it was: the step-context hook is gone and no cache context is left set.
        assert pipe.transformer.forward is forward
        assert STEP_CONTEXT_HOOK not in pipe.transformer._diffusers_hook.hooks
        assert root.state_manager._context is None
    for handle in handles:
        handle.remove()


def test_sea_cache_step_context_is_removed_after_an_exception():
    pipe = build_tiny_flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer.enable_cache(sea_cache_config(pipe, threshold=1e9))
    (root,) = [hook for hook in diffusers_hooks(pipe.transformer) if type(hook).__name__ == "SeaCacheRootHook"]
    lssgen.patch(pipe, **THREE_STAGES)
    forward = pipe.transformer.forward

    def broken(module, args, kwargs):
        raise RuntimeError("the model failed")

    handle = pipe.transformer.single_transformer_blocks[-1].register_forward_pre_hook(broken, with_kwargs=True)
    with pytest.raises(RuntimeError, match="the model failed"):
        pipe(**flux_call_kwargs(pipe))
    handle.remove()
    assert pipe.transformer.forward is forward
    assert STEP_CONTEXT_HOOK not in pipe.transformer._diffusers_hook.hooks
    assert root.state_manager._context is None
    images = pipe(**flux_call_kwargs(pipe)).images  # and it still works
    assert torch.isfinite(images).all()


def test_sea_cache_keeps_the_conditional_and_unconditional_calls_apart(sea_cache_warnings):
    # CogView4 runs CFG as two calls per step, in the pipeline's "cond" and "uncond" contexts: each keeps its own
    # cache, with the stage's steps (its sigmas are shifted ones, unlike its integer timesteps).
    pipe = build_tiny_cogview4_pipeline()
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer.enable_cache(sea_cache_config(pipe, threshold=1e9))
    (root,) = [hook for hook in diffusers_hooks(pipe.transformer) if type(hook).__name__ == "SeaCacheRootHook"]
    block = pipe.transformer.transformer_blocks[-1]
    seen = []
    handles = [
        block.register_forward_pre_hook(
            lambda module, args, kwargs: seen.append([root.state_manager._context, False]), with_kwargs=True
        ),
        block.attn1.register_forward_pre_hook(
            lambda module, args, kwargs: seen[-1].__setitem__(1, True), with_kwargs=True
        ),
    ]
    lssgen.patch(pipe, **THREE_STAGES)
    images = pipe(**cogview4_call_kwargs(pipe)).images
    for handle in handles:
        handle.remove()
    assert torch.isfinite(images).all() and sea_cache_warnings == []
    plan = lssgen.plan_for(pipe, 256, 256, 8, **THREE_STAGES)
    expected = [
        (name, index, stage.num_denoiser_steps, computes)
        for stage in plan.stages
        for index, computes in enumerate(_sea_cache_computes(stage.num_denoiser_steps))
        for name in ("cond", "uncond")
    ]
    got = [(c.name, c.step_index, c.num_inference_steps, computed) for c, computed in seen]
    assert got == expected
    noise_levels = []  # each stage's own shifted sigmas, from where it starts
    for stage in plan.stages:
        scheduler = fresh_scheduler(pipe.scheduler)
        scheduler.set_timesteps(**stage.scheduler_kwargs)
        noise_levels += scheduler.sigmas[stage.begin_index :][: stage.num_denoiser_steps].tolist()
    assert [context.sigma for context, _ in seen[::2]] == pytest.approx(noise_levels)
    timesteps = [t / 1000 for stage in plan.stages for t in stage.timesteps]  # not the shifted sigmas
    assert [context.sigma for context, _ in seen[::2]] != pytest.approx(timesteps)
