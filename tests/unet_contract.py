"""The adapter contract for UNet families (SD, SDXL): what changes is only how a denoiser call is read."""

from __future__ import annotations

from adapter_contract import AdapterContract


class UNetContract(AdapterContract):
    calls_per_step = 1  # CFG runs as one batched UNet call per step

    def observe(self, pipe, kwargs):
        sample = kwargs["sample"]
        return {"size": tuple(sample.shape[-2:]), "batch": sample.shape[0], "timestep": float(kwargs["timestep"])}

    def expected(self, pipe, stage, timestep):
        # One prompt, with its unconditional twin in the same batch (guidance is on in every call).
        return {"size": (stage.latent_height, stage.latent_width), "batch": 2, "timestep": timestep}
