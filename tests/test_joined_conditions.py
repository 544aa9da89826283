"""Conditions joined to the latents along the channels (issue #22): FLUX.1 Control (Canny, Depth) and Fill through
lssgen. Inside the transformer, every call's condition channels are the pipeline's own preparation at the stage's
size (`lssgen.joined_conditions`), at the target size the stock condition; each class runs the contract's
image-to-image subset; bad input is refused before any denoising."""

from __future__ import annotations

import inspect

import pytest
import test_cogview4
import test_flux
import torch
import torch.nn.functional as F
from diffusers import (
    CogView4ControlPipeline,
    FluxControlImg2ImgPipeline,
    FluxControlInpaintPipeline,
    FluxControlPipeline,
    FluxFillPipeline,
)
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from test_img2img import IMAGE, IMAGE_TO_IMAGE_TESTS, OTHER_IMAGE
from test_inpainting import InpaintContract, right_half_mask

import lssgen
from lssgen.tiny import build_tiny_flux_pipeline
from lssgen.tiny.cogview4 import build_tiny_cogview4_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: extra threads only add synchronisation

LATENT_CHANNELS = 16  # the tiny FLUX.1's packed latent channels
FILL_CHANNELS = LATENT_CHANNELS + 256  # the masked image's latents, and the 8 x 8 mask of every 2 x 2 cells
COGVIEW4_CHANNELS = 16  # the tiny CogView4's latent channels (unpacked)


def deterministic_vae(pipe):
    """The pipelines sample their conditions from the VAE with the call's generator: a distribution without spread
    makes a condition computed here comparable with the one the call made."""
    encode = pipe.vae.encode
    pipe.vae.encode = lambda x, return_dict=True: AutoencoderKLOutput(
        latent_dist=DiagonalGaussianDistribution(encode(x).latent_dist.parameters, deterministic=True)
    )


class JoinedConditionContract:
    pipeline_class: type
    condition_channels: int
    image_to_image = False

    def build_pipe(self, seed=0):
        components = build_tiny_flux_pipeline(seed=seed, condition_channels=self.condition_channels).components
        accepted = inspect.signature(self.pipeline_class.__init__).parameters
        return self.pipeline_class(**{name: value for name, value in components.items() if name in accepted})

    def condition_arguments(self, height, width) -> dict:
        raise NotImplementedError

    def call_kwargs(self, pipe, prompts="a red fox in the snow", seed=0, **overrides):
        kwargs = super().call_kwargs(pipe, prompts, seed, **overrides)
        height, width = kwargs.get("height", self.height), kwargs.get("width", self.width)
        extra = self.condition_arguments(height, width)
        if self.image_to_image:
            image = F.interpolate(OTHER_IMAGE, size=(height, width), mode="bilinear", align_corners=False)
            extra.update(image=image, strength=self.strength)
        return {**extra, **kwargs}

    def expected_condition(self, pipe, call, stage) -> torch.Tensor:
        """The condition the pipeline prepares for a call at `stage`'s size, packed (computed here)."""
        raise NotImplementedError

    def test_the_transformer_reads_the_condition_prepared_at_each_stage(self, pipe):
        deterministic_vae(pipe)
        lssgen.patch(pipe, None, **self.three_stages)
        call = self.call_kwargs(pipe)
        plan = self.plan(pipe, **self.three_stages)
        inputs = []
        hook = pipe.transformer.register_forward_pre_hook(
            lambda module, args, kwargs: inputs.append(kwargs["hidden_states"].clone()), with_kwargs=True
        )
        self.images(pipe, **call)
        hook.remove()
        calls = [stage for stage in plan.stages for _ in range(stage.num_denoiser_steps * self.calls_per_step)]
        assert len(inputs) == len(calls)
        for stage in plan.stages:
            expected = self.expected_condition(pipe, call, stage)
            for hidden_states in (h for h, each in zip(inputs, calls) if each is stage):
                torch.testing.assert_close(self.condition_of(hidden_states), expected, rtol=1e-4, atol=1e-4)
        # At the target size, exactly the stock call's.
        stock = self.build_pipe(seed=0)
        stock.set_progress_bar_config(disable=True)
        deterministic_vae(stock)
        stock_inputs = []
        hook = stock.transformer.register_forward_pre_hook(
            lambda module, args, kwargs: stock_inputs.append(kwargs["hidden_states"]), with_kwargs=True
        )
        stock(**self.call_kwargs(stock))
        hook.remove()
        assert torch.equal(self.condition_of(inputs[-1]), self.condition_of(stock_inputs[-1]))

    def condition_of(self, hidden_states):
        """The condition channels of the transformer's input (FLUX.1's: packed, after the latents')."""
        return hidden_states[..., LATENT_CHANNELS:]


class ControlContract(JoinedConditionContract):
    condition_channels = LATENT_CHANNELS

    def condition_arguments(self, height, width):
        return {"control_image": F.interpolate(IMAGE, size=(height, width), mode="bilinear", align_corners=False)}

    def expected_condition(self, pipe, call, stage):
        # A tensor, which the pipeline takes as it is: resized to the stage by the pipeline's image processor.
        control = pipe.image_processor.resize(call["control_image"], stage.height, stage.width)
        latents = pipe.vae.encode(control).latent_dist.mode()
        latents = (latents - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
        return pipe._pack_latents(latents, *latents.shape)

    def test_a_control_image_of_the_wrong_batch_is_refused_before_denoising(self, pipe):
        lssgen.patch(pipe, None, **self.three_stages)
        before = self.images(pipe, **self.call_kwargs(pipe))
        calls = []
        hook = pipe.transformer.register_forward_pre_hook(lambda module, args: calls.append(1))
        three = torch.cat([self.call_kwargs(pipe)["control_image"]] * 3)
        with pytest.raises(ValueError, match="`control_image` gives 6 conditions for an effective batch of 4 images"):
            pipe(**{**self.call_kwargs(pipe, prompts=["a", "b"], num_images_per_prompt=2), "control_image": three})
        hook.remove()
        assert not calls
        assert torch.equal(self.images(pipe, **self.call_kwargs(pipe)), before)


class FillContract(JoinedConditionContract):
    condition_channels = FILL_CHANNELS
    image_to_image = True
    strength = 1.0
    # The pipeline samples a single input image's masked latents with the first generator for the whole batch.
    test_stage_noise_is_drawn_for_every_image_of_the_batch = (
        InpaintContract.test_stage_noise_is_drawn_for_every_image_of_the_batch
    )

    def condition_arguments(self, height, width):
        return {"mask_image": right_half_mask(height, width)}

    def expected_condition(self, pipe, call, stage):
        size = (stage.height, stage.width)
        pixels = pipe.image_processor.preprocess(call["image"], height=self.height, width=self.width)
        mask = pipe.mask_processor.preprocess(call["mask_image"], height=self.height, width=self.width)
        stage_mask = (F.interpolate(mask, size, mode="area") >= 0.5).float()
        masked = F.interpolate(pixels * (1 - mask), size, mode="area") * (1 - stage_mask)
        mask_latents, masked_latents = pipe.prepare_mask_latents(
            stage_mask, masked, 1, 4, 1, stage.height, stage.width, torch.float32, "cpu", None
        )
        return torch.cat((masked_latents, mask_latents), dim=-1)

    @pytest.mark.parametrize(
        ("overrides", "match"),
        [
            ({"masked_image_latents": torch.zeros(1, 256, 16)}, "`masked_image_latents` are given"),
            ({"mask_image": torch.ones(1, 1, 64, 64)}, "`mask_image` is 64x64 pixels but `image` is"),
        ],
        ids=["masked-image-latents", "mask-size"],
    )
    def test_bad_fill_input_is_refused_before_denoising(self, pipe, overrides, match):
        lssgen.patch(pipe, None, **self.three_stages)
        before = self.images(pipe, **self.call_kwargs(pipe))
        calls = []
        hook = pipe.transformer.register_forward_pre_hook(lambda module, args: calls.append(1))
        with pytest.raises(ValueError, match=match):
            pipe(**{**self.call_kwargs(pipe), **overrides})
        hook.remove()
        assert not calls
        assert torch.equal(self.images(pipe, **self.call_kwargs(pipe)), before)


def joined_contract(contract: type, pipeline_class: type, family: type = test_flux.TestFlux, **attributes) -> type:
    """`contract` and the adapter contract's image-to-image subset for `family`'s `pipeline_class` (FLUX.1's)."""
    contract_tests = {name for cls in family.__mro__ for name in vars(cls) if name.startswith("test_")}
    dropped = dict.fromkeys(contract_tests - set(IMAGE_TO_IMAGE_TESTS))
    members = {"pipeline_class": pipeline_class, "trace_cases": family.trace_cases[1:3], **attributes}
    return type(f"Test{pipeline_class.__name__}", (contract, family), {**dropped, **members})


TestFluxControlPipeline = joined_contract(ControlContract, FluxControlPipeline)
TestFluxControlImg2ImgPipeline = joined_contract(
    ControlContract, FluxControlImg2ImgPipeline, image_to_image=True, strength=0.6
)
TestFluxFillPipeline = joined_contract(FillContract, FluxFillPipeline)


class TestFluxControlInpaintPipeline(ControlContract, joined_contract(InpaintContract, FluxControlInpaintPipeline)):
    """Control and inpainting at once: the control image joined to the latents follows the stage, and so does the
    kept region, which this pipeline blends unpacked and packs every step (with the target size's height and
    width: lssgen reads them from the tensor instead)."""

    samples_image = False  # the kept-region trace encodes with a VAE without spread (the control is sampled first)

    def build_pipe(self, seed=0):
        return ControlContract.build_pipe(self, seed)

    def test_the_kept_region_is_the_stage_image_noised_with_one_noise_per_stage(self, pipe):
        deterministic_vae(pipe)
        super().test_the_kept_region_is_the_stage_image_noised_with_one_noise_per_stage(pipe)

    def denoised_latent(self, pipe, latent_input, stage):
        return super().denoised_latent(pipe, latent_input[..., :LATENT_CHANNELS], stage)  # the control after it

    test_padding_mask_crop_keeps_its_stock_meaning = None  # the pipeline takes no `padding_mask_crop`


class TestCogView4ControlPipeline(
    ControlContract, joined_contract(JoinedConditionContract, CogView4ControlPipeline, test_cogview4.TestCogView4)
):
    """CogView4's Control pipeline: unpacked latents, the control image's latents joined after them (channels 16 on).
    It samples its target-size control from the VAE without the call's generator, so a seed does not repeat its
    images, with or without lssgen: the pipes here get a VAE without spread, for the contract's seeded checks."""

    def build_pipe(self, seed=0):
        components = build_tiny_cogview4_pipeline(seed=seed, condition_channels=COGVIEW4_CHANNELS).components
        pipe = CogView4ControlPipeline(**components)
        deterministic_vae(pipe)
        return pipe

    def condition_of(self, hidden_states):
        return hidden_states[:, COGVIEW4_CHANNELS:]

    def expected_condition(self, pipe, call, stage):
        control = pipe.image_processor.resize(call["control_image"], stage.height, stage.width)
        return pipe.vae.encode(control).latent_dist.mode() * pipe.vae.config.scaling_factor
