"""`lssgen train-upsampler`: pairs, normalisation, learning (vs bicubic), saving/loading, resume, CLI errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from console_script import LSSGEN
from diffusers.configuration_utils import FrozenDict
from PIL import Image

import lssgen
from lssgen.latents import LatentNormalization
from lssgen.tiny import build_tiny_sd_pipeline, build_tiny_vae
from lssgen.training.data import center_crop, decode, downsample_nearest, encode, find_images, load_image
from lssgen.training.upsampler import split_images, train_upsampler

SMALL = {"block_out_channels": [32, 32], "norm_num_groups": 8}


def synthetic_image(index: int, rng: np.random.Generator) -> Image.Image:
    """Smooth gradients, flat shapes and low-frequency noise: image-like, and different at every index."""
    size = int(rng.integers(96, 129))
    y, x = np.mgrid[0:size, 0:size] / size
    kind = index % 3
    if kind == 0:
        angle = rng.uniform(0, 2 * np.pi)
        ramp = np.cos(angle) * x + np.sin(angle) * y
        image = np.stack([ramp * rng.uniform(0.3, 1) + rng.uniform(0, 0.5) for _ in range(3)], -1)
    elif kind == 1:
        image = np.ones((size, size, 3)) * rng.uniform(0, 1, 3)
        for _ in range(4):
            cy, cx, r = rng.uniform(0, 1, 3) * [1, 1, 0.4]
            inside = (
                (y - cy) ** 2 + (x - cx) ** 2 < r**2 if rng.random() < 0.5 else (abs(y - cy) < r) & (abs(x - cx) < r)
            )
            image[inside] = rng.uniform(0, 1, 3)
    else:
        coarse = torch.from_numpy(rng.uniform(0, 1, (1, 3, 8, 8))).float()
        image = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[0].permute(1, 2, 0)
        image = image.numpy() + rng.normal(0, 0.03, (size, size, 3))
    return Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8))


def write_images(folder: Path, count: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for index in range(count):
        # Nested folders and all three formats; jpg/webp lossless enough for smooth content.
        sub = folder / f"set{index % 3}" / ("deep" if index % 2 else "")
        sub.mkdir(parents=True, exist_ok=True)
        suffix = (".png", ".jpg", ".webp")[index % 3]
        synthetic_image(index, rng).save(sub / f"img{index:03d}{suffix}", quality=95)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("images"), 30)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("vae")
    build_tiny_vae(4, scaling_factor=0.18215).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vae(vae_dir):
    from lssgen.training.data import load_vae

    return load_vae(str(vae_dir))


@pytest.fixture(scope="module")
def trained(vae, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "up"
    result = train_upsampler(
        vae, find_images(data), out, resolution=64, steps=200, batch_size=8, lr=3e-3, seed=0, config=SMALL,
        cache_latents=True, val_every=0, save_every=100, progress=False, log=lambda *_: None,
    )  # fmt: skip
    return result


def held_out_mse(upsampler, vae, paths) -> tuple[float, float]:
    """Latent MSE on centre crops of held-out images, computed here independently of the training code."""
    norm = LatentNormalization.from_vae_config(vae.config)
    images = torch.stack([center_crop(load_image(p), 64) for p in paths])
    low, high = encode(vae, downsample_nearest(images), norm), encode(vae, images, norm)
    with torch.no_grad():
        learned = F.mse_loss(upsampler(low), high).item()
    bicubic = F.mse_loss(F.interpolate(low, scale_factor=2, mode="bicubic"), high).item()
    return learned, bicubic


def test_training_learns_and_beats_bicubic(trained, vae, data):
    assert trained.last_loss < 0.5 * trained.first_loss
    assert trained.val_mse < 0.85 * trained.bicubic_mse
    _, val_paths = split_images(find_images(data))
    upsampler = lssgen.LatentUpsampler.from_pretrained(trained.out_dir)
    learned, bicubic = held_out_mse(upsampler, vae, val_paths)
    assert learned < 0.85 * bicubic, (learned, bicubic)  # ~0.75 with these seeds


def test_output_folder_loads_and_patches(trained):
    out = trained.out_dir
    assert {"config.json", "diffusion_pytorch_model.safetensors", "README.md", "checkpoint"} <= {
        p.name for p in out.iterdir()
    }
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".partial")]
    card = (out / "README.md").read_text()
    assert "AutoencoderKL" in card and f"{trained.val_mse:.5f}" in card and f"{trained.bicubic_mse:.5f}" in card
    assert f"{trained.val_psnr:.2f} dB" in card and f"{trained.pixel_round_trip_psnr:.2f} dB" in card
    upsampler = lssgen.LatentUpsampler.from_pretrained(out)
    assert upsampler.config.in_channels == 4 and list(upsampler.config.block_out_channels) == [32, 32]

    pipe = build_tiny_sd_pipeline()
    assert pipe.vae.config.latent_channels == 4
    pipe.set_progress_bar_config(disable=True)
    lssgen.patch(pipe, upsampler)
    image = pipe(
        "a fox", height=128, width=128, num_inference_steps=4, output_type="pt", scaling_space="learned",
        min_resolution=64,
        generator=torch.Generator().manual_seed(0),
    ).images  # fmt: skip
    assert image.shape == (1, 3, 128, 128) and torch.isfinite(image).all()


@pytest.mark.parametrize(
    "config, encode_formula",
    [
        # FLUX.1 / SD3: latents = (z - shift) * scale
        (
            {"scaling_factor": 0.3611, "shift_factor": 0.1159},
            lambda z, c: (z - c.shift_factor) * c.scaling_factor,
        ),
        # SD / SDXL: latents = z * scale
        ({"scaling_factor": 0.13025}, lambda z, c: z * c.scaling_factor),
        # Playground v2.5: latents = (z - mean) * scale / std, per channel
        (
            {"scaling_factor": 0.5, "latents_mean": [0.1, -0.2, 0.3, 0.0], "latents_std": [0.9, 1.1, 1.2, 0.8]},
            lambda z, c: (
                (z - torch.tensor(c.latents_mean).view(1, 4, 1, 1))
                * c.scaling_factor
                / torch.tensor(c.latents_std).view(1, 4, 1, 1)
            ),
        ),
    ],
    ids=["flux-sd3", "sd-sdxl", "playground"],
)
def test_normalisation_matches_pipelines(config, encode_formula):
    config = FrozenDict({"shift_factor": None, "latents_mean": None, "latents_std": None, **config})
    norm = LatentNormalization.from_vae_config(config)
    z = torch.randn(2, 4, 8, 8)
    latents = norm.from_vae(z)
    torch.testing.assert_close(latents, encode_formula(z, config))
    torch.testing.assert_close(norm.to_vae(latents), z)
    # What the stock pipelines do before `vae.decode`.
    if config.latents_mean is not None:  # StableDiffusionXLPipeline with latents_mean/std (Playground)
        mean = torch.tensor(config.latents_mean).view(1, 4, 1, 1)
        std = torch.tensor(config.latents_std).view(1, 4, 1, 1)
        decoded = latents * std / config.scaling_factor + mean
    else:  # FluxPipeline / StableDiffusion3Pipeline (shift 0 for SD / SDXL)
        decoded = latents / config.scaling_factor + (config.shift_factor or 0.0)
    torch.testing.assert_close(norm.to_vae(latents), decoded)


# --- the command line -------------------------------------------------------------------------------------


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*LSSGEN, "train-upsampler", *map(str, args)], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def small_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "config.json"
    path.write_text(json.dumps(SMALL))
    return path


def test_cli_trains_and_resumes(vae_dir, data, small_config, tmp_path):
    out = tmp_path / "runs" / "up"
    common = ["--vae", vae_dir, "--images", data, "--out", out, "--resolution", 64, "--batch-size", 4]
    first = ["--steps", 6, "--save-every", 3, "--config", small_config, "--scales", 1, 0.5, "--hflip"]
    done = run_cli(*common, *first, "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert "bicubic" in done.stdout and "trained 6 steps" in done.stdout
    card = (out / "README.md").read_text()
    assert str(vae_dir) in card and "validation MSE, learned" in card and "27 train / 3 val" in card
    assert "sizes x1, x0.5, mirrored" in card
    assert lssgen.LatentUpsampler.from_pretrained(out).config.in_channels == 4

    resumed = run_cli(*common, "--steps", 9, "--resume", "--device", "cpu")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from step 6" in resumed.stdout and "trained 9 steps" in resumed.stdout
    assert torch.load(out / "checkpoint" / "optimizer.pt", weights_only=True)["step"] == 9


def expect_error(capsys, out: Path, args, *words: str) -> None:
    """Bad input: exit status 2, `lssgen train-upsampler: error:` naming the problem, and no output folder."""
    from lssgen.cli import main

    assert main(["train-upsampler", *map(str, args)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("lssgen train-upsampler: error:"), error
    for word in words:
        assert word in error, error
    assert not out.exists() or out.is_file()
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".partial")]


def test_cli_bad_input_exit_status(vae_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_cli("--vae", vae_dir, "--images", tmp_path / "empty", "--out", tmp_path / "out", "--device", "cpu")
    assert result.returncode == 2 and "lssgen train-upsampler: error: --images" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


# In-process from here: the same `main` as the console script, without paying for an interpreter per case.
def test_cli_errors_leave_nothing(vae_dir, data, tmp_path, capsys):
    args = ["--vae", vae_dir, "--resolution", 64, "--steps", 2, "--device", "cpu"]
    out = tmp_path / "out"

    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    expect_error(capsys, out, [*args, "--images", empty, "--out", out], "--images", "no ")

    broken = tmp_path / "broken"
    shutil.copytree(data, broken)
    (broken / "set1" / "zz-broken.png").write_bytes(b"not an image")
    expect_error(capsys, out, [*args, "--images", broken, "--out", out], "--images", "zz-broken.png")

    mismatch = tmp_path / "mismatch.json"
    mismatch.write_text(json.dumps({**SMALL, "in_channels": 16, "out_channels": 16}))
    bad = [*args, "--images", data, "--out", out, "--config", mismatch]
    expect_error(capsys, out, bad, "--config", "4 latent channels")

    expect_error(capsys, out, [*args, "--images", data, "--out", out, "--resolution", 72], "multiple of 16")
    expect_error(capsys, out, [*args, "--images", data, "--out", out, "--latent-loss-weight", 0], "no loss")
    bad = [*args, "--images", data, "--out", out, "--init-from", tmp_path / "nowhere"]
    expect_error(capsys, out, bad, "--init-from", "nowhere")
    config_only = tmp_path / "config-only"
    lssgen.LatentUpsampler(in_channels=4, out_channels=4, **SMALL).save_config(config_only)  # no weights file
    expect_error(capsys, out, [*args, "--images", data, "--out", out, "--init-from", config_only], "--init-from")
    init = tmp_path / "init"
    lssgen.LatentUpsampler(in_channels=4, out_channels=4, **SMALL).save_pretrained(init)
    bad = [*args, "--images", data, "--out", out, "--init-from", init, "--config", mismatch]
    expect_error(capsys, out, bad, "--init-from", "drop one")
    for scales in (["1", "1.5"], ["0"], ["1", "1"]):
        expect_error(capsys, out, [*args, "--images", data, "--out", out, "--scales", *scales], "--scales", "(0, 1]")

    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    expect_error(capsys, a_file, [*args, "--images", data, "--out", a_file], "--out", "existing file")
    expect_error(capsys, a_file, [*args, "--images", data, "--out", a_file / "up"], "--out", "is a file")
    assert a_file.read_text() == "x"

    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        try:
            expect_error(capsys, locked / "up", [*args, "--images", data, "--out", locked / "up"], "not writable")
        finally:
            locked.chmod(0o755)


def test_cached_crops_line_up_with_their_image_and_its_half_size(vae, data, tmp_path):
    from lssgen.training.upsampler import _PairSource

    norm = LatentNormalization.from_vae_config(vae.config)
    path = find_images(data)[0]
    source = _PairSource(
        vae, norm, [path], 32, torch.Generator().manual_seed(0), "cpu", 8, cache_file=tmp_path / "c.safetensors",
        pixels=True,
    )  # fmt: skip
    image = load_image(path)[None]
    image = image[..., : image.shape[2] // 16 * 16, : image.shape[3] // 16 * 16]  # whole 2x2 latent cells
    whole_high, whole_low = encode(vae, image, norm)[0], encode(vae, downsample_nearest(image), norm)[0]
    offsets = set()
    for _ in range(6):
        pair = {key: value[0] for key, value in source.batch(1).items()}
        assert (
            pair["high"].shape == (4, 4, 4) and pair["low"].shape == (4, 2, 2) and pair["images"].shape == (3, 32, 32)
        )
        # Where the high-res crop sits in the whole image's latent: an even cell, so the half-size latent's cell
        # (top/2, left/2) and the pixels (8 top, 8 left) are the same region.
        top, left = next(
            (y, x)
            for y in range(0, whole_high.shape[1] - 3)
            for x in range(0, whole_high.shape[2] - 3)
            if torch.equal(whole_high[:, y : y + 4, x : x + 4], pair["high"])
        )
        assert top % 2 == 0 and left % 2 == 0
        assert torch.equal(pair["low"], whole_low[:, top // 2 : top // 2 + 2, left // 2 : left // 2 + 2])
        assert torch.equal(pair["images"], image[0, :, 8 * top : 8 * top + 32, 8 * left : 8 * left + 32])
        offsets.add((top, left))
    assert len(offsets) > 1  # random places, not one fixed crop


def test_augmented_is_a_smaller_or_mirrored_copy():
    from lssgen.training.upsampler import augmented

    image = torch.rand(3, 40, 60) * 2 - 1
    assert torch.equal(augmented(image, 1.0, False), image)
    assert torch.equal(augmented(image, 1.0, True), image.flip(-1))
    assert augmented(image, 0.5, False).shape == (3, 20, 30) and augmented(image, 0.7, True).shape == (3, 28, 42)
    assert torch.equal(augmented(image, 0.5, True), augmented(image, 0.5, False).flip(-1))
    # Antialiased: a one-pixel checkerboard averages out to grey instead of aliasing to black or white.
    checkerboard = (torch.arange(40)[:, None] + torch.arange(60)).remainder(2).float().expand(3, 40, 60) * 2 - 1
    assert augmented(checkerboard, 0.5, False).abs().max() < 0.3


def test_cache_holds_every_size_and_mirror_of_each_image(vae, data, tmp_path):
    from lssgen.training.upsampler import _PairSource

    norm = LatentNormalization.from_vae_config(vae.config)
    path = find_images(data)[0]
    source = _PairSource(
        vae, norm, [path], 32, torch.Generator().manual_seed(0), "cpu", 8, cache_file=tmp_path / "c.safetensors",
        pixels=True, scales=(1.0, 0.5), hflip=True,
    )  # fmt: skip
    image = load_image(path)

    def whole_cells(x):
        return x[:, : x.shape[1] // 16 * 16, : x.shape[2] // 16 * 16]

    half_size = (round(image.shape[1] / 2), round(image.shape[2] / 2))
    half = F.interpolate(image[None], size=half_size, mode="bilinear", antialias=True)[0]
    expected = [image, image.flip(-1), half, half.flip(-1)]  # sizes x (plain, mirrored)
    for index, variant in enumerate(expected):
        variant = whole_cells(variant)
        assert torch.allclose(source.cache[f"image.{index}"], variant, atol=1e-5), index
        assert torch.allclose(source.cache[f"high.{index}"], encode(vae, variant[None], norm)[0], atol=1e-5)
    assert f"image.{len(expected)}" not in source.cache
    # Batches draw crops from every variant.
    seen = set()
    for _ in range(40):
        crop = source.batch(1)["images"][0]
        seen |= {i for i, v in enumerate(expected) if _is_crop_of(crop, whole_cells(v))}
    assert seen == {0, 1, 2, 3}


def _is_crop_of(crop: torch.Tensor, image: torch.Tensor) -> bool:
    size = crop.shape[-1]
    return any(
        torch.equal(image[:, y : y + size, x : x + size], crop)
        for y in range(0, image.shape[1] - size + 1, 8)
        for x in range(0, image.shape[2] - size + 1, 8)
    )


def validation_psnr_here(upsampler, vae, paths) -> float:
    """PSNR of the decoded upsampler output on centre crops of held-out images, computed independently."""
    norm = LatentNormalization.from_vae_config(vae.config)
    images = torch.stack([center_crop(load_image(p), 64) for p in paths])
    with torch.no_grad():
        decoded = decode(vae, upsampler(encode(vae, downsample_nearest(images), norm)), norm)
    mse = ((decoded.clamp(-1, 1) - images) / 2).pow(2).flatten(1).mean(1)
    return float((10 * torch.log10(1 / mse)).mean())


def test_fine_tuning_on_the_pixel_mse_alone(trained, vae, data, tmp_path):
    messages = []
    result = train_upsampler(
        vae, find_images(data), tmp_path / "tuned", resolution=64, steps=20, batch_size=4, lr=1e-4, seed=1,
        init_from=trained.out_dir, pixel_loss="mse", pixel_loss_weight=1.0, latent_loss_weight=0.0, val_every=0,
        save_every=0, progress=False, log=messages.append,
    )  # fmt: skip
    # It starts where the trained upsampler ended: the same validation figures before the first step.
    assert messages[0].startswith("validation at step 0") and f"{trained.val_mse:.5f}" in messages[0], messages
    assert f"PSNR {trained.val_psnr:.2f} dB" in messages[0]
    card = (tmp_path / "tuned" / "README.md").read_text()
    assert str(trained.out_dir) in card and "| loss | 1 x pixel MSE |" in card
    assert "_name_or_path" not in json.loads((tmp_path / "tuned" / "config.json").read_text())  # no local path
    tuned = lssgen.LatentUpsampler.from_pretrained(tmp_path / "tuned")
    start = lssgen.LatentUpsampler.from_pretrained(trained.out_dir)
    assert {k: v for k, v in tuned.config.items() if not k.startswith("_")} == {
        k: v for k, v in start.config.items() if not k.startswith("_")
    }
    _, val_paths = split_images(find_images(data))
    # Fitting the decoded image raises its PSNR on images it never saw.
    assert validation_psnr_here(tuned, vae, val_paths) > validation_psnr_here(start, vae, val_paths)
    assert result.val_psnr > trained.val_psnr


def test_pixel_loss_alone_skips_encoding_the_targets(vae, data):
    from lssgen.training.upsampler import _PairSource

    norm = LatentNormalization.from_vae_config(vae.config)
    source = _PairSource(
        vae, norm, find_images(data), 32, torch.Generator().manual_seed(0), "cpu", 8, pixels=True, latents=False
    )
    assert set(source.batch(2)) == {"low", "images"}


def test_pixel_loss_with_the_latent_cache(vae, data, tmp_path):
    kwargs = {
        "resolution": 64, "steps": 12, "batch_size": 4, "seed": 0, "config": SMALL, "cache_latents": True,
        "val_every": 0, "save_every": 0, "progress": False, "log": lambda *_: None,
    }  # fmt: skip
    plain = train_upsampler(vae, find_images(data), tmp_path / "plain", **kwargs)
    pixels = train_upsampler(vae, find_images(data), tmp_path / "pixels", pixel_loss="l1", **kwargs)
    assert "1 x latent MSE + 0.1 x pixel L1" in (tmp_path / "pixels" / "README.md").read_text()
    # The same crops and weights, a different loss: the pixel term really reaches the gradient.
    assert pixels.last_loss != plain.last_loss and pixels.val_mse != plain.val_mse
