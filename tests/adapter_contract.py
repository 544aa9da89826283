"""What every adapter must do, as tests. Each pipeline family subclasses `AdapterContract` in its own test file
(`class TestFlux(AdapterContract)`), supplying how to build its tiny pipeline, how to call it, and what reached
the denoiser; every test here then runs for that family."""

from __future__ import annotations

import inspect
import logging
import math
import zlib
from typing import Any

import diffusers
import diffusers.hooks as hooks
import pytest
import torch
from call_arguments import FOUND, Drawn, call_arguments
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.hooks._common import _ALL_TRANSFORMER_BLOCK_IDENTIFIERS
from diffusers.hooks.hooks import CacheContext
from diffusers.hooks.hooks import _set_cache_context as set_cache_context
from hypothesis import event, example, given, seed, settings
from packaging import version

import lssgen
from lssgen.caches import diffusers_hooks, sea_cache_config
from lssgen.patch import OPTION_NAMES, Options
from lssgen.plan import StagePlan

# Each cache of diffusers.hooks with a config that caches often on a tiny model. SeaCache needs step metadata the
# stock image pipelines do not pass (lssgen gives each stage's) and a raw-vision callback (`sea_cache_config`).
CACHES = {
    "first block": (hooks.apply_first_block_cache, lambda pipe: hooks.FirstBlockCacheConfig(threshold=0.5)),
    "pyramid attention broadcast": (
        hooks.apply_pyramid_attention_broadcast,
        lambda pipe: hooks.PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2,
            spatial_attention_timestep_skip_range=(0, 1000),
            current_timestep_callback=lambda: pipe.current_timestep,
        ),
    ),
    "taylorseer": (hooks.apply_taylorseer_cache, lambda pipe: hooks.TaylorSeerCacheConfig()),
    "mag": (hooks.apply_mag_cache, lambda pipe: hooks.MagCacheConfig(mag_ratios=[1.0] * 8, num_inference_steps=8)),
    "faster": (
        hooks.apply_faster_cache,
        lambda pipe: hooks.FasterCacheConfig(
            spatial_attention_block_skip_range=2,
            spatial_attention_timestep_skip_range=(-1, 681),
            current_timestep_callback=lambda: pipe.current_timestep,
            is_guidance_distilled=True,
        ),
    ),
    "sea": (hooks.apply_sea_cache, lambda pipe: sea_cache_config(pipe, threshold=10.0)),
}
# Cells where the cache runs through every stage but no denoiser call of the contract's call skips work, by pipeline
# class: `min(work) == max(work)` is asserted for them instead, so that a change shows.
CACHES_WITHOUT_REUSE = {
    # diffusers' generic SeaCache path records no residual for these blocks, with or without lssgen
    # (docs/caches.md): FLUX.2's last single-stream block returns text and image tokens together, SD3's drops
    # the text stream.
    ("Flux2Pipeline", "sea"): "no residual recorded",
    ("Flux2KleinPipeline", "sea"): "no residual recorded",
    ("StableDiffusion3Pipeline", "sea"): "no residual recorded",
    # The tiny FLUX.2 call (8 steps, shortened) gives stages of 2, 2 and 3 steps: each starts with a cleared cache,
    # and TaylorSeer's 3-step warm-up leaves no step to reuse on. The stock 8-step call does reuse (4 of 8 calls).
    ("Flux2Pipeline", "taylorseer"): "stages shorter than the warm-up",
    ("Flux2KleinPipeline", "taylorseer"): "stages shorter than the warm-up",
}


def transformer_blocks(denoiser: torch.nn.Module) -> int:
    """The blocks diffusers' block caches (FirstBlockCache, MagCache, SeaCache) find: those in the denoiser's block
    lists of the known names."""
    return sum(
        len(blocks)
        for name, blocks in denoiser.named_children()
        if name in _ALL_TRANSFORMER_BLOCK_IDENTIFIERS and isinstance(blocks, torch.nn.ModuleList)
    )


def record_work(denoiser: torch.nn.Module) -> tuple[list[int], list]:
    """How many of the denoiser's innermost modules run in each of its calls (one count per call, appended as the
    calls happen), and the hook handles to remove. A cache that reuses a result skips the modules it stands for."""
    work = []

    def count(module, args):
        work[-1] += 1

    handles = [denoiser.register_forward_pre_hook(lambda module, args: work.append(0))]
    handles += [
        module.register_forward_pre_hook(count)
        for module in denoiser.modules()
        if next(module.children(), None) is None
    ]
    return work, handles


def final_latents_and_decoded(pipe, call: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the stock `pipe(**call)`: the loop's last latents (as the step-end callback sees them) and what the
    pipeline hands `vae.decode`, to check an adapter's `latents_to_vae` against the pipeline's own decode."""
    final, decoded = [], []
    decode = pipe.vae.decode
    pipe.vae.decode = lambda z, *args, **kwargs: decoded.append(z) or decode(z, *args, **kwargs)
    try:
        pipe(**call, callback_on_step_end=lambda p, i, t, k: final.append(k["latents"]) or {})
    finally:
        del pipe.vae.decode
    return final[-1], decoded[0]


def found_examples(test):
    for drawn in reversed(FOUND):
        test = example(drawn=drawn)(test)
    return test


class _Handles:
    def __init__(self, handles):
        self.handles = handles

    def remove(self):
        for handle in self.handles:
            handle.remove()


class AdapterContract:
    # --- what a family supplies -------------------------------------------------------------------------
    adapter_name: str = ""
    height = width = 256
    steps = 8
    # Options giving 3 stages (64, 128, 256 px) on a 256 px image, shortening as a 1024 px model would.
    three_stages: dict[str, Any] = {"min_resolution": 64, "base_height": 256, "base_width": 256}
    # (height, width, steps, options) cases whose denoiser calls are checked against the plan.
    trace_cases: list[tuple[int, int, int, dict[str, Any]]] = [
        (256, 256, 8, {"min_resolution": 128}),
        (256, 256, 8, {"min_resolution": 64, "base_height": 256, "base_width": 256}),
        (256, 256, 20, {"min_resolution": 64, "base_height": 256, "base_width": 256, "start_sigma": 0.667}),
        (
            256,
            256,
            20,
            {"min_resolution": 64, "base_height": 256, "base_width": 256, "shorten_intermediate_steps": False},
        ),
        (256, 128, 8, {"min_resolution": 64, "start_sigma": 0.667}),
        (192, 384, 20, {"min_resolution": 48, "base_height": 256, "base_width": 512}),
    ]
    # The call options (over `call_kwargs`) the cache matrix runs each cache through, after patching with
    # `three_stages`.
    cache_calls: tuple[dict[str, Any], ...] = ({"start_sigma": 0.75}, {"start_sigma": 0.667})
    calls_per_step = 1  # denoiser calls per step (2 where the pipeline runs CFG as two calls)
    # An image-to-image family's `strength` (its `call_kwargs` pass it with an `image`); 1.0: text-to-image.
    strength = 1.0
    lora_prefix = ""  # e.g. "transformer.transformer_blocks.0.attn.to_q": the module a test LoRA adapts
    # The share of the hypothesis profile's `max_examples` that this class's call-argument property draws
    # (`test_any_call_arguments_give_an_image_or_a_clear_error`). The property runs lssgen's generic argument handling
    # (option validation, the plan, the restore on error) through whichever family it runs on, and the family's own
    # adapter code for the drawn sizes, batches and generators. The generic part runs in full once, on FLUX.1
    # (`TestFlux` sets 1.0); every other family repeats it on a quarter of the examples, after the `FOUND` failure
    # classes, which every family runs in full. Under the fixed CI sample each such family draws its own examples
    # (a seed from its class name), so that together they try more distinct calls than one sample repeated.
    call_argument_share = 0.25

    def build_pipe(self, seed: int = 0) -> Any:
        raise NotImplementedError

    def call_kwargs(self, pipe, prompts: str | list[str] = "a red fox in the snow", seed: int = 0, **overrides):
        raise NotImplementedError

    def observe(self, pipe, kwargs: dict[str, Any]) -> dict[str, Any]:
        """What one denoiser call received: at least `size` (latent h, w) and `timestep` (plan units)."""
        raise NotImplementedError

    def expected(self, pipe, stage, timestep: float) -> dict[str, Any]:
        """What a denoiser call of `stage` at `timestep` should receive (same keys as `observe`)."""
        raise NotImplementedError

    # --- helpers ------------------------------------------------------------------------------------------
    @pytest.fixture
    def pipe(self):
        pipe = self.build_pipe(seed=0)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def denoiser(self, pipe):
        return getattr(pipe, lssgen.find_adapter(pipe).denoiser)

    def plan(self, pipe, height=None, width=None, steps=None, **options) -> StagePlan:
        if not lssgen.is_patched(pipe):
            raise AssertionError("patch the pipe first")
        return lssgen.plan_for(
            pipe, height or self.height, width or self.width, steps or self.steps, strength=self.strength, **options
        )

    def images(self, pipe, **kwargs):
        return pipe(**kwargs).images

    def noise_level(self, pipe, timestep: float, height: int, width: int) -> float:
        """The sigma the family's denoiser is told by `timestep` in a call of this size (flow families): by the stock
        pipeline's rule, independently of lssgen's adapter."""
        return timestep / pipe.scheduler.config.num_train_timesteps

    def output_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        """The shape of `images(...)` for `batch` outputs of `height` x `width` (a video family adds frames)."""
        return (batch, 3, height, width)

    def upsampler_batch(self, batch: int) -> int:
        """The batch the upsampler sees for `batch` outputs (a video family folds its frames into it)."""
        return batch

    def conditioning_hooks(self, pipe, records: list[dict[str, Any]]) -> list:
        """Hooks on submodules that add to `records[-1]` what the denoiser consumed inside its forward, where
        lssgen's hooks have already rewritten it (a forward pre-hook on the denoiser sees the inputs before)."""
        return []

    def trace(self, pipe):
        """Record `observe(...)` of every denoiser call; returns the records and a handle to stop."""
        records = []
        denoiser = self.denoiser(pipe)
        signature = inspect.signature(type(denoiser).forward)

        def record(module, args, kwargs):
            # By name, whether the pipeline passes an input by position (the UNet's `sample`) or by keyword.
            records.append(self.observe(pipe, signature.bind(module, *args, **kwargs).arguments))

        handles = [denoiser.register_forward_pre_hook(record, with_kwargs=True)]
        return records, _Handles([*handles, *self.conditioning_hooks(pipe, records)])

    def small_upsampler(self, pipe):
        channels = lssgen.find_adapter(pipe).latent_channels(pipe)
        return lssgen.LatentUpsampler(channels, channels, block_out_channels=(32, 32), norm_num_groups=8)

    # --- stock equality and undo ----------------------------------------------------------------------------
    def test_start_sigma_one_and_unpatch_are_bit_identical_to_stock(self, pipe):
        stock = self.build_pipe(seed=0)
        stock.set_progress_bar_config(disable=True)
        expected = self.images(stock, **self.call_kwargs(stock))

        lssgen.patch(pipe)
        assert torch.equal(self.images(pipe, **self.call_kwargs(pipe), start_sigma=1.0), expected)
        scaled = self.images(pipe, **self.call_kwargs(pipe), **self.three_stages)
        assert scaled.shape == expected.shape and not torch.equal(scaled, expected)

        lssgen.unpatch(pipe)
        assert torch.equal(self.images(pipe, **self.call_kwargs(pipe)), expected)

    def test_patch_is_per_instance_idempotent_and_undone_exactly(self, pipe):
        stock_class = type(pipe)
        stock_call = stock_class.__call__
        other = self.build_pipe(seed=0)
        stock_scheduler = pipe.scheduler
        lssgen.patch(pipe)
        lssgen.patch(pipe, start_sigma=0.667)  # re-patching replaces, never stacks
        assert isinstance(pipe, stock_class) and type(pipe) is not stock_class
        assert type(pipe).__name__ == stock_class.__name__
        assert lssgen.find_adapter(pipe).name == self.adapter_name
        assert pipe._lssgen.defaults.start_sigma == 0.667
        assert type(other) is stock_class and not lssgen.is_patched(other)
        # The stock class gained no argument: its `__call__` is untouched, and where it takes no `**kwargs`
        # (SD and SDXL swallow unknown ones) calling another instance with an lssgen option still fails.
        parameters = inspect.signature(stock_call).parameters
        assert stock_class.__call__ is stock_call and "start_sigma" not in parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            with pytest.raises(TypeError):
                other(**self.call_kwargs(other), start_sigma=0.75)

        lssgen.unpatch(pipe)
        lssgen.unpatch(pipe)  # a second unpatch is a no-op
        assert type(pipe) is stock_class and "_lssgen" not in pipe.__dict__
        registry = getattr(self.denoiser(pipe), "_diffusers_hook", None)
        assert registry is None or not [name for name in registry.hooks if name.startswith("lssgen")]
        assert pipe.scheduler is stock_scheduler

    # --- the denoiser sees exactly the plan ------------------------------------------------------------------
    def test_denoiser_calls_follow_the_plan(self, pipe):
        lssgen.patch(pipe)
        for height, width, steps, options in self.trace_cases:
            plan = self.plan(pipe, height, width, steps, **options)
            assert len(plan.stages) >= 2, (height, width, options)
            records, handle = self.trace(pipe)
            kwargs = self.call_kwargs(pipe, height=height, width=width, num_inference_steps=steps)
            images = self.images(pipe, **kwargs, **options)
            handle.remove()
            assert images.shape == self.output_shape(1, height, width)
            expected = [
                self.expected(pipe, stage, t)
                for stage in plan.stages
                for t in stage.timesteps
                for _ in range(self.calls_per_step)
            ]
            assert len(records) == len(expected), (height, width, steps, options)
            for got, want in zip(records, expected):
                assert got.keys() == want.keys()
                for key in want:
                    if key == "timestep":
                        assert got[key] == pytest.approx(want[key], abs=1e-3), (key, height, width, options)
                    else:
                        assert got[key] == want[key], (key, height, width, steps, options)

    # --- batches, seeds, scaling spaces -----------------------------------------------------------------------
    def test_batch_of_prompts_with_several_images_each(self, pipe):
        lssgen.patch(pipe, **self.three_stages)
        kwargs = {"prompts": ["a fox", "a boat"], "num_images_per_prompt": 2}
        first = self.images(pipe, **self.call_kwargs(pipe, **kwargs))
        again = self.images(pipe, **self.call_kwargs(pipe, **kwargs))
        assert first.shape == self.output_shape(4, self.height, self.width)
        assert torch.equal(first, again)  # same seed, same images
        for i in range(4):
            for j in range(i + 1, 4):
                assert not torch.equal(first[i], first[j])

    def test_stage_noise_is_drawn_for_every_image_of_the_batch(self, pipe):
        # One generator per image: had any stage drawn noise for fewer images, the per-image streams would
        # shift and image 3 would no longer match the same image generated on its own.
        lssgen.patch(pipe, **self.three_stages)
        generators = [torch.Generator().manual_seed(s) for s in (11, 12, 13, 14)]
        batch = self.images(
            pipe,
            **self.call_kwargs(pipe, prompts=["a fox", "a boat"], num_images_per_prompt=2, generator=generators),
        )
        alone = self.images(
            pipe, **self.call_kwargs(pipe, prompts="a boat", generator=torch.Generator().manual_seed(14))
        )
        torch.testing.assert_close(batch[3], alone[0], atol=1e-4, rtol=1e-4)

    def test_different_seeds_give_different_images(self, pipe):
        lssgen.patch(pipe, **self.three_stages)
        a = self.images(pipe, **self.call_kwargs(pipe, seed=1))
        b = self.images(pipe, **self.call_kwargs(pipe, seed=2))
        assert not torch.equal(a, b)

    @pytest.mark.parametrize("space", ["learned", "resnet", "latent", "pixel"])
    def test_every_scaling_space_runs(self, pipe, space):
        upsampler = self.small_upsampler(pipe)
        lssgen.patch(pipe, upsampler, **self.three_stages)
        upsampler_inputs, encodes = [], []
        handle = upsampler.register_forward_pre_hook(lambda module, args: upsampler_inputs.append(args[0].shape))
        encode = pipe.vae.encode
        pipe.vae.encode = lambda *args, **kwargs: encodes.append(1) or encode(*args, **kwargs)
        try:
            images = self.images(pipe, **self.call_kwargs(pipe, num_images_per_prompt=2), scaling_space=space)
        finally:
            handle.remove()
            del pipe.vae.encode
        assert images.shape == self.output_shape(2, self.height, self.width) and torch.isfinite(images).all()
        plan = self.plan(pipe, **self.three_stages)
        channels = lssgen.find_adapter(pipe).latent_channels(pipe)
        if space in ("learned", "resnet"):  # once per stage switch
            batch = self.upsampler_batch(2)
            assert upsampler_inputs == [(batch, channels, s.latent_height, s.latent_width) for s in plan.stages[:-1]]
        else:
            assert upsampler_inputs == []
        # An img2img call also encodes its input image, once, at the first stage's size.
        image_encodes = 1 if self.strength < 1.0 else 0
        assert len(encodes) == (len(plan.stages) - 1 if space == "pixel" else 0) + image_encodes

    def test_scaling_spaces_give_different_results(self, pipe):
        lssgen.patch(pipe, self.small_upsampler(pipe), **self.three_stages)
        results = {
            space: self.images(pipe, **self.call_kwargs(pipe), scaling_space=space)
            for space in ("learned", "latent", "pixel")
        }
        assert not torch.equal(results["learned"], results["latent"])
        assert not torch.equal(results["latent"], results["pixel"])

    # --- callbacks, interrupt, progress ------------------------------------------------------------------------
    def test_user_callback_sees_every_step_once(self, pipe):
        lssgen.patch(pipe, **self.three_stages)
        seen = []

        def on_step(pipeline, step_index, timestep, callback_kwargs):
            seen.append(step_index)
            return {}

        self.images(pipe, **self.call_kwargs(pipe), callback_on_step_end=on_step)
        assert seen == list(range(self.plan(pipe, **self.three_stages).total_steps))

    def test_pipeline_callbacks_are_chained(self, pipe):
        class Recorder(PipelineCallback):
            tensor_inputs = ["latents"]

            def __init__(self):
                super().__init__()
                self.steps = []

            def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
                self.steps.append(step_index)
                return callback_kwargs

        lssgen.patch(pipe, **self.three_stages)
        first, second = Recorder(), Recorder()
        self.images(pipe, **self.call_kwargs(pipe), callback_on_step_end=first)
        self.images(pipe, **self.call_kwargs(pipe), callback_on_step_end=MultiPipelineCallbacks([second]))
        total = self.plan(pipe, **self.three_stages).total_steps
        assert first.steps == second.steps == list(range(total))

    def test_interrupt_in_a_low_resolution_stage_still_returns_a_full_size_image(self, pipe):
        lssgen.patch(pipe, **self.three_stages)
        calls = []

        def stop_early(pipeline, step_index, timestep, callback_kwargs):
            calls.append(step_index)
            pipeline._interrupt = True
            return {}

        images = self.images(pipe, **self.call_kwargs(pipe), callback_on_step_end=stop_early)
        assert calls == [0]
        assert images.shape == self.output_shape(1, self.height, self.width) and torch.isfinite(images).all()

    def test_one_progress_bar_over_all_stages(self, pipe, capfd):
        lssgen.patch(pipe, **self.three_stages)
        total = self.plan(pipe, **self.three_stages).total_steps
        pipe.set_progress_bar_config(disable=False)
        capfd.readouterr()
        self.images(pipe, **self.call_kwargs(pipe))
        err = capfd.readouterr().err
        assert f"{total}/{total}" in err and f"stage 3/3 {self.width}x{self.height}" in err
        pipe.set_progress_bar_config(disable=True)
        self.images(pipe, **self.call_kwargs(pipe))
        assert "it/s" not in capfd.readouterr().err

    # --- bad input: clear errors, and the pipe keeps working ---------------------------------------------------
    def assert_still_works(self, pipe, stock_scheduler):
        assert pipe.scheduler is stock_scheduler and pipe._lssgen.run is None
        images = self.images(pipe, **self.call_kwargs(pipe), **self.three_stages)
        assert images.shape == self.output_shape(1, self.height, self.width)

    @pytest.mark.parametrize(
        ("options", "error", "match"),
        [
            ({"start_sigma": 0.0}, ValueError, "start_sigma"),
            ({"start_sigma": 1.5}, ValueError, "start_sigma"),
            ({"start_sigma": "0.7"}, TypeError, "start_sigma"),
            ({"min_resolution": 0}, ValueError, "min_resolution"),
            ({"min_resolution": 512}, ValueError, "min_resolution.*larger than the image's short side"),
            ({"shorten_intermediate_steps": "no"}, TypeError, "shorten_intermediate_steps"),
            ({"scaling_space": "pixels"}, ValueError, "Unknown `scaling_space`"),
            ({"scaling_space": "learned"}, ValueError, "needs a latent upsampler"),
            ({"latents": "noise"}, ValueError, "`latents` cannot be combined"),
            ({"generator": [torch.Generator()] * 3, "min_resolution": 128}, ValueError, "3 generators"),
            (
                {"prompt": 5, "min_resolution": 128},
                TypeError,
                "`prompt` must be a string or a non-empty list of strings",
            ),
        ],
    )
    def test_bad_call_arguments_raise_and_leave_the_pipe_usable(self, pipe, options, error, match):
        stock_scheduler = pipe.scheduler
        lssgen.patch(pipe, None)  # no upsampler (FLUX.2 would get its shipped one), for scaling_space='learned'
        kwargs = self.call_kwargs(pipe)
        kwargs.update(options)
        if kwargs.get("latents") == "noise":
            kwargs["latents"] = torch.zeros(1)
        with pytest.raises(error, match=match):
            pipe(**kwargs)
        self.assert_still_works(pipe, stock_scheduler)

    def test_any_call_arguments_give_an_image_or_a_clear_error(self):
        """Property: whatever a user passes, the patched call returns finite images of the planned size, or raises a
        ValueError/TypeError that names the argument (or the error the stock pipeline itself raises for that call);
        either way the pipe is unchanged: a reference call afterwards is bit-identical to one before."""
        pipe, stock = self.build_pipe(seed=0), self.build_pipe(seed=0)
        for p in (pipe, stock):
            p.set_progress_bar_config(disable=True)
        lssgen.patch(pipe, self.small_upsampler(pipe))
        stock_scheduler = pipe.scheduler

        def reference():
            kwargs = self.call_kwargs(pipe, height=128, width=128, num_inference_steps=4)
            return self.images(
                pipe, **kwargs, min_resolution=64, shorten_intermediate_steps=False, scaling_space="learned"
            )

        before = reference()

        @given(drawn=call_arguments())
        @found_examples
        def check(drawn: Drawn):
            kwargs = self.call_kwargs(pipe, prompts=drawn.prompts, generator=drawn.generator(), **drawn.call)
            try:
                images = self.images(pipe, **kwargs, **drawn.options)
            except Exception as error:  # noqa: BLE001 - the property is about which errors
                event(f"raised {type(error).__name__}")
                self.assert_clear_or_stock_error(error, drawn, stock)
            else:
                event("generated")
                self.assert_planned_images(pipe, stock, images, drawn)
            assert pipe.scheduler is stock_scheduler and pipe._lssgen.run is None
            assert torch.equal(reference(), before)

        if self.call_argument_share < 1.0:
            examples = max(1, math.ceil(settings.default.max_examples * self.call_argument_share))
            check = settings(max_examples=examples)(check)
            if settings.default.derandomize:  # else every run draws fresh examples anyway
                check = seed(zlib.crc32(type(self).__name__.encode()))(check)
        check()

    def assert_clear_or_stock_error(self, error: Exception, drawn: Drawn, stock) -> None:
        # The call's arguments and the method's options (a default `min_resolution` can be what does not fit).
        names = [*drawn.call, *OPTION_NAMES, "prompt", "generator"]
        if isinstance(error, (ValueError, TypeError)) and any(name in str(error) for name in names):
            return
        # Else it must be the very error the stock pipeline raises for the same call: that one is not ours to change.
        kwargs = self.call_kwargs(stock, prompts=drawn.prompts, generator=drawn.generator(), **drawn.call)
        try:
            self.images(stock, **kwargs)
        except Exception as stock_error:  # noqa: BLE001
            if type(stock_error) is type(error) and str(stock_error) == str(error):
                return
            raise AssertionError(f"{drawn}: lssgen raised {error!r}, the stock pipeline {stock_error!r}") from error
        raise AssertionError(f"{drawn}: the stock pipeline runs this call, lssgen raised {error!r}") from error

    def assert_planned_images(self, pipe, stock, images: torch.Tensor, drawn: Drawn) -> None:
        assert torch.isfinite(images).all(), drawn
        if drawn.options.get("start_sigma", Options.start_sigma) == 1.0:
            # The stock pipeline ran, unchanged: the same call on a never-patched pipe gives the same images.
            kwargs = self.call_kwargs(stock, prompts=drawn.prompts, generator=drawn.generator(), **drawn.call)
            assert torch.equal(images, self.images(stock, **kwargs)), drawn
            return
        height, width = drawn.call.get("height", self.height), drawn.call.get("width", self.width)
        steps = drawn.call.get("num_inference_steps", self.steps)
        plan = lssgen.plan_for(pipe, height, width, steps, strength=self.strength, **drawn.options)
        assert tuple(images.shape) == self.output_shape(drawn.images_in_batch(), plan.height, plan.width), drawn

    def test_error_inside_the_loop_restores_the_scheduler(self, pipe):
        stock_scheduler = pipe.scheduler
        lssgen.patch(pipe, **self.three_stages)

        def broken(pipeline, step_index, timestep, callback_kwargs):
            raise RuntimeError("user callback failed")

        with pytest.raises(RuntimeError, match="user callback failed"):
            pipe(**self.call_kwargs(pipe), callback_on_step_end=broken)
        self.assert_still_works(pipe, stock_scheduler)

    def test_sizes_that_do_not_halve_are_rounded_down_with_a_warning(self, pipe, caplog):
        lssgen.patch(pipe)
        adapter = lssgen.find_adapter(pipe)
        unit = adapter.vae_scale_factor(pipe) * adapter.latent_multiple * 2  # K = 1 (short side 200 // 64 = 3)
        height, width = 250 // unit * unit, 200 // unit * unit
        with caplog.at_level(logging.WARNING, logger="lssgen"):
            images = self.images(pipe, **self.call_kwargs(pipe, height=250, width=200), min_resolution=64)
        assert images.shape == self.output_shape(1, height, width)
        assert f"generating {width}x{height} instead" in caplog.text

    def test_upsampler_with_wrong_channels_is_rejected_at_patch(self, pipe):
        channels = lssgen.find_adapter(pipe).latent_channels(pipe)
        wrong = lssgen.LatentUpsampler(channels + 4, channels + 4, block_out_channels=(32, 32), norm_num_groups=8)
        with pytest.raises(ValueError, match=f"denoises {channels}-channel"):
            lssgen.patch(pipe, wrong)
        assert not lssgen.is_patched(pipe)

    # --- stateful hooks (caches) ---------------------------------------------------------------------------------
    def test_stateful_hooks_are_reset_at_every_stage_and_around_every_call(self, pipe):
        """A cache keeps tensors of earlier steps: none may reach a step of another resolution or another call."""
        from diffusers.hooks import HookRegistry, ModelHook

        class SizeMemory(ModelHook):  # a stateful hook that remembers the size of the last latent it saw
            _is_stateful = True

            def __init__(self):
                super().__init__()
                self.last, self.seen = None, []

            def pre_forward(self, module, *args, **kwargs):
                latent = next(a for a in [*args, *kwargs.values()] if isinstance(a, torch.Tensor))
                self.seen.append((self.last, tuple(latent.shape)))
                self.last = tuple(latent.shape)
                return args, kwargs

            def reset_state(self, module):
                self.last = None
                return module

        memory = SizeMemory()
        HookRegistry.check_if_exists_or_initialize(self.denoiser(pipe)).register_hook(memory, "size_memory")
        lssgen.patch(pipe, **self.three_stages)
        memory.last = "left over"  # as a call that was interrupted or raised would leave it
        self.images(pipe, **self.call_kwargs(pipe))
        plan = self.plan(pipe, **self.three_stages)
        starts = {0, *plan.stage_ends[:-1]}
        per_call = self.calls_per_step
        assert len(memory.seen) == plan.total_steps * per_call
        for index, (before, size) in enumerate(memory.seen):
            # Cleared exactly before each stage's first call; within a stage the state carries over.
            assert (before is None) == (index // per_call in starts and index % per_call == 0), index
            assert before is None or before == size
        assert memory.last is None  # and after the call

        def broken(pipeline, step_index, timestep, callback_kwargs):
            raise RuntimeError("user callback failed")

        with pytest.raises(RuntimeError, match="user callback failed"):
            pipe(**self.call_kwargs(pipe), callback_on_step_end=broken)
        assert memory.last is None  # also after an exception

    @pytest.mark.parametrize("cache", list(CACHES))
    def test_diffusers_caches_compose(self, pipe, cache):
        """Each cache diffusers can apply to this denoiser runs through a 3-stage plan (the README's matrix)."""
        if cache in ("pyramid attention broadcast", "faster") and not hasattr(type(pipe), "current_timestep"):
            pytest.skip(f"{type(pipe).__name__} exposes no current_timestep, which {cache} needs")
        apply, config = CACHES[cache]
        denoiser = type(self.denoiser(pipe)).__name__
        try:
            apply(self.denoiser(pipe), config(pipe))
        except Exception as error:  # noqa: BLE001 - diffusers' own refusal: a cell of the matrix, not ours
            blocks = transformer_blocks(self.denoiser(pipe))
            if blocks == 1:
                # FirstBlockCache needs a head and a tail block: the test's tiny model is too small, not diffusers.
                raise AssertionError(
                    f"diffusers failed to apply {cache} to {denoiser} ({error!r}), whose tiny test model has a single "
                    "transformer block: build it with two or more (lssgen/tiny) so that the matrix says what diffusers "
                    "can do."
                ) from error
            pytest.skip(f"diffusers cannot apply {cache} to {denoiser}: {error!r}")
        if not any(hook._is_stateful for hook in diffusers_hooks(self.denoiser(pipe))):
            pytest.skip(f"diffusers finds nothing to cache in {denoiser} for {cache}")
        try:
            self.images(pipe, **self.call_kwargs(pipe))
        except Exception as error:  # noqa: BLE001 - the stock pipeline fails with it too: not ours either
            if "No cache context is set" not in str(error):
                pytest.skip(f"the stock {type(pipe).__name__} cannot run {cache} on {denoiser}: {error!r}")
            # The pipeline enters no cache context. lssgen gives every denoiser call one (`lssgen.caches`), so the
            # cache must run under lssgen wherever it runs on this pipeline in a context.
            set_cache_context(self.denoiser(pipe), CacheContext("cond"))
            try:
                self.images(pipe, **self.call_kwargs(pipe))
            except Exception as error:  # noqa: BLE001 - diffusers' own failure, as above
                pytest.skip(f"the stock {type(pipe).__name__} cannot run {cache} on {denoiser}: {error!r}")
            finally:
                set_cache_context(self.denoiser(pipe), None)
        lssgen.patch(pipe, **self.three_stages)
        no_reuse = CACHES_WITHOUT_REUSE.get((type(pipe).__name__, cache))
        reused = {}
        for index, options in enumerate(self.cache_calls):
            work, handles = record_work(self.denoiser(pipe))
            try:
                images = self.images(pipe, **{**self.call_kwargs(pipe), **options})
            finally:
                for handle in handles:
                    handle.remove()
            assert images.shape == self.output_shape(1, self.height, self.width) and torch.isfinite(images).all()
            plan_options = {key: value for key, value in options.items() if key != "num_inference_steps"}
            plan = self.plan(pipe, steps=options.get("num_inference_steps"), **{**self.three_stages, **plan_options})
            assert len(work) == plan.total_steps * self.calls_per_step
            reused[index] = min(work) < max(work)
        # Every stage's first call computes in full (its cache was just cleared): a call that ran fewer of the
        # denoiser's modules reused a cached result. (FasterCache on Flux2Pipeline reuses at 0.667 only: with
        # stages this short, whether a step falls in its skip pattern depends on the plan.)
        if no_reuse:
            assert not any(reused.values()), f"{cache} now skips work on {denoiser}: update the matrix ({no_reuse})"
        else:
            assert any(reused.values()), f"{cache} never skipped work on {denoiser}; module calls: {work}"

    def denoiser_timestep(self, args, kwargs) -> float:
        """The timestep (0-1000) a denoiser call was given; most flow pipelines pass sigma as `timestep`."""
        return float(kwargs["timestep"][0]) * 1000

    def check_each_stage_gets_the_stock_schedule(self, scheduler=None):
        """Every stage's full schedule (at 512 px, 20 steps, three stages) is the one the unpatched pipeline sets
        for that stage's size and step count, and the denoiser sees exactly those timesteps (`denoiser_timestep`);
        `scheduler` builds a replacement scheduler."""
        pipe, stock = self.build_pipe(), self.build_pipe()
        for p in (pipe, stock):
            p.set_progress_bar_config(disable=True)
            if scheduler is not None:
                p.scheduler = scheduler()
        lssgen.patch(pipe)
        plan = self.plan(pipe, 512, 512, 20, min_resolution=128)
        assert [(s.latent_height, s.latent_width) for s in plan.stages] == [(16, 16), (32, 32), (64, 64)]
        seen = []
        handle = stock.transformer.register_forward_pre_hook(
            lambda module, args, kwargs: seen.append(self.denoiser_timestep(args, kwargs)), with_kwargs=True
        )
        for stage in plan.stages:
            seen.clear()
            # Only the timesteps the denoiser sees are compared: the stock call stops at its latents (no decode).
            size = {"height": stage.height, "width": stage.width}
            stock(**{**self.call_kwargs(stock, **size, num_inference_steps=stage.num_steps), "output_type": "latent"})
            full = seen[:: self.calls_per_step]
            assert len(full) == stage.num_steps
            assert stage.timesteps == pytest.approx(full[stage.begin_index :], abs=1e-3)
        handle.remove()
        records, handle = self.trace(pipe)
        images = self.images(
            pipe, **self.call_kwargs(pipe, height=512, width=512, num_inference_steps=20), min_resolution=128
        )
        handle.remove()
        assert images.shape == self.output_shape(1, 512, 512) and torch.isfinite(images).all()
        want = [t for s in plan.stages for t in s.timesteps for _ in range(self.calls_per_step)]
        assert [r["timestep"] for r in records] == pytest.approx(want, abs=1e-3)

    # --- LoRA and offloading -----------------------------------------------------------------------------------
    def test_lora_applies_in_every_stage(self, pipe, tmp_path):
        from safetensors.torch import save_file

        lssgen.patch(pipe, **self.three_stages)
        without = self.images(pipe, **self.call_kwargs(pipe))
        target = pipe
        for part in self.lora_prefix.split("."):
            target = getattr(target, part) if not part.isdigit() else target[int(part)]
        generator = torch.Generator().manual_seed(0)
        save_file(
            {
                f"{self.lora_prefix}.lora_A.weight": torch.randn(2, target.in_features, generator=generator),
                f"{self.lora_prefix}.lora_B.weight": torch.randn(target.out_features, 2, generator=generator),
            },
            tmp_path / "lora.safetensors",
        )
        pipe.load_lora_weights(tmp_path / "lora.safetensors", adapter_name="tiny")
        target = pipe
        for part in self.lora_prefix.split("."):
            target = getattr(target, part) if not part.isdigit() else target[int(part)]
        calls = []
        handle = target.lora_A["tiny"].register_forward_pre_hook(lambda module, args: calls.append(1))
        with_lora = self.images(pipe, **self.call_kwargs(pipe))
        handle.remove()
        plan = self.plan(pipe, **self.three_stages)
        assert len(calls) == plan.total_steps * self.calls_per_step  # every denoiser call, in every stage
        assert not torch.equal(with_lora, without)

    @pytest.mark.parametrize("offload", ["model", "group"])
    @pytest.mark.skipif(
        not torch.cuda.is_available() and version.parse(diffusers.__version__) < version.parse("0.41"),
        reason="diffusers 0.34-0.40 cannot offload without an accelerator (torch.accelerator returns None)",
    )
    def test_offloading_keeps_working(self, pipe, offload):
        lssgen.patch(pipe, **self.three_stages)
        expected = self.images(pipe, **self.call_kwargs(pipe))
        cpu = torch.device("cpu")
        if offload == "model":
            # On a CPU-only machine the "accelerator" is the CPU too; the offload hooks still run.
            pipe.enable_model_cpu_offload(device="cpu")
        else:
            self.denoiser(pipe).enable_group_offload(
                onload_device=cpu, offload_device=cpu, offload_type="block_level", num_blocks_per_group=1
            )
        assert torch.equal(self.images(pipe, **self.call_kwargs(pipe)), expected)
        lssgen.unpatch(pipe)
        assert self.images(pipe, **self.call_kwargs(pipe)).shape == expected.shape
