"""SDXL and Playground v2.5: the adapter contract, plus the size conditioning and Playground's VAE and scheduler."""

import pytest
import torch
from unet_contract import UNetContract

import lssgen
from lssgen.tiny.sdxl import build_tiny_sdxl_pipeline


def sdxl_call_kwargs(pipe, prompts="a red fox in the snow", seed=0, **overrides):
    kwargs = {
        "prompt": prompts,
        "height": 256,
        "width": 256,
        "num_inference_steps": 8,
        "guidance_scale": 5.0,
        "output_type": "pt",
        "generator": torch.Generator().manual_seed(seed),
    }
    kwargs.update(overrides)
    return kwargs


class TestSDXL(UNetContract):
    adapter_name = "sdxl"
    lora_prefix = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"

    def build_pipe(self, seed=0, playground=False):
        return build_tiny_sdxl_pipeline(seed=seed, playground=playground)

    def call_kwargs(self, pipe, prompts="a red fox in the snow", seed=0, **overrides):
        return sdxl_call_kwargs(pipe, prompts, seed, **overrides)

    def conditioning_hooks(self, pipe, records):
        # The time ids hook runs inside the UNet's forward, so the ids are read where the UNet embeds them.
        def on_time_ids(module, args):
            records[-1]["time_ids"] = [tuple(row) for row in args[0].reshape(-1, 6).tolist()]

        return [pipe.unet.add_time_proj.register_forward_pre_hook(on_time_ids)]

    def expected(self, pipe, stage, timestep, crops=((0, 0), (0, 0))):
        # Original and target size are the stage's size, in the negative (first) and the positive row alike.
        rows = [(stage.height, stage.width, *crop, stage.height, stage.width) for crop in crops]
        return {**super().expected(pipe, stage, timestep), "time_ids": rows}

    def test_published_defaults_and_default_size(self, pipe):
        adapter = lssgen.find_adapter(pipe)
        assert (adapter.default_steps, adapter.default_guidance, adapter.base_size) == (50, 5.0, 1024)
        lssgen.patch(pipe)
        plan = lssgen.plan_for(pipe)  # the UNet's sample size: 128 latent cells, 1024 px
        assert (plan.height, plan.width) == (1024, 1024)
        plan = lssgen.plan_for(pipe, 2048, 2048, 50, min_resolution=1024)
        assert [(s.height, s.num_steps) for s in plan.stages] == [(1024, 50), (2048, 50)]  # no shortening

    def test_crops_and_negative_sizes_follow_low_stages_and_the_pipeline_keeps_its_ids(self, pipe):
        lssgen.patch(pipe, **self.three_stages)
        pipeline_ids = []

        def at_step_end(pipeline, step_index, timestep, callback_kwargs):
            pipeline_ids.append(callback_kwargs["add_time_ids"].tolist())
            return {}

        records, handle = self.trace(pipe)
        kwargs = self.call_kwargs(
            pipe,
            crops_coords_top_left=(8, 16),
            negative_original_size=(512, 512),
            negative_target_size=(512, 512),
            negative_crops_coords_top_left=(4, 4),
            callback_on_step_end=at_step_end,
            callback_on_step_end_tensor_inputs=["latents", "add_time_ids"],
        )
        self.images(pipe, **kwargs)
        handle.remove()
        plan = self.plan(pipe, **self.three_stages)
        crops = ((4, 4), (8, 16))
        stock = [[512, 512, 4, 4, 512, 512], [256, 256, 8, 16, 256, 256]]
        low, last = plan.stages[:-1], plan.stages[-1]
        expected = [self.expected(pipe, s, t, crops) for s in low for t in s.timesteps]
        # At the target size the user's own conditioning (here the negative sizes) reaches the UNet unchanged.
        expected += [{**self.expected(pipe, last, t), "time_ids": [tuple(r) for r in stock]} for t in last.timesteps]
        assert records == expected
        # The hook rewrites a copy: the pipeline's own tensor keeps the sizes it was called with, every step.
        assert pipeline_ids == [stock] * plan.total_steps

    def test_a_stage_starting_on_the_previous_stage_timestep_uses_its_own_index(self, pipe):
        # SDXL's Euler ("leading" spacing) gives [501, 1 | 501, 251, 1]: looked up by value, stage 2's 501 could
        # resolve to the wrong step. Each stage's scheduler must step through its own schedule from its start.
        options = {"min_resolution": 128, "base_height": 256, "base_width": 256, "shorten_intermediate_steps": True}
        lssgen.patch(pipe, **options)
        plan = self.plan(pipe, steps=4)
        assert [stage.timesteps for stage in plan.stages] == [(501.0, 1.0), (501.0, 251.0, 1.0)]
        used = []

        def before_step(module, args):
            staged = pipe._lssgen.run.scheduler
            current = staged.current  # its step index is set by `scale_model_input`, before the UNet runs
            used.append((staged.stage_index, current.step_index, float(current.timesteps[current.step_index])))

        handle = pipe.unet.register_forward_pre_hook(before_step)
        images = self.images(pipe, **self.call_kwargs(pipe, num_inference_steps=4))
        handle.remove()
        assert used == [(0, 0, 501.0), (0, 1, 1.0), (1, 1, 501.0), (1, 2, 251.0), (1, 3, 1.0)]
        assert torch.isfinite(images).all()

    @pytest.mark.parametrize("playground", [False, True], ids=["sdxl", "playground"])
    def test_vae_normalisation_matches_the_pipeline_and_round_trips(self, playground):
        pipe = self.build_pipe(playground=playground)
        pipe.set_progress_bar_config(disable=True)
        adapter = lssgen.find_adapter(pipe)
        small = {"height": 64, "width": 64, "num_inference_steps": 2}
        latents = pipe(**self.call_kwargs(pipe, output_type="latent", **small)).images
        images = pipe(**self.call_kwargs(pipe, **small)).images
        # What the pixel round trip decodes is what the pipeline decodes.
        decoded = pipe.vae.decode(adapter.latents_to_vae(pipe, latents), return_dict=False)[0]
        torch.testing.assert_close(pipe.image_processor.postprocess(decoded, output_type="pt"), images)
        # And what it encodes is normalised back exactly.
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(adapter.vae_to_latents(pipe, adapter.latents_to_vae(pipe, x)), x)

    def test_playground_follows_the_plan_in_every_scaling_space(self):
        # Playground v2.5: VAE latents normalised by a per-channel mean and std, and an EDM DPM-Solver scheduler
        # (its timesteps are log-sigmas, not integers).
        pipe = self.build_pipe(playground=True)
        pipe.set_progress_bar_config(disable=True)
        lssgen.patch(pipe, self.small_upsampler(pipe), **self.three_stages)
        plan = self.plan(pipe, **self.three_stages)
        expected = [self.expected(pipe, s, t) for s in plan.stages for t in s.timesteps]
        results = {}
        for space in ("learned", "latent", "pixel"):
            records, handle = self.trace(pipe)
            results[space] = self.images(pipe, **self.call_kwargs(pipe), scaling_space=space)
            handle.remove()
            assert records == expected, space
            assert results[space].shape == (1, 3, 256, 256) and torch.isfinite(results[space]).all()
        assert not torch.equal(results["learned"], results["latent"])
        assert not torch.equal(results["latent"], results["pixel"])
