"""Multi-resolution methods (issue #27): choosing and spelling a method, and `refine` (MrFlow) on the tiny pipeline of
every flow family through a subset of the adapter contract plus its own checks: off is the stock pipeline, the
first stage is the stock generation at half size, the last stage steps on the linear unshifted schedule, the re-noise
matches an independent computation, and bad input is refused before anything is denoised. The `lssgen` method
itself is the adapter contract's subject everywhere else."""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
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
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, FluxImg2ImgPipeline, UniPCMultistepScheduler

import lssgen
from lssgen.methods import METHODS, LSSGen, Refine, method_table, resolve_method, unshifted_schedule
from lssgen.scaling import scale_up
from lssgen.tiny import build_tiny_flux_pipeline, build_tiny_sd_pipeline, build_tiny_sdxl_pipeline
from lssgen.tiny.flux import build_tiny_flux_controlnet_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: extra threads only add synchronisation


# --- spelling and listing -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("spelling", "method"),
    [
        (None, LSSGen()),
        ("lssgen", LSSGen()),
        ("refine", Refine(sigma=0.12, steps=1)),
        ("refine:sigma=0.2", Refine(sigma=0.2, steps=1)),
        (" refine : steps = 3 , sigma=0.05 ", Refine(sigma=0.05, steps=3)),
        (Refine(sigma=0.3), Refine(sigma=0.3, steps=1)),
    ],
)
def test_a_method_is_named_spelled_with_parameters_or_given(spelling, method):
    assert resolve_method(spelling) == method
    assert resolve_method(method.spelling()) == method  # the spelling `describe()` prints reads back


@pytest.mark.parametrize(
    ("spelling", "error", "match"),
    [
        (
            "mrflow",
            ValueError,
            "Unknown `method` 'mrflow'; known methods are 'lssgen', 'refine', 'spectral', 'bottleneck'",
        ),
        ("refine:sigma", ValueError, "unknown parameter 'sigma'; its parameters are sigma, steps"),
        ("refine:strength=0.5", ValueError, "unknown parameter 'strength=0.5'"),
        ("lssgen:start_sigma=0.5", ValueError, "its parameters are none"),
        ("refine:sigma=high", ValueError, "`sigma` must be a number, got 'high'"),
        ("refine:steps=1.5", ValueError, "`steps` must be an int, got '1.5'"),
        ("refine:steps=1,steps=2", ValueError, "`steps` is given twice in 'refine:steps=1,steps=2'"),
        ("refine:sigma=0", ValueError, r"`sigma` must be in \(0, 1\)"),
        ("refine:sigma=1", ValueError, r"`sigma` must be in \(0, 1\)"),
        ("refine:steps=0", ValueError, "`steps` must be a positive integer"),
        (3, TypeError, "`method` must be a method name"),
    ],
)
def test_bad_method_spellings_name_what_is_wrong(spelling, error, match):
    with pytest.raises(error, match=match):
        resolve_method(spelling)


def test_refine_parameters_are_checked_as_the_instance_is_made():
    with pytest.raises(TypeError, match="`steps` must be an int"):
        Refine(steps=True)
    with pytest.raises(ValueError, match="`sigma` must be in"):
        Refine(sigma=-0.1)


def test_the_method_table_lists_every_method_with_parameters_defaults_and_sources():
    table = {row["name"]: row for row in method_table()}
    assert list(table) == list(METHODS) == ["lssgen", "refine", "spectral", "bottleneck"]
    assert table["refine"]["parameters"][0][:2] == ("sigma", 0.12)
    assert table["refine"]["parameters"][1][:2] == ("steps", 1)
    assert table["refine"]["sources"] == ("MrFlow, arXiv 2607.01642",)
    assert table["lssgen"]["sources"] == ("LSSGen, arXiv 2507.16154",)
    assert table["refine"]["options"] == ["noise", "scaling_space"]
    assert [p[:2] for p in table["spectral"]["parameters"]] == [
        ("delta", 0.1),
        ("halvings", 1),
        ("a", None),
        ("beta", None),
    ]
    assert table["spectral"]["options"] == ["noise"] and "SPEED" in table["spectral"]["sources"][0]
    assert "min_resolution" in table["lssgen"]["options"] and "method" not in table["lssgen"]["options"]


# --- where a method cannot go: clear errors ---------------------------------------------------------------------
@pytest.mark.parametrize("build", [build_tiny_sd_pipeline, build_tiny_sdxl_pipeline], ids=["sd", "sdxl"])
def test_refine_refuses_diffusion_families_at_patch_and_at_call(build):
    pipe = build(seed=0)
    with pytest.raises(ValueError, match="method 'refine' needs a flow-matching pipeline"):
        lssgen.patch(pipe, None, method="refine")
    assert not lssgen.is_patched(pipe)
    lssgen.patch(pipe, None)
    with pytest.raises(ValueError, match="method 'refine' needs a flow-matching pipeline"):
        pipe(prompt="a fox", height=128, width=128, num_inference_steps=2, method="refine")
    with pytest.raises(ValueError, match="method 'refine' needs a flow-matching pipeline"):
        lssgen.plan_for(pipe, 128, 128, 2, method="refine")


def test_options_a_method_does_not_read_are_refused_where_they_are_given():
    pipe = build_tiny_flux_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    # At patch: the patch's own method with the patch's own options.
    with pytest.raises(ValueError, match=r"`min_resolution` \(given to lssgen.patch\(\)\) does not apply"):
        lssgen.patch(pipe, None, method="refine", min_resolution=64)
    assert not lssgen.is_patched(pipe)
    lssgen.patch(pipe, None, method="refine", start_sigma=1.0)  # the off switch is every method's
    # Per call: an option given with the call's method (or the patch's).
    with pytest.raises(ValueError, match=r"`base_height` \(given to the call\) does not apply to method 'refine'"):
        pipe(**test_flux.flux_call_kwargs(pipe), start_sigma=0.75, base_height=512)
    # lssgen's options given to patch are the defaults of the methods that read them: a call choosing refine runs.
    lssgen.patch(pipe, None, min_resolution=64, shorten_intermediate_steps=False)
    plan = lssgen.plan_for(pipe, 256, 256, 8, method="refine")
    assert plan.method == "refine:sigma=0.12,steps=1" and len(plan.stages) == 2
    with pytest.raises(ValueError, match=r"`min_resolution` \(given to lssgen.plan_for\(\)\)"):
        lssgen.plan_for(pipe, 256, 256, 8, method="refine", min_resolution=64)


def test_refine_refuses_image_to_image_and_controlnet_calls_for_now():
    pipe = FluxImg2ImgPipeline(**build_tiny_flux_pipeline(seed=0).components)
    lssgen.patch(pipe, None, method="refine")
    image = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(7))
    with pytest.raises(ValueError, match="method 'refine' runs text-to-image calls only, got `strength`=0.6"):
        pipe(**test_flux.flux_call_kwargs(pipe), image=image, strength=0.6)
    controlled = build_tiny_flux_controlnet_pipeline(seed=0)
    lssgen.patch(controlled, None)
    with pytest.raises(ValueError, match="method 'refine' does not take ControlNet pipelines yet"):
        controlled(**test_flux.flux_call_kwargs(controlled), control_image=image, method="refine")
    with pytest.raises(ValueError, match="method 'refine' does not take ControlNet pipelines yet"):
        lssgen.plan_for(controlled, 256, 256, 8, method="refine")


def test_the_unshifted_schedule_is_made_or_refused_by_what_the_scheduler_can_do():
    """Every shifting config key is overridden, and a scheduler that would still not step through the sigmas as given
    is refused with what it lacks."""
    sigmas = np.linspace(0.3, 0.0, 4)[:-1]
    shifting = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0, shift_terminal=0.02)
    config, kwargs, scheduler = unshifted_schedule(shifting, sigmas)
    assert config["use_dynamic_shifting"] is False and config["shift"] == 1.0 and config["shift_terminal"] is None
    assert [float(s) for s in scheduler.sigmas] == pytest.approx([0.3, 0.2, 0.1, 0.0], abs=1e-7)
    assert shifting.config.shift == 3.0  # the pipeline's own scheduler is left alone
    with pytest.raises(ValueError, match=r"turns the sigmas .* into .* steps through the sigmas it is given"):
        unshifted_schedule(FlowMatchEulerDiscreteScheduler(invert_sigmas=True), sigmas)
    with pytest.raises(ValueError, match="UniPCMultistepScheduler cannot step through custom sigmas"):
        unshifted_schedule(UniPCMultistepScheduler(), sigmas)  # not on flow sigmas
    with pytest.raises(ValueError, match="DDIMScheduler.set_timesteps takes no `sigmas`"):
        unshifted_schedule(DDIMScheduler(), sigmas)


def test_describe_names_the_method():
    pipe = build_tiny_flux_pipeline(seed=0)
    lssgen.patch(pipe, None)
    lines = lssgen.plan_for(pipe, 256, 256, 8, method="refine:steps=2").describe().splitlines()
    assert lines[0] == "method: refine:sigma=0.12,steps=2"
    assert lines[2].split()[:4] == ["1/2", "128x128", "16x16", "8"]
    assert lines[3].split() == ["2/2", "256x256", "32x32", "2", "120.0", "->", "60.0", "0.120"]
    assert "method" not in lssgen.plan_for(pipe, 256, 256, 8, min_resolution=128).describe()  # LSSGen's own


# --- torch.compile: one graph per stage size, whatever the method -------------------------------------------------
@pytest.mark.parametrize(
    "options",
    [
        {"min_resolution": 64, "base_height": 256, "base_width": 256},  # lssgen: 64, 128 and 256 px
        {"method": "refine:steps=2"},
        {"method": "spectral:delta=0.5"},
        {"method": "bottleneck:steps=2/2/2"},  # 256, 128, 256 px: two sizes, three stages
    ],
    ids=["lssgen", "refine", "spectral", "bottleneck"],
)
def test_torch_compile_compiles_once_per_stage_size(options):
    """The compiled transformer gives the eager images, traces one graph per distinct stage size and, on a second
    call, none more. The hooks read the stage from the staged scheduler; anything else they touched (a step counter,
    a cache) would become guarded state and recompile the transformer mid-stage."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    pipe, eager = build_tiny_flux_pipeline(), build_tiny_flux_pipeline()
    for each in (pipe, eager):
        each.set_progress_bar_config(disable=True)
        lssgen.patch(each, None, **options)
    # aot_eager: Dynamo traces and guards exactly as with the default backend (graph count and recompilations are
    # decided before any backend runs) but skips inductor's C++ code generation, minutes on a 2-core CPU.
    pipe.transformer.compile(backend="aot_eager")
    compiled = pipe(**test_flux.flux_call_kwargs(pipe)).images
    graphs = counters["stats"]["unique_graphs"]
    again = pipe(**test_flux.flux_call_kwargs(pipe)).images
    try:
        sizes = {(s.latent_height, s.latent_width) for s in lssgen.plan_for(pipe, 256, 256, 8).stages}
        assert len(sizes) >= 2
        assert graphs == counters["stats"]["unique_graphs"] == len(sizes)
        torch.testing.assert_close(again, compiled)
        expected = eager(**test_flux.flux_call_kwargs(eager)).images
        torch.testing.assert_close(compiled, expected, atol=1e-4, rtol=1e-4)
    finally:
        torch._dynamo.reset()


# --- refine on every flow family: a subset of the adapter contract, and its own checks ---------------------------
# The contract's tests that say what a method must keep: the denoiser sees its plan, and every image of a batch has
# its own noise. Its "stock equality when off" is `test_refine_off_is_the_stock_pipeline` below (the contract's
# version also runs the lssgen method and unpatching, which the families' own classes cover).
CONTRACT_TESTS = ("test_denoiser_calls_follow_the_plan", "test_stage_noise_is_drawn_for_every_image_of_the_batch")

# Bad input of the method: each raises naming what is wrong, before any denoiser call.
BAD_REFINE_CALLS = [
    ({"method": "refine:sigma=0"}, ValueError, "`sigma` must be in"),
    ({"method": "refine:steps=0"}, ValueError, "`steps` must be a positive integer"),
    ({"method": "refine:shift=3"}, ValueError, "unknown parameter 'shift=3'"),
    ({"method": "refine", "min_resolution": 64}, ValueError, "`min_resolution` .* does not apply to method 'refine'"),
    ({"method": "refine", "start_sigma": 0.75}, ValueError, "`start_sigma` .* still turns any method off"),
    ({"method": "refine", "height": 16, "width": 16}, ValueError, "generates at half the size first"),
    ({"method": "refine", "scaling_space": "learned"}, ValueError, "needs a latent upsampler"),
]


def record_latent_inputs(denoiser) -> tuple[list, Any]:
    """The latent argument (the forward's first, by name, however it is passed) of every call of `denoiser`, in a
    list that fills as the calls happen; and the hook's handle, to remove."""
    signature = inspect.signature(type(denoiser).forward)
    name = list(signature.parameters)[1]
    inputs = []
    handle = denoiser.register_forward_pre_hook(
        lambda module, args, kwargs: inputs.append(signature.bind(module, *args, **kwargs).arguments[name]),
        with_kwargs=True,
    )
    return inputs, handle


class RefineContract:
    """`refine` on a family's tiny pipeline (mixed into a subclass of the family's contract class)."""

    # Whether the stock pipeline draws its noise in the layout lssgen draws the first stage's (the unpacked latent),
    # so that a seed gives both the same starting noise and the first stage ends on the stock result.
    first_noise_as_stock = True

    def refine_call(self, pipe, **overrides):
        # The final latents, not decoded images: what refine changes is the latent (and decoding costs time).
        return self.call_kwargs(pipe, **{"output_type": "latent", **overrides})

    def test_refine_off_is_the_stock_pipeline(self, pipe):
        """`start_sigma=1.0` turns every method off: with refine as the patch's method, the stock images exactly."""
        stock = self.build_pipe(seed=0)
        stock.set_progress_bar_config(disable=True)
        expected = self.images(stock, **self.refine_call(stock))
        lssgen.patch(pipe, None, method="refine")
        assert torch.equal(self.images(pipe, **self.refine_call(pipe), start_sigma=1.0), expected)

    def test_refine_stages_run_the_stock_half_size_schedule_then_the_linear_unshifted_one(self, pipe):
        """The first stage is the stock pipeline's generation at half the size (the same denoiser inputs, timesteps
        and result); the last steps exactly through linspace(sigma, 0, steps + 1)[:-1], unshifted, at full size."""
        method = Refine(sigma=0.3, steps=3)  # several steps: an unshifted schedule is told from a shifted one
        lssgen.patch(pipe, None, method=method)
        plan = self.plan(pipe)
        first, final = plan.stages
        assert (first.latent_height * 2, first.latent_width * 2) == (final.latent_height, final.latent_width)
        assert final.height == self.height and final.width == self.width

        seen = {}

        def on_step(pipeline, step, timestep, callback_kwargs):
            if step == first.num_denoiser_steps - 1:
                seen["first"] = callback_kwargs["latents"].clone()
                seen["sigmas"] = [float(s) for s in pipeline.scheduler.sigmas]  # what the stock loop steps with
            return {}

        records, handle = self.trace(pipe)
        self.images(pipe, **self.refine_call(pipe), callback_on_step_end=on_step)
        handle.remove()

        stock = self.build_pipe(seed=0)
        stock.set_progress_bar_config(disable=True)
        stock_records, stock_handle = self.trace(stock)
        stock_final = []
        half = self.refine_call(stock, height=first.height, width=first.width, output_type="latent")
        stock(**half, callback_on_step_end=lambda p, i, t, k: stock_final.append(k["latents"]) or {})
        stock_handle.remove()

        calls = first.num_denoiser_steps * self.calls_per_step
        assert len(stock_records) == calls == self.steps * self.calls_per_step
        assert records[:calls] == [{**r, "timestep": pytest.approx(r["timestep"], abs=1e-3)} for r in stock_records]
        if self.first_noise_as_stock:
            torch.testing.assert_close(seen["first"], stock_final[-1])

        linear = np.linspace(0.3, 0.0, 4)[:-1]
        assert seen["sigmas"][-4:] == pytest.approx([*linear, 0.0], abs=1e-6)
        # The denoiser is told the noise level it is at (Wan's scheduler casts timesteps to integers).
        final_calls = records[calls :: self.calls_per_step]
        told = [self.noise_level(pipe, r["timestep"], self.height, self.width) for r in final_calls]
        assert told == pytest.approx(linear, abs=1.1e-3)

    def test_refine_renoises_the_scaled_latent_with_each_images_own_fresh_noise(self, pipe):
        """What the full-size stage starts from, for a batch of two with a generator each: the half-size result
        scaled up x2 in latent space, then (1 - 0.12) x + 0.12 noise, with each image's noise drawn from its own
        generator after its first-stage noise."""
        lssgen.patch(pipe, None, method="refine")
        plan = self.plan(pipe)
        first, final = plan.stages
        ends = []

        def on_step(pipeline, step, timestep, callback_kwargs):
            if step == first.num_denoiser_steps - 1:
                ends.append(callback_kwargs["latents"].clone())
            return {}

        inputs, hook = record_latent_inputs(self.denoiser(pipe))
        seeds = (21, 22)
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        call = self.refine_call(pipe, prompts=["a fox", "a boat"], generator=generators)
        self.images(pipe, **call, callback_on_step_end=on_step)
        hook.remove()

        adapter = lssgen.find_adapter(pipe)
        low = adapter.unpack(pipe, ends[0], first.latent_height, first.latent_width)
        up = scale_up(low, "latent", pipe=pipe, adapter=adapter, upsampler=None)
        noise = []
        for seed in seeds:
            generator = torch.Generator().manual_seed(seed)
            torch.randn((1, *low.shape[1:]), generator=generator)  # the image's first-stage noise
            noise.append(torch.randn((1, *up.shape[1:]), generator=generator))
        expected = (1 - 0.12) * up + 0.12 * torch.cat(noise)
        started = adapter.denoiser_latents(pipe, inputs[first.num_denoiser_steps * self.calls_per_step], final)
        torch.testing.assert_close(started[:2], expected, rtol=1e-5, atol=1e-5)

    def test_refine_bad_input_is_refused_before_denoising(self, pipe):
        stock_scheduler = pipe.scheduler
        lssgen.patch(pipe, None)
        before = self.images(pipe, **self.refine_call(pipe), method="refine")
        calls = []
        hook = self.denoiser(pipe).register_forward_pre_hook(lambda module, args: calls.append(1))
        for options, error, match in BAD_REFINE_CALLS:
            with pytest.raises(error, match=match):
                pipe(**{**self.refine_call(pipe), **options})
        hook.remove()
        assert not calls and pipe.scheduler is stock_scheduler and pipe._lssgen.run is None
        assert torch.equal(self.images(pipe, **self.refine_call(pipe), method="refine"), before)


# The contract's tests of the promises every plan keeps besides those: the user's callback, an interrupt, stateful
# hooks (a cache's state) reset at every stage, every diffusers cache composing, LoRA in every stage. Each method runs
# them on FLUX.1 (generic code: one family shows a method keeps them; the families' own classes run them for LSSGen's
# plans).
PROMISE_TESTS = (
    "test_user_callback_sees_every_step_once",
    "test_interrupt_in_a_low_resolution_stage_still_returns_a_full_size_image",
    "test_stateful_hooks_are_reset_at_every_stage_and_around_every_call",
    "test_diffusers_caches_compose",
    "test_lora_applies_in_every_stage",
)


def method_contract(family: type, contract: type, method: str, keep: tuple[str, ...] = (), **attributes) -> type:
    """`contract` (a method's tests, e.g. `RefineContract`) and the adapter contract's `CONTRACT_TESTS` (and `keep`)
    for `family` (a family's contract test class), with `method` as the method of the contract's multi-stage calls
    and plans; `attributes` set the class's."""
    contract_tests = {name for cls in family.__mro__ for name in vars(cls) if name.startswith("test_")}
    dropped = dict.fromkeys(contract_tests - set(CONTRACT_TESTS) - set(keep))

    def call_kwargs(self, pipe, prompts="a red fox in the snow", seed=0, **overrides):
        # The contract's calls at the method classes' smaller size and step count, unless a test asks for others.
        size = {"height": self.height, "width": self.width, "num_inference_steps": self.steps}
        return family.call_kwargs(self, pipe, prompts, seed, **{**size, **overrides})

    members = {
        # Small and short (a 64 px first stage): what a method does shows at any size, and the suite has a time
        # budget.
        "height": 128,
        "width": 128,
        "steps": 4,
        "call_kwargs": call_kwargs,
        "three_stages": {"method": method},  # what the kept contract tests patch and call with
        # The cache matrix's call: the method's own plan (start_sigma is LSSGen's), with stages long enough for a
        # cache's warm-up (TaylorSeer's is 3 steps) to leave steps to reuse on.
        "cache_calls": ({"num_inference_steps": 12},),
        **attributes,
    }
    name = f"Test{contract.__name__.removesuffix('Contract')}{family.__name__.removeprefix('Test')}"
    return type(name, (contract, family), {**dropped, **members})


def refine_contract(family: type, **attributes) -> type:
    trace_cases = [(128, 128, 4, {"method": "refine"}), (64, 128, 3, {"method": "refine:sigma=0.3,steps=2"})]
    return method_contract(family, RefineContract, "refine", trace_cases=trace_cases, **attributes)


TestRefineFlux = refine_contract(test_flux.TestFlux, keep=PROMISE_TESTS)
# Flux2Pipeline draws its noise packed, (B, 128, h/2, w/2): the same distribution as lssgen's (B, 32, h, w), other
# samples for a seed. Its first stage still runs the stock schedule and inputs at half size (checked).
TestRefineFlux2 = refine_contract(test_flux2.TestFlux2, first_noise_as_stock=False)
TestRefineSD3 = refine_contract(test_sd3.TestSD3)
TestRefineChroma = refine_contract(test_chroma.TestChroma)
TestRefineCogView4 = refine_contract(test_cogview4.TestCogView4)
TestRefineQwenImage = refine_contract(test_qwenimage.TestQwenImage)
TestRefineZImage = refine_contract(test_zimage.TestZImage)
TestRefineWan = refine_contract(test_wan.TestWan)
