"""lssgen with the other things users stack on a pipeline: LoRA hot-swap and layerwise casting, in every stage."""

import torch
from safetensors.torch import save_file
from test_flux import flux_call_kwargs

import lssgen
from lssgen.tiny import build_tiny_flux_pipeline

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
    assert casted.shape == expected.shape and torch.isfinite(casted).all()
    assert not torch.equal(casted, expected)  # bfloat16 storage changes the numbers...
    torch.testing.assert_close(casted, expected, atol=0.1, rtol=0)  # ...a little
    assert pipe.transformer.transformer_blocks[0].attn.to_q.weight.dtype == torch.bfloat16
