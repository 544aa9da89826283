"""Inpainting (issue #22): the stock inpainting pipelines through lssgen keep the kept region in every stage, at that
stage's size (`lssgen.inpainting`), and end on exactly what the stock pipeline keeps.

Checked inside the loop: the denoiser's input in the kept cells is the stage's image noised to the level the
denoiser is told, with one noise per stage; at every stage's end (noise level 0) it is the stage's image itself; and
the final latents keep the target-size image latents exactly. A mask that keeps everything gives the stock images.
Beside that, each class runs the adapter contract's image-to-image subset with a partial mask."""

from __future__ import annotations

import inspect

import numpy as np
import PIL.Image
import pytest
import test_chroma
import test_flux
import test_flux2
import test_qwenimage
import test_sd
import test_sd3
import test_sdxl
import torch
import torch.nn.functional as F
from diffusers import (
    ChromaInpaintPipeline,
    Flux2KleinInpaintPipeline,
    FluxInpaintPipeline,
    FluxKontextInpaintPipeline,
    QwenImageInpaintPipeline,
    StableDiffusion3InpaintPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionXLInpaintPipeline,
)
from test_img2img import IMAGE, IMAGE_TO_IMAGE_TESTS
from test_methods import record_latent_inputs
from test_reference_editing import REFERENCE, _kontext_expected, kontext_ids

import lssgen
from lssgen.cli import main
from lssgen.tiny import (
    build_tiny_cogview4_pipeline,
    build_tiny_flux_pipeline,
    build_tiny_sd3_pipeline,
    build_tiny_sd_pipeline,
    build_tiny_sdxl_pipeline,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: extra threads only add synchronisation


def right_half_mask(height: int, width: int) -> torch.Tensor:
    """A mask `(1, 1, H, W)` that repaints the right half (1) and keeps the left (0)."""
    mask = torch.zeros(1, 1, height, width)
    mask[..., width // 2 :] = 1.0
    return mask


class InpaintContract:
    """An inpainting class of a family (mixed into a subclass of the family's contract class): calls carry an
    input image of the call's size and a mask that repaints its right half, at strength 1.0 unless a test says."""

    pipeline_class: type
    strength = 1.0
    video_vae = False  # the family's VAE takes frames (Qwen-Image's)
    samples_image = True  # the pipeline encodes its image by sampling (else: the distribution's mode)
    pastes_crop_back = True  # with `padding_mask_crop`, the pipeline pastes its inpainted crop into the input

    def build_pipe(self, seed=0):
        components = super().build_pipe(seed=seed).components
        accepted = inspect.signature(self.pipeline_class.__init__).parameters
        return self.pipeline_class(**{name: value for name, value in components.items() if name in accepted})

    def call_kwargs(self, pipe, prompts="a red fox in the snow", seed=0, **overrides):
        kwargs = super().call_kwargs(pipe, prompts, seed, **overrides)
        height, width = kwargs.get("height", self.height), kwargs.get("width", self.width)
        image = F.interpolate(IMAGE, size=(height, width), mode="bilinear", align_corners=False)
        return {"image": image, "mask_image": right_half_mask(height, width), "strength": self.strength, **kwargs}

    def test_stage_noise_is_drawn_for_every_image_of_the_batch(self, pipe):
        """One generator per image: changing the last image's generator changes that image only. (The contract's
        own version compares with the image generated alone, but FLUX.1's inpainting pipeline samples the latents
        of a single input image with the first generator for the whole batch, with or without lssgen.)"""
        lssgen.patch(pipe, **self.three_stages)

        def batch(last_seed):
            generators = [torch.Generator().manual_seed(s) for s in (11, 12, 13, last_seed)]
            call = self.call_kwargs(pipe, prompts=["a fox", "a boat"], num_images_per_prompt=2, generator=generators)
            return self.images(pipe, **call)

        one, other = batch(14), batch(15)
        assert torch.equal(one[:3], other[:3])
        assert not torch.allclose(one[3], other[3], atol=1e-3)

    # --- what the loop holds ------------------------------------------------------------------------------------
    def image_latents(self, pipe, call) -> torch.Tensor:
        """The target-size image latents the stock pipeline blends with, unpacked: its image encoded by sampling
        with the call's generator (as the stock pipeline encodes it, first thing it draws)."""
        adapter = lssgen.find_adapter(pipe)
        pixels = pipe.image_processor.preprocess(call["image"], height=call["height"], width=call["width"])
        if self.video_vae:
            pixels = pixels[:, :, None]  # one frame
        distribution = pipe.vae.encode(pixels).latent_dist
        if not self.samples_image:
            return adapter.vae_to_latents(pipe, distribution.mode())
        return adapter.vae_to_latents(pipe, distribution.sample(torch.Generator().manual_seed(0)))

    def kept_cells(self, stage) -> torch.Tensor:
        """The cells of `stage`'s latent grid that the mask keeps whole (the left half: the mask averaged over
        a cell is 0)."""
        keep = torch.zeros(stage.latent_height, stage.latent_width, dtype=torch.bool)
        keep[:, : stage.latent_width // 2] = True
        return keep

    def test_the_kept_region_is_the_stage_image_noised_with_one_noise_per_stage(self, pipe):
        """Inside the loop: at each low-resolution stage's end (the stage ran its schedule out) the kept cells of
        the latents are image_s, the image encoded at the stage's size (`stage_image`); the final latents keep the
        target image latents exactly. Flow families, in every denoiser call of a stage: the kept cells of the
        latent it denoises are (1 - sigma) image_s + sigma noise_s, sigma the level it is told and noise_s the same
        in every call of the stage and new in each stage."""
        lssgen.patch(pipe, None, **self.three_stages)
        call = self.call_kwargs(pipe, output_type="latent")
        plan = self.plan(pipe, **self.three_stages)
        adapter = lssgen.find_adapter(pipe)
        image = self.image_latents(pipe, call)
        records, handle = self.trace(pipe)
        inputs, hook = record_latent_inputs(self.denoiser(pipe))
        ends = {}

        def at_step_end(pipeline, step, timestep, callback_kwargs):
            ends[step] = callback_kwargs["latents"].clone()
            return {}

        final = self.images(pipe, **call, callback_on_step_end=at_step_end)
        handle.remove()
        hook.remove()
        step_stages = [stage for stage in plan.stages for _ in range(stage.num_denoiser_steps)]
        assert len(inputs) == len(step_stages) * self.calls_per_step
        noises = {}
        for step, stage in enumerate(step_stages):
            keep = self.kept_cells(stage)
            expected_image = image if stage is plan.stages[-1] else self.stage_image(pipe, call, stage)
            if stage is not plan.stages[-1] and step == plan.stage_ends[stage.index] - 1:
                end = adapter.unpack(pipe, ends[step], stage.latent_height, stage.latent_width)
                torch.testing.assert_close(end[..., keep], expected_image[..., keep], rtol=1e-4, atol=1e-4)
            if not adapter.flow:
                continue
            latent = self.denoised_latent(pipe, inputs[step * self.calls_per_step], stage)
            sigma = self.noise_level(pipe, records[step * self.calls_per_step]["timestep"], self.height, self.width)
            noise = (latent - (1 - sigma) * expected_image) / sigma
            if stage.index in noises:
                torch.testing.assert_close(noise[..., keep], noises[stage.index][..., keep], rtol=1e-3, atol=1e-3)
            else:
                noises[stage.index] = noise
                assert abs(float(noise[..., keep].std()) - 1.0) < 0.3  # noise, not a leftover of the image
        if adapter.flow:
            first, second = (noises[stage.index] for stage in plan.stages[:2])
            keep = self.kept_cells(plan.stages[0])
            second = F.interpolate(second, size=first.shape[-2:], mode="nearest")  # each cell's top-left child
            assert not torch.allclose(second[..., keep], first[..., keep], atol=0.1)
        target = self.final_latents(pipe, final, plan.stages[-1])
        keep = self.kept_cells(plan.stages[-1])
        torch.testing.assert_close(target[..., keep], image[..., keep], rtol=1e-5, atol=1e-5)

    def denoised_latent(self, pipe, latent_input, stage):
        """The latent a denoiser call denoises, unpacked, from its latent input."""
        return lssgen.find_adapter(pipe).denoiser_latents(pipe, latent_input, stage)

    def stage_image(self, pipe, call, stage):
        """The image latents of a low-resolution `stage`: the input image resized to the stage by the pipeline's
        image processor and encoded there (the distribution's mode), as image-to-image's first stage."""
        pixels = pipe.image_processor.preprocess(call["image"], height=stage.height, width=stage.width)
        return lssgen.find_adapter(pipe).encode_pixels(pipe, pixels)

    def final_latents(self, pipe, output, stage):
        """The unpacked final latents from the pipeline's `output_type="latent"` output."""
        return lssgen.find_adapter(pipe).unpack(pipe, output, stage.latent_height, stage.latent_width)

    def test_a_mask_that_keeps_everything_gives_the_stock_images(self, pipe):
        stock = self.build_pipe(seed=0)
        stock.set_progress_bar_config(disable=True)
        keep_all = {"mask_image": torch.zeros(1, 1, self.height, self.width)}
        expected = self.images(stock, **{**self.call_kwargs(stock), **keep_all})
        lssgen.patch(pipe, None, **self.three_stages)
        assert torch.equal(self.images(pipe, **{**self.call_kwargs(pipe), **keep_all}), expected)

    def test_padding_mask_crop_keeps_its_stock_meaning(self, pipe):
        """With `padding_mask_crop` the pipeline inpaints a crop around the mask (and most paste it back into the
        input): lssgen's final latents keep the crop's kept cells exactly as stock's, and outside the crop a pasting
        pipeline's image is the stock one (the input's pixels)."""
        stock = self.build_pipe(seed=0)
        stock.set_progress_bar_config(disable=True)
        rng = np.random.default_rng(3)
        image = PIL.Image.fromarray(rng.integers(0, 256, (self.height, self.width, 3), dtype=np.uint8))
        mask = np.zeros((self.height, self.width), np.uint8)
        mask[8:40, 8:40] = 255  # a small square near the corner: the crop leaves most of the image out
        crop = {"image": image, "mask_image": PIL.Image.fromarray(mask), "padding_mask_crop": 8, "output_type": "pil"}

        def generate(pipeline):
            """The image, and the latents after the last step."""
            latents = []

            def on_step(p, step, timestep, callback_kwargs):
                latents.append(callback_kwargs["latents"])
                return {}

            output = self.images(pipeline, **{**self.call_kwargs(pipeline), **crop}, callback_on_step_end=on_step)
            return np.asarray(output[0]), latents[-1]

        expected, stock_latents = generate(stock)
        lssgen.patch(pipe, None, **self.three_stages)
        plan = self.plan(pipe, **self.three_stages)
        records, handle = self.trace(pipe)
        got, latents = generate(pipe)
        handle.remove()
        assert len(records) == plan.total_steps * self.calls_per_step
        assert got.shape == expected.shape
        # The crop's kept cells: those of tokens whose every pixel the pipeline's processed mask keeps.
        region = pipe.mask_processor.get_crop_region(crop["mask_image"], self.width, self.height, pad=8)
        processed = pipe.mask_processor.preprocess(
            crop["mask_image"], height=self.height, width=self.width, crops_coords=region, resize_mode="fill"
        )
        adapter, target = lssgen.find_adapter(pipe), plan.stages[-1]
        cell, multiple = self.height // target.latent_height, adapter.latent_multiple  # pixels a cell, cells a token
        repainted = F.max_pool2d(processed, cell * multiple)
        kept = repainted.repeat_interleave(multiple, -2).repeat_interleave(multiple, -1)[0, 0] == 0
        assert kept.any() and not kept.all()
        mine = adapter.unpack(pipe, latents, target.latent_height, target.latent_width)
        theirs = adapter.unpack(stock, stock_latents, target.latent_height, target.latent_width)
        assert torch.equal(mine[..., kept], theirs[..., kept])
        if self.pastes_crop_back:
            outside = np.ones((self.height, self.width), bool)
            outside[:64, :64] = False  # the crop (the square and its padding, grown to the image's aspect) is in here
            assert np.array_equal(got[outside], expected[outside])
        assert not np.array_equal(got, expected)  # inside, lssgen generated

    @pytest.mark.parametrize(
        ("mask", "match"),
        [
            (lambda h, w: torch.ones(1, 1, h // 2, w), r"`mask_image` is \d+x\d+ pixels but `image` is \d+x\d+"),
            (lambda h, w: torch.full((1, 1, h, w), 255.0), r"`mask_image` has values in \[255, 255\]"),
            (lambda h, w: -torch.ones(1, 1, h, w), r"values must be in \[0, 1\]"),
        ],
        ids=["mask-size", "mask-8-bit", "mask-negative"],
    )
    def test_bad_masks_are_refused_before_denoising(self, pipe, mask, match):
        lssgen.patch(pipe, None, **self.three_stages)
        before = self.images(pipe, **self.call_kwargs(pipe))
        calls = []
        hook = self.denoiser(pipe).register_forward_pre_hook(lambda module, args: calls.append(1))
        with pytest.raises(ValueError, match=match):
            pipe(**{**self.call_kwargs(pipe), "mask_image": mask(self.height, self.width)})
        hook.remove()
        assert not calls
        assert torch.equal(self.images(pipe, **self.call_kwargs(pipe)), before)


def inpaint_contract(family: type, pipeline_class: type, **attributes) -> type:
    """`InpaintContract` and the contract's image-to-image subset for `family`'s inpainting `pipeline_class`."""
    contract_tests = {name for cls in family.__mro__ for name in vars(cls) if name.startswith("test_")}
    dropped = dict.fromkeys(contract_tests - set(IMAGE_TO_IMAGE_TESTS))
    # Two of the plan cases (one shortened, one not).
    members = {"pipeline_class": pipeline_class, "trace_cases": family.trace_cases[1:3], **attributes}
    return type(f"Test{pipeline_class.__name__}", (InpaintContract, family), {**dropped, **members})


TestFluxInpaintPipeline = inpaint_contract(test_flux.TestFlux, FluxInpaintPipeline)
AT_STRENGTH_TESTS = (
    "test_denoiser_calls_follow_the_plan",
    "test_the_kept_region_is_the_stage_image_noised_with_one_noise_per_stage",
)


class TestFluxInpaintPipelineAtStrength(TestFluxInpaintPipeline):
    """`strength` below 1: the first stage starts from the image noised where the plan puts the strength (the
    image-to-image rule), and the kept region is still each stage's image on the stage's own noise."""

    strength = 0.6


for _name in dir(TestFluxInpaintPipelineAtStrength):
    if _name.startswith("test_") and _name not in AT_STRENGTH_TESTS:
        setattr(TestFluxInpaintPipelineAtStrength, _name, None)


class TestChromaInpaintPipeline(inpaint_contract(test_chroma.TestChroma, ChromaInpaintPipeline)):
    """diffusers 0.42.1's ChromaInpaintPipeline reads `transformer.config.guidance_embeds`, which
    ChromaTransformer2DModel does not keep: without it the stock pipeline fails, and lssgen says how to set it."""

    pastes_crop_back = False  # it returns the crop

    def build_pipe(self, seed=0):
        pipe = super().build_pipe(seed=seed)
        pipe.transformer.register_to_config(guidance_embeds=False)
        return pipe

    def test_a_transformer_without_guidance_embeds_is_named_before_denoising(self):
        pipe = super().build_pipe(seed=0)
        pipe.set_progress_bar_config(disable=True)
        lssgen.patch(pipe, None, **self.three_stages)
        with pytest.raises(AttributeError, match="guidance_embeds"):  # the stock pipeline's own failure
            pipe(**self.call_kwargs(pipe), start_sigma=1.0)
        with pytest.raises(ValueError, match=r"register_to_config\(guidance_embeds=False\)"):
            pipe(**self.call_kwargs(pipe))
        pipe.transformer.register_to_config(guidance_embeds=False)
        assert self.images(pipe, **self.call_kwargs(pipe)).shape == self.output_shape(1, self.height, self.width)


TestStableDiffusion3InpaintPipeline = inpaint_contract(test_sd3.TestSD3, StableDiffusion3InpaintPipeline)


class TestFluxKontextInpaintPipeline(inpaint_contract(test_flux.TestFlux, FluxKontextInpaintPipeline)):
    """FLUX.1 Kontext's inpainting, with `image_reference` (the reference tokens follow the image tokens at their
    own size in every stage); without it, refused. `_auto_resize=False`: the image's own size, not Kontext's."""

    adapter_name = "flux-kontext"
    expected = _kontext_expected
    samples_image = False
    pastes_crop_back = False  # it returns the crop

    def call_kwargs(self, pipe, prompts="a red fox in the snow", seed=0, **overrides):
        kwargs = super().call_kwargs(pipe, prompts, seed, **overrides)
        return {"image_reference": REFERENCE, "_auto_resize": False, **kwargs}

    def conditioning_hooks(self, pipe, records):
        return [pipe.transformer.pos_embed.register_forward_pre_hook(lambda m, args: kontext_ids(m, args, records))]

    def test_without_image_reference_it_is_refused_before_denoising(self, pipe):
        lssgen.patch(pipe, None, **self.three_stages)
        call = {**self.call_kwargs(pipe), "image_reference": None}
        calls = []
        hook = pipe.transformer.register_forward_pre_hook(lambda module, args: calls.append(1))
        with pytest.raises(ValueError, match=r"without `image_reference`.*image_reference=image"):
            pipe(**call)
        hook.remove()
        assert not calls
        assert self.images(pipe, **call, start_sigma=1.0).shape == self.output_shape(1, self.height, self.width)


TestStableDiffusionInpaintPipeline = inpaint_contract(test_sd.TestSD, StableDiffusionInpaintPipeline)
TestStableDiffusionXLInpaintPipeline = inpaint_contract(test_sdxl.TestSDXL, StableDiffusionXLInpaintPipeline)
TestQwenImageInpaintPipeline = inpaint_contract(test_qwenimage.TestQwenImage, QwenImageInpaintPipeline, video_vae=True)


class TestFlux2KleinInpaintPipeline(inpaint_contract(test_flux2.TestFlux2Klein, Flux2KleinInpaintPipeline)):
    """FLUX.2 klein's inpainting: one mask value per token, and the input image also rides along as reference
    tokens, at the target size in every stage."""

    samples_image = False

    def call_kwargs(self, pipe, prompts="a red fox in the snow", seed=0, **overrides):
        kwargs = super().call_kwargs(pipe, prompts, seed, **overrides)
        height, width = kwargs["image"].shape[-2:]
        # Read by `expected`: the reference tokens of this call's image (one per 16 x 16 pixels).
        self.reference_tokens = (height // 16) * (width // 16)
        return kwargs

    def expected(self, pipe, stage, timestep, references=0):
        return super().expected(pipe, stage, timestep, references + self.reference_tokens)

    def final_latents(self, pipe, output, stage):
        # Flux2KleinPipeline's `output_type="latent"` is the VAE's latent, unpatchified and de-normalised.
        return lssgen.find_adapter(pipe).vae_to_latents(pipe, output)


class InpaintingModelContract(InpaintContract):
    """An inpainting model (SD's 9-channel U-Nets, SD3's 33-channel transformers): the loop blends nothing in; the
    denoiser reads the mask and the masked image's latents after the latents, which follow the stage as the
    pipeline prepares them at its size."""

    def unpacked_inputs(self, pipe, latent, stage):
        """The denoiser's input `(B, C, h, w)`: latents, mask, masked image latents along the channels."""
        return latent

    def test_the_denoiser_reads_the_mask_and_masked_image_prepared_at_each_stage(self, pipe):
        """Every denoiser call gets, after the latents, the pipeline's own `prepare_mask_latents` of the stage's
        size: the mask (in pixels) resized to the stage by area and kept binary, and the image resized there and
        masked by it (the target-size stage: the stock call's own)."""
        from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        # The pipeline samples the masked image's latents with the call's generator: a VAE whose distribution has
        # no spread makes them comparable.
        encode = pipe.vae.encode
        pipe.vae.encode = lambda x, return_dict=True: AutoencoderKLOutput(
            latent_dist=DiagonalGaussianDistribution(encode(x).latent_dist.parameters, deterministic=True)
        )
        lssgen.patch(pipe, None, **self.three_stages)
        call = self.call_kwargs(pipe)
        plan = self.plan(pipe, **self.three_stages)
        inputs, hook = record_latent_inputs(self.denoiser(pipe))
        self.images(pipe, **call)
        hook.remove()
        step_stages = [stage for stage in plan.stages for _ in range(stage.num_denoiser_steps)]
        assert len(inputs) == len(step_stages) * self.calls_per_step
        pixels = pipe.image_processor.preprocess(call["image"], height=self.height, width=self.width)
        mask = pipe.mask_processor.preprocess(call["mask_image"], height=self.height, width=self.width)
        channels = lssgen.find_adapter(pipe).latent_channels(pipe)
        for stage in plan.stages:
            size = (stage.height, stage.width)
            stage_mask = (F.interpolate(mask, size, mode="area") >= 0.5).float()
            image = F.interpolate(pixels, size, mode="bicubic", antialias=True).clamp(-1, 1)
            arguments = {
                "mask": stage_mask,
                "masked_image": image * (stage_mask < 0.5),
                "batch_size": 1,
                "height": stage.height,
                "width": stage.width,
                "dtype": torch.float32,
                "device": "cpu",
                "generator": None,
                "do_classifier_free_guidance": True,
            }
            accepted = inspect.signature(pipe.prepare_mask_latents).parameters
            arguments = {name: value for name, value in arguments.items() if name in accepted}
            expected_mask, expected_masked = pipe.prepare_mask_latents(**arguments, **self.more_mask_arguments)
            for step, each in enumerate(step_stages):
                if each is stage:
                    got = self.unpacked_inputs(pipe, inputs[step * self.calls_per_step], stage)
                    torch.testing.assert_close(got[:, channels : channels + 1], expected_mask)
                    torch.testing.assert_close(got[:, channels + 1 :], expected_masked, rtol=1e-4, atol=1e-4)

    more_mask_arguments: dict = {}
    # The loop blends nothing in: no kept region to trace or to compare with stock's.
    test_the_kept_region_is_the_stage_image_noised_with_one_noise_per_stage = None
    test_a_mask_that_keeps_everything_gives_the_stock_images = None
    test_padding_mask_crop_keeps_its_stock_meaning = None


def inpainting_model_contract(family: type, pipeline_class: type, build, **attributes) -> type:
    """`inpaint_contract` for a family's inpainting model, built by `build(seed)` (its components)."""
    base = inpaint_contract(family, pipeline_class)

    def build_pipe(self, seed=0):
        return pipeline_class(**build(seed).components)

    name = f"Test{pipeline_class.__name__}WithInpaintingModel"
    return type(name, (InpaintingModelContract, base), {"build_pipe": build_pipe, **attributes})


TestStableDiffusionInpaintPipelineWithInpaintingModel = inpainting_model_contract(
    test_sd.TestSD, StableDiffusionInpaintPipeline, lambda seed: build_tiny_sd_pipeline(seed, unet_in_channels=9)
)
TestStableDiffusionXLInpaintPipelineWithInpaintingModel = inpainting_model_contract(
    test_sdxl.TestSDXL,
    StableDiffusionXLInpaintPipeline,
    lambda seed: build_tiny_sdxl_pipeline(seed, unet_in_channels=9),
)
TestStableDiffusion3InpaintPipelineWithInpaintingModel = inpainting_model_contract(
    test_sd3.TestSD3,
    StableDiffusion3InpaintPipeline,
    lambda seed: build_tiny_sd3_pipeline(seed, transformer_in_channels=33),
    more_mask_arguments={"num_images_per_prompt": 1},
)


# --- the family's inpainting pipeline, and the command line ----------------------------------------------------------
def test_inpainting_pipeline_is_the_familys_on_the_same_modules_patched_alike():
    pipe = build_tiny_flux_pipeline(seed=0)
    lssgen.patch(pipe, None, min_resolution=64)
    inpaint = lssgen.inpainting_pipeline(pipe)
    assert type(inpaint).__name__ == "FluxInpaintPipeline" and inpaint.transformer is pipe.transformer
    assert lssgen.is_patched(inpaint) and inpaint._lssgen.defaults == pipe._lssgen.defaults
    assert lssgen.inpainting_pipeline(inpaint) is inpaint
    with pytest.raises(ValueError, match="lssgen knows no inpainting pipeline for CogView4Pipeline"):
        lssgen.inpainting_pipeline(build_tiny_cogview4_pipeline(seed=0))


def test_generate_with_a_mask_inpaints_the_image_at_its_size(tiny_flux_dir, tmp_path, capsys):
    image = PIL.Image.fromarray(np.random.default_rng(5).integers(0, 256, (128, 192, 3), dtype=np.uint8))
    image.save(tmp_path / "in.png")
    mask = np.zeros((128, 192), np.uint8)
    mask[:, 96:] = 255
    PIL.Image.fromarray(mask).save(tmp_path / "mask.png")
    argv = ["generate", "--model", tiny_flux_dir, "--image", tmp_path / "in.png", "--mask", tmp_path / "mask.png"]
    argv += ["--steps", 8, "--min-resolution", 64, "--device", "cpu", "--baseline", "--out", tmp_path / "out.png"]
    assert main([str(arg) for arg in argv]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "1/2    96x64" in printed and "2/2    192x128" in printed  # the plan: half, then the image's size
    assert PIL.Image.open(tmp_path / "out.png").size == PIL.Image.open(tmp_path / "out-stock.png").size == (192, 128)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--mask", "mask.png"], "--mask needs --image"),
        (["--image", "in.png", "--mask", "small.png"], "--mask is 32x32 pixels but --image is 64x64"),
        (["--image", "in.png", "--mask", "missing.png"], "--mask missing.png"),
    ],
)
def test_generate_mask_errors_are_one_line(tiny_flux_dir, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    PIL.Image.new("RGB", (64, 64)).save(tmp_path / "in.png")
    PIL.Image.new("L", (32, 32)).save(tmp_path / "small.png")
    assert main(["generate", "--model", str(tiny_flux_dir), "--device", "cpu", *extra]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and message in err
