r"""
What lssgen lets through to the console: narrow filters for log records that tell the user nothing they can act on.

Each filter drops one notice, matched by its logger and its wording, never a whole logger: anything else the same
libraries log still shows. Standard library only, so that the command line can install [`quiet_console`] before it
imports torch, diffusers or transformers.
"""

from __future__ import annotations

import logging
import re

# transformers >= 5 logs this once per image processor that diffusers' pipeline modules import (FluxPipeline's
# CLIPImageProcessor, the IP-adapter loaders' SiglipImageProcessor) when torchvision is missing. lssgen never
# processes images with them, and torchvision is not a dependency of lssgen, so the notice only adds noise.
_TORCHVISION_LOGGER = "transformers.utils.import_utils"
_TORCHVISION_NOTICE = re.compile(
    r"`\w+ImageProcessor` requires torchvision \(not installed\); falling back to `\w+Pil` "
)

# diffusers' `DiffusionPipeline.from_pretrained` logs this when a component is not an instance of the class its
# pipeline's `__init__` annotates: "Expected types for vae: (<class '...'>,), got <class '...'>."
_EXPECTED_TYPES_LOGGER = "diffusers.pipelines.pipeline_utils"
_EXPECTED_TYPES_NOTICE = re.compile(r"Expected types for \w+: (?P<expected>.*), got (?P<got><class '[\w.]+'>)\.")
_drop_ins: set[tuple[str, str]] = set()  # (repr of the component class, repr of the class it stands in for)


class _TorchvisionFallbackFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _TORCHVISION_NOTICE.match(record.getMessage())


class _DropInFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        match = _EXPECTED_TYPES_NOTICE.fullmatch(record.getMessage())
        if match is None:
            return True
        expected = re.findall(r"<class '[\w.]+'>", match["expected"])
        return not any((match["got"], stands_for) in _drop_ins for stands_for in expected)


def _install(logger_name: str, filter_class: type[logging.Filter]) -> None:
    """Add one `filter_class` filter to the logger, once however often it is called."""
    logger = logging.getLogger(logger_name)
    if not any(isinstance(existing, filter_class) for existing in logger.filters):
        logger.addFilter(filter_class())


def declare_drop_in(component: type, stands_for: type) -> None:
    r"""
    Declare `component` a drop-in for `stands_for` in pipelines whose `__init__` annotates a component as
    `stands_for`, so that loading such a pipeline folder with the stock loader does not warn that it expected
    `stands_for`. Only that pair is declared: `component` given where another class is expected still warns.

    diffusers 0.42 checks a loaded component with `isinstance` against the annotation and offers no way to declare
    another class acceptable; subclassing the annotated class is the only way to pass that check, and it would be
    a lie for a model that does not share its structure (it would inherit the parallelism plans, device-map
    hints, single-file conversion and LoRA targets of a model it is not). So the one warning is filtered instead.

    Args:
        component (`type`): the class a pipeline folder names, e.g. `lssgen.autoencoders.TinyFlux2Autoencoder`.
        stands_for (`type`): the class the pipeline annotates, e.g. `diffusers.AutoencoderKLFlux2`.

    Example:

    ```py
    >>> from diffusers import AutoencoderKLFlux2
    >>> declare_drop_in(TinyFlux2Autoencoder, stands_for=AutoencoderKLFlux2)
    ```
    """
    _drop_ins.add((repr(component), repr(stands_for)))
    _install(_EXPECTED_TYPES_LOGGER, _DropInFilter)


def quiet_console() -> None:
    r"""
    Filter out the library notices lssgen's command line must not show (today: transformers' "requires
    torchvision (not installed); falling back to ...Pil" notice, which the stock diffusers pipeline modules
    trigger when they import an image processor). Call it once, before running a command; calling it again does
    nothing more. Everything else the libraries log still shows.

    Example:

    ```py
    >>> from lssgen.console import quiet_console
    >>> quiet_console()
    ```
    """
    _install(_TORCHVISION_LOGGER, _TorchvisionFallbackFilter)


__all__ = ["declare_drop_in", "quiet_console"]
