"""`lssgen geneval`: images for every prompt of a GenEval prompt file, in GenEval's layout (resumable)."""

from __future__ import annotations

import argparse

from .options import PUBLISHED_SPELLINGS, add_method_argument, add_method_options, positive_int


def add_parser(commands) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "geneval",
        help="generate images for every prompt of a GenEval prompt file, in GenEval's layout (resumable)",
        description="Generate images for a GenEval prompt file (evaluation_metadata.jsonl) into GenEval's folder "
        "layout, with run.json (settings, versions, timings). Re-running resumes. Several processes: "
        "`accelerate launch --num_processes N -m lssgen geneval ...` splits the prompts between them.",
    )
    parser.add_argument("prompts", help="GenEval prompt file: one JSON object with a `prompt` key per line")
    parser.add_argument("--model", required=True, help="diffusers pipeline folder or hub id")
    parser.add_argument(
        "--out",
        PUBLISHED_SPELLINGS["--out"],
        dest="out",
        required=True,
        help="output folder (created; an existing one is resumed)",
    )
    parser.add_argument(
        "--mode", choices=["lssgen", "baseline"], default=None, help="patched (lssgen, the default) or stock pipeline"
    )
    parser.add_argument(
        "--pipeline", default=None, help="the adapter, by name (default: detected); must serve the model's pipeline"
    )
    parser.add_argument(
        "--pipeline_type",
        default=None,
        help="the published script's spelling: a family (flux, sd3, sdxl, sd, cogview4) runs its stock pipeline "
        "(flux = --mode baseline --pipeline flux), lss + the family runs LSSGen (lssflux = --mode lssgen --pipeline "
        "flux)",
    )
    add_method_options(parser, prompt=False, published=True)
    add_method_argument(parser)
    parser.add_argument(
        "--max-sequence-length",
        type=positive_int,
        default=None,
        help="prompt tokens (default: the model folder's, else the pipeline's)",
    )
    parser.add_argument("--images-per-prompt", type=positive_int, default=4, help="samples per prompt (GenEval: 4)")
    parser.add_argument(
        "--batch-size", type=positive_int, default=None, help="images of one prompt per pipeline call (default: all)"
    )
    parser.set_defaults(run=run)
    return parser


def _mode_and_pipeline(args: argparse.Namespace) -> tuple[str, str | None]:
    """`--mode` and `--pipeline`, or what the published `--pipeline_type` says (both given: they must agree)."""
    from lssgen.evaluation.geneval import parse_pipeline_type

    if args.pipeline_type is None:
        return args.mode or "lssgen", args.pipeline
    mode, pipeline = parse_pipeline_type(args.pipeline_type)
    for option, given, implied in (("--mode", args.mode, mode), ("--pipeline", args.pipeline, pipeline)):
        if given is not None and given != implied:
            raise ValueError(
                f"--pipeline_type {args.pipeline_type} means {option} {implied}, but {option} {given} was given; "
                "pass one of the two."
            )
    return mode, pipeline


def run(args: argparse.Namespace) -> None:
    from lssgen.evaluation.geneval import GenEvalSettings, run_geneval
    from lssgen.methods import resolve_method
    from lssgen.plan import Options

    from .options import folder_defaults

    mode, pipeline = _mode_and_pipeline(args)
    # What the user leaves out comes from the model folder's lssgen.json (run_geneval fills in the family's after
    # that); its lssgen options other than start_sigma reach `lssgen.patch` from the folder itself. start_sigma is
    # passed with every call, so it is resolved here: the user's, the folder's, else the method's default.
    folder = folder_defaults(args.model)
    method = args.method or folder.patch.get("method")
    start_sigma = args.start_sigma
    if start_sigma is None and resolve_method(method).name == "lssgen":  # other methods read no start_sigma
        start_sigma = folder.patch.get("start_sigma", Options.start_sigma)
    settings = GenEvalSettings(
        model=args.model,
        out=args.out,
        mode=mode,
        pipeline=pipeline,
        upsampler=args.upsampler,
        steps=args.steps or folder.num_inference_steps,
        guidance=folder.guidance_scale if args.guidance is None else args.guidance,
        height=args.height or folder.height,
        width=args.width or folder.width,
        start_sigma=start_sigma,
        min_resolution=args.min_resolution,
        shorten_intermediate_steps=args.shorten_intermediate_steps,
        scaling_space=args.scaling_space,
        noise=args.noise,
        method=method,
        max_sequence_length=args.max_sequence_length or folder.max_sequence_length,
        images_per_prompt=args.images_per_prompt,
        batch_size=args.batch_size,
        seed=args.seed,
        dtype=args.dtype,
        device=args.device,
    )
    run_geneval(args.prompts, settings)
