"""`lssgen generate`: one image with a local or hub pipeline, with LSSGen, and (`--baseline`) the same call stock."""

from __future__ import annotations

import argparse

from .options import add_method_options, add_model_options, positive_int


def add_parser(commands) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "generate",
        help="generate one image with a local or hub pipeline",
        description="Generate one image with LSSGen. Size, steps, guidance, prompt length and lssgen's options "
        "default to the model folder's lssgen.json, else to the family's published settings.",
    )
    parser.add_argument("--model", required=True, help="diffusers pipeline folder or hub id")
    add_method_options(parser)
    add_model_options(parser)
    parser.add_argument("--out", default="out.png", help="where to save the image")
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="also run the same call with the stock pipeline, alternately, save it as NAME-stock.EXT next to --out "
        "and print both times and the speed-up",
    )
    parser.add_argument(
        "--repeats", type=positive_int, default=1, help="timed runs of each side; the median is reported (default 1)"
    )
    parser.set_defaults(run=run, out_is_image=True)
    return parser


def stock_path(out: str):
    """Where `--baseline` saves the stock image: `NAME-stock.EXT` next to `--out`."""
    from pathlib import Path

    path = Path(out)
    return path.with_name(f"{path.stem}-stock{path.suffix}")


def run(args: argparse.Namespace) -> None:
    from pathlib import Path

    from PIL import Image

    import lssgen
    from lssgen.evaluation.bench import Timing, busy_warning
    from lssgen.loading import load_pipeline
    from lssgen.outputs import atomic_write

    from .options import compare, device_and_dtype, method_options, model_call, patch, timed

    device, dtype = device_and_dtype(args)
    pipe = load_pipeline(args.model, device, dtype)
    adapter = lssgen.find_adapter(pipe)
    call = model_call(args, pipe, adapter)
    patch(pipe, args.upsampler, **method_options(args))
    print(lssgen.plan_for(pipe, call["height"], call["width"], call["num_inference_steps"]).describe())

    if args.baseline:
        images, stock_times, lssgen_times = compare(pipe, [call], args.seed, device, args.repeats)
        stock_image, image = images[0]
    else:
        runs = [timed(pipe, call, args.seed, device) for _ in range(args.repeats)]
        image, lssgen_times = runs[0][0], [seconds for _, seconds in runs]

    def save(picture, out: Path) -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, lambda path: picture.save(path, format=Image.registered_extensions()[out.suffix.lower()]))

    fast = Timing(tuple(lssgen_times))
    save(image, Path(args.out))
    if not args.baseline:
        print(f"lssgen: {fast.describe()} -> {args.out}")
        return
    stock = Timing(tuple(stock_times))
    save(stock_image, stock_path(args.out))
    print(f"stock:  {stock.describe()} -> {stock_path(args.out)}")
    print(f"lssgen: {fast.describe()} -> {args.out}")
    runs = "1 run each" if args.repeats == 1 else f"medians of {args.repeats} runs each"
    print(
        f"speed-up: {stock.median / fast.median:.2f}x (the same call, alternating, {runs}; {device}, "
        f"{str(dtype).removeprefix('torch.')})"
    )
    warning = busy_warning({"stock": stock, "lssgen": fast})
    if warning:
        print(f"lssgen generate: {warning}")
