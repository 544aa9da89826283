"""The stage plan against numbers worked out by hand from the method's rules (DESIGN.md §1).

Expected sizes, step counts, time shifts and truncation indices are written out literally; only the
"reference schedule" checks build a fresh scheduler to compare whole timestep lists.

Hand arithmetic used below (Flux scheduler config: base_image_seq_len 256, max_image_seq_len 4096,
base_shift 0.5, max_shift 1.15):

* mu(seq) = 0.5 + 0.65 * (seq - 256) / 3840, seq capped at 4096:
  seq 256 -> 0.5; 768 -> 0.586667; 1024 -> 0.63; 1536 -> 0.716667; 3072 -> 0.976667; >= 4096 -> 1.15.
* Shifted sigma: s' = e^mu / (e^mu + 1/s - 1). So s' >= t  <=>  1/s - 1 <= e^mu * (1 - t) / t.
  mu 1.15 (e^mu = 3.158193), t 0.75:  s >= 0.48716 -> on linspace(1, 0.02, 50) the last kept index is 25 (s=0.5,
  s'=0.759511); index 26 (s=0.48) gives s'=0.7477.
  mu 1.15, t 0.667: s >= 0.38809 -> index 30 (s=0.4, s'=0.67799); index 31 (s=0.38) gives 0.6594.
  mu 0.63 (e^mu = 1.877611), t 0.75: s >= 0.61505 -> on linspace(1, 0.04, 25) index 9 (s=0.64, s'=0.769477);
  on linspace(1, 0.02, 50) index 19 (s=0.62, s'=0.7539).
  mu 0.976667 (e^mu = 2.65559), t 0.75: s >= 0.530449 -> on linspace(1, 0.02, 50) index 23 (s=0.54, s'=0.75713).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import types

import numpy as np
import pytest
from diffusers import (
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxImg2ImgPipeline,
    HeunDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
)
from hypothesis import given
from hypothesis import strategies as st

import lssgen
from lssgen.adapters import FluxAdapter
from lssgen.adapters.sd import SD_SCHEDULER_CONFIG, SDAdapter
from lssgen.plan import (
    Stage,
    StagePlan,
    count_low_resolution_stages,
    plan_stages,
    stage_step_count,
    stock_timesteps,
    validate_arguments,
    validate_options,
)
from lssgen.tiny import FLUX_SCHEDULER_CONFIG

FLUX = FluxAdapter()
SD = SDAdapter()
VAE_SCALE = 8
E_MU_MAX = 3.158193  # e ** 1.15


def make_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG)


def plan(height, width, steps=50, **kwargs) -> StagePlan:
    return plan_stages(
        height, width, steps, scheduler=make_scheduler(), facts=FLUX, vae_scale_factor=VAE_SCALE, **kwargs
    )


def reference_schedule(num_steps: int, mu: float) -> tuple[list[float], list[float]]:
    """Full shifted timesteps and sigmas of one stage, built independently of lssgen."""
    scheduler = make_scheduler()
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / num_steps, num_steps), mu=mu)
    return [float(t) for t in scheduler.timesteps], [float(s) for s in scheduler.sigmas]


def reference_mu(latent_height: int, latent_width: int) -> float:
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    seq_len = (latent_height // 2) * (latent_width // 2)
    return calculate_shift(min(seq_len, 4096), 256, 4096, 0.5, 1.15)


def sizes(p: StagePlan) -> list[tuple[int, int]]:
    """(width, height) in pixels of every stage."""
    return [(s.width, s.height) for s in p.stages]


def latent_sizes(p: StagePlan) -> list[tuple[int, int]]:
    """(latent_width, latent_height) of every stage."""
    return [(s.latent_width, s.latent_height) for s in p.stages]


# --------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("height", "width", "min_resolution", "start_sigma", "expected"),
    [
        (1024, 1024, 512, 0.75, 1),
        (1024, 1024, 256, 0.75, 2),
        (1024, 1024, 128, 0.75, 3),
        (1024, 1024, 1024, 0.75, 0),
        (1024, 1024, 600, 0.75, 0),  # 1024 // 600 = 1
        (768, 1024, 512, 0.75, 0),  # short side 768 < 2 * 512
        (768, 1024, 384, 0.75, 1),
        (1024, 1536, 512, 0.75, 1),
        (1024, 1536, 256, 0.75, 2),
        (1000, 1000, 500, 0.75, 1),
        (1000, 1000, 250, 0.75, 2),
        (1000, 1000, 512, 0.75, 0),
        (2048, 2048, 512, 0.75, 2),
        (1536, 1536, 512, 0.75, 1),  # 1536 // 512 = 3, int(log2 3) = 1
        (1024, 1024, 512, 0.667, 1),
        (1024, 1024, 512, 1.0, 0),
        (2048, 2048, 256, 1.0, 0),
    ],
)
def test_count_low_resolution_stages(height, width, min_resolution, start_sigma, expected):
    assert count_low_resolution_stages(height, width, min_resolution, start_sigma) == expected


@pytest.mark.parametrize(
    ("steps", "height", "width", "shorten", "expected"),
    [
        (50, 1024, 1024, True, 50),  # log2(max(2, 1)) = 1
        (50, 512, 512, True, 25),  # log2(4) = 2
        (50, 256, 256, True, 12),  # log2(16) = 4 -> 12.5 -> 12
        (50, 128, 128, True, 8),  # log2(64) = 6 -> 8.33 -> 8
        (28, 512, 512, True, 14),
        (50, 2048, 2048, True, 50),  # ratio 1/4 -> max(2, .) = 2 -> factor 1
        (50, 384, 512, True, 20),  # log2(2.6667 * 2) = 2.415 -> 20.7 -> 20
        (50, 512, 768, True, 35),  # log2(1.3333 * 2) = 1.415 -> 35.3 -> 35
        (50, 256, 384, True, 14),  # log2(2.6667 * 4) = 3.415 -> 14.6 -> 14
        (50, 768, 1024, True, 50),  # ratio 1.333 -> max 2 -> factor 1
        (8, 256, 256, True, 2),
        (3, 256, 256, True, 0),  # raw count; plan_stages clamps to 1
        (50, 256, 256, False, 50),
        (50, 512, 512, False, 50),
    ],
)
def test_stage_step_count(steps, height, width, shorten, expected):
    assert stage_step_count(steps, height, width, 1024, 1024, shorten) == expected


def test_stage_step_count_uses_the_base_size():
    # Base 512: a 512 stage is "full size" (factor 1), a 256 stage has factor log2(4) = 2.
    assert stage_step_count(40, 512, 512, 512, 512, True) == 40
    assert stage_step_count(40, 256, 256, 512, 512, True) == 20
    # Non-square base 768x1344 (h x w), stage 384x672: (1344/672) * (768/384) = 4 -> factor 2.
    assert stage_step_count(30, 384, 672, 768, 1344, True) == 15


# --------------------------------------------------------------------------------------------------------------
# One stage
# --------------------------------------------------------------------------------------------------------------


def test_start_sigma_one_is_a_single_full_schedule():
    p = plan(1024, 1024, 50, start_sigma=1.0, min_resolution=256)
    assert len(p.stages) == 1
    assert not p.is_multi_resolution
    (stage,) = p.stages
    assert (p.height, p.width) == (1024, 1024)
    assert (stage.height, stage.width) == (1024, 1024)
    assert (stage.latent_height, stage.latent_width) == (128, 128)
    assert stage.index == 0
    assert stage.num_steps == 50
    assert stage.begin_index == 0
    assert stage.num_denoiser_steps == 50
    assert stage.timesteps[0] == pytest.approx(1000.0)
    assert stage.first_sigma == pytest.approx(1.0)
    assert p.total_steps == 50
    assert p.stage_ends == (50,)
    assert stage.scheduler_kwargs["mu"] == pytest.approx(1.15)


def test_short_side_below_twice_min_resolution_is_a_single_stage():
    p = plan(768, 1024, 50, min_resolution=512)  # 768 // 512 = 1 -> K = 0
    assert len(p.stages) == 1
    (stage,) = p.stages
    assert (p.height, p.width) == (768, 1024)
    assert (stage.latent_height, stage.latent_width) == (96, 128)
    assert stage.num_steps == 50
    assert stage.begin_index == 0
    assert stage.num_denoiser_steps == 50
    assert p.total_steps == 50
    assert p.stage_at(0) is stage
    assert p.stage_at(49) is stage
    assert p.stage_at(50) is stage


def test_min_resolution_equal_to_short_side_is_a_single_stage():
    p = plan(1024, 1024, 50, min_resolution=1024)
    assert len(p.stages) == 1
    assert p.stages[0].num_denoiser_steps == 50


# --------------------------------------------------------------------------------------------------------------
# Two and three stages
# --------------------------------------------------------------------------------------------------------------


def test_two_stages_1024_square():
    p = plan(1024, 1024, 50, min_resolution=512, start_sigma=0.75)
    assert p.is_multi_resolution
    assert (p.height, p.width) == (1024, 1024)
    assert sizes(p) == [(512, 512), (1024, 1024)]
    assert latent_sizes(p) == [(64, 64), (128, 128)]
    assert [s.index for s in p.stages] == [0, 1]
    assert [s.vae_scale_factor for s in p.stages] == [8, 8]
    assert [s.num_steps for s in p.stages] == [25, 50]
    # First stage runs its whole schedule; the second restarts at index 25 (s = 0.5 -> shifted 0.7595).
    assert [s.begin_index for s in p.stages] == [0, 25]
    assert [s.num_denoiser_steps for s in p.stages] == [25, 25]
    assert p.total_steps == 50
    assert p.stage_ends == (25, 50)
    first, second = p.stages
    assert first.first_sigma == pytest.approx(1.0)
    assert first.timesteps[0] == pytest.approx(1000.0)
    assert second.first_sigma == pytest.approx(0.759511, abs=1e-5)
    assert second.timesteps[0] == pytest.approx(759.511, abs=1e-2)
    assert second.timesteps[0] >= 750.0
    # Stage time shifts: 32x32 tokens -> 0.63; 64x64 tokens -> 1.15.
    assert first.scheduler_kwargs["mu"] == pytest.approx(0.63)
    assert second.scheduler_kwargs["mu"] == pytest.approx(1.15)


def test_two_stages_start_sigma_0667():
    p = plan(1024, 1024, 50, min_resolution=512, start_sigma=0.667)
    assert [s.num_steps for s in p.stages] == [25, 50]
    assert [s.begin_index for s in p.stages] == [0, 30]
    assert [s.num_denoiser_steps for s in p.stages] == [25, 20]
    assert p.total_steps == 45
    assert p.stage_ends == (25, 45)
    assert p.stages[1].first_sigma == pytest.approx(0.67799, abs=1e-4)
    assert p.stages[1].timesteps[0] >= 667.0


def test_three_stages_1024_square():
    p = plan(1024, 1024, 50, min_resolution=256, start_sigma=0.75)
    assert sizes(p) == [(256, 256), (512, 512), (1024, 1024)]
    assert latent_sizes(p) == [(32, 32), (64, 64), (128, 128)]
    assert [s.num_steps for s in p.stages] == [12, 25, 50]
    assert [s.begin_index for s in p.stages] == [0, 9, 25]
    assert [s.num_denoiser_steps for s in p.stages] == [12, 16, 25]
    assert p.total_steps == 53
    assert p.stage_ends == (12, 28, 53)
    assert [s.scheduler_kwargs["mu"] for s in p.stages] == pytest.approx([0.5, 0.63, 1.15])
    assert p.stages[0].first_sigma == pytest.approx(1.0)
    assert p.stages[1].first_sigma == pytest.approx(0.769477, abs=1e-5)
    assert p.stages[2].first_sigma == pytest.approx(0.759511, abs=1e-5)


def test_stage_at_and_stage_ends():
    p = plan(1024, 1024, 50, min_resolution=256)  # 12 + 16 + 25 steps
    s0, s1, s2 = p.stages
    assert p.stage_ends == (12, 28, 53)
    expected = {0: s0, 11: s0, 12: s1, 20: s1, 27: s1, 28: s2, 52: s2, 53: s2, 1000: s2}
    for step, stage in expected.items():
        assert p.stage_at(step) is stage, step


def test_stage_and_plan_types():
    p = plan(1024, 1024, 50)
    assert isinstance(p, lssgen.StagePlan)
    assert all(isinstance(s, Stage) for s in p.stages)
    assert isinstance(p.stages, tuple)
    assert all(isinstance(t, float) for t in p.stages[1].timesteps)
    assert "denoiser steps in all: 50" in p.describe()


# --------------------------------------------------------------------------------------------------------------
# Non-square
# --------------------------------------------------------------------------------------------------------------


def test_non_square_1024x768_two_stages():
    p = plan(768, 1024, 50, min_resolution=384)  # height 768, width 1024
    assert (p.height, p.width) == (768, 1024)
    assert sizes(p) == [(512, 384), (1024, 768)]
    assert latent_sizes(p) == [(64, 48), (128, 96)]
    # 512x384: log2((1024/512) * (1024/384)) = log2(5.333) = 2.415 -> 50 // 2.415 = 20.
    assert [s.num_steps for s in p.stages] == [20, 50]
    # Tokens: 32*24 = 768 -> mu 0.586667; 64*48 = 3072 -> mu 0.976667 -> restart at index 23.
    assert [s.scheduler_kwargs["mu"] for s in p.stages] == pytest.approx([0.586667, 0.976667], abs=1e-6)
    assert [s.begin_index for s in p.stages] == [0, 23]
    assert [s.num_denoiser_steps for s in p.stages] == [20, 27]
    assert p.total_steps == 47
    assert p.stages[1].first_sigma == pytest.approx(0.75713, abs=1e-4)


def test_non_square_1536x1024_two_stages():
    p = plan(1024, 1536, 50, min_resolution=512)  # height 1024, width 1536
    assert (p.height, p.width) == (1024, 1536)
    assert sizes(p) == [(768, 512), (1536, 1024)]
    assert latent_sizes(p) == [(96, 64), (192, 128)]
    # 768x512: log2((1024/768) * (1024/512)) = log2(2.667) = 1.415 -> 35; full size: factor 1 -> 50.
    assert [s.num_steps for s in p.stages] == [35, 50]
    # Tokens 48*32 = 1536 -> mu 0.716667; 96*64 = 6144 -> capped at 4096 -> 1.15.
    assert [s.scheduler_kwargs["mu"] for s in p.stages] == pytest.approx([0.716667, 1.15], abs=1e-6)
    assert [s.begin_index for s in p.stages] == [0, 25]
    assert [s.num_denoiser_steps for s in p.stages] == [35, 25]
    assert p.total_steps == 60


def test_non_square_1536x1024_three_stages():
    p = plan(1024, 1536, 50, min_resolution=256)
    assert sizes(p) == [(384, 256), (768, 512), (1536, 1024)]
    assert latent_sizes(p) == [(48, 32), (96, 64), (192, 128)]
    # 384x256: log2(2.667 * 4) = 3.415 -> 14.
    assert [s.num_steps for s in p.stages] == [14, 35, 50]


# --------------------------------------------------------------------------------------------------------------
# Shortening on / off
# --------------------------------------------------------------------------------------------------------------


def test_shortening_off_two_stages():
    p = plan(1024, 1024, 50, min_resolution=512, shorten_intermediate_steps=False)
    assert [s.num_steps for s in p.stages] == [50, 50]
    assert [s.begin_index for s in p.stages] == [0, 25]
    assert [s.num_denoiser_steps for s in p.stages] == [50, 25]
    assert p.total_steps == 75


def test_shortening_off_three_stages():
    p = plan(1024, 1024, 50, min_resolution=256, shorten_intermediate_steps=False)
    assert [s.num_steps for s in p.stages] == [50, 50, 50]
    # The 512 stage (mu 0.63) on a 50-step schedule restarts at index 19 (s = 0.62 -> 0.7539).
    assert [s.begin_index for s in p.stages] == [0, 19, 25]
    assert [s.num_denoiser_steps for s in p.stages] == [50, 31, 25]
    assert p.total_steps == 106


def test_base_size_changes_shortening():
    p = plan(1024, 1024, 40, min_resolution=512, base_height=512, base_width=512)
    # Base 512: the 512 stage is full size (factor 1), the 1024 stage too (ratio 1/4 -> max 2 -> 1).
    assert [s.num_steps for s in p.stages] == [40, 40]


# --------------------------------------------------------------------------------------------------------------
# Coarse step counts
# --------------------------------------------------------------------------------------------------------------


def test_eight_steps_three_stages():
    p = plan(1024, 1024, 8, min_resolution=256)
    # 8 // 4 = 2, 8 // 2 = 4, 8.
    assert [s.num_steps for s in p.stages] == [2, 4, 8]
    # 512 stage: sigmas [1, .75, .5, .25], mu 0.63 -> shifted .75 -> 0.849 (kept), .5 -> 0.652 -> begin 1.
    # 1024 stage: sigmas [1, .875, .75, .625, .5, .375, .25, .125], mu 1.15 -> .5 -> 0.7595 -> begin 4.
    assert [s.begin_index for s in p.stages] == [0, 1, 4]
    assert [s.num_denoiser_steps for s in p.stages] == [2, 3, 4]
    assert p.total_steps == 9
    assert p.stage_ends == (2, 5, 9)


def test_three_steps_clamps_empty_stage_to_one(caplog):
    with caplog.at_level(logging.WARNING, logger="lssgen.plan"):
        p = plan(1024, 1024, 3, min_resolution=256)
    # 3 // 4 = 0 -> clamped to 1; 3 // 2 = 1; 3.
    assert [s.num_steps for s in p.stages] == [1, 1, 3]
    # One-step schedules are [1000]. The full stage: sigmas [1, 2/3, 1/3], mu 1.15 -> [1000, 863.3, 612.3].
    assert [s.begin_index for s in p.stages] == [0, 0, 1]
    assert [s.num_denoiser_steps for s in p.stages] == [1, 1, 2]
    assert p.stages[0].timesteps == pytest.approx((1000.0,))
    assert p.stages[1].timesteps == pytest.approx((1000.0,))
    assert p.stages[2].timesteps == pytest.approx((863.32, 612.27), abs=0.05)
    assert p.total_steps == 4
    clamp_warnings = [r for r in caplog.records if r.name == "lssgen.plan" and "no step" in r.getMessage()]
    assert len(clamp_warnings) == 1
    assert "stage 1" in clamp_warnings[0].getMessage()


def test_one_step_clamps_every_short_stage(caplog):
    with caplog.at_level(logging.WARNING, logger="lssgen.plan"):
        p = plan(1024, 1024, 1, min_resolution=256)
    assert [s.num_steps for s in p.stages] == [1, 1, 1]
    assert [s.begin_index for s in p.stages] == [0, 0, 0]
    assert [s.num_denoiser_steps for s in p.stages] == [1, 1, 1]
    assert p.total_steps == 3
    assert p.stage_ends == (1, 2, 3)
    clamp_warnings = [r for r in caplog.records if r.name == "lssgen.plan" and "no step" in r.getMessage()]
    assert len(clamp_warnings) == 2


def test_no_clamp_warning_when_every_stage_has_steps(caplog):
    with caplog.at_level(logging.WARNING, logger="lssgen.plan"):
        plan(1024, 1024, 50, min_resolution=256)
    assert not [r for r in caplog.records if r.name == "lssgen.plan"]


# --------------------------------------------------------------------------------------------------------------
# Rounding of sizes that do not halve cleanly
# --------------------------------------------------------------------------------------------------------------


def test_rounds_1000_down_to_992_for_one_low_stage(caplog):
    with caplog.at_level(logging.WARNING, logger="lssgen.plan"):
        p = plan(1000, 1000, 50, min_resolution=500)  # K = 1 -> multiples of 8 * 2 * 2 = 32
    assert (p.height, p.width) == (992, 992)
    assert sizes(p) == [(496, 496), (992, 992)]
    assert latent_sizes(p) == [(62, 62), (124, 124)]
    # 496: log2((1024/496)^2) = log2(4.262) = 2.092 -> 50 // 2.092 = 23; 992: ratio 1.066 -> factor 1 -> 50.
    assert [s.num_steps for s in p.stages] == [23, 50]
    messages = [r.getMessage() for r in caplog.records if r.name == "lssgen.plan"]
    assert any("992x992" in m for m in messages)


def test_rounds_1000_down_to_960_for_two_low_stages():
    p = plan(1000, 1000, 50, min_resolution=250)  # K = 2 -> multiples of 8 * 2 * 4 = 64
    assert (p.height, p.width) == (960, 960)
    assert sizes(p) == [(240, 240), (480, 480), (960, 960)]
    assert latent_sizes(p) == [(30, 30), (60, 60), (120, 120)]
    # 240: log2(18.20) = 4.186 -> 11; 480: log2(4.551) = 2.186 -> 22; 960 -> 50.
    assert [s.num_steps for s in p.stages] == [11, 22, 50]


def test_rounds_each_side_separately():
    p = plan(700, 1000, 50, min_resolution=350)  # K = 1 -> multiples of 32
    assert (p.height, p.width) == (672, 992)
    assert sizes(p) == [(496, 336), (992, 672)]


def test_single_stage_rounds_to_packing_multiple():
    p = plan(1000, 1000, 50, min_resolution=512)  # K = 0 -> multiples of 8 * 2 = 16
    assert (p.height, p.width) == (992, 992)
    assert len(p.stages) == 1


def test_clean_sizes_are_not_rounded(caplog):
    with caplog.at_level(logging.WARNING, logger="lssgen.plan"):
        p = plan(1024, 1536, 50, min_resolution=256)
    assert (p.height, p.width) == (1024, 1536)
    assert not [r for r in caplog.records if r.name == "lssgen.plan"]


# --------------------------------------------------------------------------------------------------------------
# Flow truncation against an independently built schedule
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("start_sigma", [0.75, 0.667])
@pytest.mark.parametrize(
    ("height", "width", "min_resolution", "steps"),
    [
        (1024, 1024, 512, 50),
        (1024, 1024, 256, 50),
        (1024, 1024, 256, 28),
        (768, 1024, 384, 50),
        (1024, 1536, 256, 50),
        (2048, 2048, 512, 30),
        (1000, 1000, 250, 20),
    ],
)
def test_truncation_matches_reference_schedule(height, width, min_resolution, steps, start_sigma):
    p = plan(height, width, steps, min_resolution=min_resolution, start_sigma=start_sigma)
    assert p.is_multi_resolution
    for stage in p.stages:
        mu = reference_mu(stage.latent_height, stage.latent_width)
        assert stage.scheduler_kwargs["mu"] == pytest.approx(mu)
        full, sigmas = reference_schedule(stage.num_steps, mu)
        if stage.index == 0:
            expected_begin = 0
        else:
            kept = [i for i, t in enumerate(full) if t >= start_sigma * 1000]
            expected_begin = kept[-1]
            # The kept timestep is >= the threshold and the next one is below it.
            assert full[expected_begin] >= start_sigma * 1000
            if expected_begin + 1 < len(full):
                assert full[expected_begin + 1] < start_sigma * 1000
        assert stage.begin_index == expected_begin
        assert stage.timesteps == tuple(full[expected_begin:])
        assert stage.first_sigma == pytest.approx(sigmas[expected_begin])
        assert stage.num_denoiser_steps == stage.num_steps - expected_begin


def test_truncation_compares_shifted_timesteps():
    # Unshifted, 0.75 * 1000 would keep only index 12 of linspace(1, 0.02, 50) (s = 0.76); the shifted schedule
    # (mu 1.15) keeps up to index 25. The plan must use the shifted one.
    p = plan(1024, 1024, 50, min_resolution=512)
    assert p.stages[1].begin_index == 25
    assert p.stages[1].begin_index != 12


def test_truncation_at_0667_vs_075_three_stages():
    fast = plan(1024, 1024, 50, min_resolution=256, start_sigma=0.667)
    default = plan(1024, 1024, 50, min_resolution=256, start_sigma=0.75)
    # 512 stage, mu 0.63, t 0.667: 1/s - 1 <= 1.877611 * 0.333/0.667 = 0.93740 -> s >= 0.51615
    # -> on linspace(1, 0.04, 25) index 12 (s = 0.52, shifted 0.6702).
    assert [s.begin_index for s in fast.stages] == [0, 12, 30]
    assert [s.num_denoiser_steps for s in fast.stages] == [12, 13, 20]
    assert fast.total_steps == 45
    assert default.total_steps == 53
    assert fast.total_steps < default.total_steps


def test_each_stage_has_its_own_time_shift():
    p = plan(1024, 1024, 50, min_resolution=128)  # 128, 256, 512, 1024 px
    mus = [s.scheduler_kwargs["mu"] for s in p.stages]
    # Tokens: 8*8 = 64 -> 0.5 + 0.65 * (-192/3840) = 0.4675; 256 -> 0.5; 1024 -> 0.63; 4096 -> 1.15.
    assert mus == pytest.approx([0.4675, 0.5, 0.63, 1.15])
    assert len(set(mus)) == 4
    # Same step count, different shift -> different timesteps.
    same_n = plan(1024, 1024, 50, min_resolution=256, shorten_intermediate_steps=False)
    full_small = reference_schedule(50, 0.5)[0]
    full_large = reference_schedule(50, 1.15)[0]
    assert same_n.stages[0].timesteps == tuple(full_small)
    assert same_n.stages[2].timesteps == tuple(full_large[25:])
    assert full_small != full_large


def test_time_shift_is_capped_at_max_image_seq_len():
    p = plan(2048, 2048, 50, min_resolution=1024)
    assert latent_sizes(p) == [(128, 128), (256, 256)]
    # 2048 px: 128*128 = 16384 tokens -> capped to 4096 -> 1.15 (uncapped it would be 3.2300).
    assert [s.scheduler_kwargs["mu"] for s in p.stages] == pytest.approx([1.15, 1.15])
    # Both stages are full size or more for shortening: factor log2(max(2, <=1)) = 1.
    assert [s.num_steps for s in p.stages] == [50, 50]
    assert [s.begin_index for s in p.stages] == [0, 25]
    assert p.stages[1].first_sigma == pytest.approx(0.759511, abs=1e-5)
    uncapped = 0.5 + 0.65 * (16384 - 256) / 3840
    assert uncapped == pytest.approx(3.23)
    assert not math.isclose(p.stages[1].scheduler_kwargs["mu"], uncapped)


def test_plan_does_not_touch_the_given_scheduler():
    scheduler = make_scheduler()
    timesteps, sigmas = scheduler.timesteps.clone(), scheduler.sigmas.clone()
    plan_stages(1024, 1024, 50, scheduler=scheduler, facts=FLUX, vae_scale_factor=8)
    assert getattr(scheduler, "num_inference_steps", None) is None
    assert scheduler.timesteps.equal(timesteps)
    assert scheduler.sigmas.equal(sigmas)


def test_plan_is_deterministic():
    assert plan(1024, 1536, 50, min_resolution=256) == plan(1024, 1536, 50, min_resolution=256)


# --------------------------------------------------------------------------------------------------------------
# Argument errors
# --------------------------------------------------------------------------------------------------------------

VALID = dict(
    height=1024,
    width=1024,
    num_inference_steps=50,
    start_sigma=0.75,
    min_resolution=512,
    base_height=1024,
    base_width=1024,
)


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"start_sigma": 0}, ValueError, "start_sigma"),
        ({"start_sigma": 0.0}, ValueError, "start_sigma"),
        ({"start_sigma": -0.1}, ValueError, "start_sigma"),
        ({"start_sigma": 1.5}, ValueError, "start_sigma"),
        ({"start_sigma": "0.7"}, TypeError, "start_sigma"),
        ({"start_sigma": True}, TypeError, "start_sigma"),
        ({"start_sigma": None}, TypeError, "start_sigma"),
        ({"min_resolution": 0}, ValueError, "min_resolution"),
        ({"min_resolution": -5}, ValueError, "min_resolution"),
        ({"min_resolution": 2048}, ValueError, "min_resolution"),
        ({"height": 768, "min_resolution": 1024}, ValueError, "min_resolution"),
        ({"min_resolution": 512.5}, TypeError, "min_resolution"),
        ({"min_resolution": 1}, ValueError, "min_resolution`=1 plans 11 stages"),  # was a ZeroDivisionError
        ({"min_resolution": 8}, ValueError, "min_resolution`=8 plans 8 stages for 1024x1024 whose smallest is 0 px"),
        ({"height": 0}, ValueError, "height"),
        ({"height": -8}, ValueError, "height"),
        ({"width": 0}, ValueError, "width"),
        ({"height": 1024.0}, TypeError, "height"),
        ({"num_inference_steps": 0}, ValueError, "num_inference_steps"),
        ({"num_inference_steps": -1}, ValueError, "num_inference_steps"),
        ({"num_inference_steps": True}, TypeError, "num_inference_steps"),
        ({"base_height": 0}, ValueError, "base_height"),
        ({"base_width": 0}, ValueError, "base_width"),
    ],
)
def test_invalid_arguments(changes, error, match):
    arguments = {**VALID, **changes}
    if "plans" not in match:  # the stage count needs the plan, not just the arguments
        with pytest.raises(error, match=match):
            validate_arguments(**arguments)
    with pytest.raises(error, match=match):
        plan_stages(
            arguments.pop("height"),
            arguments.pop("width"),
            arguments.pop("num_inference_steps"),
            scheduler=make_scheduler(),
            facts=FLUX,
            vae_scale_factor=VAE_SCALE,
            shorten_intermediate_steps=True,
            **arguments,
        )


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"start_sigma": 1.0},
        {"start_sigma": 1},  # an int is a number
        {"start_sigma": 0.667},
        {"start_sigma": 1e-3},
        {"min_resolution": 1024},  # equal to the short side
        {"start_sigma": 1.0, "min_resolution": 4096},  # plain generation ignores min_resolution
        {"num_inference_steps": 1},
        {"start_sigma": np.float32(0.75)},
        {"num_inference_steps": np.int64(20)},
    ],
)
def test_valid_arguments(changes):
    validate_arguments(**{**VALID, **changes})


def test_smallest_stage_may_be_one_patch_and_no_smaller():
    # 1024 px, min_resolution 16: K = log2(1024 // 16) = 6, unit 8 * 2 * 64 = 1024 px, smallest stage 2x2 latent
    # cells (16 px), one FLUX patch.
    stages = plan(1024, 1024, 50, min_resolution=16).stages
    assert [(s.latent_height, s.latent_width) for s in stages] == [(2**k, 2**k) for k in range(1, 8)]
    # Half that: the 8 stages' unit (2048 px) rounds the image away, an error rather than a crash.
    with pytest.raises(ValueError, match="smallest is 0 px .* at least 2 latent cells .*at least 16"):
        plan(1024, 1024, 50, min_resolution=8)
    # An image under two patches a side has no room for a low-resolution stage at all.
    with pytest.raises(ValueError, match="too small for a low-resolution stage: generate at least 32 px"):
        plan(16, 16, 8, min_resolution=8)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"start_sigma": True}, TypeError, "start_sigma"),
        ({"start_sigma": float("nan")}, ValueError, "start_sigma"),
        ({"min_resolution": "64"}, TypeError, "min_resolution"),
        ({"base_width": 512.5}, TypeError, "base_width"),
        ({"shorten_intermediate_steps": "no"}, TypeError, "shorten_intermediate_steps"),
    ],
)
def test_options_are_checked_without_an_image_size(options, error, match):
    # What `start_sigma=1.0` calls check too, before handing the call to the stock pipeline.
    with pytest.raises(error, match=match):
        validate_options(**{"start_sigma": 1.0, "min_resolution": 512, **options})


def test_a_later_stage_that_would_restart_from_pure_noise_is_warned_about(caplog):
    # 256 px, 4 steps, base 512 with shortening: the 256 px stage gets 2 steps, [1000, 622.5]; nothing lies in
    # [750, 1000) so it restarts at 1000, from pure noise, and the 128 px stage is wasted.
    with caplog.at_level(logging.WARNING, logger="lssgen"):
        stages = plan(256, 256, 4, min_resolution=128, base_height=512, base_width=512).stages
    assert stages[1].first_sigma == 1.0
    assert "Stage 2 restarts from pure noise" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lssgen"):
        plan(256, 256, 20, min_resolution=128, base_height=512, base_width=512)
    assert "pure noise" not in caplog.text


# --------------------------------------------------------------------------------------------------------------
# What users read: the plan table and the messages
# --------------------------------------------------------------------------------------------------------------


def test_describe_prints_every_stage_of_a_non_square_flow_plan():
    """`describe()` (what `lssgen plan` and the logs print) shows each stage's image and latent size as width x
    height, its steps (`run of n` for truncated stages), its first and last timestep and its start sigma, as worked
    out by hand: 1024x768 at min_resolution 192 -> 256x192, 512x384, 1024x768.

    Stage 1: 16x12 tokens -> mu 0.489167; 11 steps (50 // log2(21.33)); last sigma 1/11 -> shifted 0.14023.
    Stage 2: 32x24 tokens -> mu 0.586667; 20 steps; restarts at s = 0.65 -> 0.76954; last s = 0.05 -> 0.08645.
    Stage 3: 64x48 tokens -> mu 0.976667; 50 steps; restarts at index 23 (0.75713); last s = 0.02 -> 0.05141."""
    p = plan(768, 1024, 50, min_resolution=192)
    assert p.describe() == (
        "stage  image       latent    steps         timesteps           start sigma\n"
        "1/3    256x192     32x24     11            1000.0 -> 140.2     1.000\n"
        "2/3    512x384     64x48     13 of 20      769.5 -> 86.4       0.770\n"
        "3/3    1024x768    128x96    27 of 50      757.1 -> 51.4       0.757\n"
        "denoiser steps in all: 51"
    )


def test_describe_names_the_scaling_only_between_stages():
    """The scaling line appears when `lssgen.plan_for` names it and there is more than one stage; a one-stage plan
    or a plan with no scaling named has no such line."""
    two = plan(1024, 1024, 8, min_resolution=512)
    assert "scaling" not in two.describe()
    named = dataclasses.replace(two, scaling="learned upsampler")
    assert named.describe().splitlines()[-2:] == [
        "denoiser steps in all: 8",
        "scaling between stages: learned upsampler",
    ]
    one = dataclasses.replace(plan(1024, 1024, 8, min_resolution=1024), scaling="learned upsampler")
    assert one.describe().splitlines()[-1] == "denoiser steps in all: 8"
    assert "scaling" not in one.describe()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"height": 1024.0}, "`height` must be an int, got float 1024.0."),
        ({"width": "1024"}, "`width` must be an int, got str '1024'."),
        ({"num_inference_steps": True}, "`num_inference_steps` must be an int, got bool True."),
        ({"start_sigma": "0.7"}, "`start_sigma` must be a number, got str '0.7'."),
        ({"start_sigma": None}, "`start_sigma` must be a number, got NoneType None."),
        ({"min_resolution": 512.5}, "`min_resolution` must be an int, got float 512.5."),
        ({"base_height": 1024.0}, "`base_height` must be an int, got float 1024.0."),
        ({"base_width": "1024"}, "`base_width` must be an int, got str '1024'."),
    ],
)
def test_type_errors_name_the_argument_and_what_it_got(changes, message):
    """A wrong type is refused with the argument's name, the kind it needs (an int for sizes and counts, a number
    for `start_sigma`) and the type and value it got."""
    with pytest.raises(TypeError) as error:
        validate_arguments(**{**VALID, **changes})
    assert str(error.value) == message


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"height": 0}, "`height` must be a positive integer, got 0"),
        ({"width": -16}, "`width` must be a positive integer, got -16"),
        ({"num_inference_steps": 0}, "`num_inference_steps` must be a positive integer, got 0"),
        (
            {"start_sigma": 1.5},
            r"`start_sigma` must be in \(0, 1\], got 1.5.* 1.0 turns multi-resolution generation off",
        ),
        ({"min_resolution": 0}, "`min_resolution` must be a positive number of pixels"),
        ({"base_height": 0}, "`base_height` must be a positive number of pixels"),
        ({"base_width": -1}, "`base_width` must be a positive number of pixels"),
    ],
)
def test_value_errors_name_the_argument_and_the_fix(changes, match):
    """A value out of range is refused naming the argument, and, where there is one, the way out."""
    with pytest.raises(ValueError, match=match):
        validate_arguments(**{**VALID, **changes})


def test_min_resolution_above_the_short_side_error_gives_both_ways_out():
    """A `min_resolution` larger than the image's short side is refused with the largest that works, what half of
    it gives, and plain generation as the other way out."""
    with pytest.raises(ValueError) as error:
        validate_arguments(**{**VALID, "height": 768, "min_resolution": 1024})
    assert str(error.value) == (
        "`min_resolution`=1024 is larger than the image's short side (768 px for 1024x768). Use a `min_resolution` "
        "of at most 768 (half of it gives one low-resolution stage), or pass `start_sigma=1.0` for plain generation."
    )


@pytest.mark.parametrize("changes", [{"base_height": 1}, {"base_width": 1}, {"base_height": 1, "base_width": 1}])
def test_a_one_pixel_base_size_is_valid(changes):
    """`base_height`/`base_width` need only be positive: 1 is the smallest valid value."""
    validate_arguments(**{**VALID, **changes})
    validate_options(start_sigma=0.75, min_resolution=512, **changes)


def test_rounding_warning_says_how_many_stages_and_what_size(caplog):
    """A size that does not halve cleanly is rounded down with a warning naming the stage count, the size really
    generated and the multiple to pass instead."""
    with caplog.at_level(logging.WARNING, logger="lssgen.plan"):
        plan(1000, 1000, 50, min_resolution=250)  # 3 stages -> multiples of 64
    (message,) = [r.getMessage() for r in caplog.records if r.name == "lssgen.plan"]
    assert message == (
        "1000x1000 does not halve cleanly into 3 stages; generating 960x960 instead (both sides must be multiples "
        "of 64 px). Pass a multiple of 64 to avoid this."
    )


def test_clamp_warning_says_what_happens_and_how_to_avoid_it(caplog):
    """The warning for a stage shortened to no step says it runs one step instead, and how to avoid it."""
    with caplog.at_level(logging.WARNING, logger="lssgen.plan"):
        plan(1024, 1024, 3, min_resolution=256)
    (message,) = [r.getMessage() for r in caplog.records if "no step" in r.getMessage()]
    assert message == (
        "num_inference_steps=3 leaves stage 1 with no step after shortening; it runs 1 step. Use more steps or "
        "`shorten_intermediate_steps=False`."
    )


def test_smallest_stage_error_at_exactly_two_patches_suggests_a_larger_min_resolution():
    """At 32 px, exactly two FLUX patches a side, one low-resolution stage fits (min_resolution 16 works), so a too
    small `min_resolution` is answered with the smallest that works, not with "the image is too small"; under 32 px
    the image itself is too small and the error says to generate plainly."""
    assert sizes(plan(32, 32, 8, min_resolution=16)) == [(16, 16), (32, 32)]
    with pytest.raises(ValueError, match=r"Use a `min_resolution` of at least 16 \(the default is 512\)\.") as error:
        plan(32, 32, 8, min_resolution=8)
    assert "too small" not in str(error.value)
    with pytest.raises(
        ValueError,
        match=r"generate at least 32 px a side, or pass `start_sigma=1.0` for plain generation\.",
    ):
        plan(16, 16, 8, min_resolution=8)


def test_stage_sizes_are_ints():
    """Stage sizes are whole latent cells and pixels (ints), which the denoiser's and VAE's shapes need."""
    for stage in plan(1000, 1000, 50, min_resolution=250).stages:
        for value in (stage.latent_height, stage.latent_width, stage.height, stage.width):
            assert type(value) is int, stage


def test_a_later_stage_restarting_from_pure_noise_is_explained(caplog):
    """The pure-noise warning names the stage, its step count, the threshold start_sigma * 1000 and the remedies."""
    with caplog.at_level(logging.WARNING, logger="lssgen"):
        plan(256, 256, 4, min_resolution=128, base_height=512, base_width=512)
    (message,) = [r.getMessage() for r in caplog.records if "pure noise" in r.getMessage()]
    assert message == (
        "Stage 2 restarts from pure noise: none of its 2 timesteps lies between 1000 and start_sigma * 1000 = 750 "
        "but the first, so the earlier stages are wasted. Use more `num_inference_steps`, "
        "`shorten_intermediate_steps=False`, or fewer stages (a larger `min_resolution`)."
    )


# --------------------------------------------------------------------------------------------------------------
# Truncation edge cases and other schedulers
# --------------------------------------------------------------------------------------------------------------


def unshifted_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """No time shift: timesteps are sigmas * 1000 exactly."""
    return FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)


def test_a_timestep_exactly_at_start_sigma_is_where_the_stage_restarts():
    """The restart is the smallest timestep >= start_sigma * 1000, equality included: unshifted 4-step sigmas are
    [1, .75, .5, .25], so at start_sigma 0.75 the target stage restarts at 750 exactly (index 1), not at 1000."""
    p = plan_stages(
        1024,
        1024,
        4,
        scheduler=unshifted_scheduler(),
        facts=FLUX,
        vae_scale_factor=VAE_SCALE,
        min_resolution=512,
        shorten_intermediate_steps=False,
    )
    assert p.stages[0].timesteps == (1000.0, 750.0, 500.0, 250.0)
    assert p.stages[1].begin_index == 1
    assert p.stages[1].timesteps == (750.0, 500.0, 250.0)
    assert p.stages[1].first_sigma == 0.75


class LowSigmaFacts:
    """A flow family whose stage schedules never reach start_sigma: sigmas linspace(0.6, 0.1, n)."""

    flow = True
    latent_multiple = 1
    min_stage_latent_side = 1

    def timestep_kwargs(self, scheduler, num_steps, latent_height, latent_width):
        return {"sigmas": np.linspace(0.6, 0.1, num_steps)}


def test_a_schedule_wholly_below_start_sigma_runs_from_its_first_step():
    """When no timestep of a later stage reaches start_sigma * 1000, the stage runs its whole schedule from the
    first timestep (and its sigma) rather than failing or skipping a step."""
    p = plan_stages(
        1024, 1024, 6, scheduler=unshifted_scheduler(), facts=LowSigmaFacts(), vae_scale_factor=8, min_resolution=512
    )
    later = p.stages[1]
    assert later.begin_index == 0
    assert later.timesteps == pytest.approx((600.0, 500.0, 400.0, 300.0, 200.0, 100.0))
    assert later.first_sigma == pytest.approx(0.6)


def sd_facts_and_scheduler(scheduler_class):
    return SD, scheduler_class.from_config(SD_SCHEDULER_CONFIG)


@pytest.mark.parametrize("scheduler_class", [DDIMScheduler, PNDMScheduler, HeunDiscreteScheduler])
@pytest.mark.parametrize(("steps", "start_sigma"), [(50, 0.75), (50, 0.667), (20, 0.5), (7, 0.75)])
def test_diffusion_stages_follow_diffusers_img2img_rule(scheduler_class, steps, start_sigma):
    """Diffusion (noise-prediction) families truncate later stages exactly as diffusers' img2img pipelines do with
    `strength = start_sigma` (StableDiffusionImg2ImgPipeline.get_timesteps, second-order schedulers included), and
    carry no flow sigma."""
    from diffusers import StableDiffusionImg2ImgPipeline

    facts, scheduler = sd_facts_and_scheduler(scheduler_class)
    p = plan_stages(
        1024,
        1024,
        steps,
        scheduler=scheduler,
        facts=facts,
        vae_scale_factor=8,
        start_sigma=start_sigma,
        min_resolution=512,
        shorten_intermediate_steps=False,
    )
    first, later = p.stages
    assert first.begin_index == 0
    assert first.first_sigma is None and later.first_sigma is None
    reference = scheduler_class.from_config(scheduler.config)
    reference.set_timesteps(steps)
    full = [float(t) for t in reference.timesteps]
    assert first.timesteps == tuple(full)
    img2img = types.SimpleNamespace(scheduler=reference)
    timesteps, _ = StableDiffusionImg2ImgPipeline.get_timesteps(img2img, steps, start_sigma, "cpu")
    assert later.timesteps == tuple(float(t) for t in timesteps)
    assert later.begin_index == len(full) - len(timesteps)


def test_diffusion_truncation_by_hand():
    """50 DDIM steps at start_sigma 0.75 keep int(37.5) = 37 steps: the target stage begins at index 13; Heun
    (order 2, each step but the last two timesteps) begins at 26."""
    for scheduler_class, begin in ((DDIMScheduler, 13), (HeunDiscreteScheduler, 26)):
        facts, scheduler = sd_facts_and_scheduler(scheduler_class)
        p = plan_stages(
            1024,
            1024,
            50,
            scheduler=scheduler,
            facts=facts,
            vae_scale_factor=8,
            min_resolution=512,
            shorten_intermediate_steps=False,
        )
        assert p.stages[1].begin_index == begin
        assert p.stages[1].num_steps == 50


def test_diffusion_describe_shows_no_start_sigma():
    """Diffusion stages have no flow sigma: `describe()` shows "-" in that column."""
    facts, scheduler = sd_facts_and_scheduler(DDIMScheduler)
    p = plan_stages(
        1024,
        1024,
        50,
        scheduler=scheduler,
        facts=facts,
        vae_scale_factor=8,
        min_resolution=512,
        shorten_intermediate_steps=False,
    )
    assert p.describe().splitlines()[1:3] == [
        "1/2    512x512     64x64     50            981.0 -> 1.0        -",
        "2/2    1024x1024   128x128   37 of 50      721.0 -> 1.0        -",
    ]


def test_diffusion_stage_with_no_step_left_is_refused():
    """One DDIM step at start_sigma 0.75 keeps int(0.75) = 0 steps of the target stage: an error naming the stage
    and the fix, not a stage that denoises nothing."""
    facts, scheduler = sd_facts_and_scheduler(DDIMScheduler)
    with pytest.raises(ValueError) as error:
        plan_stages(
            1024,
            1024,
            1,
            scheduler=scheduler,
            facts=facts,
            vae_scale_factor=8,
            min_resolution=512,
            shorten_intermediate_steps=False,
        )
    assert str(error.value) == (
        "`start_sigma`=0.75 leaves stage 2 (1024x1024) no step of its 1; raise `start_sigma` or `num_inference_steps`."
    )


@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")
def test_a_scheduler_that_makes_nan_timesteps_is_refused():
    """Qwen-Image's scheduler (`shift_terminal`) makes NaN timesteps for a 1-step schedule; a plan that would give
    one to a stage (2 steps, shortened to 1 for the 512 px stage) is refused, naming the scheduler, the stage and
    the fixes."""
    from lssgen.adapters.qwenimage import QwenImageAdapter, qwenimage_scheduler

    with pytest.raises(ValueError) as error:
        plan_stages(
            1024,
            1024,
            2,
            scheduler=qwenimage_scheduler(),
            facts=QwenImageAdapter(),
            vae_scale_factor=8,
            min_resolution=512,
        )
    assert str(error.value) == (
        "FlowMatchEulerDiscreteScheduler with this config makes no finite 1-step schedule (NaN timesteps), which "
        "stage 1 (512x512) would get. Use more `num_inference_steps` (every stage needs at least 2 steps with this "
        "scheduler), or `shorten_intermediate_steps=False`."
    )


def test_stock_timesteps_are_the_untruncated_stock_schedule():
    """`stock_timesteps` (what the cache schedules are laid on) is the stock n-step schedule of a latent of that
    size, untruncated, and leaves the template scheduler untouched."""
    scheduler = make_scheduler()
    assert stock_timesteps(scheduler, FLUX, 50, 128, 128) == reference_schedule(50, 1.15)[0]
    assert stock_timesteps(scheduler, FLUX, 25, 64, 64) == reference_schedule(25, 0.63)[0]
    assert stock_timesteps(scheduler, FLUX, 20, 96, 64) == reference_schedule(20, reference_mu(96, 64))[0]
    assert getattr(scheduler, "num_inference_steps", None) is None


# --------------------------------------------------------------------------------------------------------------
# Image-to-image: `strength`
# --------------------------------------------------------------------------------------------------------------


def stock_img2img_timesteps(pipeline_class, scheduler, num_steps, strength, **schedule) -> list[float]:
    """The timesteps diffusers' own img2img `get_timesteps` keeps of a fresh `num_steps`-step schedule (set with
    `schedule`, the scheduler's default one without)."""
    scheduler.set_timesteps(**(schedule or {"num_inference_steps": num_steps}))
    timesteps, _ = pipeline_class.get_timesteps(types.SimpleNamespace(scheduler=scheduler), num_steps, strength, "cpu")
    return [float(t) for t in timesteps]


def stage_img2img_timesteps(pipeline_class, scheduler, stage, strength) -> list[float]:
    """What diffusers' img2img `get_timesteps` keeps for `strength` of a stage's own full schedule (1.0: all of it)."""
    fresh = type(scheduler).from_config(scheduler.config)
    return stock_img2img_timesteps(pipeline_class, fresh, stage.num_steps, strength, **stage.scheduler_kwargs)


def noise_to_signal(scheduler, facts, timestep) -> float:
    """Noise over image in a latent noised to `timestep`, from the scheduler's own tables: flow models mix
    (1 - sigma) x + sigma noise with sigma = t / 1000 (FlowMatchEulerDiscreteScheduler's timesteps are sigmas *
    1000); diffusion models sqrt(alpha_bar_t) x + sqrt(1 - alpha_bar_t) noise."""
    if facts.flow:
        sigma = timestep / 1000
        return math.inf if sigma >= 1 else sigma / (1 - sigma)
    alpha_bar = float(scheduler.alphas_cumprod[int(timestep)])
    return math.sqrt((1 - alpha_bar) / alpha_bar)


STRENGTH_PLANS = st.tuples(
    st.floats(0.05, 1.0),  # strength
    st.integers(4, 50),  # steps
    st.sampled_from([0.5, 0.667, 0.75, 0.9]),  # start_sigma
    st.booleans(),  # shorten
)


def strength_plan(facts, scheduler, strength, steps, start_sigma, shorten):
    return plan_stages(
        512,
        512,
        steps,
        scheduler=scheduler,
        facts=facts,
        vae_scale_factor=8,
        start_sigma=start_sigma,
        min_resolution=128,
        shorten_intermediate_steps=shorten,
        base_height=512,
        base_width=512,
        strength=strength,
    )


STRENGTH_FAMILIES = pytest.mark.parametrize(
    ("facts", "new_scheduler", "pipeline_class"),
    [
        (FLUX, make_scheduler, FluxImg2ImgPipeline),
        (SD, lambda: DDIMScheduler.from_config(SD_SCHEDULER_CONFIG), StableDiffusionImg2ImgPipeline),
        (
            SD,
            lambda: PNDMScheduler.from_config(SD_SCHEDULER_CONFIG, skip_prk_steps=True),
            StableDiffusionImg2ImgPipeline,
        ),
    ],
    ids=["flow", "ddim", "pndm"],
)


def _strength_plan_and_stock_start(facts, new_scheduler, pipeline_class, drawn):
    """The plan for `drawn` and the noise-to-signal ratio where the stock img2img pipeline starts the target size's
    schedule for the strength; None where lssgen refuses the call (after checking the error names the cause)."""
    strength, steps, start_sigma, shorten = drawn
    scheduler = new_scheduler()
    reference = strength_plan(facts, scheduler, 1.0, steps, start_sigma, shorten)
    stock = stage_img2img_timesteps(pipeline_class, scheduler, reference.stages[-1], strength)
    if not stock:
        with pytest.raises(ValueError, match="`strength`=.* leaves no step .* at the target size"):
            strength_plan(facts, scheduler, strength, steps, start_sigma, shorten)
        return None
    try:
        plan = strength_plan(facts, scheduler, strength, steps, start_sigma, shorten)
    except ValueError as error:
        assert "`start_sigma`" in str(error) and f"strength={strength}" in str(error)  # a later stage kept no step
        return None
    # Strength 1.0 is text-to-image: pure noise (SD's stock img2img would noise the image to its first timestep).
    return scheduler, reference, plan, math.inf if strength == 1.0 else noise_to_signal(scheduler, facts, stock[0])


@STRENGTH_FAMILIES
@given(drawn=STRENGTH_PLANS)
def test_the_first_stage_starts_where_it_holds_the_stock_starts_noise_at_its_size(
    facts, new_scheduler, pipeline_class, drawn
):
    """The first stage, f times smaller per side than the target, runs the tail of its own full schedule from the
    first timestep whose noise-to-signal ratio is at most 1/f of the stock img2img call's start at the target size
    (its `get_timesteps`, run here on the target's schedule), else its last timestep; a strength the stock call
    keeps no step of is a ValueError naming `strength`."""
    found = _strength_plan_and_stock_start(facts, new_scheduler, pipeline_class, drawn)
    if found is None:
        return
    scheduler, reference, plan, stock_level = found
    bound = stock_level / 2 ** (len(plan.stages) - 1) * (1 + 1e-6)
    full = stage_img2img_timesteps(pipeline_class, scheduler, reference.stages[0], 1.0)
    within = [i for i, t in enumerate(full) if noise_to_signal(scheduler, facts, t) <= bound]
    assert list(plan.stages[0].timesteps) == full[within[0] if within else len(full) - 1 :]


@STRENGTH_FAMILIES
@given(drawn=STRENGTH_PLANS)
def test_no_stage_starts_with_more_noise_than_the_stock_start_at_its_size(facts, new_scheduler, pipeline_class, drawn):
    """By noise level, not step index: every stage starts from at most the stock call's noise-to-signal ratio
    divided by how many times smaller it is per side (the target: the stock start itself), unless its schedule has
    no step that low and it runs its last step alone; with strength 1.0 the plan is the text-to-image plan."""
    found = _strength_plan_and_stock_start(facts, new_scheduler, pipeline_class, drawn)
    if found is None:
        return
    scheduler, reference, plan, stock_level = found
    for stage in plan.stages:
        bound = stock_level / 2 ** (len(plan.stages) - 1 - stage.index) * (1 + 1e-6)
        level = noise_to_signal(scheduler, facts, stage.timesteps[0])
        assert level <= bound or stage.num_denoiser_steps == 1, (stage.index, drawn)
    if drawn[0] == 1.0:
        assert plan == reference


def test_the_restart_is_start_sigma_times_the_stock_start():
    """Flow models: a later stage restarts from the smallest of its timesteps at or above start_sigma times the
    stock call's first timestep, as text-to-image restarts at start_sigma times pure noise (worked example, 28
    steps, three stages, where no later stage meets the bound)."""
    scheduler = make_scheduler()
    plan = strength_plan(FLUX, scheduler, 0.6, 28, 0.75, False)
    reference = strength_plan(FLUX, scheduler, 1.0, 28, 0.75, False)
    stock = stage_img2img_timesteps(FluxImg2ImgPipeline, scheduler, reference.stages[-1], 0.6)
    for stage, full in zip(plan.stages[1:], reference.stages[1:]):
        schedule = stage_img2img_timesteps(FluxImg2ImgPipeline, scheduler, full, 1.0)
        assert stage.timesteps[0] == min(t for t in schedule if t >= 0.75 * stock[0])
    assert plan.stages[-1].timesteps[0] < stock[0] < 1000


def test_strength_starts_the_first_flow_stage_at_the_stock_start_matched_to_its_size():
    """Image-to-image at strength 0.6, 1024 px, 50 steps: FluxImg2ImgPipeline skips int(50 - 30) = 20 steps of the
    target's schedule (mu 1.15), starting at sigma 0.825702, noise/image = 4.7373. The 512 px stage, half the size
    per side, starts at its first sigma with at most half that ratio, 2.3686 (sigma 0.703148): of its 25-step
    schedule (mu 0.63), index 11 is 0.704987, index 12 0.670411. The target restarts at its smallest timestep
    >= 0.75 * 825.70 = 619.28: index 33 (0.619330)."""
    p = plan(1024, 1024, 50, strength=0.6)
    first, later = p.stages
    assert [s.begin_index for s in p.stages] == [12, 33]
    assert first.first_sigma == pytest.approx(0.670411, abs=1e-5)
    assert later.first_sigma == pytest.approx(0.619330, abs=1e-5)
    assert [s.num_denoiser_steps for s in p.stages] == [13, 17]
    assert first.timesteps == tuple(reference_schedule(25, 0.63)[0][12:])
    assert later.timesteps == tuple(reference_schedule(50, 1.15)[0][33:])


def test_strength_one_is_the_text_to_image_plan():
    """strength 1.0 (the default) starts every first stage at pure noise: the text-to-image plan."""
    assert plan(1024, 1024, 50, min_resolution=256, strength=1.0) == plan(1024, 1024, 50, min_resolution=256)
    assert plan(1024, 1024, 50, min_resolution=256, strength=1).stages[1].begin_index == 9


def test_each_stage_is_bounded_at_its_own_size_and_a_coarse_schedule_runs_its_last_step():
    """Unshifted 4-step sigmas [1, .75, .5, .25] in all three stages (256, 512, 1024 px), strength 0.5: the stock
    call starts at sigma .5, noise/image 1. The 512 px stage may start at 1/2 (sigma 1/3): its restart, the
    smallest timestep >= 0.75 * 500, is 500, over that bound, so it restarts at 250. The 256 px stage may start at
    1/4 (sigma 0.2): no step is that low, so it runs its last one, 250. The target restarts at 500, the stock start
    itself: more noise than the smaller stages had, as much as the stock call."""
    p = plan_stages(
        1024,
        1024,
        4,
        scheduler=unshifted_scheduler(),
        facts=FLUX,
        vae_scale_factor=VAE_SCALE,
        strength=0.5,
        min_resolution=256,
        shorten_intermediate_steps=False,
    )
    assert [s.begin_index for s in p.stages] == [3, 3, 2]
    assert [s.timesteps for s in p.stages] == [(250.0,), (250.0,), (500.0, 250.0)]


@pytest.mark.parametrize(("scheduler_class", "begins"), [(DDIMScheduler, [31, 28]), (HeunDiscreteScheduler, [62, 56])])
@pytest.mark.parametrize("strength", [0.6, 0.63, 0.9])
def test_diffusion_strength_by_noise_level(scheduler_class, begins, strength):
    """Diffusion families, 50 steps unshortened: the 512 px stage starts at the first of its timesteps whose
    sqrt((1 - alpha_bar) / alpha_bar) is at most half the stock call's start (what StableDiffusionImg2ImgPipeline
    keeps of the target's schedule for the strength); the target keeps what that pipeline keeps for start_sigma *
    strength (second-order Heun included). At strength 0.6: DDIM begins at 31 and 28, Heun at 62 and 56."""
    facts, scheduler = sd_facts_and_scheduler(scheduler_class)
    p = plan_stages(
        1024,
        1024,
        50,
        scheduler=scheduler,
        facts=facts,
        vae_scale_factor=8,
        strength=strength,
        min_resolution=512,
        shorten_intermediate_steps=False,
    )
    first, later = p.stages
    stock = stock_img2img_timesteps(
        StableDiffusionImg2ImgPipeline, scheduler_class.from_config(scheduler.config), 50, strength
    )
    bound = noise_to_signal(scheduler, facts, stock[0]) / 2
    full = stock_img2img_timesteps(
        StableDiffusionImg2ImgPipeline, scheduler_class.from_config(scheduler.config), 50, 1.0
    )
    starts = [i for i, t in enumerate(full) if noise_to_signal(scheduler, facts, t) <= bound]
    starts = [i for i in starts if i % scheduler.order == 0]
    assert first.timesteps == tuple(full[starts[0] :])
    assert later.timesteps == tuple(
        stock_img2img_timesteps(
            StableDiffusionImg2ImgPipeline, scheduler_class.from_config(scheduler.config), 50, 0.75 * strength
        )
    )
    if strength == 0.6:
        assert [s.begin_index for s in p.stages] == begins


def test_a_later_diffusion_stage_left_no_step_by_the_strength_is_refused():
    """DDPM, 4 steps, strength 0.3: the stock call keeps int(1.2) = 1 step; the target stage would keep
    int(4 * 0.75 * 0.3) = 0: a clear error naming start_sigma, the stage, its size and the strength."""
    from diffusers import DDPMScheduler

    with pytest.raises(ValueError) as error:
        plan_stages(
            1024,
            1024,
            4,
            scheduler=DDPMScheduler(),
            facts=SD,
            vae_scale_factor=8,
            strength=0.3,
            min_resolution=512,
            shorten_intermediate_steps=False,
        )
    assert str(error.value) == (
        "`start_sigma`=0.75 leaves stage 2 (1024x1024) no step of its 4 (with strength=0.3); raise `start_sigma` or "
        "`num_inference_steps`."
    )


def test_a_strength_the_stock_call_keeps_no_step_of_is_refused():
    """DDIM keeps int(50 * 0.01) = 0 steps of the target's schedule: the stock pipeline refuses it, and so does the
    plan, naming strength."""
    facts, scheduler = sd_facts_and_scheduler(DDIMScheduler)
    with pytest.raises(ValueError) as error:
        plan_stages(
            1024, 1024, 50, scheduler=scheduler, facts=facts, vae_scale_factor=8, strength=0.01, min_resolution=512
        )
    assert str(error.value) == (
        "`strength`=0.01 leaves no step of the 50-step schedule at the target size (the stock pipeline refuses it "
        "too); raise `strength` or `num_inference_steps`."
    )


@pytest.mark.parametrize(
    ("strength", "error", "message"),
    [
        (0.0, ValueError, "`strength` must be in (0, 1] for a multi-resolution plan, got 0.0."),
        (1.5, ValueError, "`strength` must be in (0, 1] for a multi-resolution plan, got 1.5."),
        (-0.2, ValueError, "`strength` must be in (0, 1] for a multi-resolution plan, got -0.2."),
        ("0.5", TypeError, "`strength` must be a number, got str '0.5'."),
        (True, TypeError, "`strength` must be a number, got bool True."),
    ],
)
def test_invalid_strength_is_refused(strength, error, message):
    """A strength outside (0, 1] or not a number is refused, naming it."""
    with pytest.raises(error) as raised:
        plan(1024, 1024, 50, strength=strength)
    assert str(raised.value) == message
