"""`lssgen eval-upsampler`: a latent upsampler against bicubic and pixel-round-trip x2 on held-out images."""

from __future__ import annotations

import argparse

from .options import add_device_arguments, device_and_dtype, interval, positive_int


def add_parser(commands) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "eval-upsampler", help="compare a latent upsampler with bicubic and pixel-round-trip x2 on held-out images"
    )
    parser.add_argument("--vae", required=True, help="VAE folder or hub id (a pipeline folder with --subfolder vae)")
    parser.add_argument("--subfolder", default=None, help="subfolder of --vae holding the VAE, e.g. vae")
    parser.add_argument("--upsampler", help="LatentUpsampler folder; without it only the baselines are evaluated")
    parser.add_argument("--images", required=True, help="folder of held-out images (searched recursively)")
    parser.add_argument(
        "--resolution",
        type=positive_int,
        default=512,
        help="centre-crop side, px (default 512). Smaller images are never scaled up: each is evaluated at its own "
        "size, its short side rounded down to a multiple of 2 x the VAE's spatial factor (16 for most), with a warning",
    )
    parser.add_argument("--limit", type=positive_int, default=None, help="evaluate at most this many images")
    parser.add_argument("--crops-per-image", type=positive_int, default=1, help="centre crop + seeded random crops")
    parser.add_argument("--out", default="outputs/eval-upsampler", help="report folder")
    parser.add_argument("--grid", type=interval, default=4, help="images (rows) in grid.png; 0 for none")
    parser.add_argument("--repeats", type=positive_int, default=10, help="timed calls per method for latency")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    add_device_arguments(parser)
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> None:
    from pathlib import Path

    from lssgen.evaluation.upsampler import evaluate_upsampler, write_report
    from lssgen.loading import load_upsampler
    from lssgen.training.data import find_images, load_vae

    device, dtype = device_and_dtype(args)
    images = find_images(args.images)
    vae = load_vae(args.vae, args.subfolder, dtype, device)
    upsampler = load_upsampler(args.upsampler, dtype, device) if args.upsampler else None
    vae_name = f"{args.vae}/{args.subfolder}" if args.subfolder else args.vae
    report = evaluate_upsampler(
        vae,
        images,
        upsampler=upsampler,
        resolution=args.resolution,
        limit=args.limit,
        crops_per_image=args.crops_per_image,
        grid=args.grid,
        repeats=args.repeats,
        vae_name=vae_name,
        upsampler_name=args.upsampler,
        progress=args.progress,
    )
    out = write_report(report, args.out)
    print(Path(out, "report.md").read_text(), end="")
    print(f"report: {out / 'report.json'}, {out / 'report.md'}" + (f", {out / 'grid.png'}" if report.grid else ""))
