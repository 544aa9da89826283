"""`lssgen demo`: the stock pipeline and LSSGen side by side, on the scene model trained here (or random weights)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .options import DEFAULT_PROMPT, add_method_options, call_arguments, device_and_dtype, method_options, patch, timed

if TYPE_CHECKING:
    import torch
    from PIL import Image

DEMO_SCENES = 4  # held-out scene prompts the default demo shows


def add_parser(commands) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "demo", help="stock vs LSSGen side by side on the scene model trained here (or random weights)"
    )
    parser.add_argument("--model", help="use a real local pipeline instead of the shipped scene model")
    parser.add_argument(
        "--random-weights", action="store_true", help="a FLUX.1-architecture pipeline with random weights instead"
    )
    add_method_options(parser, steps=None, size=None)
    parser.set_defaults(prompt=None)  # the model's own: held-out scene captions, or a lighthouse for the others
    parser.add_argument("--out-dir", default="outputs/demo", help="folder for demo.png, baseline.png and lssgen.png")
    parser.set_defaults(run=run)
    return parser


@dataclass
class _Demo:
    pipe: Any
    prompts: list[str]
    size: int
    steps: int
    call: dict[str, Any]  # more call arguments
    options: dict[str, Any]  # lssgen options fitting the model's size
    upsampler: str | None
    what: str


def _taef2_found() -> bool:
    """Whether the scene model's VAE weights (taef2, not redistributed by lssgen) can be found; says why not."""
    from lssgen.autoencoders.flux2 import find_taef2

    try:
        find_taef2()
    except FileNotFoundError as missing:
        print(f"lssgen demo: the scene model needs taef2, so the random-weight demo runs instead. {missing}")
        return False
    return True


def _demo_setup(args: argparse.Namespace, device: str, dtype: torch.dtype) -> _Demo:
    import torch

    import lssgen
    from lssgen.loading import load_pipeline
    from lssgen.tiny import build_tiny_flux_pipeline
    from lssgen.weights import shipped, weights_path

    if args.model:
        pipe = load_pipeline(args.model, device, dtype)
        adapter = lssgen.find_adapter(pipe)
        what = f"{type(pipe).__name__} from {args.model} on {device}"
        return _Demo(pipe, [args.prompt or DEFAULT_PROMPT], 1024, adapter.default_steps, {}, {}, args.upsampler, what)
    if not args.random_weights and "scene-t2i" in shipped() and _taef2_found():
        from lssgen.scenes.world import evaluation_scenes

        pipe = load_pipeline(str(weights_path("scene-t2i")), device, dtype)
        prompts = [args.prompt] if args.prompt else [scene.caption for scene in evaluation_scenes()[:DEMO_SCENES]]
        # 256 px is the model's native size; three stages (64, 128, 256 px), our FLUX.2 upsampler between them.
        options = {"min_resolution": 64, "base_height": 256, "base_width": 256}
        upsampler = args.upsampler or str(weights_path("flux2-x2"))
        what = (
            "the scene model trained here (weights/scene-t2i: a small Flux2KleinPipeline, held-out prompts) with our "
            "FLUX.2 upsampler (weights/flux2-x2)"
        )
        return _Demo(pipe, prompts, 256, 20, {"max_sequence_length": 32}, options, upsampler, what)
    pipe = build_tiny_flux_pipeline(
        num_layers=2, num_single_layers=4, num_attention_heads=4, attention_head_dim=32, text_dim=64
    ).to(device)
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    # A small model, so a small native size: 512 px plays the part of FLUX.1's 1024 px.
    options = {"min_resolution": 256, "base_height": 512, "base_width": 512}
    what = (
        "a FLUX.1-architecture pipeline with RANDOM weights, built locally (no download).\n"
        "The images are noise; the demo shows the stage plan and the speed-up of the same call."
    )
    prompts = [args.prompt or DEFAULT_PROMPT]
    return _Demo(pipe, prompts, 512, 20, {"max_sequence_length": 64}, options, args.upsampler, what)


def _side_by_side(rows: list[tuple[str, Image.Image, Image.Image]], titles: tuple[str, str]) -> Image.Image:
    """One PNG: a column per mode, a row per prompt, each labelled."""
    from PIL import Image, ImageDraw

    side, band = rows[0][1].width, 14
    sheet = Image.new("RGB", (2 * side, band + len(rows) * (side + band)), "white")
    draw = ImageDraw.Draw(sheet)
    for column, title in enumerate(titles):
        draw.text((column * side + 3, 1), title, fill="black")
    for row, (prompt, stock, scaled) in enumerate(rows):
        top = band + row * (side + band)
        draw.text((3, top + 1), prompt, fill="black")
        sheet.paste(stock, (0, top + band))
        sheet.paste(scaled, (side, top + band))
    return sheet


def run(args: argparse.Namespace) -> None:
    import statistics

    import lssgen
    from lssgen.outputs import write_folder

    device, dtype = device_and_dtype(args)
    demo = _demo_setup(args, device, dtype)
    print(f"lssgen demo: {demo.what}")
    pipe = demo.pipe
    adapter = lssgen.find_adapter(pipe)
    pipe.set_progress_bar_config(disable=True)
    height, width, steps = args.height or demo.size, args.width or demo.size, args.steps or demo.steps
    patch(pipe, demo.upsampler)
    options = {**demo.options, **method_options(args)}
    print(lssgen.plan_for(pipe, height, width, steps, **options).describe())

    def call(prompt: str) -> dict[str, Any]:
        args.prompt = prompt
        return {**call_arguments(args, adapter, height=height, width=width, steps=steps), **demo.call}

    timed(pipe, {**call(demo.prompts[0]), "num_inference_steps": 2}, args.seed, device, start_sigma=1.0)  # warm-up
    rows, baseline_times, lssgen_times = [], [], []
    for index, prompt in enumerate(demo.prompts):
        seed = args.seed + index  # one seed per prompt, the same for both
        for _ in range(2 if len(demo.prompts) == 1 else 1):  # alternate, so both see the same machine state
            baseline, seconds = timed(pipe, call(prompt), seed, device, start_sigma=1.0)
            baseline_times.append(seconds)
            scaled, seconds = timed(pipe, call(prompt), seed, device, **options)
            lssgen_times.append(seconds)
        rows.append((prompt, baseline, scaled))
    if len(demo.prompts) == 1:
        base, fast = statistics.median(baseline_times), statistics.median(lssgen_times)
        count = "median of 2 alternating runs"
    else:
        base, fast = sum(baseline_times), sum(lssgen_times)
        count = f"{len(demo.prompts)} prompts in all"
    sigma = options["start_sigma"]
    sheet = _side_by_side(rows, (f"stock, {steps} steps: {base:.1f} s", f"lssgen, start_sigma={sigma}: {fast:.1f} s"))
    out_dir = write_folder(
        args.out_dir, {"demo.png": sheet.save, "baseline.png": rows[0][1].save, "lssgen.png": rows[0][2].save}
    )
    print(f"baseline (stock pipeline, {steps} steps at {width}x{height}): {base:.2f} s")
    print(f"lssgen   (same call, start_sigma={sigma}):  {fast:.2f} s")
    print(f"speed-up: {base / fast:.2f}x ({count}, {device}, {str(dtype).split('.')[-1]})")
    print(f"images: {out_dir / 'demo.png'} (side by side), {out_dir / 'baseline.png'}, {out_dir / 'lssgen.png'}")
