"""A quiet console: the commands, and loading our model folders, print nothing a user cannot act on (issue #23).

The demo runs in a subprocess, as a user runs it, and every line it writes is checked: stdout holds only the demo's
own report, stderr nothing but progress bars.
"""

import importlib.util
import logging
import re
import subprocess
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline, FluxPipeline

import lssgen.pipelines
from lssgen.autoencoders.flux2 import TAEF2_ENV, TinyFlux2Autoencoder, find_taef2
from lssgen.scenes.denoiser import SceneDenoiser, scene_unet_config
from lssgen.scenes.model import build_pipeline

REPO = Path(__file__).resolve().parents[1]

# What `lssgen demo` itself prints (lssgen/cli/demo.py and `StagePlan.describe`); any other stdout line is noise.
DEMO_LINES = [
    r"lssgen demo: .+",
    r"The images are noise; the demo shows .+",
    r"stage +image +latent +steps +timesteps +start sigma",
    r"\d+/\d+ +\d+x\d+ +\d+x\d+ +\d+( of \d+)? +[\d.]+ -> [\d.]+ +[\d.]+",
    r"denoiser steps in all: \d+",
    r"scaling between stages: .+",
    r"baseline \(stock pipeline, \d+ steps at \d+x\d+\): [\d.]+ s",
    r"lssgen +\(same call, start_sigma=[\d.]+\): +[\d.]+ s",
    r"speed-up: [\d.]+x \(.+\)",
    r"images: .+demo\.png .+",
]
# A tqdm bar as it reaches a pipe: `\r`-separated redraws, `ESC[A` to climb to an outer bar, each redraw
# `description: NN%|bar| n/total [times]`. Whatever follows a redraw on the same line is not part of it.
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
TQDM = re.compile(r"^[^|\n]*\d+%\|[^|]*\| *[\d.?]+[kMG]?/[\d.?]+[kMG]? \[[^\]]*\]")


def noise_in_stderr(stderr: str) -> list[str]:
    """The parts of `stderr` that are not progress bars."""
    parts = (TQDM.sub("", part).strip() for part in re.split(r"[\r\n]", ANSI.sub("", stderr)))
    return [part for part in parts if part]


def noise_in_stdout(stdout: str) -> list[str]:
    """The lines of `stdout` that are not the demo's own output."""
    return [line for line in stdout.splitlines() if not any(re.fullmatch(p, line) for p in DEMO_LINES)]


def taef2_found() -> bool:
    try:
        find_taef2()
    except FileNotFoundError:
        return False
    return True


def run_demo(tmp_path: Path, *options: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "lssgen", "demo", *options, "--out-dir", str(tmp_path / "demo")]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stderr[-3000:]}"
    return result


def assert_quiet(result: subprocess.CompletedProcess) -> None:
    assert noise_in_stdout(result.stdout) == [], result.stdout
    assert noise_in_stderr(result.stderr) == [], result.stderr
    assert "speed-up:" in result.stdout  # the demo did run to the end


def test_the_noise_detectors_see_noise_glued_to_a_progress_bar():
    # Seen in `lssgen demo`: diffusers' warning written right after a redraw of its loading bar, on the same line.
    stderr = (
        "\rLoading pipeline components...:   0%|          | 0/5 [00:00<?, ?it/s]\x1b[A"
        "\rLoading pipeline components...:  20%|██        | 1/5 [00:00<00:00,  5.58it/s]There are modules in X\n"
        "\rLoading weights: 100%|██████████| 310/310 [00:00<00:00, 6513.58it/s]\n"
    )
    assert noise_in_stderr(stderr) == ["There are modules in X"]
    assert noise_in_stdout("speed-up: 1.50x (median of 2 alternating runs, cpu, float32)\nCouldn't connect") == [
        "Couldn't connect"
    ]


def test_random_weight_demo_prints_only_its_report(tmp_path):
    # 8 steps at 256 px over two stages (128 and 256 px): seconds, and no stage restarting from pure noise.
    result = run_demo(
        tmp_path, "--random-weights", "--height", "256", "--width", "256", "--steps", "8", "--min-resolution", "128"
    )
    assert_quiet(result)


@pytest.mark.skipif(not taef2_found(), reason="the scene model's VAE needs taef2 (../shared/data/taef2)")
def test_scene_model_demo_prints_only_its_report(tmp_path):
    # One prompt (the demo's fewest) at 128 px, two stages of the shipped scene model, 4 steps.
    result = run_demo(tmp_path, "--prompt", "a red circle", "--height", "128", "--width", "128", "--steps", "4")
    assert_quiet(result)


@contextmanager
def captured_warnings():
    """Records of diffusers' and transformers' loggers at WARNING and above, and Python warnings, while inside."""
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(f"{record.name}: {record.getMessage()}")

    handler = Collect(logging.WARNING)
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield records
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    records.extend(f"{w.category.__name__}: {w.message}" for w in caught)


@pytest.fixture
def scene_folder(tmp_path, monkeypatch):
    """A scene-model folder as `lssgen.scenes.model` saves one: a VAE whose weights come from a taef2 folder (here a
    random one, so the test needs no download), found through `$LSSGEN_TAEF2`."""
    taef2 = tmp_path / "taef2"
    taef2.mkdir()
    random_vae = TinyFlux2Autoencoder()
    torch.save(random_vae.encoder.state_dict(), taef2 / "taef2_encoder.pth")
    torch.save(random_vae.decoder.state_dict(), taef2 / "taef2_decoder.pth")
    monkeypatch.setenv(TAEF2_ENV, str(taef2))
    folder = tmp_path / "scene-model"
    build_pipeline(TinyFlux2Autoencoder.from_taesd_folder(taef2), seed=0, channels=(8, 16)).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_stock_loader_loads_a_scene_model_folder_without_warnings(scene_folder, dtype):
    with captured_warnings() as records:
        pipe = DiffusionPipeline.from_pretrained(scene_folder, dtype=dtype)
    assert records == []
    assert isinstance(pipe.vae, TinyFlux2Autoencoder) and isinstance(pipe.transformer, SceneDenoiser)
    assert pipe.vae.dtype == dtype and pipe.transformer.dtype == dtype  # the dtype still reaches our components


@pytest.mark.skipif(not taef2_found(), reason="the shipped scene model's VAE needs taef2 (../shared/data/taef2)")
def test_stock_loader_loads_the_shipped_scene_model_without_warnings():
    with captured_warnings() as records:
        pipe = DiffusionPipeline.from_pretrained(REPO / "weights" / "scene-t2i", dtype=torch.float32)
    assert records == []
    assert isinstance(pipe.vae, TinyFlux2Autoencoder) and isinstance(pipe.transformer, SceneDenoiser)


def test_a_drop_in_still_warns_where_another_class_is_expected(tiny_flux_dir):
    # SceneDenoiser stands in for FLUX.2's transformer only; in a FLUX.1 pipeline diffusers' warning must stay.
    denoiser = SceneDenoiser(scene_unet_config(text_width=8, channels=(8, 16), latent_channels=4))
    with captured_warnings() as records:
        FluxPipeline.from_pretrained(tiny_flux_dir, transformer=denoiser)
    assert any("Expected types for transformer" in record and "SceneDenoiser" in record for record in records)


def test_published_loader_takes_torch_dtype_without_a_deprecation_warning(tiny_flux_dir, tiny_upsampler_dir):
    with captured_warnings() as records:
        pipe = lssgen.pipelines.LSSFluxPipeline.from_pretrained(
            tiny_flux_dir, latent_upsampler=tiny_upsampler_dir, torch_dtype=torch.bfloat16
        )
    assert records == []
    assert pipe.transformer.dtype == torch.bfloat16 and pipe._lssgen.upsampler.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="both `dtype` and `torch_dtype`"):
        lssgen.pipelines.LSSFluxPipeline.from_pretrained(tiny_flux_dir, torch_dtype=torch.float32, dtype=torch.float32)


TORCHVISION_NOTICE = "requires torchvision (not installed)"


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="no notice: torchvision is installed")
@pytest.mark.parametrize("quiet", [False, True], ids=["plain", "quiet_console"])
def test_quiet_console_drops_only_the_torchvision_notice(quiet):
    # FluxPipeline's module imports CLIPImageProcessor, which transformers answers with the notice when torchvision
    # is missing; the plain run shows the notice is really there to drop, the other that nothing else is dropped.
    script = (
        "import logging\n"
        + ("from lssgen.console import quiet_console; quiet_console()\n" if quiet else "")
        + "from diffusers import FluxPipeline\n"
        + "logging.getLogger('transformers.utils.import_utils').warning('another notice')\n"
    )
    stderr = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stderr
    assert "another notice" in stderr
    assert (TORCHVISION_NOTICE in stderr) is not quiet, stderr
