"""Reference editing (issue #21): FLUX.1 Kontext, Qwen-Image-Edit (and Edit-Plus) and FLUX.2's `image=` append a
reference image's tokens, with ids of their own, after the generated image's tokens. Through lssgen the reference
tokens and their ids are the stock call's in every stage, while the generated image's tokens and ids follow the
stage; Kontext plans on the size its `max_area` rescaling really gives."""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
import test_flux
import test_flux2
import test_qwenimage
import torch
from diffusers import (
    FluxKontextPipeline,
    FluxPipeline,
    QwenImageEditPipeline,
    QwenImageEditPlusPipeline,
)
from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS
from PIL import Image

import lssgen
from lssgen.adapters.flux2 import _latent_ids
from lssgen.tiny import build_tiny_flux_pipeline
from lssgen.tiny.flux2 import build_tiny_flux2_pipeline
from lssgen.tiny.qwenimage import build_tiny_qwenimage_pipeline

# 128 x 64 pixels of noise: 8 x 4 reference tokens at 1/16 for Kontext (without `_auto_resize`) and FLUX.2.
REFERENCE = Image.fromarray((np.random.RandomState(3).rand(64, 128, 3) * 255).astype(np.uint8))
REFERENCE_TOKENS = 32


def build(pipeline_class, components: dict):
    """`pipeline_class` from a family's tiny components; what they lack (Qwen-Image-Edit's VL `processor`, Kontext's
    IP-Adapter parts) is None: the tests pass prompt embeddings, so no text encoder or processor runs."""
    parameters = list(inspect.signature(pipeline_class.__init__).parameters.values())[1:]
    pipe = pipeline_class(**{p.name: components.get(p.name) for p in parameters})
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- the adapter contract -------------------------------------------------------------------------------------
# A light subset, within the suite's time budget: each class shares its family's denoiser, hooks, caches and
# argument handling with the family's text-to-image class, whose contract runs in full; what the reference changes
# is what is kept.
REFERENCE_TESTS = (
    "test_start_sigma_one_and_unpatch_are_bit_identical_to_stock",
    "test_denoiser_calls_follow_the_plan",
    "test_batch_of_prompts_with_several_images_each",
    "test_stage_noise_is_drawn_for_every_image_of_the_batch",
    "test_interrupt_in_a_low_resolution_stage_still_returns_a_full_size_image",
)


def reference_contract(family: type, pipeline_class: type | None, members: dict) -> type:
    """The contract of `family` (a family's contract test class) for `pipeline_class` (None: the family's own),
    called with `REFERENCE` as `image=`; `members` add the class's observations and expectations."""
    contract_tests = {name for cls in family.__mro__ for name in vars(cls) if name.startswith("test_")}
    dropped = dict.fromkeys(contract_tests - set(REFERENCE_TESTS))

    def build_pipe(self, seed=0):
        pipe = family.build_pipe(self, seed=seed)
        return pipe if pipeline_class is None else build(pipeline_class, pipe.components)

    def call_kwargs(self, pipe, prompts="a red fox in the snow", seed=0, **overrides):
        kwargs = family.call_kwargs(self, pipe, prompts, seed, **overrides)
        return {"image": REFERENCE, **self.reference_arguments(kwargs), **kwargs}

    name = f"Test{(pipeline_class or family).__name__.removeprefix('Test')}Reference"
    return type(
        name,
        (family,),
        {
            **dropped,
            "trace_cases": family.trace_cases[1:3],  # two plans: one shortened, one not
            "build_pipe": build_pipe,
            "call_kwargs": call_kwargs,
            "reference_arguments": lambda self, kwargs: {},
            **members,
        },
    )


def kontext_ids(module, args, records):
    """Inside FLUX.1's transformer (the rotary embedding's input, after lssgen's ids hook): the generated image's
    grid (t = 0), whether its ids are row-major, and how many reference ids (t = 1) follow."""
    ids = args[0][test_flux.TEXT_TOKENS :]
    latent = ids[ids[:, 0] == 0]
    rows, cols = int(latent[:, 1].max()) + 1, int(latent[:, 2].max()) + 1
    row_major = latent.shape[0] == rows * cols and torch.equal(latent[cols], torch.tensor([0.0, 1, 0]))
    records[-1]["ids"] = (rows, cols, row_major, int((ids[:, 0] == 1).sum()))


def _kontext_expected(self, pipe, stage, timestep):
    rows, cols = stage.latent_height // 2, stage.latent_width // 2
    tokens = rows * cols + REFERENCE_TOKENS
    return {"tokens": tokens, "timestep": timestep, "ids": (rows, cols, True, REFERENCE_TOKENS)}


TestFluxKontextPipeline = reference_contract(
    test_flux.TestFlux,
    FluxKontextPipeline,
    {
        "adapter_name": "flux-kontext",
        # The requested size at its own area is the size Kontext denoises at; the reference at its own size.
        "reference_arguments": lambda self, kwargs: {
            "max_area": kwargs.get("height", self.height) * kwargs.get("width", self.width),
            "_auto_resize": False,
        },
        "conditioning_hooks": lambda self, pipe, records: [
            pipe.transformer.pos_embed.register_forward_pre_hook(lambda m, args: kontext_ids(m, args, records))
        ],
        "expected": _kontext_expected,
        # The contract's plans are for calls at the requested size's own area (see `reference_arguments`).
        "plan": lambda self, pipe, height=None, width=None, steps=None, **options: test_flux.TestFlux.plan(
            self, pipe, height, width, steps, max_area=(height or self.height) * (width or self.width), **options
        ),
    },
)
_flux2_members = {
    "expected": lambda self, pipe, stage, timestep: test_flux2.Flux2Contract.expected(
        self, pipe, stage, timestep, references=REFERENCE_TOKENS
    )
}
TestFlux2Reference = reference_contract(test_flux2.TestFlux2, None, _flux2_members)
TestFlux2KleinReference = reference_contract(test_flux2.TestFlux2Klein, None, _flux2_members)


def _qwen_edit_members(pipeline_class: type, adapter_name: str, image) -> dict:
    """Qwen-Image-Edit (and Edit-Plus) in the Qwen-Image contract: one transformer block and no true CFG (each call
    carries the reference's 4140 tokens: the pipelines resize it to about 1024² pixels), `image` as the class takes
    it, and the reference's grid after the stage's in every call's image shapes."""
    height, width = QWEN_EDIT_REFERENCE_SIZE
    rows, cols = height // 16, width // 16

    def expected(self, pipe, stage, timestep, prompts=1):
        stage_rows, stage_cols = stage.latent_height // 2, stage.latent_width // 2
        return {
            "tokens": stage_rows * stage_cols + rows * cols,
            "timestep": timestep,
            "shapes": (((1, stage_rows, stage_cols), (1, rows, cols)),) * prompts,
            "positions": stage_rows * stage_cols + rows * cols,
        }

    return {
        "adapter_name": adapter_name,
        "calls_per_step": 1,
        "build_pipe": lambda self, seed=0: _encoding_each_reference_once(
            build(pipeline_class, build_tiny_qwenimage_pipeline(seed=seed, num_layers=1).components), seed
        ),
        "call_kwargs": lambda self, pipe, prompts="a red fox in the snow", seed=0, **overrides: _qwen_edit_call(
            pipe, prompts=prompts, seed=seed, **{"num_inference_steps": self.steps, "image": image, **overrides}
        ),
        "expected": expected,
    }


_ENCODED: dict[tuple, object] = {}


def _encoding_each_reference_once(pipe, seed: int):
    """`pipe` with its VAE's `encode` remembering what it returned for an input, per tiny-VAE seed: the stock
    pipelines encode the reference at about 1024² pixels in every call (1.3-2 s on a CPU core, most of a tiny call's
    time), the same pixels by the same weights each time, and the contract makes some fifty calls. lssgen never
    encodes the reference (its adapter leaves it to the pipeline), so what the contract checks is unchanged; an
    input of other pixels (another size, another image) is encoded afresh."""
    encode = pipe.vae.encode

    def encode_once(pixels, *args, **kwargs):
        key = (seed, pixels.shape, pixels.dtype, hashlib.sha256(pixels.detach().cpu().numpy().tobytes()).digest())
        if key not in _ENCODED:
            _ENCODED[key] = encode(pixels, *args, **kwargs)
        return _ENCODED[key]

    pipe.vae.encode = encode_once
    return pipe


# The size both classes resize `REFERENCE` (2:1) to before encoding it: see the size test below.
QWEN_EDIT_REFERENCE_SIZE = (736, 1440)
TestQwenImageEditPipeline = reference_contract(
    test_qwenimage.TestQwenImage,
    QwenImageEditPipeline,
    _qwen_edit_members(QwenImageEditPipeline, "qwenimage-edit", REFERENCE),
)


def _several_images_of_one_prompt_each_from_its_generator(self, pipe):
    """Edit-Plus's stand-in for the contract's two batch tests: the stock class refuses a batch of prompts (the bad
    input test keeps that error), so one prompt with two images, each of its own generator."""
    lssgen.patch(pipe, **self.three_stages)
    generators = [torch.Generator().manual_seed(seed) for seed in (11, 12)]
    both = self.images(pipe, **self.call_kwargs(pipe, num_images_per_prompt=2, generator=generators))
    alone = self.images(pipe, **self.call_kwargs(pipe, generator=torch.Generator().manual_seed(12)))
    assert both.shape == self.output_shape(2, self.height, self.width) and not torch.equal(both[0], both[1])
    torch.testing.assert_close(both[1], alone[0], atol=1e-4, rtol=1e-4)


TestQwenImageEditPlusPipeline = reference_contract(
    test_qwenimage.TestQwenImage,
    QwenImageEditPlusPipeline,
    {
        **_qwen_edit_members(QwenImageEditPlusPipeline, "qwenimage-edit-plus", [REFERENCE]),
        "test_batch_of_prompts_with_several_images_each": None,
        "test_stage_noise_is_drawn_for_every_image_of_the_batch": None,
        "test_several_images_of_one_prompt_each_from_its_generator": (
            _several_images_of_one_prompt_each_from_its_generator
        ),
    },
)


# --- the references inside the model, stage by stage ---------------------------------------------------------
def _kontext():
    return build(FluxKontextPipeline, build_tiny_flux_pipeline(seed=0).components)


def _qwen_edit_pipe(pipeline_class):
    # One transformer block: every call carries the reference's ~4100 tokens (the pipelines resize it to 1024²).
    return build(pipeline_class, build_tiny_qwenimage_pipeline(seed=0, num_layers=1).components)


def _qwen_edit_call(pipe, **overrides):
    # No true CFG: one call per step (the two-call loop is the text-to-image contract's).
    kwargs = test_qwenimage.qwenimage_call_kwargs(
        pipe, **{"true_cfg_scale": 1.0, "num_inference_steps": 8, **overrides}
    )
    for name in ("negative_prompt_embeds", "negative_prompt_embeds_mask"):
        del kwargs[name]
    return {"image": REFERENCE, **kwargs}


def _flux_reader(pipe, records):
    """FLUX.1's ids as the rotary embedding receives them (text ids first)."""

    def read(module, args):
        records[-1]["ids"] = args[0][test_flux.TEXT_TOKENS :].clone()

    return pipe.transformer.pos_embed.register_forward_pre_hook(read)


def _flux2_reader(pipe, records):
    """FLUX.2's image ids as the rotary embedding receives them (the first call of a forward; the text's follows)."""

    def read(module, args):
        records[-1].setdefault("ids", args[0].clone())

    return pipe.transformer.pos_embed.register_forward_pre_hook(read)


def _qwen_reader(pipe, records):
    """Qwen-Image's image rotary embedding as made inside the transformer: the shapes it is given and the
    frequencies it returns, one row per image token (the generated image's first, then the references')."""

    def read(module, args, kwargs, output):
        records[-1]["shapes"] = [tuple(shape) for shape in args[0][0]]
        records[-1]["ids"] = output[0].clone()

    return pipe.transformer.pos_embed.register_forward_hook(read, with_kwargs=True)


def _flux_stage_ids(pipe, rows, cols, like):
    return FluxPipeline._prepare_latent_image_ids(None, rows, cols, like.device, like.dtype)


def _flux2_stage_ids(pipe, rows, cols, like):
    return _latent_ids(1, rows, cols, like.device, like.dtype)[0]


def _qwen_stage_ids(pipe, rows, cols, like):
    return pipe.transformer.pos_embed([(1, rows, cols)], like.device, max_txt_seq_len=1)[0]


@dataclass(frozen=True)
class Editing:
    """How one class is built, called and read inside: `options` are the lssgen options of the staged call,
    `call_options` the stock call's own arguments that `plan_for` needs to plan it."""

    pipe: Callable
    call: Callable
    reader: Callable
    stage_ids: Callable
    steps: int
    options: dict
    call_options: dict = field(default_factory=dict)
    # The class whose stock call shows the reference, where not this one's (see Edit-Plus below).
    stock_of: str | None = None


EDITING = {
    "FluxKontextPipeline": Editing(
        _kontext,
        lambda pipe, **o: test_flux.flux_call_kwargs(
            pipe, image=REFERENCE, max_area=256 * 256, _auto_resize=False, **o
        ),
        _flux_reader,
        _flux_stage_ids,
        8,
        {"min_resolution": 64, "base_height": 256, "base_width": 256},
        {"max_area": 256 * 256},
    ),
    "Flux2KleinPipeline": Editing(
        lambda: build_tiny_flux2_pipeline(seed=0, klein=True),
        lambda pipe, **o: test_flux2.flux2_call_kwargs(pipe, klein=True, image=REFERENCE, **o),
        _flux2_reader,
        _flux2_stage_ids,
        8,
        {"min_resolution": 64, "base_height": 256, "base_width": 256},
    ),
    # Few steps: every call carries the reference's ~4100 tokens, and each call encodes it at about 1024² pixels.
    "QwenImageEditPipeline": Editing(
        lambda: _qwen_edit_pipe(QwenImageEditPipeline),
        _qwen_edit_call,
        _qwen_reader,
        _qwen_stage_ids,
        4,
        {"min_resolution": 128, "shorten_intermediate_steps": False},
    ),
    "QwenImageEditPlusPipeline": Editing(
        lambda: _qwen_edit_pipe(QwenImageEditPlusPipeline),
        lambda pipe, **o: _qwen_edit_call(pipe, image=[REFERENCE], **o),  # a list, as the pipeline takes several
        _qwen_reader,
        _qwen_stage_ids,
        4,
        {"min_resolution": 128, "shorten_intermediate_steps": False},
        # One reference is resized and encoded exactly as QwenImageEditPipeline does it (the same size rule and VAE,
        # checked equal on diffusers 0.42.1), so that stock call stands for both: each one spends seconds encoding
        # the reference at about 1024² pixels. Should the two ever differ, this test fails.
        stock_of="QwenImageEditPipeline",
    ),
}


def _record(pipe, reader, call):
    """Every transformer call's input tokens and the ids (or rotary rows) made of them inside the model."""
    records = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: records.append({"tokens": kwargs["hidden_states"].clone()}), with_kwargs=True
    )
    handle = reader(pipe, records)
    try:
        images = pipe(**call).images
    finally:
        hook.remove()
        handle.remove()
    return images, records


@functools.cache
def _stock_records(name):
    """What the transformer of a stock call of `name` received; the reference does not depend on the step count,
    so a 2-step call shows it."""
    editing = EDITING[name]
    stock = editing.pipe()
    return _record(stock, editing.reader, editing.call(stock, num_inference_steps=2))[1]


@pytest.mark.parametrize("name", list(EDITING))
def test_reference_tokens_and_ids_inside_the_model_are_the_stock_calls_in_every_stage(name):
    """At each stage the generated image's tokens and ids are the stage's; the reference tokens that follow them,
    and their ids (Qwen-Image: their rows of the rotary embedding), are exactly the stock call's."""
    editing = EDITING[name]
    pipe = editing.pipe()
    stock_records = _stock_records(editing.stock_of or name)
    target = (256 // 16) ** 2
    references = stock_records[0]["tokens"].shape[1] - target
    assert references > 0
    reference_tokens = stock_records[0]["tokens"][:, target:]
    reference_ids = stock_records[0]["ids"][target:]

    lssgen.patch(pipe, **editing.options)
    images, records = _record(pipe, editing.reader, editing.call(pipe, num_inference_steps=editing.steps))
    assert images.shape == (1, 3, 256, 256) and torch.isfinite(images).all()
    plan = lssgen.plan_for(pipe, 256, 256, editing.steps, **editing.options, **editing.call_options)
    per_step = len(records) // plan.total_steps
    stages = [stage for stage in plan.stages for _ in stage.timesteps for _ in range(per_step)]
    assert len(plan.stages) >= 2 and len(records) == len(stages)
    for record, stage in zip(records, stages):
        rows, cols = stage.latent_height // 2, stage.latent_width // 2
        tokens, ids = record["tokens"], record["ids"]
        assert tokens.shape[1] == rows * cols + references
        assert torch.equal(tokens[:, rows * cols :], reference_tokens)
        assert torch.equal(ids[rows * cols :], reference_ids)
        assert torch.equal(ids[: rows * cols], editing.stage_ids(pipe, rows, cols, ids))
        if "shapes" in record:
            assert record["shapes"] == [(1, rows, cols), *stock_records[0]["shapes"][1:]]


# --- Kontext's size -------------------------------------------------------------------------------------------
def test_kontext_plans_on_the_size_max_area_gives_and_auto_resize_keeps_its_reference_size():
    """A 512 px request at `max_area` 256² denoises at 256 px (the plan's size); `_auto_resize` (on by default)
    still gives the reference a preset Kontext size, whose tokens follow the stage's in every call."""
    pipe = _kontext()
    lssgen.patch(pipe, min_resolution=64)
    call = test_flux.flux_call_kwargs(pipe, height=512, width=512, image=REFERENCE, max_area=256 * 256)
    plan = lssgen.plan_for(pipe, 512, 512, 8, max_area=256 * 256, min_resolution=64)
    assert (plan.height, plan.width) == (256, 256) and len(plan.stages) == 3
    assert lssgen.plan_for(pipe, 512, 512, 8, min_resolution=64).height == 1024  # the stock default area
    _, width, height = min((abs(2 - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)  # 2:1 reference
    references = (height // 16) * (width // 16)
    tokens = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: tokens.append(kwargs["hidden_states"].shape[1]), with_kwargs=True
    )
    images = pipe(**call).images
    hook.remove()
    assert images.shape == (1, 3, 256, 256)
    assert tokens == [
        (s.latent_height // 2) * (s.latent_width // 2) + references for s in plan.stages for _ in s.timesteps
    ]


def test_kontext_size_that_does_not_halve_is_planned_and_denoised_at_the_plans_size(caplog):
    """`max_area` 208² rescales 256² to 208² (13 x 13 tokens); a two-stage plan rounds that down to 192², a size
    that halves, and the call denoises and returns at exactly that size."""
    pipe = _kontext()
    lssgen.patch(pipe, min_resolution=64)
    options = {"max_area": 208 * 208, "min_resolution": 64}
    plan = lssgen.plan_for(pipe, 256, 256, 8, **options)
    assert len(plan.stages) == 2 and (plan.height, plan.width) == (192, 192)
    with caplog.at_level(logging.WARNING, logger="lssgen"):
        images = pipe(**test_flux.flux_call_kwargs(pipe, image=REFERENCE, _auto_resize=False), **options).images
    assert images.shape == (1, 3, plan.height, plan.width)
    assert f"generating {plan.width}x{plan.height} instead" in caplog.text


# --- bad input ------------------------------------------------------------------------------------------------
BAD = {
    # The stock pipelines' own errors, raised before any denoising.
    "kontext-area": (_kontext, lambda p: test_flux.flux_call_kwargs(p, image=REFERENCE, max_area="large")),
    "kontext-image-batch": (
        _kontext,
        lambda p: test_flux.flux_call_kwargs(p, image=[REFERENCE] * 2, prompts=["a", "b", "c"], _auto_resize=False),
    ),
    "edit-no-image": (lambda: _qwen_edit_pipe(QwenImageEditPipeline), lambda p: _qwen_edit_call(p, image=None)),
    "edit-tensor-image": (
        lambda: _qwen_edit_pipe(QwenImageEditPipeline),
        lambda p: _qwen_edit_call(p, image=torch.rand(1, 3, 64, 64)),
    ),
    "edit-plus-prompts": (
        lambda: _qwen_edit_pipe(QwenImageEditPlusPipeline),
        lambda p: _qwen_edit_call(p, prompts=["a fox", "a boat"]),
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_the_stock_error_before_denoising_with_the_pipe_usable(case):
    make_pipe, make_call = BAD[case]
    stock, pipe = make_pipe(), make_pipe()
    with pytest.raises(Exception) as stock_error:  # noqa: PT011 - whatever the stock pipeline raises
        stock(**make_call(stock))
    stock_scheduler = pipe.scheduler
    lssgen.patch(pipe, min_resolution=128, shorten_intermediate_steps=False)
    calls = []
    hook = pipe.transformer.register_forward_pre_hook(lambda module, args: calls.append(1))
    with pytest.raises(type(stock_error.value)) as error:
        pipe(**make_call(pipe))
    hook.remove()
    assert str(error.value) == str(stock_error.value)
    assert not calls and pipe.scheduler is stock_scheduler and pipe._lssgen.run is None
    if case.startswith("kontext"):  # and a good call still runs (cheap here; a Qwen-Image-Edit call takes seconds)
        call = EDITING["FluxKontextPipeline"].call(pipe)
        assert pipe(**call).images.shape == (1, 3, 256, 256)


@pytest.mark.parametrize(
    ("max_area", "match"),
    [(0, "must be a positive number of pixels, got 0"), (True, "got True"), (100, "rescales 256x256 to 0x0")],
)
def test_kontext_area_the_stock_call_would_denoise_as_an_empty_image_is_a_clear_error(max_area, match):
    """The stock call rescales to 0 x 0, denoises nothing and fails only when decoding; lssgen says why first."""
    pipe = _kontext()
    lssgen.patch(pipe, min_resolution=64)
    calls = []
    hook = pipe.transformer.register_forward_pre_hook(lambda module, args: calls.append(1))
    with pytest.raises(ValueError, match=match):
        pipe(**test_flux.flux_call_kwargs(pipe, image=REFERENCE, max_area=max_area, _auto_resize=False))
    with pytest.raises(ValueError, match=match):
        lssgen.plan_for(pipe, 256, 256, 8, max_area=max_area)
    hook.remove()
    assert not calls and pipe._lssgen.run is None
    assert pipe(**EDITING["FluxKontextPipeline"].call(pipe, num_inference_steps=4)).images.shape == (1, 3, 256, 256)


# --- Qwen-Image-Edit's size -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("pipeline_class", "expected"),
    # The stock rule: the reference's aspect ratio at 1024² pixels in multiples of 32, then whole 2x2 patches; Edit
    # reads the first reference, Edit-Plus the last. 2:1 gives 1448 x 724 -> 1440 x 736; 1:2 the other way round.
    [(QwenImageEditPipeline, (736, 1440)), (QwenImageEditPlusPipeline, (1440, 736))],
)
def test_qwen_edit_without_a_size_plans_on_the_size_its_reference_gives(pipeline_class, expected):
    pipe = _qwen_edit_pipe(pipeline_class)
    lssgen.patch(pipe, min_resolution=256)
    tall = REFERENCE.transpose(Image.Transpose.ROTATE_90)
    plan = lssgen.plan_for(pipe, None, None, 20, image=[REFERENCE, tall])
    assert (plan.height, plan.width) == expected and len(plan.stages) == 2
    given = lssgen.plan_for(pipe, 512, 1024, 20, image=[REFERENCE, tall])  # a size given is the size generated
    assert (given.height, given.width) == (512, 1024)


# --- Hires fix ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["FluxKontextPipeline", "QwenImageEditPlusPipeline"])
def test_hires_fix_refuses_an_editing_pipeline_it_has_no_image_to_image_class_for(name):
    """The editing adapters map no image-to-image class (the family's text-to-image one is not theirs to map)."""
    pipe = EDITING[name].pipe()
    lssgen.patch(pipe)
    with pytest.raises(ValueError, match=f"pipeline for {name} .* adapter maps none"):
        lssgen.hires_fix(pipe, REFERENCE, height=256, width=512)
