"""Z-Image: the adapter contract, plus what is particular to ZImagePipeline (per-image latent lists, the stage noise
through `prepare_latents`, the uncapped time shift, FLUX.1's VAE normalisation, its FLOP count)."""

import pytest
import torch
from adapter_contract import AdapterContract, final_latents_and_decoded
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift

import lssgen
from lssgen.adapters.zimage import Z_IMAGE_TURBO_CONFIG, ZImageAdapter
from lssgen.evaluation.flops import bound_speedup, call_flops, published_architectures
from lssgen.tiny.zimage import build_tiny_zimage_pipeline, tiny_zimage_prompt_embeds


def zimage_call_kwargs(pipe, prompts="a red fox in the snow", seed=0, **overrides):
    # No text encoder: prompts become stand-in embeddings (a list, one tensor per prompt). CFG on (guidance 4.0,
    # negative prompt " "), the pipeline's harder path: one transformer call over a list of 2B latents.
    count = 1 if isinstance(prompts, str) else len(prompts)
    kwargs = {
        "prompt_embeds": tiny_zimage_prompt_embeds(pipe, prompts),
        "negative_prompt_embeds": tiny_zimage_prompt_embeds(pipe, [" "] * count),
        "guidance_scale": 4.0,
        "height": 256,
        "width": 256,
        "num_inference_steps": 8,
        "output_type": "pt",
        "generator": torch.Generator().manual_seed(seed),
    }
    kwargs.update(overrides)
    return kwargs


class TestZImage(AdapterContract):
    adapter_name = "zimage"
    lora_prefix = "transformer.layers.0.attention.to_q"
    calls_per_step = 1  # CFG batches the conditional and unconditional latents into one call

    def build_pipe(self, seed=0):
        return build_tiny_zimage_pipeline(seed=seed)

    def call_kwargs(self, pipe, prompts="a red fox in the snow", seed=0, **overrides):
        return zimage_call_kwargs(pipe, prompts, seed, **overrides)

    def observe(self, pipe, kwargs):
        # The image's rotary positions are made inside the transformer from each latent's shape, so the size the
        # latents have is the conditioning to check.
        x = kwargs["x"]
        # The transformer is given `1 - sigma`; in plan units the timestep is `1000 * sigma`.
        return {"size": tuple(x[0].shape[-2:]), "timestep": (1 - float(kwargs["t"][0])) * 1000}

    def expected(self, pipe, stage, timestep):
        return {"size": (stage.latent_height, stage.latent_width), "timestep": timestep}

    # --- Z-Image specifics ----------------------------------------------------------------------------------------
    def test_the_stock_prepare_latents_refuses_stage_noise_and_is_restored(self, pipe):
        # Why the replacement exists: the stock method refuses latents of another size than the target's.
        stock = type(pipe).prepare_latents
        small = torch.randn(1, 16, 16, 16)
        with pytest.raises(ValueError, match="Unexpected latents shape"):
            pipe.prepare_latents(1, 16, 256, 256, torch.float32, "cpu", None, small)
        lssgen.patch(pipe, **self.three_stages)
        # Outside an lssgen call the replacement is the stock method.
        with pytest.raises(ValueError, match="Unexpected latents shape"):
            pipe.prepare_latents(1, 16, 256, 256, torch.float32, "cpu", None, small)
        images = self.images(pipe, **self.call_kwargs(pipe))
        assert images.shape == (1, 3, 256, 256) and torch.isfinite(images).all()
        lssgen.unpatch(pipe)
        assert "prepare_latents" not in pipe.__dict__ and type(pipe).prepare_latents is stock

    def test_a_batch_of_prompts_of_different_lengths(self, pipe):
        prompts = ["a red fox in the snow", "a boat"]
        lssgen.patch(pipe, **self.three_stages)
        records, handle = self.trace(pipe)
        images = self.images(pipe, **self.call_kwargs(pipe, prompts=prompts, num_images_per_prompt=2))
        handle.remove()
        assert images.shape == (4, 3, self.height, self.width) and torch.isfinite(images).all()
        plan = self.plan(pipe, **self.three_stages)
        assert [r["size"] for r in records] == [
            (s.latent_height, s.latent_width) for s in plan.stages for _ in s.timesteps
        ]

    def denoiser_timestep(self, args, kwargs) -> float:
        return (1 - float(args[1][0])) * 1000  # ZImagePipeline passes 1 - sigma, by position

    @pytest.mark.parametrize(
        "scheduler",
        [
            pytest.param(None, id="Z-Image-Turbo"),
            # A dynamically shifting scheduler with a small `max_image_seq_len`, so that the tiny sizes are past it:
            # the pipeline extrapolates `mu`.
            pytest.param(
                lambda: FlowMatchEulerDiscreteScheduler(
                    use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=300, shift=1.0
                ),
                id="dynamic past max_image_seq_len",
            ),
        ],
    )
    def test_each_stage_gets_the_stock_schedule_of_its_size(self, scheduler):
        """Every stage's full schedule is the one the unpatched ZImagePipeline sets for that size and step count."""
        self.check_each_stage_gets_the_stock_schedule(scheduler)

    def test_time_shift_is_the_pipelines_own_uncapped(self, pipe):
        pipe.scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
        lssgen.patch(pipe)
        plan = self.plan(pipe, 2048, 2048, 50)
        config = pipe.scheduler.config
        for stage in plan.stages:
            tokens = (stage.latent_height // 2) * (stage.latent_width // 2)
            mu = calculate_shift(
                tokens, config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift
            )
            assert stage.scheduler_kwargs["mu"] == pytest.approx(mu, rel=1e-12)
        assert plan.stages[-1].scheduler_kwargs["mu"] > config.max_shift

    def test_latents_to_vae_is_what_the_pipeline_decodes(self, pipe):
        adapter = ZImageAdapter()
        assert pipe.vae.config.shift_factor and pipe.vae.config.scaling_factor != 1
        latents, decoded = final_latents_and_decoded(
            pipe, self.call_kwargs(pipe, height=128, width=192, num_inference_steps=2)
        )
        assert latents.shape == (1, 16, 16, 24)
        torch.testing.assert_close(adapter.latents_to_vae(pipe, latents), decoded)
        torch.testing.assert_close(adapter.vae_to_latents(pipe, decoded), latents)


def test_z_image_turbo_flop_count():
    arch = published_architectures()["Z-Image-Turbo"]
    assert (arch.adapter.name, arch.steps, arch.cfg_factor, arch.text_tokens) == ("zimage", 8, 1, 128)
    # By hand, at 1024² (4096 image + 128 text tokens): every token passes q, k, v, out (4 x 3840²) and a SwiGLU
    # MLP (3 x 3840 x 10240) in each of the 30 main blocks; attention is 2 matmuls of 2 L² x 3840 per block. The
    # 2 noise-refiner blocks see the image tokens alone, the 2 caption-refiner blocks the text alone.
    config = Z_IMAGE_TURBO_CONFIG
    dim = config["dim"]
    hidden = int(dim / 3 * 8)
    per_token = 2 * (4 * dim**2 + 3 * dim * hidden)

    def blocks(count, tokens):
        return count * (tokens * per_token + 2 * 2 * tokens**2 * dim)

    hand = blocks(30, 4096 + 128) + blocks(2, 4096) + blocks(2, 128)
    assert call_flops("Z-Image-Turbo", 128, 128) == pytest.approx(hand, rel=5e-3)
    for resolution in (1024, 2048):
        for sigma in (0.75, 0.667):
            assert bound_speedup("Z-Image-Turbo", resolution, start_sigma=sigma, min_resolution=512) > 1
