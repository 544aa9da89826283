"""Tiny autoencoders as diffusers models: the taesd layout (`taesd`) and FLUX.2's taef2 (`flux2`,
`TinyFlux2Autoencoder`, the VAE of the shipped scene model's folder).

Model components, like a pipeline's own: they import diffusers and torch, nothing of lssgen's core.
"""

from .flux2 import TinyFlux2Autoencoder

__all__ = ["TinyFlux2Autoencoder"]
