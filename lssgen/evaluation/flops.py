"""FLOP counts of the real denoisers, and the speedup bound they put on an LSSGen plan.

A denoiser is built on the `meta` device (no weights, no memory) from its published config and run once under
`torch.utils.flop_counter.FlopCounterMode`, which counts matmuls, convolutions and attention from shapes alone.
The bound speedup of a plan is FLOPs(plain N steps at the target size) / FLOPs(the plan): what a perfectly
compute-bound run could gain, before the (small) cost of upsampling and re-noising between stages.

The architectures are the published models each installed adapter lists (`Adapter.architectures`, real configs
in the adapter's own file), and each adapter builds its denoiser's inputs (`Adapter.denoiser_dummy_inputs`): this
module holds no per-model knowledge. `python -m lssgen.evaluation.flops` prints the tables for all of them at 1024²
and 2048².
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from lssgen.adapters import installed_adapters
from lssgen.adapters.base import Adapter, Architecture
from lssgen.plan import StagePlan, plan_stages
from lssgen.plugins import BUILTIN_PLUGINS

VAE_SCALE_FACTOR = 8  # pixels per latent cell for all the built-in families


def _adapters() -> list[Adapter]:
    """The installed adapters, lssgen's own first in `BUILTIN_PLUGINS` order (the tables' row order, whichever
    order the entry points load in), then third-party ones as registered."""
    builtin = [module.rsplit(".", 1)[-1] for module in BUILTIN_PLUGINS]
    infos = list(installed_adapters().values())

    def rank(info):
        own = info.package == "lssgen" and info.plugin in builtin
        return builtin.index(info.plugin) if own else len(builtin)

    return [info.adapter for info in sorted(infos, key=rank)]


def published_architectures() -> dict[str, Architecture]:
    """Every published architecture the installed adapters list (`Adapter.architectures`), by name, each with
    its adapter filled in. The real configs are per-model facts: they live in the adapters' files, so a new family
    (built-in or a plugin) appears here without any change to this module."""
    return {
        arch.name: dataclasses.replace(arch, adapter=adapter)
        for adapter in _adapters()
        for arch in adapter.architectures
    }


def adapter_for_denoiser(model: torch.nn.Module) -> Adapter:
    """The installed adapter that knows `model`'s class: one listing an architecture of that class or of the
    closest base class in its MRO."""
    ranked = []
    for order, adapter in enumerate(_adapters()):
        classes = {arch.model_class for arch in adapter.architectures}
        for distance, cls in enumerate(type(model).__mro__):
            if cls.__name__ in classes:
                ranked.append((distance, order, adapter))
                break
    if not ranked:
        raise ValueError(
            f"No installed lssgen adapter lists an architecture of {type(model).__name__}, so none can build its "
            "dummy inputs: add an `Architecture` to the family's adapter (`Adapter.architectures`) and implement "
            "`Adapter.denoiser_dummy_inputs`, or pass `adapter=` to denoiser_flops."
        )
    return min(ranked, key=lambda item: item[:2])[2]


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of `fn()` as FlopCounterMode counts them (2 per multiply-add; elementwise ops are not counted).

    Attention runs on SDPA's math backend: on CPU the default fused kernel (`_scaled_dot_product_flash_attention_
    for_cpu`) has no FLOP formula and would count as 0, while the math path is plain matmuls, counted exactly.
    """
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def dummy_inputs(
    model: torch.nn.Module,
    latent_height: int,
    latent_width: int,
    text_tokens: int,
    batch: int = 1,
    adapter: Adapter | None = None,
) -> dict[str, Any]:
    """Keyword arguments of one forward call of `model`, on the model's device, shaped as its pipeline calls it:
    the family's adapter builds them (`Adapter.denoiser_dummy_inputs`); by default the one that knows the model."""
    adapter = adapter or adapter_for_denoiser(model)
    return adapter.denoiser_dummy_inputs(model, latent_height, latent_width, text_tokens, batch)


def denoiser_flops(
    model: torch.nn.Module,
    latent_height: int,
    latent_width: int,
    *,
    text_tokens: int,
    batch=1,
    adapter: Adapter | None = None,
) -> int:
    """FLOPs of one forward call of `model` on a `latent_height` x `latent_width` latent with `text_tokens`
    text tokens. `model` may live on the `meta` device: only shapes are needed."""
    kwargs = dummy_inputs(model, latent_height, latent_width, text_tokens, batch, adapter)
    with torch.no_grad():
        return count_flops(lambda: model(**kwargs, return_dict=False))


@functools.cache
def meta_model(name: str) -> torch.nn.Module:
    """The architecture `name` on the `meta` device: its real shapes, no weights."""
    import diffusers

    arch = published_architectures()[name]
    with torch.device("meta"):
        return getattr(diffusers, arch.model_class)(**arch.config).eval()


@functools.cache
def call_flops(name: str, latent_height: int, latent_width: int) -> int:
    """FLOPs of one denoising step of architecture `name` for one image, classifier-free guidance included."""
    arch = published_architectures()[name]
    # Counted at batch 1 and scaled: every op is per-sample, so FLOPs are exactly linear in the batch.
    model = meta_model(name)
    per_sample = denoiser_flops(model, latent_height, latent_width, text_tokens=arch.text_tokens, adapter=arch.adapter)
    return arch.cfg_factor * per_sample


def plan_flops(arch: str | Architecture, plan: StagePlan, flops: Callable[[int, int], int] | None = None) -> int:
    """FLOPs of a whole plan: each stage's denoiser steps times the per-step FLOPs at its latent size.

    `flops(latent_height, latent_width)` gives the per-step cost; by default the architecture's `call_flops`.
    """
    name = arch if isinstance(arch, str) else arch.name
    if flops is None:
        flops = functools.partial(call_flops, name)
    return sum(stage.num_denoiser_steps * flops(stage.latent_height, stage.latent_width) for stage in plan.stages)


Size = int | tuple[int, int]  # a square side, or (height, width)


def _height_width(size: Size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


def _size_label(size: Size) -> str:
    height, width = _height_width(size)
    return f"{height}²" if height == width else f"{width}x{height}"


def make_plan(name: str, resolution: Size, **settings) -> StagePlan:
    """The LSSGen plan of architecture `name` at `resolution` (a square side, or `(height, width)`) with its
    published steps and its adapter's native base size; `start_sigma=1.0` gives the plain full-resolution plan."""
    arch = published_architectures()[name]
    adapter = arch.adapter
    height, width = _height_width(resolution)
    return plan_stages(
        height,
        width,
        arch.steps,
        scheduler=arch.scheduler(),
        facts=adapter,
        vae_scale_factor=VAE_SCALE_FACTOR,
        base_height=adapter.base_height,
        base_width=adapter.base_width,
        **settings,
    )


def bound_speedup(name: str, resolution: Size, **settings) -> float:
    """FLOPs of plain generation over FLOPs of the LSSGen plan with `settings`, at `resolution` (a square side, or
    `(height, width)`). Where the plan rounds the size down so that it halves cleanly, plain generation is counted
    at the rounded size too: the same output size on both sides."""
    plan = make_plan(name, resolution, **settings)
    full = plan_flops(name, make_plan(name, (plan.height, plan.width), start_sigma=1.0))
    return full / plan_flops(name, plan)


DEFAULT_SETTINGS = tuple(
    {"start_sigma": sigma, "shorten_intermediate_steps": shorten, "min_resolution": min_resolution}
    for sigma, shorten, min_resolution in itertools.product((0.75, 0.667), (True, False), (512, 256))
)
# Video models at their published sizes (480P, 720P): one low-resolution stage needs a short side of at least
# 2 x 240 px.
VIDEO_SETTINGS = tuple(
    {"start_sigma": sigma, "shorten_intermediate_steps": shorten, "min_resolution": 240}
    for sigma, shorten in itertools.product((0.75, 0.667), (True, False))
)


@contextlib.contextmanager
def _planner_notes() -> Iterator[list[str]]:
    """Collect the planner's warnings, each distinct one once, instead of logging them: a table plans every row
    at the same sizes, so a size that does not halve cleanly (Wan's 1280x720) would warn once per row."""
    notes: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if message not in notes:
                notes.append(message)

    logger = logging.getLogger("lssgen.plan")
    handler, propagate = Collect(logging.WARNING), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield notes
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def flop_bound_table(
    resolutions: Iterable[Size] = (1024, 2048),
    settings: Iterable[dict] = DEFAULT_SETTINGS,
    architectures: Iterable[str] | None = None,
) -> str:
    """A markdown table of the bound speedup of each architecture (by default all published ones) and setting at
    each resolution (a square side, or `(height, width)`).

    A cell is "-" where the setting gives no low-resolution stage (min_resolution above half the short side).
    The planner's warnings (a size rounded down so that it halves cleanly) are listed once under the table; a
    rounded cell compares plain generation and LSSGen both at the rounded size.
    """
    resolutions, settings = tuple(resolutions), tuple(settings)
    known = published_architectures()
    header = ["model", "steps", "start_sigma", "shorten", "min_res"] + [_size_label(r) for r in resolutions]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    with _planner_notes() as notes:
        for name in known if architectures is None else architectures:
            for setting in settings:
                cells = []
                for resolution in resolutions:
                    if setting["min_resolution"] * 2 > min(_height_width(resolution)):
                        cells.append("-")
                    else:
                        cells.append(f"{bound_speedup(name, resolution, **setting):.2f}x")
                row = [name, str(known[name].steps), f"{setting['start_sigma']}"]
                row += ["on" if setting["shorten_intermediate_steps"] else "off", str(setting["min_resolution"])]
                lines.append("| " + " | ".join(row + cells) + " |")
    if notes:
        lines += ["", "Planned with these notes (each once; a rounded size counts plain generation at it too):"]
        lines += [f"- {note}" for note in notes]
    return "\n".join(lines)


def per_call_table(resolutions: Iterable[Size] = (512, 1024, 2048), architectures: Iterable[str] | None = None) -> str:
    """A markdown table of TFLOPs per denoising step (per image or video, guidance included) at each size."""
    resolutions = tuple(resolutions)
    known = published_architectures()
    header = ["model", "text tokens", "CFG x"] + [f"TFLOPs/step {_size_label(r)}" for r in resolutions]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in known if architectures is None else architectures:
        arch = known[name]
        sides = [(h // VAE_SCALE_FACTOR, w // VAE_SCALE_FACTOR) for h, w in map(_height_width, resolutions)]
        cells = [f"{call_flops(name, h, w) / 1e12:.2f}" for h, w in sides]
        lines.append("| " + " | ".join([name, str(arch.text_tokens), str(arch.cfg_factor)] + cells) + " |")
    return "\n".join(lines)


def method_plan(name: str, resolution: Size, method: str, steps: int | None = None) -> StagePlan:
    """The plan of `method` (as `--method` spells it) for architecture `name` at `resolution`, with `steps` as the
    call's `num_inference_steps` (default: the model's published count) and the family's default options."""
    from lssgen.methods import PlanRequest, resolve_method
    from lssgen.plan import Options

    arch = published_architectures()[name]
    adapter = arch.adapter
    height, width = _height_width(resolution)
    options = Options(
        min_resolution=adapter.min_resolution,
        shorten_intermediate_steps=adapter.shorten_intermediate_steps,
        base_height=adapter.base_height,
        base_width=adapter.base_width,
        method=method,
    )
    request = PlanRequest(
        height=height,
        width=width,
        num_inference_steps=steps or arch.steps,
        scheduler=arch.scheduler(),
        facts=adapter,
        vae_scale_factor=VAE_SCALE_FACTOR,
        options=options,
        latent_spectrum=adapter.latent_spectrum(None),
    )
    return resolve_method(method).plan(request)


@dataclasses.dataclass(frozen=True)
class PublishedSpeedup:
    """A speed-up a method's authors report for a model and setting (DESIGN.md §1b), for the FLOP table."""

    model: str  # an architecture's name (`published_architectures`)
    resolution: Size
    method: str  # as `--method` spells it; `lssgen:start_sigma=...` for LSSGen's own settings
    reported: str  # the speed-up as reported, with what it measures
    steps: int | None = None  # the method call's `num_inference_steps` where it is not the baseline's
    note: str = ""


PUBLISHED_SPEEDUPS = (
    # LSSGen's own settings, for comparison: DESIGN.md gives no measured speed-up of the paper's.
    PublishedSpeedup("FLUX.1-dev", 1024, "lssgen:start_sigma=0.75", "-"),
    PublishedSpeedup("FLUX.1-dev", 1024, "lssgen:start_sigma=0.667", "-"),
    *(
        PublishedSpeedup("FLUX.1-dev", 1024, f"spectral:delta={delta}", f"{reported} (denoising loop, RTX A6000)")
        for delta, reported in ((0.01, "1.32x"), (0.05, "1.63x"), (0.1, "1.83x"), (0.2, "2.02x"), (0.5, "2.36x"))
    ),
    PublishedSpeedup("FLUX.1-dev", 1024, "bottleneck", "2.34x (latency)", note="steps 6/20/8 of 50"),
    PublishedSpeedup("FLUX.1-dev", 1024, "refine", "8.25x (end to end)", steps=12, note="12 steps at 512², 1 at 1024²"),
    PublishedSpeedup(
        "Qwen-Image", 1328, "refine", "10.3x (end to end)", steps=12, note="12 steps at half size, 1 full"
    ),
    PublishedSpeedup(
        "Wan2.1-T2V-14B", (720, 1280), "spectral:delta=0.1", "2.78x", note="720P, 81 frames; size not in the summary"
    ),
)


def method_bound_speedup(claim: PublishedSpeedup) -> tuple[float, StagePlan]:
    """FLOPs of the model's plain generation (its published step count, at the plan's size) over FLOPs of the
    method's plan, and the plan."""
    name = claim.model
    method, _, settings = claim.method.partition(":")
    if method == "lssgen":
        sigma = float(settings.removeprefix("start_sigma="))
        plan = make_plan(
            name,
            claim.resolution,
            start_sigma=sigma,
            min_resolution=published_architectures()[name].adapter.min_resolution,
        )
    else:
        plan = method_plan(name, claim.resolution, claim.method, claim.steps)
    full = plan_flops(name, make_plan(name, (plan.height, plan.width), start_sigma=1.0))
    return full / plan_flops(name, plan), plan


def method_flop_table(claims: Iterable[PublishedSpeedup] = PUBLISHED_SPEEDUPS) -> str:
    """A markdown table: each published setting's plan (stage sizes and steps), the FLOP bound of its speed-up over
    the model's plain generation, and the speed-up its authors report."""
    header = ["model", "size", "method", "stages (px: steps)", "FLOP bound", "reported", "note"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    with _planner_notes():
        for claim in claims:
            bound, plan = method_bound_speedup(claim)
            stages = ", ".join(f"{s.width}x{s.height}: {s.num_denoiser_steps}" for s in plan.stages)
            size = _size_label((plan.height, plan.width))
            row = [claim.model, size, f"`{claim.method}`", stages, f"{bound:.2f}x", claim.reported, claim.note]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    start = time.perf_counter()
    known = published_architectures()
    images = [name for name, arch in known.items() if not arch.sizes]
    print(per_call_table(architectures=images))
    print()
    print(flop_bound_table(architectures=images))
    # Models with published sizes of their own (video at 480P and 720P, 81 frames), one table per set of sizes.
    by_sizes: dict[tuple, list[str]] = {}
    for name, arch in known.items():
        if arch.sizes:
            by_sizes.setdefault(arch.sizes, []).append(name)
    for sizes, names in by_sizes.items():
        print()
        print(per_call_table(sizes, architectures=names))
        print()
        print(flop_bound_table(sizes, VIDEO_SETTINGS, architectures=names))
    print()
    print(method_flop_table())
    print(f"\n(counted in {time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
