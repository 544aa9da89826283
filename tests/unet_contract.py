"""The adapter contract for UNet families (SD, SDXL): what changes is only how a denoiser call is read."""

from __future__ import annotations

import inspect

from adapter_contract import AdapterContract

import lssgen


class UNetContract(AdapterContract):
    calls_per_step = 1  # CFG runs as one batched UNet call per step

    def observe(self, pipe, kwargs):
        sample = kwargs["sample"]
        return {"size": tuple(sample.shape[-2:]), "batch": sample.shape[0], "timestep": float(kwargs["timestep"])}

    def expected(self, pipe, stage, timestep):
        # One prompt, with its unconditional twin in the same batch (guidance is on in every call).
        return {"size": (stage.latent_height, stage.latent_width), "batch": 2, "timestep": timestep}

    def test_patch_is_per_instance_idempotent_and_undone_exactly(self, pipe):
        # The contract's check that the stock class gained no argument calls another instance with `start_sigma`
        # and expects a TypeError; SD and SDXL take `**kwargs` (deprecated arguments), so they accept and ignore
        # it. Checked here instead: the stock class's `__call__` is the very function it had before patching.
        stock_class = type(pipe)
        stock_call = stock_class.__call__
        other = self.build_pipe(seed=0)
        stock_scheduler = pipe.scheduler
        lssgen.patch(pipe)
        lssgen.patch(pipe, start_sigma=0.667)  # re-patching replaces, never stacks
        assert isinstance(pipe, stock_class) and type(pipe) is not stock_class
        assert type(pipe).__name__ == stock_class.__name__
        assert lssgen.find_adapter(pipe).name == self.adapter_name
        assert pipe._lssgen.defaults.start_sigma == 0.667
        assert type(other) is stock_class and not lssgen.is_patched(other)
        assert stock_class.__call__ is stock_call and "start_sigma" not in inspect.signature(stock_call).parameters

        lssgen.unpatch(pipe)
        lssgen.unpatch(pipe)  # a second unpatch is a no-op
        assert type(pipe) is stock_class and "_lssgen" not in pipe.__dict__
        registry = getattr(self.denoiser(pipe), "_diffusers_hook", None)
        assert registry is None or not [name for name in registry.hooks if name.startswith("lssgen")]
        assert pipe.scheduler is stock_scheduler
