"""`lssgen eval-generation`: every setting side by side on the held-out scene prompts, scored and timed in one run.

A tiny random-weight FluxPipeline (it takes string prompts) stands in for the trained scene model here: the images
are noise, so these tests check the machinery (what runs, what is compared with what, the report), not accuracy.
"""

import json
import math

import numpy as np
import pytest
import torch

import lssgen
from lssgen.autoencoders import TinyFlux2Autoencoder
from lssgen.cli import main
from lssgen.evaluation.generation import (
    TILE,
    GenerationSetting,
    default_settings,
    equal_speed_settings,
    evaluate_generation,
    rescore_generation,
    write_report,
)
from lssgen.evaluation.upsampler import LABEL_HEIGHT
from lssgen.scenes.scorer import CheckResult, SceneScorer
from lssgen.scenes.world import ATTRIBUTES, CATEGORIES, evaluation_scenes, satisfies
from lssgen.tiny import build_tiny_flux_pipeline
from scripts.pareto_plot import label, pareto_front, pareto_plot
from scripts.run_grid import run_grid

SIZE, STEPS = 64, 4


@pytest.fixture(scope="module")
def scorer():
    return SceneScorer.from_pretrained(lssgen.weights_path("scene-scorer"))


def test_default_settings_cover_every_space_sigma_and_stage_count():
    settings = default_settings(256, 20, learned=True)
    assert settings[0].name == "stock 20 steps" and settings[0].is_stock
    lssgen_settings = [s.options for s in settings[1:]]
    assert len(lssgen_settings) == 3 * 2 * 2
    assert {(o["scaling_space"], o["start_sigma"], o["min_resolution"]) for o in lssgen_settings} == {
        (space, sigma, side)
        for space in ("learned", "latent", "pixel")
        for sigma in (0.75, 0.667)
        for side in (128, 64)
    }
    assert all(s.options.get("scaling_space") != "learned" for s in default_settings(256, 20, learned=False))


def test_equal_speed_baselines_fit_in_each_lssgen_settings_time():
    settings = [GenerationSetting("stock 20 steps", 20), *default_settings(256, 20, learned=False)[1:4]]
    # 1 s per stock step; the lssgen settings took 12.4, 7.6 and 12.6 s: 12, 8 and 13 steps fit in those times.
    seconds = {"stock 20 steps": 20.0, **dict(zip([s.name for s in settings[1:]], (12.4, 7.6, 12.6)))}
    extra = equal_speed_settings(settings, seconds)
    assert [(s.steps, s.matches) for s in extra] == [
        (13, settings[3].name),
        (12, settings[1].name),
        (8, settings[2].name),
    ]
    assert all(s.is_stock for s in extra)
    # A setting no faster than the stock pipeline gets no baseline (it would not be fewer steps).
    assert equal_speed_settings(settings[:2], {"stock 20 steps": 20.0, settings[1].name: 25.0}) == []


def test_every_setting_is_generated_scored_and_compared_with_the_stock_images(scorer):
    pipe = build_tiny_flux_pipeline(seed=0)
    scenes = evaluation_scenes()[:6]  # one of each category
    settings = [
        GenerationSetting("stock", STEPS),
        GenerationSetting("lssgen", STEPS, {"start_sigma": 0.75, "min_resolution": SIZE // 2}),
    ]
    report = evaluate_generation(
        pipe,
        scorer,
        scenes,
        size=SIZE,
        steps=STEPS,
        settings=settings,
        call={"max_sequence_length": 32},
        progress=False,
    )
    assert not lssgen.is_patched(pipe)  # patched for the run only
    names = [score.name for score in report.scores]
    assert names[:2] == ["stock", "lssgen"]
    assert all(s.startswith("stock ") and s.endswith("(equal time)") for s in names[2:])
    stock, scaled = report.scores[:2]
    for score in report.scores:
        assert set(score.accuracy) == {*CATEGORIES, "overall"}
        assert all(0.0 <= value <= 1.0 for value in score.accuracy.values())
        assert score.accuracy["overall"] == pytest.approx(sum(score.accuracy[c] for c in CATEGORIES) / 6)
        # One verdict per prompt, in order: each category's accuracy is its prompts' share of passes.
        assert len(score.passed) == len(scenes)
        for category in CATEGORIES:
            verdicts = [p for p, scene in zip(score.passed, scenes) if scene.category == category]
            assert score.accuracy[category] == sum(verdicts) / len(verdicts)
        assert score.kid is not None and math.isfinite(score.kid)
        assert score.seconds > 0
    assert stock.psnr is None and stock.time_ratio == 1.0
    assert math.isfinite(scaled.psnr) and -1 <= scaled.ssim < 1  # noise images of different plans differ
    assert report.grid.size == (TILE * (1 + len(names)), LABEL_HEIGHT + TILE * 6)
    assert "| stock | 4 |" in report.markdown() and "| lssgen | 4 |" in report.markdown()

    # The stock column is the stock pipeline: the same seed on a never-patched pipe gives the same first image.
    reference = build_tiny_flux_pipeline(seed=0)
    reference.set_progress_bar_config(disable=True)
    alone = reference(
        scenes[0].caption,
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        max_sequence_length=32,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    again = evaluate_generation(
        pipe,
        scorer,
        scenes[:1],
        size=SIZE,
        steps=STEPS,
        settings=settings[:1],
        equal_speed=False,
        call={"max_sequence_length": 32},
        progress=False,
    )
    assert again.scores[0].kid is None  # one image is no distribution
    assert torch.equal(_first_grid_tile(again, column=1), _tile(alone[0]))


def _stock_and_lssgen_report(pipe, scorer, scenes, **kwargs):
    """The report of two settings, stock and two-stage lssgen, on `scenes`, without equal-speed baselines."""
    return evaluate_generation(
        pipe,
        scorer,
        scenes,
        size=SIZE,
        steps=STEPS,
        settings=[GenerationSetting("stock", STEPS), GenerationSetting("lssgen", STEPS, {"min_resolution": SIZE // 2})],
        equal_speed=False,
        call={"max_sequence_length": 32},
        progress=False,
        **kwargs,
    )


class HandMadeDetections:
    """A scorer whose detections are given: for each setting in turn (the order the report scores them), one tuple
    of found objects per prompt. KID still reads the real scorer's features."""

    def __init__(self, scorer, detections_by_setting):
        self.scorer, self.detections = scorer, iter(detections_by_setting)

    def feature_extractor(self):
        return self.scorer.feature_extractor()

    def score(self, images, scenes):
        found = next(self.detections)
        assert len(found) == len(images) == len(scenes)
        return [
            CheckResult(satisfies(s.check, f), s.caption, s.category, ATTRIBUTES[s.category], f)
            for s, f in zip(scenes, found)
        ]


def test_the_report_carries_the_duplication_measure_per_setting(scorer):
    pipe = build_tiny_flux_pipeline(seed=0)
    scenes = evaluation_scenes()[:3]  # a single object, two objects, a number
    duplicated = scenes[0].objects * 3  # two extra instances of the one named object
    stock_found = [scene.objects for scene in scenes]
    lssgen_found = [duplicated, scenes[1].objects, scenes[2].objects[1:]]  # the third misses one instance
    report = _stock_and_lssgen_report(pipe, HandMadeDetections(scorer, [stock_found, lssgen_found]), scenes)
    stock, scaled = report.scores
    assert (stock.exact, stock.extra, stock.extra_instances, stock.missing_instances) == (1.0, 0.0, [0] * 3, [0] * 3)
    assert (scaled.exact, scaled.extra) == (pytest.approx(1 / 3), pytest.approx(2 / 3))
    assert (scaled.extra_instances, scaled.missing_instances) == ([2, 0, 0], [0, 0, 1])
    assert scaled.passed[0]  # GenEval's rules accept the duplicates: the measure is what sees them
    assert report.to_dict()["scores"][1]["extra_instances"] == [2, 0, 0]
    header, rows = _markdown_table(report.markdown())
    assert header[header.index("overall") + 1 : header.index("overall") + 3] == ["exact", "extra"]
    assert {name: (row["exact"], row["extra"]) for name, row in rows.items()} == {
        "stock": ("1.00", "0.00"),
        "lssgen": ("0.33", "0.67"),
    }


def test_a_run_saved_with_its_images_is_scored_again_by_another_scorer(scorer, tmp_path):
    pipe = build_tiny_flux_pipeline(seed=0)
    scenes = evaluation_scenes()[:3]
    first = _stock_and_lssgen_report(pipe, scorer, scenes, save_images_to=tmp_path / "run")
    write_report(first, tmp_path / "run")
    saved = sorted(str(path.relative_to(tmp_path / "run")) for path in (tmp_path / "run" / "images").rglob("*.png"))
    assert saved == [f"images/{row:02d}/{index:03d}.png" for row in range(2) for index in range(3)]

    # The other scorer finds two extra instances where the first setting's judge found what it found.
    duplicated = [scenes[0].objects * 3, scenes[1].objects, scenes[2].objects]
    again = rescore_generation(
        tmp_path / "run", HandMadeDetections(scorer, [duplicated, duplicated]), scorer_name="hand-made", progress=False
    )
    assert [s.name for s in again.scores] == ["stock", "lssgen"]
    for old, new in zip(first.scores, again.scores, strict=True):
        assert (new.exact, new.extra_instances) == (pytest.approx(2 / 3), [2, 0, 0])
        assert (new.seconds, new.time_ratio) == (pytest.approx(old.seconds), pytest.approx(old.time_ratio))
        assert (new.steps, new.options) == (old.steps, old.options)
    # The images are the saved ones (8 bits): fidelity to the stock images is measured again and barely moves.
    for name, images in first.images.items():
        assert (again.images[name] - images).abs().max() <= 0.5 / 255 + 1e-6
    assert again.scores[1].psnr == pytest.approx(first.scores[1].psnr, abs=0.05)
    assert again.settings["scorer"] == "hand-made" and "scored again" in again.markdown()

    # The README's side-by-side grid comes from such a folder: a row per prompt, a column per setting.
    grid = run_grid(tmp_path / "run", [0, 2], ["lssgen", "stock"], tile=32)
    assert grid.height == LABEL_HEIGHT + 2 * 32 and grid.width > 2 * 32
    with pytest.raises(SystemExit, match="not settings of"):
        run_grid(tmp_path / "run", [0], ["stock 20 steps"], tile=32)
    # And the methods' quality-against-time plot: a point per setting, the front marked.
    plot = pareto_plot(json.loads((tmp_path / "run" / "report.json").read_text()), "exact", size=(400, 300))
    assert plot.size == (400, 300) and len(set(plot.getdata())) > 3

    # A run without its images, or a report of other prompts, is refused, naming what is wrong.
    write_report(first, tmp_path / "no-images")
    with pytest.raises(FileNotFoundError, match="--save-images"):
        rescore_generation(tmp_path / "no-images", scorer, progress=False)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    run["settings"]["captions"][0] = "a photo of a moon"
    (tmp_path / "run" / "run.json").write_text(json.dumps(run))
    with pytest.raises(ValueError, match="held-out set's first prompts"):
        rescore_generation(tmp_path / "run", scorer, progress=False)


def test_a_run_whose_scoring_failed_is_scored_from_its_folder(scorer, tmp_path):
    # The images and the run's settings and times are on disk before scoring starts: a run killed while scoring
    # (a 96-prompt run at 512 px once ran out of memory there) loses none of its hour of generation.
    class KilledWhileScoring:
        def score(self, images, scenes):
            raise MemoryError("killed while scoring")

    pipe = build_tiny_flux_pipeline(seed=0)
    scenes = evaluation_scenes()[:2]
    with pytest.raises(MemoryError):
        _stock_and_lssgen_report(pipe, KilledWhileScoring(), scenes, save_images_to=tmp_path / "run")
    assert not (tmp_path / "run" / "report.json").exists()
    report = rescore_generation(tmp_path / "run", scorer, progress=False)
    assert [s.name for s in report.scores] == ["stock", "lssgen"]
    assert all(s.seconds > 0 for s in report.scores) and report.scores[0].time_ratio == 1.0
    assert report.settings["captions"] == [scene.caption for scene in scenes]


def _markdown_table(markdown):
    """The report's table: its header cells, and each row's cells by header, by setting name."""
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")), strict=True)) for line in lines[1:]]
    return header, {row["setting"]: row for row in rows}


def _tile(image):
    tile = torch.nn.functional.interpolate(image[None], size=(TILE, TILE), mode="bilinear", antialias=True)[0]
    return tile.clamp(0, 1).mul(255).round().byte()


def _first_grid_tile(report, column):
    pixels = torch.from_numpy(np.asarray(report.grid)).permute(2, 0, 1)
    return pixels[:, LABEL_HEIGHT : LABEL_HEIGHT + TILE, column * TILE : (column + 1) * TILE]


def test_cli_writes_the_report(tiny_flux_dir, tmp_path, capsys):
    out = tmp_path / "report"
    args = ["eval-generation", "--model", str(tiny_flux_dir), "--size", str(SIZE), "--steps", "2"]
    args += ["--per-category", "1", "--stages", "2", "--no-equal-speed", "--out", str(out), "--device", "cpu"]
    args += ["--max-sequence-length", "32", "--cache", "first-block:threshold=0.2", "--methods", "refine:steps=2"]
    assert main([*args, "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["prompts"] == 6 and report["settings"]["model"] == str(tiny_flux_dir)
    assert report["settings"]["call"] == {"max_sequence_length": 32}
    plain = [
        "stock 2 steps",
        *(f"lssgen {space} s={sigma} 2 stages" for sigma in (0.75, 0.667) for space in ("latent", "pixel")),
        "refine:sigma=0.12,steps=2",  # another method, beside LSSGen's settings
    ]
    assert [score["name"] for score in report["scores"]] == [*plain, *(f"{name} + first-block cache" for name in plain)]
    assert report["scores"][len(plain) - 1]["options"] == {"method": "refine:steps=2"}
    assert report["settings"]["cache"] == "FirstBlockCacheConfig(threshold=0.2)"
    assert (out / "grid.png").stat().st_size > 0 and "| stock 2 steps |" in (out / "report.md").read_text()
    for score in report["scores"]:  # the duplication measure, and the per-prompt counts it summarises
        assert len(score["extra_instances"]) == len(score["missing_instances"]) == 6
        assert score["extra"] == pytest.approx(sum(score["extra_instances"]) / 6)
        exact = [e == m == 0 for e, m in zip(score["extra_instances"], score["missing_instances"])]
        assert score["exact"] == pytest.approx(sum(exact) / 6)
    printed = capsys.readouterr().out
    assert not (out / "images").exists()  # only with --save-images
    for markdown in (printed, (out / "report.md").read_text()):
        header, rows = _markdown_table(markdown)
        assert {"exact", "extra"} <= set(header) and set(rows) == {score["name"] for score in report["scores"]}
        for score in report["scores"]:
            row = rows[score["name"]]
            assert (row["exact"], row["extra"]) == (f"{score['exact']:.2f}", f"{score['extra']:.2f}")
    assert "wrote" in printed


def test_cli_saves_the_images_and_scores_the_run_again(tiny_flux_dir, tmp_path, capsys):
    run, again = tmp_path / "run", tmp_path / "again"
    args = ["eval-generation", "--model", str(tiny_flux_dir), "--size", str(SIZE), "--steps", "2", "--stages", "2"]
    args += ["--per-category", "1", "--no-equal-speed", "--device", "cpu", "--max-sequence-length", "32"]
    assert main([*args, "--out", str(run), "--save-images", "--no-progress"]) == 0
    first = json.loads((run / "report.json").read_text())
    assert len(list((run / "images").rglob("*.png"))) == len(first["scores"]) * 6

    # Generation options beside --rescore would be ignored: refused, named, nothing written.
    capsys.readouterr()
    assert main(["eval-generation", "--rescore", str(run), "--steps", "3", "--out", str(again)]) == 2
    assert "--steps would be ignored" in capsys.readouterr().err and not again.exists()
    assert main(["eval-generation", "--rescore", str(run), "--out", str(again), "--no-progress"]) == 0
    second = json.loads((again / "report.json").read_text())
    assert second["settings"]["rescored"] and second["settings"]["captions"] == first["settings"]["captions"]
    for old, new in zip(first["scores"], second["scores"], strict=True):
        # The same scorer on the saved (8-bit) images: the same verdicts on these noise images, the same times.
        assert (new["name"], new["passed"], new["seconds"]) == (old["name"], old["passed"], old["seconds"])
    assert (again / "grid.png").is_file() and "scored again" in (again / "report.md").read_text()


def test_cli_checks_the_cache_spec_before_loading_anything(tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["eval-generation", "--cache", "second-block", "--out", str(out), "--device", "cpu"]) == 2
    assert "unknown cache 'second-block'; choose one of first-block" in capsys.readouterr().err
    assert not out.exists()


def test_cli_refuses_more_prompts_than_the_held_out_set_has(tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["eval-generation", "--per-category", "17", "--out", str(out), "--device", "cpu"]) == 2
    assert "the held-out set has 16 prompts per category" in capsys.readouterr().err
    assert not out.exists()


def test_a_cache_runs_in_its_own_rows_only(scorer, monkeypatch):
    from diffusers.hooks import FirstBlockCacheConfig

    import lssgen.evaluation.generation as eval_generation

    settings = [
        GenerationSetting("stock", STEPS),
        GenerationSetting(
            "lssgen", STEPS, {"start_sigma": 0.75, "min_resolution": SIZE // 2, "shorten_intermediate_steps": False}
        ),
    ]
    scenes = evaluation_scenes()[:2]
    generate = eval_generation._generate

    def run(cache):
        # Every generated image and the Linear layers each call ran (the work a cache skips), by setting.
        pipe = build_tiny_flux_pipeline(seed=0)
        layers, images, count = {}, {}, [0]
        for module in pipe.transformer.modules():
            if isinstance(module, torch.nn.Linear):
                module.register_forward_pre_hook(lambda module, args: count.__setitem__(0, count[0] + 1))

        def counting(pipe, setting, scene, *args):
            count[0] = 0
            image, seconds = generate(pipe, setting, scene, *args)
            layers.setdefault(setting.name, []).append(count[0])
            images.setdefault(setting.name, []).append(image)
            return image, seconds

        monkeypatch.setattr(eval_generation, "_generate", counting)
        report = evaluate_generation(
            pipe,
            scorer,
            scenes,
            size=SIZE,
            steps=STEPS,
            settings=[*settings],
            equal_speed=False,
            call={"max_sequence_length": 32},
            progress=False,
            **({} if cache is None else {"cache": cache, "cache_label": "first-block"}),
        )
        assert not pipe.transformer.is_cache_enabled  # enabled for the cached calls only
        return report, layers, images

    # A threshold no change reaches: each stage's first step runs every block, the others reuse the cached residual.
    cache = FirstBlockCacheConfig(threshold=1e9)
    cached, cached_layers, cached_images = run(cache)
    plain, plain_layers, plain_images = run(None)

    names = [score.name for score in cached.scores]
    assert names == ["stock", "lssgen", "stock + first-block cache", "lssgen + first-block cache"]
    assert [score.cache for score in cached.scores] == [None, None, repr(cache), repr(cache)]
    assert cached.settings["cache"] == repr(cache)
    for name in ("stock", "lssgen"):
        # The cache ran in its rows (less layer work, other images), and never in the others: the rows without it
        # are those of a run without a cache, bit for bit, warm-up and all.
        assert all(c < p for c, p in zip(cached_layers[f"{name} + first-block cache"], cached_layers[name]))
        assert cached_layers[name] == plain_layers[name]
        assert all(torch.equal(a, b) for a, b in zip(cached_images[name], plain_images[name], strict=True))
        with_cache = cached.scores[names.index(f"{name} + first-block cache")]
        assert math.isfinite(with_cache.psnr) and with_cache.time_ratio > 0
    for a, b in zip(cached.scores[:2], plain.scores, strict=True):
        assert (a.name, a.accuracy, a.kid, a.psnr, a.ssim) == (b.name, b.accuracy, b.kid, b.psnr, b.ssim)
    markdown = cached.markdown()
    assert "| lssgen + first-block cache | 4 |" in markdown and repr(cache) in markdown
    # The grid's labels tell cached columns from plain ones.
    assert cached.grid.size == (TILE * 5, LABEL_HEIGHT + TILE * 2)


def test_a_flux2_klein_scene_model_takes_its_prompts_by_name(scorer):
    """Flux2KleinPipeline's first parameter is `image`: a prompt passed by position would fail the call."""
    from lssgen.scenes.model import build_pipeline

    pipe = build_pipeline(TinyFlux2Autoencoder(), seed=0, channels=(8, 16))
    report = _stock_and_lssgen_report(pipe, scorer, evaluation_scenes()[:2])
    assert [(score.name, len(score.passed)) for score in report.scores] == [("stock", 2), ("lssgen", 2)]


def test_the_pareto_front_keeps_settings_no_other_beats_on_time_and_quality():
    # (time ratio, quality): the 4th is beaten by the 3rd (faster and better), the 1st by the 2nd (faster, as good).
    points = [(1.0, 0.5), (0.5, 0.5), (0.6, 0.7), (0.7, 0.6), (0.4, 0.3)]
    assert pareto_front(points) == [4, 1, 2]
    assert pareto_front([(1.0, 0.5), (1.0, 0.5)]) == [0, 1]  # equal points dominate neither


def test_the_plot_names_a_method_by_the_parameters_it_changes():
    assert label("spectral:delta=0.1,halvings=1,a=14.0772,beta=1.36409") == "spectral (defaults)"
    assert label("bottleneck:steps=4/12/6,strengths=1.0/0.8/0.6,shifts=9.0/6.0/9.0") == "bottleneck:steps=4/12/6"
    assert label("refine:sigma=0.3,steps=2") == "refine:sigma=0.3,steps=2"
    assert label("stock 12 steps (equal time)") == "stock 12 steps (equal time)"
