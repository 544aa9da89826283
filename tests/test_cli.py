"""The `lssgen` command line, run as a real installed console script."""

import json
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from console_script import LSSGEN
from PIL import Image

from lssgen.autoencoders import TinyFlux2Autoencoder
from lssgen.cli import main
from lssgen.loading import check_device

REPO = Path(__file__).resolve().parents[1]


def run(*args, cwd=None):
    command = [*LSSGEN, *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=300)


def test_demo_prints_plan_and_both_timings(tmp_path):
    args = ["--height", 256, "--width", 256, "--steps", 4, "--min-resolution", 128, "--out-dir", tmp_path / "demo"]
    result = run("demo", "--random-weights", "--repeats", 2, *args)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "RANDOM weights" in out
    assert "1/2    128x128" in out and "2/2    256x256" in out
    assert "baseline (stock pipeline, 4 steps at 256x256):" in out
    # The medians of the alternating rounds, with the spread of each side.
    speed_up = re.search(r"speed-up: [\d.]+x \(median of 2 alternating rounds of 1 prompt; min–max stock ([\d.]+)–"
                         r"([\d.]+) s, lssgen ([\d.]+)–([\d.]+) s; cpu, float32\)", out)  # fmt: skip
    assert speed_up, out
    low, high = float(speed_up[1]), float(speed_up[2])
    assert low <= float(re.search(r"baseline \(.*\): ([\d.]+) s", out)[1]) <= high
    for name in ("baseline.png", "lssgen.png"):
        assert Image.open(tmp_path / "demo" / name).size == (256, 256)


def _tiny_scene_model(folder):
    from lssgen.scenes.model import build_pipeline

    build_pipeline(TinyFlux2Autoencoder(), seed=0, channels=(8, 16)).save_pretrained(folder)
    return folder


def test_bench_takes_the_models_native_size_and_prompt_length(tmp_path):
    import lssgen

    model = _tiny_scene_model(tmp_path / "scene")
    out = tmp_path / "bench"
    args = ["bench", "--model", model, "--height", 256, "--width", 256, "--steps", 6, "--min-resolution", 64]
    args += ["--base-size", 256, "--max-sequence-length", 32, "--repeats", 1, "--start-sigmas", 0.75, "--out", out]
    assert main([str(a) for a in args]) == 0
    data = json.loads((out / "bench.json").read_text())
    assert data["call"]["max_sequence_length"] == 32
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline.from_pretrained(model)
    lssgen.patch(pipe, min_resolution=64, base_height=256, base_width=256)
    shortened = lssgen.plan_for(pipe, 256, 256, 6, start_sigma=0.75)
    lssgen.patch(pipe, min_resolution=64, base_height=1024, base_width=1024)
    assert lssgen.plan_for(pipe, 256, 256, 6, start_sigma=0.75).total_steps != shortened.total_steps
    result = next(r for r in data["results"] if r["name"] == "lssgen sigma=0.75, shorten")
    assert result["planned_steps"] == [stage.num_denoiser_steps for stage in shortened.stages]


def test_demo_falls_back_to_random_weights_without_taef2(tmp_path, capsys, monkeypatch):
    import lssgen.weights

    monkeypatch.setattr(lssgen.weights, "shipped", lambda: ["flux2-x2", "scene-scorer", "scene-t2i"])
    monkeypatch.setenv("LSSGEN_TAEF2", str(tmp_path / "no-taef2"))
    monkeypatch.setattr("lssgen.autoencoders.flux2.find_taef2", lambda folder=None: (_ for _ in ()).throw(
        FileNotFoundError("no taef2 folder was found (looked in: nowhere)")))  # fmt: skip
    args = ["--steps", "2", "--height", "256", "--width", "256", "--min-resolution", "128", "--out-dir", str(tmp_path)]
    assert main(["demo", *args]) == 0
    printed = capsys.readouterr().out
    assert "the scene model needs taef2, so the random-weight demo runs instead" in printed
    assert "no taef2 folder was found" in printed and "RANDOM weights" in printed


@pytest.fixture
def tiny_shipped_scene_model(tmp_path, monkeypatch):
    """A tiny untrained scene model, saved as the shipped folder is, stands in for it (fast; the shipped model's
    pictures are tests/test_scene_pictures.py's). Its settings come from its lssgen.json, as the shipped model's
    do: here the shipped model's file with two stages instead of three, so that nothing but the file can have set
    them."""
    import lssgen.weights
    from lssgen.scenes.model import build_pipeline

    folder = tmp_path / "scene-t2i"
    build_pipeline(TinyFlux2Autoencoder(), seed=0, channels=(8, 16)).save_pretrained(folder)
    shipped, weights_path = lssgen.weights.shipped, lssgen.weights.weights_path
    monkeypatch.setattr(lssgen.weights, "shipped", lambda: [*shipped(), "scene-t2i"])
    monkeypatch.setattr(
        lssgen.weights, "weights_path", lambda name: folder if name == "scene-t2i" else weights_path(name)
    )
    # Its VAE is a random one saved whole, so no taef2 folder is needed; the demo still looks for one.
    monkeypatch.setattr("lssgen.autoencoders.flux2.find_taef2", lambda folder=None: tmp_path)
    shipped_defaults = lssgen.model_defaults(weights_path("scene-t2i"))
    assert shipped_defaults.patch["min_resolution"] == 64
    replace(shipped_defaults, patch={**shipped_defaults.patch, "min_resolution": 128}).save(folder)
    return folder


def test_demo_runs_a_shipped_scene_model_by_default(tmp_path, capsys, tiny_shipped_scene_model):
    from lssgen.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--steps", "4", "--repeats", "1", "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "the scene model trained here" in printed and "RANDOM" not in printed
    assert "1/2    128x128" in printed and "2/2    256x256" in printed  # the folder's size and min_resolution
    assert "learned upsampler" in printed and "named in" in printed  # the folder's upsampler between them
    assert "baseline (stock pipeline, 4 steps at 256x256)" in printed
    assert "speed-up:" in printed and "(1 round of 4 prompts; cpu, float32)" in printed
    sheet = Image.open(out / "demo.png")
    assert sheet.size == (2 * 256, 14 + 4 * (256 + 14))  # stock | lssgen, one row per held-out prompt
    assert Image.open(out / "baseline.png").size == Image.open(out / "lssgen.png").size == (256, 256)


def test_demo_size_above_the_native_size_starts_at_the_native_size(tmp_path, capsys, tiny_shipped_scene_model):
    """`--size 512` for a 256 px model: the first stage is 256 px (the folder's `min_resolution`, 128, would give
    three stages), the side-by-side sheet is at 512 px; with --height too it is a one-line error."""
    from lssgen.cli import main

    out = tmp_path / "demo"
    common = ["demo", "--prompt", "a red circle", "--steps", "4", "--repeats", "1", "--out-dir", str(out)]
    assert main([*common, "--size", "512"]) == 0
    printed = capsys.readouterr().out
    assert "512 px is above the model's native 256 px: the first stage is 256 px" in printed
    assert "1/2    256x256" in printed and "2/2    512x512" in printed
    assert "baseline (stock pipeline, 4 steps at 512x512)" in printed
    assert Image.open(out / "demo.png").size == (2 * 512, 14 + 512 + 14)
    assert main([*common, "--size", "512", "--height", "512"]) == 2
    assert "Give either --size or --height/--width" in capsys.readouterr().err


def test_generate_with_a_local_checkpoint(tiny_flux_dir, tmp_path):
    common = ["--model", tiny_flux_dir, "--height", 256, "--width", 192, "--steps", 4, "--device", "cpu"]
    result = run("generate", *common, "--min-resolution", 64, "--out", tmp_path / "fast.png")
    assert result.returncode == 0, result.stderr
    assert "denoiser steps in all" in result.stdout and "lssgen:" in result.stdout
    assert Image.open(tmp_path / "fast.png").size == (192, 256)
    assert [path.name for path in tmp_path.iterdir()] == ["fast.png"]  # no stock image without --baseline


def test_generate_with_a_method_prints_its_plan(tiny_flux_dir, tmp_path, capsys):
    argv = ["generate", "--model", tiny_flux_dir, "--height", 128, "--width", 192, "--steps", 3, "--device", "cpu"]
    argv += ["--method", "refine:steps=2", "--scaling-space", "pixel", "--out", tmp_path / "refined.png"]
    assert main([str(arg) for arg in argv]) == 0, capsys.readouterr().err
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "method: refine:sigma=0.12,steps=2"
    assert lines[2].split()[:4] == ["1/2", "96x64", "12x8", "3"] and lines[3].split()[:4] == [
        "2/2",
        "192x128",
        "24x16",
        "2",
    ]
    assert "scaling between stages: pixel round trip (decode, bicubic x2, encode)" in lines
    assert Image.open(tmp_path / "refined.png").size == (192, 128)


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--method", "refine:sigma=2"], "method 'refine': `sigma` must be in (0, 1), got 2.0"),
        (["--method", "refine", "--min-resolution", "64"], "`min_resolution` (given to the command line) does not"),
        (["--method", "refine", "--start-sigma", "1.0"], None),  # every method's off switch
    ],
    ids=["bad-parameter", "option-it-does-not-read", "off"],
)
def test_generate_refuses_a_bad_method_before_loading(tiny_flux_dir, tmp_path, capsys, extra, words):
    out = tmp_path / "x.png"
    argv = ["generate", "--model", str(tiny_flux_dir), "--height", "64", "--width", "64", "--steps", "2"]
    status = main([*argv, "--device", "cpu", *extra, "--out", str(out)])
    captured = capsys.readouterr()
    if words is None:
        assert status == 0 and out.exists(), captured.err
        return
    assert status == 2 and captured.out == "" and not out.exists()
    assert captured.err.startswith("lssgen generate: error: ") and words in captured.err, captured.err


def test_methods_lists_every_method_with_parameters_and_sources(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "lssgen (the default): " in out and "LSSGen, arXiv 2507.16154" in out
    assert "refine: " in out and "MrFlow, arXiv 2607.01642" in out
    assert re.search(r"sigma=0\.12 +noise level", out) and re.search(r"steps=1 +steps at full size", out)
    assert "e.g. --method refine:sigma=0.12,steps=1" in out
    # A parameter whose default depends on the pipeline (spectral's `a`, `beta`) is listed but left out of the example.
    assert re.search(r"a=None +latent spectrum", out) and "e.g. --method spectral:delta=0.1,halvings=1\n" in out


def test_generate_baseline_times_the_same_call_both_ways(tiny_flux_dir, tmp_path, capsys):
    from diffusers import FluxPipeline

    threads = torch.get_num_threads()
    call = ["--prompt", "a red cube", "--height", 128, "--width", 192, "--steps", 6, "--max-sequence-length", 16]
    argv = ["generate", "--model", tiny_flux_dir, *call, "--min-resolution", 64, "--device", "cpu"]
    argv += ["--baseline", "--repeats", 2, "--threads", 1, "--out", tmp_path / "cube.png"]
    try:
        assert main([str(arg) for arg in argv]) == 0, capsys.readouterr().err
        assert torch.get_num_threads() == 1  # --threads reached torch
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "2/2    192x128" in printed  # the plan (width x height), printed in both modes
    number = r"([\d.]+)"
    stock, fast = (
        re.search(rf"^{side}: +{number} s \(min–max {number}–{number} s, 2 runs\) -> (.+)$", printed, re.MULTILINE)
        for side in ("stock", "lssgen")
    )
    assert stock and fast, printed
    assert Path(stock[4]) == tmp_path / "cube-stock.png" and Path(fast[4]) == tmp_path / "cube.png"
    for timing in (stock, fast):
        assert float(timing[2]) <= float(timing[1]) <= float(timing[3])  # median within min–max
    speed_up = re.search(rf"^speed-up: {number}x \(the same call, alternating, medians of 2 runs each; cpu, "
                         r"float32\)$", printed, re.MULTILINE)  # fmt: skip
    # (from the unrounded medians: the printed ones agree to their rounding)
    assert speed_up and float(speed_up[1]) == pytest.approx(float(stock[1]) / float(fast[1]), rel=0.05)

    # The stock image is the unpatched pipeline's for the same call and seed; lssgen's differs from it.
    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    expected = pipe(
        "a red cube", height=128, width=192, num_inference_steps=6, guidance_scale=3.5, max_sequence_length=16,
        generator=torch.Generator().manual_seed(0),
    ).images[0]  # fmt: skip
    stock_image, lssgen_image = (np.asarray(Image.open(tmp_path / name)) for name in ("cube-stock.png", "cube.png"))
    assert np.array_equal(stock_image, np.asarray(expected))
    assert stock_image.shape == lssgen_image.shape == (128, 192, 3) and not np.array_equal(stock_image, lssgen_image)


@pytest.fixture
def flux_folder_with_defaults(tiny_flux_dir, tmp_path):
    """The tiny FLUX.1 folder with an lssgen.json: 128 px, 6 steps, 8 prompt tokens, smallest stage 64 px."""
    from lssgen.loading import ModelDefaults

    folder = shutil.copytree(tiny_flux_dir, tmp_path / "model")
    ModelDefaults(
        height=128, width=128, num_inference_steps=6, max_sequence_length=8, patch={"min_resolution": 64}
    ).save(folder)
    return folder


def test_generate_uses_the_model_folders_defaults(flux_folder_with_defaults, tiny_flux_dir, tmp_path, capsys):
    def generate(model, out, *options):
        argv = ["generate", "--model", model, "--prompt", "a red cube", "--device", "cpu", "--out", out, *options]
        assert main([str(arg) for arg in argv]) == 0, capsys.readouterr().err
        return capsys.readouterr().out, np.asarray(Image.open(out))

    printed, image = generate(flux_folder_with_defaults, tmp_path / "folder.png")
    assert image.shape == (128, 128, 3)  # the folder's size, not FLUX.1's 1024 px
    assert "1/2    64x64" in printed and "2/2    128x128" in printed and " of 6 " in printed  # its steps, stages
    # The same call spelled out on the command line, from the folder without its lssgen.json: the same image, so
    # the folder's prompt length (which changes FLUX.1's image: it attends to the padding) and base size (the
    # native size, the reference for shortening) were used too.
    spelled = ["--height", 128, "--width", 128, "--steps", 6, "--max-sequence-length", 8, "--min-resolution", 64]
    spelled += ["--base-size", 128]
    _, same = generate(tiny_flux_dir, tmp_path / "spelled.png", *spelled)
    assert np.array_equal(image, same)
    _, longer = generate(flux_folder_with_defaults, tmp_path / "longer.png", "--max-sequence-length", 16)
    assert not np.array_equal(image, longer)

    # What the user gives overrides the folder.
    printed, image = generate(flux_folder_with_defaults, tmp_path / "mine.png", "--height", 192, "--steps", 8)
    assert image.shape == (192, 128, 3)
    assert "1/2    64x96" in printed and "2/2    128x192" in printed and " of 8 " in printed


def test_bench_uses_the_model_folders_defaults(flux_folder_with_defaults, tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["bench", "--model", flux_folder_with_defaults, "--repeats", 1, "--start-sigmas", 0.75, "--out", out]
    assert main([str(arg) for arg in argv]) == 0, capsys.readouterr().err
    call = json.loads((out / "bench.json").read_text())["call"]
    assert (call["height"], call["width"], call["num_inference_steps"]) == (128, 128, 6)
    assert call["max_sequence_length"] == 8 and call["guidance_scale"] == 3.5  # the folder's; FLUX.1's guidance


def test_a_missing_model_is_one_line_from_the_console_script():
    # From the repository root, where `weights/` is a folder: a typo in it is no hub id to try. Nothing else is
    # written (no FutureWarning, no hub connection message), and nothing is loaded.
    for model in ("weights/nope", "./nope"):
        result = run("generate", "--model", model, "--prompt", "x", cwd=REPO)
        assert result.returncode == 2
        assert result.stderr == f"lssgen generate: error: --model {model}: no such folder.\n"
        assert result.stdout == ""


def test_console_script_reports_bad_input_in_one_line_without_traceback(tiny_flux_dir, tmp_path):
    # An error found after the pipeline is loaded (by the stage planner), through the installed entry point.
    out = tmp_path / "x.png"
    common = ["--model", tiny_flux_dir, "--height", 256, "--width", 256, "--steps", 2, "--device", "cpu"]
    result = run("generate", *common, "--start-sigma", 1.5, "--out", out)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert errors == [result.stderr.splitlines()[-1]], result.stderr  # one line, the last one
    assert errors[0].startswith("lssgen generate: error: `start_sigma` must be in (0, 1]")
    assert list(tmp_path.iterdir()) == []


# --- bad input, command by command -------------------------------------------------------------------------------
# Every command, given one bad input at a time, must exit with status 2 and one line on stderr naming the problem,
# before it loads or writes anything: no traceback, no output, no stray temporary files.


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # as an interrupted download or copy leaves it


@pytest.fixture(scope="session")
def inputs(tiny_flux_dir, tiny_upsampler_dir, tmp_path_factory):
    """Good inputs for every command, and one broken variant of each."""
    root = tmp_path_factory.mktemp("inputs")
    paths = {"model": tiny_flux_dir, "vae": tiny_flux_dir / "vae", "upsampler": tiny_upsampler_dir}
    paths["prompts"] = root / "prompts.jsonl"
    paths["prompts"].write_text(json.dumps({"prompt": "a photo of a cat"}) + "\n")
    paths["images"] = root / "images"
    paths["images"].mkdir()
    for index in range(3):
        Image.new("RGB", (64, 64), (40 * index, 80, 120)).save(paths["images"] / f"{index}.png")
    paths["file"] = root / "a-file"
    paths["file"].write_text("not a folder")
    paths["missing"] = root / "missing"
    paths["empty"] = root / "empty"
    paths["empty"].mkdir()
    # Both a pipeline's and a model's config file, malformed: the same folder serves --model and --vae.
    paths["malformed"] = root / "malformed"
    paths["malformed"].mkdir()
    (paths["malformed"] / "model_index.json").write_text('{"_class_name": "FluxPipeline",')
    (paths["malformed"] / "config.json").write_text("{not json")
    paths["truncated"] = shutil.copytree(tiny_flux_dir, root / "truncated")
    _truncate(paths["truncated"] / "transformer" / "diffusion_pytorch_model.safetensors")
    _truncate(paths["truncated"] / "vae" / "diffusion_pytorch_model.safetensors")
    for name, edit in {
        "up-not-json": lambda folder: (folder / "config.json").write_text("not json"),
        "up-no-keys": lambda folder: (folder / "config.json").write_text('{"_class_name": "LatentUpsampler"}'),
        "up-truncated": lambda folder: _truncate(folder / "diffusion_pytorch_model.safetensors"),
    }.items():
        paths[name] = shutil.copytree(tiny_upsampler_dir, root / name)
        edit(paths[name])
    return paths


# Each command with good inputs (tiny sizes, on the CPU); `{model}` is its pipeline or VAE, `{up}` its upsampler
# option (train-upsampler's is --init-from), `{out}` its output.
SIZE = ["--height", "64", "--width", "64", "--steps", "2", "--min-resolution", "32"]
COMMANDS = {
    "generate": ["--model", "{model}", *SIZE, "{up}", "--out", "{out}"],
    "demo": ["--model", "{model}", *SIZE, "{up}", "--out-dir", "{out}"],
    "bench": ["--model", "{model}", *SIZE, "--repeats", "1", "--start-sigmas", "0.75", "{up}", "--out", "{out}"],
    "geneval": ["{prompts}", "--model", "{model}", *SIZE, "--images-per-prompt", "1", "{up}", "--out", "{out}"],
    "eval-upsampler": ["--vae", "{model}", "--images", "{images}", "--resolution", "32", "--repeats", "1", "{up}"]
    + ["--out", "{out}"],
    "train-upsampler": ["--vae", "{model}", "--images", "{images}", "--resolution", "32", "--steps", "1", "{up}"]
    + ["--batch-size", "2", "--out", "{out}"],
}
VAE_COMMANDS = ("eval-upsampler", "train-upsampler")
SIZED = ("generate", "demo", "bench", "geneval")  # the commands with --height and --steps
# failure -> (what to change, words the message must hold, the commands that have the option)
FAILURES = {
    "missing folder": ({"model": "missing"}, "no such folder", COMMANDS),
    "not a pipeline": ({"model": "empty"}, "has no ", COMMANDS),
    "malformed config": ({"model": "malformed"}, "is not valid JSON", COMMANDS),
    "truncated weights": ({"model": "truncated"}, "is not a complete safetensors file", COMMANDS),
    "upsampler config not JSON": ({"up": "up-not-json"}, "config.json is not valid JSON", COMMANDS),
    "upsampler config lacks keys": ({"up": "up-no-keys"}, "config.json lacks in_channels", COMMANDS),
    "upsampler weights truncated": ({"up": "up-truncated"}, "is not a complete safetensors file", COMMANDS),
    "unknown dtype": ({"extra": ["--dtype", "float17"]}, "argument --dtype: invalid choice: 'float17'", COMMANDS),
    "no cuda": ({"extra": ["--device", "cuda"]}, "--device cuda: this machine has no cuda device", COMMANDS),
    "unknown device": ({"extra": ["--device", "foo"]}, "--device 'foo' is not a device name", COMMANDS),
    "output under a file": ({"out": "under-file"}, "is a file, so", COMMANDS),
    "zero steps": ({"extra": ["--steps", "0"]}, "argument --steps", (*SIZED, "train-upsampler")),
    "negative size": ({"extra": ["--height", "-64"]}, "argument --height: must be a positive integer", SIZED),
    "zero resolution": ({"extra": ["--resolution", "0"]}, "--resolution", VAE_COMMANDS),
    "negative grid": (
        {"extra": ["--grid", "-1"]},
        "argument --grid: must be 0 or a positive integer",
        ("eval-upsampler",),
    ),
    "zero repeats": (
        {"extra": ["--repeats", "0"]},
        "argument --repeats: must be a positive integer",
        ("eval-upsampler",),
    ),
}


def _cases():
    for failure, (_, _, commands) in FAILURES.items():
        if failure == "no cuda" and torch.cuda.is_available():
            continue
        for command in commands:
            yield pytest.param(command, failure, id=f"{command}-{failure.replace(' ', '-')}")


def command_line(command, inputs, out, failure):
    change = FAILURES[failure][0]
    model = inputs[change.get("model", "vae" if command in VAE_COMMANDS else "model")]
    if command in VAE_COMMANDS and change.get("model") == "truncated":
        model = model / "vae"
    up = ["--init-from" if command == "train-upsampler" else "--upsampler", inputs[change.get("up", "upsampler")]]
    if change.get("out") == "under-file":
        out = inputs["file"] / out.name  # a folder cannot be made there, even by root
    values = {"model": model, "out": out, "prompts": inputs["prompts"], "images": inputs["images"]}
    argv = [command]
    for word in COMMANDS[command]:
        argv += [str(part) for part in up] if word == "{up}" else [word.format(**values)]
    return argv + ["--device", "cpu", *change.get("extra", [])]


@pytest.mark.parametrize(("command", "failure"), list(_cases()))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(command, failure, inputs, tmp_path, capsys):
    out = tmp_path / ("out.png" if command == "generate" else "out")
    assert main(command_line(command, inputs, out, failure)) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lssgen {command}: error: "), captured.err
    assert FAILURES[failure][1] in lines[0], lines[0]
    assert captured.out == ""  # refused before any work started
    assert list(tmp_path.iterdir()) == []  # no output, no staging folder, no temporary file
    assert inputs["file"].read_text() == "not a folder"


@pytest.mark.parametrize("command", list(COMMANDS))
def test_the_bad_input_cases_differ_from_a_good_run_in_one_input_only(command, inputs, tmp_path, capsys):
    out = tmp_path / ("out.png" if command == "generate" else "out")
    argv = command_line(command, inputs, out, "unknown dtype")[:-2]  # the same command line, without the failure
    assert main(argv) == 0, capsys.readouterr().err
    assert out.exists() and [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary file left behind


def test_output_that_cannot_be_an_image_is_refused_before_loading(inputs, tmp_path, capsys):
    for out, words in [(tmp_path, "is a folder"), (tmp_path / "image.xyz", "unknown image type '.xyz'")]:
        argv = ["generate", "--model", str(inputs["model"]), "--device", "cpu", "--out", str(out)]
        assert main(argv) == 2
        captured = capsys.readouterr()
        assert words in captured.err and captured.out == ""
    assert list(tmp_path.iterdir()) == []


def test_device_names_are_checked():
    assert check_device("cpu") == "cpu"
    assert check_device(None) == ("cuda" if torch.cuda.is_available() else "cpu")
    for name, words in [("meta", "cannot compute on 'meta'"), ("cuda:x", "not a device name")]:
        with pytest.raises(ValueError, match=words):
            check_device(name)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="numbered from 0"):
            check_device(f"cuda:{torch.cuda.device_count()}")


def test_adapters_lists_installed_adapters_with_their_package():
    result = run("adapters")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["adapter", "pipelines", "kind", "steps", "guidance", "shorten", "package"]
    # Columns are separated by two spaces or more; a pipelines cell lists its classes with ", ".
    rows = {cells[0]: cells[1:] for cells in (re.split(r"\s{2,}", line.strip()) for line in lines[1:])}
    expected = {
        "flux": (
            [
                "FluxPipeline",
                "FluxImg2ImgPipeline",
                "FluxInpaintPipeline",
                "FluxControlNetPipeline",
                "FluxFillPipeline",
                "FluxControlPipeline",
                "FluxControlImg2ImgPipeline",
                "FluxControlInpaintPipeline",
            ],
            "flow", "50", "3.5", "on",
        ),
        "sd3": (
            [
                "StableDiffusion3Pipeline",
                "StableDiffusion3Img2ImgPipeline",
                "StableDiffusion3InpaintPipeline",
                "StableDiffusion3ControlNetPipeline",
            ],
            "flow", "40", "4.5", "on",
        ),
        "sdxl": (
            [
                "StableDiffusionXLPipeline",
                "StableDiffusionXLImg2ImgPipeline",
                "StableDiffusionXLInpaintPipeline",
                "StableDiffusionXLControlNetPipeline",
            ],
            "diffusion", "50", "5.0", "off",
        ),
        "sd": (
            [
                "StableDiffusionPipeline",
                "StableDiffusionImg2ImgPipeline",
                "StableDiffusionInpaintPipeline",
                "StableDiffusionControlNetPipeline",
            ],
            "diffusion", "50", "7.5", "off",
        ),
        "cogview4": (["CogView4Pipeline", "CogView4ControlPipeline"], "flow", "50", "3.5", "on"),
        # 4.0: true_cfg_scale
        "qwenimage": (
            [
                "QwenImagePipeline",
                "QwenImageImg2ImgPipeline",
                "QwenImageInpaintPipeline",
                "QwenImageControlNetPipeline",
            ],
            "flow", "50", "4.0", "on",
        ),
        "zimage": (["ZImagePipeline", "ZImageImg2ImgPipeline", "ZImageControlNetPipeline"], "flow", "8", "0.0", "on"),
    }  # fmt: skip
    for name, (classes, *settings) in expected.items():
        assert rows[name] == [", ".join(classes), *settings, "lssgen"], name


# --- loose ends of the command line ------------------------------------------------------------------------------


def test_geneval_passes_max_sequence_length_to_the_pipeline(tiny_flux_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "a photo of a cat"}) + "\n")
    common = [str(prompts), "--model", str(tiny_flux_dir), *SIZE, "--images-per-prompt", "1", "--device", "cpu"]
    assert main(["geneval", *common, "--out", str(tmp_path / "default")]) == 0, capsys.readouterr().err
    assert main(["geneval", *common, "--max-sequence-length", "8", "--out", str(tmp_path / "short")]) == 0
    settings = json.loads((tmp_path / "short" / "run.json").read_text())["settings"]
    assert settings["max_sequence_length"] == 8
    # FLUX.1 attends to T5's padding too, so a shorter prompt length changes the image: it reached the pipeline.
    default, short = (
        np.asarray(Image.open(tmp_path / run / "00000" / "samples" / "0000.png")) for run in ("default", "short")
    )
    assert not np.array_equal(default, short)


def test_a_relative_model_path_that_does_not_exist_is_no_such_folder(tmp_path, monkeypatch, capsys):
    from lssgen.loading import check_pipeline, check_upsampler

    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights").mkdir()
    for value in ("weights/scene-t2x", "./nope", "~/no-such-folder-here", "a/b/c"):
        with pytest.raises(ValueError, match=f"^--model {value}: no such folder"):
            check_pipeline(value)
    with pytest.raises(ValueError, match="no such folder"):
        check_upsampler("weights/flux2-x3")
    check_pipeline("black-forest-labs/FLUX.1-dev")  # a hub id is still the hub's to check
    assert main(["generate", "--model", "weights/scene-t2x", "--device", "cpu"]) == 2
    captured = capsys.readouterr()
    assert captured.err == "lssgen generate: error: --model weights/scene-t2x: no such folder.\n"
    assert captured.out == ""


def test_guidance_goes_to_the_argument_the_adapter_names():
    import argparse

    import lssgen
    from lssgen.cli.options import call_arguments
    from lssgen.tiny import build_tiny_qwenimage_pipeline, tiny_qwenimage_prompt_embeds

    pipe = build_tiny_qwenimage_pipeline()
    adapter = lssgen.find_adapter(pipe)
    assert adapter.guidance_argument == "true_cfg_scale"  # QwenImagePipeline's CFG; guidance_scale is ignored
    embeds, mask = tiny_qwenimage_prompt_embeds(pipe, "a lighthouse on a cliff")
    negative, negative_mask = tiny_qwenimage_prompt_embeds(pipe, " ")
    prompt = {"prompt_embeds": embeds, "prompt_embeds_mask": mask}
    prompt |= {"negative_prompt_embeds": negative, "negative_prompt_embeds_mask": negative_mask}
    images = {}
    for guidance in (1.0, 4.0):
        args = argparse.Namespace(prompt=None, guidance=guidance)
        call = call_arguments(args, adapter, height=64, width=64, steps=2)
        assert call["true_cfg_scale"] == guidance and "guidance_scale" not in call
        generator = torch.Generator().manual_seed(0)
        images[guidance] = pipe(**call, **prompt, generator=generator, output_type="pt").images
    assert not torch.equal(images[1.0], images[4.0])  # the value reached the guidance the pipeline applies
    default = call_arguments(argparse.Namespace(prompt="x", guidance=None), adapter, height=64, width=64, steps=2)
    assert default["true_cfg_scale"] == adapter.default_guidance


def test_without_upsampler_patch_chooses_the_shipped_one(tmp_path):
    # `lssgen.patch(pipe)` picks the shipped FLUX.2 upsampler where it fits; `upsampler=None` would mean latent
    # interpolation, so the command line must leave the keyword out when --upsampler is not given.
    from lssgen import LatentUpsampler
    from lssgen.cli.options import patch
    from lssgen.scenes.model import build_pipeline

    pipe = build_pipeline(TinyFlux2Autoencoder(), seed=0, channels=(8, 16))
    patch(pipe, None)
    assert isinstance(pipe.__dict__["_lssgen"].upsampler, LatentUpsampler)


def test_command_line_tests_run_this_environments_lssgen():
    """The subprocess tests run the `lssgen` of the interpreter under test, not the first one on PATH (another
    checkout's or environment's would test other code): the console script beside `sys.executable`, else
    `python -m lssgen` with this interpreter."""
    assert LSSGEN[0] == str(Path(sys.executable).with_name("lssgen")) or LSSGEN[:3] == [sys.executable, "-m", "lssgen"]
