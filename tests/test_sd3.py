"""Stable Diffusion 3 / 3.5: the adapter contract, plus static and dynamic time shifts and the position embedding."""

import math

import numpy as np
import pytest
import torch
from adapter_contract import AdapterContract

import lssgen
from lssgen.tiny.sd3 import build_tiny_sd3_pipeline

TEXT_TOKENS = 32
# SD3's scheduler with resolution-dependent shifting switched on (as some fine-tunes ship it).
DYNAMIC_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "use_dynamic_shifting": True,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "base_shift": 0.5,
    "max_shift": 1.15,
}
THREE_STAGES = {"min_resolution": 64, "base_height": 256, "base_width": 256}


def sd3_call_kwargs(pipe, prompts="a red fox in the snow", seed=0, **overrides):
    kwargs = {
        "prompt": prompts,
        "max_sequence_length": TEXT_TOKENS,
        "height": 256,
        "width": 256,
        "num_inference_steps": 8,
        "guidance_scale": 4.5,
        "output_type": "pt",
        "generator": torch.Generator().manual_seed(seed),
    }
    kwargs.update(overrides)
    return kwargs


def shifted(sigma: float, shift: float) -> float:
    return shift * sigma / (1 + (shift - 1) * sigma)


def reference_timesteps(num_steps: int, shift: float, start_sigma: float, first: bool) -> list[float]:
    """One stage's timesteps, by hand: the static-shift scheduler's default n-step schedule (what
    StableDiffusion3Pipeline uses: it passes no sigmas), truncated at start_sigma. The default schedule runs
    linearly from sigma 1 to the scheduler's smallest training sigma, itself shifted (1/1000 -> 0.002994), then
    shifts every sigma."""
    sigmas = np.linspace(1.0, shifted(1 / 1000, shift), num_steps)
    timesteps = [1000 * shifted(s, shift) for s in sigmas]
    begin = 0 if first else max(i for i, t in enumerate(timesteps) if t >= start_sigma * 1000)
    return timesteps[begin:]


class TestSD3(AdapterContract):
    adapter_name = "sd3"
    lora_prefix = "transformer.transformer_blocks.0.attn.to_q"
    calls_per_step = 1  # StableDiffusion3Pipeline batches the unconditional and conditional halves of CFG
    trace_cases = [
        *AdapterContract.trace_cases,
        (512, 512, 8, {"min_resolution": 256}),  # default base 1024: every stage is shortened
    ]

    def build_pipe(self, seed=0):
        return build_tiny_sd3_pipeline(seed=seed)

    def call_kwargs(self, pipe, prompts="a red fox in the snow", seed=0, **overrides):
        return sd3_call_kwargs(pipe, prompts, seed, **overrides)

    def conditioning_hooks(self, pipe, records):
        # The patch embedding crops its position table to the latent it is given: record what it embedded.
        def on_pos_embed(module, args, output):
            records[-1]["pos_embed"] = (*args[0].shape[-2:], output.shape[1])

        return [pipe.transformer.pos_embed.register_forward_hook(on_pos_embed)]

    def observe(self, pipe, kwargs):
        hidden = kwargs["hidden_states"]
        return {"size": tuple(hidden.shape[-2:]), "batch": hidden.shape[0], "timestep": float(kwargs["timestep"][0])}

    def expected(self, pipe, stage, timestep):
        size = (stage.latent_height, stage.latent_width)
        patches = (stage.latent_height // 2) * (stage.latent_width // 2)
        return {"size": size, "batch": 2, "timestep": timestep, "pos_embed": (*size, patches)}

    # --- SD3 specifics ---------------------------------------------------------------------------------------
    def test_static_shift_follows_the_method(self, pipe):
        lssgen.patch(pipe)
        for start_sigma in (0.75, 0.667):
            plan = self.plan(pipe, **THREE_STAGES, start_sigma=start_sigma)
            assert [s.num_steps for s in plan.stages] == [2, 4, 8]
            for stage in plan.stages:
                assert "mu" not in stage.scheduler_kwargs  # the scheduler's static shift of 3 applies
                want = reference_timesteps(stage.num_steps, 3.0, start_sigma, stage.index == 0)
                assert stage.timesteps == pytest.approx(want, abs=1e-3)
                assert stage.first_sigma == pytest.approx(want[0] / 1000, abs=1e-6)

    def test_schedule_is_the_stock_pipelines_not_linspace_sigmas(self, pipe):
        # Hand-computed: 512 px, 20 steps, min_resolution 256 -> stages of 256 px (5 steps) and 512 px (10).
        # The default 5-step schedule's second sigma is shift(1 - (1 - 0.002994) / 4) = shift(0.75075) = 0.90036;
        # linspace sigmas would give shift(0.8) = 0.92308.
        lssgen.patch(pipe)
        plan = self.plan(pipe, 512, 512, 20, min_resolution=256, start_sigma=0.667)
        assert [s.num_steps for s in plan.stages] == [5, 10]
        assert plan.stages[0].timesteps[1] == pytest.approx(900.36, abs=0.01)
        # 8 steps, start_sigma 0.75: the 512 px stage has 4 steps, 1000, 857.69, 602.15, 8.93; it restarts at 857.69
        # and runs 3 of them (linspace sigmas, 1000, 900, 750, 500, would restart at 750 and run 2).
        plan = self.plan(pipe, 512, 512, 8, min_resolution=256, start_sigma=0.75)
        assert plan.stages[1].timesteps == pytest.approx([857.69, 602.15, 8.93], abs=0.01)
        assert plan.stages[1].num_denoiser_steps == 3
        # The stock pipeline's own 4-step schedule at 512 px, unpatched, is the one the last stage truncates.
        stock = build_tiny_sd3_pipeline()
        stock.scheduler.set_timesteps(4)
        assert [float(t) for t in stock.scheduler.timesteps[1:]] == pytest.approx(plan.stages[1].timesteps)

    def test_dynamic_shift_uses_each_stage_own_patch_count(self):
        pipe = build_tiny_sd3_pipeline(scheduler_config=DYNAMIC_SCHEDULER_CONFIG)
        pipe.set_progress_bar_config(disable=True)
        lssgen.patch(pipe)
        plan = self.plan(pipe, 512, 512, 20, min_resolution=128)
        assert [(s.latent_height, s.latent_width) for s in plan.stages] == [(16, 16), (32, 32), (64, 64)]
        # StableDiffusion3Pipeline's rule on (h / 2) * (w / 2) patches: 64, 256 and 1024 of them.
        mus = [0.5 + (1.15 - 0.5) * (patches - 256) / (4096 - 256) for patches in (64, 256, 1024)]
        assert [s.scheduler_kwargs["mu"] for s in plan.stages] == pytest.approx(mus)
        for stage, mu in zip(plan.stages, mus):
            # The dynamic scheduler's smallest training sigma is the unshifted 1/1000.
            sigmas = np.linspace(1.0, 1 / 1000, stage.num_steps)
            full = [1000 * math.exp(mu) / (math.exp(mu) + (1 / s - 1)) for s in sigmas]
            assert stage.timesteps == pytest.approx(full[stage.begin_index :], abs=1e-3)
            if stage.index:
                assert full[stage.begin_index] >= 750 > full[stage.begin_index + 1]
        # The denoiser sees exactly these timesteps, at these sizes.
        records, handle = self.trace(pipe)
        pipe(**self.call_kwargs(pipe, height=512, width=512, num_inference_steps=20), min_resolution=128)
        handle.remove()
        want = [self.expected(pipe, s, t) for s in plan.stages for t in s.timesteps]
        assert [r["size"] for r in records] == [w["size"] for w in want]
        assert [r["pos_embed"] for r in records] == [w["pos_embed"] for w in want]
        assert [r["timestep"] for r in records] == pytest.approx([w["timestep"] for w in want], abs=1e-3)

    def test_mu_cannot_be_combined(self, pipe):
        # A single `mu` would silently lose to the per-stage shifts, so it is refused like `sigmas`.
        lssgen.patch(pipe)
        with pytest.raises(ValueError, match="`mu` cannot be combined"):
            pipe(**self.call_kwargs(pipe), mu=1.0)
        assert pipe(**self.call_kwargs(pipe), mu=1.0, start_sigma=1.0).images.shape == (1, 3, 256, 256)

    def test_transformer_without_2x2_patches_is_rejected_at_patch(self, pipe):
        pipe.transformer.register_to_config(patch_size=1)
        with pytest.raises(ValueError, match="patch_size=1"):
            lssgen.patch(pipe)
        assert not lssgen.is_patched(pipe)
