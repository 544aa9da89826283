"""lssgen: faster text-to-image generation by denoising the early steps at a lower resolution (LSSGen)."""

from lssgen.autoencoders.flux2 import TinyFlux2Autoencoder
from lssgen.scenes.denoiser import SceneDenoiser  # the scene model's folder names it as lssgen.SceneDenoiser

from .adapters import Adapter, find_adapter, installed_adapters, register_adapter, unregister_adapter
from .hookspecs import hookimpl
from .patch import Options, is_patched, patch, plan_for, unpatch
from .plan import Stage, StagePlan, plan_stages
from .upsampler import LatentUpsampler
from .weights import weights_path  # the weights we trained, shipped with the package

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "LatentUpsampler",
    "Options",
    "SceneDenoiser",
    "Stage",
    "StagePlan",
    "TinyFlux2Autoencoder",
    "find_adapter",
    "hookimpl",
    "installed_adapters",
    "is_patched",
    "patch",
    "plan_for",
    "plan_stages",
    "register_adapter",
    "unpatch",
    "unregister_adapter",
    "weights_path",
]
