"""FLUX.1: the adapter contract, plus what is particular to FluxPipeline (position ids, true CFG, saving)."""

import json
import logging

import pytest
import torch
from adapter_contract import AdapterContract
from diffusers import DDPMPipeline, FlowMatchEulerDiscreteScheduler, FluxPipeline, UNet2DModel

import lssgen
from lssgen.tiny import build_tiny_flux_pipeline

TEXT_TOKENS = 32


def flux_call_kwargs(pipe, prompts="a red fox in the snow", seed=0, **overrides):
    kwargs = {
        "prompt": prompts,
        "max_sequence_length": TEXT_TOKENS,
        "height": 256,
        "width": 256,
        "num_inference_steps": 8,
        "output_type": "pt",
        "generator": torch.Generator().manual_seed(seed),
    }
    kwargs.update(overrides)
    return kwargs


class TestFlux(AdapterContract):
    adapter_name = "flux"
    lora_prefix = "transformer.transformer_blocks.0.attn.to_q"
    call_argument_share = 1.0  # the family whose call-argument property runs all the profile's examples
    trace_cases = [
        *AdapterContract.trace_cases,
        (512, 512, 8, {"min_resolution": 256}),  # default base 1024: every stage is shortened
    ]

    def build_pipe(self, seed=0):
        return build_tiny_flux_pipeline(seed=seed)

    def call_kwargs(self, pipe, prompts="a red fox in the snow", seed=0, **overrides):
        return flux_call_kwargs(pipe, prompts, seed, **overrides)

    def conditioning_hooks(self, pipe, records):
        # The ids hook runs inside the transformer's forward, so the ids are read where they are used.
        def on_ids(module, args):
            image_ids = args[0][TEXT_TOKENS:]
            rows, cols = int(image_ids[:, 1].max()) + 1, int(image_ids[:, 2].max()) + 1
            row_major = image_ids.shape[0] == rows * cols and torch.equal(image_ids[cols, 1:], torch.tensor([1.0, 0]))
            records[-1]["ids"] = (rows, cols, row_major)

        return [pipe.transformer.pos_embed.register_forward_pre_hook(on_ids)]

    def observe(self, pipe, kwargs):
        return {"tokens": kwargs["hidden_states"].shape[1], "timestep": float(kwargs["timestep"][0]) * 1000}

    def expected(self, pipe, stage, timestep):
        rows, cols = stage.latent_height // 2, stage.latent_width // 2
        return {"tokens": rows * cols, "timestep": timestep, "ids": (rows, cols, True)}

    def test_true_cfg_and_guidance_embeds_follow_the_plan(self):
        pipe = build_tiny_flux_pipeline(seed=1, guidance_embeds=True)
        pipe.set_progress_bar_config(disable=True)
        lssgen.patch(pipe, **self.three_stages)
        records, handle = self.trace(pipe)
        pipe(**flux_call_kwargs(pipe), negative_prompt="blurry", true_cfg_scale=2.0)
        handle.remove()
        # The text-to-image pipe's plan (an img2img contract class inherits this test, with its own `strength`).
        plan = lssgen.plan_for(pipe, self.height, self.width, self.steps, **self.three_stages)
        # A conditional and an unconditional call per step, both at the stage's size and with its ids.
        expected = [self.expected(pipe, s, t) for s in plan.stages for t in s.timesteps for _ in range(2)]
        assert [r["ids"] for r in records] == [e["ids"] for e in expected]
        assert [r["tokens"] for r in records] == [e["tokens"] for e in expected]


def test_patched_pipe_saves_as_stock_class(tmp_path):
    pipe = build_tiny_flux_pipeline()
    lssgen.patch(pipe)
    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["_class_name"] == "FluxPipeline"
    assert type(FluxPipeline.from_pretrained(tmp_path)) is FluxPipeline


def test_no_low_resolution_stage_runs_stock_with_a_warning(caplog):
    stock, pipe = build_tiny_flux_pipeline(), build_tiny_flux_pipeline()
    for p in (stock, pipe):
        p.set_progress_bar_config(disable=True)
    expected = stock(**flux_call_kwargs(stock, height=128, width=128)).images
    lssgen.patch(pipe, min_resolution=100)
    with caplog.at_level(logging.WARNING, logger="lssgen"):
        images = pipe(**flux_call_kwargs(pipe, height=128, width=128)).images
    assert torch.equal(images, expected)
    assert "No low-resolution stage fits 128x128" in caplog.text


def test_patch_rejects_what_is_not_an_upsampler_or_an_option():
    pipe = build_tiny_flux_pipeline()
    with pytest.raises(TypeError, match="must be an lssgen.LatentUpsampler"):
        lssgen.patch(pipe, "weights/flux-x2")
    with pytest.raises(TypeError, match=r"unknown lssgen option\(s\) \['start_sgima'\]"):
        lssgen.patch(pipe, start_sgima=0.5)
    assert not lssgen.is_patched(pipe)


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
    listed = r"flux \(FluxPipeline, FluxImg2ImgPipeline, FluxInpaintPipeline, [^)]*, from lssgen\)"
    with pytest.raises(ValueError, match=rf"no adapter for DDPMPipeline.*{listed}"):
        lssgen.patch(pipe)
    assert not lssgen.is_patched(pipe)
