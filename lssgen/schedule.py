"""A scheduler that stands in for `pipe.scheduler` for one call and runs each stage on a scheduler of its own."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from .plan import Stage, StagePlan, fresh_scheduler


class StepPosition(NamedTuple):
    """Where the denoising loop is: the stage in force, the step within it, and that step's noise level."""

    stage: Stage
    stage_step: int  # 0 at the stage's first step
    sigma: float | None  # None for schedulers without sigmas (PNDM, DDIM)
    step: int  # the loop's own step counter, over all stages


class StagedScheduler:
    """Presents the concatenated timesteps of all stages to the stock denoising loop.

    Every stage has its own fresh inner scheduler (own step count, time shift and start index), so a
    multistep solver never carries history across a resolution change and each stage's last step lands on
    its x0. The stage in force is decided by how many `step` calls have been made.
    """

    # For pipelines without `callback_on_step_end` (PixArt): called with the latents after the last step of every
    # stage but the last, it returns the next stage's starting latents, which `step` then returns. Their loop feeds
    # the step's output back as the latents, so the stage switch lands where the step-end callback would put it.
    on_stage_end: Callable[[torch.Tensor, Stage], torch.Tensor] | None = None

    def __init__(self, plan: StagePlan, template: Any, device: torch.device | str | None = None):
        self.plan = plan
        self.template = template
        self.stage_schedulers = []
        for stage in plan.stages:
            scheduler = fresh_scheduler(template, stage.scheduler_config)
            scheduler.set_timesteps(device=device, **stage.scheduler_kwargs)
            # Index-based schedulers need the start; PNDM and DDIM have no begin index and step by timestep.
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(stage.begin_index)
            self.stage_schedulers.append(scheduler)
        # A stage may stop before its schedule ends (method 'spectral' walks one schedule through every stage).
        self.timesteps = torch.cat(
            [
                s.timesteps[stage.begin_index : stage.begin_index + stage.num_denoiser_steps]
                for s, stage in zip(self.stage_schedulers, plan.stages)
            ]
        )
        self._sigmas = _concatenated_sigmas(self.stage_schedulers, plan)
        # As numbers, copied to the host once: `position` is read on every denoiser call.
        self._sigma_values = None if self._sigmas is None else self._sigmas.tolist()
        self.steps_taken = 0
        # Kept alongside `steps_taken` (not derived on read) so hooks that read the stage under torch.compile
        # guard on the stage, not on the step counter.
        self.stage_index = 0
        # What the conditioning hooks read: the stage in force while it is smaller than the target, else None (at
        # the target size the pipeline's own conditioning is right). Two stages at the target size (a method that
        # starts at full size) read the same None: one compiled graph per stage size, not per stage.
        self.low_resolution_stage = self._low_resolution_stage()

        # Pipelines inspect `step`'s signature to decide whether to pass `eta` and `generator`.
        def step(*args, **kwargs):
            return self._step(*args, **kwargs)

        self.step = functools.wraps(template.step)(step)

    def _low_resolution_stage(self) -> Stage | None:
        stage, target = self.plan.stages[self.stage_index], self.plan.stages[-1]
        at_target = (stage.latent_height, stage.latent_width) == (target.latent_height, target.latent_width)
        return None if at_target else stage

    @property
    def current(self) -> Any:
        return self.stage_schedulers[self.stage_index]

    # The stock loop's view -------------------------------------------------------------------------------------
    @property
    def config(self):
        return self.template.config

    @property
    def order(self) -> int:
        return self.stage_schedulers[0].order

    @property
    def init_noise_sigma(self):
        return self.stage_schedulers[0].init_noise_sigma

    @property
    def sigmas(self):
        # Pipelines index `sigmas` with their loop counter, like `timesteps` (CogView4 passes
        # `scheduler.sigmas[i]` to callbacks), so they are concatenated the same way.
        return self.current.sigmas if self._sigmas is None else self._sigmas

    @property
    def step_index(self):
        return self.current.step_index

    @property
    def begin_index(self):
        return self.current.begin_index

    @property
    def num_inference_steps(self) -> int:
        return self.plan.total_steps

    def position(self) -> StepPosition:
        """The step the next denoiser call belongs to."""
        step = min(self.steps_taken, self.plan.total_steps - 1)
        stage = self.plan.stages[self.stage_index]
        first = self.plan.stage_ends[stage.index] - stage.num_denoiser_steps
        sigma = None if self._sigma_values is None else self._sigma_values[step]
        return StepPosition(stage, step - first, sigma, step)

    def set_timesteps(self, num_inference_steps=None, device=None, timesteps=None, sigmas=None, **kwargs) -> None:
        # The plan fixed the schedule; the pipeline's own arguments (N, its sigmas, its single `mu`) do not apply.
        if device is not None:
            self.timesteps = self.timesteps.to(device)

    def set_begin_index(self, begin_index: int = 0) -> None:
        if begin_index != 0:
            raise ValueError("lssgen plans its own stage starts; a pipeline cannot start it part-way.")

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        scale = getattr(self.current, "scale_model_input", None)
        return sample if scale is None else scale(sample, *args, **kwargs)

    def scale_noise(self, sample: torch.Tensor, timestep: Any, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Flow schedulers' noising: before any step (img2img's start) by the first stage's scheduler; after a step
        (an inpainting loop noises its image to the level the step reached) by the scheduler of the stage that
        made it, which at a stage's last step is the stage's end, not the next stage's start."""
        stage = self.plan.stage_at(self.steps_taken - 1) if self.steps_taken else self.plan.stages[self.stage_index]
        return self.stage_schedulers[stage.index].scale_noise(sample, timestep, noise)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Diffusion schedulers' noising, as `scale_noise`: after a step by the stage that made it. At a stage's
        last step an inpainting loop asks for the next stage's first timestep; the level that stage reached is its
        own next timestep, or clean where its schedule ran out."""
        if not self.steps_taken:
            return self.current.add_noise(original_samples, noise, timesteps)
        stage = self.plan.stage_at(self.steps_taken - 1)
        scheduler = self.stage_schedulers[stage.index]
        if stage is not self.plan.stages[-1] and self.steps_taken == self.plan.stage_ends[stage.index]:
            following = stage.begin_index + stage.num_denoiser_steps
            if following >= len(scheduler.timesteps):
                return original_samples
            timesteps = scheduler.timesteps[following : following + 1].to(original_samples.device)
        return scheduler.add_noise(original_samples, noise, timesteps)

    def _step(self, *args, **kwargs):
        stage = self.plan.stage_at(self.steps_taken)
        output = self.current.step(*args, **kwargs)
        self.steps_taken += 1
        self.stage_index = self.plan.stage_at(self.steps_taken).index
        self.low_resolution_stage = self._low_resolution_stage()
        if (
            self.on_stage_end is not None
            and stage is not self.plan.stages[-1]
            and self.steps_taken == self.plan.stage_ends[stage.index]
        ):
            latents = self.on_stage_end(output[0], stage)
            if isinstance(output, tuple):
                output = (latents, *output[1:])
            else:
                output.prev_sample = latents
        return output

    def __len__(self) -> int:
        return len(self.template)

    def __getattr__(self, name: str):
        # Anything else (add_noise, scale_noise, helpers) belongs to the stage in force. Its own names raise, so that
        # reading a half-built instance (no `stage_schedulers` yet) fails cleanly instead of recursing: `current`
        # too, which Python looks up here when the property itself raises AttributeError.
        if name.startswith("__") or name in {
            "plan",
            "current",
            "template",
            "stage_schedulers",
            "steps_taken",
            "stage_index",
            "low_resolution_stage",
            "step",
        }:
            raise AttributeError(name)
        return getattr(self.current, name)


def _concatenated_sigmas(schedulers: list, plan: StagePlan) -> torch.Tensor | None:
    """Each stage's sigmas from its start, aligned with the concatenated timesteps, then the last stage's final
    sigma(s); None for schedulers without sigmas (PNDM, DDIM)."""
    pieces = []
    for scheduler, stage in zip(schedulers, plan.stages):
        sigmas = getattr(scheduler, "sigmas", None)
        if sigmas is None:
            return None
        end = None if stage is plan.stages[-1] else stage.begin_index + stage.num_denoiser_steps
        pieces.append(sigmas[stage.begin_index : end])
    return torch.cat(pieces)
