"""`lssgen eval-generation`: stock vs lssgen settings on a scene text-to-image model, scored, in one run."""

from __future__ import annotations

import argparse
from pathlib import Path

from .options import (
    add_device_arguments,
    add_methods_argument,
    device_and_dtype,
    integer,
    path_or_shipped,
    positive_int,
)

# `lssgen.scenes.world.EVALUATION_PER_CATEGORY` (importing it loads torch); tests/test_cli_startup.py checks they agree.
EVALUATION_PER_CATEGORY = 16


def add_parser(commands) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "eval-generation",
        help="stock vs lssgen settings on a scene text-to-image model: accuracy, duplicates, KID, fidelity and time, "
        "in one run",
        description="Generate the held-out scene prompts (lssgen.scenes) with the stock pipeline, lssgen in every "
        "scaling space at start sigma 0.75 and 0.667 with 2 and 3 stages, and the stock pipeline at the step counts "
        "that fit in each lssgen setting's time; score them with the scene scorer (GenEval's rules, and the share of "
        "images with exactly the prompt's objects and the mean number of extra instances). Writes report.json, "
        "report.md and grid.png.",
    )
    parser.add_argument("--model", help="pipeline folder taking string prompts (default: the shipped scene-t2i)")
    parser.add_argument("--scorer", help="SceneScorer folder (default: the shipped scene-scorer)")
    parser.add_argument(
        "--upsampler",
        help="LatentUpsampler folder (default: the model folder's, else the one lssgen ships for the family; "
        "without any, the learned space is skipped)",
    )
    # No defaults here: the model folder's lssgen.json gives them (scene-t2i: 256 px, 20 steps, guidance 4, 32
    # tokens), else the family's published settings.
    parser.add_argument("--size", type=positive_int, default=None, help="image side, px (default: the native size)")
    parser.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="denoising steps of the stock pipeline, N (default: the model folder's, else the family's)",
    )
    parser.add_argument(
        "--guidance", type=float, default=None, help="guidance scale (default: the model folder's, else the family's)"
    )
    parser.add_argument(
        "--max-sequence-length", type=positive_int, default=None, help="prompt tokens (default: the model folder's)"
    )
    parser.add_argument(
        "--per-category",
        type=integer(1, f"an integer from 1 to {EVALUATION_PER_CATEGORY}"),
        default=EVALUATION_PER_CATEGORY,
        help="held-out prompts per category",
    )
    parser.add_argument("--stages", type=int, nargs="+", choices=[2, 3], default=[2, 3], help="stage counts")
    add_methods_argument(parser)
    parser.add_argument(
        "--equal-speed", action=argparse.BooleanOptionalAction, default=True, help="stock at equal-time step counts"
    )
    parser.add_argument(
        "--cache",
        metavar="NAME[:key=value,...]",
        help="also run the stock N-step setting and every lssgen setting with a diffusers cache on the denoiser "
        "(rows `... + NAME cache`): first-block, pyramid-attention-broadcast, taylorseer, mag or faster, e.g. "
        "first-block:threshold=0.2",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the first prompt (then one more per prompt)")
    parser.add_argument("--out", default="outputs/eval-generation", help="report folder")
    parser.add_argument(
        "--save-images",
        action="store_true",
        help="also write every image as it is made, images/<row>/<prompt>.png, and the settings and times before "
        "scoring, run.json, so that --rescore can score the run again (also when its own scoring failed)",
    )
    parser.add_argument(
        "--rescore",
        metavar="RUN_DIR",
        help="generate nothing: score the images of a run written with --save-images again with --scorer (its "
        "settings, prompts and times kept), into --out",
    )
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    add_device_arguments(parser)
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> None:
    if args.rescore:
        return rescore(args)
    import lssgen
    from lssgen.caches import cache_config
    from lssgen.evaluation.generation import GenerationSetting, default_settings, evaluate_generation, write_report
    from lssgen.loading import load_pipeline
    from lssgen.methods import resolve_method
    from lssgen.scenes.scorer import SceneScorer
    from lssgen.scenes.world import CATEGORIES, evaluation_scenes

    from .options import chosen_upsampler

    if args.per_category > EVALUATION_PER_CATEGORY:
        raise ValueError(
            f"--per-category {args.per_category}: the held-out set has {EVALUATION_PER_CATEGORY} prompts per category."
        )
    if args.cache:
        cache_config(args.cache, pipe=None)  # a malformed spec fails here, before the model loads
    device, dtype = device_and_dtype(args)
    model = path_or_shipped(args.model, "scene-t2i", "--model")
    pipe = load_pipeline(model, device, dtype)
    scorer_path = path_or_shipped(args.scorer, "scene-scorer", "--scorer")
    scorer = SceneScorer.from_pretrained(scorer_path).to(device)
    upsampler = chosen_upsampler(pipe, args.upsampler)
    scenes = evaluation_scenes()[: args.per_category * len(CATEGORIES)]  # categories take turns in the set
    # Size, steps, guidance and prompt length: the user's, else the folder's lssgen.json; then the family's size
    # and steps, and the pipeline's own guidance and prompt length (left out of the call).
    adapter, folder = lssgen.find_adapter(pipe), lssgen.model_defaults(pipe)
    size = args.size or folder.height or adapter.default_size(pipe)[0]
    steps = args.steps or folder.num_inference_steps or adapter.default_steps
    guidance = folder.guidance_scale if args.guidance is None else args.guidance
    length = args.max_sequence_length or folder.max_sequence_length
    call = {
        name: value
        for name, value in ((adapter.guidance_argument, guidance), ("max_sequence_length", length))
        if value is not None
    }
    settings = default_settings(size, steps, learned=upsampler is not None, stages=args.stages)
    settings += [GenerationSetting(resolve_method(m).spelling(), steps, {"method": m}) for m in args.methods]
    report = evaluate_generation(
        pipe,
        scorer,
        scenes,
        size=size,
        steps=steps,
        upsampler=upsampler,
        settings=settings,
        equal_speed=args.equal_speed,
        seed=args.seed,
        call=call,
        progress=args.progress,
        model_name=model,
        scorer_name=scorer_path,
        cache=cache_config(args.cache, pipe) if args.cache else None,
        cache_label=args.cache.partition(":")[0] if args.cache else "cache",
        save_images_to=args.out if args.save_images else None,
    )
    out = write_report(report, args.out)
    print(report.markdown())
    print(f"wrote {out / 'report.json'}, report.md, grid.png" + (" and images/" if args.save_images else ""))


# The options --rescore uses; every other one is a generation option, which the run it scores already fixed.
RESCORE_KEEPS = ("rescore", "scorer", "out", "progress", "device", "threads", "run", "command")


def rescore(args: argparse.Namespace) -> None:
    from lssgen.evaluation.generation import rescore_generation, write_report
    from lssgen.scenes.scorer import SceneScorer

    defaults = vars(add_parser(argparse.ArgumentParser().add_subparsers()).parse_args([]))
    ignored = [name for name, value in vars(args).items() if name not in RESCORE_KEEPS and value != defaults[name]]
    if ignored:
        options = ", ".join("--" + name.replace("_", "-") for name in ignored)
        raise ValueError(f"--rescore generates nothing: {options} would be ignored (the run's are kept); drop them.")
    if Path(args.out).resolve() == Path(args.rescore).resolve():
        raise ValueError("--rescore: give --out a folder of its own (the run it scores stays as it was).")
    device, _ = device_and_dtype(args)
    scorer_path = path_or_shipped(args.scorer, "scene-scorer", "--scorer")
    scorer = SceneScorer.from_pretrained(scorer_path).to(device)
    report = rescore_generation(args.rescore, scorer, scorer_name=scorer_path, progress=args.progress)
    out = write_report(report, args.out)
    print(report.markdown())
    print(f"wrote {out / 'report.json'}, report.md and grid.png")
