r"""
A small text-to-image model of `lssgen.scenes`, as a stock `Flux2KleinPipeline` folder in FLUX.2's latent space.

`lssgen.load_pipeline` loads the folder with the stock loader and its `lssgen.json` (native size, steps, prompt
length, lssgen's stages and upsampler):

```py
>>> import lssgen
>>> pipe = lssgen.load_pipeline("weights/scene-t2i")
>>> image = pipe("a photo of a red star", **lssgen.model_defaults(pipe).call_arguments()).images[0]
```

Components: taef2 (FLUX.2's tiny autoencoder) with BatchNorm statistics measured on the training renders, a
byte-level BPE `Qwen2Tokenizer` learnt from the caption language with Qwen's chat tokens and template, a thin
28-layer `Qwen3ForCausalLM` (so the pipeline's default `text_encoder_out_layers=(9, 18, 27)` works), a small
convolutional U-Net behind the FLUX.2 transformer's call (`lssgen.scenes.denoiser.SceneDenoiser`, which says why)
and FLUX.2's flow-matching Euler scheduler.

Train with `python -m lssgen.scenes.model train --out weights/scene-t2i` (see `--help`); `--resume` continues.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
from PIL import Image
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import Qwen2TokenizerFast, Qwen3Config, Qwen3ForCausalLM

from lssgen.adapters.flux2 import Flux2Adapter
from lssgen.autoencoders.flux2 import TinyFlux2Autoencoder
from lssgen.autoencoders.taesd import is_tiny_autoencoder_folder
from lssgen.loading import ModelDefaults
from lssgen.outputs import atomic_write
from lssgen.tiny.flux2 import FLUX2_SCHEDULER_CONFIG

from . import world as scenes
from .denoiser import SceneDenoiser, scene_unet_config

# Qwen's chat template as the pipeline uses it (`apply_chat_template(..., add_generation_prompt=True,
# enable_thinking=False)`): the user turn, then an assistant turn with an empty thinking block.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]
TEXT_WIDTH = 32
TEXT_LAYERS = 28  # the pipeline stacks hidden states 9, 18 and 27 by default
OUT_LAYERS = 3


def caption_language() -> list[str]:
    """Every word the scene captions use, and the chat roles, once each: what the tokenizer is learnt from."""
    words = {"a", "an", "photo", "of", "and", "user", "assistant", "system"}
    words |= set(scenes.SHAPES) | set(scenes.PLURALS.values()) | set(scenes.COLOURS) | set(scenes.NUMBERS)
    words |= {word for relation in scenes.RELATIONS for word in relation.split()}
    return sorted(words)


def build_tokenizer() -> Qwen2TokenizerFast:
    r"""
    A real Qwen2 tokenizer (byte-level BPE, Qwen's pre-tokenizer) whose merges are learnt from the caption
    language, so that every caption word is one token; any other text still tokenizes (byte by byte).
    """
    words = caption_language()
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=100_000,  # a cap; the merges stop once every word is one token
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    # Each word with and without a leading space (Qwen's pre-tokenizer keeps the space with the word), a few times
    # so that their merges win over chance pairs.
    corpus = [f"{word} {word} {word}" for word in words] * 4
    bpe.train_from_iterator(corpus, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(pair.split(" ")) if isinstance(pair, str) else tuple(pair) for pair in model["merges"]]
    tokenizer = Qwen2TokenizerFast(
        vocab=model["vocab"],
        merges=merges,
        additional_special_tokens=CHAT_TOKENS,
        model_max_length=512,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_text_encoder(vocab_size: int, pad_token_id: int, seed: int = 0) -> Qwen3ForCausalLM:
    """A thin Qwen3 of `TEXT_LAYERS` layers, `TEXT_WIDTH` wide (a few hundred thousand parameters)."""
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=TEXT_WIDTH,
        intermediate_size=2 * TEXT_WIDTH,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=pad_token_id,
    )
    model = Qwen3ForCausalLM(config).eval()
    # Unit-scale token embeddings. With Qwen's initialisation (std 0.02) the frozen encoder's hidden states are tiny
    # (std 0.04, 0.013 between captions) and the first training run learnt no text conditioning in 9400 steps: its
    # loss with the true captions was within 1% of the loss with shuffled ones. The residual stream carries the
    # embeddings to the stacked layers, so this scales the conditioning to what the transformer's input expects.
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, 1.0)
    return model


def build_denoiser(channels: tuple[int, ...] = (32, 64, 128), seed: int = 0) -> SceneDenoiser:
    """A small U-Net over taef2's 32 latent channels with `channels` per level, attending to the stacked text
    states (`OUT_LAYERS * TEXT_WIDTH` wide), behind FLUX.2's transformer call."""
    torch.manual_seed(seed)
    return SceneDenoiser(scene_unet_config(OUT_LAYERS * TEXT_WIDTH, tuple(channels)))


def parse_channels(text: str) -> tuple[int, ...]:
    """`"32,64,128"` -> `(32, 64, 128)`, with an error that says what a valid value is."""
    try:
        channels = tuple(int(part) for part in text.split(","))
    except ValueError:
        channels = ()
    if len(channels) < 2 or any(c < 8 or c % 8 for c in channels):
        raise ValueError(f"--channels {text!r}: give two or more comma-separated multiples of 8, e.g. 32,64,128.")
    return channels


def build_pipeline(
    vae: TinyFlux2Autoencoder, seed: int = 0, channels: tuple[int, ...] = (32, 64, 128)
) -> Flux2KleinPipeline:
    r"""
    An untrained scene model around `vae`: the components above in a stock `Flux2KleinPipeline`.

    Example:

    ```py
    >>> pipe = build_pipeline(TinyFlux2Autoencoder.from_taesd_folder("data/taef2"))
    >>> pipe.save_pretrained("scene-model")
    ```
    """
    tokenizer = build_tokenizer()
    text_encoder = build_text_encoder(len(tokenizer), tokenizer.pad_token_id, seed)
    pipe = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=build_denoiser(channels, seed),
    )
    for component in (pipe.vae, pipe.text_encoder, pipe.transformer):
        component.eval()
    return pipe


def all_captions() -> list[str]:
    """Every caption the scene generator can write (a few thousand)."""
    shapes, colours, numbers = scenes.SHAPES, list(scenes.COLOURS), scenes.NUMBERS
    checks = [scenes.Check("single_object", (scenes.Wanted(s),)) for s in shapes]
    checks += [scenes.Check("colors", (scenes.Wanted(s, c),)) for s in shapes for c in colours]
    checks += [scenes.Check("counting", (scenes.Wanted(s, count=n + 1),)) for s in shapes for n in range(len(numbers))]
    for a, b in itertools.permutations(shapes, 2):
        checks.append(scenes.Check("two_object", (scenes.Wanted(a), scenes.Wanted(b))))
        checks += [scenes.Check("position", (scenes.Wanted(a), scenes.Wanted(b)), r) for r in scenes.RELATIONS]
        checks += [
            scenes.Check("color_attr", (scenes.Wanted(a, ca), scenes.Wanted(b, cb)))
            for ca, cb in itertools.permutations(colours, 2)
        ]
    return [scenes.caption_for(check) for check in checks]


# --- training -----------------------------------------------------------------------------------------------------

SIZES = (64, 128, 256)
# Which size each step trains, repeating. Low sizes as often as the target: at 64 px the prompt decides most of
# the image (a trial run learnt its text conditioning there first), and they are the cheapest steps.
SIZE_CYCLE = (256, 64, 128)
# Per-size batch multiplier: about as many image tokens per step at every size (64 px has 16 tokens, 256 px 256).
BATCH_SCALE = {64: 4, 128: 2, 256: 1}
CHUNK = 128  # scenes per cache file
CHECKPOINT, CACHE, SAMPLES = "checkpoint", "cache", "samples"
HISTORY_FILE = "training_history.json"
SAMPLE_STEPS = 20
SAMPLE_GUIDANCE = 4.0  # the pipeline's own default, named so that samples and lssgen.json agree


@dataclass
class TrainSettings:
    r"""
    What `python -m lssgen.scenes.model train` runs (see its `--help` for each argument).

    Everything that changes the trained weights is here and is saved with the checkpoint; a resumed run must match
    it except `steps` (train further), `scenes` (a larger data set: the cache grows) and the bookkeeping
    (`threads`, `sample_every`, `checkpoint_every`).
    """

    out: str
    taef2: str
    work: str | None = None
    steps: int = 6000
    batch: int = 8
    lr: float = 1e-3
    warmup: int = 200
    ema: float = 0.998
    caption_dropout: float = 0.1
    time_shift: float = 1.0
    object_weight: float = 3.0
    max_sequence_length: int = 32
    scenes: int = 2048
    data_seed: int = 0
    seed: int = 0
    channels: str = "32,64,128"
    # One thread: on the shared 2-core machine, with another process busy on one core, 2 threads ran 9.0 s/step and 1
    # thread 0.28 s/step (OpenMP threads waiting on each other when a core is taken).
    threads: int = 1
    sample_every: int = 500
    samples: int = 12
    checkpoint_every: int = 100
    resume: bool = False

    @property
    def work_dir(self) -> Path:
        # Checkpoints and the latent cache are too big to commit or ship: under runs/ (git ignores it), not beside
        # the output folder, whose parent (weights/) is package data.
        return Path(self.work) if self.work else Path("runs") / Path(self.out).name


_MUST_MATCH = ("batch", "lr", "warmup", "ema", "caption_dropout", "time_shift", "object_weight", "max_sequence_length",
               "data_seed", "seed", "channels")  # fmt: skip


def _step_generator(seed: int, step: int) -> torch.Generator:
    # Every step's randomness is a function of (seed, step) alone: a resumed run draws exactly what an
    # uninterrupted one would have, with no generator state to save.
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def _to_tensor(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1


def _atomic_save_file(tensors: dict[str, torch.Tensor], path: Path) -> None:
    atomic_write(path, lambda temporary: save_file({k: v.contiguous() for k, v in tensors.items()}, temporary))


class LatentCache:
    r"""
    taef2 latents of scene renders at every training size, built once in chunks of `CHUNK` scenes and kept on
    disk (`work/cache/`); an interrupted build picks up at the first missing chunk.

    Each scene is rendered once at the largest size; the smaller inputs are its antialiased reductions (rendering
    again at each size costs as much and draws the same scene).
    """

    def __init__(self, folder: Path, vae: TinyFlux2Autoencoder, data_seed: int, scenes_wanted: int):
        self.folder, self.vae, self.data_seed = folder, vae, data_seed
        info = folder / "info.json"
        # A data set smaller than one chunk (tests, trials) is one chunk of its own size; the size is kept, so a
        # later, larger --scenes appends chunks of the same size.
        self.chunk = json.loads(info.read_text())["chunk"] if info.is_file() else min(CHUNK, scenes_wanted)
        self.chunks = math.ceil(scenes_wanted / self.chunk)
        self.captions = all_captions()
        self.caption_index = {caption: i for i, caption in enumerate(self.captions)}

    def _path(self, chunk: int) -> Path:
        return self.folder / f"chunk_{chunk:05d}.safetensors"

    def build(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        info = self.folder / "info.json"
        facts = {"data_seed": self.data_seed, "sizes": list(SIZES), "chunk": self.chunk}
        if info.is_file() and json.loads(info.read_text()) != facts:
            raise ValueError(f"{self.folder} caches other data ({info.read_text().strip()}); pass another --work.")
        info.write_text(json.dumps(facts) + "\n")
        missing = [c for c in range(self.chunks) if not self._path(c).is_file()]
        for chunk in tqdm(missing, desc="caching taef2 latents of scene renders", unit="chunk", disable=not missing):
            self._build_chunk(chunk)

    @torch.no_grad()
    def _build_chunk(self, chunk: int) -> None:
        renders, ids = [], []
        for index in range(chunk * self.chunk, (chunk + 1) * self.chunk):
            scene = scenes.sample_scene(self.data_seed, index)
            renders.append(scenes.render(scene, SIZES[-1]))
            ids.append(self.caption_index[scene.caption])
        tensors = {"caption_ids": torch.tensor(ids, dtype=torch.int32)}
        for size in SIZES:
            images = torch.stack(
                [_to_tensor(r if r.width == size else r.resize((size, size), Image.BOX)) for r in renders]
            )
            latents = torch.cat([self.vae.encode(batch).latents for batch in images.split(16)])
            tensors[f"latents_{size}"] = latents.to(torch.float16)  # half the disk; taef2's own precision is lower
        _atomic_save_file(tensors, self._path(chunk))

    def load(self) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """`({size: (N, 32, size/8, size/8) float16}, caption ids (N,))` of the first `chunks` chunks."""
        parts = [load_file(self._path(c)) for c in range(self.chunks)]
        latents = {size: torch.cat([p[f"latents_{size}"] for p in parts]) for size in SIZES}
        return latents, torch.cat([p["caption_ids"] for p in parts]).long()


def object_tokens(data_seed: int, captions: list[str]) -> dict[int, torch.Tensor]:
    """`{size: (scenes, tokens) float}`: 1 on the image tokens (16 px at the pipeline's packing) that the boxes of
    the objects of training scenes `0, 1, ...` touch, else 0; from the scenes' geometry, without rendering.
    `captions` are the cached scenes' captions, checked against the scenes (a cache of other scenes is an error)."""
    masks = {size: torch.zeros(len(captions), (size // 16) ** 2) for size in SIZES}
    for index, caption in enumerate(captions):
        scene = scenes.sample_scene(data_seed, index)
        if scene.caption != caption:
            raise ValueError(
                f"cached scene {index} is {caption!r}, but scene {index} of seed {data_seed} is {scene.caption!r}: "
                "the latent cache holds other scenes; rebuild it (delete it)."
            )
        for obj in scene.objects:
            (x, y), half = obj.centre, obj.size / 2
            for size, mask in masks.items():
                side = size // 16
                # Tokens whose [k/side, (k+1)/side) span meets the box's [c - half, c + half].
                columns = range(max(0, math.floor((x - half) * side)), min(side, math.ceil((x + half) * side)))
                rows = range(max(0, math.floor((y - half) * side)), min(side, math.ceil((y + half) * side)))
                for row in rows:
                    mask[index, row * side + columns.start : row * side + columns.stop] = 1
    return masks


def _lr_at(step: int, lr: float, warmup: int) -> float:
    # Linear warm-up, then constant: a run can always be resumed for more steps on the same curve.
    return lr * min(1.0, (step + 1) / max(1, warmup))


def _grid(images: list[Image.Image], columns: int) -> Image.Image:
    side = images[0].width
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * side, rows * side), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * side, (i // columns) * side))
    return grid


def sample_prompts() -> list[str]:
    """The captions of the sample grids: the first two held-out evaluation scenes of each category."""
    return [scene.caption for scene in scenes.evaluation_scenes()[: 2 * len(scenes.CATEGORIES)]]


class _Trainer:
    def __init__(self, settings: TrainSettings, command: str):
        self.s, self.command = settings, command
        self.work = settings.work_dir
        self.checkpoint = self.work / CHECKPOINT
        self.adapter = Flux2Adapter()
        state = self._load_state() if settings.resume else None
        if state is None:
            vae = TinyFlux2Autoencoder.from_taesd_folder(settings.taef2)
            self.pipe = build_pipeline(vae, settings.seed, parse_channels(settings.channels))
        else:
            vae = TinyFlux2Autoencoder.from_pretrained(self.checkpoint / "pipeline" / "vae", taef2=settings.taef2)
            self.pipe = Flux2KleinPipeline.from_pretrained(self.checkpoint / "pipeline", vae=vae)
        self.pipe.set_progress_bar_config(disable=True)
        self.transformer = self.pipe.transformer.train()
        self.ema = copy.deepcopy(self.transformer).eval().requires_grad_(False)
        self.optimizer = torch.optim.AdamW(self.transformer.parameters(), lr=settings.lr, weight_decay=0.0)
        self.step, self.history, self.runs = 0, [], []
        if state is not None:
            self.ema.load_state_dict(load_file(self.checkpoint / "ema.safetensors"))
            self.optimizer.load_state_dict(torch.load(self.checkpoint / "optimizer.pt", weights_only=True))
            self.step, self.history, self.runs = state["step"], state["history"], state["runs"]
            if self.step >= settings.steps:
                raise ValueError(f"--resume: the checkpoint is at step {self.step} already; pass --steps above it.")

        cache = LatentCache(self.work / CACHE, self.pipe.vae, settings.data_seed, settings.scenes)
        cache.build()
        latents, caption_ids = cache.load()
        if state is None:
            # The pipeline divides the patchified latents by these: the transformer then sees unit-scale inputs.
            self.pipe.vae.set_latent_statistics(latents[SIZES[-1]])
        with torch.no_grad():
            # The pipeline's own prompt encoding, for every caption of the data and for "" (its negative prompt
            # under CFG): the text encoder is not trained, so its outputs are computed once.
            used, self.caption_ids = torch.unique(caption_ids, return_inverse=True)
            texts = [cache.captions[i] for i in used.tolist()] + [""]
            length = settings.max_sequence_length
            embeds = [self.pipe.encode_prompt(prompt=part, device="cpu", max_sequence_length=length)
                      for part in _chunks(texts, 256)]  # fmt: skip
        self.text = torch.cat([e for e, _ in embeds])
        self.text_ids = embeds[0][1][:1]
        self.empty = len(texts) - 1
        # Pipeline latents (BN-normalised, patchified, packed), what the transformer sees in the stock loop.
        self.tokens = {size: self._tokens(z) for size, z in latents.items()}
        objects = object_tokens(settings.data_seed, [cache.captions[i] for i in caption_ids.tolist()])
        self.token_weights = {size: 1 + settings.object_weight * mask for size, mask in objects.items()}

    def _tokens(self, vae_latents: torch.Tensor) -> torch.Tensor:
        out = []
        for part in vae_latents.split(512):
            out.append(self.adapter.pack(self.pipe, self.adapter.vae_to_latents(self.pipe, part.float())))
        return torch.cat(out)

    def _load_state(self) -> dict | None:
        state_file = self.checkpoint / "state.json"
        if not state_file.is_file():
            raise ValueError(f"--resume: no checkpoint in {self.checkpoint}. Drop --resume to start a new run.")
        state = json.loads(state_file.read_text())
        saved = state["settings"]
        changed = [f"--{k.replace('_', '-')} {saved[k]} (now {getattr(self.s, k)})"
                   for k in _MUST_MATCH if saved[k] != getattr(self.s, k)]  # fmt: skip
        if changed:
            raise ValueError(
                "--resume: these settings differ from the checkpoint's, which would not continue the same run: "
                + ", ".join(changed)
                + ". Pass the checkpoint's values, or train a new run with another --out/--work."
            )
        return state

    # One step ------------------------------------------------------------------------------------------------------
    def loss_at(self, step: int, model: torch.nn.Module) -> tuple[torch.Tensor, int]:
        """The flow-matching loss of training step `step` (its size, batch, noise, times and dropped captions)."""
        s = self.s
        size = SIZE_CYCLE[step % len(SIZE_CYCLE)]
        generator = _step_generator(s.seed, step)
        tokens = self.tokens[size]
        index = torch.randint(len(tokens), (s.batch * BATCH_SCALE[size],), generator=generator)
        x0 = tokens[index]
        captions = self.caption_ids[index].clone()
        captions[torch.rand(len(index), generator=generator) < s.caption_dropout] = self.empty
        # Logit-normal times shifted towards noise (median sigma 0.73 at time_shift 1): there the prompt decides
        # what the image shows, and a trial learnt the text conditioning several times faster than at 0.
        # FlowMatchEulerDiscreteScheduler's convention: x_t = (1 - sigma) x0 + sigma noise, the pipeline passes
        # sigma (= t / 1000) as the timestep, and its Euler step x += (sigma_next - sigma) * v needs v = noise - x0.
        sigma = torch.sigmoid(torch.randn(len(index), generator=generator) + s.time_shift)
        noise = torch.randn(x0.shape, generator=generator)
        weights = self.token_weights[size][index]
        return self._velocity_loss(model, x0, captions, sigma, noise, size, weights), size

    def _velocity_loss(self, model, x0, captions, sigma, noise, size: int, weights=None) -> torch.Tensor:
        xt = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
        side = size // (self.pipe.vae_scale_factor * 2)
        prediction = model(
            hidden_states=xt,
            timestep=sigma,
            guidance=None,
            encoder_hidden_states=self.text[captions],
            txt_ids=self.text_ids.expand(len(x0), -1, -1),
            img_ids=self.adapter_ids(side, len(x0)),
            return_dict=False,
        )[0]
        if weights is None:
            return F.mse_loss(prediction, noise - x0)
        # Objects cover about a tenth of an image: weighted up, the loss spends more of the model on drawing them
        # than on the background texture around them. Normalised by the weights, so the scale stays a mean error.
        per_token = (prediction - (noise - x0)).square().mean(dim=-1)
        return (per_token * weights).sum() / weights.sum()

    @torch.no_grad()
    def caption_gap(self, images_per_size: int = 32) -> float:
        """How much lower the EMA model's loss is with the right captions than with shuffled ones, relative, on a
        fixed batch at every size and noise levels 0.9, 0.7, 0.5: 0 means the prompt is ignored."""
        generator = torch.Generator().manual_seed(20251)
        right = shuffled = 0.0
        for size in SIZES:
            index = torch.randint(len(self.tokens[size]), (images_per_size,), generator=generator)
            x0, captions = self.tokens[size][index], self.caption_ids[index]
            others = captions[torch.randperm(images_per_size, generator=generator)]
            for level in (0.9, 0.7, 0.5):
                sigma, noise = torch.full((images_per_size,), level), torch.randn(x0.shape, generator=generator)
                right += self._velocity_loss(self.ema, x0, captions, sigma, noise, size).item()
                shuffled += self._velocity_loss(self.ema, x0, others, sigma, noise, size).item()
        return (shuffled - right) / shuffled

    def adapter_ids(self, side: int, batch: int) -> torch.Tensor:
        return Flux2KleinPipeline._prepare_latent_ids(torch.empty(batch, 1, side, side))

    def train_step(self, step: int) -> tuple[float, int]:
        for group in self.optimizer.param_groups:
            group["lr"] = _lr_at(step, self.s.lr, self.s.warmup)
        loss, size = self.loss_at(step, self.transformer)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.transformer.parameters(), 1.0)
        self.optimizer.step()
        # EMA with a short start (decay grows with the step), so early samples are not dominated by the init.
        decay = min(self.s.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for averaged, current in zip(self.ema.parameters(), self.transformer.parameters()):
                averaged.lerp_(current, 1 - decay)
        return loss.item(), size

    # Saving ----------------------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        partial = self.work / f"{CHECKPOINT}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        self.pipe.save_pretrained(partial / "pipeline")
        _atomic_save_file(self.ema.state_dict(), partial / "ema.safetensors")
        torch.save(self.optimizer.state_dict(), partial / "optimizer.pt")
        state = {"step": self.step, "settings": asdict(self.s), "history": self.history, "runs": self.runs}
        (partial / "state.json").write_text(json.dumps(state, indent=1) + "\n")
        # Swap in whole: a crash leaves either the old checkpoint or the new one.
        old = self.work / f"{CHECKPOINT}.old"
        shutil.rmtree(old, ignore_errors=True)
        if self.checkpoint.exists():
            self.checkpoint.rename(old)
        partial.rename(self.checkpoint)
        shutil.rmtree(old, ignore_errors=True)

    def ema_pipeline(self) -> Flux2KleinPipeline:
        p = self.pipe
        pipe = Flux2KleinPipeline(p.scheduler, p.vae, p.text_encoder, p.tokenizer, self.ema)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.no_grad()
    def samples(self) -> Image.Image:
        pipe = self.ema_pipeline()
        images = pipe(
            prompt=sample_prompts()[: self.s.samples],
            height=SIZES[-1],
            width=SIZES[-1],
            num_inference_steps=SAMPLE_STEPS,
            guidance_scale=SAMPLE_GUIDANCE,
            max_sequence_length=self.s.max_sequence_length,
            generator=torch.Generator().manual_seed(0),
        ).images
        return _grid(images, min(len(images), len(scenes.CATEGORIES)))

    def publish(self) -> None:
        """Write the output folder: the pipeline with the EMA transformer, the sample grid, history, model card."""
        out = Path(self.s.out)
        grid = self.samples()
        (self.work / SAMPLES).mkdir(parents=True, exist_ok=True)
        grid.save(self.work / SAMPLES / f"step_{self.step:06d}.png")  # the record of how the samples evolved
        partial = out.parent / f".{out.name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        self.ema_pipeline().save_pretrained(partial)
        folder_defaults(self.s).save(partial)
        grid.save(partial / "samples.png")
        (partial / HISTORY_FILE).write_text(json.dumps({"runs": self.runs, "history": self.history}, indent=1) + "\n")
        (partial / "README.md").write_text(model_card(self.s, self.step, self.runs, self.history))
        old = out.parent / f".{out.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        if out.exists():
            out.rename(old)
        partial.rename(out)
        shutil.rmtree(old, ignore_errors=True)

    # The loop ---------------------------------------------------------------------------------------------------------
    def run(self) -> dict:
        s = self.s
        run = {"command": self.command, "from_step": self.step, "to_step": self.step, "seconds": 0.0,
               "scenes": len(self.caption_ids), "threads": s.threads}  # fmt: skip
        self.runs.append(run)
        window: dict[int, list[float]] = {}
        started = last = time.perf_counter()
        bar = tqdm(total=s.steps, initial=self.step, desc="training the scene model", unit="step")
        while self.step < s.steps:
            loss, size = self.train_step(self.step)
            self.step += 1
            window.setdefault(size, []).append(loss)
            bar.update()
            bar.set_postfix(loss=f"{loss:.4f}", size=size)
            if self.step % s.checkpoint_every == 0 or self.step == s.steps:
                now = time.perf_counter()
                losses = [v for values in window.values() for v in values]
                self.history.append({
                    "step": self.step,
                    "loss": round(sum(losses) / len(losses), 5),
                    **{f"loss_{k}": round(sum(v) / len(v), 5) for k, v in sorted(window.items())},
                    "s_per_step": round((now - last) / len(losses), 3),
                })  # fmt: skip
                window, last = {}, now
                run["to_step"], run["seconds"] = self.step, round(now - started, 1)
                self.save_checkpoint()
            if self.step % s.sample_every == 0 or self.step == s.steps:
                self.history[-1]["caption_gap"] = round(self.caption_gap(), 5)
                self.publish()
        bar.close()
        return run


def folder_defaults(settings: TrainSettings) -> ModelDefaults:
    """How the output folder says to call the model (its `lssgen.json`): the native size, the sampling settings
    of `samples.png`, the training prompt length, and lssgen's three stages (64, 128, 256 px) with our FLUX.2
    upsampler between them."""
    return ModelDefaults(
        height=SIZES[-1],
        width=SIZES[-1],
        num_inference_steps=SAMPLE_STEPS,
        guidance_scale=SAMPLE_GUIDANCE,
        max_sequence_length=settings.max_sequence_length,
        patch={"base_height": SIZES[-1], "base_width": SIZES[-1], "min_resolution": SIZES[0], "upsampler": "flux2-x2"},
    )


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def model_card(settings: TrainSettings, step: int, runs: list[dict], history: list[dict]) -> str:
    """The output folder's README: what it is, how to load it, how it was trained, the loss history."""
    commands = "\n".join(f"{r['command']}  # steps {r['from_step']} -> {r['to_step']}, {r['seconds']} s, "
                         f"{r['scenes']} scenes, {r['threads']} threads" for r in runs)  # fmt: skip
    shown = history[:: max(1, len(history) // 20)] + ([history[-1]] if len(history) > 20 else [])
    keys = ["step", "loss", *(f"loss_{size}" for size in SIZES), "caption_gap", "s_per_step"]
    rows = "\n".join("| " + " | ".join(str(h.get(k, "")) for k in keys) + " |" for h in shown)
    components = "\n".join(f"| {name} | {text} |" for name, text in (
        ("component", ""),
        ("---", "---"),
        ("vae", "taef2 (github.com/madebyollin/taesd at 5cccb12, MIT) as `lssgen.TinyFlux2Autoencoder`; the folder "
                "holds its config and BatchNorm statistics (those of the training renders' 256 px latents), not "
                "taef2's weights, which load from a taef2 folder (`$LSSGEN_TAEF2`, else `../shared/data/taef2`)"),
        ("tokenizer", "`Qwen2Tokenizer`, byte-level BPE from the caption words, Qwen's chat tokens and template"),
        ("text_encoder", f"`Qwen3ForCausalLM`, {TEXT_LAYERS} layers, {TEXT_WIDTH} wide, random (seed {settings.seed}) "
                         "and not trained; the pipeline's default `text_encoder_out_layers` (9, 18, 27)"),
        ("transformer", f"`lssgen.SceneDenoiser`: a `UNet2DConditionModel` with channels {settings.channels} behind "
                        f"FLUX.2's transformer call; the EMA ({settings.ema}) of the trained weights"),
        ("scheduler", "FLUX.2's `FlowMatchEulerDiscreteScheduler` config"),
    ))  # fmt: skip
    return f"""# scene-t2i: a small text-to-image model of lssgen's procedural scenes

A stock diffusers `Flux2KleinPipeline` folder, trained by the lssgen developers on renders of `lssgen.scenes`
(GenEval-style captions: one object, two objects, counting, colours, position, colour attribution; 8 shapes x 8
colours on textured backgrounds), in FLUX.2's latent space through taef2. It exists so that lssgen's FLUX.2 route
(`weights/flux2-x2`, the `flux2` adapter) can be measured end to end on a CPU; it is not a general image model.

```py
import lssgen

pipe = lssgen.load_pipeline("weights/scene-t2i")  # {SIZES[-1]} px by default, as lssgen.json says
defaults = lssgen.model_defaults(pipe).call_arguments()  # steps, guidance, max_sequence_length
image = pipe("a photo of a red star", **defaults).images[0]
lssgen.patch(pipe)  # stages from {SIZES[0]} px and the weights/flux2-x2 upsampler, from lssgen.json
fast = pipe("a photo of a red star", **defaults).images[0]
```

With the stock loader, import the two modules the folder names its components from first (diffusers loads
components only from modules already imported) and pass the size and prompt length yourself:
`import lssgen.scenes.denoiser, lssgen.autoencoders.flux2`, then
`Flux2KleinPipeline.from_pretrained("weights/scene-t2i")(prompt, height={SIZES[-1]}, width={SIZES[-1]},
num_inference_steps={SAMPLE_STEPS}, max_sequence_length={settings.max_sequence_length})`. The model was trained
with prompts padded to {settings.max_sequence_length} tokens (the longest caption with the chat template is 24); the
pipeline's default of 512 pads with 480 more tokens the transformer never saw in training.

`lssgen.json` records these settings for lssgen ({SIZES[-1]} px, {SAMPLE_STEPS} steps, guidance {SAMPLE_GUIDANCE:g},
{settings.max_sequence_length}-token prompts; three stages from {SIZES[0]} px with `weights/flux2-x2`):
`lssgen.load_pipeline(folder)` makes {SIZES[-1]} px the stock call's default size,
`lssgen.model_defaults(pipe).call_arguments()` gives the rest, and `lssgen.patch(pipe)` takes its stages and
upsampler from there (docs/model-folders.md).

{components}

Training: flow matching in the pipeline's own latent space (taef2 latents, 2x2-patchified, BatchNorm-normalised,
packed), velocity `noise - x0`, the squared error weighted {1 + settings.object_weight:g}x on the image tokens
an object's box touches, logit-normal times (mean {settings.time_shift}), {settings.caption_dropout:.0%} of
captions replaced by the empty prompt (the pipeline's negative prompt under classifier-free guidance), sizes
{", ".join(map(str, SIZES))} px in the cycle {SIZE_CYCLE} (batch {settings.batch} at 256 px, x2 at 128, x4 at
64), AdamW lr {settings.lr} ({settings.warmup} warm-up steps, then constant), gradient norm clipped at 1; scenes
from seed {settings.data_seed} (the held-out evaluation prompts, seed `lssgen.scenes.world.EVALUATION_SEED`, are never
trained on). Step {step} of {settings.steps}.

```bash
{commands}
```

`samples.png`: the EMA model at 256 px, {SAMPLE_STEPS} steps, guidance 4, seed 0, on the first two held-out
evaluation prompts of each category, in this order: {"; ".join(sample_prompts()[: settings.samples])}.

Loss history (mean per window; `{HISTORY_FILE}` has every window):

| {" | ".join(keys)} |
|{"---|" * len(keys)}
{rows}
"""


def command_line(settings: TrainSettings) -> str:
    """The `python -m lssgen.scenes.model train` command that runs `settings` (defaults left out)."""
    defaults = asdict(TrainSettings(out="", taef2=""))
    words = [
        "python -m lssgen.scenes.model train",
        "--out",
        shlex.quote(settings.out),
        "--taef2",
        shlex.quote(settings.taef2),
    ]
    for name, value in asdict(settings).items():
        if name not in ("out", "taef2", "resume") and value != defaults[name]:
            words += [f"--{name.replace('_', '-')}", shlex.quote(str(value))]
    return " ".join(words + (["--resume"] if settings.resume else []))


def train(settings: TrainSettings) -> dict:
    r"""
    Train (or with `settings.resume`, continue) the scene model and write its pipeline folder to `settings.out`.

    Example:

    ```py
    >>> train(TrainSettings(out="weights/scene-t2i", taef2="data/taef2", steps=6000))
    ```
    """
    _check(settings)
    torch.set_num_threads(settings.threads)
    return _Trainer(settings, command_line(settings)).run()


def _check(s: TrainSettings) -> None:
    for name in ("steps", "batch", "scenes", "threads", "sample_every", "checkpoint_every", "max_sequence_length"):
        if getattr(s, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(s, name)}.")
    parse_channels(s.channels)
    if s.object_weight < 0:
        raise ValueError(f"--object-weight must be at least 0, got {s.object_weight}.")
    if not 0 <= s.caption_dropout < 1:
        raise ValueError(f"--caption-dropout must be in [0, 1), got {s.caption_dropout}.")
    if not is_tiny_autoencoder_folder(s.taef2):
        raise ValueError(f"--taef2 {s.taef2}: no taef2_encoder.pth / taef2_decoder.pth there.")
    if not s.resume:
        if (s.work_dir / CHECKPOINT).exists():
            raise ValueError(f"{s.work_dir / CHECKPOINT} exists: pass --resume to continue it, or another --work.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lssgen.scenes.model", description=__doc__.split("\n\n")[1])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("train", help="train (or --resume) the scene model")
    defaults = TrainSettings(out="", taef2="")
    p.add_argument("--out", required=True, help="the pipeline folder to write (e.g. weights/scene-t2i)")
    p.add_argument("--taef2", default="../shared/data/taef2", help="folder with taef2_encoder.pth/_decoder.pth")
    p.add_argument("--work", help="checkpoints, latent cache, sample grids, log (default: runs/OUT_NAME)")
    helps = {
        "steps": "total optimizer steps (a resumed run continues up to this)",
        "batch": "images per step at 256 px (x2 at 128, x4 at 64)",
        "scenes": "scenes rendered and cached (a resume may give more: the cache grows)",
        "threads": "torch CPU threads",
        "caption_dropout": "share of captions replaced by the empty prompt (for guidance)",
        "time_shift": "mean of the logit-normal training times (logit of sigma); above 0 favours noisier steps",
        "object_weight": "extra loss weight on the image tokens an object's box touches (1 + this there, 1 elsewhere)",
        "max_sequence_length": "prompt length in tokens (pass the same to the pipeline)",
        "samples": "held-out prompts in each sample grid (two per category, up to 12)",
    }
    for name, value in asdict(defaults).items():
        if name in ("out", "taef2", "work", "resume"):
            continue
        p.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value, help=helps.get(name, " "))
    p.add_argument("--resume", action="store_true", help="continue the checkpoint in --work")
    c = commands.add_parser(
        "cache", help="only render and encode scenes into the latent cache (e.g. beside a running training, which "
        "takes them when resumed with as many --scenes)"
    )  # fmt: skip
    c.add_argument("--out", required=True, help="the training's --out (names its default --work)")
    c.add_argument("--taef2", default="../shared/data/taef2", help="folder with taef2_encoder.pth/_decoder.pth")
    c.add_argument("--work", help="the training's --work (default: runs/OUT_NAME)")
    for name in ("scenes", "data_seed", "threads"):
        c.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name), help=helps.get(name))
    e = commands.add_parser("evaluate", help="accuracy per category on the held-out prompts, by lssgen.scenes.scorer")
    e.add_argument("--model", required=True, help="the pipeline folder (e.g. weights/scene-t2i)")
    e.add_argument(
        "--scorer", required=True, help="a lssgen.scenes.scorer.SceneScorer folder (e.g. weights/scene-scorer)"
    )
    e.add_argument("--images-per-prompt", type=int, default=1)
    e.add_argument("--steps", type=int, default=SAMPLE_STEPS, help="num_inference_steps")
    e.add_argument("--max-sequence-length", type=int, default=32)
    e.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.command == "evaluate":
        from .scorer import SceneScorer

        torch.set_num_threads(args.threads)
        pipe = Flux2KleinPipeline.from_pretrained(args.model)
        pipe.set_progress_bar_config(disable=True)
        report = evaluate_model(pipe, SceneScorer.from_pretrained(args.scorer), args.images_per_prompt,
                                height=SIZES[-1], width=SIZES[-1], num_inference_steps=args.steps,
                                max_sequence_length=args.max_sequence_length)  # fmt: skip
        print(json.dumps(report, indent=1))
        return 0
    settings = TrainSettings(**{k: v for k, v in vars(args).items() if k != "command"})
    try:
        if args.command == "cache":
            build_cache(settings)
            return 0
        run = train(settings)
    except ValueError as error:
        parser.exit(2, f"error: {error}\n")
    print(json.dumps(run))
    return 0


@torch.no_grad()
def evaluate_model(pipe, scorer, images_per_prompt: int = 1, seed: int = 0, **call) -> dict[str, dict[str, float]]:
    r"""
    GenEval-style accuracy of `pipe` on the held-out prompts (`lssgen.scenes.evaluation_scenes`, 16 per category),
    judged by `scorer` (`lssgen.scenes.scorer.SceneScorer`), per category.

    `accuracy` is the share of images that show what their prompt asks; `chance` scores the same images against
    another prompt of the same category (the next one), which is what a model that ignores the prompt would reach.
    `call` goes to `pipe` (e.g. `num_inference_steps`, `max_sequence_length`, lssgen's options on a patched pipe).

    Example:

    ```py
    >>> from lssgen.scenes.scorer import SceneScorer
    >>> evaluate_model(pipe, SceneScorer.from_pretrained("weights/scene-scorer"), max_sequence_length=32)
    ```
    """
    prompts = [scene.caption for scene in scenes.evaluation_scenes()]
    images = []
    for part in tqdm(_chunks(prompts, 6), desc="generating the held-out prompts", unit="batch"):
        generator = torch.Generator().manual_seed(seed + len(images))
        images += pipe(prompt=part, num_images_per_prompt=images_per_prompt, generator=generator, **call).images
    captions = [caption for caption in prompts for _ in range(images_per_prompt)]
    # The same category's next prompt: prompts come in category turns (index % 6), so that is 6 prompts on.
    others = [prompts[(i + len(scenes.CATEGORIES)) % len(prompts)] for i in range(len(prompts))]
    other_captions = [caption for caption in others for _ in range(images_per_prompt)]
    right, wrong = scorer.score(images, captions), scorer.score(images, other_captions)
    report = {}
    for category in scenes.CATEGORIES:
        picked = [i for i, r in enumerate(right) if r.category == category]
        report[category] = {
            "accuracy": sum(right[i].passed for i in picked) / len(picked),
            "chance": sum(wrong[i].passed for i in picked) / len(picked),
            "images": len(picked),
        }
    return report


def build_cache(settings: TrainSettings) -> None:
    """Render and encode `settings.scenes` scenes into the latent cache of `settings.work_dir`."""
    if not is_tiny_autoencoder_folder(settings.taef2):
        raise ValueError(f"--taef2 {settings.taef2}: no taef2_encoder.pth / taef2_decoder.pth there.")
    torch.set_num_threads(settings.threads)
    vae = TinyFlux2Autoencoder.from_taesd_folder(settings.taef2)
    LatentCache(settings.work_dir / CACHE, vae, settings.data_seed, settings.scenes).build()


if __name__ == "__main__":
    sys.exit(main())
