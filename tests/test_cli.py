"""The `lssgen` command line, run as a real installed console script."""

import shutil
import subprocess
import sys

import pytest
from PIL import Image

from lssgen.tiny import build_tiny_flux_pipeline

LSSGEN = shutil.which("lssgen") or f"{sys.executable} -m lssgen.cli"


def run(*args, cwd=None):
    command = [*LSSGEN.split(), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-flux")
    build_tiny_flux_pipeline(seed=0).save_pretrained(folder)
    return folder


def test_demo_prints_plan_and_both_timings(tmp_path):
    result = run(
        "demo", "--height", 256, "--width", 256, "--steps", 4, "--min-resolution", 128, "--out-dir", tmp_path / "demo"
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "RANDOM weights" in out
    assert "1/2    128x128" in out and "2/2    256x256" in out
    assert "baseline (stock pipeline, 4 steps at 256x256):" in out and "speed-up:" in out
    for name in ("baseline.png", "lssgen.png"):
        assert Image.open(tmp_path / "demo" / name).size == (256, 256)


def test_generate_with_a_local_checkpoint(tiny_model_dir, tmp_path):
    common = ["--model", tiny_model_dir, "--height", 256, "--width", 192, "--steps", 4, "--device", "cpu"]
    result = run("generate", *common, "--min-resolution", 64, "--out", tmp_path / "fast.png")
    assert result.returncode == 0, result.stderr
    assert "denoiser steps in all" in result.stdout and "lssgen:" in result.stdout
    assert Image.open(tmp_path / "fast.png").size == (192, 256)

    result = run("generate", *common, "--baseline", "--out", tmp_path / "stock.png")
    assert result.returncode == 0, result.stderr
    assert "baseline:" in result.stdout and "denoiser steps" not in result.stdout
    assert Image.open(tmp_path / "stock.png").size == (192, 256)


def test_generate_reports_bad_input_clearly(tiny_model_dir, tmp_path):
    result = run(
        "generate",
        "--model",
        tiny_model_dir,
        "--height",
        256,
        "--width",
        256,
        "--steps",
        2,
        "--start-sigma",
        1.5,
        "--out",
        tmp_path / "x.png",
    )
    assert result.returncode == 2
    assert "lssgen: error: `start_sigma` must be in (0, 1]" in result.stderr
    assert not (tmp_path / "x.png").exists()

    result = run("generate", "--model", tmp_path / "missing", "--out", tmp_path / "x.png")
    assert result.returncode != 0
    assert "could not load a diffusers pipeline" in result.stderr


def test_adapters_lists_installed_adapters_with_their_package():
    result = run("adapters")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["adapter", "pipelines", "kind", "steps", "guidance", "shorten", "package"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert rows["flux"] == ["FluxPipeline", "flow", "50", "3.5", "on", "lssgen"]
    assert rows["sd3"] == ["StableDiffusion3Pipeline", "flow", "40", "4.5", "on", "lssgen"]
    assert rows["sdxl"] == ["StableDiffusionXLPipeline", "diffusion", "50", "5.0", "off", "lssgen"]
    assert rows["sd"] == ["StableDiffusionPipeline", "diffusion", "50", "7.5", "off", "lssgen"]
    assert rows["cogview4"] == ["CogView4Pipeline", "flow", "50", "3.5", "on", "lssgen"]
