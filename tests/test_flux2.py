"""FLUX.2 (`Flux2Pipeline`, `Flux2KleinPipeline`): the adapter contract, plus what is particular to FLUX.2 (the
patchified, BatchNorm-normalised latent, scaling in the VAE's space, reference images)."""

import torch
from adapter_contract import AdapterContract
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu
from PIL import Image

import lssgen
from lssgen.adapters.flux2 import Flux2Adapter, _latent_ids
from lssgen.tiny.flux2 import build_tiny_flux2_pipeline, tiny_flux2_prompt_embeds
from lssgen.weights import weights_path

TEXT_TOKENS = 8


def flux2_call_kwargs(pipe, prompts="a red fox in the snow", seed=0, klein=False, **overrides):
    # No text encoder: prompts become deterministic stand-in embeddings with the right batch size.
    kwargs = {
        "prompt_embeds": tiny_flux2_prompt_embeds(pipe, prompts, TEXT_TOKENS),
        "height": 256,
        "width": 256,
        "num_inference_steps": 8,
        "output_type": "pt",
        "generator": torch.Generator().manual_seed(seed),
    }
    if klein:  # true CFG (guidance 4.0 by default) needs the negative embeddings too, one per prompt
        count = 1 if isinstance(prompts, str) else len(prompts)
        kwargs["negative_prompt_embeds"] = tiny_flux2_prompt_embeds(pipe, [""] * count, TEXT_TOKENS)
    kwargs.update(overrides)
    return kwargs


class Flux2Contract(AdapterContract):
    adapter_name = "flux2"
    klein = False
    lora_prefix = "transformer.transformer_blocks.0.attn.to_q"
    trace_cases = [
        *AdapterContract.trace_cases,
        (512, 512, 8, {"min_resolution": 256}),  # default base 1024: every stage is shortened
    ]

    def build_pipe(self, seed=0):
        return build_tiny_flux2_pipeline(seed=seed, klein=self.klein)

    def call_kwargs(self, pipe, prompts="a red fox in the snow", seed=0, **overrides):
        return flux2_call_kwargs(pipe, prompts, seed, klein=self.klein, **overrides)

    def conditioning_hooks(self, pipe, records):
        # The ids hook runs inside the transformer's forward, so the ids are read where they are used; the first
        # rotary embedding of a forward is the image's (the text's follows).
        def on_ids(module, args):
            if "ids" in records[-1]:
                return
            ids = args[0]
            latent = ids[ids[:, 0] == 0]  # t = 0: the latents; reference images have t = 10, 20, ...
            rows, cols = int(latent[:, 1].max()) + 1, int(latent[:, 2].max()) + 1
            row_major = latent.shape[0] == rows * cols and torch.equal(latent[cols], torch.tensor([0, 1, 0, 0]))
            records[-1]["ids"] = (rows, cols, row_major, ids.shape[0] - latent.shape[0])

        return [pipe.transformer.pos_embed.register_forward_pre_hook(on_ids)]

    def observe(self, pipe, kwargs):
        return {"tokens": kwargs["hidden_states"].shape[1], "timestep": float(kwargs["timestep"][0]) * 1000}

    def expected(self, pipe, stage, timestep, references=0):
        rows, cols = stage.latent_height // 2, stage.latent_width // 2
        return {"tokens": rows * cols + references, "timestep": timestep, "ids": (rows, cols, True, references)}

    # --- FLUX.2 specifics ---------------------------------------------------------------------------------------
    def test_unpack_inverts_pack_and_matches_the_pipelines_own_packing(self, pipe):
        adapter = Flux2Adapter()
        x = torch.randn(2, 32, 12, 20)
        tokens = adapter.pack(pipe, x)
        assert tokens.shape == (2, 6 * 10, 128)
        assert torch.equal(adapter.unpack(pipe, tokens, 12, 20), x)
        # The reshape in `unpack` agrees with the pipeline's scatter by its own ids.
        ids = pipe._prepare_latent_ids(torch.empty(2, 0, 6, 10))
        grid = pipe._unpack_latents_with_ids(tokens, ids)
        assert torch.equal(pipe._unpatchify_latents(grid), x)

    def test_vae_conversion_undoes_the_pipelines_batch_norm(self, pipe):
        adapter = Flux2Adapter()
        assert not torch.allclose(pipe.vae.bn.running_mean, torch.zeros(128))  # the tiny VAE's stats are real
        # What the pipeline's encode path makes of a VAE latent (patchify, BN, and its own reverse of both).
        z = torch.randn(1, 32, 8, 12)
        patches = pipe._patchify_latents(z)
        std = torch.sqrt(pipe.vae.bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps)
        normalised = (patches - pipe.vae.bn.running_mean.view(1, -1, 1, 1)) / std
        torch.testing.assert_close(adapter.vae_to_latents(pipe, z), pipe._unpatchify_latents(normalised))
        torch.testing.assert_close(adapter.latents_to_vae(pipe, adapter.vae_to_latents(pipe, z)), z)

    def test_scaling_runs_in_the_vae_latent_space(self, pipe):
        upsampler = self.small_upsampler(pipe)
        lssgen.patch(pipe, upsampler, **self.three_stages)
        adapter = lssgen.find_adapter(pipe)
        stage_ends, inputs = [], []

        def at_stage_end(pipeline, step_index, timestep, callback_kwargs):
            stage_ends.append((step_index, callback_kwargs["latents"].clone()))
            return {}

        handle = upsampler.register_forward_pre_hook(lambda module, args: inputs.append(args[0].clone()))
        try:
            self.images(pipe, **self.call_kwargs(pipe), callback_on_step_end=at_stage_end)
        finally:
            handle.remove()
        plan = self.plan(pipe, **self.three_stages)
        # The user's callback runs before lssgen's stage switch, so it sees each stage's final packed latents.
        finals = {step: latents for step, latents in stage_ends}
        for stage, seen in zip(plan.stages[:-1], inputs):
            packed = finals[plan.stage_ends[stage.index] - 1]
            unpacked = adapter.unpack(pipe, packed, stage.latent_height, stage.latent_width)
            torch.testing.assert_close(seen, adapter.latents_to_vae(pipe, unpacked))
        assert len(inputs) == len(plan.stages) - 1

    def test_time_shift_follows_each_stages_tokens_and_steps(self, pipe):
        lssgen.patch(pipe)
        plan = self.plan(pipe, 512, 512, 20, min_resolution=128, base_height=512, base_width=512)
        for stage in plan.stages:
            tokens = (stage.latent_height // 2) * (stage.latent_width // 2)
            assert stage.scheduler_kwargs["mu"] == compute_empirical_mu(tokens, stage.num_steps)
        assert len({stage.num_steps for stage in plan.stages}) > 1  # the step count really differs per stage

    def test_reference_image_keeps_its_tokens_and_ids_in_low_resolution_stages(self, pipe):
        lssgen.patch(pipe, **self.three_stages)
        reference = Image.new("RGB", (128, 64), (200, 40, 90))  # 8 x 4 tokens at 1/16
        records, handle = self.trace(pipe)
        images = self.images(pipe, **self.call_kwargs(pipe), image=reference)
        handle.remove()
        assert images.shape == (1, 3, self.height, self.width)
        plan = self.plan(pipe, **self.three_stages)
        expected = [
            self.expected(pipe, stage, t, references=32)
            for stage in plan.stages
            for t in stage.timesteps
            for _ in range(self.calls_per_step)
        ]
        assert [{k: r[k] for k in ("tokens", "ids")} for r in records] == [
            {k: e[k] for k in ("tokens", "ids")} for e in expected
        ]

    def test_prepare_latents_is_stock_outside_a_call_and_restored_by_unpatch(self, pipe):
        lssgen.patch(pipe)
        latents, ids = pipe.prepare_latents(1, 32, 64, 64, torch.float32, torch.device("cpu"), None)
        assert latents.shape == (1, 16, 128) and ids.shape == (1, 16, 4)
        # The ids lssgen builds for a stage are the pipeline's own for a grid of that size.
        stock_ids = pipe._prepare_latent_ids(torch.empty(2, 1, 3, 5))
        ours = _latent_ids(2, 3, 5, torch.device("cpu"), stock_ids.dtype)
        assert ours.dtype == stock_ids.dtype and torch.equal(ours, stock_ids)
        lssgen.unpatch(pipe)
        assert "prepare_latents" not in pipe.__dict__


class TestFlux2(Flux2Contract):
    klein = False
    calls_per_step = 1  # guidance-distilled: the guidance scale is embedded, one call per step


class TestFlux2Klein(Flux2Contract):
    klein = True
    calls_per_step = 2  # guidance_scale 4.0 > 1 and not distilled: a conditional and an unconditional call


def test_distilled_klein_runs_one_call_per_step():
    pipe = build_tiny_flux2_pipeline(klein=True)
    pipe.register_to_config(is_distilled=True)
    pipe.set_progress_bar_config(disable=True)
    lssgen.patch(pipe, **Flux2Contract.three_stages)
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda module, args: calls.append(1))
    pipe(**flux2_call_kwargs(pipe, guidance_scale=1.0))
    handle.remove()
    assert len(calls) == lssgen.plan_for(pipe, 256, 256, 8).total_steps


def test_flux2_is_found_for_both_pipelines():
    for klein in (False, True):
        pipe = build_tiny_flux2_pipeline(klein=klein)
        assert isinstance(lssgen.find_adapter(pipe), Flux2Adapter)


def test_klein_output_latent_is_the_vae_latent():
    # Flux2KleinPipeline's output_type="latent" returns the unpatchified, de-normalised latent, which is
    # `latents_to_vae` of lssgen's unpacked layout; checked on a stock call.
    pipe = build_tiny_flux2_pipeline(klein=True)
    pipe.set_progress_bar_config(disable=True)
    tokens = []
    kwargs = flux2_call_kwargs(pipe, klein=True, height=128, width=128, num_inference_steps=2, output_type="latent")
    out = pipe(
        **kwargs,
        callback_on_step_end=lambda p, i, t, k: tokens.append(k["latents"]) or {},
    ).images
    adapter = Flux2Adapter()
    expected = adapter.latents_to_vae(pipe, adapter.unpack(pipe, tokens[-1], 16, 16))
    torch.testing.assert_close(out, expected)


def test_torch_compile_compiles_once_per_stage_size():
    # FLUX.2's `_pack_latents` ends in a permute: had lssgen's packed stage-start latents kept those strides, the
    # first call of every stage would differ from the rest and cost an extra graph.
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    pipe, eager = build_tiny_flux2_pipeline(), build_tiny_flux2_pipeline()
    for p in (pipe, eager):
        p.set_progress_bar_config(disable=True)
        lssgen.patch(p, **Flux2Contract.three_stages)
    # aot_eager: Dynamo traces and guards exactly as with the default backend (graph count and recompilations are
    # decided before any backend runs) but skips inductor's C++ code generation, minutes on a 2-core CPU.
    pipe.transformer.compile(backend="aot_eager")
    compiled_images = pipe(**flux2_call_kwargs(pipe)).images
    torch.testing.assert_close(compiled_images, eager(**flux2_call_kwargs(eager)).images, atol=1e-4, rtol=1e-4)
    assert counters["stats"]["unique_graphs"] == len(lssgen.plan_for(pipe, 256, 256, 8).stages) == 3
    torch._dynamo.reset()


def test_our_flux2_upsampler_loads_and_runs_in_a_patched_flux2_pipeline():
    """weights/flux2-x2 (trained on taef2 latents, the VAE's own latent space) in a FLUX.2 pipeline with 32-channel
    latents: it receives the low-resolution stage's VAE-space latent and the call completes."""
    upsampler = lssgen.LatentUpsampler.from_pretrained(weights_path("flux2-x2"))
    assert (upsampler.config.in_channels, upsampler.config.out_channels) == (32, 32)
    pipe = build_tiny_flux2_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    lssgen.patch(pipe, upsampler)
    calls = []
    handle = upsampler.register_forward_hook(lambda module, args, out: calls.append((args[0].shape, out.shape)))
    try:
        image = pipe(**flux2_call_kwargs(pipe, min_resolution=128)).images
    finally:
        handle.remove()
    assert calls == [((1, 32, 16, 16), (1, 32, 32, 32))]
    assert image.shape == (1, 3, 256, 256) and torch.isfinite(image).all()
