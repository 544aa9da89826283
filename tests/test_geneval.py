"""`lssgen geneval`: GenEval layout, resume, seeds independent of batching and processes, errors, both modes."""

import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from console_script import LSSGEN
from PIL import Image

import lssgen
from lssgen.cli import build_parser, main
from lssgen.evaluation.geneval import GenEvalSettings, image_seed, parse_pipeline_type, read_prompts, run_geneval
from lssgen.tiny import build_tiny_flux_pipeline

PROMPTS = [
    {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"},
    {"tag": "two_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog and a bench"},
    {"tag": "counting", "include": [{"class": "apple", "count": 2}], "prompt": "a photo of two apples"},
    {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a photo of a red car"},
    {"tag": "position", "include": [], "prompt": "a photo of a bird left of a tree"},
    {"tag": "color_attr", "include": [], "prompt": "a photo of a green umbrella and a blue vase"},
]
IMAGES = 2
# Non-square and small; min_resolution 48 leaves room for one half-size stage (64x48, then 128x96).
SIZE = ["--height", 128, "--width", 96, "--steps", 4, "--min-resolution", 48, "--no-shorten-intermediate-steps"]
SETTINGS = {"height": 128, "width": 96, "steps": 4, "min_resolution": 48, "shorten_intermediate_steps": False}


def _env(tmp_path):
    # One thread per process, so one and two processes do the same arithmetic; a private HF_HOME, so no
    # accelerate config file of the machine's applies and `accelerate launch` never prompts.
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1"}


def run_cli(tmp_path, *args):
    command = [*LSSGEN, "geneval", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=_env(tmp_path), timeout=300)


def common_args(model, prompts, out, *extra):
    return [prompts, "--model", model, "--out", out, *SIZE, "--images-per-prompt", IMAGES, "--device", "cpu", *extra]


def pixels(path):
    with Image.open(path) as image:
        return np.array(image)


def files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != "run.json")


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "evaluation_metadata.jsonl"
    path.write_text("".join(json.dumps(entry) + "\n" for entry in PROMPTS))
    return path


@pytest.fixture(scope="session")
def single_run(tiny_flux_dir, prompts_file, tmp_path_factory):
    """One process, one image per call, through the installed console script."""
    tmp = tmp_path_factory.mktemp("single")
    out = tmp / "out"
    result = run_cli(tmp, *common_args(tiny_flux_dir, prompts_file, out, "--batch-size", 1))
    assert result.returncode == 0, result.stderr
    return out, result


def test_layout_is_genevals(single_run):
    out, result = single_run
    assert sorted(p.name for p in out.iterdir()) == [f"{i:05d}" for i in range(len(PROMPTS))] + ["run.json"]
    for index, entry in enumerate(PROMPTS):
        folder = out / f"{index:05d}"
        assert sorted(p.name for p in folder.iterdir()) == ["metadata.jsonl", "samples"]
        assert json.loads((folder / "metadata.jsonl").read_text()) == entry
        assert sorted(p.name for p in (folder / "samples").iterdir()) == ["0000.png", "0001.png"]
        assert pixels(folder / "samples" / "0000.png").shape == (128, 96, 3)

    run = json.loads((out / "run.json").read_text())
    assert {"settings", "versions", "prompts", "skipped", "summary", "device", "num_processes"} <= set(run)
    assert run["status"] == "complete" and run["num_processes"] == 1 and run["device"] == "cpu"
    assert {key: run["settings"][key] for key in SETTINGS} == SETTINGS
    assert run["settings"]["mode"] == "lssgen" and run["settings"]["pipeline"] == "flux"
    assert run["settings"]["dtype"] == "float32" and run["settings"]["batch_size"] == 1
    assert {"lssgen", "diffusers", "torch", "transformers", "accelerate", "python"} <= set(run["versions"])
    assert [entry["index"] for entry in run["prompts"]] == list(range(len(PROMPTS))) and run["skipped"] == []
    assert all(entry["seconds"] > 0 and entry["images"] == IMAGES for entry in run["prompts"])
    summary = run["summary"]
    assert summary["images"] == len(PROMPTS) * IMAGES and summary["generated_prompts"] == len(PROMPTS)
    assert summary["median_seconds_per_image"] > 0 and summary["total_seconds"] > 0

    assert "device cpu, float32, 1 process(es)" in result.stdout
    assert "1/2    48x64" in result.stdout and "2/2    96x128" in result.stdout  # two stages: lssgen really ran


def test_resume_redoes_only_incomplete_prompts(single_run, tiny_flux_dir, prompts_file, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(single_run[0], out)  # copy2 keeps mtimes
    deleted = out / "00002" / "samples" / "0001.png"
    original = pixels(deleted)
    deleted.unlink()
    (out / "00004" / "samples" / ".0000.png.999.tmp").write_bytes(b"\x89PNG trunc")  # a crash's leftover
    before = {path: path.stat().st_mtime_ns for path in out.rglob("*") if path.is_file()}

    result = run_cli(tmp_path, *common_args(tiny_flux_dir, prompts_file, out, "--batch-size", 1))
    assert result.returncode == 0, result.stderr
    assert "5 prompts already complete" in result.stdout
    changed = sorted(str(p.relative_to(out)) for p, t in before.items() if p.exists() and p.stat().st_mtime_ns != t)
    assert changed == ["00002/metadata.jsonl", "00002/samples/0000.png", "run.json"]
    assert np.array_equal(pixels(deleted), original)  # the same seed, the same image
    run = json.loads((out / "run.json").read_text())
    assert run["skipped"] == [0, 1, 3, 4, 5] and [entry["index"] for entry in run["prompts"]] == [2]
    assert run["summary"]["images"] == IMAGES

    # Other settings in the same folder would mix two experiments: refused before anything is written.
    settings = GenEvalSettings(model=str(tiny_flux_dir), out=str(out), images_per_prompt=IMAGES, seed=1, **SETTINGS)
    with pytest.raises(ValueError, match=r"holds a run with other settings \(seed: 0 -> 1\).*another --out"):
        run_geneval(prompts_file, settings)
    assert json.loads((out / "run.json").read_text()) == run


def assert_same_image(a, b, name=""):
    """Equal up to rounding: batched kernels may round the last bit of a latent differently (about 1e-7), which
    moves a handful of pixels by one level out of 255; nothing more."""
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (name, diff.max(), (diff > 0).mean())


def test_images_do_not_depend_on_batch_size(tiny_flux_dir, prompts_file, tmp_path):
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps(PROMPTS[3]) + "\n")
    settings = GenEvalSettings(model=str(tiny_flux_dir), out="", images_per_prompt=3, seed=7, device="cpu", **SETTINGS)
    for batch in (1, 3):
        run_geneval(one, replace(settings, out=str(tmp_path / f"b{batch}"), batch_size=batch))
    names = files_under(tmp_path / "b1")
    assert names == files_under(tmp_path / "b3") and len(names) == 4
    images = [pixels(tmp_path / "b1" / name) for name in names if name.endswith(".png")]
    for name in names:
        if name.endswith(".png"):
            assert_same_image(pixels(tmp_path / "b1" / name), pixels(tmp_path / "b3" / name), name)
    # ... while the images of one prompt differ from each other: each has its own seed.
    assert np.abs(images[0].astype(int) - images[1].astype(int)).mean() > 5


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_write_what_one_does(single_run, tiny_flux_dir, prompts_file, tmp_path):
    accelerate = shutil.which("accelerate") or os.path.join(os.path.dirname(sys.executable), "accelerate")
    out = tmp_path / "out"
    # `--multi_gpu` is accelerate's multi-process launcher (torchrun); on a machine without GPUs lssgen runs the
    # processes on the CPU (`--cpu` alone would start a single process).
    launch = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    # The same batch size as the one-process run, so each image is the very same computation: bit-identical.
    args = common_args(tiny_flux_dir, prompts_file, out, "--batch-size", 1)
    result = subprocess.run(
        [*launch, "-m", "lssgen", "geneval", *map(str, args)],
        capture_output=True,
        text=True,
        env=_env(tmp_path),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert files_under(out) == files_under(single_run[0])
    for name in files_under(out):
        if name.endswith(".png"):
            assert np.array_equal(pixels(out / name), pixels(single_run[0] / name)), name
        else:
            assert (out / name).read_text() == (single_run[0] / name).read_text()
    run = json.loads((out / "run.json").read_text())
    assert run["num_processes"] == 2 and run["status"] == "complete"
    assert [entry["index"] for entry in run["prompts"]] == list(range(len(PROMPTS)))
    assert {entry["process"] for entry in run["prompts"]} == {0, 1}
    assert not list(out.glob(".process-*"))  # per-process timing files are merged and removed


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "a cat",', "line 3: not valid JSON"),
        ('["a cat"]', "line 3: expected a JSON object"),
        ('{"tag": "single_object"}', 'line 3: needs a non-empty string "prompt" key'),
    ],
)
def test_invalid_prompt_line_is_named(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(PROMPTS[0]) + "\n" + json.dumps(PROMPTS[1]) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=message):
        read_prompts(path)


def test_malformed_file_exits_2_and_writes_nothing(tiny_flux_dir, tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(PROMPTS[0]) + "\n\n" + '{"prompt": "a dog"' + "\n")
    out = tmp_path / "out"
    assert main(["geneval", str(path), "--model", str(tiny_flux_dir), "--out", str(out), "--device", "cpu"]) == 2
    assert f"lssgen geneval: error: {path}, line 3: not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_baseline_is_the_stock_pipeline(tiny_flux_dir, tmp_path):
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps(PROMPTS[0]) + "\n")
    common = {"model": str(tiny_flux_dir), "images_per_prompt": 2, "seed": 5, "device": "cpu", **SETTINGS}
    run = run_geneval(one, GenEvalSettings(out=str(tmp_path / "base"), mode="baseline", **common))
    assert run["settings"]["mode"] == "baseline" and run["settings"]["start_sigma"] is None
    run_geneval(one, GenEvalSettings(out=str(tmp_path / "fast"), mode="lssgen", **common))

    pipe = build_tiny_flux_pipeline(seed=0)  # the saved weights: a stock call with the documented seed
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(
        PROMPTS[0]["prompt"],
        height=128,
        width=96,
        num_inference_steps=4,
        guidance_scale=3.5,
        generator=torch.Generator("cpu").manual_seed(image_seed(5, 0, 1)),
    ).images[0]
    assert_same_image(pixels(tmp_path / "base/00000/samples/0001.png"), np.asarray(expected))  # batch 2 vs 1
    # lssgen mode runs the patched pipe: the same seeds, other images.
    fast = pixels(tmp_path / "fast/00000/samples/0001.png").astype(int)
    assert np.abs(fast - np.asarray(expected).astype(int)).mean() > 1


def test_bad_settings_are_refused_before_loading(prompts_file, tmp_path):
    settings = {"model": str(tmp_path / "no-model"), "out": str(tmp_path / "out")}
    with pytest.raises(ValueError, match=r"--pipeline 'nope' is not an installed lssgen adapter; installed: .*flux"):
        run_geneval(prompts_file, GenEvalSettings(**settings, pipeline="nope"))
    with pytest.raises(ValueError, match="--images-per-prompt must be a positive integer"):
        run_geneval(prompts_file, GenEvalSettings(**settings, images_per_prompt=0))
    with pytest.raises(ValueError, match=r"--model .*no-model: no such folder"):
        run_geneval(prompts_file, GenEvalSettings(**settings))
    assert not (tmp_path / "out").exists()


def test_image_seed_is_stable():
    # Pinned values: a change here would silently change every GenEval image set generated so far.
    assert image_seed(0, 0, 0) == 2865820019155232562
    assert image_seed(0, 12, 3) == 1447446557767598380
    assert len({image_seed(s, p, i) for s in range(2) for p in range(20) for i in range(4)}) == 160


# --- the published batch script's command line ------------------------------------------------------------------


def published_and_ours(model, upsampler, prompts, out, pipeline_type):
    """The published README's line (plus the size and device options both spellings share) and ours."""
    shared = [prompts, "--model", model, "--height", 128, "--width", 96, "--images-per-prompt", 1, "--device", "cpu"]
    published = [*shared, "--upscale_model", upsampler, "--pipeline_type", pipeline_type]
    published += ["--output_dir", out / "published", "--num_inference_steps", 4, "--guidance_scale", 3.5]
    published += ["--start_sigma", 0.75, "--shorten_intermediate_steps", "True", "--min_size", 48]
    mode = "lssgen" if pipeline_type.startswith("lss") else "baseline"
    ours = [*shared, "--upsampler", upsampler, "--mode", mode, "--pipeline", "flux", "--out", out / "ours"]
    ours += ["--steps", 4, "--guidance", 3.5, "--start-sigma", 0.75, "--shorten-intermediate-steps"]
    ours += ["--min-resolution", 48]
    return ["geneval", *map(str, published)], ["geneval", *map(str, ours)]


@pytest.mark.parametrize(("pipeline_type", "mode"), [("lssflux", "lssgen"), ("flux", "baseline")])
def test_published_command_line_runs_as_ours(pipeline_type, mode, tiny_flux_dir, tiny_upsampler_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(entry) + "\n" for entry in PROMPTS[:2]))
    published, ours = published_and_ours(tiny_flux_dir, tiny_upsampler_dir, prompts, tmp_path, pipeline_type)
    assert main(published) == 0 and main(ours) == 0

    runs = {name: json.loads((tmp_path / name / "run.json").read_text()) for name in ("published", "ours")}
    settings = {name: {k: v for k, v in run["settings"].items() if k != "out"} for name, run in runs.items()}
    assert settings["published"] == settings["ours"]
    assert settings["ours"]["mode"] == mode and settings["ours"]["pipeline"] == "flux"
    assert settings["ours"]["steps"] == 4 and settings["ours"]["guidance"] == 3.5
    if mode == "lssgen":
        assert settings["ours"]["upsampler"] == str(tiny_upsampler_dir.resolve())
        assert settings["ours"]["min_resolution"] == 48 and settings["ours"]["shorten_intermediate_steps"] is True
    names = files_under(tmp_path / "ours")
    assert names == files_under(tmp_path / "published") and len(names) == 4  # 2 prompts: metadata + 1 sample
    for name in names:
        if name.endswith(".png"):
            assert np.array_equal(pixels(tmp_path / "ours" / name), pixels(tmp_path / "published" / name)), name


def test_each_pipeline_type_is_a_family_and_a_mode():
    expected = {}
    for family in ("flux", "sd3", "sdxl", "sd", "cogview4"):
        expected[family] = ("baseline", family)
        expected[f"lss{family}"] = ("lssgen", family)
    assert {name: parse_pipeline_type(name) for name in expected} == expected
    with pytest.raises(ValueError, match=r"'fluxx' is none of .*flux, lssflux.*sdxl, lsssdxl"):
        parse_pipeline_type("fluxx")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        # The names listed (a pair per installed adapter): test_each_pipeline_type_is_a_family_and_a_mode.
        (["--pipeline_type", "lss-flux"], "--pipeline_type 'lss-flux' is none of "),
        (["--pipeline_type", "lsssd3"], "holds a FluxPipeline, not a pipeline of the sd3 family"),
        (["--pipeline_type", "sdxl"], "holds a FluxPipeline, not a pipeline of the sdxl family"),
        (["--pipeline_type", "lssflux", "--mode", "baseline"], "means --mode lssgen, but --mode baseline was given"),
        (["--pipeline_type", "flux", "--pipeline", "sd3"], "means --pipeline flux, but --pipeline sd3 was given"),
        (["--shorten_intermediate_steps", "yes"], "expected True or False (or true/false/1/0), got 'yes'"),
    ],
)
def test_wrong_pipeline_type_is_a_clear_error(extra, message, tiny_flux_dir, prompts_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["geneval", str(prompts_file), "--model", str(tiny_flux_dir), "--output_dir", str(out), *extra]) == 2
    lines = capsys.readouterr().err.splitlines()
    # A family mismatch is seen once the pipeline is loaded, after diffusers' loading bars: the error is the one
    # line that says "error", and the last.
    assert [line for line in lines if "error" in line] == lines[-1:], lines
    assert lines[-1].startswith("lssgen geneval: error: ") and message in lines[-1], lines
    assert not out.exists()


def test_shorten_intermediate_steps_takes_a_value_in_the_published_spelling():
    parser = build_parser()
    base = ["geneval", "prompts.jsonl", "--model", "m", "--out", "o"]
    for value, expected in [("True", True), ("true", True), ("1", True), ("False", False), ("false", False)]:
        assert parser.parse_args([*base, "--shorten_intermediate_steps", value]).shorten_intermediate_steps is expected
    assert parser.parse_args([*base, "--shorten_intermediate_steps", "0"]).shorten_intermediate_steps is False
    assert parser.parse_args([*base, "--no-shorten-intermediate-steps"]).shorten_intermediate_steps is False
    assert parser.parse_args([*base, "--shorten-intermediate-steps"]).shorten_intermediate_steps is True
    assert parser.parse_args(base).shorten_intermediate_steps is None  # the family's default


def test_a_method_is_chosen_recorded_and_its_images_are_the_patched_pipelines(tiny_flux_dir, tmp_path, capsys):
    """`--method refine`: run.json records it and no start_sigma (refine reads none), and the images are those of
    the patched pipeline called with that method and the documented seed; a start_sigma given with it is refused."""
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps(PROMPTS[0]) + "\n")
    size = ["--height", 128, "--width", 128, "--steps", 4, "--images-per-prompt", 1, "--device", "cpu"]
    args = [one, "--model", tiny_flux_dir, "--out", tmp_path / "refine", *size, "--method", "refine:sigma=0.2"]
    assert main(["geneval", *map(str, args)]) == 0
    run = json.loads((tmp_path / "refine/run.json").read_text())
    assert run["settings"]["method"] == "refine:sigma=0.2" and run["settings"]["start_sigma"] is None

    pipe = build_tiny_flux_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    lssgen.patch(pipe)
    expected = pipe(
        PROMPTS[0]["prompt"],
        height=128,
        width=128,
        num_inference_steps=4,
        guidance_scale=3.5,
        method="refine:sigma=0.2",
        generator=torch.Generator("cpu").manual_seed(image_seed(0, 0, 0)),
    ).images[0]
    assert_same_image(pixels(tmp_path / "refine/00000/samples/0000.png"), np.asarray(expected))

    refused = [
        one,
        "--model",
        tiny_flux_dir,
        "--out",
        tmp_path / "no",
        *size,
        "--method",
        "refine",
        "--start-sigma",
        0.5,
    ]
    capsys.readouterr()
    assert main(["geneval", *map(str, refused)]) == 2
    error = " ".join(capsys.readouterr().err.split())
    assert "`start_sigma` (given to the command line) does not apply to method 'refine'" in error
    assert "Loading" not in error and not (tmp_path / "no").exists()  # refused before the pipeline loads
    library = GenEvalSettings(model=str(tmp_path / "no-model"), out=str(tmp_path / "no"), method="refine")
    with pytest.raises(ValueError, match=r"`start_sigma` \(given to lssgen geneval\) does not apply"):
        run_geneval(one, replace(library, start_sigma=0.5))
