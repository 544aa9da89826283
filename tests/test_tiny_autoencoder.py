"""The tiny-autoencoder loader on the real taef2 weights (../shared/data/taef2, MIT) and a natural photo."""

from pathlib import Path

import pytest
import torch
from conftest import taef2_or_skip

from lssgen.autoencoders.taesd import TinyAutoencoder
from lssgen.evaluation.metrics import psnr
from lssgen.latents import LatentNormalization
from lssgen.training.data import encode, load_image, load_vae, vae_spatial_factor

skimage = pytest.importorskip("skimage")


@pytest.fixture(scope="module")
def astronaut() -> torch.Tensor:
    """scikit-image's astronaut photo (public domain), 512x512, in [-1, 1]."""
    return load_image(Path(skimage.__file__).parent / "data" / "astronaut.png")[None]


def round_trip_psnr(vae, image: torch.Tensor) -> float:
    with torch.no_grad():
        decoded = vae.decode(vae.encode(image).latents, return_dict=False)[0]
    return float(psnr((decoded.clamp(-1, 1) + 1) / 2, (image + 1) / 2))


def test_taef2_loads_from_its_folder_and_round_trips_a_photo(astronaut, taef2_dir):
    vae = load_vae(str(taef2_dir))
    assert isinstance(vae, TinyAutoencoder)
    assert vae.config.latent_channels == 32 and vae_spatial_factor(vae) == 8
    latents = encode(vae, astronaut, LatentNormalization.from_vae_config(vae.config))
    assert latents.shape == (1, 32, 64, 64)
    assert 0.75 < float(latents.std()) < 0.95  # ≈ 0.85, as measured beside the weights
    assert round_trip_psnr(vae, astronaut) > 30.5  # 31.2 dB measured beside the weights


def test_the_extra_branch_is_what_taef2_needs(astronaut, tmp_path, taef2_dir):
    # Without FLUX.2's extra 1x1 branch (as diffusers' AutoencoderTiny would load it), the round trip collapses.
    for part in ("encoder", "decoder"):
        state = torch.load(taef2_dir / f"taef2_{part}.pth", weights_only=True)
        torch.save({k: v for k, v in state.items() if ".pool." not in k}, tmp_path / f"plain_{part}.pth")
    plain = TinyAutoencoder.from_folder(tmp_path)
    assert not any(".pool." in name for name in plain.state_dict())
    assert round_trip_psnr(plain, astronaut) < 20


def test_bad_tiny_autoencoder_folders_say_what_is_wrong(tmp_path):
    (tmp_path / "a_encoder.pth").write_bytes(b"not a state dict")
    (tmp_path / "a_decoder.pth").write_bytes(b"not a state dict")
    with pytest.raises(ValueError, match="Cannot read .*a_encoder.pth"):
        load_vae(str(tmp_path))
    (tmp_path / "b_encoder.pth").write_bytes(b"")
    with pytest.raises(ValueError, match=r"exactly one \*encoder.pth"):
        TinyAutoencoder.from_folder(tmp_path)
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    torch.save({"0.weight": torch.zeros(64, 3, 3, 3)}, wrong / "x_encoder.pth")
    torch.save({"1.weight": torch.zeros(64, 32, 3, 3)}, wrong / "x_decoder.pth")
    with pytest.raises(ValueError, match="not a tiny-autoencoder state dict"):
        TinyAutoencoder.from_folder(wrong)


def test_train_and_eval_upsampler_take_the_tiny_autoencoder_folder(tmp_path, astronaut, taef2_dir):
    from lssgen.cli import main
    from lssgen.training.data import to_pil

    images = tmp_path / "images"
    images.mkdir()
    for i, (top, left) in enumerate([(0, 0), (0, 256), (256, 0), (256, 256)]):
        to_pil(astronaut[0, :, top : top + 256, left : left + 256]).save(images / f"{i}.png")
    common = ["--vae", str(taef2_dir), "--images", str(images), "--resolution", "64", "--device", "cpu"]
    assert main(["train-upsampler", *common, "--out", str(tmp_path / "up"), "--steps", "2", "--batch-size", "2"]) == 0
    assert (tmp_path / "up" / "config.json").is_file()
    eval_args = ["--upsampler", str(tmp_path / "up"), "--out", str(tmp_path / "eval"), "--repeats", "1", "--grid", "1"]
    assert main(["eval-upsampler", *common, *eval_args]) == 0
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "taef2" in report and "learned upsampler" in report


@pytest.mark.parametrize("ci", ["", "true"])
def test_missing_taef2_skips_on_a_desk_and_fails_under_ci(tmp_path, monkeypatch, ci):
    missing = tmp_path / "no-taef2"
    monkeypatch.setenv("CI", ci)
    # Caught whichever it is: a skip escaping this test would only skip it.
    with pytest.raises((pytest.fail.Exception, pytest.skip.Exception)) as raised:
        taef2_or_skip(missing)
    assert raised.type is (pytest.fail.Exception if ci else pytest.skip.Exception)
    assert str(missing) in str(raised.value)  # it says where it looked
    assert ("CI is set" in str(raised.value)) == bool(ci)
