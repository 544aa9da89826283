"""Third-party adapter plugins: the example package (examples/lssgen-adapter-pixart) installed for real into a
throw-away virtualenv, the same adapter registered at runtime, and a plugin that fails to load."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import logging
import os
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import torch
from tiny_pixart import build_tiny_pixart_sigma_pipeline, pixart_call_kwargs, planned_calls, record_denoiser_calls

import lssgen
from lssgen import plugins

TESTS = Path(__file__).resolve().parent
EXAMPLE = TESTS.parent / "examples" / "lssgen-adapter-pixart"

# Runs inside the throw-away virtualenv; prints what the test checks, as JSON.
INSTALLED_CHECK = """
import json

import torch

import lssgen
import lssgen_adapter_pixart
from tiny_pixart import build_tiny_pixart_sigma_pipeline, pixart_call_kwargs, planned_calls, record_denoiser_calls

info = lssgen.installed_adapters()["pixart"]
stock, pipe = build_tiny_pixart_sigma_pipeline(), build_tiny_pixart_sigma_pipeline()
expected = stock(**pixart_call_kwargs()).images
lssgen.patch(pipe)
plain = pipe(**pixart_call_kwargs(), start_sigma=1.0).images
plan = lssgen.plan_for(pipe, 256, 256, 8, min_resolution=64)
calls, handle = record_denoiser_calls(pipe)
images = pipe(**pixart_call_kwargs(), min_resolution=64).images
handle.remove()
print(json.dumps({
    "package": info.package,
    "plugin": info.plugin,
    "module": lssgen_adapter_pixart.__file__,
    "chosen": type(lssgen.find_adapter(pipe)).__module__,
    "stock_equal": torch.equal(plain, expected),
    "shapes": [list(expected.shape), list(images.shape)],
    "stage_sizes": [[s.latent_height, s.latent_width] for s in plan.stages],
    "calls": calls,
    "planned_calls": planned_calls(plan),
}))
"""


def make_virtualenv(path: Path) -> Path:
    """A virtualenv that sees this interpreter's packages; returns its python."""
    venv.create(path, system_site_packages=True, with_pip=False)
    python = path / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    # `--system-site-packages` exposes the *base* interpreter's packages; when the tests run in a virtualenv
    # themselves, torch, diffusers, pip and lssgen live in its site-packages, added here (with their .pth files).
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    outer = [*site.getsitepackages(), *([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])]
    Path(purelib, "_lssgen_outer_env.pth").write_text("".join(f"import site; site.addsitedir({p!r})\n" for p in outer))
    return python


def run(python: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1", **env}
    return subprocess.run([python, *args], capture_output=True, text=True, env=environment, timeout=300)


def test_installed_plugin_is_found_and_follows_the_plan(tmp_path):
    python = make_virtualenv(tmp_path / "venv")
    for module in ("pip", "setuptools"):
        if run(python, "-c", f"import {module}").returncode:
            pytest.skip(f"{module} is not importable in a virtualenv made from {sys.executable}")
    # Build from a copy: setuptools writes build/ and *.egg-info next to the sources.
    source = shutil.copytree(
        EXAMPLE, tmp_path / "lssgen-adapter-pixart", ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info")
    )
    # --no-index: the plugin is the only thing to install (its dependency, lssgen, is already there).
    install = run(python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", str(source))
    assert install.returncode == 0, install.stdout + install.stderr

    check = run(python, "-c", INSTALLED_CHECK, PYTHONPATH=str(TESTS))
    assert check.returncode == 0, check.stderr
    result = json.loads(check.stdout.strip().splitlines()[-1])
    assert (result["plugin"], result["package"], result["chosen"]) == (
        "pixart",
        "lssgen-adapter-pixart",
        "lssgen_adapter_pixart",
    )
    assert Path(result["module"]).is_relative_to(tmp_path / "venv")  # the installed copy, not the example folder
    assert result["stock_equal"]
    assert result["shapes"] == [[1, 3, 256, 256], [1, 3, 256, 256]]
    assert result["stage_sizes"] == [[8, 8], [16, 16], [32, 32]]
    assert result["calls"] == result["planned_calls"]


# --- the same adapter, registered in this process -------------------------------------------------------------


@pytest.fixture
def pixart_module():
    """The example's module, imported from its source folder (not installed)."""
    sys.path.insert(0, str(EXAMPLE))
    try:
        yield importlib.import_module("lssgen_adapter_pixart")
    finally:
        sys.path.remove(str(EXAMPLE))
        sys.modules.pop("lssgen_adapter_pixart", None)


@pytest.fixture
def pixart_adapter(pixart_module):
    adapter = lssgen.register_adapter(pixart_module.PixArtSigmaAdapter())
    try:
        yield adapter
    finally:
        lssgen.unregister_adapter(adapter.name)


def test_runtime_registered_adapter_generates_in_stages(pixart_adapter):
    installed = lssgen.installed_adapters()["pixart"]
    assert installed.adapter is pixart_adapter and installed.package == "runtime"
    stock, pipe = build_tiny_pixart_sigma_pipeline(), build_tiny_pixart_sigma_pipeline()
    expected = stock(**pixart_call_kwargs()).images

    lssgen.patch(pipe)
    assert lssgen.find_adapter(pipe) is pixart_adapter
    assert torch.equal(pipe(**pixart_call_kwargs(), start_sigma=1.0).images, expected)
    plan = lssgen.plan_for(pipe, 256, 256, 8, min_resolution=64)
    assert len(plan.stages) == 3
    calls, handle = record_denoiser_calls(pipe)
    steps = []
    images = pipe(
        **pixart_call_kwargs(), min_resolution=64, callback=lambda step, timestep, latents: steps.append(step)
    ).images
    handle.remove()
    assert calls == planned_calls(plan)
    assert steps == list(range(plan.total_steps))  # the legacy callback still sees every step
    assert images.shape == expected.shape and not torch.equal(images, expected)
    lssgen.unpatch(pipe)
    assert torch.equal(pipe(**pixart_call_kwargs()).images, expected)


def test_unregistered_adapter_no_longer_matches(pixart_adapter):
    if importlib.metadata.entry_points(group="lssgen", name="pixart"):
        pytest.skip("lssgen-adapter-pixart is installed here: its entry point still provides `pixart`")
    lssgen.unregister_adapter("pixart")
    assert "pixart" not in lssgen.installed_adapters()
    with pytest.raises(ValueError, match="no adapter for PixArtSigmaPipeline"):
        lssgen.patch(build_tiny_pixart_sigma_pipeline())


def test_resolution_binning_plans_on_the_bin_and_returns_the_requested_size(pixart_adapter, caplog):
    pipe = lssgen.patch(build_tiny_pixart_sigma_pipeline(), min_resolution=96)
    # 200x328 snaps to the 192x320 bin of the stock 256 px table, which halves cleanly once.
    plan = lssgen.plan_for(pipe, 200, 328, 8)
    assert (plan.height, plan.width) == (192, 320) and len(plan.stages) == 2
    calls, handle = record_denoiser_calls(pipe)
    with caplog.at_level(logging.WARNING, logger="lssgen"):
        binned = pipe(**pixart_call_kwargs(height=200, width=328)).images
    assert calls == planned_calls(plan)
    assert binned.shape[-2:] == (200, 328)  # resized back by the pipeline, as without lssgen
    assert "does not halve cleanly" not in caplog.text

    # Without binning the requested size itself is planned: rounded down so that it halves, with a warning.
    calls.clear()
    with caplog.at_level(logging.WARNING, logger="lssgen"):
        unbinned = pipe(**pixart_call_kwargs(height=200, width=328), use_resolution_binning=False).images
    handle.remove()
    assert calls == planned_calls(plan)
    assert unbinned.shape[-2:] == (192, 320)
    assert "generating 320x192 instead" in caplog.text


# --- a broken plugin ------------------------------------------------------------------------------------------------


def test_plugin_that_fails_to_import_is_skipped_with_a_warning(monkeypatch, caplog):
    broken = importlib.metadata.EntryPoint(name="broken", value="lssgen_adapter_missing_module", group="lssgen")
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [broken])
    monkeypatch.setattr(plugins, "_loaded", False)  # load the entry points again, now with the broken one
    with caplog.at_level(logging.WARNING, logger="lssgen.plugins"):
        plugins.load_plugins()
    assert "lssgen plugin 'broken'" in caplog.text and "failed to load and is skipped" in caplog.text
    assert "lssgen_adapter_missing_module" in caplog.text  # the import error says what is missing
    assert plugins.pm.get_plugin("broken") is None
    assert "flux" in lssgen.installed_adapters()  # the other plugins are unaffected


GOOD_PLUGIN = """
import lssgen
from lssgen.adapters import FluxAdapter


class GoodAdapter(FluxAdapter):
    name = "lssgen_test_good"
    pipeline_classes = ("LssgenTestNoSuchPipeline",)  # matches no real pipe: the other tests stay unaffected


@lssgen.hookimpl
def register_adapters(register):
    register(GoodAdapter())
"""


@pytest.fixture
def third_party_plugins(tmp_path, monkeypatch):
    """A distribution on sys.path whose `lssgen` entry points list two broken plugins (one whose module raises on
    import, one whose module does not exist) before a good one, loaded again from the real package metadata."""
    (tmp_path / "lssgen_test_raises.py").write_text('raise RuntimeError("lssgen_test_raises is broken")\n')
    (tmp_path / "lssgen_test_good.py").write_text(GOOD_PLUGIN)
    dist_info = tmp_path / "lssgen_test_plugins-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: lssgen-test-plugins\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text(
        "[lssgen]\n"
        "lssgen_test_raises = lssgen_test_raises\n"
        "lssgen_test_missing = lssgen_test_no_such_module\n"
        "lssgen_test_good = lssgen_test_good\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(plugins, "_loaded", False)  # load the entry points again, now with these
    try:
        yield
    finally:
        if plugins.pm.get_plugin("lssgen_test_good") is not None:
            plugins.pm.unregister(name="lssgen_test_good")
        plugins._plugin_packages.pop("lssgen_test_good", None)
        sys.modules.pop("lssgen_test_good", None)


def test_broken_third_party_plugins_do_not_stop_a_later_one_from_loading(third_party_plugins, caplog):
    names = [entry_point.name for entry_point in importlib.metadata.entry_points(group="lssgen")]
    # The package metadata lists them in this order: the loader meets both broken ones first.
    assert names.index("lssgen_test_raises") < names.index("lssgen_test_missing") < names.index("lssgen_test_good")
    with caplog.at_level(logging.WARNING, logger="lssgen.plugins"):
        plugins.load_plugins()
    installed = lssgen.installed_adapters()
    assert "lssgen_test_good" in installed, "the good plugin listed after the broken ones did not load"
    assert installed["lssgen_test_good"].package == "lssgen-test-plugins"
    assert installed["lssgen_test_good"].plugin == "lssgen_test_good"
    for name, reason in [
        ("lssgen_test_raises", "lssgen_test_raises is broken"),
        ("lssgen_test_missing", "lssgen_test_no_such_module"),
    ]:
        assert f"lssgen plugin {name!r} from lssgen-test-plugins failed to load and is skipped" in caplog.text
        assert reason in caplog.text
        assert plugins.pm.get_plugin(name) is None
    assert "flux" in installed
