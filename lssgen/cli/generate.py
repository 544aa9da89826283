"""`lssgen generate`: one image with a local or hub pipeline, with LSSGen or (`--baseline`) without."""

from __future__ import annotations

import argparse

from .options import add_method_options, call_arguments, device_and_dtype, method_options, patch, timed


def add_parser(commands) -> argparse.ArgumentParser:
    parser = commands.add_parser("generate", help="generate one image with a local or hub pipeline")
    parser.add_argument("--model", required=True, help="diffusers pipeline folder or hub id")
    add_method_options(parser, steps=None, size=1024)
    parser.add_argument("--out", default="out.png", help="where to save the image")
    parser.add_argument("--baseline", action="store_true", help="run the stock pipeline (no scaling)")
    parser.set_defaults(run=run, out_is_image=True)
    return parser


def run(args: argparse.Namespace) -> None:
    from pathlib import Path

    from PIL import Image

    import lssgen
    from lssgen.loading import load_pipeline
    from lssgen.outputs import atomic_write

    device, dtype = device_and_dtype(args)
    pipe = load_pipeline(args.model, device, dtype)
    adapter = lssgen.find_adapter(pipe)
    steps = args.steps or adapter.default_steps
    call = call_arguments(args, adapter, height=args.height, width=args.width, steps=steps)
    options = {}
    if not args.baseline:
        patch(pipe, args.upsampler)
        options = method_options(args)
        print(lssgen.plan_for(pipe, args.height, args.width, steps, **options).describe())
    image, seconds = timed(pipe, call, args.seed, device, **options)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda path: image.save(path, format=Image.registered_extensions()[out.suffix.lower()]))
    print(f"{'baseline' if args.baseline else 'lssgen'}: {seconds:.2f} s -> {args.out}")
