"""Image-to-image (issue #21): a stock img2img pipeline through lssgen starts its first, smallest stage from the
input image, where that stage's own stock schedule starts for the `strength`; `strength=1.0` is text-to-image; and
the adapter contract holds. The plan's img2img rules (first stage, restarts by noise level) are in test_plan.py."""

from __future__ import annotations

import inspect

import pytest
import test_chroma
import test_flux
import test_flux2
import test_qwenimage
import test_sd
import test_sd3
import test_sdxl
import test_zimage
import torch
from diffusers import (
    ChromaImg2ImgPipeline,
    Flux2KleinInpaintPipeline,
    FluxImg2ImgPipeline,
    QwenImageImg2ImgPipeline,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionXLImg2ImgPipeline,
    ZImageImg2ImgPipeline,
)
from diffusers.utils.torch_utils import randn_tensor

import lssgen
from lssgen.adapters.flux import FluxAdapter
from lssgen.tiny import build_tiny_flux_pipeline

IMAGE = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(7))
OTHER_IMAGE = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(8))
FLOW = FluxAdapter()


# --- the pipeline ---------------------------------------------------------------------------------------------
def _img2img_pipe(seed=0):
    pipe = FluxImg2ImgPipeline(**build_tiny_flux_pipeline(seed=seed).components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call(pipe, **overrides):
    return test_flux.flux_call_kwargs(pipe, **{"image": IMAGE, "strength": 0.6, **overrides})


def _denoiser_calls(pipe, **kwargs):
    calls = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda module, args, inputs: calls.append((inputs["hidden_states"].clone(), float(inputs["timestep"][0]))),
        with_kwargs=True,
    )
    try:
        images = pipe(**kwargs).images
    finally:
        hook.remove()
    return images, calls


PLAN = {"min_resolution": 128, "shorten_intermediate_steps": False}


def test_first_stage_runs_the_stock_schedule_of_its_size_and_starts_from_the_resized_image():
    """The first stage's denoiser calls carry the tail of the timesteps stock FluxImg2ImgPipeline uses at that
    stage's size and steps, from where the plan starts it (the rule: test_plan.py); its first input is the input
    image resized to the stage, encoded, normalised, and noised to that stage's start with the call's generator."""
    pipe, stock = _img2img_pipe(), _img2img_pipe()
    lssgen.patch(pipe, None, **PLAN)
    plan = lssgen.plan_for(pipe, 256, 256, 8, strength=0.6, **PLAN)
    first = plan.stages[0]
    assert first.begin_index > 0
    _, calls = _denoiser_calls(pipe, **_call(pipe))
    _, stock_calls = _denoiser_calls(stock, **_call(stock, height=first.height, width=first.width, strength=1.0))
    assert [t for _, t in calls[: first.num_denoiser_steps]] == [t for _, t in stock_calls[first.begin_index :]]
    assert len(calls) == plan.total_steps

    pixels = stock.image_processor.preprocess(IMAGE, height=first.height, width=first.width)
    clean = FLOW.vae_to_latents(stock, stock.vae.encode(pixels).latent_dist.mode())
    noise = randn_tensor(clean.shape, generator=torch.Generator().manual_seed(0))
    sigma = first.first_sigma
    expected = FLOW.pack(stock, (1 - sigma) * clean + sigma * noise)
    torch.testing.assert_close(calls[0][0], expected)


def test_strength_one_is_text_to_image_with_the_image_ignored():
    """As stock: at strength 1.0 the image does not matter, and the patched img2img pipe makes the patched
    text-to-image pipe's images (same components, seed and plan)."""
    pipe = _img2img_pipe()
    text_to_image = build_tiny_flux_pipeline(seed=0)  # the same weights, its own modules (hooks are per module)
    text_to_image.set_progress_bar_config(disable=True)
    lssgen.patch(pipe, None, **PLAN)
    lssgen.patch(text_to_image, None, **PLAN)
    one = pipe(**_call(pipe, strength=1.0)).images
    other = pipe(**_call(pipe, strength=1.0, image=OTHER_IMAGE)).images
    assert torch.equal(one, other)
    torch.testing.assert_close(one, text_to_image(**test_flux.flux_call_kwargs(text_to_image)).images)
    # Below 1.0 the image shows.
    assert not torch.equal(pipe(**_call(pipe)).images, pipe(**_call(pipe, image=OTHER_IMAGE)).images)


def test_pipes_sharing_modules_are_patched_and_unpatched_each_on_its_own():
    """An img2img pipe on a patched text-to-image pipe's very modules (`lssgen.image_to_image_pipeline`, or diffusers'
    `from_pipe`) patches too, and each gives what it gives alone; unpatching one leaves the other patched."""
    text_to_image = build_tiny_flux_pipeline(seed=0)
    text_to_image.set_progress_bar_config(disable=True)
    lssgen.patch(text_to_image, None, **PLAN)
    alone = text_to_image(**test_flux.flux_call_kwargs(text_to_image)).images
    img2img = lssgen.image_to_image_pipeline(text_to_image)
    assert type(img2img).__name__ == "FluxImg2ImgPipeline" and img2img.transformer is text_to_image.transformer
    assert lssgen.is_patched(img2img) and img2img._lssgen.defaults == text_to_image._lssgen.defaults
    separate = _img2img_pipe()
    lssgen.patch(separate, None, **PLAN)
    expected = separate(**_call(separate)).images
    assert torch.equal(img2img(**_call(img2img)).images, expected)
    assert torch.equal(text_to_image(**test_flux.flux_call_kwargs(text_to_image)).images, alone)
    lssgen.unpatch(text_to_image)
    assert torch.equal(img2img(**_call(img2img)).images, expected)
    lssgen.unpatch(img2img)
    registry = img2img.transformer._diffusers_hook
    assert not [name for name in registry.hooks if name.startswith("lssgen")]


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        # The stock pipeline's own checks: its schedule keeps no step at strength 0; strength must be in [0, 1].
        ({"strength": 0.0}, ValueError, "After adjusting the num_inference_steps by strength parameter: 0.0"),
        ({"strength": 1.5}, ValueError, "The value of strength should in"),
        ({"image": None}, ValueError, None),  # the stock pipeline's own error
        ({"image": torch.rand(2, 3, 64, 64), "prompt": ["a", "b", "c"]}, ValueError, "Cannot duplicate `image`"),
    ],
    ids=["zero", "out-of-range", "no-image", "image-batch"],
)
def test_bad_img2img_input_raises_before_denoising_and_leaves_the_pipe_usable(overrides, error, match):
    pipe = _img2img_pipe()
    lssgen.patch(pipe, None, **PLAN)
    before = pipe(**_call(pipe)).images
    _, calls = None, []
    hook = pipe.transformer.register_forward_pre_hook(lambda module, args: calls.append(1))
    with pytest.raises(error, match=match):
        pipe(**_call(pipe, **overrides))
    hook.remove()
    assert not calls
    assert torch.equal(pipe(**_call(pipe)).images, before)


# --- the adapter contract -------------------------------------------------------------------------------------
# The suite has a time budget (8 minutes on two cores), and an img2img class shares its family's denoiser, hooks,
# caches and call-argument handling with the family's text-to-image class, whose contract runs in full. So FLUX.1's
# img2img class runs the whole contract but the call-argument property (the text-to-image one, drawing no
# strength); the other families' run what the input image and the strength change: stock equality, the plan the
# denoiser sees, batches, per-image noise, the interrupt.
IMAGE_TO_IMAGE_TESTS = (
    "test_start_sigma_one_and_unpatch_are_bit_identical_to_stock",
    "test_denoiser_calls_follow_the_plan",
    "test_batch_of_prompts_with_several_images_each",
    "test_stage_noise_is_drawn_for_every_image_of_the_batch",
    "test_interrupt_in_a_low_resolution_stage_still_returns_a_full_size_image",
)


def img2img_contract(family: type, pipeline_class: type, *, full: bool = False) -> type:
    """The adapter contract of `family` (a family's contract test class) for its img2img `pipeline_class`, built
    from the family's tiny components and called with an input image of the requested size at strength 0.6."""
    # A subclass of the family's class (its observations and expectations, `super()` calls included) that keeps only
    # the contract's tests named above.
    contract_tests = {name for cls in family.__mro__ for name in vars(cls) if name.startswith("test_")}
    kept = contract_tests - {"test_any_call_arguments_give_an_image_or_a_clear_error"} if full else IMAGE_TO_IMAGE_TESTS
    dropped = dict.fromkeys(contract_tests - set(kept))
    # Two of the plan cases (one shortened, one not) for the lighter classes.
    trace_cases = family.trace_cases if full else family.trace_cases[1:3]

    def build_pipe(self, seed=0):
        components = family.build_pipe(self, seed=seed).components
        accepted = inspect.signature(pipeline_class.__init__).parameters
        return pipeline_class(**{name: value for name, value in components.items() if name in accepted})

    def call_kwargs(self, pipe, prompts="a red fox in the snow", seed=0, **overrides):
        kwargs = family.call_kwargs(self, pipe, prompts, seed, **overrides)
        # An image of the requested size: SD's and SDXL's img2img pipelines generate at their image's size.
        # (Left as it is for a size no image can have: the call's own error is what is tested then.)
        size = (kwargs.get("height", self.height), kwargs.get("width", self.width))
        image = IMAGE
        if all(isinstance(side, int) and not isinstance(side, bool) and side > 0 for side in size):
            image = torch.nn.functional.interpolate(IMAGE, size=size, mode="bilinear", align_corners=False)
        return {"image": image, "strength": self.strength, **kwargs}

    members = {"strength": 0.6, "trace_cases": trace_cases, "build_pipe": build_pipe, "call_kwargs": call_kwargs}
    return type(f"Test{pipeline_class.__name__}", (family,), {**dropped, **members})


TestFluxImg2ImgPipeline = img2img_contract(test_flux.TestFlux, FluxImg2ImgPipeline, full=True)
TestStableDiffusion3Img2ImgPipeline = img2img_contract(test_sd3.TestSD3, StableDiffusion3Img2ImgPipeline)
TestChromaImg2ImgPipeline = img2img_contract(test_chroma.TestChroma, ChromaImg2ImgPipeline)
TestQwenImageImg2ImgPipeline = img2img_contract(test_qwenimage.TestQwenImage, QwenImageImg2ImgPipeline)
TestZImageImg2ImgPipeline = img2img_contract(test_zimage.TestZImage, ZImageImg2ImgPipeline)
TestStableDiffusionXLImg2ImgPipeline = img2img_contract(test_sdxl.TestSDXL, StableDiffusionXLImg2ImgPipeline)
TestStableDiffusionImg2ImgPipeline = img2img_contract(test_sd.TestSD, StableDiffusionImg2ImgPipeline)


class TestFlux2KleinInpaintPipelineAsImg2Img(img2img_contract(test_flux2.TestFlux2Klein, Flux2KleinInpaintPipeline)):
    """FLUX.2 klein's img2img: the inpainting pipeline with a mask that repaints every pixel (its inpainting:
    test_inpainting.py). The input image also rides along as reference tokens, at the target size in every stage."""

    def call_kwargs(self, pipe, prompts="a red fox in the snow", seed=0, **overrides):
        kwargs = super().call_kwargs(pipe, prompts, seed, **overrides)
        height, width = kwargs["image"].shape[-2:]
        # Read by `expected`: the reference tokens of this call's image (one per 16 x 16 pixels).
        self.reference_tokens = (height // 16) * (width // 16)
        return {"mask_image": torch.ones(1, 1, height, width), **kwargs}

    def expected(self, pipe, stage, timestep, references=0):
        return super().expected(pipe, stage, timestep, references + self.reference_tokens)

    def test_plan_for_an_image_plans_on_the_size_the_call_takes_from_it(self, pipe):
        """Given the input image, `lssgen.plan_for` plans on the image's size, whatever `height`/`width` say, as
        the call does; the call's denoiser calls and image follow that plan."""
        lssgen.patch(pipe, None, min_resolution=64, shorten_intermediate_steps=False)
        wide = torch.nn.functional.interpolate(IMAGE, size=(128, 256), mode="bilinear", align_corners=False)
        plan = lssgen.plan_for(pipe, 512, 512, 8, strength=0.6, image=wide)
        assert (plan.height, plan.width) == (128, 256) and len(plan.stages) == 2
        assert lssgen.plan_for(pipe, 512, 512, 8, strength=0.6).height == 512  # no image: the size given
        call = self.call_kwargs(pipe, height=512, width=512, num_inference_steps=8)
        call.update(image=wide, mask_image=torch.ones(1, 1, 128, 256))
        tokens = []
        hook = pipe.transformer.register_forward_pre_hook(
            lambda module, args, kwargs: tokens.append(kwargs["hidden_states"].shape[1]), with_kwargs=True
        )
        images = self.images(pipe, **call)
        hook.remove()
        assert images.shape[-2:] == (128, 256)
        references = (128 // 16) * (256 // 16)  # the image's target-size tokens, in every stage
        stages = [s for s in plan.stages for _ in s.timesteps for _ in range(self.calls_per_step)]
        assert tokens == [(s.latent_height // 2) * (s.latent_width // 2) + references for s in stages]
