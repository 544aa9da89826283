"""ControlNet (issue #21): a stock ControlNet pipeline through lssgen gives each controlnet the control image prepared
at the stage's size, keeps `controlnet_conditioning_scale`, maps `control_guidance_start/end` to noise levels, and
keeps the adapter contract. The rules are in lssgen.controlnets and docs/how-it-works.md#controlnet."""

from __future__ import annotations

import functools
import math

import diffusers
import PIL.Image
import pytest
import test_flux
import test_qwenimage
import test_sd
import test_sd3
import test_sdxl
import test_zimage
import torch
from diffusers import (
    FluxControlNetPipeline,
    FluxMultiControlNetModel,
    QwenImageControlNetPipeline,
    StableDiffusion3ControlNetPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionXLControlNetPipeline,
    ZImageControlNetPipeline,
)
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor

import lssgen
from lssgen.controlnets import CONTROL_HOOK, controlnets_of
from lssgen.tiny.flux import build_tiny_flux_controlnet_pipeline
from lssgen.tiny.qwenimage import build_tiny_qwenimage_controlnet_pipeline
from lssgen.tiny.sd import build_tiny_sd_controlnet_pipeline
from lssgen.tiny.sd3 import build_tiny_sd3_controlnet_pipeline
from lssgen.tiny.sdxl import build_tiny_sdxl_controlnet_pipeline
from lssgen.tiny.zimage import build_tiny_zimage_controlnet_pipeline

# Within the suite's time budget everything here runs at 128 px: three stages of 32, 64 and 128 px.
SIZE = 128
pytestmark = pytest.mark.usefixtures("one_thread")
CONTROL = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
THREE_STAGES = {"min_resolution": 32, "base_height": SIZE, "base_width": SIZE}


def control_images(count: int, height: int = SIZE, width: int = SIZE) -> torch.Tensor | list[torch.Tensor]:
    """One control image per controlnet, of the requested size (a single tensor for a single controlnet)."""
    image = torch.nn.functional.interpolate(CONTROL, size=(height, width), mode="bilinear", align_corners=False)
    images = [image, image.flip(-1), image.flip(-2)][:count]
    return images[0] if count == 1 else images


def as_pil(image: torch.Tensor) -> PIL.Image.Image:
    """A control image as users pass them: resized with PIL's filter at a stage's size, not sampled from the
    target-size tensor (which a nearest-neighbour tensor resize would also give)."""
    return VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(image))[0]


# --- the adapter contract -------------------------------------------------------------------------------------
# Within the suite's time budget (see test_img2img.py): a ControlNet class shares its family's denoiser, hooks,
# caches and call-argument handling with the family's text-to-image class, whose contract runs in full; here runs what
# the control image and window change: stock equality, the plan the denoiser sees, batches, per-image noise, the
# interrupt (SDXL, whose UNet path is SD's, and a second FLUX.1 controlnet, the first two). The calls carry a control
# window that ends early, so a step-index window would show; they run at 128 px, in 4 steps.
CONTROLNET_TESTS = (
    "test_start_sigma_one_and_unpatch_are_bit_identical_to_stock",
    "test_denoiser_calls_follow_the_plan",
    "test_batch_of_prompts_with_several_images_each",
    "test_stage_noise_is_drawn_for_every_image_of_the_batch",
    "test_interrupt_in_a_low_resolution_stage_still_returns_a_full_size_image",
)


def controlnet_contract(
    family: type,
    pipeline_class: type,
    build,
    control_argument: str,
    *,
    controlnets: int = 1,
    tests: tuple[str, ...] = CONTROLNET_TESTS,
    global_random_state: bool = False,
    steps: int = 4,
    window: bool = True,
) -> type:
    """The adapter contract of `family` (a family's contract test class) for its ControlNet pipeline built by
    `build(seed=, controlnets=)`, called with one control image per controlnet of the requested size, a scale per
    controlnet and (`window`: where the pipeline takes one) a window that ends at 0.7 of the generation."""
    contract_tests = {name for cls in family.__mro__ for name in vars(cls) if name.startswith("test_")}
    dropped = dict.fromkeys(contract_tests - set(tests))

    def build_pipe(self, seed=0):
        return build(seed=seed, controlnets=controlnets)

    def call_kwargs(self, pipe, prompts="a red fox in the snow", seed=0, **overrides):
        overrides = {"height": self.height, "width": self.width, "num_inference_steps": self.steps, **overrides}
        kwargs = family.call_kwargs(self, pipe, prompts, seed, **overrides)
        size = (kwargs.get("height", self.height), kwargs.get("width", self.width))
        scales = [0.9, 0.6, 0.3][:controlnets]
        return {
            control_argument: control_images(controlnets, *size),
            "controlnet_conditioning_scale": scales[0] if controlnets == 1 else scales,
            **({"control_guidance_end": 0.7} if window else {}),
            **kwargs,
        }

    def images(self, pipe, **kwargs):
        # A pipeline that samples its control latents from the global random state (SD3) repeats only when seeded.
        if global_random_state:
            torch.manual_seed(0)
        return family.images(self, pipe, **kwargs)

    members = {
        "images": images,
        "height": SIZE,
        "width": SIZE,
        "steps": steps,
        "three_stages": THREE_STAGES,
        "trace_cases": [(SIZE, SIZE, steps, THREE_STAGES)],
        "build_pipe": build_pipe,
        "call_kwargs": call_kwargs,
    }
    suffix = "" if controlnets == 1 else f"With{controlnets}ControlNets"
    return type(f"Test{pipeline_class.__name__}{suffix}", (family,), {**dropped, **members})


TestStableDiffusionControlNetPipeline = controlnet_contract(
    test_sd.TestSD, StableDiffusionControlNetPipeline, build_tiny_sd_controlnet_pipeline, "image"
)
TestStableDiffusionXLControlNetPipeline = controlnet_contract(
    test_sdxl.TestSDXL,
    StableDiffusionXLControlNetPipeline,
    build_tiny_sdxl_controlnet_pipeline,
    "image",
    tests=CONTROLNET_TESTS[:2],
)
TestFluxControlNetPipeline = controlnet_contract(
    test_flux.TestFlux, FluxControlNetPipeline, build_tiny_flux_controlnet_pipeline, "control_image"
)
# SD3's control sample comes from the global random state, whose draws depend on the batch: an image generated alone
# does not repeat within a batch, with or without lssgen, so the per-image noise test does not apply.
TestStableDiffusion3ControlNetPipeline = controlnet_contract(
    test_sd3.TestSD3,
    StableDiffusion3ControlNetPipeline,
    build_tiny_sd3_controlnet_pipeline,
    "control_image",
    tests=tuple(name for name in CONTROLNET_TESTS if "per_image" not in name and "stage_noise" not in name),
    global_random_state=True,
)


# Qwen-Image's schedule needs 2 steps in every stage: 12 steps, shortened against the 128 px base.
class TestQwenImageControlNetPipeline(
    controlnet_contract(
        test_qwenimage.TestQwenImage,
        QwenImageControlNetPipeline,
        build_tiny_qwenimage_controlnet_pipeline,
        "control_image",
        tests=CONTROLNET_TESTS[:2],
        steps=12,
    )
):
    def expected(self, pipe, stage, timestep, prompts=1):
        # The ControlNet pipeline's `img_shapes` hold one shape per sample, not a list of them.
        expected = super().expected(pipe, stage, timestep, prompts)
        return {**expected, "shapes": tuple(shapes[0] for shapes in expected["shapes"])}


# Z-Image's pipeline takes no control window.
TestZImageControlNetPipeline = controlnet_contract(
    test_zimage.TestZImage,
    ZImageControlNetPipeline,
    build_tiny_zimage_controlnet_pipeline,
    "control_image",
    window=False,
)
TestStableDiffusion3ControlNetPipelineWith2ControlNets = controlnet_contract(
    test_sd3.TestSD3,
    StableDiffusion3ControlNetPipeline,
    build_tiny_sd3_controlnet_pipeline,
    "control_image",
    controlnets=2,
    tests=CONTROLNET_TESTS[:2],
    global_random_state=True,
)
TestFluxControlNetPipelineWith2ControlNets = controlnet_contract(
    test_flux.TestFlux,
    FluxControlNetPipeline,
    build_tiny_flux_controlnet_pipeline,
    "control_image",
    controlnets=2,
    tests=CONTROLNET_TESTS[:2],
)


# --- the condition each controlnet reads, at each stage -----------------------------------------------------------
def _record_inputs(module: torch.nn.Module, records: list) -> torch.utils.hooks.RemovableHandle:
    """Record the first input of `module` (a submodule of a controlnet: what the controlnet really consumed, after
    lssgen's hook on it rewrote its arguments)."""
    return module.register_forward_pre_hook(lambda m, args: records.append(args[0].clone()))


def _stage_of_each_step(plan) -> list:
    return [stage for stage in plan.stages for _ in stage.timesteps]


def test_unet_controlnets_read_the_control_image_prepared_at_each_stage_size():
    """SD (two controlnets) and SDXL: inside each controlnet, the condition of every call is what the pipeline's own
    `prepare_image` makes of that controlnet's image at the stage's size; SDXL's controlnet also gets the stage's
    size conditioning."""
    for build, count in ((build_tiny_sd_controlnet_pipeline, 2), (build_tiny_sdxl_controlnet_pipeline, 1)):
        pipe = build(controlnets=count)
        pipe.set_progress_bar_config(disable=True)
        lssgen.patch(pipe, **THREE_STAGES)
        nets = controlnets_of(pipe)
        conditions = [[] for _ in nets]
        handles = [_record_inputs(net.controlnet_cond_embedding, seen) for net, seen in zip(nets, conditions)]
        time_ids = []
        if hasattr(nets[0], "add_time_proj") and nets[0].config.addition_embed_type == "text_time":
            handles.append(_record_inputs(nets[0].add_time_proj, time_ids))
        images = [as_pil(image) for image in control_images(2)][:count]
        images = images[0] if count == 1 else images
        pipe(**test_sd.sd_call_kwargs(pipe, height=SIZE, width=SIZE, num_inference_steps=2), image=images)
        for handle in handles:
            handle.remove()
        plan = lssgen.plan_for(pipe, SIZE, SIZE, 2, **THREE_STAGES)
        steps = _stage_of_each_step(plan)
        for index, seen in enumerate(conditions):
            assert len(seen) == len(steps)
            image = images[index] if count > 1 else images
            for stage, condition in zip(steps, seen):
                expected = pipe.prepare_image(
                    image=image,
                    width=stage.width,
                    height=stage.height,
                    batch_size=1,
                    num_images_per_prompt=1,
                    device=pipe.device,
                    dtype=nets[index].dtype,
                    do_classifier_free_guidance=True,
                )
                assert torch.equal(condition, expected), (build.__name__, index, stage.index)
        if time_ids:
            sizes = [[(row[0], row[1], row[4], row[5]) for row in ids.reshape(-1, 6).tolist()] for ids in time_ids]
            assert sizes == [[(s.height, s.width) * 2] * 2 for s in steps]


def _flux_condition(pipe, latents):
    config = pipe.vae.config
    latents = (latents - config.shift_factor) * config.scaling_factor
    return pipe._pack_latents(latents, *latents.shape)


def _qwenimage_condition(pipe, latents):
    config = pipe.vae.config
    mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1, 1)
    latents = ((latents - mean) / torch.tensor(config.latents_std).view(1, -1, 1, 1, 1)).permute(0, 2, 1, 3, 4)
    return pipe._pack_latents(latents, latents.shape[0], latents.shape[2], *latents.shape[3:])


# Per family: the tiny pipeline, its call, the controlnet's module that takes the condition, whether the call runs
# CFG in one batch (the condition is doubled), whether the VAE sample comes from the call's generator (else the global
# random state), and the normalisation and packing of the sampled latent. (SD3's controlnets zero the pooled
# projection, so the pipeline skips the VAE's shift.)
VAE_ENCODING_FAMILIES = {
    "flux": (
        build_tiny_flux_controlnet_pipeline,
        test_flux.flux_call_kwargs,
        "controlnet_x_embedder",
        False,
        True,
        _flux_condition,
    ),
    "sd3": (
        build_tiny_sd3_controlnet_pipeline,
        test_sd3.sd3_call_kwargs,
        "pos_embed_input",
        True,
        False,
        lambda pipe, latents: latents * pipe.vae.config.scaling_factor,
    ),
    # Two controlnets, each with its own image: per stage, each prepared and sampled in the controlnets' order.
    "sd3-two-controlnets": (
        functools.partial(build_tiny_sd3_controlnet_pipeline, controlnets=2),
        test_sd3.sd3_call_kwargs,
        "pos_embed_input",
        True,
        False,
        lambda pipe, latents: latents * pipe.vae.config.scaling_factor,
    ),
    "qwenimage": (
        build_tiny_qwenimage_controlnet_pipeline,
        test_qwenimage.qwenimage_call_kwargs,
        "controlnet_x_embedder",
        False,
        True,
        _qwenimage_condition,
    ),
}


def _stage_condition(pipe, image, stage, generator, finish, *, frames=False, doubled=False):
    """The condition a VAE-encoding ControlNet pipeline makes of `image` at `stage`'s size, written out here: resized
    and prepared by its `prepare_image`, encoded (as one frame for a video VAE), one sample drawn from `generator`
    (None: the global random state), then `finish`ed (normalised and packed as the pipeline does)."""
    resized = pipe.image_processor.resize(image, stage.height, stage.width)
    pixels = pipe.prepare_image(resized, stage.width, stage.height, 1, 1, pipe.device, pipe.vae.dtype, doubled)
    posterior = pipe.vae.encode(pixels.unsqueeze(2) if frames else pixels).latent_dist
    sample = posterior.mean + posterior.std * randn_tensor(posterior.mean.shape, generator=generator)
    return finish(pipe, sample)


@pytest.mark.parametrize("family", list(VAE_ENCODING_FAMILIES))
def test_vae_encoding_controlnets_read_the_control_image_encoded_at_each_stage_size(family):
    """FLUX.1, SD3 (one and two controlnets), Qwen-Image: inside each controlnet, each stage's condition is its
    control image prepared at that size by the pipeline's `prepare_image`, encoded as the pipeline encodes it (a VAE
    sample, from the call's generator or the global random state), normalised and packed as the pipeline does."""
    build, call, probe, doubled, from_generator, finish = VAE_ENCODING_FAMILIES[family]
    pipe = build()
    pipe.set_progress_bar_config(disable=True)
    options = {**THREE_STAGES, "shorten_intermediate_steps": False}
    lssgen.patch(pipe, **options)
    nets = controlnets_of(pipe)
    images = control_images(len(nets))
    seen = [[] for _ in nets]
    handles = [_record_inputs(getattr(net, probe), net_seen) for net, net_seen in zip(nets, seen)]
    torch.manual_seed(1234)
    scales = {"controlnet_conditioning_scale": [1.0] * len(nets)} if len(nets) > 1 else {}  # stock needs a list
    pipe(**call(pipe, height=SIZE, width=SIZE, num_inference_steps=2), control_image=images, **scales)
    for handle in handles:
        handle.remove()
    plan = lssgen.plan_for(pipe, SIZE, SIZE, 2, **options)
    # The draws, in order: the first stage's noise (from the call's generator), then per control image (in the
    # controlnets' order, as the pipeline prepares them) one sample per low-resolution stage and the stock call's
    # target-size one.
    generator = torch.Generator().manual_seed(0) if from_generator else None
    torch.manual_seed(1234)
    if from_generator:
        first = plan.stages[0]
        noise = lssgen.find_adapter(pipe).latent_shape(pipe, 1, first.latent_height, first.latent_width, {})
        randn_tensor(noise, generator=generator)
    frames = family == "qwenimage"
    expected = {}
    for index, image in enumerate(images if len(nets) > 1 else [images]):
        for stage in plan.stages[:-1]:
            expected[stage.index, index] = _stage_condition(
                pipe, image, stage, generator, finish, frames=frames, doubled=doubled
            )
        _stage_condition(pipe, image, plan.stages[-1], generator, finish, frames=frames, doubled=doubled)
    steps = _stage_of_each_step(plan)
    for index, net_seen in enumerate(seen):
        assert len(net_seen) == len(steps)
        for stage, condition in zip(steps, net_seen):
            if (stage.index, index) in expected:
                torch.testing.assert_close(condition, expected[stage.index, index], rtol=1e-5, atol=1e-5)
        # One condition size per stage, the target stage's being the stock call's own.
        assert len({condition.shape for condition in net_seen}) == len(plan.stages)
    if len(nets) > 1:  # each controlnet reads its own image
        assert not torch.equal(seen[0][0], seen[1][0])


def test_qwenimage_union_controlnet_reads_each_image_its_stage_grid_and_its_own_window():
    """Qwen-Image's multi-controlnet runs its one (union) controlnet once per control image: every call reads its own
    image's condition at the stage's size (encoded and packed as the pipeline does, target size included), the stage's
    token grid in `img_shapes`, and its own image's scale and window (one image kept only early, one only late)."""
    pipe = build_tiny_qwenimage_controlnet_pipeline(controlnets=2)
    pipe.set_progress_bar_config(disable=True)
    options = {**THREE_STAGES, "shorten_intermediate_steps": False}
    lssgen.patch(pipe, **options)
    net = controlnets_of(pipe)[0]
    conditions, shapes, scales = [], [], []
    handles = [
        _record_inputs(net.controlnet_x_embedder, conditions),
        net.pos_embed.register_forward_pre_hook(lambda m, args: shapes.append([tuple(s) for s in args[0]])),
        net.register_forward_pre_hook(
            lambda m, args, kwargs: scales.append((float(kwargs["timestep"][0]), kwargs["conditioning_scale"])),
            with_kwargs=True,
        ),
    ]
    images = [as_pil(image) for image in control_images(2)]
    windows = {"control_guidance_start": [0.0, 0.25], "control_guidance_end": [0.5, 1.0]}
    call = test_qwenimage.qwenimage_call_kwargs(pipe, height=SIZE, width=SIZE, num_inference_steps=8)
    pipe(**call, control_image=images, controlnet_conditioning_scale=[0.7, 0.4], **windows)
    for handle in handles:
        handle.remove()
    plan = lssgen.plan_for(pipe, SIZE, SIZE, 8, **options)
    steps = _stage_of_each_step(plan)
    assert len(conditions) == len(shapes) == len(scales) == 2 * len(steps)
    # The draws from the call's generator: the first stage's noise, then per control image one sample per stage (the
    # low-resolution ones as lssgen prepares the image, the target size's as the stock call encodes it).
    generator = torch.Generator().manual_seed(0)
    first = plan.stages[0]
    randn_tensor((1, first.latent_height * first.latent_width // 4, 64), generator=generator)
    expected = [
        {stage.index: _stage_condition(pipe, image, stage, generator, _qwenimage_condition, frames=True)
         for stage in plan.stages}
        for image in images
    ]  # fmt: skip
    for call_index, (condition, shape, (_, scale)) in enumerate(zip(conditions, shapes, scales)):
        stage, image = steps[call_index // 2], call_index % 2
        torch.testing.assert_close(condition, expected[image][stage.index], rtol=1e-5, atol=1e-5)
        assert shape == [(1, stage.latent_height // 2, stage.latent_width // 2)]
        assert scale in ((0.7, 0.0) if image == 0 else (0.4, 0.0))
    # Image 0's window keeps the noisy calls only, image 1's the late ones only, in the low-resolution stages too.
    for image, keeps_early in ((0, True), (1, False)):
        kept = [t for t, scale in scales[image::2] if scale > 0]
        dropped = [t for t, scale in scales[image::2] if scale == 0]
        assert kept and dropped
        assert min(kept) > max(dropped) if keeps_early else max(kept) < min(dropped)
        low_resolution = [scale for (t, scale), stage in zip(scales[image::2], steps) if stage is not plan.stages[-1]]
        assert 0.0 in low_resolution and any(low_resolution)


def test_flux_union_multi_controlnet_reads_each_image_encoded_at_each_stage_size():
    """FLUX.1's multi-controlnet of one (union) controlnet runs it once per control image: each call reads its own
    image's condition at the stage's size, encoded (with the call's generator) and packed as the pipeline does; and only
    the images the pipeline passes scales for, as stock."""
    pipe = build_tiny_flux_controlnet_pipeline()
    pipe.controlnet = FluxMultiControlNetModel([pipe.controlnet])
    pipe.set_progress_bar_config(disable=True)
    lssgen.patch(pipe, **THREE_STAGES)
    seen = []
    handle = _record_inputs(controlnets_of(pipe)[0].controlnet_x_embedder, seen)
    images = [as_pil(image) for image in control_images(2)]
    call = test_flux.flux_call_kwargs(pipe, height=SIZE, width=SIZE, num_inference_steps=2)
    # A window per image: with scalar ones the pipeline pairs one window with its one net and runs the first image only.
    windows = {"control_guidance_start": [0.0, 0.0], "control_guidance_end": [1.0, 1.0]}
    pipe(**call, control_image=images, controlnet_conditioning_scale=[0.5, 0.5], **windows)
    handle.remove()
    plan = lssgen.plan_for(pipe, SIZE, SIZE, 2, **THREE_STAGES)
    steps = _stage_of_each_step(plan)
    assert len(seen) == 2 * len(steps)
    # The generator's draws: the first stage's noise, then per control image one sample per stage.
    generator = torch.Generator().manual_seed(0)
    first = plan.stages[0]
    randn_tensor(
        lssgen.find_adapter(pipe).latent_shape(pipe, 1, first.latent_height, first.latent_width, {}),
        generator=generator,
    )
    expected = [
        {stage.index: _stage_condition(pipe, image, stage, generator, _flux_condition) for stage in plan.stages}
        for image in images
    ]
    for index, condition in enumerate(seen):
        torch.testing.assert_close(condition, expected[index % 2][steps[index // 2].index], rtol=1e-5, atol=1e-5)
    # Scalar windows: the pipeline passes one scale, and its multi-controlnet runs the first image only, as stock.
    seen.clear()
    handle = _record_inputs(controlnets_of(pipe)[0].controlnet_x_embedder, seen)
    pipe(**call, control_image=images, controlnet_conditioning_scale=[0.5, 0.5])
    handle.remove()
    assert len(seen) == len(steps)


def test_zimage_controlnet_reads_the_control_image_encoded_at_each_stage_size():
    """Z-Image: the condition (passed by position) of every controlnet call is the control image prepared at the
    stage's size by the pipeline's `prepare_image`, encoded as the pipeline does (the VAE's mode, normalised, one
    frame, its extra channels zero-filled for a version 2.0 controlnet) and doubled for classifier-free guidance; the
    controlnet runs on the stage's latents at its scale."""
    pipe = build_tiny_zimage_controlnet_pipeline(control_in_dim=33)
    pipe.set_progress_bar_config(disable=True)
    lssgen.patch(pipe, **THREE_STAGES)
    tokens, sizes = [], []
    handles = [
        _record_inputs(pipe.controlnet.control_all_x_embedder["2-1"], tokens),
        pipe.controlnet.register_forward_pre_hook(
            lambda m, args, kwargs: sizes.append((tuple(args[0][0].shape[-2:]), kwargs["conditioning_scale"])),
            with_kwargs=True,
        ),
    ]
    image = as_pil(CONTROL)
    call = test_zimage.zimage_call_kwargs(pipe, height=SIZE, width=SIZE, num_inference_steps=4)
    pipe(**call, control_image=image, controlnet_conditioning_scale=0.6)
    for handle in handles:
        handle.remove()
    plan = lssgen.plan_for(pipe, SIZE, SIZE, 4, **THREE_STAGES)
    steps = _stage_of_each_step(plan)
    assert len(tokens) == len(steps)
    config = pipe.vae.config
    for stage, got, (size, scale) in zip(steps, tokens, sizes):
        resized = pipe.image_processor.resize(image, stage.height, stage.width)
        pixels = pipe.prepare_image(resized, stage.width, stage.height, 1, 1, pipe.device, pipe.vae.dtype)
        latents = (pipe.vae.encode(pixels).latent_dist.mode() - config.shift_factor) * config.scaling_factor
        latents = torch.cat([latents, torch.zeros(1, 33 - 16, *latents.shape[2:])], dim=1)
        condition = latents[:, :, None].repeat(2, 1, 1, 1, 1)  # CFG: the conditional and unconditional calls
        expected = torch.cat(pipe.controlnet.patchify(list(condition), 2, 1))
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert size == (stage.latent_height, stage.latent_width) and scale == 0.6


# --- the control window, by noise level ---------------------------------------------------------------------------
def _effective_scales(net: torch.nn.Module, records: list) -> list:
    """Per call of a UNet controlnet: its timestep and its effective conditioning scale, the ratio of its scaled
    mid-block residual (its output) to the raw one (the mid-block's output)."""
    raw = []
    handles = [
        net.controlnet_mid_block.register_forward_hook(lambda m, args, out: raw.append(out.abs().sum())),
        net.register_forward_pre_hook(
            lambda m, args, kwargs: records.append([float(kwargs["timestep"])]), with_kwargs=True
        ),
        net.register_forward_hook(lambda m, args, out: records[-1].append(float(out[1].abs().sum() / raw[-1]))),
    ]
    return handles


def test_control_window_keeps_each_controlnet_exactly_at_the_noise_levels_of_the_stock_window():
    """Two controlnets with their own windows (one closed on both sides, one open at the noisy end) and scales: in a
    3-stage call, each controlnet's effective scale is its `controlnet_conditioning_scale` exactly for the calls whose
    timestep lies between the noisiest and the least noisy timestep the stock call keeps (unbounded where the stock
    window reaches the schedule's end), and 0 elsewhere; at the target size that keeps what stock keeps."""
    windows = {"control_guidance_start": [0.25, 0.0], "control_guidance_end": [0.75, 0.5]}
    scales = [0.5, 0.8]
    stock, pipe = build_tiny_sd_controlnet_pipeline(controlnets=2), build_tiny_sd_controlnet_pipeline(controlnets=2)
    calls = {}
    for name, p in (("stock", stock), ("lssgen", pipe)):
        p.set_progress_bar_config(disable=True)
        if name == "lssgen":
            lssgen.patch(p, **THREE_STAGES)
        records = [[], []]
        handles = [h for net, seen in zip(p.controlnet.nets, records) for h in _effective_scales(net, seen)]
        kwargs = test_sd.sd_call_kwargs(p, height=SIZE, width=SIZE)
        p(**kwargs, image=control_images(2), controlnet_conditioning_scale=scales, **windows)
        for handle in handles:
            handle.remove()
        calls[name] = records
    plan = lssgen.plan_for(pipe, SIZE, SIZE, 8, **THREE_STAGES)
    for index, scale in enumerate(scales):
        stock_calls = calls["stock"][index]
        kept = [t for t, effective in stock_calls if effective > 0]
        assert all(effective == pytest.approx(scale) for _, effective in stock_calls if effective > 0)
        high = math.inf if stock_calls[0][1] > 0 else max(kept)
        low = -math.inf if stock_calls[-1][1] > 0 else min(kept)
        got = calls["lssgen"][index]
        assert [t for t, _ in got] == [t for stage in plan.stages for t in stage.timesteps]
        expected = [scale if low <= t <= high else 0.0 for t, _ in got]
        assert [effective for _, effective in got] == pytest.approx(expected, abs=1e-6), index
        # The check bites: within the low-resolution stages, some calls are kept and some are not.
        low_resolution = expected[: plan.stage_ends[-2]]
        assert 0.0 in low_resolution and scale in low_resolution, index
        # At the target size, a call is kept exactly where stock keeps the same timestep.
        stock_keeps = dict(stock_calls)
        for t, effective in got[plan.stage_ends[-2] :]:
            assert (effective > 0) == (stock_keeps[t] > 0), (index, t)


# --- hooks, and bad input ---------------------------------------------------------------------------------------
def test_patch_hooks_every_controlnet_and_unpatch_removes_exactly_those_hooks():
    from diffusers.hooks import HookRegistry, ModelHook

    pipe = build_tiny_sdxl_controlnet_pipeline(controlnets=2)
    nets = controlnets_of(pipe)
    user_hook = ModelHook()
    HookRegistry.check_if_exists_or_initialize(nets[1]).register_hook(user_hook, "user")
    lssgen.patch(pipe)
    lssgen.patch(pipe)  # re-patching replaces the hooks, never stacks them
    # The control hook on the multi-controlnet as a whole, the stage's size conditioning on each controlnet.
    assert list(pipe.controlnet._diffusers_hook.hooks) == [CONTROL_HOOK]
    for net in nets:
        hooks = [name for name in net._diffusers_hook.hooks if name.startswith("lssgen")]
        assert hooks == [lssgen.find_adapter(pipe).stage_hook_name]
    lssgen.unpatch(pipe)
    assert [list(net._diffusers_hook.hooks) for net in nets] == [[], ["user"]]
    assert list(pipe.controlnet._diffusers_hook.hooks) == []


def test_two_patched_pipes_sharing_their_controlnets_join_one_hook_and_each_leaves_it():
    """Two ControlNet pipes on the same modules (as `from_pipe` or `**pipe.components` build them), both patched: each
    generates what it generates alone; unpatching one leaves the other served; unpatching both leaves no hook."""
    first = build_tiny_sd_controlnet_pipeline(controlnets=2)
    second = type(first)(**first.components)
    kwargs = {"image": control_images(2), "controlnet_conditioning_scale": [0.9, 0.6], "control_guidance_end": 0.7}
    call = test_sd.sd_call_kwargs(first, height=SIZE, width=SIZE, num_inference_steps=2)
    for pipe in (first, second):
        pipe.set_progress_bar_config(disable=True)
        lssgen.patch(pipe, **THREE_STAGES)
    alone = first(**call, **kwargs).images
    torch.testing.assert_close(
        second(**{**call, "generator": torch.Generator().manual_seed(0)}, **kwargs).images, alone
    )
    lssgen.unpatch(first)
    again = second(**{**call, "generator": torch.Generator().manual_seed(0)}, **kwargs).images
    torch.testing.assert_close(again, alone)
    lssgen.unpatch(second)
    modules = [first.controlnet, *controlnets_of(first)]
    registries = [getattr(module, "_diffusers_hook", None) for module in modules]
    assert not [name for registry in registries if registry for name in registry.hooks if name.startswith("lssgen")]


@pytest.mark.parametrize(
    ("build", "call", "steps", "overrides", "match"),
    [
        # The stock pipeline's own check of the control image against the prompts.
        (
            build_tiny_sd_controlnet_pipeline,
            test_sd.sd_call_kwargs,
            2,
            {"image": torch.rand(2, 3, SIZE, SIZE), "prompt": ["a", "b", "c"]},
            "image batch size must be same as prompt batch size",
        ),
        # lssgen's own: these pipelines generate at a tensor control image's size, which halves to no stage.
        (
            build_tiny_flux_controlnet_pipeline,
            test_flux.flux_call_kwargs,
            2,
            {"control_image": torch.rand(1, 3, 100, 100)},
            "`control_image` is a",
        ),
        (
            build_tiny_qwenimage_controlnet_pipeline,
            test_qwenimage.qwenimage_call_kwargs,
            12,
            {"control_image": torch.rand(1, 3, 112, 112)},
            "`control_image` is a",
        ),
        (
            build_tiny_zimage_controlnet_pipeline,
            test_zimage.zimage_call_kwargs,
            2,
            {"control_image": torch.rand(1, 3, 100, 100)},
            "`control_image` is a",
        ),
    ],
    ids=["stock-batch", "tensor-size-flux", "tensor-size-qwenimage", "tensor-size-zimage"],
)
def test_bad_control_input_raises_before_denoising_and_leaves_the_pipe_usable(build, call, steps, overrides, match):
    pipe = build()
    pipe.set_progress_bar_config(disable=True)
    lssgen.patch(pipe, **THREE_STAGES)
    argument = lssgen.find_adapter(pipe).control_image_argument
    kwargs = call(pipe, height=SIZE, width=SIZE, num_inference_steps=steps, **{argument: CONTROL})
    calls = []
    denoiser = getattr(pipe, lssgen.find_adapter(pipe).denoiser)
    handle = denoiser.register_forward_pre_hook(lambda module, args: calls.append(1))
    with pytest.raises(ValueError, match=match):
        pipe(**{**kwargs, **overrides})
    handle.remove()
    assert not calls and pipe._lssgen.run is None
    assert pipe(**kwargs).images.shape == (1, 3, SIZE, SIZE)


@pytest.mark.parametrize(
    ("build", "stock_class"),
    [
        (build_tiny_qwenimage_controlnet_pipeline, "QwenImageControlNetInpaintPipeline"),
        # The inpainting pipeline takes only controlnets with more input channels than the latents (version 2.0's).
        (
            functools.partial(build_tiny_zimage_controlnet_pipeline, control_in_dim=33),
            "ZImageControlNetInpaintPipeline",
        ),
    ],
    ids=["qwenimage", "zimage"],
)
def test_unserved_controlnet_classes_are_refused_at_patch_naming_the_served_ones(build, stock_class):
    pipe = getattr(diffusers, stock_class)(**build().components)
    served = lssgen.find_adapter(build()).pipeline_classes
    with pytest.raises(ValueError, match=f"no adapter for {stock_class}") as refused:
        lssgen.patch(pipe)
    assert all(name in str(refused.value) for name in served)
    assert "_lssgen" not in pipe.__dict__
