"""`lssgen demo`: the stock pipeline and LSSGen side by side, on the scene model trained here (or random weights)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .options import DEFAULT_PROMPT, add_method_options, add_model_options, positive_int

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
    add_method_options(parser)
    parser.add_argument(
        "--size",
        type=positive_int,
        default=None,
        help="square image side, px, instead of --height/--width; above the model's native size the first stage is "
        "the native size (unless --min-resolution says otherwise), as Hires fix starts",
    )
    add_model_options(parser)
    parser.set_defaults(prompt=None)  # the model's own: held-out scene captions, or a lighthouse for the others
    parser.add_argument(
        "--repeats", type=positive_int, default=3, help="timed rounds, stock and lssgen alternating (default 3)"
    )
    parser.add_argument("--out-dir", default="outputs/demo", help="folder for demo.png, baseline.png and lssgen.png")
    parser.set_defaults(run=run)
    return parser


@dataclass
class _Demo:
    pipe: Any
    prompts: list[str]
    what: str
    # How to call a model built in code (a folder's model says it in its lssgen.json): a `ModelDefaults`.
    defaults: Any = None


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
    from lssgen.loading import ModelDefaults, load_pipeline
    from lssgen.weights import shipped, weights_path

    from .options import to_dtype

    if args.model:
        pipe = load_pipeline(args.model, device, dtype)
        return _Demo(pipe, [args.prompt or DEFAULT_PROMPT], f"{type(pipe).__name__} from {args.model} on {device}")
    if not args.random_weights and "scene-t2i" in shipped() and _taef2_found():
        from lssgen.scenes.world import evaluation_scenes

        # Its size, steps, guidance, prompt length, stages and upsampler all come from its folder's lssgen.json.
        pipe = load_pipeline(str(weights_path("scene-t2i")), device, dtype)
        prompts = [args.prompt] if args.prompt else [scene.caption for scene in evaluation_scenes()[:DEMO_SCENES]]
        what = (
            "the scene model trained here (weights/scene-t2i: a small Flux2KleinPipeline, held-out prompts), called "
            "as its lssgen.json says"
        )
        return _Demo(pipe, prompts, what)
    from lssgen.tiny import build_tiny_flux_pipeline  # only here: it imports FluxPipeline and its text encoders

    pipe = build_tiny_flux_pipeline(
        num_layers=2, num_single_layers=4, num_attention_heads=4, attention_head_dim=32, text_dim=64
    ).to(device)
    to_dtype(pipe, dtype)
    # A small model, so a small native size: 512 px plays the part of FLUX.1's 1024 px.
    defaults = ModelDefaults(
        height=512,
        width=512,
        num_inference_steps=20,
        max_sequence_length=64,
        patch={"min_resolution": 256, "base_height": 512, "base_width": 512},
    )
    what = (
        "a FLUX.1-architecture pipeline with RANDOM weights, built locally (no download).\n"
        "The images are noise; the demo shows the stage plan and the speed-up of the same call."
    )
    return _Demo(pipe, [args.prompt or DEFAULT_PROMPT], what, defaults)


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


def _beyond_native(args: argparse.Namespace, native: tuple[int, int]) -> argparse.Namespace:
    """`args` for a square `--size` image; above the native size, unless `--min-resolution` is given, the first stage
    is the native size: the stock call composes the whole image at a size the model never saw (duplicated objects),
    lssgen composes it where the model was trained and only refines it above."""
    size, side = args.size, min(native)
    changes = {"height": size, "width": size}
    if size > side and args.min_resolution is None:
        changes["min_resolution"] = side
        print(f"lssgen demo: {size} px is above the model's native {side} px: the first stage is {side} px")
    return argparse.Namespace(**{**vars(args), **changes})


def run(args: argparse.Namespace) -> None:
    import lssgen
    from lssgen.evaluation.bench import Timing, busy_warning
    from lssgen.outputs import write_folder

    from .options import compare, device_and_dtype, method_options, model_call, native_size, patch, patched_defaults

    if args.size is not None and (args.height is not None or args.width is not None):
        raise ValueError("Give either --size or --height/--width, not both: --size S means a square S x S image.")
    device, dtype = device_and_dtype(args)
    demo = _demo_setup(args, device, dtype)
    print(f"lssgen demo: {demo.what}")
    pipe = demo.pipe
    adapter = lssgen.find_adapter(pipe)
    pipe.set_progress_bar_config(disable=True)
    if args.size is not None:
        args = _beyond_native(args, native_size(pipe, adapter, demo.defaults or lssgen.model_defaults(pipe)))
    calls = [
        model_call(argparse.Namespace(**{**vars(args), "prompt": prompt}), pipe, adapter, demo.defaults)
        for prompt in demo.prompts
    ]
    height, width, steps = (calls[0][key] for key in ("height", "width", "num_inference_steps"))
    own = demo.defaults.patch_options() if demo.defaults is not None else {}  # a folder's, `patch` reads itself
    patch(pipe, args.upsampler, **{**own, **method_options(args)})
    print(lssgen.plan_for(pipe, height, width, steps).describe())

    images, stock_times, lssgen_times = compare(pipe, calls, args.seed, device, args.repeats)
    base, fast = Timing(tuple(stock_times)), Timing(tuple(lssgen_times))
    sigma = patched_defaults(pipe).start_sigma
    rows = [(prompt, stock, scaled) for prompt, (stock, scaled) in zip(demo.prompts, images)]
    titles = (f"stock, {steps} steps: {base.median:.1f} s", f"lssgen, start_sigma={sigma}: {fast.median:.1f} s")
    sheet = _side_by_side(rows, titles)
    out_dir = write_folder(
        args.out_dir, {"demo.png": sheet.save, "baseline.png": rows[0][1].save, "lssgen.png": rows[0][2].save}
    )
    prompts = "1 prompt" if len(calls) == 1 else f"{len(calls)} prompts"
    rounds = f"median of {args.repeats} alternating rounds" if args.repeats > 1 else "1 round"
    spread = ""
    if args.repeats > 1:
        spread = (
            f"; min–max stock {min(stock_times):.2f}–{max(stock_times):.2f} s, lssgen "
            f"{min(lssgen_times):.2f}–{max(lssgen_times):.2f} s"
        )
    print(f"baseline (stock pipeline, {steps} steps at {width}x{height}): {base.median:.2f} s")
    print(f"lssgen   (same call, start_sigma={sigma}):  {fast.median:.2f} s")
    dtype_name = str(dtype).removeprefix("torch.")
    print(f"speed-up: {base.median / fast.median:.2f}x ({rounds} of {prompts}{spread}; {device}, {dtype_name})")
    warning = busy_warning({"stock": base, "lssgen": fast})
    if warning:
        print(f"lssgen demo: {warning}")
    print(f"images: {out_dir / 'demo.png'} (side by side), {out_dir / 'baseline.png'}, {out_dir / 'lssgen.png'}")
