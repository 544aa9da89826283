"""Qwen-Image: the adapter contract, plus what is particular to QwenImagePipeline (`img_shapes` per stage, the
uncapped time shift, the 1-step NaN of its scheduler, the video VAE's normalisation, its FLOP count)."""

import pytest
import torch
from adapter_contract import CACHES, AdapterContract, final_latents_and_decoded
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

import lssgen
from lssgen.adapters.qwenimage import IMG_SHAPES_HOOK, QWEN_IMAGE_CONFIG, QwenImageAdapter
from lssgen.evaluation.flops import call_flops, published_architectures
from lssgen.patch import Options
from lssgen.tiny.qwenimage import (
    QWENIMAGE_SCHEDULER_CONFIG,
    build_tiny_qwenimage_pipeline,
    tiny_qwenimage_prompt_embeds,
)


def qwenimage_call_kwargs(pipe, prompts="a red fox in the snow", seed=0, **overrides):
    # No text encoder: prompts become stand-in embeddings and masks. True CFG as the model card runs it: the
    # negative prompt " " and true_cfg_scale 4.0 (the pipeline's default).
    count = 1 if isinstance(prompts, str) else len(prompts)
    embeds, mask = tiny_qwenimage_prompt_embeds(pipe, prompts)
    negative, negative_mask = tiny_qwenimage_prompt_embeds(pipe, [" "] * count)
    kwargs = {
        "prompt_embeds": embeds,
        "prompt_embeds_mask": mask,
        "negative_prompt_embeds": negative,
        "negative_prompt_embeds_mask": negative_mask,
        "true_cfg_scale": 4.0,
        "height": 256,
        "width": 256,
        "num_inference_steps": 20,
        "output_type": "pt",
        "generator": torch.Generator().manual_seed(seed),
    }
    kwargs.update(overrides)
    return kwargs


class TestQwenImage(AdapterContract):
    adapter_name = "qwenimage"
    lora_prefix = "transformer.transformer_blocks.0.attn.to_q"
    calls_per_step = 2  # true CFG: a conditional and an unconditional call per step
    # 20 steps where the contract has 8: shortened against Qwen-Image's native 1328 px, 8 steps leave the smaller
    # stages of a 256 px image 1 step, which its scheduler cannot make (see the 1-step test below).
    steps = 20
    trace_cases = [
        *((height, width, max(steps, 20), options) for height, width, steps, options in AdapterContract.trace_cases),
        (512, 512, 20, {"min_resolution": 256}),  # the default base, 1328: every stage is shortened
    ]

    def build_pipe(self, seed=0):
        return build_tiny_qwenimage_pipeline(seed=seed)

    def call_kwargs(self, pipe, prompts="a red fox in the snow", seed=0, **overrides):
        return qwenimage_call_kwargs(pipe, prompts, seed, **overrides)

    def conditioning_hooks(self, pipe, records):
        # The shapes hook runs inside the transformer's forward, so the rotary embedding is read where it is made:
        # the shapes it is given, and how many image positions it returns.
        def on_shapes(module, args, kwargs, output):
            records[-1]["shapes"] = tuple(tuple(sample) for sample in args[0])
            records[-1]["positions"] = output[0].shape[0]

        return [pipe.transformer.pos_embed.register_forward_hook(on_shapes, with_kwargs=True)]

    def observe(self, pipe, kwargs):
        return {"tokens": kwargs["hidden_states"].shape[1], "timestep": float(kwargs["timestep"][0]) * 1000}

    def expected(self, pipe, stage, timestep, prompts=1):
        rows, cols = stage.latent_height // 2, stage.latent_width // 2
        return {
            "tokens": rows * cols,
            "timestep": timestep,
            "shapes": (((1, rows, cols),),) * prompts,
            "positions": rows * cols,
        }

    def assert_planned_images(self, pipe, stock, images, drawn):
        if drawn.options.get("start_sigma", Options.start_sigma) == 1.0 and drawn.call.get("num_inference_steps") == 1:
            # diffusers' own: Qwen-Image's scheduler makes a NaN 1-step schedule (see the test below), so the stock
            # call gives NaN images, and `start_sigma=1.0` must give exactly those.
            kwargs = self.call_kwargs(stock, prompts=drawn.prompts, generator=drawn.generator(), **drawn.call)
            torch.testing.assert_close(images, self.images(stock, **kwargs), rtol=0, atol=0, equal_nan=True)
            return
        super().assert_planned_images(pipe, stock, images, drawn)

    # --- Qwen-Image specifics -------------------------------------------------------------------------------------
    def test_a_batch_of_prompts_gets_the_stage_shapes_and_its_text_masks(self, pipe):
        # Prompts of different lengths: the pipeline pads them and passes a text mask, which lssgen leaves alone
        # (the image part of the attention mask is made inside the transformer, from the tokens of each call).
        prompts = ["a red fox in the snow", "a boat"]
        lssgen.patch(pipe, **self.three_stages)
        records, handle = self.trace(pipe)
        masks = []
        mask_handle = pipe.transformer.register_forward_pre_hook(
            lambda module, args, kwargs: masks.append(kwargs["encoder_hidden_states_mask"]), with_kwargs=True
        )
        images = self.images(pipe, **self.call_kwargs(pipe, prompts=prompts))
        handle.remove()
        mask_handle.remove()
        assert images.shape == (2, 3, self.height, self.width) and torch.isfinite(images).all()
        plan = self.plan(pipe, **self.three_stages)
        expected = [self.expected(pipe, s, t, prompts=2) for s in plan.stages for t in s.timesteps for _ in range(2)]
        assert [(r["tokens"], r["shapes"], r["positions"]) for r in records] == [
            (e["tokens"], e["shapes"], e["positions"]) for e in expected
        ]
        text_mask = tiny_qwenimage_prompt_embeds(pipe, prompts)[1]
        assert not text_mask.all()
        for index, mask in enumerate(masks):
            # Conditional call first (the prompts' padding mask), then the negative one (" " twice: no padding).
            assert torch.equal(mask, text_mask) if index % 2 == 0 else mask is None

    @pytest.mark.parametrize("cache", ["pyramid attention broadcast", "faster"])
    def test_caches_that_skipped_compose_when_both_texts_have_one_length(self, pipe, cache):
        # These two caches keep one state for the conditional and the unconditional call, so the stock pipeline
        # fails when the two texts differ in length (the contract's call: Qwen-Image does not pad prompts, and " "
        # is shorter). With a negative prompt as long as the prompt, they run, and under lssgen too.
        apply, config = CACHES[cache]
        apply(pipe.transformer, config(pipe))
        negative, negative_mask = tiny_qwenimage_prompt_embeds(pipe, "a blurry dog in the rain")
        same_length = {"negative_prompt_embeds": negative, "negative_prompt_embeds_mask": negative_mask}
        assert negative.shape == self.call_kwargs(pipe)["prompt_embeds"].shape
        assert torch.isfinite(self.images(pipe, **self.call_kwargs(pipe, **same_length))).all()
        lssgen.patch(pipe, **self.three_stages)
        images = self.images(pipe, **self.call_kwargs(pipe, **same_length))
        assert images.shape == (1, 3, self.height, self.width) and torch.isfinite(images).all()

    def test_without_the_stage_hook_low_resolution_stages_fail(self, pipe):
        # Why the hook exists: the pipeline's `img_shapes` describe the target grid, whose rotary embedding does not
        # fit a smaller stage's tokens.
        lssgen.patch(pipe, **self.three_stages)
        lssgen.find_adapter(pipe).remove_hooks(pipe)
        assert IMG_SHAPES_HOOK not in pipe.transformer._diffusers_hook.hooks
        with pytest.raises(RuntimeError, match="must match the size"):
            pipe(**self.call_kwargs(pipe))

    @pytest.mark.parametrize(
        "scheduler",
        [
            pytest.param(None, id="Qwen-Image"),
            # A small `max_image_seq_len`, so that the tiny sizes are past it: the pipeline extrapolates `mu`.
            pytest.param(
                lambda: FlowMatchEulerDiscreteScheduler(**{**QWENIMAGE_SCHEDULER_CONFIG, "max_image_seq_len": 300}),
                id="past max_image_seq_len",
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
        """Every stage's full schedule is the one the unpatched QwenImagePipeline sets for that size and step
        count (for UniPC with flow sigmas, the pipeline's linspace sigmas: it passes them to any scheduler)."""
        self.check_each_stage_gets_the_stock_schedule(scheduler)

    def test_time_shift_is_the_pipelines_own_past_max_image_seq_len(self, pipe):
        # At 2048² the target has 16384 tokens, twice Qwen-Image's max_image_seq_len: the pipeline's own
        # `calculate_shift` extrapolates (FLUX.1's adapter caps, as the published FLUX.1 code does).
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

    def test_a_stage_of_one_step_is_refused_with_a_clear_error(self, pipe):
        # diffusers' own: `shift_terminal` stretches a 1-step schedule by 0/0, so the stock call's images are NaN.
        stock = self.build_pipe()
        stock.set_progress_bar_config(disable=True)
        with pytest.warns(RuntimeWarning, match="invalid value"):
            images = stock(**self.call_kwargs(stock, height=128, width=128, num_inference_steps=1)).images
        assert torch.isnan(images).all()
        stock_scheduler = pipe.scheduler
        lssgen.patch(pipe)
        # 3 steps leave the 128 px stage 1 (3 // log2(4)); with 1 step, every stage and even a single one has 1.
        cases = [
            (3, {"min_resolution": 128, "base_height": 256, "base_width": 256}),
            (1, {"min_resolution": 128}),
            (1, {"min_resolution": 256}),  # no low-resolution stage: lssgen refuses what the stock call makes NaN
        ]
        for steps, options in cases:
            with pytest.raises(ValueError, match="no finite 1-step schedule.*`num_inference_steps`"):
                pipe(**self.call_kwargs(pipe, num_inference_steps=steps), **options)
            self.assert_still_works(pipe, stock_scheduler)
        images = self.images(
            pipe, **self.call_kwargs(pipe, num_inference_steps=4), min_resolution=128, base_height=256, base_width=256
        )
        assert torch.isfinite(images).all()

    def test_latents_to_vae_is_what_the_pipeline_decodes(self, pipe):
        adapter = QwenImageAdapter()
        x = torch.randn(2, 16, 12, 20)
        tokens = adapter.pack(pipe, x)
        assert tokens.shape == (2, 6 * 10, 64) and torch.equal(adapter.unpack(pipe, tokens, 12, 20), x)
        # The tiny VAE has Qwen-Image's per-channel statistics, so a mistake in the normalisation would show.
        assert len(set(pipe.vae.config.latents_std)) > 1
        last, decoded = final_latents_and_decoded(
            pipe, self.call_kwargs(pipe, height=128, width=192, num_inference_steps=2)
        )
        latents = adapter.unpack(pipe, last, 16, 24)
        torch.testing.assert_close(adapter.latents_to_vae(pipe, latents), decoded)
        assert decoded.shape == (1, 16, 1, 16, 24)
        torch.testing.assert_close(adapter.vae_to_latents(pipe, decoded), latents)


def test_qwen_image_flop_count():
    arch = published_architectures()["Qwen-Image"]
    assert (arch.adapter.name, arch.steps, arch.cfg_factor, arch.text_tokens) == ("qwenimage", 50, 2, 128)
    assert arch.adapter.base_size == 1328
    # By hand, at 1024² (4096 image + 128 text tokens): every token passes its stream's q, k, v, out projections
    # (4 x 3072²) and MLP (2 x 3072 x 12288) in each of the 60 blocks; the joint attention is 2 matmuls of
    # 2 L² x 3072 per block. Embeddings, modulation and the output layer add under 0.1%.
    config = QWEN_IMAGE_CONFIG
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    tokens = 64 * 64 + 128
    per_token = 2 * (4 * inner**2 + 2 * inner * 4 * inner)
    attention = 2 * 2 * tokens**2 * inner
    hand = 2 * config["num_layers"] * (tokens * per_token + attention)  # CFG: two calls
    assert call_flops("Qwen-Image", 128, 128) == pytest.approx(hand, rel=2e-3)
    assert 140e12 < call_flops("Qwen-Image", 128, 128) < 142e12


def test_torch_compile_compiles_once_per_stage_size():
    # The shapes hook hands the transformer plain ints per stage: one guard, one graph per stage size. The negative
    # text has the prompt's length here: texts of two lengths cost the stock pipeline a second graph too.
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    pipe, eager = build_tiny_qwenimage_pipeline(), build_tiny_qwenimage_pipeline()
    for p in (pipe, eager):
        p.set_progress_bar_config(disable=True)
        lssgen.patch(p, **TestQwenImage.three_stages)

    def call(p):
        negative, mask = tiny_qwenimage_prompt_embeds(p, "a blurry dog in the rain")
        return qwenimage_call_kwargs(p, negative_prompt_embeds=negative, negative_prompt_embeds_mask=mask)

    # aot_eager: Dynamo traces and guards exactly as with the default backend (graph count and recompilations are
    # decided before any backend runs) but skips inductor's C++ code generation, minutes on a 2-core CPU.
    pipe.transformer.compile(backend="aot_eager")
    for _ in range(2):
        compiled_images = pipe(**call(pipe)).images
    torch.testing.assert_close(compiled_images, eager(**call(eager)).images, atol=1e-4, rtol=1e-4)
    assert counters["stats"]["unique_graphs"] == len(lssgen.plan_for(pipe, 256, 256, 20).stages) == 3
    torch._dynamo.reset()
