"""The wheel: it carries the weights we trained, and an installed copy finds and loads them (not only a clone)."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import lssgen
from lssgen.weights import shipped, weights_path

REPO = Path(__file__).resolve().parents[1]
LOAD_FROM_INSTALL = """
import json, lssgen, lssgen.weights as weights
upsampler = lssgen.LatentUpsampler.from_pretrained(weights.weights_path("flux2-x2"))
print(json.dumps({"lssgen": lssgen.__file__, "weights": str(weights.weights_path("flux2-x2")),
                  "channels": upsampler.config.in_channels, "shipped": weights.shipped()}))
"""


def test_shipped_weights_are_found_by_name():
    assert "flux2-x2" in shipped()
    assert lssgen.LatentUpsampler.from_pretrained(weights_path("flux2-x2")).config.in_channels == 32
    with pytest.raises(ValueError, match="No shipped weights named 'flux9'; lssgen ships \\['flux2-x2'"):
        weights_path("flux9")


def test_the_wheel_carries_the_weights_and_an_install_loads_them(tmp_path):
    if subprocess.run([sys.executable, "-c", "import setuptools"], capture_output=True).returncode:
        pytest.skip("building the wheel offline needs setuptools in this environment")
    # Build from a copy of the sources: setuptools writes build/ and *.egg-info next to them.
    ignore = shutil.ignore_patterns(".git", ".venv", "build", "dist", "outputs", "data", "*.egg-info", "__pycache__")
    source = shutil.copytree(REPO, tmp_path / "src", ignore=ignore)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    build = subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", tmp_path / "dist", source],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = (tmp_path / "dist").glob("lssgen-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    weights = [path for path in (REPO / "weights").glob("*/**/*") if path.is_file() and "__pycache__" not in path.parts]
    assert "lssgen/weights/flux2-x2/diffusion_pytorch_model.safetensors" in names
    assert {f"lssgen/weights/{path.relative_to(REPO / 'weights').as_posix()}" for path in weights} <= names

    site = tmp_path / "site"
    install = subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", site, wheel], capture_output=True)
    assert install.returncode == 0, install.stderr
    # The installed copy comes first on the path; its dependencies (torch, diffusers) are this environment's.
    load = subprocess.run(
        [sys.executable, "-c", LOAD_FROM_INSTALL],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(site)},
    )
    assert load.returncode == 0, load.stderr
    result = json.loads(load.stdout.strip().splitlines()[-1])
    assert Path(result["lssgen"]).is_relative_to(site) and Path(result["weights"]).is_relative_to(site)
    assert result["channels"] == 32 and result["shipped"] == shipped()
