"""The power law of a model's latent spectrum, for method 'spectral' where lssgen has none measured (issue #27).

Renders scenes of `lssgen.scenes` (a stream no scene-model training used for its evaluation: the held-out ones) at
the model's native size, encodes them with the model folder's VAE into the latents its pipeline denoises
(`Adapter.encode_pixels`: the VAE's mode, then the pipeline's normalisation), and fits `P(w) = a w^-beta`
(`lssgen.spectrum.fit_latent_spectrum`). Prints `a`, `beta`, the `--method` spelling, and the stage splits that
spelling gives at the native size and twice it.

    python -m scripts.fit_latent_spectrum --model weights/scene-t2i --threads 1
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from tqdm import tqdm

import lssgen
from lssgen.scenes.world import evaluation_scenes, render
from lssgen.spectrum import fit_latent_spectrum


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(lssgen.weights_path("scene-t2i")), help="a model folder")
    parser.add_argument("--scenes", type=int, default=96, help="held-out scenes to encode (there are 96)")
    parser.add_argument("--size", type=int, help="render size in px (default: the model's native size)")
    parser.add_argument("--steps", type=int, default=20, help="steps of the plans printed")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    pipe = lssgen.load_pipeline(args.model)
    adapter = lssgen.find_adapter(pipe)
    size = args.size or adapter.default_size(pipe)[0]
    scenes = evaluation_scenes()[: args.scenes]
    latents = []
    with torch.no_grad():
        for start in tqdm(range(0, len(scenes), 16), desc="encoding"):
            pixels = np.stack([np.asarray(render(scene, size)) for scene in scenes[start : start + 16]])
            images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
            latents.append(adapter.encode_pixels(pipe, images.to(pipe.vae.dtype)).float())
    a, beta = fit_latent_spectrum(torch.cat(latents))
    spelling = f"spectral:a={a:.6g},beta={beta:.6g}"
    print(f"{len(scenes)} scenes at {size} px, latents {tuple(latents[0].shape[1:])}: a = {a:.6g}, beta = {beta:.6g}")
    print(f"--method {spelling}")
    lssgen.patch(pipe, None)
    for side in (size, 2 * size):
        for delta in (0.1, 0.3, 0.5):
            plan = lssgen.plan_for(pipe, side, side, args.steps, method=f"{spelling},delta={delta}")
            splits = " + ".join(f"{stage.num_denoiser_steps} at {stage.width} px" for stage in plan.stages)
            print(f"{side} px, delta {delta}: {splits}")


if __name__ == "__main__":
    main()
