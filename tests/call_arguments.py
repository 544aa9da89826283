"""Hypothesis strategies for the arguments of a patched pipeline call, sensible and not, as a new user types them.

`call_arguments()` draws a `Drawn` spec: the call's own arguments (size, steps, batch, generators) and the lssgen
options, some left to their defaults. A sensible call is drawn first, then up to two of its values are replaced by
mistakes seen in practice: sizes that are tiny, zero, negative or not ints; 0, negative or fractional steps; start
sigmas on and past the edges of (0, 1], NaN and strings; a `min_resolution` of one pixel, zero, negative,
fractional or larger than the image; non-bool flags; unknown scaling spaces; non-positive images per prompt and
too few generators. The sensible values include sizes that are odd or not a multiple of the packing.

Profiles (tests/conftest.py): CI runs a fixed sample; `HYPOTHESIS_PROFILE=thorough` explores far more, randomly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from hypothesis import strategies as st

# Values the method is meant for (sizes that do not halve cleanly are rounded down with a warning)...
GOOD = {
    "height": st.sampled_from([64, 96, 128, 192, 256, 72, 100, 129]),
    "width": st.sampled_from([64, 96, 128, 192, 256, 72, 100, 129]),
    "num_inference_steps": st.sampled_from([1, 2, 3, 4, 6, 8, 20]),
    "num_images_per_prompt": st.sampled_from([1, 2]),
    "generators": st.sampled_from(["one", "per image", "none"]),
    "start_sigma": st.one_of(st.sampled_from([0.75, 0.667, 1.0, 1]), st.floats(0.05, 1.0)),
    "min_resolution": st.sampled_from([16, 24, 32, 48, 64, 100, 128]),
    "shorten_intermediate_steps": st.sampled_from([True, False, None]),
    "base_height": st.sampled_from([None, 128, 256, 1024]),
    "base_width": st.sampled_from([None, 128, 256, 1024]),
    "scaling_space": st.sampled_from([None, "learned", "resnet", "latent", "pixel"]),
}
# ... and the mistakes, a few per call at most, so that each is seen on its own as well as together.
BAD = {
    "height": st.sampled_from([0, -128, 1, 8, 24, 128.0, "128"]),
    "width": st.sampled_from([0, -128, 1, 8, 24, 128.0, "128"]),
    "num_inference_steps": st.sampled_from([0, -1, 2.5]),
    "num_images_per_prompt": st.sampled_from([0, -1, None]),
    "generators": st.just("too few"),
    "start_sigma": st.sampled_from([0.0, 1.5, -0.25, float("nan"), float("inf"), "0.75", True, None]),
    "min_resolution": st.sampled_from([1, 2, 0, -64, 10_000, 64.0, "64", None]),
    "shorten_intermediate_steps": st.sampled_from(["no", 1, 0]),
    "base_height": st.sampled_from([0, -256, 512.5, "1024"]),
    "base_width": st.sampled_from([0, -256, 512.5, "1024"]),
    "scaling_space": st.sampled_from(["pixels", 3, ""]),
}
CALL_NAMES = ("height", "width", "num_inference_steps", "num_images_per_prompt")
OPTIONAL = ("base_height", "base_width", "scaling_space", "shorten_intermediate_steps", "num_images_per_prompt")
PROMPTS = st.sampled_from(["a red fox", ["a red fox", "a boat"], ["a red fox", "a boat", "a tree"]])
DEFAULT = object()  # the argument is not passed at all


@dataclass
class Drawn:
    prompts: str | list[str]
    generators: str
    call: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    def images_in_batch(self) -> int:
        prompts = 1 if isinstance(self.prompts, str) else len(self.prompts)
        count = self.call.get("num_images_per_prompt")
        return prompts * (count if isinstance(count, int) and count > 0 else 1)

    def generator(self, seed: int = 0):
        """Fresh generators for one call (the stock and the patched call each get their own)."""
        if self.generators == "none":  # the global generator then, seeded the same for every call
            torch.manual_seed(seed)
            return None
        if self.generators == "one":
            return torch.Generator().manual_seed(seed)
        count = self.images_in_batch() + (0 if self.generators == "per image" else -1)
        return [torch.Generator().manual_seed(seed + i) for i in range(max(count, 1))]


# The failure classes these properties found, kept as explicit examples (run first, every time):
FOUND = [
    # ZeroDivisionError in the plan: a one-pixel `min_resolution` halves the image into nothing.
    Drawn("a red fox", "one", options={"min_resolution": 1}),
    # The stock pipeline ran unchecked: `True == 1.0`, and `start_sigma=1.0` skipped validating the other options.
    Drawn("a red fox", "one", options={"start_sigma": True}),
    Drawn("a red fox", "one", options={"start_sigma": 1.0, "scaling_space": 3}),
    Drawn("a red fox", "one", options={"start_sigma": 1.0, "shorten_intermediate_steps": "no"}),
    # A RuntimeError from torch.randn (negative batch) instead of an error naming the argument.
    Drawn(["a red fox", "a boat"], "one", call={"num_images_per_prompt": -1}, options={"min_resolution": 64}),
    # Stages of one patch are the smallest a plan may hold, and they run.
    Drawn("a red fox", "per image", call={"height": 64, "width": 96}, options={"min_resolution": 16}),
]


@st.composite
def call_arguments(draw) -> Drawn:
    values = {name: draw(strategy) for name, strategy in GOOD.items()}
    for name in OPTIONAL:  # left to the pipeline's or lssgen's default half of the time
        if draw(st.booleans()):
            values[name] = DEFAULT
    for name in draw(st.lists(st.sampled_from(sorted(BAD)), max_size=2, unique=True)):
        values[name] = draw(BAD[name])
    values = {name: value for name, value in values.items() if value is not DEFAULT}
    generators = values.pop("generators")
    call = {name: values.pop(name) for name in CALL_NAMES if name in values}
    return Drawn(draw(PROMPTS), generators, call=call, options=values)
