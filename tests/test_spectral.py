"""Method 'spectral' (SPEED, issue #27): the DCT arithmetic against scipy, the stage-end rule against the published
FLUX.1 step splits, the spectrum fit on a field of known power law, and the method on the tiny pipeline of every
flow family through a subset of the adapter contract plus its own checks (off is stock, one stock schedule through
all stages with the rewind to t_eff, the transition against an independent computation, bad input refused before
anything is denoised)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.fft
import test_chroma
import test_cogview4
import test_flux
import test_flux2
import test_qwenimage
import test_sd3
import test_wan
import test_zimage
import torch
from test_methods import PROMISE_TESTS, method_contract, record_latent_inputs

import lssgen
from lssgen.adapters.flux import FLUX1_LATENT_SPECTRUM, flux_dev_scheduler
from lssgen.methods import Spectral, resolve_method, rewound_sigma
from lssgen.spectrum import dct_2d, dct_upsample, fit_latent_spectrum, idct_2d, spectral_stage_end_sigma
from lssgen.tiny import build_tiny_flux_pipeline, build_tiny_sd_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: extra threads only add synchronisation


def scipy_dct_upsample(x: np.ndarray, high_band: np.ndarray) -> np.ndarray:
    """`lssgen.spectrum.dct_upsample`, computed with scipy's orthonormal DCT."""
    coefficients = high_band.copy()
    height, width = x.shape[-2:]
    coefficients[..., :height, :width] = scipy.fft.dctn(x, norm="ortho", axes=(-2, -1))
    return scipy.fft.idctn(coefficients, norm="ortho", axes=(-2, -1))


# --- the arithmetic ------------------------------------------------------------------------------------------------
def test_the_dct_is_scipys_orthonormal_dct_ii_and_inverts():
    x = torch.randn(2, 3, 5, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = scipy.fft.dctn(x.numpy(), norm="ortho", axes=(-2, -1))
    np.testing.assert_allclose(dct_2d(x).numpy(), expected, atol=1e-12)
    torch.testing.assert_close(idct_2d(dct_2d(x)), x, atol=1e-12, rtol=0)


def test_dct_upsampling_matches_scipy_keeps_energy_and_halves_a_smooth_signal():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 6, 8, generator=generator, dtype=torch.float64)
    high = torch.randn(2, 4, 12, 16, generator=generator, dtype=torch.float64)
    np.testing.assert_allclose(dct_upsample(x, high).numpy(), scipy_dct_upsample(x.numpy(), high.numpy()), atol=1e-12)
    # Without a high band: the energy is kept, spread over 4x the points, so a constant halves.
    up = dct_upsample(x, torch.zeros_like(high))
    assert float(up.square().sum()) == pytest.approx(float(x.square().sum()), rel=1e-12)
    flat = dct_upsample(
        torch.full((1, 1, 4, 4), 3.0, dtype=torch.float64), torch.zeros(1, 1, 8, 8, dtype=torch.float64)
    )
    torch.testing.assert_close(flat, torch.full((1, 1, 8, 8), 1.5, dtype=torch.float64))


def test_the_rewind_puts_an_upsampled_latent_on_the_flow_path_at_t_eff():
    """A latent on the flow path at sigma, DCT-upsampled with noise of level sigma in the new band and scaled by
    2 / (1 + sigma), is (1 - t_eff) x0' + t_eff noise' with x0' = 2 x the zero-padded upsample of x0."""
    generator = torch.Generator().manual_seed(2)
    x0 = torch.randn(1, 2, 4, 4, generator=generator, dtype=torch.float64)
    noise = torch.randn(1, 2, 8, 8, generator=generator, dtype=torch.float64)
    sigma = 0.6
    noised = (1 - sigma) * x0 + sigma * noise[..., :4, :4]  # the low band of `noise`, as DCT coefficients
    coefficients = noise.clone()
    coefficients[..., :4, :4] = dct_2d(noise[..., :4, :4])
    rewound = dct_upsample(noised, sigma * coefficients) * 2 / (1 + sigma)
    t_eff = rewound_sigma(sigma)
    assert t_eff == pytest.approx(0.75)
    signal = 2 * dct_upsample(x0, torch.zeros_like(noise))
    torch.testing.assert_close(rewound, (1 - t_eff) * signal + t_eff * idct_2d(coefficients))


def test_stage_ends_reproduce_speeds_published_flux_splits():
    """FLUX.1-dev at 1024 px, 50 steps: delta 0.01 ends the 512 px stage after 18 steps, 0.05 after 28 (DESIGN.md
    §1b); the threshold itself is the formula's."""
    power = 203.615097 * 32**-1.915461
    assert spectral_stage_end_sigma(*FLUX1_LATENT_SPECTRUM, 0.05, 32) == pytest.approx(
        1 / (1 + math.sqrt(0.05 / (power * (1 + power - 0.05))))
    )
    pipe = build_tiny_flux_pipeline(seed=0)
    pipe.scheduler = flux_dev_scheduler()
    lssgen.patch(pipe, None)
    for delta, split in ((0.01, [18, 32]), (0.05, [28, 22])):
        plan = lssgen.plan_for(pipe, 1024, 1024, 50, method=f"spectral:delta={delta}")
        assert [stage.num_denoiser_steps for stage in plan.stages] == split
        assert [stage.height for stage in plan.stages] == [512, 1024]
    plan = lssgen.plan_for(pipe, 1024, 1024, 50, method="spectral:delta=0.05,halvings=2")
    assert [stage.height for stage in plan.stages] == [256, 512, 1024] and plan.total_steps == 50


def test_the_spectrum_fit_recovers_a_known_power_law():
    """A Gaussian field whose Fourier power at radius w is a w^-beta (white noise shaped in frequency) gives back
    a and beta."""
    side, a, beta = 64, 150.0, 2.2
    frequency = torch.fft.fftfreq(side, d=1 / side, dtype=torch.float64)
    radius = torch.sqrt(frequency[:, None] ** 2 + frequency[None, :] ** 2).round().clamp(min=1)
    white = torch.randn(64, 4, side, side, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    field = torch.fft.ifft2(torch.fft.fft2(white) * torch.sqrt(a * radius**-beta)).real
    fitted_a, fitted_beta = fit_latent_spectrum(field)
    assert fitted_beta == pytest.approx(beta, rel=0.03) and fitted_a == pytest.approx(a, rel=0.15)
    with pytest.raises(ValueError, match=r"`latents` must be \[N, C, H, W\]"):
        fit_latent_spectrum(field[0])


# --- spelling, refusals -------------------------------------------------------------------------------------------
def test_spectral_parameters_are_spelled_and_checked():
    assert resolve_method("spectral") == Spectral(delta=0.1, halvings=1)
    given = resolve_method("spectral:delta=0.3,halvings=2,a=200,beta=1.9")
    assert given == Spectral(delta=0.3, halvings=2, a=200.0, beta=1.9)
    assert resolve_method(given.spelling()) == given and Spectral().spelling() == "spectral:delta=0.1,halvings=1"
    for spelling, match in (
        ("spectral:delta=0", r"`delta` must be in \(0, 1\)"),
        ("spectral:delta=1", r"`delta` must be in \(0, 1\)"),
        ("spectral:halvings=0", "`halvings` must be a positive integer"),
        ("spectral:a=200", "give both `a` and `beta`"),
        ("spectral:a=-1,beta=2", "`a` must be positive"),
        ("spectral:beta=x", "`beta` must be a number, got 'x'"),
    ):
        with pytest.raises(ValueError, match=match):
            resolve_method(spelling)


def test_spectral_refuses_diffusion_families_and_a_vae_without_a_measured_spectrum():
    pipe = build_tiny_sd_pipeline(seed=0)
    with pytest.raises(ValueError, match="method 'spectral' needs a flow-matching pipeline"):
        lssgen.patch(pipe, None, method="spectral")
    flux2 = test_flux2.TestFlux2().build_pipe(seed=0)
    lssgen.patch(flux2, None)
    with pytest.raises(ValueError, match="none is measured for this flux2 pipeline's VAE .* 'spectral:a=...,beta=...'"):
        lssgen.plan_for(flux2, 256, 256, 8, method="spectral")
    assert len(lssgen.plan_for(flux2, 256, 256, 8, method="spectral:a=200,beta=1.9").stages) == 2


# --- on every flow family -------------------------------------------------------------------------------------------
# Bad input of the method: each raises naming what is wrong, before any denoiser call.
# (the method's parameters, other options of the call, the error, what it says)
BAD_SPECTRAL_CALLS = [
    ("delta=0", {}, ValueError, r"`delta` must be in \(0, 1\)"),
    ("halvings=0", {}, ValueError, "`halvings` must be a positive integer"),
    ("scale=2", {}, ValueError, "unknown parameter 'scale=2'"),
    ("", {"scaling_space": "pixel"}, ValueError, "`scaling_space` .* does not apply to method 'spectral'"),
    ("halvings=6", {}, ValueError, "halves the size 6 time"),
    # A latent spectrum this faint would keep the small stage going below sigma 0.0001: past every step but the last.
    ("a=1e-8,beta=2,delta=0.9", {"num_inference_steps": 3}, ValueError, "no step would be left at full size"),
]


class SpectralContract:
    """`spectral` on a family's tiny pipeline (mixed into a subclass of the family's contract class)."""

    # The parameters that give the family's latent spectrum where its adapter has none measured.
    spectrum = ""

    def spelling(self, parameters: str = "") -> str:
        return spectral_spelling(parameters, self.spectrum)

    def spectral_call(self, pipe, **overrides):
        return self.call_kwargs(pipe, **{"output_type": "latent", "num_inference_steps": 6, **overrides})

    def test_spectral_off_is_the_stock_pipeline(self, pipe):
        stock = self.build_pipe(seed=0)
        stock.set_progress_bar_config(disable=True)
        expected = self.images(stock, **self.spectral_call(stock))
        lssgen.patch(pipe, None, method=self.spelling())
        assert torch.equal(self.images(pipe, **self.spectral_call(pipe), start_sigma=1.0), expected)

    def test_spectral_walks_one_stock_schedule_with_the_rewind_and_its_transition_is_the_dct_upsample(self, pipe):
        """The denoiser sees the stock full-size call's timesteps, except the first of the full-size stage: t_eff of
        the sigma the small stage reached. What that stage starts from, for a batch of two with a generator each,
        is the small stage's result DCT-upsampled (scipy) with each image's own fresh noise in the new band, times
        2 / (1 + sigma)."""
        method = self.spelling("delta=0.5")
        lssgen.patch(pipe, None, method=method)
        plan = lssgen.plan_for(pipe, self.height, self.width, 6, method=method)
        small, full = plan.stages
        k = small.num_denoiser_steps
        ends = []
        inputs, hook = record_latent_inputs(self.denoiser(pipe))
        records, handle = self.trace(pipe)
        seeds = (31, 32)
        call = self.spectral_call(
            pipe, prompts=["a fox", "a boat"], generator=[torch.Generator().manual_seed(s) for s in seeds]
        )
        self.images(pipe, **call, callback_on_step_end=lambda p, i, t, kw: ends.append(kw["latents"].clone()) or {})
        hook.remove()
        handle.remove()

        stock = self.build_pipe(seed=0)
        stock.set_progress_bar_config(disable=True)
        stock_records, stock_handle = self.trace(stock)
        sigmas = []
        stock(
            **self.spectral_call(stock),
            callback_on_step_end=lambda p, i, t, kw: sigmas.append(p.scheduler.sigmas) or {},
        )
        stock_handle.remove()
        stock_sigmas = [float(s) for s in sigmas[-1]]
        timesteps = [r["timestep"] for r in records[:: self.calls_per_step]]
        stock_timesteps = [r["timestep"] for r in stock_records[:: self.calls_per_step]]
        reached = stock_sigmas[k]
        assert full.first_sigma == pytest.approx(2 * reached / (1 + reached), abs=1e-6)
        assert timesteps[:k] == pytest.approx(stock_timesteps[:k], abs=0.5)
        assert timesteps[k + 1 :] == pytest.approx(stock_timesteps[k + 1 :], abs=0.5)
        told = self.noise_level(pipe, timesteps[k], self.height, self.width)  # the rewind's step
        assert told == pytest.approx(full.first_sigma, abs=1.1e-3)  # Wan's scheduler casts timesteps to integers

        adapter = lssgen.find_adapter(pipe)
        low = adapter.unpack(pipe, ends[k - 1], small.latent_height, small.latent_width).double().numpy()
        coefficients = []
        for seed in seeds:
            generator = torch.Generator().manual_seed(seed)
            torch.randn((1, *low.shape[1:]), generator=generator)  # the image's first-stage noise
            shape = (1, *low.shape[1:-2], full.latent_height, full.latent_width)
            coefficients.append(torch.randn(shape, generator=generator))  # its noise at the switch
        # The new band takes the fresh noise's own DCT coefficients.
        high = reached * scipy.fft.dctn(torch.cat(coefficients).double().numpy(), norm="ortho", axes=(-2, -1))
        expected = torch.from_numpy(scipy_dct_upsample(low, high) * 2 / (1 + reached)).float()
        started = adapter.denoiser_latents(pipe, inputs[k * self.calls_per_step], full)
        torch.testing.assert_close(started[:2], expected, rtol=1e-4, atol=1e-4)

    def test_spectral_bad_input_is_refused_before_denoising(self, pipe):
        stock_scheduler = pipe.scheduler
        lssgen.patch(pipe, None)
        before = self.images(pipe, **self.spectral_call(pipe), method=self.spelling())
        calls = []
        hook = self.denoiser(pipe).register_forward_pre_hook(lambda module, args: calls.append(1))
        for parameters, options, error, match in BAD_SPECTRAL_CALLS:
            with pytest.raises(error, match=match):
                pipe(**{**self.spectral_call(pipe), **options, "method": self.spelling(parameters)})
        hook.remove()
        assert not calls and pipe.scheduler is stock_scheduler and pipe._lssgen.run is None
        assert torch.equal(self.images(pipe, **self.spectral_call(pipe), method=self.spelling()), before)


def spectral_spelling(parameters: str, spectrum: str) -> str:
    """`spectral:PARAMETERS,SPECTRUM` without empty parts (and without SPECTRUM where PARAMETERS give one)."""
    gives_spectrum = any(item.startswith("a=") for item in parameters.split(","))
    given = ",".join(filter(None, (parameters, "" if gives_spectrum else spectrum)))
    return f"spectral:{given}" if given else "spectral"


def spectral_contract(family: type, spectrum: str = "", **attributes) -> type:
    trace_cases = [
        (128, 128, 6, {"method": spectral_spelling("", spectrum)}),
        (64, 128, 6, {"method": spectral_spelling("delta=0.5", spectrum)}),
    ]
    attributes = {"trace_cases": trace_cases, "spectrum": spectrum, **attributes}
    return method_contract(family, SpectralContract, spectral_spelling("", spectrum), **attributes)


# FLUX.1's measured spectrum for the families whose VAE has none measured (any values exercise the same code).
OTHER_VAE = "a=203.615097,beta=1.915461"
TestSpectralFlux = spectral_contract(
    test_flux.TestFlux,
    keep=PROMISE_TESTS,
    trace_cases=[
        (128, 128, 6, {"method": "spectral"}),
        (64, 128, 6, {"method": "spectral:delta=0.5"}),
        (256, 256, 8, {"method": "spectral:delta=0.5,halvings=2"}),
    ],
)
TestSpectralChroma = spectral_contract(test_chroma.TestChroma)
TestSpectralWan = spectral_contract(test_wan.TestWan)
TestSpectralFlux2 = spectral_contract(test_flux2.TestFlux2, spectrum=OTHER_VAE)
TestSpectralSD3 = spectral_contract(test_sd3.TestSD3, spectrum=OTHER_VAE)
TestSpectralCogView4 = spectral_contract(test_cogview4.TestCogView4, spectrum=OTHER_VAE)
TestSpectralQwenImage = spectral_contract(test_qwenimage.TestQwenImage, spectrum=OTHER_VAE)
TestSpectralZImage = spectral_contract(test_zimage.TestZImage, spectrum=OTHER_VAE)
