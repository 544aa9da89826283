"""`lssgen generate`: one image with a local or hub pipeline, with LSSGen, and (`--baseline`) the same call stock."""

from __future__ import annotations

import argparse

from .options import add_method_argument, add_method_options, add_model_options, positive_int


def add_parser(commands) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "generate",
        help="generate one image with a local or hub pipeline",
        description="Generate one image with LSSGen. Size, steps, guidance, prompt length and lssgen's options "
        "default to the model folder's lssgen.json, else to the family's published settings.",
    )
    parser.add_argument("--model", required=True, help="diffusers pipeline folder or hub id")
    add_method_options(parser)
    add_method_argument(parser)
    add_model_options(parser)
    parser.add_argument(
        "--image",
        default=None,
        help="Hires fix: enlarge this image (by default to twice its size; --height/--width set the size) with an "
        "image-to-image pass whose first stage is the image's own size",
    )
    parser.add_argument(
        "--mask",
        default=None,
        help="with --image: inpaint it instead, where this mask is white, with the family's inpainting pipeline "
        "(at the image's size unless --height/--width say)",
    )
    parser.add_argument(
        "--strength",
        type=strength,
        default=None,
        help="with --image: the share of noise it starts from (default 0.6; with --mask 1.0)",
    )
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


def strength(text: str) -> float:
    """An argparse `type`: an img2img strength, in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (1.0 ignores the image), got {value}")
    return value


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

    if args.strength is not None and args.image is None:
        raise ValueError("--strength needs --image (the image to enlarge)")
    if args.mask is not None and args.image is None:
        raise ValueError("--mask needs --image (the image to inpaint)")
    # Before loading: a wrong path fails fast.
    image = open_image(args.image) if args.image else None
    mask = open_image(args.mask, "--mask", "L") if args.mask else None
    if mask is not None and mask.size != image.size:
        raise ValueError(f"--mask is {mask.width}x{mask.height} pixels but --image is {image.width}x{image.height}")
    device, dtype = device_and_dtype(args)
    pipe = load_pipeline(args.model, device, dtype)
    adapter = lssgen.find_adapter(pipe)
    call = model_call(args, pipe, adapter)
    patch(pipe, args.upsampler, **method_options(args))
    size = call["height"], call["width"]
    if mask is not None:
        size = args.height or image.height, args.width or image.width
        pipe, call = inpaint_call(pipe, image, mask, call, size, args)
    elif image is not None:
        size = args.height or 2 * image.height, args.width or 2 * image.width
        pipe, call = hires_call(pipe, image, call, size, args)
    options = {name: call[name] for name in ("strength", "min_resolution") if name in call}
    print(lssgen.plan_for(pipe, *size, call["num_inference_steps"], **options).describe())

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


def open_image(path: str, option: str = "--image", mode: str = "RGB"):
    """The image an `option` names, read whole now (a missing or unreadable file is a one-line error)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except (OSError, UnidentifiedImageError) as error:
        raise ValueError(f"{option} {path}: {error}") from None


def inpaint_call(pipe, image, mask, call: dict, size: tuple[int, int], args: argparse.Namespace) -> tuple:
    """The inpainting pipe and call of `--image` with `--mask`: `call`'s prompt, steps and guidance, the image and
    its mask resized to `size` (height, width) if another (Lanczos; the mask by nearest, staying black and white),
    and the strength (default 1.0: the masked region from pure noise)."""
    import inspect

    from PIL import Image

    import lssgen

    height, width = size
    if (width, height) != image.size:
        image = image.resize((width, height), Image.Resampling.LANCZOS)
        mask = mask.resize((width, height), Image.Resampling.NEAREST)
    inpaint = lssgen.inpainting_pipeline(pipe)
    kept = {name: value for name, value in call.items() if name not in ("height", "width")}
    arguments = {"image": image, "mask_image": mask, "strength": 1.0 if args.strength is None else args.strength}
    stock_class = inpaint._lssgen.original_class if lssgen.is_patched(inpaint) else type(inpaint)
    if "height" in inspect.signature(stock_class.__call__).parameters:
        arguments.update(height=height, width=width)
    return inpaint, {**kept, **arguments}


def hires_call(pipe, image, call: dict, size: tuple[int, int], args: argparse.Namespace) -> tuple:
    """The image-to-image pipe and call of `--image`: `call`'s prompt, steps and guidance with the Hires fix's
    image, strength and arguments for the target `size` (height, width)."""
    from lssgen.hires import DEFAULT_STRENGTH, hires_fix_call

    strength = DEFAULT_STRENGTH if args.strength is None else args.strength
    img2img, arguments = hires_fix_call(pipe, image, *size, strength)
    if args.min_resolution is not None:
        del arguments["min_resolution"]  # the user's, given to `patch`, instead of the image's size
    # The size goes in only where the img2img pipeline takes it (`arguments`); others take it from the image.
    kept = {name: value for name, value in call.items() if name not in ("height", "width")}
    return img2img, {**kept, **arguments}
