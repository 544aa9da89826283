"""lssgen with the other things users stack on a pipeline: LoRA hot-swap, layerwise casting and weight-only int8
quantization, in every stage."""

import pytest
import torch
from safetensors.torch import save_file
from test_flux import flux_call_kwargs
from test_sd3 import sd3_call_kwargs

import lssgen
from lssgen.tiny import build_tiny_flux_pipeline
from lssgen.tiny.sd3 import build_tiny_sd3_pipeline

THREE_STAGES = {"min_resolution": 64, "base_height": 256, "base_width": 256}
LORA_TARGET = "transformer.transformer_blocks.0.attn.to_q"


def _pipe():
    pipe = build_tiny_flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _lora(path, seed: int):
    target = build_tiny_flux_pipeline().transformer.transformer_blocks[0].attn.to_q
    generator = torch.Generator().manual_seed(seed)
    save_file(
        {
            f"{LORA_TARGET}.lora_A.weight": torch.randn(2, target.in_features, generator=generator),
            f"{LORA_TARGET}.lora_B.weight": torch.randn(target.out_features, 2, generator=generator),
        },
        path,
    )
    return path


def test_lora_hot_swap_between_patched_calls(tmp_path):
    first, second = _lora(tmp_path / "first.safetensors", 1), _lora(tmp_path / "second.safetensors", 2)
    pipe = _pipe()
    pipe.enable_lora_hotswap(target_rank=2)
    pipe.load_lora_weights(first, adapter_name="style")
    lssgen.patch(pipe, **THREE_STAGES)
    with_first = pipe(**flux_call_kwargs(pipe)).images
    pipe.load_lora_weights(second, adapter_name="style", hotswap=True)  # in place, between two patched calls
    with_second = pipe(**flux_call_kwargs(pipe)).images

    fresh = _pipe()
    fresh.load_lora_weights(second, adapter_name="style")
    lssgen.patch(fresh, **THREE_STAGES)
    assert not torch.equal(with_first, with_second)
    assert torch.equal(with_second, fresh(**flux_call_kwargs(fresh)).images)


def test_layerwise_casting_in_every_stage():
    # Weights stored in bfloat16, computed in float32: every stage's denoiser calls go through the casting hooks.
    pipe = _pipe()
    pipe.transformer.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
    lssgen.patch(pipe, **THREE_STAGES)
    casted = pipe(**flux_call_kwargs(pipe)).images
    reference = _pipe()
    lssgen.patch(reference, **THREE_STAGES)
    expected = reference(**flux_call_kwargs(reference)).images
    # The scale of a real change on this tiny model: the same seed with another prompt (~0.05 at most, measured),
    # so that a stage that lost its text conditioning under the casting hooks cannot pass as rounding.
    other_prompt = reference(**flux_call_kwargs(reference, prompts="a blue boat on a calm lake")).images
    prompt_difference = (other_prompt - expected).abs().max().item()
    casting_difference = (casted - expected).abs().max().item()
    assert casted.shape == expected.shape and torch.isfinite(casted).all()
    assert casting_difference > 0  # bfloat16 storage changes the numbers...
    # ...by rounding only (~0.002 measured): a tenth of what another prompt changes, at most.
    assert casting_difference < prompt_difference / 10, (casting_difference, prompt_difference)
    torch.testing.assert_close(casted, expected, atol=0.005, rtol=0)
    assert pipe.transformer.transformer_blocks[0].attn.to_q.weight.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("build", "call_kwargs"),
    [(build_tiny_flux_pipeline, flux_call_kwargs), (build_tiny_sd3_pipeline, sd3_call_kwargs)],
    ids=["flux", "sd3"],
)
def test_weight_only_int8_quantization_in_every_stage(build, call_kwargs):
    # optimum-quanto's int8 weights run on the CPU (torchao's would too, but importing it makes diffusers print
    # failed CUDA-library loads on a CPU-only machine). Needs torch >= 2.6: the `quantization` extra.
    quanto = pytest.importorskip(
        "optimum.quanto", reason="weight-only int8 needs optimum-quanto (the quantization extra)"
    )

    reference = build()
    reference.set_progress_bar_config(disable=True)
    lssgen.patch(reference, **THREE_STAGES)
    expected = reference(**call_kwargs(reference)).images

    pipe = build()
    pipe.set_progress_bar_config(disable=True)
    quanto.quantize(pipe.transformer, weights=quanto.qint8)
    quanto.freeze(pipe.transformer)
    linears = [module for module in pipe.transformer.modules() if isinstance(module, torch.nn.Linear)]
    # Frozen: every Linear holds int8 weights (and a scale), no float copy.
    assert linears and all(isinstance(module.weight, quanto.WeightQBytesTensor) for module in linears)
    assert all(module.weight.qtype is quanto.qint8 for module in linears)
    lssgen.patch(pipe, **THREE_STAGES)
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda module, args: calls.append(1))
    images = pipe(**call_kwargs(pipe)).images
    handle.remove()
    assert len(calls) == lssgen.plan_for(pipe, 256, 256, 8, **THREE_STAGES).total_steps  # every stage, quantized
    assert images.shape == expected.shape == (1, 3, 256, 256) and torch.isfinite(images).all()
    assert not torch.equal(images, expected)  # int8 weights change the numbers...
    torch.testing.assert_close(images, expected, atol=0.05, rtol=0)  # ...a little


def test_compile_repeated_blocks_across_stages():
    """Regional compilation (diffusers' `compile_repeated_blocks`, FLUX's blocks): the same images as eager, and a
    second call compiles nothing new (each block's graphs for every stage size are reused)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    pipe, eager = _pipe(), _pipe()
    for p in (pipe, eager):
        lssgen.patch(p, **THREE_STAGES)
    # aot_eager: Dynamo's tracing and guards as with inductor, without minutes of C++ code generation on a CPU.
    pipe.transformer.compile_repeated_blocks(backend="aot_eager")
    compiled = pipe(**flux_call_kwargs(pipe)).images
    graphs = counters["stats"]["unique_graphs"]
    again = pipe(**flux_call_kwargs(pipe)).images
    assert counters["stats"]["unique_graphs"] == graphs > 0
    torch.testing.assert_close(again, compiled)
    torch.testing.assert_close(compiled, eager(**flux_call_kwargs(eager)).images, atol=1e-4, rtol=1e-4)
    torch._dynamo.reset()
