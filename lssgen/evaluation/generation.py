"""What LSSGen costs and gives on a real (small) text-to-image model, every setting side by side in one run.

On a fixed held-out prompt set of the scene vocabulary (`lssgen.scenes.evaluation_scenes`) one run generates with
the stock pipeline at N steps; with lssgen in each scaling space at two start sigmas and with two or three stages;
and with the stock pipeline at fewer steps, as many as fit in each lssgen setting's time (the paper's equal-speed
baseline). With a diffusers cache (`cache=`, `lssgen eval-generation --cache`), the stock N-step setting and every
lssgen setting also run with the cache on the denoiser, enabled for those calls only. The settings take turns prompt
by prompt, so all of them meet the same machine state. Each setting is scored by the scene scorer (GenEval's rules,
per category), by the duplication measure (the share of images whose objects are exactly the prompt's, and the
mean number of extra instances: `lssgen.scenes.world.tally_instances`), by KID between its images and real renders
of the same scenes (on the scorer's features), by PSNR and SSIM against the stock image of the same seed, and by
its wall time relative to the stock pipeline in the same run.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from lssgen.outputs import write_folder
from lssgen.scenes.world import CATEGORIES, Scene, render, tally_instances

from .metrics import psnr, ssim
from .upsampler import _json_safe, labelled_grid

STOCK = "stock"
TILE = 128  # grid tile side, px


@dataclass
class GenerationSetting:
    r"""
    One way to generate: `steps` denoising steps and the lssgen options of the call (`start_sigma=1.0`: stock).

    Args:
        name (`str`): the row label.
        steps (`int`): `num_inference_steps` of the call.
        options (`dict`): lssgen options, e.g. `{"start_sigma": 0.75, "min_resolution": 128,
            "scaling_space": "learned"}`.
        matches (`str`, *optional*): for an equal-speed stock baseline, the lssgen setting whose time it matches.
        cache (*optional*): a diffusers cache config (e.g. `FirstBlockCacheConfig`), enabled on the denoiser for
            this setting's calls only.
    """

    name: str
    steps: int
    options: dict[str, Any] = field(default_factory=lambda: {"start_sigma": 1.0})
    matches: str | None = None
    cache: Any = None

    @property
    def is_stock(self) -> bool:
        """The stock pipeline itself: no lssgen stages and no cache."""
        return self.options.get("start_sigma") == 1.0 and self.cache is None


def default_settings(
    size: int, steps: int, *, learned: bool, stages: Sequence[int] = (2, 3)
) -> list[GenerationSetting]:
    """The stock pipeline at `steps`, then lssgen in every scaling space at start sigma 0.75 and 0.667 with each
    stage count (`min_resolution` = the target side halved `stages - 1` times)."""
    settings = [GenerationSetting(f"{STOCK} {steps} steps", steps)]
    spaces = (["learned"] if learned else []) + ["latent", "pixel"]
    for count in stages:
        for sigma in (0.75, 0.667):
            for space in spaces:
                options = {"start_sigma": sigma, "min_resolution": size // 2 ** (count - 1), "scaling_space": space}
                settings.append(GenerationSetting(f"lssgen {space} s={sigma} {count} stages", steps, options))
    return settings


def cached_settings(settings: list[GenerationSetting], cache: Any, label: str) -> list[GenerationSetting]:
    """Each setting (the stock N-step one and the lssgen ones; not equal-speed baselines) again with the diffusers
    cache config `cache`, named `<setting> + <label> cache`."""
    return [
        replace(setting, name=f"{setting.name} + {label} cache", cache=cache)
        for setting in settings
        if setting.matches is None and setting.cache is None
    ]


def equal_speed_settings(settings: list[GenerationSetting], seconds: dict[str, float]) -> list[GenerationSetting]:
    """Stock settings with as many steps as fit in each lssgen setting's time (`seconds` per setting, measured with
    the first stock setting), one per distinct step count."""
    reference = next(s for s in settings if s.is_stock)
    per_step = seconds[reference.name] / reference.steps
    extra: dict[int, GenerationSetting] = {}
    for setting in settings:
        if setting.is_stock:
            continue
        count = max(1, round(seconds[setting.name] / per_step))
        if count < reference.steps and count not in extra:
            extra[count] = GenerationSetting(f"{STOCK} {count} steps (equal time)", count, matches=setting.name)
    return [extra[count] for count in sorted(extra, reverse=True)]


@dataclass
class SettingScores:
    name: str
    steps: int
    options: dict[str, Any]
    matches: str | None
    accuracy: dict[str, float]  # per category, and "overall" (GenEval's: the mean of the categories)
    exact: float  # share of images whose detected objects are exactly the prompt's (`tally_instances`)
    extra: float  # mean number of extra instances per image
    kid: float | None
    psnr: float | None  # against the stock image of the same seed; None for the stock setting itself
    ssim: float | None
    cache: str | None  # the diffusers cache config of the setting's calls
    seconds: float  # per image, mean over the prompts
    time_ratio: float  # this setting's total time / the stock setting's, in the same run
    passed: list[bool] = field(default_factory=list)  # per prompt, in order (prompt i was generated with seed + i)
    extra_instances: list[int] = field(default_factory=list)  # per prompt, in order
    missing_instances: list[int] = field(default_factory=list)  # per prompt, in order


@dataclass
class GenerationReport:
    settings: dict[str, Any]
    scores: list[SettingScores]
    grid: Image.Image | None = field(default=None, repr=False)
    # Per setting name, its images in prompt order, [N, 3, H, W] in [0, 1].
    images: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"settings": self.settings, "scores": [asdict(score) for score in self.scores]}

    def markdown(self) -> str:
        s = self.settings
        lines = [
            f"{s['prompts']} held-out prompts ({s['per_category']} per category), {s['size']} px, seed {s['seed']}, "
            f"{s['device']}, {s['dtype']}; model {s['model']}"
            + (f"; `+ cache` rows: {s['cache']} on the denoiser" if s.get("cache") else "")
            + (f"; scored again from the saved images by {s['scorer']}" if s.get("rescored") else ""),
            "",
            "| setting | steps | " + " | ".join(CATEGORIES) + " | overall | exact | extra | KID | PSNR | SSIM | time |",
            "|---|---:|" + "---:|" * (len(CATEGORIES) + 7),
        ]
        for score in self.scores:
            cells = [f"{score.accuracy[c]:.2f}" for c in (*CATEGORIES, "overall")]
            cells += [f"{score.exact:.2f}", f"{score.extra:.2f}"]
            kid = "-" if score.kid is None else f"{score.kid:.4f}"
            fidelity = ["-", "-"] if score.psnr is None else [f"{score.psnr:.2f}", f"{score.ssim:.3f}"]
            lines.append(
                f"| {score.name} | {score.steps} | "
                + " | ".join([*cells, kid, *fidelity, f"{score.time_ratio:.2f}x"])
                + " |"
            )
        lines += [
            "",
            "Accuracy: the scene scorer's verdict, GenEval's rules (overall: the mean of the categories). Exact: the "
            "share of images whose detected objects are exactly the prompt's (each named object in its number, one "
            "where the prompt gives none, and nothing else); extra: the mean number of instances beyond the prompt's "
            "per image (docs/scene-model.md). KID: on the "
            "scorer's features, against real renders of the same scenes (lower is closer). PSNR/SSIM: against the "
            "stock image of the same seed. Time: per image, relative to the stock setting, measured in the same run.",
        ]
        return "\n".join(lines) + "\n"


def _denoiser(pipe: Any) -> Any:
    import lssgen

    return getattr(pipe, lssgen.find_adapter(pipe).denoiser)


def _generate(pipe: Any, setting: GenerationSetting, scene: Scene, size: int, seed: int, call: dict[str, Any]):
    generator = torch.Generator("cpu").manual_seed(seed)
    kwargs = {"height": size, "width": size, "num_inference_steps": setting.steps, "output_type": "pt", **call}
    if setting.cache is not None:  # outside the timing; removed again whatever happens, so no other setting sees it
        _denoiser(pipe).enable_cache(setting.cache)
    try:
        start = time.perf_counter()
        # By name: a pipeline's first parameter is not always the prompt (Flux2KleinPipeline's is `image`).
        images = pipe(prompt=scene.caption, generator=generator, **kwargs, **setting.options).images
        if images.device.type == "cuda":
            torch.cuda.synchronize(images.device)
        seconds = time.perf_counter() - start
    finally:
        if setting.cache is not None:
            _denoiser(pipe).disable_cache()
    return images[0].float().cpu().clamp(0, 1), seconds


def _run(pipe, settings, scenes, size, seed, call, progress, description, save_to=None) -> tuple[dict, dict]:
    images = {s.name: [] for s in settings}
    seconds = {s.name: 0.0 for s in settings}
    rows = {s.name: row for row, s in enumerate(settings)}
    for index, scene in enumerate(tqdm(scenes, desc=description, disable=not progress)):
        # Turns rotate prompt by prompt, so no setting always runs first (or right after the slowest one).
        shift = index % len(settings)
        for setting in settings[shift:] + settings[:shift]:
            image, elapsed = _generate(pipe, setting, scene, size, seed + index, call)
            images[setting.name].append(image)
            seconds[setting.name] += elapsed
            if save_to is not None:  # as it is made: a run that stops keeps what it generated
                _write_png(image, Path(save_to) / saved_image_path(rows[setting.name], index))
    return {name: torch.stack(stack) for name, stack in images.items()}, seconds


def _kid(scorer: Any, real: torch.Tensor, generated: torch.Tensor) -> float | None:
    from torchmetrics.image.kid import KernelInceptionDistance

    if len(real) < 2:
        return None  # KID compares distributions: it needs at least two images of each
    kid = KernelInceptionDistance(feature=scorer.feature_extractor(), subset_size=len(real), subsets=10)
    kid.update(real, real=True)
    kid.update(generated, real=False)
    return float(kid.compute()[0])


def _grid(scenes: Sequence[Scene], size: int, images: dict[str, torch.Tensor], rows: int) -> Image.Image | None:
    """The real render, then one column per setting, for the first `rows` scenes (at most all), at `TILE` px."""
    rows = min(rows, len(scenes))
    if not rows:
        return None
    real = _renders(scenes[:rows], size)
    columns = [("real render", real), *images.items()]

    def tile(stack: torch.Tensor, row: int) -> Image.Image:
        small = F.interpolate(stack[row : row + 1], size=(TILE, TILE), mode="bilinear", antialias=True)[0]
        return Image.fromarray((small.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())

    def label(name: str) -> str:
        # A tile's width holds about 24 characters: cached columns say so first, or they would read as uncached.
        plain, cached, _ = name.partition(" + ")
        return (f"cache {plain.removeprefix('lssgen ')}" if cached else name)[:24]

    grid_rows = [[tile(stack, row) for _, stack in columns] for row in range(rows)]
    return labelled_grid(grid_rows, [label(name) for name, _ in columns])


@torch.no_grad()
def evaluate_generation(
    pipe: Any,
    scorer: Any,
    scenes: Sequence[Scene],
    *,
    size: int = 256,
    steps: int = 20,
    upsampler: Any = None,
    settings: list[GenerationSetting] | None = None,
    equal_speed: bool = True,
    seed: int = 0,
    call: dict[str, Any] | None = None,
    grid_rows: int = 6,
    progress: bool = True,
    model_name: str = "",
    scorer_name: str = "",
    cache: Any = None,
    cache_label: str = "cache",
    save_images_to: str | Path | None = None,
) -> GenerationReport:
    r"""
    Generate every scene with every setting and score the settings side by side (see the module docstring).

    Args:
        pipe (`DiffusionPipeline`): a stock pipeline taking string prompts; patched here with `upsampler`, with the
            target size as the model's native size (`base_height`/`base_width`), and unpatched at the end.
        scorer (`SceneScorer`): the judge of `lssgen.scenes.scorer`.
        scenes (`list[Scene]`): the prompts, usually `lssgen.scenes.evaluation_scenes()`.
        size (`int`, defaults to `256`), steps (`int`, defaults to `20`): the target side and N.
        settings (`list[GenerationSetting]`, *optional*): defaults to [`default_settings`].
        equal_speed (`bool`, defaults to `True`): add stock settings at the step counts that fit in each lssgen
            setting's time, measured on the first scene in a warm-up round.
        call (`dict`, *optional*): more call arguments for every setting, e.g. `{"guidance_scale": 4.0}`.
        grid_rows (`int`, defaults to `6`): the first scenes, shown in the grid (the evaluation set's first six are
            one of each category).
        cache (*optional*): a diffusers cache config (`lssgen.caches.cache_config`, e.g. `FirstBlockCacheConfig`):
            the stock N-step setting and every lssgen setting also run with it on the denoiser (`enable_cache` for
            those calls only), in the same rotation; their rows are named `<setting> + <cache_label> cache`.
        save_images_to (`str` or `Path`, *optional*): a run folder: each image is written there as it is made,
            `images/<row>/<prompt>.png` (row: the setting's place in the report's scores, from 00; prompt: from
            000), so that [`rescore_generation`] can read them, also after a run that stopped.

    Example:

    ```py
    >>> report = evaluate_generation(pipe, SceneScorer.from_pretrained(path), evaluation_scenes(), upsampler=up)
    >>> print(report.markdown())
    ```
    """
    import lssgen

    if not scenes:
        raise ValueError("evaluate_generation needs at least one scene.")
    call = dict(call or {})
    settings = list(settings or default_settings(size, steps, learned=upsampler is not None))
    if not any(setting.is_stock for setting in settings):
        raise ValueError(
            "The settings need a stock setting (start_sigma=1.0, no cache): everything is compared with it."
        )
    if cache is not None:
        settings += cached_settings(settings, cache, cache_label)
    caches = {id(s.cache): s.cache for s in settings if s.cache is not None}
    if caches and not hasattr(_denoiser(pipe), "enable_cache"):
        raise ValueError(
            f"cache: {type(_denoiser(pipe)).__name__} has no enable_cache (it is not a diffusers CacheMixin)."
        )
    lssgen.patch(pipe, upsampler, base_height=size, base_width=size)
    pipe.set_progress_bar_config(disable=True)
    try:
        # Warm-up on the first scene: every code path runs once before timing, and it times the equal-speed steps.
        _, warm = _run(pipe, settings, scenes[:1], size, seed, call, progress, "warm-up")
        if equal_speed:
            settings += equal_speed_settings(settings, warm)
        images, seconds = _run(pipe, settings, scenes, size, seed, call, progress, "generating", save_images_to)
    finally:
        lssgen.unpatch(pipe)

    parameters = {
        "model": model_name,
        "scorer": scorer_name,
        "prompts": len(scenes),
        "per_category": len(scenes) // len(CATEGORIES),
        "size": size,
        "steps": steps,
        "seed": seed,
        "call": call,
        "device": str(pipe.device),
        "dtype": str(pipe.dtype).removeprefix("torch."),
        "upsampler": None if upsampler is None else type(upsampler).__name__,
        "cache": None if not caches else "; ".join(repr(c) for c in caches.values()),
        "captions": [scene.caption for scene in scenes],
    }
    if save_images_to is not None:
        _write_run(save_images_to, parameters, settings, seconds, len(scenes))
    scores = score_settings(scorer, scenes, settings, images, seconds, size, progress)
    return GenerationReport(parameters, scores, _grid(scenes, size, images, grid_rows), images)


# Beside the saved images: the run's parameters, settings and times, written before scoring, so that a run whose
# scoring fails can still be scored (`rescore_generation`).
RUN_FILE = "run.json"


def _write_run(folder: str | Path, parameters: dict, settings: Sequence[GenerationSetting], seconds: dict[str, float],
               prompts: int) -> None:  # fmt: skip
    rows = [
        {"name": s.name, "steps": s.steps, "options": s.options, "matches": s.matches,
         "cache": None if s.cache is None else _cache_name(s.cache), "seconds": seconds[s.name] / prompts}
        for s in settings
    ]  # fmt: skip
    data = _json_safe({"settings": parameters, "rows": rows})
    (Path(folder) / RUN_FILE).write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")


def _renders(scenes: Sequence[Scene], size: int) -> torch.Tensor:
    """The real renders of `scenes` at `size` px, [N, 3, size, size] in [0, 1]."""
    real = torch.stack([torch.from_numpy(np.array(render(scene, size))) for scene in scenes])
    return real.permute(0, 3, 1, 2).float() / 255


def score_settings(
    scorer: Any,
    scenes: Sequence[Scene],
    settings: Sequence[GenerationSetting],
    images: dict[str, torch.Tensor],
    seconds: dict[str, float],
    size: int,
    progress: bool = True,
) -> list[SettingScores]:
    """Each setting's images (`images[name]`, one per scene, in order) scored by `scorer`, by the duplication
    measure, by KID against real renders, by PSNR/SSIM against the stock setting's, and its total time `seconds[name]`
    relative to the stock setting's."""
    real = _renders(scenes, size)
    stock = next(s for s in settings if s.is_stock)
    scores = []
    for setting in tqdm(settings, desc="scoring", disable=not progress):
        generated = images[setting.name]
        verdicts = scorer.score(generated, list(scenes))
        accuracy = {}
        for category in CATEGORIES:
            passed = [v.passed for v in verdicts if v.category == category]
            accuracy[category] = sum(passed) / len(passed) if passed else math.nan
        accuracy["overall"] = statistics.fmean(a for a in accuracy.values() if not math.isnan(a))
        tallies = [tally_instances(scene.check, verdict.found) for scene, verdict in zip(scenes, verdicts, strict=True)]
        same = setting.name == stock.name
        scores.append(
            SettingScores(
                name=setting.name,
                steps=setting.steps,
                options=setting.options,
                matches=setting.matches,
                accuracy=accuracy,
                exact=statistics.fmean(tally.exact for tally in tallies),
                extra=statistics.fmean(tally.extra for tally in tallies),
                kid=_kid(scorer, real, generated),
                psnr=None if same else float(psnr(generated, images[stock.name]).mean()),
                ssim=None if same else float(ssim(generated, images[stock.name]).mean()),
                cache=None if setting.cache is None else _cache_name(setting.cache),
                seconds=seconds[setting.name] / len(scenes),
                time_ratio=seconds[setting.name] / seconds[stock.name],
                passed=[v.passed for v in verdicts],
                extra_instances=[tally.extra for tally in tallies],
                missing_instances=[tally.missing for tally in tallies],
            )
        )
    return scores


def _cache_name(cache: Any) -> str:
    # A rescored report's settings carry the name the first run wrote, not the config.
    return cache if isinstance(cache, str) else repr(cache)


def saved_image_path(setting_index: int, prompt_index: int) -> str:
    """Where `evaluate_generation(save_images_to=...)` puts an image: by the setting's row and the prompt's index
    (setting names hold spaces, `=` and `:`)."""
    return f"images/{setting_index:02d}/{prompt_index:03d}.png"


def write_report(report: GenerationReport, out_dir: str | Path) -> Path:
    """`report.json`, `report.md` and `grid.png` in `out_dir`, all or none (the images, when asked for, were written
    there as they were made: `evaluate_generation(save_images_to=...)`)."""
    files = {
        "report.json": lambda path: path.write_text(
            json.dumps(_json_safe(report.to_dict()), indent=2, allow_nan=False) + "\n"
        ),
        "report.md": lambda path: path.write_text(report.markdown()),
    }
    if report.grid is not None:
        files["grid.png"] = lambda path: report.grid.save(path, format="PNG")
    return write_folder(out_dir, files)


def _write_png(image: torch.Tensor, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(pixels).save(path, format="PNG")


def rescore_generation(
    run_dir: str | Path, scorer: Any, *, scorer_name: str = "", grid_rows: int = 6, progress: bool = True
) -> GenerationReport:
    r"""
    Score an earlier `evaluate_generation` run again, with another scorer, from its folder: the images and
    `run.json` that `save_images_to` wrote there (`lssgen eval-generation --save-images`; also a run whose own scoring
    failed): the same images (as saved, 8 bits), settings, prompts and times; accuracy, the duplication measure, KID
    and PSNR/SSIM computed anew.

    The run's prompts must be the held-out set's first ones (`lssgen.scenes.evaluation_scenes`), as
    `lssgen eval-generation` makes them; its run.json names them and they are checked.

    Example:

    ```py
    >>> report = rescore_generation("outputs/eval-generation", SceneScorer.from_pretrained("runs/new-scorer"))
    >>> write_report(report, "outputs/eval-generation-rescored")
    ```
    """
    from lssgen.scenes.world import evaluation_scenes

    run_dir = Path(run_dir)
    if not (run_dir / RUN_FILE).is_file():
        raise FileNotFoundError(
            f"{run_dir} has no {RUN_FILE}: rescoring needs a run written with --save-images "
            "(evaluate_generation(save_images_to=...))."
        )
    saved = json.loads((run_dir / RUN_FILE).read_text())
    parameters, rows = saved["settings"], saved["rows"]
    captions = parameters.get("captions")
    scenes = evaluation_scenes()[: len(captions or [])]
    if captions is None or [scene.caption for scene in scenes] != captions:
        raise ValueError(
            f"{run_dir}: its {RUN_FILE} does not name the held-out set's first prompts (settings.captions); only runs "
            "of `lssgen eval-generation --save-images` can be scored again."
        )
    settings = [
        GenerationSetting(row["name"], row["steps"], row["options"], row["matches"], row["cache"]) for row in rows
    ]
    images, seconds = {}, {}
    for number, setting in enumerate(settings):
        paths = [run_dir / saved_image_path(number, index) for index in range(len(scenes))]
        missing = [str(path) for path in paths if not path.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{run_dir} lacks {len(missing)} image(s) of {setting.name!r} (first: {missing[0]}): rescoring needs a "
                "run written with --save-images (evaluate_generation(save_images_to=...))."
            )
        stack = [torch.from_numpy(np.array(Image.open(path).convert("RGB"))) for path in paths]
        images[setting.name] = torch.stack(stack).permute(0, 3, 1, 2).float() / 255
        seconds[setting.name] = rows[number]["seconds"] * len(scenes)
    size = parameters["size"]
    scores = score_settings(scorer, scenes, settings, images, seconds, size, progress)
    parameters = {**parameters, "scorer": scorer_name, "rescored": True}
    return GenerationReport(parameters, scores, _grid(scenes, size, images, grid_rows), images)
