"""lssgen.evaluation.flops: the FLOP counter against hand counts, plan arithmetic, and one real-size meta count."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from diffusers import FluxTransformer2DModel

import lssgen
from lssgen.adapters.base import Adapter, Architecture
from lssgen.adapters.flux import FluxAdapter
from lssgen.evaluation.flops import (
    PUBLISHED_SPEEDUPS,
    VIDEO_SETTINGS,
    PublishedSpeedup,
    adapter_for_denoiser,
    bound_speedup,
    call_flops,
    count_flops,
    denoiser_flops,
    flop_bound_table,
    make_plan,
    method_bound_speedup,
    method_flop_table,
    plan_flops,
    published_architectures,
)


class ToyAttention(torch.nn.Module):
    """q, k, v and output projections around one multi-head self-attention: countable by hand."""

    def __init__(self, dim: int, inner: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = (torch.nn.Linear(dim, inner) for _ in range(3))
        self.out = torch.nn.Linear(inner, dim)

    def forward(self, x):
        batch, length, _ = x.shape

        def split(t):
            return t.view(batch, length, self.heads, -1).transpose(1, 2)

        y = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.out(y.transpose(1, 2).reshape(batch, length, -1))


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_counter_matches_hand_count(device):
    batch, length, dim, inner, heads = 2, 10, 8, 16, 4
    with torch.device(device):
        model = ToyAttention(dim, inner, heads)
        x = torch.zeros(batch, length, dim)
    # A Linear is 2*in*out per token (one multiply-add per weight; biases are not counted). Attention is two
    # batched matmuls per head, Q K^T and P V, each 2*L*L*d_head: 2*2*L²*d_head per head, 2*2*L²*inner in all.
    linears = 3 * (2 * dim * inner) + 2 * inner * dim
    attention = 2 * 2 * length**2 * inner
    assert count_flops(lambda: model(x)) == batch * (length * linears + attention)


def tiny_flux() -> FluxTransformer2DModel:
    config = dict(
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),
    )
    torch.manual_seed(0)
    with torch.device("meta"):
        meta = FluxTransformer2DModel(**config)
    return FluxTransformer2DModel(**config), meta


def test_meta_count_equals_cpu_count_and_is_linear_in_batch():
    cpu, meta = tiny_flux()
    on_cpu = denoiser_flops(cpu, 8, 12, text_tokens=7)
    assert on_cpu > 0
    assert denoiser_flops(meta, 8, 12, text_tokens=7) == on_cpu
    # call_flops counts batch 1 and multiplies by the CFG factor; that relies on this.
    assert denoiser_flops(meta, 8, 12, text_tokens=7, batch=2) == 2 * on_cpu


def test_plan_flops_of_a_single_stage_plan():
    plan = make_plan("FLUX.1-dev", 1024, start_sigma=1.0)
    assert len(plan.stages) == 1 and plan.total_steps == 50

    def cost(h, w):
        return 1000 * h + w

    assert plan_flops("FLUX.1-dev", plan, cost) == 50 * cost(128, 128)


def test_plan_flops_sums_stages():
    plan = make_plan("SDXL", 2048, start_sigma=0.75, min_resolution=512)
    assert len(plan.stages) == 3
    expected = sum(s.num_denoiser_steps * s.latent_height * s.latent_width for s in plan.stages)
    assert plan_flops("SDXL", plan, lambda h, w: h * w) == expected


def test_two_stage_flux_bound_is_between_one_and_the_naive_bound():
    plan = make_plan("FLUX.1-dev", 1024, start_sigma=0.75, min_resolution=512)
    assert len(plan.stages) == 2
    # Free low-resolution steps would give N / (steps at full size); they cost something, so the bound is below.
    naive = published_architectures()["FLUX.1-dev"].steps / plan.stages[-1].num_denoiser_steps
    bound = bound_speedup("FLUX.1-dev", 1024, start_sigma=0.75, min_resolution=512)
    assert 1.0 < bound < naive


def test_real_sd15_unet_on_meta_has_the_known_magnitude():
    # SD1.5's UNet at 512² (64x64 latent, 77 CLIP tokens) is commonly quoted at ~0.4 TMACs = ~0.8 TFLOPs per
    # call: ~860M weights, most of them convolutions swept over 64²..8² positions, plus 4096-token
    # self-attention at the top level (5 blocks x 4*4096²*320 ≈ 0.1 TFLOPs). FlopCounterMode counts matmuls,
    # convolutions and attention only (no norms, activations), and tools differ on such details by well under
    # 25%, hence [0.6, 1.0] TFLOPs for one call; call_flops doubles it for classifier-free guidance.
    per_call = call_flops("SD1.5", 64, 64) / published_architectures()["SD1.5"].cfg_factor
    assert 0.6e12 < per_call < 1.0e12
    # Doubling the side quadruples the tokens; the cost grows faster than 4x because self-attention is ~L².
    assert call_flops("SD1.5", 128, 128) > 4 * call_flops("SD1.5", 64, 64)


def test_table_marks_settings_without_stages():
    table = flop_bound_table(
        resolutions=(512,),
        settings=[{"start_sigma": 0.75, "shorten_intermediate_steps": True, "min_resolution": 512}],
        architectures=["SD1.5"],
    )
    assert table.splitlines()[-1].endswith("| - |")


def test_a_size_rounded_down_is_said_once_under_the_table(caplog):
    # Before: the planner warned "1280x720 does not halve cleanly" once per row (each setting, each Wan model).
    with caplog.at_level(logging.WARNING):
        table = flop_bound_table([(720, 1280)], VIDEO_SETTINGS, architectures=["Wan2.1-T2V-14B"])
    assert [record.getMessage() for record in caplog.records] == []
    lines = table.splitlines()
    rows = [line for line in lines if line.startswith("| Wan2.1-T2V-14B |")]
    assert len(rows) == len(VIDEO_SETTINGS) == 4
    notes = [line for line in lines if "does not halve cleanly" in line]
    assert len(notes) == 1 and notes[0].startswith(
        "- 1280x720 does not halve cleanly into 2 stages; generating 1280x704"
    )
    assert lines.index(notes[0]) > lines.index(rows[-1])  # under the table
    # Each cell is the bound at the size generated: plain generation and the plan both at 1280x704.
    for row, setting in zip(rows, VIDEO_SETTINGS):
        assert row.endswith(f"| {bound_speedup('Wan2.1-T2V-14B', (704, 1280), **setting):.2f}x |")


def test_a_table_without_rounding_has_no_notes():
    table = flop_bound_table([(480, 832)], VIDEO_SETTINGS[:1], architectures=["Wan2.1-T2V-14B"])
    assert len(table.splitlines()) == 3


def test_each_family_builds_its_own_dummy_inputs():
    # flops.py holds no per-model branch: the adapter listing the denoiser's class builds its inputs.
    cpu, _ = tiny_flux()
    assert adapter_for_denoiser(cpu).name == "flux"
    assert {arch.adapter.name for arch in published_architectures().values()} >= {"flux", "sd3", "sdxl", "sd"}
    with pytest.raises(ValueError, match="No installed lssgen adapter lists an architecture of Linear"):
        adapter_for_denoiser(torch.nn.Linear(2, 2))
    with pytest.raises(NotImplementedError, match="denoiser_dummy_inputs"):
        Adapter().denoiser_dummy_inputs(cpu, 8, 8, 7)


def test_an_adapter_adds_its_architectures_without_touching_flops():
    tiny = {key: value for key, value in tiny_flux()[0].config.items() if not key.startswith("_")}

    class TinyFamily(FluxAdapter):
        name = "tiny-family"
        pipeline_classes = ("NoSuchPipeline",)
        architectures = (
            Architecture("tiny-flux", "FluxTransformer2DModel", tiny, text_tokens=7, cfg_factor=2, scheduler=None),
        )

    lssgen.register_adapter(TinyFamily())
    try:
        arch = published_architectures()["tiny-flux"]
        assert isinstance(arch.adapter, TinyFamily) and arch.steps == 50
        assert call_flops("tiny-flux", 8, 12) == 2 * denoiser_flops(tiny_flux()[1], 8, 12, text_tokens=7)
    finally:
        lssgen.unregister_adapter("tiny-family")
    assert "tiny-flux" not in published_architectures()


def test_method_bounds_are_each_plans_flops_against_plain_generation():
    """The methods' published settings on FLUX.1-dev: refine's 12 half-size steps and 1 full one, against 50 full
    steps, by hand from the per-step counts; spectral's plan splits 50 steps as SPEED did (28 + 22 at delta 0.05)."""
    refine = PublishedSpeedup("FLUX.1-dev", 1024, "refine", "8.25x", steps=12)
    bound, plan = method_bound_speedup(refine)
    full, half = call_flops("FLUX.1-dev", 128, 128), call_flops("FLUX.1-dev", 64, 64)
    assert bound == pytest.approx(50 * full / (12 * half + full))
    spectral = PublishedSpeedup("FLUX.1-dev", 1024, "spectral:delta=0.05", "1.63x")
    bound, plan = method_bound_speedup(spectral)
    assert [s.num_denoiser_steps for s in plan.stages] == [28, 22]
    assert bound == pytest.approx(50 * full / (28 * half + 22 * full))
    table = method_flop_table([refine, spectral]).splitlines()
    assert table[2].startswith("| FLUX.1-dev | 1024² | `refine` | 512x512: 12, 1024x1024: 1 | ")
    assert table[3].split(" | ")[4:6] == [f"{bound:.2f}x", "1.63x"]
    assert {claim.method.partition(":")[0] for claim in PUBLISHED_SPEEDUPS} == {
        "lssgen",
        "refine",
        "spectral",
        "bottleneck",
    }
