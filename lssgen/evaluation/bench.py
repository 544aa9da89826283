"""Benchmark: the stock pipeline against LSSGen settings, timed alternately in one process.

`run_bench` times, round after round, the truly unpatched pipe, the patched pipe at `start_sigma=1.0` (which
runs the stock pipeline, so the two give lssgen's overhead) and each LSSGen setting, all with the same call
and seed. Alternating puts every configuration through the same machine state (thermals, caches, other load),
and ratios are taken pair by pair within a round before the median. Speed comes with its price: every
configuration's image of the first timed round is compared with the unpatched pipe's (PSNR and SSIM).
"""

from __future__ import annotations

import inspect
import json
import math
import os
import resource
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lssgen.outputs import write_folder

# Slowest / fastest run of one variant above this: something else used the machine while it was timed (on a quiet
# machine repeated runs of the same call agree within a few percent).
BUSY_SPREAD = 1.25

UNPATCHED = "stock (unpatched)"
BASELINE = "stock via lssgen (start_sigma=1.0)"
CACHE_ALONE = "cache alone (start_sigma=1.0)"
WITH_CACHE = " + cache"


@dataclass(frozen=True)
class Timing:
    r"""
    The repeated wall times of one variant, reported as their median with their spread (min–max), as
    `torch.utils.benchmark` and hyperfine report them: one run's time says little on a shared machine.

    Example:

    ```py
    >>> Timing((2.0, 2.2, 2.1)).describe()
    '2.10 s (min–max 2.00–2.20 s, 3 runs)'
    ```
    """

    times: tuple[float, ...]

    def __post_init__(self):
        if not self.times or min(self.times) <= 0:
            raise ValueError(f"`times` must be one or more positive durations, got {self.times!r}.")

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def spread(self) -> float:
        """Slowest / fastest run: 1.0 for one run or identical runs."""
        return max(self.times) / min(self.times)

    def describe(self) -> str:
        if len(self.times) == 1:
            return f"{seconds(self.median)} s"
        low, high = seconds(min(self.times)), seconds(max(self.times))
        return f"{seconds(self.median)} s (min–max {low}–{high} s, {len(self.times)} runs)"


def seconds(value: float) -> str:
    """A duration in seconds with two decimals, or three significant digits below one second (a tiny model's
    0.04 s would otherwise lose most of its digits, and any ratio taken from it)."""
    decimals = 2 if value >= 1 else 2 - math.floor(math.log10(value))
    return f"{value:.{decimals}f}"


def busy_warning(times: dict[str, Any], limit: float = BUSY_SPREAD) -> str | None:
    r"""
    A one-line warning when the runs of any variant spread more than `limit` (slowest / fastest), else `None`.

    Repeated runs of the same call differ by a few percent on a quiet machine; a wider spread means other work
    took the cores for part of the runs, so the medians, and any speed-up taken from them, are uncertain.

    Args:
        times (`dict`): each variant's name and its repeated wall times (a sequence of seconds, or a [`Timing`]).
        limit (`float`, defaults to `BUSY_SPREAD`): the largest spread taken as a quiet machine.

    Example:

    ```py
    >>> busy_warning({"stock": [2.0, 2.1], "lssgen": [1.0, 1.6]})
    'warning: the lssgen runs differ by 1.60x (slowest / fastest; ...'
    ```
    """
    timings = {name: value if isinstance(value, Timing) else Timing(tuple(value)) for name, value in times.items()}
    worst = max(timings, key=lambda name: timings[name].spread, default=None)
    if worst is None or timings[worst].spread <= limit:
        return None
    return (
        f"warning: the {worst} runs differ by {timings[worst].spread:.2f}x (slowest / fastest; above {limit} the "
        "machine was busy with other work while timing), so the times and the speed-up are uncertain: rerun on a "
        "quiet machine, with more --repeats."
    )


@dataclass(frozen=True)
class Setting:
    """One LSSGen configuration: the options passed to the patched pipe's call."""

    start_sigma: float
    shorten_intermediate_steps: bool | None = None
    min_resolution: int | None = None

    @property
    def name(self) -> str:
        if self.start_sigma == 1.0:
            return BASELINE
        shorten = {None: "", True: ", shorten", False: ", no shorten"}[self.shorten_intermediate_steps]
        return f"lssgen sigma={self.start_sigma}{shorten}"

    def options(self) -> dict[str, Any]:
        options = {"start_sigma": self.start_sigma, "shorten_intermediate_steps": self.shorten_intermediate_steps}
        options["min_resolution"] = self.min_resolution
        return {key: value for key, value in options.items() if value is not None}


@dataclass(frozen=True)
class MethodSetting:
    """Another multi-resolution method (`lssgen.methods`), as `--method` spells it, e.g. `refine:sigma=0.12`: the
    call passes it as `method=`, with none of LSSGen's options (the method reads its own parameters)."""

    method: str

    @property
    def name(self) -> str:
        from ..methods import resolve_method

        return resolve_method(self.method).spelling()

    def options(self) -> dict[str, Any]:
        return {"method": self.method}


def default_settings(min_resolution: int | None = None) -> list[Setting]:
    return [Setting(sigma, shorten, min_resolution) for sigma in (0.75, 0.667) for shorten in (True, False)]


@dataclass
class SettingResult:
    name: str
    options: dict[str, Any]
    times: list[float]
    ratios: list[float]  # this run's time / the baseline's time in the same round
    planned_steps: list[int]  # denoiser steps per stage, from the plan
    denoiser_calls: list[int]  # denoiser forward calls per stage, counted by a hook
    peak_memory_mib: float
    layer_calls: list[int] = field(default_factory=list)  # Linear layers run per stage: the work a cache skips
    # Agreement with the unpatched pipe's image of the same round (same seed and call); inf PSNR and SSIM 1 when
    # identical, None for the unpatched pipe itself.
    psnr: float | None = None
    ssim: float | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)


@dataclass
class BenchReport:
    device: str
    dtype: str
    call: dict[str, Any]  # the shared call arguments (tensors described, not stored)
    repeats: int
    compiled: bool
    memory_kind: str  # what peak_memory_mib measures
    results: list[SettingResult]
    overhead_ratio: float  # patched at start_sigma=1.0 / unpatched, median of per-round ratios
    recompilations: int | None = None
    upsampler_cost: dict[str, Any] = field(default_factory=dict)
    cache: str | None = None  # the cache config, when each setting also ran with it
    note: str = ""

    def result(self, name: str) -> SettingResult:
        return next(result for result in self.results if result.name == name)

    def to_json(self) -> dict[str, Any]:
        from .upsampler import _json_safe  # strict JSON: the inf PSNR of an identical image becomes "inf"

        data = asdict(self)
        for entry, result in zip(data["results"], self.results):
            entry.update(median=result.median, ratio=result.ratio)
        return _json_safe(data)

    def markdown(self) -> str:
        lines = [
            f"device {self.device}, {self.dtype}, {self.repeats} timed repeats per setting"
            + (", compiled" if self.compiled else ""),
            "",
            "| setting | median s | min–max s | ratio vs baseline | PSNR dB vs stock | SSIM vs stock "
            "| denoiser calls per stage | peak memory MiB |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in self.results:
            calls = " + ".join(map(str, r.denoiser_calls))
            lines.append(
                f"| {r.name} | {r.median:.3f} | {min(r.times):.3f}–{max(r.times):.3f} | {r.ratio:.3f} "
                f"| {_agreement(r.psnr, '.2f')} | {_agreement(r.ssim, '.4f')} | {calls} | {r.peak_memory_mib:.0f} |"
            )
        lines += [
            "",
            f"PSNR/SSIM: each configuration's image against the unpatched pipe's, same seed and call (first timed "
            f"round; inf and 1 mean identical). overhead (patched at start_sigma=1.0 / unpatched): "
            f"{self.overhead_ratio:.4f}",
        ]
        if self.recompilations is not None:
            lines.append(f"torch.compile graphs compiled: {self.recompilations}")
        if self.cache is not None:
            lines += ["", *self._cache_lines()]
        cost = self.upsampler_cost
        if cost:
            lines.append(
                f"x2 to a {'x'.join(map(str, cost['latent_shape']))} latent: learned upsampler "
                f"{cost['upsampler_s'] * 1e3:.2f} ms = {cost['upsampler_fraction']:.3f} of one denoiser call "
                f"({cost['denoiser_call_s'] * 1e3:.1f} ms); pixel round trip {cost['pixel_round_trip_s'] * 1e3:.1f} ms "
                f"= {cost['pixel_round_trip_fraction']:.3f}"
            )
        if self.note:
            lines.append(self.note)
        warning = busy_warning({r.name: r.times for r in self.results})
        if warning:
            lines += ["", warning]
        return "\n".join(lines) + "\n"

    def _cache_lines(self) -> list[str]:
        """Each setting with and without the cache: the work the cache skipped per stage, and whether the two
        speed-ups multiply (combined ratio / the product of the ratios of each alone)."""
        cache_ratio = self.result(CACHE_ALONE).ratio
        lines = [
            f"cache: {self.cache}",
            "",
            "| setting | ratio alone | ratio with the cache | with / (alone x cache alone) | layer work per stage "
            "| PSNR dB alone / with the cache | SSIM alone / with the cache |",
            "|---|---|---|---|---|---|---|",
        ]
        for cached in self.results:
            if not cached.name.endswith(WITH_CACHE) and cached.name != CACHE_ALONE:
                continue
            plain = self.result(BASELINE if cached.name == CACHE_ALONE else cached.name.removesuffix(WITH_CACHE))
            done = " / ".join(f"{c / p:.2f}" for c, p in zip(cached.layer_calls, plain.layer_calls) if p)
            product = plain.ratio * cache_ratio
            psnrs = f"{_agreement(plain.psnr, '.2f')} / {_agreement(cached.psnr, '.2f')}"
            ssims = f"{_agreement(plain.ssim, '.4f')} / {_agreement(cached.ssim, '.4f')}"
            lines.append(
                f"| {plain.name} | {plain.ratio:.3f} | {cached.ratio:.3f} | {cached.ratio / product:.3f} | {done} "
                f"| {psnrs} | {ssims} |"
            )
        return lines


def _agreement(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _image_tensor(image: Any) -> torch.Tensor:
    """A pipeline's first output image (PIL, or a tensor in [0, 1]) as a `(1, 3, H, W)` float32 tensor; a video's
    frames (a list of those) as `(frames, 3, H, W)`."""
    if isinstance(image, (list, tuple)):
        return torch.cat([_image_tensor(frame) for frame in image])
    if isinstance(image, torch.Tensor):
        return image.detach().float().cpu()[None]
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)[None]


def _first_output(output: Any) -> Any:
    """The first image of a pipeline's output, or the first video's frames (video pipelines return `frames`)."""
    return output.images[0] if hasattr(output, "images") else output.frames[0]


def agreement(image: Any, reference: Any) -> tuple[float, float]:
    """PSNR (dB, inf when identical) and SSIM of one output image against a reference output image; of a video,
    the means over its frames."""
    from .metrics import psnr, ssim

    x, y = _image_tensor(image), _image_tensor(reference)
    return float(psnr(x, y).mean()), float(ssim(x, y).mean())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _PeakMemory:
    """Peak memory during one run: CUDA allocator peak, or sampled process RSS on CPU.

    `ru_maxrss` only ever grows over the process's life, so on CPU a sampling thread reads the current RSS
    from /proc; where /proc is missing the lifetime peak is the fallback.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.statm = Path("/proc/self/statm")
        if device.type == "cuda":
            self.kind = "torch.cuda.max_memory_allocated"
        elif self.statm.exists():
            self.kind = "peak process RSS (sampled every 2 ms)"
        else:
            self.kind = "process lifetime peak RSS (ru_maxrss)"
        self.peak = 0

    def _rss(self) -> int:
        return int(self.statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self, stop: threading.Event) -> None:
        while not stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> _PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.statm.exists():
            self.peak = self._rss()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, args=(self._stop,), daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self.statm.exists():
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss())
        else:
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

    @property
    def mib(self) -> float:
        return self.peak / 2**20


class _DenoiserCounter:
    """Counts denoiser forward calls per stage, reading the stage the patched call is running."""

    def __init__(self, pipe: Any, denoiser: torch.nn.Module, timed: bool, device: torch.device):
        self.pipe, self.calls, self.layers, self.durations = pipe, {}, {}, []
        self.timed, self.device = timed, device
        self.handles = [denoiser.register_forward_pre_hook(self._before)]
        self.handles += [
            module.register_forward_pre_hook(self._layer)
            for module in denoiser.modules()
            if isinstance(module, torch.nn.Linear)
        ]
        if timed:  # per-call durations, for the upsampler comparison (syncs: only on untimed runs)
            self.handles.append(denoiser.register_forward_hook(self._after))

    def _stage(self) -> int:
        state = self.pipe.__dict__.get("_lssgen")
        run = state.run if state is not None else None
        return run.current_stage.index if run is not None else 0

    def _layer(self, module, args):
        index = self._stage()
        self.layers[index] = self.layers.get(index, 0) + 1

    def _before(self, module, args):
        index = self._stage()
        self.calls[index] = self.calls.get(index, 0) + 1
        if self.timed:
            _sync(self.device)
            self.start = time.perf_counter()

    def _after(self, module, args, output):
        _sync(self.device)
        self.durations.append(time.perf_counter() - self.start)

    def per_stage(self, counts: dict[int, int] | None = None) -> list[int]:
        counts = self.calls if counts is None else counts
        return [counts.get(index, 0) for index in range(max(counts, default=-1) + 1)]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _recompile_count() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def run_bench(
    pipe: Any,
    settings: list[Setting] | None = None,
    *,
    repeats: int = 3,
    call_kwargs: dict[str, Any],
    seed: int = 0,
    upsampler: Any = None,
    compile: bool = False,
    measure_upsampler: bool = True,
    patch_defaults: dict[str, Any] | None = None,
    cache: Any = None,
    log=print,
) -> BenchReport:
    r"""
    Time the stock pipeline and LSSGen `settings` alternately on `pipe` (patched here; unpatched at the end), and
    compare each configuration's image of the first timed round with the unpatched pipe's (PSNR and SSIM).

    Args:
        pipe: a stock pipeline an lssgen adapter supports.
        settings: LSSGen configurations (default: start_sigma 0.75 and 0.667, shortening on and off), and
            [`MethodSetting`]s for other methods.
        repeats: timed rounds; every configuration also gets one untimed warm-up call first.
        call_kwargs: the call shared by every run (prompt or prompt_embeds, height, width, num_inference_steps).
        patch_defaults: lssgen call defaults, e.g. `base_height`/`base_width` of a scaled-down model.
        compile: compile the denoiser after the (uncompiled) counting warm-ups, and count compiled graphs.
        cache: a diffusers cache config (`lssgen.caches.cache_config`): the stock pipeline and every setting also
            run with it (`denoiser.enable_cache`), alternated with the rest.
    """
    import lssgen

    if repeats < 1:
        raise ValueError(f"`repeats` must be at least 1, got {repeats}.")
    settings = list(settings or default_settings())
    patch_defaults = dict(patch_defaults or {})
    lssgen.patch(pipe, upsampler, **patch_defaults)
    adapter = pipe.__dict__["_lssgen"].adapter
    denoiser = getattr(pipe, adapter.denoiser)
    device = denoiser.device
    pipe.set_progress_bar_config(disable=True)
    height, width, steps = call_kwargs["height"], call_kwargs["width"], call_kwargs["num_inference_steps"]

    # Configuration name -> lssgen options; None is the unpatched pipe.
    configs: dict[str, dict[str, Any] | None] = {UNPATCHED: None, BASELINE: {"start_sigma": 1.0}}
    for setting in settings:
        configs[setting.name] = setting.options()
    cached: set[str] = set()
    if cache is not None:
        if not hasattr(denoiser, "enable_cache"):
            raise ValueError(
                f"--cache: {type(denoiser).__name__} has no enable_cache (it is not a diffusers CacheMixin)."
            )
        for name in [BASELINE, *(setting.name for setting in settings)]:
            cached.add(CACHE_ALONE if name == BASELINE else name + WITH_CACHE)
            configs[CACHE_ALONE if name == BASELINE else name + WITH_CACHE] = configs[name]
    # The stock runs are one stage of all the steps (a plan at start_sigma=1.0 would still shorten it).
    plans = {
        name: None
        if opts is None or opts.get("start_sigma") == 1.0
        else lssgen.plan_for(pipe, height, width, steps, **opts)
        for name, opts in configs.items()
    }

    def call(name: str, counter: bool = False) -> tuple[float, float, _DenoiserCounter | None, Any]:
        options = configs[name]
        if options is None:
            lssgen.unpatch(pipe)
        hook = _DenoiserCounter(pipe, denoiser, timed=name == BASELINE, device=device) if counter else None
        generator = torch.Generator("cpu").manual_seed(seed)
        if name in cached:
            denoiser.enable_cache(cache)
        try:
            with _PeakMemory(device) as memory:
                _sync(device)
                start = time.perf_counter()
                image = _first_output(pipe(**call_kwargs, generator=generator, output_type="pil", **(options or {})))
                _sync(device)
                seconds = time.perf_counter() - start
        finally:
            if name in cached:
                denoiser.disable_cache()
            if hook is not None:
                hook.remove()
            if options is None:
                lssgen.patch(pipe, upsampler, **patch_defaults)
        return seconds, memory.mib, hook, image

    # Warm-up, uncompiled: counts denoiser calls per stage and times single denoiser calls.
    calls, layer_calls, denoiser_call_s = {}, {}, float("nan")
    for name in configs:
        _, _, hook, _ = call(name, counter=True)
        calls[name], layer_calls[name] = hook.per_stage(), hook.per_stage(hook.layers)
        if name == BASELINE:
            denoiser_call_s = statistics.median(hook.durations)
    graphs_before = None
    if compile:
        from torch import _dynamo

        _dynamo.reset()
        graphs_before = _recompile_count()
        denoiser.compile()
        for name in configs:  # compile warm-ups
            call(name)
        log(f"compiled the {adapter.denoiser}: {_recompile_count() - graphs_before} graphs in the warm-ups")

    times = {name: [] for name in configs}
    peaks = {name: 0.0 for name in configs}
    images: dict[str, Any] = {}  # the first timed round's images: what was timed, compiled or not
    for round_index in range(repeats):
        for name in configs:
            seconds, mib, _, image = call(name)
            times[name].append(seconds)
            peaks[name] = max(peaks[name], mib)
            images.setdefault(name, image)
        log(f"round {round_index + 1}/{repeats}: " + ", ".join(f"{times[n][-1]:.2f}" for n in configs) + " s")
    agreements = {name: agreement(images[name], images[UNPATCHED]) for name in configs if name != UNPATCHED}

    base = times[BASELINE]
    results = [
        SettingResult(
            name=name,
            options=options or {},
            times=times[name],
            ratios=[t / b for t, b in zip(times[name], base)],
            planned_steps=[steps] if plans[name] is None else [s.num_denoiser_steps for s in plans[name].stages],
            denoiser_calls=calls[name],
            peak_memory_mib=peaks[name],
            layer_calls=layer_calls[name],
            psnr=agreements[name][0] if name in agreements else None,
            ssim=agreements[name][1] if name in agreements else None,
        )
        for name, options in configs.items()
    ]
    overhead = statistics.median(b / u for b, u in zip(base, times[UNPATCHED]))
    report = BenchReport(
        device=str(device),
        dtype=str(denoiser.dtype).removeprefix("torch."),
        call=_describe(call_kwargs),
        repeats=repeats,
        compiled=compile,
        memory_kind=_PeakMemory(device).kind,
        results=results,
        overhead_ratio=overhead,
        recompilations=None if graphs_before is None else _recompile_count() - graphs_before,
        cache=None if cache is None else repr(cache),
    )
    if measure_upsampler:
        report.upsampler_cost = upsampler_cost(pipe, adapter, height, width, denoiser_call_s, upsampler, call_kwargs)
    lssgen.unpatch(pipe)
    return report


def _describe(call_kwargs: dict[str, Any]) -> dict[str, Any]:
    return {
        key: f"tensor{tuple(value.shape)}" if isinstance(value, torch.Tensor) else value
        for key, value in call_kwargs.items()
    }


def _median_time(function, device: torch.device, repeats: int = 5) -> float:
    function()  # warm-up
    durations = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        function()
        _sync(device)
        durations.append(time.perf_counter() - start)
    return statistics.median(durations)


def _stock_call_defaults(pipe: Any) -> dict[str, Any]:
    """The default arguments of the pipeline's stock `__call__` (of the class `lssgen.patch` swapped out)."""
    state = pipe.__dict__.get("_lssgen")
    stock = type(pipe) if state is None else state.original_class
    parameters = inspect.signature(stock.__call__).parameters.values()
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


@torch.no_grad()
def upsampler_cost(
    pipe: Any,
    adapter: Any,
    height: int,
    width: int,
    denoiser_call_s: float,
    upsampler: Any = None,
    call: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One x2 scale-up into the target's latent, learned and by pixel round trip, against one denoiser call
    at the target size (timed in the baseline warm-up). Without an upsampler, a random one of the default
    (released) architecture stands in: its cost does not depend on its weights. The latent is the adapter's
    (a video's frames from `call`, else the stock call's default), scaled up as a stage switch does
    (`lssgen.scaling.scale_up`: frame by frame, in the adapter's scaling space)."""
    from lssgen.scaling import scale_up
    from lssgen.upsampler import LatentUpsampler

    denoiser = getattr(pipe, adapter.denoiser)
    device, dtype = denoiser.device, adapter.latent_dtype(pipe)
    channels = adapter.latent_channels(pipe)
    if upsampler is None:
        upsampler = LatentUpsampler(in_channels=channels, out_channels=channels)
        # Plain Module.to: ModelMixin.to warns about dtype casts meant for loaded checkpoints.
        torch.nn.Module.to(upsampler, device, denoiser.dtype)
    factor = adapter.vae_scale_factor(pipe)
    call = {**_stock_call_defaults(pipe), **(call or {})}
    shape = adapter.latent_shape(pipe, 1, height // factor // 2, width // factor // 2, call)
    latents = torch.randn(shape, device=device, dtype=dtype)

    def scale(space: str) -> torch.Tensor:
        return scale_up(latents, space, pipe=pipe, adapter=adapter, upsampler=upsampler)

    up_s = _median_time(lambda: scale("learned"), device)
    pixel_s = _median_time(lambda: scale("pixel"), device, repeats=3)
    return {
        # The target's latent, one image or video: (channels, [frames,] height, width).
        "latent_shape": [*shape[1:-2], height // factor, width // factor],
        "upsampler_s": up_s,
        "pixel_round_trip_s": pixel_s,
        "denoiser_call_s": denoiser_call_s,
        "upsampler_fraction": up_s / denoiser_call_s,
        "pixel_round_trip_fraction": pixel_s / denoiser_call_s,
    }


def write_report(report: BenchReport, out_dir: str | Path, *, plot: bool = False) -> Path:
    files = {
        "bench.json": lambda path: path.write_text(
            json.dumps(report.to_json(), indent=2, default=str, allow_nan=False) + "\n"
        ),
        "bench.md": lambda path: path.write_text(report.markdown()),
    }
    if plot:
        files["bench.png"] = lambda path: _plot(report, path)
    return write_folder(out_dir, files)


def _plot(report: BenchReport, path: Path) -> None:
    """A plain PIL bar chart of median time per setting (no plotting dependency)."""
    from PIL import Image, ImageDraw

    bar, gap, label_w, scale_w = 22, 8, 260, 400
    longest = max(r.median for r in report.results) or 1.0
    image = Image.new("RGB", (label_w + scale_w + 80, gap + len(report.results) * (bar + gap)), "white")
    draw = ImageDraw.Draw(image)
    for i, r in enumerate(report.results):
        y = gap + i * (bar + gap)
        draw.text((4, y + 5), r.name, fill="black")
        length = int(scale_w * r.median / longest) if math.isfinite(r.median) else 0
        draw.rectangle((label_w, y, label_w + length, y + bar), fill=(70, 110, 180))
        draw.text((label_w + length + 4, y + 5), f"{r.median:.2f} s", fill="black")
    image.save(path)


def build_flux_dev_pipeline(device: str, dtype: torch.dtype, **overrides: Any) -> Any:
    """FLUX.1-dev's transformer and VAE architectures with random weights and no text encoders (call it
    with `prompt_embeds` and `pooled_prompt_embeds`). Built directly on `device` in `dtype`: 12B parameters
    in float32 on the CPU first would need 48 GB. `overrides` shrink the transformer (tests)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from lssgen.tiny.flux import FLUX_SCHEDULER_CONFIG

    config = dict(
        patch_size=1,
        in_channels=64,
        num_layers=19,
        num_single_layers=38,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    )
    config.update(overrides)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in `dtype`, never in float32 first
    try:
        with torch.device(device):
            transformer = FluxTransformer2DModel(**config)
            vae = AutoencoderKL(
                in_channels=3,
                out_channels=3,
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=(128, 256, 512, 512),
                layers_per_block=2,
                latent_channels=16,
                scaling_factor=0.3611,
                shift_factor=0.1159,
                use_quant_conv=False,
                use_post_quant_conv=False,
            )
    finally:
        torch.set_default_dtype(previous)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG),
        vae=vae.eval(),
        transformer=transformer.eval(),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
    )
    return pipe


def random_flux_prompt(pipe: Any, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random T5 and CLIP embeddings of FLUX.1's shapes (512 tokens), standing in for encoded prompts."""
    config = pipe.transformer.config
    generator = torch.Generator("cpu").manual_seed(seed)
    embeds = torch.randn(1, 512, config.joint_attention_dim, generator=generator)
    pooled = torch.randn(1, config.pooled_projection_dim, generator=generator)
    device, dtype = pipe.transformer.device, pipe.transformer.dtype
    return {"prompt_embeds": embeds.to(device, dtype), "pooled_prompt_embeds": pooled.to(device, dtype)}
