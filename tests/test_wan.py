"""Wan 2.1 / 2.2 text-to-video: the adapter contract on video (frames kept, height and width scaled), plus what is
particular to WanPipeline (the latent frame count, Wan 2.2's two experts switched by timestep, the video VAE's
normalisation and pixel round trip, the FLOP count at the published sizes)."""

import pytest
import torch
from adapter_contract import AdapterContract, final_latents_and_decoded
from diffusers import WanPipeline

import lssgen
from lssgen.adapters.wan import WAN_14B_CONFIG, WanAdapter, latent_frame_count
from lssgen.evaluation.flops import bound_speedup, call_flops, make_plan, published_architectures
from lssgen.scaling import scale_up
from lssgen.tiny.wan import build_tiny_wan_pipeline

FRAMES = 5  # 2 latent frames: the frame axis is there, and the video VAE (most of a tiny call's time) stays quick
LATENT_FRAMES = 2
TEXT_TOKENS = 32  # `max_sequence_length` of the tests' calls: every prompt is padded to it


def wan_call_kwargs(pipe, prompts="a red fox in the snow", seed=0, **overrides):
    # Real prompts through the tiny umT5 encoder; CFG on (guidance 5.0, the stock empty negative prompt): two
    # transformer calls per step. The output is the final latent (equal latents decode to equal videos; decoding
    # is the stock pipeline's, checked in `test_pixel_round_trip_goes_through_the_video_vae` and
    # `test_latents_to_vae_is_what_the_pipeline_decodes`), which keeps the contract's many calls quick.
    kwargs = {
        "prompt": prompts,
        "height": 256,
        "width": 256,
        "num_frames": FRAMES,
        "num_inference_steps": 8,
        "guidance_scale": 5.0,
        "max_sequence_length": TEXT_TOKENS,
        "output_type": "latent",
        "generator": torch.Generator().manual_seed(seed),
    }
    # The contract's (and the drawn calls') `num_images_per_prompt` is WanPipeline's `num_videos_per_prompt`.
    if "num_images_per_prompt" in overrides:
        overrides = dict(overrides)
        overrides["num_videos_per_prompt"] = overrides.pop("num_images_per_prompt")
    kwargs.update(overrides)
    return kwargs


class TestWan(AdapterContract):
    adapter_name = "wan"
    lora_prefix = "transformer.blocks.0.attn1.to_q"
    calls_per_step = 2  # CFG: a conditional and an unconditional call

    def build_pipe(self, seed=0):
        return build_tiny_wan_pipeline(seed=seed)

    def call_kwargs(self, pipe, prompts="a red fox in the snow", seed=0, **overrides):
        return wan_call_kwargs(pipe, prompts, seed, **overrides)

    def images(self, pipe, **kwargs):
        return pipe(**kwargs).frames  # latents (videos, 16, latent frames, h, w); (videos, frames, 3, H, W) decoded

    def output_shape(self, batch, height, width):
        return (batch, 16, LATENT_FRAMES, height // 8, width // 8)

    def upsampler_batch(self, batch):
        return batch * LATENT_FRAMES  # the upsampler runs frame by frame

    def observe(self, pipe, kwargs):
        # Rotary positions are made inside the transformer from the latent's (frames, h, w): the shape is the
        # positional conditioning. The timestep is the scheduler's, 0-1000.
        return {
            "size": tuple(kwargs["hidden_states"].shape[2:]),
            "timestep": float(kwargs["timestep"][0]),
            "text_tokens": kwargs["encoder_hidden_states"].shape[1],
        }

    def expected(self, pipe, stage, timestep):
        return {
            "size": (LATENT_FRAMES, stage.latent_height, stage.latent_width),
            "timestep": timestep,
            "text_tokens": TEXT_TOKENS,
        }

    def denoiser_timestep(self, args, kwargs):
        return float(kwargs["timestep"][0])

    def test_each_stage_gets_the_stock_schedule_of_its_size(self):
        """Every stage's full schedule is what the unpatched WanPipeline sets for that step count: the scheduler's
        fixed `flow_shift`, whatever the size."""
        self.check_each_stage_gets_the_stock_schedule()

    # --- Wan specifics -----------------------------------------------------------------------------------------
    @pytest.mark.parametrize("num_frames", [1, 2, 4, 5, 7, 9, 10])
    def test_latent_frames_are_the_pipelines_own(self, pipe, num_frames):
        # The stock call rounds `num_frames` to k * 4 + 1 and compresses it 4x; the stage noise must have exactly
        # the frames the stock latents would have, and the video as many frames as the stock one.
        kwargs = self.call_kwargs(pipe, height=32, width=32, num_frames=num_frames, num_inference_steps=2)
        stock = pipe(**kwargs).frames
        assert stock.shape[2] == latent_frame_count(num_frames, pipe.vae_scale_factor_temporal)
        lssgen.patch(pipe, min_resolution=16)
        records, handle = self.trace(pipe)
        video = self.images(pipe, **{**kwargs, "output_type": "pt"})
        handle.remove()
        assert {r["size"][0] for r in records} == {stock.shape[2]}
        assert video.shape[1] == self.images(pipe, **{**kwargs, "output_type": "pt"}, start_sigma=1.0).shape[1]

    def test_num_frames_of_the_wrong_type_is_a_clear_error(self, pipe):
        lssgen.patch(pipe, **self.three_stages)
        with pytest.raises(TypeError, match="`num_frames` must be an int"):
            pipe(**self.call_kwargs(pipe, num_frames=9.0))
        assert pipe.scheduler is not None and pipe._lssgen.run is None

    def test_the_stock_prepare_latents_takes_stage_noise_as_is(self, pipe):
        # Why no replacement is needed (unlike Z-Image's): given latents come back unchanged in shape, float32.
        small = torch.randn(1, 16, LATENT_FRAMES, 4, 6, dtype=torch.float16)
        latents = pipe.prepare_latents(1, 16, 256, 256, FRAMES, torch.float32, "cpu", None, small)
        assert latents.shape == small.shape and latents.dtype == torch.float32

    def test_latent_scaling_keeps_frames_and_scales_each(self, pipe):
        adapter = WanAdapter()
        latents = torch.randn(2, 16, LATENT_FRAMES, 4, 6)
        up = scale_up(latents, "latent", pipe=pipe, adapter=adapter, upsampler=None)
        assert up.shape == (2, 16, LATENT_FRAMES, 8, 12)
        upsampler = self.small_upsampler(pipe)
        learned = scale_up(latents, "learned", pipe=pipe, adapter=adapter, upsampler=upsampler)
        for frame in range(LATENT_FRAMES):  # each frame on its own: the same as scaling it as an image
            alone = scale_up(latents[:, :, frame], "latent", pipe=pipe, adapter=adapter, upsampler=None)
            torch.testing.assert_close(up[:, :, frame], alone)
            torch.testing.assert_close(learned[:, :, frame], upsampler(latents[:, :, frame]))

    def test_pixel_round_trip_goes_through_the_video_vae(self, pipe):
        lssgen.patch(pipe, **self.three_stages)
        encoded, decoded = [], []
        encode, decode = pipe.vae.encode, pipe.vae.decode
        pipe.vae.encode = lambda x, *a, **k: encoded.append(tuple(x.shape)) or encode(x, *a, **k)
        pipe.vae.decode = lambda z, *a, **k: decoded.append(tuple(z.shape)) or decode(z, *a, **k)
        try:
            video = self.images(pipe, **self.call_kwargs(pipe, output_type="pt"), scaling_space="pixel")
        finally:
            del pipe.vae.encode, pipe.vae.decode
        assert video.shape == (1, FRAMES, 3, 256, 256) and torch.isfinite(video).all()
        plan = self.plan(pipe, **self.three_stages)
        # The whole clip, every pixel frame, resized and encoded again; then the final decode of the pipeline.
        assert encoded == [(1, 3, FRAMES, 2 * s.height, 2 * s.width) for s in plan.stages[:-1]]
        assert decoded[:-1] == [(1, 16, LATENT_FRAMES, s.latent_height, s.latent_width) for s in plan.stages[:-1]]

    def test_latents_to_vae_is_what_the_pipeline_decodes(self, pipe):
        adapter = WanAdapter()
        latents, decoded = final_latents_and_decoded(
            pipe, self.call_kwargs(pipe, height=32, width=48, num_inference_steps=2, output_type="pt")
        )
        assert latents.shape == (1, 16, LATENT_FRAMES, 4, 6)
        torch.testing.assert_close(adapter.latents_to_vae(pipe, latents), decoded)
        torch.testing.assert_close(adapter.vae_to_latents(pipe, decoded), latents)

    def test_default_size_and_scale_factor_are_the_pipelines(self, pipe):
        adapter = WanAdapter()
        assert not hasattr(pipe, "vae_scale_factor")  # why the adapter supplies it
        assert adapter.vae_scale_factor(pipe) == pipe.vae_scale_factor_spatial == 8
        assert adapter.default_size(pipe) == (480, 832)
        lssgen.patch(pipe)
        # A default call: 480P, the pipeline's 50 steps, Wan's min_resolution of 240 px.
        assert pipe._lssgen.defaults.min_resolution == 240
        plan = lssgen.plan_for(pipe)
        assert [(s.height, s.width, s.num_steps) for s in plan.stages] == [(240, 416, 25), (480, 832, 50)]
        plan = lssgen.plan_for(pipe, 720, 1280)  # 720 does not halve into multiples of 32 px: 704
        assert [(s.height, s.width, s.num_steps) for s in plan.stages] == [(352, 640, 50), (704, 1280, 50)]

    def test_torch_compile_compiles_once_per_stage_size(self):
        from torch._dynamo.utils import counters

        torch._dynamo.reset()
        counters.clear()
        pipe, eager = self.build_pipe(), self.build_pipe()
        for p in (pipe, eager):
            p.set_progress_bar_config(disable=True)
            lssgen.patch(p, **self.three_stages)
        pipe.transformer.compile(backend="aot_eager")  # see tests/test_flux.py: Dynamo's guards without inductor
        self.images(pipe, **self.call_kwargs(pipe))
        first_call = counters["stats"]["unique_graphs"]
        compiled = self.images(pipe, **self.call_kwargs(pipe))
        torch.testing.assert_close(compiled, self.images(eager, **self.call_kwargs(eager)), atol=1e-4, rtol=1e-4)
        # At most one graph per stage size (Dynamo's automatic dynamic shapes make the second size's graph
        # dynamic, and it serves the third: 2 graphs), none within a stage, none on the second call.
        assert 1 < first_call <= len(self.plan(pipe, **self.three_stages).stages) == 3
        assert counters["stats"]["unique_graphs"] == first_call
        torch._dynamo.reset()


def trace_experts(pipe):
    """(expert, timestep, sigma) of every transformer call, the sigma the staged scheduler is at."""
    calls, handles = [], []
    for name in ("transformer", "transformer_2"):

        def record(module, args, kwargs, name=name):
            sigma = pipe._lssgen.run.scheduler.position().sigma if pipe._lssgen.run else None
            calls.append((name, float(kwargs["timestep"][0]), sigma))

        handles.append(getattr(pipe, name).register_forward_pre_hook(record, with_kwargs=True))
    return calls, handles


class TestWan22:
    """Wan 2.2: `transformer` denoises the steps with timestep >= `boundary_ratio * 1000`, `transformer_2` the rest."""

    def build(self, boundary_ratio):
        pipe = build_tiny_wan_pipeline(boundary_ratio=boundary_ratio)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def test_start_sigma_one_and_unpatch_are_bit_identical_to_stock(self):
        pipe, stock = self.build(0.875), self.build(0.875)
        kwargs = {"guidance_scale_2": 3.0, "guidance_scale": 4.0}
        expected = stock(**wan_call_kwargs(stock, **kwargs)).frames
        lssgen.patch(pipe, min_resolution=64, base_height=256, base_width=256)
        assert torch.equal(pipe(**wan_call_kwargs(pipe, **kwargs), start_sigma=1.0).frames, expected)
        scaled = pipe(**wan_call_kwargs(pipe, **kwargs)).frames
        assert scaled.shape == expected.shape and not torch.equal(scaled, expected)
        lssgen.unpatch(pipe)
        assert torch.equal(pipe(**wan_call_kwargs(pipe, **kwargs)).frames, expected)

    @pytest.mark.parametrize("boundary_ratio", [0.5, 0.875])
    def test_each_step_goes_to_the_expert_of_its_noise_level_in_every_stage(self, boundary_ratio):
        pipe = self.build(boundary_ratio)
        options = {"min_resolution": 64, "base_height": 256, "base_width": 256, "shorten_intermediate_steps": False}
        lssgen.patch(pipe, **options)
        calls, handles = trace_experts(pipe)
        pipe(**wan_call_kwargs(pipe, num_inference_steps=12))
        for handle in handles:
            handle.remove()
        plan = lssgen.plan_for(pipe, 256, 256, 12, **options)
        assert [t for _, t, _ in calls[::2]] == pytest.approx([t for s in plan.stages for t in s.timesteps])
        boundary = boundary_ratio * pipe.scheduler.config.num_train_timesteps
        for name, timestep, sigma in calls:
            # The pipeline's rule on the timestep, and the same switch on the noise level itself (the timestep is
            # 1000 * sigma, truncated): the high-noise expert exactly where sigma >= boundary_ratio.
            assert (name == "transformer") == (timestep >= boundary) == (sigma * 1000 >= boundary), (name, sigma)
        # Per stage, which experts ran: with a boundary of 0.5 each stage (the later ones restart near sigma 0.75)
        # switches inside itself; with Wan2.2-A14B's 0.875 only the first stage reaches the high-noise expert.
        experts, position = [], 0
        for stage in plan.stages:
            count = 2 * stage.num_denoiser_steps
            experts.append({name for name, _, _ in calls[position : position + count]})
            position += count
        both = {"transformer", "transformer_2"}
        if boundary_ratio == 0.5:
            assert experts == [both] * len(plan.stages)
        else:
            assert experts == [both] + [{"transformer_2"}] * (len(plan.stages) - 1)


def test_wan_flop_counts():
    archs = published_architectures()
    wan21, wan22 = archs["Wan2.1-T2V-14B"], archs["Wan2.2-T2V-A14B"]
    assert (wan21.adapter.name, wan21.steps, wan21.cfg_factor, wan21.text_tokens) == ("wan", 50, 2, 512)
    assert (wan22.adapter.name, wan22.steps, wan22.cfg_factor, wan22.text_tokens) == ("wan", 40, 2, 512)
    # By hand, at 832x480 with 81 frames (21 x 30 x 52 = 32760 video tokens, 512 text tokens), per block: q, k, v,
    # out of self-attention (4 d²) and q, out of cross-attention (2 d²) on every video token, k, v of
    # cross-attention (2 d²) on every text token, the GELU MLP (2 d x 13824), and the attention matmuls (2 x 2 L² d
    # self, 2 x 2 L T d cross); plus the text embedder (4096 -> d -> d), the patch embedding and the output
    # projection (16 x 1 x 2 x 2 = 64 channels each way). Times 2 for guidance.
    d, ffn, text, layers = 5120, WAN_14B_CONFIG["ffn_dim"], 512, WAN_14B_CONFIG["num_layers"]
    tokens = 21 * (480 // 16) * (832 // 16)
    block = 2 * (tokens * (6 * d**2 + 2 * d * ffn) + text * 2 * d**2) + 4 * tokens**2 * d + 4 * tokens * text * d
    hand = 2 * (layers * block + 2 * text * (4096 * d + d * d) + 2 * tokens * 2 * 64 * d)
    assert call_flops("Wan2.1-T2V-14B", 60, 104) == pytest.approx(hand, rel=5e-3)
    assert call_flops("Wan2.2-T2V-A14B", 60, 104) == call_flops("Wan2.1-T2V-14B", 60, 104)  # one expert a step
    # 1280x720 cannot halve into 32-px multiples: the plan is 1280x704 (one stage at 640x352).
    plan = make_plan("Wan2.1-T2V-14B", (720, 1280), start_sigma=0.75, min_resolution=240)
    assert [(s.height, s.width) for s in plan.stages] == [(352, 640), (704, 1280)]
    for sigma in (0.75, 0.667):
        for size in ((480, 832), (720, 1280)):
            assert bound_speedup("Wan2.1-T2V-14B", size, start_sigma=sigma, min_resolution=240) > 1
        assert bound_speedup("Wan2.2-T2V-A14B", (480, 832), start_sigma=sigma, min_resolution=240) > 1


def test_wan22_caches_on_both_experts_restart_at_every_stage():
    """A cache on each expert keeps tensors of the stage it last ran in: both are cleared at every stage start (with
    a boundary of 0.5 the high-noise expert runs in all three stages, the low-noise one in the last two, so a stale
    state would meet a latent of another size)."""
    from diffusers.hooks import FirstBlockCacheConfig, HookRegistry, apply_first_block_cache

    pipe = build_tiny_wan_pipeline(boundary_ratio=0.5)
    pipe.set_progress_bar_config(disable=True)
    experts = {"transformer": pipe.transformer, "transformer_2": pipe.transformer_2}
    # Each expert's FirstBlockCache keeps its state (one per cache context) in the state manager of the hook on
    # its first block; clearing the cache empties it.
    managers = {}
    for name, expert in experts.items():
        apply_first_block_cache(expert, FirstBlockCacheConfig(threshold=0.5))
        head = HookRegistry.check_if_exists_or_initialize(expert.blocks[0]).get_hook("fbc_leader_block_hook")
        managers[name] = head.state_manager
    lssgen.patch(pipe, min_resolution=64, base_height=256, base_width=256)
    seen = []  # (expert, latent height and width, cached states before the call, after it)
    handles = []
    for name, expert in experts.items():
        handles.append(
            expert.register_forward_pre_hook(
                lambda module, args, kwargs, name=name: seen.append(
                    [name, tuple(kwargs["hidden_states"].shape[-2:]), len(managers[name]._state_cache)]
                ),
                with_kwargs=True,
            )
        )
        handles.append(
            expert.register_forward_hook(
                lambda module, args, output, name=name: seen[-1].append(len(managers[name]._state_cache))
            )
        )
    latents = pipe(**wan_call_kwargs(pipe, num_inference_steps=12)).frames
    for handle in handles:
        handle.remove()
    assert latents.shape == (1, 16, LATENT_FRAMES, 32, 32) and torch.isfinite(latents).all()
    sizes = [(8, 8), (16, 16), (32, 32)]
    for name in experts:
        calls = [call for call in seen if call[0] == name]
        stages = sorted({size for _, size, _, _ in calls})
        assert stages == {"transformer": sizes, "transformer_2": sizes[1:]}[name]
        for size in stages:
            first, *rest = [call for call in calls if call[1] == size]
            # Empty at the expert's first call of the stage: nothing of the stage before (or of the other expert's
            # turn) is left; the cache then fills and carries over within the stage.
            assert first[2] == 0, (name, size, first)
            assert first[3] > 0 and all(call[2] > 0 for call in rest), (name, size)
        assert not managers[name]._state_cache  # and cleared after the call


def test_per_token_timesteps_follow_the_stage_size():
    """`expand_timesteps` (Wan2.2 TI2V-5B): the pipeline sizes its per-token timesteps once, at the first stage's
    latent; every later stage's call must still get one timestep per token, each the step's own."""
    tiny = build_tiny_wan_pipeline()
    pipe, stock = (WanPipeline(**tiny.components, expand_timesteps=True) for _ in range(2))
    for p in (pipe, stock):
        p.set_progress_bar_config(disable=True)
    expected = stock(**wan_call_kwargs(stock)).frames
    options = {"min_resolution": 64, "base_height": 256, "base_width": 256}
    lssgen.patch(pipe, **options)
    assert torch.equal(pipe(**wan_call_kwargs(pipe), start_sigma=1.0).frames, expected)
    # What the transformer was called with, and the timesteps its condition embedder got (inside its forward,
    # after lssgen's hook): flattened, one per token.
    shapes, embedded = [], []
    handles = [
        pipe.transformer.register_forward_pre_hook(
            lambda module, args, kwargs: shapes.append(kwargs["hidden_states"].shape), with_kwargs=True
        ),
        pipe.transformer.condition_embedder.register_forward_pre_hook(
            lambda module, args, kwargs: embedded.append((args[0], kwargs["timestep_seq_len"])), with_kwargs=True
        ),
    ]
    latents = pipe(**wan_call_kwargs(pipe)).frames
    for handle in handles:
        handle.remove()
    assert latents.shape == expected.shape and torch.isfinite(latents).all()
    plan = lssgen.plan_for(pipe, 256, 256, 8, **options)
    timesteps = [t for s in plan.stages for t in s.timesteps for _ in range(2)]
    assert len(shapes) == len(embedded) == len(timesteps)
    for shape, (timestep, seq_len), want in zip(shapes, embedded, timesteps):
        tokens = shape[2] * (shape[3] // 2) * (shape[4] // 2)
        assert seq_len == tokens and timestep.shape == (tokens,) and torch.all(timestep == want)
    lssgen.unpatch(pipe)
    assert not pipe.transformer._diffusers_hook.hooks
    assert torch.equal(pipe(**wan_call_kwargs(pipe)).frames, expected)
