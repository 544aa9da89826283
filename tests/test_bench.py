"""`lssgen bench` end to end on a tiny model: report shape only, no timing assertions (timings are noise)."""

import json
import math
import subprocess

import pytest
from console_script import LSSGEN

import lssgen
from lssgen.evaluation.bench import (
    BASELINE,
    UNPATCHED,
    MethodSetting,
    Setting,
    Timing,
    busy_warning,
    default_settings,
    run_bench,
)
from lssgen.tiny import build_tiny_flux_pipeline

CALL = {"prompt": "a cat", "height": 256, "width": 256, "num_inference_steps": 4, "max_sequence_length": 32}


def test_run_bench_reports_every_setting_with_counted_denoiser_calls(tmp_path):
    pipe = build_tiny_flux_pipeline()
    # LSSGen's settings, and another method timed beside them (`--methods`).
    settings = [*default_settings(min_resolution=128), MethodSetting("refine:steps=2")]
    report = run_bench(pipe, settings, repeats=1, call_kwargs=CALL, log=lambda line: None)

    names = [result.name for result in report.results]
    assert names == [UNPATCHED, BASELINE, *(setting.name for setting in settings)]
    assert len(set(names)) == len(names)
    for result in report.results:
        assert len(result.times) == 1 and math.isfinite(result.ratio) and result.ratio > 0
        assert result.peak_memory_mib > 0
        assert result.denoiser_calls == result.planned_steps
    assert not lssgen.is_patched(pipe)  # run_bench leaves the pipe as it found it
    lssgen.patch(pipe)
    for setting in settings:  # the counts are the plan's, stage by stage
        plan = lssgen.plan_for(pipe, 256, 256, 4, **setting.options())
        assert report.result(setting.name).denoiser_calls == [s.num_denoiser_steps for s in plan.stages]
        assert len(plan.stages) == 2
    assert report.result("refine:sigma=0.12,steps=2").denoiser_calls == [4, 2]  # all steps at half size, then 2
    assert report.result(BASELINE).denoiser_calls == [4] and report.result(BASELINE).ratio == 1.0
    # Agreement with the unpatched image: the patched pipe at start_sigma=1.0 is the stock pipeline, bit for bit;
    # every lssgen setting changes the image, measurably.
    assert report.result(UNPATCHED).psnr is None and report.result(UNPATCHED).ssim is None
    assert report.result(BASELINE).psnr == math.inf and report.result(BASELINE).ssim == pytest.approx(1.0)
    for setting in settings:
        result = report.result(setting.name)
        assert math.isfinite(result.psnr) and result.psnr > 0 and -1 <= result.ssim < 0.999
    assert "| PSNR dB vs stock | SSIM vs stock |" in report.markdown()
    assert f"| {BASELINE} | " in report.markdown() and " | inf | 1.0000 | 4 | " in report.markdown()
    assert math.isfinite(report.overhead_ratio) and report.overhead_ratio > 0
    assert report.upsampler_cost["latent_shape"] == [4, 32, 32] and report.upsampler_cost["upsampler_fraction"] > 0
    assert "x2 to a 4x32x32 latent: learned upsampler" in report.markdown()


def test_run_bench_on_a_video_pipeline():
    # Before: Wan's output has `frames`, not `images`, and `upsampler_cost` assumed a 4-D image latent and
    # `pipe.vae_scale_factor` (Wan has a spatial and a temporal one): `lssgen bench --model` failed on a Wan folder.
    from lssgen.tiny import build_tiny_wan_pipeline

    pipe = build_tiny_wan_pipeline()
    call = {"prompt": "a cat", "height": 128, "width": 96, "num_frames": 5, "num_inference_steps": 4}
    settings = [Setting(0.75, shorten_intermediate_steps=False, min_resolution=48)]
    call["max_sequence_length"] = 16
    report = run_bench(pipe, settings, repeats=1, call_kwargs=call, log=lambda line: None)
    result = report.result(settings[0].name)
    assert len(result.planned_steps) == 2  # two stages
    # Classifier-free guidance: a conditional and an unconditional denoiser call per step.
    assert result.denoiser_calls == [2 * steps for steps in result.planned_steps]
    assert report.result(BASELINE).psnr == math.inf  # the frames of the stock video, bit for bit
    assert math.isfinite(result.psnr) and -1 <= result.ssim < 0.999
    cost = report.upsampler_cost
    # One video's latent at the target size: 16 channels, 2 latent frames (of 5), 128x96 px / 8.
    assert cost["latent_shape"] == [16, 2, 16, 12]
    assert cost["upsampler_s"] > 0 and cost["pixel_round_trip_s"] > 0 and cost["upsampler_fraction"] > 0
    assert "x2 to a 16x2x16x12 latent" in report.markdown()


def test_setting_names_and_options():
    assert Setting(0.75, True, 256).options() == {
        "start_sigma": 0.75,
        "shorten_intermediate_steps": True,
        "min_resolution": 256,
    }
    assert Setting(0.667, False).name == "lssgen sigma=0.667, no shorten"


def test_bench_command_writes_json_and_markdown(tmp_path):
    out = tmp_path / "bench"
    args = ["bench", "--height", 256, "--width", 256, "--steps", 4, "--min-resolution", 128]
    args += ["--repeats", 1, "--start-sigmas", 0.75, "--out", out, "--plot", "--cache", "first-block:threshold=0.2"]
    result = subprocess.run([*LSSGEN, *map(str, args)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "RANDOM weights" in result.stdout and "overhead (patched at start_sigma=1.0 / unpatched)" in result.stdout
    data = json.loads((out / "bench.json").read_text())
    settings = ["lssgen sigma=0.75, shorten", "lssgen sigma=0.75, no shorten"]
    assert [r["name"] for r in data["results"]] == [
        UNPATCHED,
        BASELINE,
        *settings,
        "cache alone (start_sigma=1.0)",
        *(f"{name} + cache" for name in settings),
    ]
    for entry in data["results"]:
        assert entry["denoiser_calls"] == entry["planned_steps"] and entry["ratio"] > 0
    # Strict JSON: an identical image's PSNR is written "inf"; every lssgen setting's is a finite number.
    assert [(r["psnr"], r["ssim"]) for r in data["results"][:2]] == [(None, None), ("inf", pytest.approx(1.0))]
    assert all(isinstance(r["psnr"], float) and math.isfinite(r["psnr"]) for r in data["results"][2:4])
    assert all(isinstance(r["psnr"], (float, str)) and r["ssim"] is not None for r in data["results"][4:])
    assert data["cache"] == "FirstBlockCacheConfig(threshold=0.2)"
    assert "| lssgen sigma=0.75, shorten |" in (out / "bench.md").read_text()
    assert "| setting | ratio alone | ratio with the cache |" in (out / "bench.md").read_text()
    assert (out / "bench.png").stat().st_size > 0


def test_preset_refuses_cpu_without_opt_in(tmp_path):
    args = ["bench", "--preset", "flux-dev", "--device", "cpu", "--out", tmp_path]
    result = subprocess.run([*LSSGEN, *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "run it on a GPU" in result.stderr


def test_a_misspelt_method_is_an_error_before_anything_loads(tmp_path, capsys):
    from lssgen.cli import main

    assert (
        main(["bench", "--methods", "refine", "mrflow", "--model", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2
    )
    assert "Unknown `method` 'mrflow'" in capsys.readouterr().err


def test_compile_flag_is_wired():
    from lssgen.cli import build_parser

    assert build_parser().parse_args(["bench", "--compile"]).compile is True


@pytest.mark.gpu
def test_flux_dev_preset_builds_the_real_architecture_small():
    # Full FLUX.1-dev widths, one block of each kind: the preset's construction path on a GPU.
    from lssgen.evaluation.bench import build_flux_dev_pipeline, random_flux_prompt

    if not __import__("torch").cuda.is_available():
        pytest.skip("needs CUDA")
    pipe = build_flux_dev_pipeline("cuda", __import__("torch").bfloat16, num_layers=1, num_single_layers=1)
    call = {**random_flux_prompt(pipe), "height": 512, "width": 512, "num_inference_steps": 4}
    report = run_bench(pipe, [Setting(0.75, True, 256)], repeats=1, call_kwargs={**call, "guidance_scale": 3.5})
    assert report.result(BASELINE).denoiser_calls == [4]


def test_bench_with_a_cache_runs_each_setting_with_and_without_it():
    from diffusers.hooks import FirstBlockCacheConfig

    from lssgen.evaluation.bench import CACHE_ALONE, WITH_CACHE

    pipe = build_tiny_flux_pipeline()
    settings = [Setting(0.75, shorten_intermediate_steps=False, min_resolution=128)]  # several steps per stage
    # A threshold no change reaches: after each stage's first step the cached residual replaces the other blocks.
    cache = FirstBlockCacheConfig(threshold=1e9)
    report = run_bench(
        pipe, settings, repeats=1, call_kwargs=CALL, cache=cache, measure_upsampler=False, log=lambda line: None
    )
    names = [result.name for result in report.results]
    assert names == [UNPATCHED, BASELINE, settings[0].name, CACHE_ALONE, settings[0].name + WITH_CACHE]
    assert not pipe.transformer.is_cache_enabled  # each cached run disables it again
    for plain, cached in ((BASELINE, CACHE_ALONE), (settings[0].name, settings[0].name + WITH_CACHE)):
        plain, cached = report.result(plain), report.result(cached)
        assert cached.denoiser_calls == plain.denoiser_calls  # the same steps reach the denoiser...
        # ...but only each stage's first runs every block: less layer work in every stage, never none.
        assert all(0 < c < p for c, p in zip(cached.layer_calls, plain.layer_calls))
        # Reusing stale residuals changes the image: the agreement columns see it.
        assert math.isfinite(cached.psnr) and cached.psnr != plain.psnr
    markdown = report.markdown()
    assert "| setting | ratio alone | ratio with the cache |" in markdown and f"| {settings[0].name} |" in markdown
    assert "| PSNR dB alone / with the cache | SSIM alone / with the cache |" in markdown
    assert f"| {BASELINE} | " in markdown and "| inf / " in markdown


def test_bench_agreement_sees_a_cache_that_never_reuses_as_no_cache():
    from diffusers.hooks import FirstBlockCacheConfig

    from lssgen.evaluation.bench import CACHE_ALONE, WITH_CACHE

    pipe = build_tiny_flux_pipeline()
    settings = [Setting(0.75, shorten_intermediate_steps=True, min_resolution=128)]
    # Threshold 0: every step computes every block (a relative change is never below 0), so no image changes.
    report = run_bench(
        pipe,
        settings,
        repeats=1,
        call_kwargs=CALL,
        cache=FirstBlockCacheConfig(threshold=0.0),
        measure_upsampler=False,
        log=lambda line: None,
    )
    cache_alone, plain, cached = (
        report.result(n) for n in (CACHE_ALONE, settings[0].name, settings[0].name + WITH_CACHE)
    )
    assert cache_alone.psnr == math.inf and cache_alone.ssim == pytest.approx(1.0)
    assert math.isfinite(plain.psnr) and (cached.psnr, cached.ssim) == (plain.psnr, plain.ssim)
    assert cached.layer_calls == plain.layer_calls


def test_bench_with_sea_cache_caches_only_under_lssgen():
    from lssgen.caches import StageRawVision, cache_config
    from lssgen.evaluation.bench import CACHE_ALONE, WITH_CACHE

    pipe = build_tiny_flux_pipeline()
    settings = [Setting(0.75, shorten_intermediate_steps=False, min_resolution=128)]  # several steps per stage
    cache = cache_config("sea:threshold=1e9", pipe)
    assert isinstance(cache.raw_vision_callback, StageRawVision) and cache.threshold == 1e9
    report = run_bench(
        pipe, settings, repeats=1, call_kwargs=CALL, cache=cache, measure_upsampler=False, log=lambda line: None
    )
    # The stock FluxPipeline passes SeaCache no step metadata: it computes every step. Under lssgen every stage
    # skips the blocks in some of its steps.
    assert report.result(CACHE_ALONE).layer_calls == report.result(BASELINE).layer_calls
    plain, cached = report.result(settings[0].name), report.result(settings[0].name + WITH_CACHE)
    assert cached.denoiser_calls == plain.denoiser_calls
    assert all(0 < c < p for c, p in zip(cached.layer_calls, plain.layer_calls))
    assert "StageRawVision(FluxPipeline)" in report.cache


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("second-block", "unknown cache 'second-block'; choose one of first-block"),
        ("first-block:threshold", "'threshold' is not key=value with a FirstBlockCacheConfig key"),
        ("first-block:limit=3", "'limit=3' is not key=value"),
        ("mag:num_inference_steps=8", "--cache 'mag:num_inference_steps=8': .*mag_ratios"),
    ],
)
def test_cache_specs_are_checked(spec, match):
    from lssgen.caches import cache_config

    with pytest.raises(ValueError, match=match):
        cache_config(spec, pipe=None)


def test_cache_spec_values_are_python_literals():
    from lssgen.caches import cache_config

    config = cache_config("mag:mag_ratios=[1.0, 0.9, 0.8],num_inference_steps=3,threshold=0.1", pipe=None)
    assert config.mag_ratios.tolist() == pytest.approx([1.0, 0.9, 0.8]) and config.threshold == 0.1


def test_timing_reports_the_median_with_its_spread():
    assert Timing((2.0,)).describe() == "2.00 s"  # one run: no spread to report
    timing = Timing((2.2, 2.0, 3.0))
    assert timing.median == 2.2 and timing.spread == 1.5
    assert timing.describe() == "2.20 s (min–max 2.00–3.00 s, 3 runs)"
    assert Timing((0.0423, 0.05, 0.123)).describe() == "0.0500 s (min–max 0.0423–0.123 s, 3 runs)"  # 3 digits
    for times in [(), (1.0, 0.0)]:
        with pytest.raises(ValueError, match="positive durations"):
            Timing(times)


def test_busy_warning_names_the_side_whose_runs_spread_past_the_limit():
    quiet = {"stock": [2.0, 2.1, 2.05], "lssgen": [1.0, 1.2]}  # 1.05x and 1.20x: within 1.25
    assert busy_warning(quiet) is None
    assert busy_warning({"stock": [2.0], "lssgen": [1.0]}) is None  # single runs show no spread
    warning = busy_warning({"stock": [2.0, 2.1], "lssgen": [1.0, 1.3, 1.5]})  # lssgen 1.50x
    assert warning.startswith("warning: the lssgen runs differ by 1.50x (slowest / fastest; above 1.25 ")
    assert "rerun on a quiet machine" in warning
    assert busy_warning({"stock": Timing((2.0, 2.6))}).startswith("warning: the stock runs differ by 1.30x")
    assert busy_warning({"stock": [2.0, 2.6]}, limit=1.5) is None
