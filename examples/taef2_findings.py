"""Reproduce the figures of docs/flux2-upsampler.md that do not come from `lssgen eval-upsampler`: the two
measured reasons why stage 2 encodes each crop on its own and uses a small learning rate, and the scikit-image
photos used to follow the training. Photos from `python -m lssgen.training.photos --out data/photos`.

    python examples/taef2_findings.py crops --images data/photos/train
    python examples/taef2_findings.py sign-step --images data/photos/train --upsampler flux2-x2-latent
    python examples/taef2_findings.py skimage-photos --upsampler flux2-x2-latent weights/flux2-x2

`crops`: PSNR of a 256 px centre crop decoded from the crop cut out of the whole photo's latent, vs from the
crop's own latent (taef2 normalises over the whole image, so the two differ everywhere, not only at the edges).
`sign-step`: PSNR of a fixed batch after one step of each size along the sign of the pixel-MSE gradient (what
Adam's first step does), from the given upsampler.
`skimage-photos`: PSNR of the pixel round trip and of each upsampler on 8 scikit-image photos that are in neither
split (the centre crop and 2 seeded random crops of each).
"""

import argparse
import copy
from pathlib import Path

import torch
import torch.nn.functional as F

from lssgen.evaluation.metrics import psnr
from lssgen.latents import LatentNormalization
from lssgen.training.data import (
    decode,
    downsample_nearest,
    encode,
    find_images,
    fixed_crops,
    load_image,
    load_vae,
    pixel_round_trip,
    random_crop,
    vae_spatial_factor,
)
from lssgen.upsampler import LatentUpsampler

CROP = 256


def mean_psnr(images: torch.Tensor, targets: torch.Tensor) -> float:
    return psnr((images + 1) / 2, (targets + 1) / 2).mean().item()


@torch.no_grad()
def cut_versus_own_latent(vae, norm, paths) -> None:
    factor = vae_spatial_factor(vae)  # px per latent cell
    cut, own = [], []
    for path in paths:
        image = load_image(path)
        height, width = image.shape[1] // 16 * 16, image.shape[2] // 16 * 16
        whole = image[None, :, :height, :width]
        top, left = (height // 2 - CROP // 2) // 16 * 16, (width // 2 - CROP // 2) // 16 * 16
        crop = whole[..., top : top + CROP, left : left + CROP]
        rows, cols = slice(top // factor, (top + CROP) // factor), slice(left // factor, (left + CROP) // factor)
        cut_latent = encode(vae, whole, norm)[..., rows, cols]
        cut.append(mean_psnr(decode(vae, cut_latent, norm), crop))
        own.append(mean_psnr(decode(vae, encode(vae, crop, norm), norm), crop))
        print(f"{path.stem}: cut from the whole latent {cut[-1]:.2f} dB, own latent {own[-1]:.2f} dB")
    print(f"mean over {len(paths)} photos: cut {sum(cut) / len(cut):.2f} dB, own {sum(own) / len(own):.2f} dB")


def sign_steps(vae, norm, paths, upsampler_folder, sizes) -> None:
    generator = torch.Generator().manual_seed(5)
    images = torch.stack([random_crop(load_image(path), CROP, generator) for path in paths])
    low = encode(vae, downsample_nearest(images), norm)
    upsampler = LatentUpsampler.from_pretrained(upsampler_folder).eval()
    output = decode(vae, upsampler(low), norm)
    F.mse_loss(output, images).backward()
    print(f"{len(paths)} crops from {upsampler_folder}: {mean_psnr(output.detach(), images):.2f} dB")
    for size in sizes:
        stepped = copy.deepcopy(upsampler)
        with torch.no_grad():
            for stepped_param, param in zip(stepped.parameters(), upsampler.parameters()):
                stepped_param -= size * param.grad.sign()
            print(f"after a sign step of {size:g}: {mean_psnr(decode(vae, stepped(low), norm), images):.2f} dB")


SKIMAGE_PHOTOS = ["camera", "brick", "grass", "gravel", "motorcycle_left", "coins", "moon", "retina"]


@torch.no_grad()
def skimage_photos(vae, norm, upsampler_folders) -> None:
    import skimage

    folder = Path(skimage.__file__).parent / "data"
    paths = [next(folder.glob(f"{name}.*")) for name in SKIMAGE_PHOTOS]
    images = torch.stack([crop for _, _, crop in fixed_crops(paths, CROP, per_image=3)])
    low = encode(vae, downsample_nearest(images), norm)
    print(f"pixel round trip: {mean_psnr(decode(vae, pixel_round_trip(vae, low, norm), norm), images):.2f} dB")
    for upsampler_folder in upsampler_folders:
        upsampler = LatentUpsampler.from_pretrained(upsampler_folder).eval()
        print(f"{upsampler_folder}: {mean_psnr(decode(vae, upsampler(low), norm), images):.2f} dB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("finding", choices=["crops", "sign-step", "skimage-photos"])
    parser.add_argument("--images", help="folder of photos (crops, sign-step)")
    parser.add_argument("--vae", default="../shared/data/taef2")
    parser.add_argument("--upsampler", nargs="+", default=[], help="LatentUpsampler folder(s)")
    parser.add_argument("--photos", type=int, default=None, help="first N (crops: 8, sign-step: 10)")
    parser.add_argument("--skip", nargs="*", default=["freshflower", "wood"], help="names to leave out")
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e-5, 1e-4], help="sign-step sizes")
    args = parser.parse_args()
    if args.finding != "skimage-photos" and not args.images:
        parser.error(f"{args.finding} needs --images FOLDER")
    if args.finding == "sign-step" and len(args.upsampler) != 1:
        parser.error("sign-step needs one --upsampler FOLDER (the weights to step from)")
    if args.finding == "skimage-photos" and not args.upsampler:
        parser.error("skimage-photos needs --upsampler FOLDER [FOLDER ...]")

    vae = load_vae(args.vae)
    norm = LatentNormalization.from_vae_config(vae.config)
    if args.finding == "skimage-photos":
        skimage_photos(vae, norm, args.upsampler)
        return
    paths = [path for path in find_images(args.images) if path.stem not in args.skip]
    if args.finding == "crops":
        cut_versus_own_latent(vae, norm, paths[: args.photos or 8])
    else:
        sign_steps(vae, norm, paths[: args.photos or 10], args.upsampler[0], args.sizes)


if __name__ == "__main__":
    main()
