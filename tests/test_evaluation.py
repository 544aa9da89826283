"""Offline image metrics and `lssgen eval-upsampler` on a tiny random-weight VAE."""

import json
import logging
import math
import os
import subprocess

import numpy as np
import pytest
import torch
from console_script import LSSGEN
from PIL import Image

from lssgen import LatentUpsampler
from lssgen.cli import main
from lssgen.evaluation.metrics import MS_SSIM_WEIGHTS, SSIM_BATCH, ms_ssim, ms_ssim_scales, psnr, ssim
from lssgen.evaluation.upsampler import (
    BICUBIC,
    CEILING,
    LABEL_HEIGHT,
    LEARNED,
    PIXEL,
    _method_functions,
    evaluate_upsampler,
    write_report,
)
from lssgen.latents import LatentNormalization
from lssgen.tiny.flux import build_tiny_vae

RESOLUTION = 64


pytestmark = pytest.mark.usefixtures("one_thread")


def images(seed=0, shape=(2, 3, 48, 48)):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def noisy(x, scale, seed=1):
    return (x + scale * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))).clamp(0, 1)


# --- metrics ---------------------------------------------------------------------------------------------------


def test_psnr_known_values():
    x = images()
    assert torch.isinf(psnr(x, x)).all()
    y = torch.full_like(x, 0.5)
    torch.testing.assert_close(psnr(y, y + 0.1), torch.full((2,), 20.0))  # MSE 0.01 → 20 dB


def test_ssim_identity_noise_and_symmetry():
    x = images()
    torch.testing.assert_close(ssim(x, x), torch.ones(2))
    slightly, very = ssim(x, noisy(x, 0.05)), ssim(x, noisy(x, 0.3))
    assert (very < slightly).all() and (slightly < 1).all()
    torch.testing.assert_close(ssim(x, very_noisy := noisy(x, 0.3)), ssim(very_noisy, x))


def test_ssim_and_ms_ssim_of_a_batch_are_each_images_own_in_batches_of_eight():
    # A batch larger than SSIM_BATCH goes to torchmetrics in parts: each image's value is the one it has alone.
    x = torch.rand(SSIM_BATCH + 3, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    y = noisy(x, 0.1)
    for metric in (ssim, ms_ssim):
        whole = metric(x, y)
        assert whole.shape == (len(x),)
        alone = torch.cat([metric(x[i : i + 1], y[i : i + 1]) for i in range(len(x))])
        torch.testing.assert_close(whole, alone, rtol=0, atol=1e-6)


def test_ssim_of_constant_images_is_the_luminance_term():
    a, b, c1 = 0.3, 0.7, 0.01**2
    # float64: in float32 a flat image's variance, E[x^2] - E[x]^2, keeps a rounding error of ~1e-7 that moves
    # this (worst) case by 3e-4; on photos float32 stays within 5e-5 (the scikit-image test below).
    x, y = torch.full((1, 3, 16, 16), a, dtype=torch.float64), torch.full((1, 3, 16, 16), b, dtype=torch.float64)
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    assert ssim(x, y).item() == pytest.approx(expected, rel=1e-6)


def test_ms_ssim_identity_noise_symmetry_and_scales():
    x = images(shape=(2, 3, 180, 180))
    assert ms_ssim_scales(180, 180) == 5 and ms_ssim_scales(64, 64) == 3 and ms_ssim_scales(10, 64) == 0
    torch.testing.assert_close(ms_ssim(x, x), torch.ones(2))
    y = noisy(x, 0.2)
    score = ms_ssim(x, y)
    assert ((score > 0) & (score < 1)).all()
    torch.testing.assert_close(score, ms_ssim(y, x))
    small = images(shape=(1, 3, 40, 40))  # 2 scales with renormalised weights
    assert 0 < ms_ssim(small, noisy(small, 0.2)).item() < 1
    tiny = images(shape=(1, 3, 16, 16))  # 1 scale: its renormalised weight is 1, so MS-SSIM is plain SSIM
    torch.testing.assert_close(ms_ssim(tiny, noisy(tiny, 0.2)), ssim(tiny, noisy(tiny, 0.2)))
    with pytest.raises(ValueError, match="at least 11x11"):
        ms_ssim(x[..., :8, :8], y[..., :8, :8])


# Cross-check against scikit-image on its bundled photos (a test dependency), cut to `side` px and degraded like
# an x2 method's output: nearest down, bicubic up, a little noise.
PHOTOS = [("astronaut", 192), ("coffee", 96), ("chelsea", 48)]


def _skimage_ssim(x: np.ndarray, y: np.ndarray, **extra) -> float:
    from skimage.metrics import structural_similarity

    return structural_similarity(
        x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1, channel_axis=-1, **extra
    )


def _skimage_ms_ssim(x: np.ndarray, y: np.ndarray, scales: int) -> float:
    """Wang et al. 2003 from scikit-image's SSIM, which has no MS-SSIM: at each finer scale the contrast-structure
    term (skimage's SSIM with K1 so large that the luminance term is 1 within 1e-8), the SSIM at the coarsest,
    2x2 means in between."""
    weights = np.array(MS_SSIM_WEIGHTS[:scales]) / sum(MS_SSIM_WEIGHTS[:scales])
    result = 1.0
    for scale, weight in enumerate(weights):
        coarsest = scale == scales - 1
        result *= max(_skimage_ssim(x, y) if coarsest else _skimage_ssim(x, y, K1=1e4), 0) ** weight
        h, w = x.shape[0] // 2, x.shape[1] // 2
        x, y = (a[: 2 * h, : 2 * w].reshape(h, 2, w, 2, 3).mean((1, 3)) for a in (x, y))
    return result


@pytest.mark.parametrize("name, side", PHOTOS)
def test_metrics_match_scikit_image_on_photos(name, side):
    skimage = pytest.importorskip("skimage")
    from skimage.metrics import peak_signal_noise_ratio
    from skimage.transform import resize

    photo = getattr(skimage.data, name)() / 255.0
    top, left = (photo.shape[0] - side) // 2, (photo.shape[1] - side) // 2
    x = photo[top : top + side, left : left + side]
    y = resize(x[::2, ::2], x.shape, order=3)
    y = np.clip(y + np.random.default_rng(0).normal(0, 0.02, y.shape), 0, 1)
    tx, ty = (torch.from_numpy(a).permute(2, 0, 1)[None].float() for a in (x, y))
    # float32 here against scikit-image's float64: PSNR to 1e-4 dB, SSIM and MS-SSIM to 5e-5.
    assert psnr(ty, tx).item() == pytest.approx(peak_signal_noise_ratio(x, y, data_range=1), abs=1e-4)
    assert ssim(ty, tx).item() == pytest.approx(_skimage_ssim(x, y), abs=5e-5)
    scales = ms_ssim_scales(side, side)
    assert scales == {192: 5, 96: 4, 48: 3}[side]
    assert ms_ssim(ty, tx).item() == pytest.approx(_skimage_ms_ssim(x, y, scales), abs=5e-5)


def test_ms_ssim_agrees_with_torchmetrics_where_it_has_five_scales():
    # torchmetrics' own MS-SSIM differs only in averaging the coarsest scale (12 px here) over its reflect-padded
    # border too: 9e-4 apart on these noise images, 1e-4 on 176-256 px photos.
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

    x = images(shape=(2, 3, 192, 192))
    y = noisy(x, 0.1)
    expected = multiscale_structural_similarity_index_measure(y, x, data_range=1.0, reduction="none")
    torch.testing.assert_close(ms_ssim(y, x), expected, atol=2e-3, rtol=0)


# --- evaluate_upsampler ----------------------------------------------------------------------------------------


def tiny_upsampler(channels):
    torch.manual_seed(0)
    return LatentUpsampler(in_channels=channels, out_channels=channels, block_out_channels=(16, 16), norm_num_groups=8)


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return build_tiny_vae(4, scaling_factor=0.18215).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("held-out")
    rng = np.random.default_rng(0)
    for i, size in enumerate([(80, 96), (64, 64), (100, 70)]):
        (folder / f"sub{i % 2}").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / f"sub{i % 2}" / f"{i}.png")
    return folder


def test_evaluate_reports_every_method_with_finite_numbers(vae, image_dir, tmp_path):
    report = evaluate_upsampler(vae, image_dir, upsampler=tiny_upsampler(4), resolution=RESOLUTION, repeats=2, grid=2)
    assert report.methods == [LEARNED, BICUBIC, PIXEL, CEILING]
    assert len(report.images) == len(report.per_image) == 3
    for name in (LEARNED, BICUBIC, PIXEL):
        assert all(math.isfinite(v) for v in report.mean[name].values()), name
        assert report.latency_ms[name] > 0
    assert report.mean[CEILING]["latent_mse"] is None and math.isfinite(report.mean[CEILING]["psnr_vs_image"])

    out = write_report(report, tmp_path / "report")
    saved = json.loads((out / "report.json").read_text())
    assert saved["image_count"] == 3 and set(saved["mean"]) == set(report.methods)
    table = [line for line in (out / "report.md").read_text().splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(report.methods)  # header + one row per method
    columns = 6  # input, learned, bicubic, pixel, VAE round trip, original
    assert Image.open(out / "grid.png").size == (columns * RESOLUTION, LABEL_HEIGHT + 2 * RESOLUTION)


def test_crops_per_image_adds_seeded_random_crops(vae, image_dir):
    one = evaluate_upsampler(vae, image_dir, resolution=RESOLUTION, repeats=1, grid=0)
    three = evaluate_upsampler(vae, image_dir, resolution=RESOLUTION, crops_per_image=3, repeats=1, grid=2)
    # The grid shows one row per image (its centre crop), not the first crops of the first image.
    from lssgen.training.data import center_crop, find_images, load_image, to_pil

    original_column = (len(three.methods) + 1) * RESOLUTION  # input, methods, VAE round trip, original
    for row, path in enumerate(find_images(image_dir)[:2]):
        top = LABEL_HEIGHT + row * RESOLUTION
        tile = three.grid.crop((original_column, top, original_column + RESOLUTION, top + RESOLUTION))
        assert np.array_equal(np.asarray(tile), np.asarray(to_pil(center_crop(load_image(path), RESOLUTION))))
    again = evaluate_upsampler(vae, image_dir, resolution=RESOLUTION, crops_per_image=3, repeats=1, grid=0)
    assert len(three.per_image) == len(three.images) == 3 * len(one.images)
    # The first crop of each image is its centre crop; the others are random but the same every run.
    assert [three.per_image[3 * i] for i in range(len(one.images))] == one.per_image
    assert three.per_image == again.per_image and three.per_image[1] != three.per_image[0]
    assert three.settings["crops_per_image"] == 3 and "(crop 2)" in three.images[2]
    with pytest.raises(ValueError, match="--crops-per-image 0"):
        evaluate_upsampler(vae, image_dir, resolution=RESOLUTION, crops_per_image=0)


def test_pixel_round_trip_encodes_once_more_than_bicubic(vae, image_dir, monkeypatch):
    calls = []
    encode = vae.encode
    monkeypatch.setattr(vae, "encode", lambda *a, **k: calls.append(1) or encode(*a, **k))
    methods = _method_functions(vae, LatentNormalization.from_vae_config(vae.config), None)
    z_low = torch.randn(1, 4, 4, 4)
    methods[BICUBIC](z_low)
    assert len(calls) == 0
    methods[PIXEL](z_low)
    assert len(calls) == 1

    calls.clear()
    repeats = 2
    evaluate_upsampler(vae, image_dir, resolution=RESOLUTION, repeats=repeats, grid=0)
    # Per image: the full and the low-res image, plus the pixel round trip; latency adds a warm-up and the repeats.
    assert len(calls) == 3 * 3 + (1 + repeats)


def test_images_smaller_than_the_resolution_are_evaluated_at_their_own_size(vae, tmp_path, caplog):
    from lssgen.training.data import load_image, to_pil

    folder = tmp_path / "small"
    folder.mkdir()
    rng = np.random.default_rng(0)
    # Short sides 40 and 50 (→ 32 and 48 px, multiples of 16 for the x8 VAE) and one image large enough.
    for name, size in {"a": (40, 40), "b": (90, 50), "c": (96, 80)}.items():
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    with caplog.at_level(logging.WARNING, logger="lssgen.evaluation.upsampler"):
        report = evaluate_upsampler(vae, folder, resolution=RESOLUTION, repeats=1, grid=3, progress=False)
    assert report.crop_sizes == [32, 48, 64]
    assert "2 of 3 images are smaller than 64 px: at their own size (48 px, 32 px)" in caplog.text
    assert "multiple of 16 px, not scaled up. Pass --resolution 32" in caplog.text
    # Not scaled up: the grid's "original" column holds each image's own centre pixels.
    original_column = (len(report.methods) + 1) * RESOLUTION
    top = LABEL_HEIGHT
    for path, side in zip(sorted(folder.iterdir()), report.crop_sizes):
        image = load_image(path)
        y, x = (image.shape[1] - side) // 2, (image.shape[2] - side) // 2
        tile = report.grid.crop((original_column, top, original_column + side, top + side))
        assert np.array_equal(np.asarray(tile), np.asarray(to_pil(image[:, y : y + side, x : x + side])))
        top += side
    assert report.grid.height == top
    out = write_report(report, tmp_path / "report")
    assert json.loads((out / "report.json").read_text())["crop_sizes"] == [32, 48, 64]
    markdown = (out / "report.md").read_text()
    assert "(2 of 3 images are smaller than 64 px: at their own size (48 px, 32 px))" in markdown
    assert "MS-SSIM scales (too small for 5; weights renormalised): 2 at 32 px, 3 at 48 px, 3 at 64 px." in markdown


def test_progress_bars_over_crops_and_timed_calls_unless_turned_off(vae, image_dir, capsys):
    evaluate_upsampler(vae, image_dir, resolution=RESOLUTION, limit=2, repeats=3, grid=0)
    bars = capsys.readouterr().err
    assert "eval-upsampler: 100%" in bars and "2/2" in bars
    assert "latency: 100%" in bars and "8/8" in bars  # 2 methods x (1 warm-up + 3 timed calls)
    evaluate_upsampler(vae, image_dir, resolution=RESOLUTION, limit=2, repeats=3, grid=0, progress=False)
    assert capsys.readouterr().err == ""


def test_evaluate_rejects_bad_inputs(vae, image_dir):
    with pytest.raises(ValueError, match="multiple of 16"):
        evaluate_upsampler(vae, image_dir, resolution=72)
    with pytest.raises(ValueError, match="16 → 16 latent channels but the VAE has 4"):
        evaluate_upsampler(vae, image_dir, upsampler=tiny_upsampler(16), resolution=RESOLUTION)
    with pytest.raises(ValueError, match="No images"):
        evaluate_upsampler(vae, [], resolution=RESOLUTION)


def test_evaluate_names_an_image_too_small_for_the_vae(vae, tmp_path):
    Image.new("RGB", (40, 12)).save(tmp_path / "strip.png")
    with pytest.raises(ValueError, match=r"strip.png is 40x12 px, smaller than the 16 px this VAE needs.*Remove it"):
        evaluate_upsampler(vae, tmp_path, resolution=RESOLUTION, progress=False)


# --- the command line ------------------------------------------------------------------------------------------


def run(*args):
    command = [*LSSGEN, "eval-upsampler", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as `one_thread`, for the child process
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def saved(vae, tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights")
    vae.save_pretrained(folder / "vae")
    tiny_upsampler(4).save_pretrained(folder / "up4")
    tiny_upsampler(16).save_pretrained(folder / "up16")
    return folder


def test_cli_writes_the_report(saved, image_dir, tmp_path):
    out = tmp_path / "eval"
    common = ["--vae", saved / "vae", "--images", image_dir, "--resolution", RESOLUTION, "--device", "cpu"]
    result = run(*common, "--upsampler", saved / "up4", "--limit", 2, "--repeats", 2, "--out", out)
    assert result.returncode == 0, result.stderr
    assert "| learned upsampler |" in result.stdout
    assert "eval-upsampler: 100%" in result.stderr and "2/2" in result.stderr  # the progress bar
    assert json.loads((out / "report.json").read_text())["image_count"] == 2
    assert Image.open(out / "grid.png").size == (6 * RESOLUTION, LABEL_HEIGHT + 2 * RESOLUTION)


@pytest.mark.parametrize("case", ["empty folder", "unreadable image", "16-channel upsampler"])
def test_cli_bad_inputs_exit_2_and_write_nothing(case, saved, image_dir, tmp_path, capsys):
    # In this process (`main` is what the console script runs): a fresh interpreter per case cost ~10 s each.
    images, extra = image_dir, []
    if case == "empty folder":
        images = tmp_path / "empty"
        images.mkdir()
        expected = "no jpg/jpeg/png/webp images"
    elif case == "unreadable image":
        images = tmp_path / "broken"
        images.mkdir()
        (images / "bad.png").write_bytes(b"not a png")
        expected = "Cannot read image"
    else:
        extra, expected = ["--upsampler", saved / "up16"], "16 → 16 latent channels but the VAE has 4"
    out = tmp_path / "eval"
    common = ["--vae", saved / "vae", "--images", images, "--resolution", RESOLUTION, "--device", "cpu"]
    assert main(["eval-upsampler", *map(str, [*common, "--out", out, *extra])]) == 2
    stderr = capsys.readouterr().err
    assert "lssgen eval-upsampler: error:" in stderr and expected in stderr
    assert not out.exists()
