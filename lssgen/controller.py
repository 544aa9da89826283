"""The multi-resolution controller: a diffusers callback that switches stages inside one stock denoising loop."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils.torch_utils import randn_tensor

from .adapters.base import Adapter
from .caches import StageCacheSchedules
from .methods import SCALE_UP_AND_RENOISE
from .plan import Stage, StagePlan
from .scaling import scale_up
from .schedule import StagedScheduler


@dataclass
class Run:
    """Everything one multi-resolution call needs; lives only for the duration of that call."""

    pipe: Any
    adapter: Adapter
    plan: StagePlan
    scheduler: StagedScheduler
    scaling_space: str
    upsampler: Any
    generator: torch.Generator | list[torch.Generator] | None
    batch: int  # images the call makes (prompts x images per prompt)
    caches: StageCacheSchedules
    progress_bar: Any = field(default=None, repr=False)
    # The packed latents the first stage starts from: noise, or an img2img image noised to the stage's start.
    first_latents: torch.Tensor | None = field(default=None, repr=False)
    # A ControlNet call's per-stage conditions, scales and windows (`lssgen.controlnets.StageControls`); else None.
    controls: Any = field(default=None, repr=False)
    # The method's transition: how the latent goes from one stage to the next (`lssgen.methods`).
    transition: Any = field(default=SCALE_UP_AND_RENOISE, repr=False)
    # noise="shared": the call's one noise field, unpacked at the target size, that every stage reads (else None).
    noise_field: torch.Tensor | None = field(default=None, repr=False)
    # The noise each stage started from, by stage index (unpacked): what an inpainting loop noises its image with.
    noises: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    # An inpainting call's kept region (`lssgen.inpainting.KeptRegion`); else None.
    kept: Any = field(default=None, repr=False)

    @property
    def current_stage(self) -> Stage:
        return self.plan.stages[self.scheduler.stage_index]

    def show_stage(self, stage: Stage) -> None:
        if self.progress_bar is not None:
            self.progress_bar.set_postfix_str(
                f"stage {stage.index + 1}/{len(self.plan.stages)} {stage.width}x{stage.height}", refresh=False
            )

    def scale_up(self, latents: torch.Tensor, stage: Stage) -> torch.Tensor:
        """Packed latents of `stage` → unpacked latents of the next stage's size (no noise added)."""
        unpacked = self.adapter.unpack(self.pipe, latents, stage.latent_height, stage.latent_width)
        return scale_up(unpacked, self.scaling_space, pipe=self.pipe, adapter=self.adapter, upsampler=self.upsampler)

    def stage_noise(self, stage: Stage, like: torch.Tensor) -> torch.Tensor:
        """Standard Gaussian noise for `stage`, shaped, placed and typed like `like` (unpacked): drawn now from the
        call's generators, or with noise="shared" the call's noise field read at the stage's cells
        ([`noise_at_cells`])."""
        if self.noise_field is None:
            noise = randn_tensor(like.shape, generator=self.generator, device=like.device, dtype=like.dtype)
        else:
            noise = noise_at_cells(self.noise_field, stage.latent_height, stage.latent_width)
            noise = noise.to(device=like.device, dtype=like.dtype)
        self.noises[stage.index] = noise
        return noise

    def renoise(self, clean: torch.Tensor, stage: Stage) -> torch.Tensor:
        """Noise of the new shape (`stage_noise`), mixed in to the noise level `stage` really starts from."""
        return self.noised(clean, stage, self.stage_noise(stage, clean))

    def noised(self, clean: torch.Tensor, stage: Stage, noise: torch.Tensor) -> torch.Tensor:
        """`clean` with `noise` mixed in to the noise level `stage` really starts from."""
        if self.adapter.flow:
            sigma = stage.first_sigma
            return ((1.0 - sigma) * clean.float() + sigma * noise.float()).to(clean.dtype)
        scheduler = self.scheduler.stage_schedulers[stage.index]
        # The scheduler's own timestep tensor: PNDM and DDIM index `alphas_cumprod` with it (so it must be an
        # integer tensor), the sigma-based schedulers read their begin index. One per image, as img2img does.
        timestep = scheduler.timesteps[stage.begin_index : stage.begin_index + 1].to(clean.device)
        return scheduler.add_noise(clean, noise, timestep.repeat(clean.shape[0]))

    def stage_end_sigma(self, stage: Stage) -> float:
        """The noise level `stage`'s last step reached (flow models)."""
        scheduler = self.scheduler.stage_schedulers[stage.index]
        return float(scheduler.sigmas[stage.begin_index + stage.num_denoiser_steps])

    def next_stage_latents(self, latents: torch.Tensor, stage: Stage) -> torch.Tensor:
        following = self.plan.stages[stage.index + 1]
        unpacked = self.transition.next_stage_latents(self, latents, stage, following)
        if self.kept is not None:
            # Inpainting: the loop's mask, image and noise follow the stage, and the kept region starts as the
            # stage's own image noised with the stage's noise (not the scaled-up one).
            noise = self.noises[following.index]
            self.kept.enter(following, noise)
            if self.kept.image is not None:
                image = self.kept.image_at(following, unpacked.shape[0], unpacked.dtype)
                unpacked = self.kept.keep(unpacked, following, self.noised(image, following, noise))
        self.show_stage(following)
        # Caches hold tensors of this stage's size: the next stage starts with none (see lssgen.caches).
        self.caches.start(following)
        return self.adapter.pack(self.pipe, unpacked)

    def latents_at_target_size(self, latents: torch.Tensor, stage: Stage) -> torch.Tensor:
        """After an interrupt in a low-resolution stage: scale up as is, x2 at a time, so the pipeline can still
        decode (a stage at the target size, as a bottleneck plan's first, is left as it is)."""
        for following in self.plan.stages[stage.index + 1 :]:
            if following.latent_height > stage.latent_height:
                latents = self.adapter.pack(self.pipe, self.scale_up(latents, stage))
                stage = following
        return latents


def noise_at_cells(field: torch.Tensor, latent_height: int, latent_width: int) -> torch.Tensor:
    r"""
    A noise field `(..., H, W)` read at a grid of `latent_height` x `latent_width` cells: each cell takes the value at
    its top-left corner in the field's grid, so cell `(i, j)` of a grid `s` times coarser reads `field[..., i s, j s]`.
    Doubling a grid keeps every cell's noise in its top-left child; the other three children read their own
    coordinates. Leading axes (batch, channels, frames) are kept.
    """
    height, width = field.shape[-2:]
    if height % latent_height or width % latent_width:
        raise ValueError(
            f"A {latent_width}x{latent_height} latent grid does not divide the {width}x{height} noise field evenly."
        )
    return field[..., :: height // latent_height, :: width // latent_width]


class StageSwitchCallback(PipelineCallback):
    r"""
    Switches to the next stage right after the last step of each low-resolution stage: unpack → the method's
    transition (LSSGen's and MrFlow's: scale up x2, re-noise with fresh noise to the next stage's first sigma) →
    pack. Chain a user's callback before it with [`~diffusers.callbacks.MultiPipelineCallbacks`] (see
    [`chain_callbacks`]).
    """

    tensor_inputs = ["latents"]

    def __init__(self, run: Run):
        super().__init__()
        self.run = run

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        # Decisions use the step index: some pipelines pass a sigma, not a timestep, as `timestep`.
        plan = self.run.plan
        stage = plan.stage_at(step_index)
        if stage is plan.stages[-1]:
            return callback_kwargs
        latents = callback_kwargs["latents"]
        if getattr(pipeline, "interrupt", False):
            callback_kwargs["latents"] = self.run.latents_at_target_size(latents, stage)
        elif step_index == plan.stage_ends[stage.index] - 1:
            callback_kwargs["latents"] = self.run.next_stage_latents(latents, stage)
        return callback_kwargs


class _FunctionCallback(PipelineCallback):
    """A plain `callback_on_step_end` function, as a PipelineCallback that can be chained."""

    def __init__(self, fn, tensor_inputs: list[str]):
        super().__init__()
        self.fn = fn
        self._tensor_inputs = list(tensor_inputs)

    @property
    def tensor_inputs(self) -> list[str]:
        return self._tensor_inputs

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        outputs = self.fn(pipeline, step_index, timestep, callback_kwargs)
        return {**callback_kwargs, **(outputs or {})}


def chain_callbacks(
    user_callback: Any, user_tensor_inputs: list[str] | None, controller: StageSwitchCallback
) -> tuple[MultiPipelineCallbacks, list[str]]:
    """The user's callback (if any) first, then the controller; and the tensor inputs both need."""
    if user_callback is None:
        callbacks: list[Any] = []
    elif isinstance(user_callback, MultiPipelineCallbacks):
        callbacks = list(user_callback.callbacks)
    elif isinstance(user_callback, PipelineCallback):
        callbacks = [user_callback]
    elif callable(user_callback):
        callbacks = [_FunctionCallback(user_callback, user_tensor_inputs or ["latents"])]
    else:
        raise TypeError(
            "`callback_on_step_end` must be a function, a PipelineCallback or MultiPipelineCallbacks, "
            f"got {type(user_callback).__name__}."
        )
    chained = MultiPipelineCallbacks([*callbacks, controller])
    wanted = [*(user_tensor_inputs or []), *chained.tensor_inputs]
    return chained, list(dict.fromkeys(wanted))
