"""Chroma: the adapter contract, plus what is particular to ChromaPipeline (its attention mask per stage, its
schedule at each stage's size, its FLOP count)."""

import pytest
import torch
from adapter_contract import AdapterContract
from diffusers import FluxTransformer2DModel, UniPCMultistepScheduler
from test_flux import TEXT_TOKENS, flux_call_kwargs

import lssgen
from lssgen.adapters.chroma import STAGE_HOOK
from lssgen.evaluation.flops import call_flops, denoiser_flops, meta_model, published_architectures
from lssgen.tiny import FLUX_SCHEDULER_CONFIG, build_tiny_chroma_pipeline


def chroma_call_kwargs(pipe, prompts="a red fox in the snow", seed=0, **overrides):
    # FLUX.1's call, with Chroma's real classifier-free guidance.
    return flux_call_kwargs(pipe, prompts, seed, **{"guidance_scale": 3.0, **overrides})


class TestChroma(AdapterContract):
    adapter_name = "chroma"
    lora_prefix = "transformer.transformer_blocks.0.attn.to_q"
    calls_per_step = 2  # real classifier-free guidance: a conditional and an unconditional call per step
    trace_cases = [
        *AdapterContract.trace_cases,
        (512, 512, 8, {"min_resolution": 256}),  # default base 1024: every stage is shortened
    ]

    def build_pipe(self, seed=0):
        return build_tiny_chroma_pipeline(seed=seed)

    def call_kwargs(self, pipe, prompts="a red fox in the snow", seed=0, **overrides):
        return chroma_call_kwargs(pipe, prompts, seed, **overrides)

    def conditioning_hooks(self, pipe, records):
        # Both hooks run inside the transformer's forward, so ids and mask are read where they are used.
        def on_ids(module, args):
            image_ids = args[0][TEXT_TOKENS:]
            rows, cols = int(image_ids[:, 1].max()) + 1, int(image_ids[:, 2].max()) + 1
            row_major = image_ids.shape[0] == rows * cols and torch.equal(image_ids[cols, 1:], torch.tensor([1.0, 0]))
            records[-1]["ids"] = (rows, cols, row_major)

        def on_mask(module, args, kwargs):
            mask = kwargs["attention_mask"]
            records[-1]["mask"] = (mask.shape[1], bool((mask[:, TEXT_TOKENS:] == 1).all()))

        block = pipe.transformer.transformer_blocks[0]
        return [
            pipe.transformer.pos_embed.register_forward_pre_hook(on_ids),
            block.register_forward_pre_hook(on_mask, with_kwargs=True),
        ]

    def observe(self, pipe, kwargs):
        return {"tokens": kwargs["hidden_states"].shape[1], "timestep": float(kwargs["timestep"][0]) * 1000}

    def expected(self, pipe, stage, timestep):
        rows, cols = stage.latent_height // 2, stage.latent_width // 2
        tokens = rows * cols
        return {"tokens": tokens, "timestep": timestep, "ids": (rows, cols, True), "mask": (TEXT_TOKENS + tokens, True)}

    # --- Chroma specifics -------------------------------------------------------------------------------------
    def test_attention_mask_keeps_the_prompts_padding_mask_in_every_stage(self, pipe):
        # The pipeline masks all T5 padding but the first pad token; lssgen only re-sizes the image part.
        prompt_mask = pipe.encode_prompt("a red fox in the snow", max_sequence_length=TEXT_TOKENS)[2]
        assert 0 < prompt_mask.sum() < TEXT_TOKENS
        lssgen.patch(pipe, **self.three_stages)
        masks = []
        handle = pipe.transformer.transformer_blocks[0].register_forward_pre_hook(
            lambda module, args, kwargs: masks.append(kwargs["attention_mask"]), with_kwargs=True
        )
        pipe(**self.call_kwargs(pipe, negative_prompt="blurry"))
        handle.remove()
        plan = self.plan(pipe, **self.three_stages)
        assert len(masks) == 2 * plan.total_steps
        negative_mask = pipe.encode_prompt("blurry", max_sequence_length=TEXT_TOKENS)[2]
        for index, mask in enumerate(masks):
            text = prompt_mask if index % 2 == 0 else negative_mask  # conditional call first, then the negative one
            assert torch.equal(mask[:, :TEXT_TOKENS], text) and mask.dtype == text.dtype

    def test_without_the_stage_hook_the_mask_keeps_the_first_stages_length(self, pipe):
        # Why the hook exists: the stock pipeline sizes the mask from the latents it is handed (the first stage's).
        lssgen.patch(pipe, **self.three_stages)
        lssgen.find_adapter(pipe).remove_hooks(pipe)
        assert STAGE_HOOK not in pipe.transformer._diffusers_hook.hooks
        with pytest.raises(RuntimeError, match="must match the size"):
            pipe(**self.call_kwargs(pipe))

    @pytest.mark.parametrize(
        "scheduler",
        [
            pytest.param(None, id="Chroma1-HD static shift"),
            pytest.param(
                lambda: build_tiny_chroma_pipeline(scheduler_config=FLUX_SCHEDULER_CONFIG).scheduler, id="dynamic"
            ),
            pytest.param(
                lambda: UniPCMultistepScheduler(
                    use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0
                ),
                id="UniPC flow sigmas",
            ),
        ],
    )
    def test_each_stage_gets_the_stock_schedule_of_its_size(self, scheduler):
        """Every stage's full schedule is the one the unpatched ChromaPipeline sets for that size and step count
        (for UniPC with flow sigmas, Chroma's linspace sigmas: unlike FluxPipeline, it passes them)."""
        self.check_each_stage_gets_the_stock_schedule(scheduler)


def test_chroma1_hd_flop_count():
    arch = published_architectures()["Chroma1-HD"]
    assert (arch.adapter.name, arch.steps, arch.cfg_factor, arch.text_tokens) == ("chroma", 40, 2, 512)
    with torch.device("meta"):
        flux = FluxTransformer2DModel(**{**published_architectures()["FLUX.1-dev"].config, "guidance_embeds": False})

    # Each count runs the 57-block model once on the meta device (seconds): every size is counted once.
    chroma = {side: denoiser_flops(meta_model("Chroma1-HD"), side, side, text_tokens=512) for side in (32, 64, 128)}
    extra = {side: chroma[side] - denoiser_flops(flux, side, side, text_tokens=512) for side in chroma}

    # The same 57 blocks over the same tokens as FLUX.1; what differs costs the same at every size: Chroma's
    # approximator (64 -> 5120, 5 x two 5120² layers, 5120 -> 3072 on each of its 344 modulation vectors, 191.4
    # GFLOPs) replaces FLUX.1's per-block modulation of one vector (6.5 GFLOPs).
    assert extra[32] == extra[64] == extra[128]
    assert 0.18e12 < extra[64] < 0.19e12
    assert call_flops("Chroma1-HD", 64, 64) == 2 * chroma[64]
