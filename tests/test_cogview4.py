"""CogView4: the adapter contract, plus its time shift, size conditioning per stage and re-noising."""

import numpy as np
import pytest
import torch
from adapter_contract import AdapterContract
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.cogview4.pipeline_cogview4 import calculate_shift

import lssgen
from lssgen.adapters.cogview4 import SIZE_CONDITIONING_HOOK
from lssgen.scaling import interpolate_latent
from lssgen.tiny.cogview4 import build_tiny_cogview4_pipeline

THREE_STAGES = {"min_resolution": 64, "base_height": 256, "base_width": 256}


def cogview4_call_kwargs(pipe, prompts="a red fox in the snow", seed=0, **overrides):
    kwargs = {
        "prompt": prompts,
        "height": 256,
        "width": 256,
        "num_inference_steps": 8,
        "guidance_scale": 3.5,
        "output_type": "pt",
        "generator": torch.Generator().manual_seed(seed),
    }
    kwargs.update(overrides)
    return kwargs


def shifted(sigma: float, mu: float) -> float:
    """The scheduler's linear time shift (CogView4-6B's `time_shift_type`)."""
    return mu / (mu + (1 / sigma - 1))


class TestCogView4(AdapterContract):
    adapter_name = "cogview4"
    lora_prefix = "transformer.transformer_blocks.0.attn1.to_q"
    calls_per_step = 2  # CogView4Pipeline runs the conditional and unconditional passes as two calls
    trace_cases = [
        *AdapterContract.trace_cases,
        (512, 512, 8, {"min_resolution": 256}),  # default base 1024: every stage is shortened
    ]

    def build_pipe(self, seed=0):
        return build_tiny_cogview4_pipeline(seed=seed)

    def call_kwargs(self, pipe, prompts="a red fox in the snow", seed=0, **overrides):
        return cogview4_call_kwargs(pipe, prompts, seed, **overrides)

    def noise_level(self, pipe, timestep, height, width):
        # CogView4Pipeline gives the transformer the unshifted time and steps on its shift at the call's `mu`.
        patches = (
            (height // pipe.vae_scale_factor)
            * (width // pipe.vae_scale_factor)
            // pipe.transformer.config.patch_size**2
        )
        config = pipe.scheduler.config
        mu = calculate_shift(patches, config.base_image_seq_len, config.base_shift, config.max_shift)
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
        scheduler.set_timesteps(timesteps=[timestep], sigmas=[timestep / config.num_train_timesteps], mu=mu)
        return float(scheduler.sigmas[0])

    def conditioning_hooks(self, pipe, records):
        # The size hook runs inside the transformer's forward, so the sizes are read where they are embedded.
        def on_sizes(module, args):
            _, original, target, crop, _ = args
            records[-1]["sizes"] = tuple(tuple(map(int, t[0].tolist())) for t in (original, target, crop))

        return [pipe.transformer.time_condition_embed.register_forward_pre_hook(on_sizes)]

    def observe(self, pipe, kwargs):
        return {"size": tuple(kwargs["hidden_states"].shape[-2:]), "timestep": float(kwargs["timestep"][0])}

    def expected(self, pipe, stage, timestep):
        size = (stage.height, stage.width)
        return {
            "size": (stage.latent_height, stage.latent_width),
            "timestep": timestep,
            "sizes": (size, size, (0, 0)),
        }

    # --- CogView4 specifics -----------------------------------------------------------------------------------
    def test_schedule_is_cogview4s_own_for_each_stage_size(self, pipe):
        lssgen.patch(pipe)
        plan = self.plan(pipe, 512, 512, 20, min_resolution=128)
        assert [(s.latent_height, s.latent_width) for s in plan.stages] == [(16, 16), (32, 32), (64, 64)]
        # CogView4Pipeline's rule on (h * w) / 4 patches: mu = 0.25 + 0.75 * sqrt(patches / 256).
        mus = [0.25 + 0.75 * (patches / 256) ** 0.5 for patches in (64, 256, 1024)]
        assert [s.scheduler_kwargs["mu"] for s in plan.stages] == pytest.approx(mus)
        for stage, mu in zip(plan.stages, mus):
            # Integer timesteps reach the transformer unshifted; the scheduler steps on their shifted sigmas.
            full = np.linspace(1000, 1, stage.num_steps).astype(np.int64).tolist()
            assert stage.timesteps == tuple(full[stage.begin_index :])
            assert stage.first_sigma == pytest.approx(shifted(full[stage.begin_index] / 1000, mu), abs=1e-6)
            if stage.index:
                assert full[stage.begin_index] >= 750 > full[stage.begin_index + 1]

    def test_callback_gets_the_shifted_sigma_of_every_step_and_stages_start_at_their_index(self, pipe):
        # CogView4 hands `scheduler.sigmas[i]` to the callback. Its stages can also begin with the same timestep
        # (here 1000, 1 | 1000, ...): a scheduler finding its place by timestep value would start at the wrong step.
        lssgen.patch(pipe, **THREE_STAGES)
        plan = self.plan(pipe, **THREE_STAGES)
        assert plan.stages[0].timesteps[0] == plan.stages[1].timesteps[0] == 1000.0
        want_sigmas, want_indices = [], []
        for stage in plan.stages:
            reference = type(pipe.scheduler).from_config(pipe.scheduler.config)
            reference.set_timesteps(**stage.scheduler_kwargs)
            for j in range(stage.num_denoiser_steps):
                want_sigmas.append(float(reference.sigmas[stage.begin_index + j]))
                want_indices.append((stage.index, stage.begin_index + j + 1))
        seen = []

        def on_step(pipeline, step_index, timestep, callback_kwargs):
            stage = plan.stage_at(step_index)
            inner = pipeline.scheduler.stage_schedulers[stage.index]  # the stage scheduler that just stepped
            seen.append((float(timestep), (stage.index, inner.step_index)))
            return {}

        pipe(**self.call_kwargs(pipe), callback_on_step_end=on_step)
        assert [s for s, _ in seen] == pytest.approx(want_sigmas, abs=1e-6)
        assert [i for _, i in seen] == want_indices

    def test_renoising_uses_the_shifted_sigma(self, pipe):
        # At 128 px (64 patches, mu = 0.625) the shifted sigma differs from the unshifted timestep / 1000 that
        # the published code re-noised with; the second stage's first input must be mixed with the shifted one.
        options = {"min_resolution": 64, "base_height": 128, "base_width": 128, "start_sigma": 0.667}
        lssgen.patch(pipe, **options)
        plan = self.plan(pipe, 128, 128, 8, **options)
        first, second = plan.stages
        assert second.begin_index > 0
        unshifted = second.timesteps[0] / 1000
        assert second.first_sigma == pytest.approx(shifted(unshifted, 0.25 + 0.75 * 0.5), abs=1e-6)
        assert abs(second.first_sigma - unshifted) > 0.05

        clean, inputs = [], []
        handle = pipe.transformer.register_forward_pre_hook(
            lambda module, args, kwargs: inputs.append(kwargs["hidden_states"]), with_kwargs=True
        )

        def on_step(pipeline, step_index, timestep, callback_kwargs):
            if step_index == first.num_denoiser_steps - 1:
                clean.append(callback_kwargs["latents"])  # the user's callback runs before the stage switch
            return {}

        pipe(**self.call_kwargs(pipe, height=128, width=128, seed=3), callback_on_step_end=on_step)
        handle.remove()
        # The same generator stream: the first stage's noise, then the second stage's.
        generator = torch.Generator().manual_seed(3)
        torch.randn((1, 16, first.latent_height, first.latent_width), generator=generator)
        noise = torch.randn((1, 16, second.latent_height, second.latent_width), generator=generator)
        up = interpolate_latent(clean[0])
        stage_input = inputs[first.num_denoiser_steps * self.calls_per_step]
        sigma = second.first_sigma
        torch.testing.assert_close(stage_input, (1 - sigma) * up + sigma * noise)
        assert not torch.allclose(stage_input, (1 - unshifted) * up + unshifted * noise, atol=1e-3)

    def test_size_conditioning_follows_the_stage_and_a_user_original_size_stays_at_full_size(self, pipe):
        lssgen.patch(pipe, **THREE_STAGES)
        plan = self.plan(pipe, **THREE_STAGES)
        records, handle = self.trace(pipe)
        pipe(**self.call_kwargs(pipe), original_size=(1024, 768), crops_coords_top_left=(16, 32))
        handle.remove()
        want = []
        for stage in plan.stages:
            size = (stage.height, stage.width)
            original = (1024, 768) if stage is plan.stages[-1] else size
            want += [(original, size, (16, 32))] * stage.num_denoiser_steps * self.calls_per_step
        assert [r["sizes"] for r in records] == want

    def test_size_hook_is_named_and_removed(self, pipe):
        lssgen.patch(pipe)
        assert SIZE_CONDITIONING_HOOK in pipe.transformer._diffusers_hook.hooks
        lssgen.unpatch(pipe)
        assert SIZE_CONDITIONING_HOOK not in pipe.transformer._diffusers_hook.hooks
