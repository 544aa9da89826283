"""`lssgen train-upsampler`: train a LatentUpsampler for a VAE on a folder of images."""

from __future__ import annotations

import argparse

from .options import DTYPE_NAMES, add_threads_argument, device_and_dtype, interval, positive_int


def add_parser(commands) -> argparse.ArgumentParser:
    parser = commands.add_parser("train-upsampler", help="train a LatentUpsampler for a VAE on a folder of images")
    parser.add_argument("--vae", required=True, help="diffusers VAE folder or hub id (a pipeline with --subfolder vae)")
    parser.add_argument("--subfolder", default=None, help="e.g. vae, for a whole pipeline folder")
    parser.add_argument("--images", required=True, help="folder of jpg/png/webp images (searched recursively)")
    parser.add_argument("--out", required=True, help="folder for the upsampler, its model card and checkpoint")
    parser.add_argument("--resolution", type=positive_int, default=256, help="crop size of the high-res target, px")
    parser.add_argument("--steps", type=positive_int, default=2000)
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (cosine decay to a tenth)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--dtype", choices=sorted(DTYPE_NAMES), default="float32", help="VAE dtype (upsampler: float32)"
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    add_threads_argument(parser)
    parser.add_argument("--config", help="JSON file of LatentUpsampler config keys (default: from the VAE)")
    parser.add_argument(
        "--pixel-loss", choices=["none", "l1", "mse"], default="none", help="also compare decoded images"
    )
    parser.add_argument("--pixel-loss-weight", type=float, default=0.1)
    parser.add_argument("--latent-loss-weight", type=float, default=1.0, help="0: train on the pixel loss alone")
    parser.add_argument("--init-from", help="LatentUpsampler folder to start from (fine-tuning)")
    parser.add_argument("--val-every", type=interval, default=250, help="validate every N steps (0: only at the end)")
    parser.add_argument(
        "--save-every", type=interval, default=500, help="checkpoint every N steps (0: only at the end)"
    )
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    parser.add_argument(
        "--cache-latents", action="store_true", help="encode whole images once into --out/cache, crop their latents"
    )
    parser.add_argument(
        "--scales", type=float, nargs="+", default=[1.0], help="also train on images reduced to these sizes, e.g. 1 0.5"
    )
    parser.add_argument("--hflip", action="store_true", help="also train on mirrored images")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    from lssgen.training.data import find_images, load_vae
    from lssgen.training.upsampler import train_upsampler

    config = None
    if args.config:
        try:
            config = json.loads(Path(args.config).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"--config {args.config}: {error}") from None
        if not isinstance(config, dict):
            raise ValueError(f"--config {args.config}: must hold a JSON object of LatentUpsampler config keys.")
    images = find_images(args.images)
    device, dtype = device_and_dtype(args)
    vae = load_vae(args.vae, args.subfolder, dtype, device)
    result = train_upsampler(
        vae,
        images,
        args.out,
        resolution=args.resolution,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        config=config,
        pixel_loss=args.pixel_loss,
        pixel_loss_weight=args.pixel_loss_weight,
        latent_loss_weight=args.latent_loss_weight,
        init_from=args.init_from,
        val_every=args.val_every,
        save_every=args.save_every,
        resume=args.resume,
        cache_latents=args.cache_latents,
        scales=args.scales,
        hflip=args.hflip,
        vae_name=args.vae + (f" (subfolder {args.subfolder})" if args.subfolder else ""),
        images_name=args.images,
    )
    margin = 100 * (1 - result.val_mse / result.bicubic_mse) if result.bicubic_mse else 0.0
    print(
        f"validation MSE ({result.val_images} held-out images): learned {result.val_mse:.5f}, "
        f"bicubic {result.bicubic_mse:.5f} ({abs(margin):.0f}% {'lower' if margin >= 0 else 'HIGHER: train longer'})"
    )
    print(f"validation PSNR: learned {result.val_psnr:.2f} dB, pixel round trip {result.pixel_round_trip_psnr:.2f} dB")
    print(f"trained {result.steps} steps on {result.train_images} images in {result.seconds:.1f} s -> {result.out_dir}")
