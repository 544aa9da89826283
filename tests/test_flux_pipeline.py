"""End-to-end behaviour of `lssgen.patch` on a stock FluxPipeline with tiny random weights."""

import json
import logging

import pytest
import torch
from conftest import flux_call_kwargs
from diffusers import DDPMPipeline, FlowMatchEulerDiscreteScheduler, FluxPipeline, UNet2DModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

import lssgen
from lssgen.adapters.flux import IMAGE_IDS_HOOK
from lssgen.plan import plan_stages
from lssgen.tiny import build_tiny_flux_pipeline

# Options that give 3 stages (64, 128, 256 px) on a 256 px image, with base sizes scaled like 1024 px models.
THREE_STAGES = {"min_resolution": 64, "base_height": 256, "base_width": 256}


def plan_for(pipe, height, width, steps, **options):
    options = {"start_sigma": 0.75, "min_resolution": 512, **options}
    return plan_stages(
        height,
        width,
        steps,
        scheduler=pipe.scheduler,
        facts=lssgen.adapters.FluxAdapter(),
        vae_scale_factor=pipe.vae_scale_factor,
        **options,
    )


class Trace:
    """Records what reached the transformer: token count, timestep, and the image position ids."""

    def __init__(self, pipe):
        self.calls = []
        self.ids = []
        transformer = pipe.transformer
        self.handles = [
            transformer.register_forward_pre_hook(self._on_transformer, with_kwargs=True),
            transformer.pos_embed.register_forward_pre_hook(self._on_ids),
        ]

    def _on_transformer(self, module, args, kwargs):
        self.calls.append((kwargs["hidden_states"].shape[1], round(float(kwargs["timestep"][0]) * 1000, 3)))

    def _on_ids(self, module, args):
        self.ids.append(args[0])

    def remove(self):
        for handle in self.handles:
            handle.remove()


# --- stock equality --------------------------------------------------------------------------------------------


def test_start_sigma_one_and_unpatch_are_bit_identical_to_stock(flux_pipe):
    stock = build_tiny_flux_pipeline(seed=0)
    stock.set_progress_bar_config(disable=True)
    expected = stock(**flux_call_kwargs(stock)).images

    lssgen.patch(flux_pipe)
    assert torch.equal(flux_pipe(**flux_call_kwargs(flux_pipe), start_sigma=1.0).images, expected)
    scaled = flux_pipe(**flux_call_kwargs(flux_pipe), **THREE_STAGES).images
    assert scaled.shape == expected.shape and not torch.equal(scaled, expected)

    lssgen.unpatch(flux_pipe)
    assert torch.equal(flux_pipe(**flux_call_kwargs(flux_pipe)).images, expected)


def test_patch_is_per_instance_idempotent_and_undone_exactly(flux_pipe):
    other = build_tiny_flux_pipeline(seed=0)
    stock_scheduler = flux_pipe.scheduler
    lssgen.patch(flux_pipe)
    lssgen.patch(flux_pipe, start_sigma=0.667)  # re-patching replaces, never stacks
    assert isinstance(flux_pipe, FluxPipeline) and type(flux_pipe) is not FluxPipeline
    assert type(flux_pipe).__name__ == "FluxPipeline"
    assert list(flux_pipe.transformer._diffusers_hook.hooks) == [IMAGE_IDS_HOOK]
    assert flux_pipe._lssgen.defaults.start_sigma == 0.667
    assert type(other) is FluxPipeline and not lssgen.is_patched(other)
    with pytest.raises(TypeError):
        other(**flux_call_kwargs(other), start_sigma=0.75)  # the stock class gained no argument

    lssgen.unpatch(flux_pipe)
    lssgen.unpatch(flux_pipe)  # a second unpatch is a no-op
    assert type(flux_pipe) is FluxPipeline
    assert "_lssgen" not in flux_pipe.__dict__
    assert flux_pipe.transformer._diffusers_hook.hooks == {}
    assert flux_pipe.scheduler is stock_scheduler


def test_patched_pipe_saves_as_stock_class(flux_pipe, tmp_path):
    lssgen.patch(flux_pipe)
    flux_pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["_class_name"] == "FluxPipeline"
    no_text = dict.fromkeys(["text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"])
    reloaded = FluxPipeline.from_pretrained(tmp_path, **no_text)
    assert type(reloaded) is FluxPipeline


def test_no_low_resolution_stage_runs_stock_with_a_warning(flux_pipe, caplog):
    stock = build_tiny_flux_pipeline(seed=0)
    stock.set_progress_bar_config(disable=True)
    expected = stock(**flux_call_kwargs(stock, height=128, width=128)).images
    lssgen.patch(flux_pipe, min_resolution=100)
    with caplog.at_level(logging.WARNING, logger="lssgen"):
        images = flux_pipe(**flux_call_kwargs(flux_pipe, height=128, width=128)).images
    assert torch.equal(images, expected)
    assert "No low-resolution stage fits 128x128" in caplog.text


# --- the denoiser sees exactly the plan --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("height", "width", "steps", "options"),
    [
        (256, 256, 8, {"min_resolution": 128}),  # 2 stages
        (256, 256, 8, THREE_STAGES),  # 3 stages
        (256, 256, 20, {**THREE_STAGES, "start_sigma": 0.667}),
        (256, 256, 20, {**THREE_STAGES, "shorten_intermediate_steps": False}),
        (256, 128, 8, {"min_resolution": 64, "start_sigma": 0.667}),  # non-square, 2 stages
        (192, 384, 20, {"min_resolution": 48, "base_height": 256, "base_width": 512}),  # non-square, 3 stages
        (512, 512, 8, {"min_resolution": 256}),  # default base 1024: shortening of every stage
    ],
)
def test_denoiser_calls_follow_the_plan(flux_pipe, height, width, steps, options):
    lssgen.patch(flux_pipe)
    plan = plan_for(flux_pipe, height, width, steps, **options)
    trace = Trace(flux_pipe)
    images = flux_pipe(**flux_call_kwargs(flux_pipe, height=height, width=width, num_inference_steps=steps), **options)
    trace.remove()

    assert images.images.shape == (1, 3, height, width)
    expected = [
        ((stage.latent_height // 2) * (stage.latent_width // 2), round(t, 3))
        for stage in plan.stages
        for t in stage.timesteps
    ]
    assert len(plan.stages) >= 2
    assert [tokens for tokens, _ in trace.calls] == [tokens for tokens, _ in expected]
    assert [t for _, t in trace.calls] == pytest.approx([t for _, t in expected], abs=1e-3)

    text_tokens = flux_call_kwargs(flux_pipe)["max_sequence_length"]
    stage_per_call = [stage for stage in plan.stages for _ in stage.timesteps]
    for ids, stage in zip(trace.ids, stage_per_call, strict=True):
        image_ids = ids[text_tokens:]
        rows, cols = stage.latent_height // 2, stage.latent_width // 2
        assert image_ids.shape[0] == rows * cols
        assert image_ids[:, 1].max() == rows - 1 and image_ids[:, 2].max() == cols - 1
        assert torch.equal(image_ids[cols, 1:], torch.tensor([1.0, 0.0]))  # row-major: next row starts at col 0


def test_true_cfg_and_guidance_embeds_follow_the_plan():
    pipe = build_tiny_flux_pipeline(seed=1, guidance_embeds=True)
    pipe.set_progress_bar_config(disable=True)
    lssgen.patch(pipe, **THREE_STAGES)
    trace = Trace(pipe)
    pipe(**flux_call_kwargs(pipe), negative_prompt="blurry", true_cfg_scale=2.0)
    trace.remove()
    plan = plan_for(pipe, 256, 256, 8, **THREE_STAGES)
    expected_tokens = [(s.latent_height // 2) * (s.latent_width // 2) for s in plan.stages for _ in s.timesteps]
    # Conditional and unconditional call per step, both at the stage's size and with its ids.
    assert [tokens for tokens, _ in trace.calls] == [t for t in expected_tokens for _ in range(2)]
    assert [ids.shape[0] - 32 for ids in trace.ids] == [t for t in expected_tokens for _ in range(2)]


# --- batches, seeds, scaling spaces -----------------------------------------------------------------------------


def test_batch_of_prompts_with_several_images_each(flux_pipe):
    lssgen.patch(flux_pipe, **THREE_STAGES)
    kwargs = flux_call_kwargs(flux_pipe, prompts=["a fox", "a boat"], num_images_per_prompt=2)
    first = flux_pipe(**kwargs).images
    again = flux_pipe(**flux_call_kwargs(flux_pipe, prompts=["a fox", "a boat"], num_images_per_prompt=2)).images
    assert first.shape == (4, 3, 256, 256)
    assert torch.equal(first, again)  # same seed, same images
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.equal(first[i], first[j])


def test_stage_noise_is_drawn_for_every_image_of_the_batch(flux_pipe):
    # One generator per image: if any stage drew noise for fewer images, the per-image streams would shift and
    # image 3 would no longer match the same image generated on its own.
    lssgen.patch(flux_pipe, **THREE_STAGES)
    seeds = [11, 12, 13, 14]
    batch = flux_pipe(
        **flux_call_kwargs(
            flux_pipe,
            prompts=["a fox", "a boat"],
            num_images_per_prompt=2,
            generator=[torch.Generator().manual_seed(s) for s in seeds],
        )
    ).images
    alone = flux_pipe(**flux_call_kwargs(flux_pipe, prompts="a boat", generator=torch.Generator().manual_seed(14)))
    torch.testing.assert_close(batch[3], alone.images[0], atol=1e-4, rtol=1e-4)


def test_different_seeds_give_different_images(flux_pipe):
    lssgen.patch(flux_pipe, **THREE_STAGES)
    a = flux_pipe(**flux_call_kwargs(flux_pipe, seed=1)).images
    b = flux_pipe(**flux_call_kwargs(flux_pipe, seed=2)).images
    assert not torch.equal(a, b)


def count_calls(module, method="forward"):
    calls = []
    original = getattr(module, method)

    def counting(*args, **kwargs):
        calls.append(args[0].shape if args else None)
        return original(*args, **kwargs)

    setattr(module, method, counting)
    return calls


@pytest.mark.parametrize("space", ["learned", "resnet", "latent", "pixel"])
def test_every_scaling_space_runs(flux_pipe, space):
    upsampler = lssgen.LatentUpsampler(4, 4, block_out_channels=(32, 32), norm_num_groups=8)
    lssgen.patch(flux_pipe, upsampler, **THREE_STAGES)
    upsampler_inputs = []
    handle = upsampler.register_forward_pre_hook(lambda module, args: upsampler_inputs.append(args[0].shape))
    encodes = count_calls(flux_pipe.vae, "encode")
    images = flux_pipe(**flux_call_kwargs(flux_pipe, num_images_per_prompt=2), scaling_space=space).images
    handle.remove()
    assert images.shape == (2, 3, 256, 256) and torch.isfinite(images).all()
    if space in ("learned", "resnet"):
        assert upsampler_inputs == [(2, 4, 8, 8), (2, 4, 16, 16)]  # once per stage switch
    else:
        assert upsampler_inputs == []
    assert len(encodes) == (2 if space == "pixel" else 0)


def test_scaling_spaces_give_different_results(flux_pipe):
    lssgen.patch(flux_pipe, lssgen.LatentUpsampler(4, 4, block_out_channels=(32, 32), norm_num_groups=8))
    results = {
        space: flux_pipe(**flux_call_kwargs(flux_pipe), scaling_space=space, **THREE_STAGES).images
        for space in ("learned", "latent", "pixel")
    }
    assert not torch.equal(results["learned"], results["latent"])
    assert not torch.equal(results["latent"], results["pixel"])


# --- callbacks, interrupt, progress ------------------------------------------------------------------------------


def test_user_callback_sees_every_step_once(flux_pipe):
    lssgen.patch(flux_pipe, **THREE_STAGES)
    seen = []

    def on_step(pipeline, step_index, timestep, callback_kwargs):
        seen.append((step_index, tuple(callback_kwargs["latents"].shape)))
        return {}

    flux_pipe(**flux_call_kwargs(flux_pipe), callback_on_step_end=on_step)
    plan = plan_for(flux_pipe, 256, 256, 8, **THREE_STAGES)
    assert [i for i, _ in seen] == list(range(plan.total_steps))
    tokens = [(s.latent_height // 2) * (s.latent_width // 2) for s in plan.stages for _ in s.timesteps]
    assert [shape[1] for _, shape in seen] == tokens  # before the switch: the stage's own latents


def test_pipeline_callbacks_are_chained(flux_pipe):
    class Recorder(PipelineCallback):
        tensor_inputs = ["prompt_embeds"]

        def __init__(self):
            super().__init__()
            self.steps = []

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            assert "prompt_embeds" in callback_kwargs
            self.steps.append(step_index)
            return callback_kwargs

    lssgen.patch(flux_pipe, **THREE_STAGES)
    first, second = Recorder(), Recorder()
    flux_pipe(**flux_call_kwargs(flux_pipe), callback_on_step_end=first)
    flux_pipe(**flux_call_kwargs(flux_pipe), callback_on_step_end=MultiPipelineCallbacks([second]))
    total = plan_for(flux_pipe, 256, 256, 8, **THREE_STAGES).total_steps
    assert first.steps == second.steps == list(range(total))


def test_interrupt_in_a_low_resolution_stage_still_returns_a_full_size_image(flux_pipe):
    lssgen.patch(flux_pipe, **THREE_STAGES)
    calls = []

    def stop_early(pipeline, step_index, timestep, callback_kwargs):
        calls.append(step_index)
        pipeline._interrupt = True
        return {}

    images = flux_pipe(**flux_call_kwargs(flux_pipe), callback_on_step_end=stop_early).images
    assert calls == [0]
    assert images.shape == (1, 3, 256, 256) and torch.isfinite(images).all()


def test_one_progress_bar_over_all_stages(flux_pipe, capfd):
    lssgen.patch(flux_pipe, **THREE_STAGES)
    total = plan_for(flux_pipe, 256, 256, 8, **THREE_STAGES).total_steps
    flux_pipe.set_progress_bar_config(disable=False)
    flux_pipe(**flux_call_kwargs(flux_pipe))
    err = capfd.readouterr().err
    assert f"{total}/{total}" in err and "stage 3/3 256x256" in err
    flux_pipe.set_progress_bar_config(disable=True)
    flux_pipe(**flux_call_kwargs(flux_pipe))
    assert capfd.readouterr().err == ""


# --- bad input: clear errors, and the pipe keeps working ---------------------------------------------------------


def assert_still_works(pipe, stock_scheduler):
    assert pipe.scheduler is stock_scheduler and pipe._lssgen.run is None
    assert pipe(**flux_call_kwargs(pipe), **THREE_STAGES).images.shape == (1, 3, 256, 256)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"start_sigma": 0.0}, ValueError, "start_sigma"),
        ({"start_sigma": 1.5}, ValueError, "start_sigma"),
        ({"start_sigma": "0.7"}, TypeError, "start_sigma"),
        ({"min_resolution": 0}, ValueError, "min_resolution"),
        ({"min_resolution": 512}, ValueError, "min_resolution.*larger than the image's short side"),
        ({"shorten_intermediate_steps": "no"}, TypeError, "shorten_intermediate_steps"),
        ({"scaling_space": "pixels"}, ValueError, "Unknown `scaling_space`"),
        ({"scaling_space": "learned"}, ValueError, "needs a latent upsampler"),
        ({"latents": torch.zeros(1, 256, 16)}, ValueError, "`latents` cannot be combined"),
        ({"sigmas": [1.0, 0.5]}, ValueError, "`sigmas` cannot be combined"),
        ({"generator": [torch.Generator()] * 3, "min_resolution": 128}, ValueError, "3 generators"),
    ],
)
def test_bad_call_arguments_raise_and_leave_the_pipe_usable(flux_pipe, options, error, match):
    stock_scheduler = flux_pipe.scheduler
    lssgen.patch(flux_pipe)
    kwargs = flux_call_kwargs(flux_pipe)
    kwargs.update(options)
    with pytest.raises(error, match=match):
        flux_pipe(**kwargs)
    assert_still_works(flux_pipe, stock_scheduler)


def test_error_inside_the_loop_restores_the_scheduler(flux_pipe):
    stock_scheduler = flux_pipe.scheduler
    lssgen.patch(flux_pipe, **THREE_STAGES)

    def broken(pipeline, step_index, timestep, callback_kwargs):
        raise RuntimeError("user callback failed")

    with pytest.raises(RuntimeError, match="user callback failed"):
        flux_pipe(**flux_call_kwargs(flux_pipe), callback_on_step_end=broken)
    assert_still_works(flux_pipe, stock_scheduler)


def test_sizes_that_do_not_halve_are_rounded_down_with_a_warning(flux_pipe, caplog):
    lssgen.patch(flux_pipe)
    with caplog.at_level(logging.WARNING, logger="lssgen"):
        images = flux_pipe(**flux_call_kwargs(flux_pipe, height=250, width=200), min_resolution=64).images
    # K = 1 (short side 200 // 64 = 3): sides must be multiples of 8 * 2 * 2 = 32.
    assert images.shape == (1, 3, 224, 192)
    assert "generating 192x224 instead" in caplog.text


def test_upsampler_with_wrong_channels_is_rejected_at_patch(flux_pipe):
    with pytest.raises(ValueError, match="maps 16 -> 16 latent channels.*denoises 4-channel"):
        lssgen.patch(flux_pipe, lssgen.LatentUpsampler(16, 16))
    assert not lssgen.is_patched(flux_pipe)
    with pytest.raises(TypeError, match="must be an lssgen.LatentUpsampler"):
        lssgen.patch(flux_pipe, "weights/flux-x2")


def test_unknown_patch_option_is_rejected(flux_pipe):
    with pytest.raises(TypeError, match=r"unknown lssgen option\(s\) \['start_sgima'\]"):
        lssgen.patch(flux_pipe, start_sgima=0.5)
    assert not lssgen.is_patched(flux_pipe)


def test_unsupported_pipeline_names_the_installed_adapters():
    unet = UNet2DModel(
        sample_size=8,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        layers_per_block=1,
    )
    pipe = DDPMPipeline(unet=unet, scheduler=FlowMatchEulerDiscreteScheduler())
    with pytest.raises(ValueError, match=r"no adapter for DDPMPipeline.*flux \(FluxPipeline\)"):
        lssgen.patch(pipe)
    assert not lssgen.is_patched(pipe)


# --- LoRA and offloading ------------------------------------------------------------------------------------------


def write_tiny_lora(pipe, path):
    from safetensors.torch import save_file

    to_q = pipe.transformer.transformer_blocks[0].attn.to_q
    generator = torch.Generator().manual_seed(0)
    prefix = "transformer.transformer_blocks.0.attn.to_q"
    save_file(
        {
            f"{prefix}.lora_A.weight": torch.randn(2, to_q.in_features, generator=generator),
            f"{prefix}.lora_B.weight": torch.randn(to_q.out_features, 2, generator=generator),
        },
        path,
    )


def test_lora_applies_in_every_stage(flux_pipe, tmp_path):
    lssgen.patch(flux_pipe, **THREE_STAGES)
    without = flux_pipe(**flux_call_kwargs(flux_pipe)).images
    write_tiny_lora(flux_pipe, tmp_path / "lora.safetensors")
    flux_pipe.load_lora_weights(tmp_path / "lora.safetensors", adapter_name="tiny")
    lora_inputs = []
    lora_a = flux_pipe.transformer.transformer_blocks[0].attn.to_q.lora_A["tiny"]
    handle = lora_a.register_forward_pre_hook(lambda module, args: lora_inputs.append(args[0].shape[1]))
    with_lora = flux_pipe(**flux_call_kwargs(flux_pipe)).images
    handle.remove()
    plan = plan_for(flux_pipe, 256, 256, 8, **THREE_STAGES)
    assert lora_inputs == [(s.latent_height // 2) * (s.latent_width // 2) for s in plan.stages for _ in s.timesteps]
    assert not torch.equal(with_lora, without)


@pytest.mark.parametrize("offload", ["model", "group"])
def test_offloading_keeps_working(flux_pipe, offload):
    lssgen.patch(flux_pipe, **THREE_STAGES)
    expected = flux_pipe(**flux_call_kwargs(flux_pipe)).images
    cpu = torch.device("cpu")
    if offload == "model":
        # On this CPU-only machine the "accelerator" is the CPU too; the hooks and device moves still run.
        flux_pipe.enable_model_cpu_offload(device="cpu")
    else:
        flux_pipe.transformer.enable_group_offload(
            onload_device=cpu, offload_device=cpu, offload_type="block_level", num_blocks_per_group=1
        )
    assert torch.equal(flux_pipe(**flux_call_kwargs(flux_pipe)).images, expected)
    lssgen.unpatch(flux_pipe)
    assert flux_pipe(**flux_call_kwargs(flux_pipe)).images.shape == expected.shape
