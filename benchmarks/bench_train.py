"""Training-step benchmark: seconds per pair, UNet evaluations per pair and peak memory per method.

A script, not a test. For one architecture preset (``tiny``, ``sd15``, ``sdxl``: diffusers models
built from their configs with random weights, no download) it times an optimizer step of every
method, full fine-tuning and LoRA, from a ``smpo cache`` folder and from images, and writes the
results as JSON plus a markdown table, row by row (a crash keeps the finished rows).

Every row is a ``smpo train`` run: its ``TrainConfig`` is built here, the run is set up by the
training code (``smpo.train.setup.prepare_training``) and each step is the training loop's own
``smpo.train.loop.train_step``, reading a small labelled dataset the script writes (random images)
or the cache ``smpo cache``'s ``build_cache`` makes of it (untimed, before the row). The network
calls are timed and counted from outside, with torch module hooks on the networks and encoders
and step hooks on the optimizer; nothing of the training code is replaced.

Rows:

- ``smpo``: our SmPO with the authors' inversion settings (their grid, ``land_on_t=False``, one
  renoise iteration, 5 grid steps for SD1.5 and 10 for SDXL), inverting with the policy.
- ``smpo-land-on-t``: the same with the inversion ending exactly at ``t`` (the paper's Eq. 13).
- ``smpo-cached``, ``smpo-land-on-t-cached``: the same two with the reference inverting and its
  inversion read from the cache (``smpo cache --store-inversion``, ``data.cached_inversion``; no
  random flip or dropped prompt, so every image has its stored inversion). Cache rows only.
- ``dpo``, ``kto``, ``mapo``, ``sft``: the baselines (forward noising). KTO's pair is its two images.
- ``authors-recipe`` (full mode, images only): what the authors' script does each step: one pair,
  the VAE (posterior sample) and the text encoder every step, two full UNets (trainable policy +
  frozen reference), inversion by the policy on their grid with one renoise iteration.

Each SD1.5 row is also timed against the **bare DPO step** (:func:`bare_dpo_step`): the arithmetic
of a Diffusion-DPO step written plainly (one policy and one reference call on the 2B winner and
loser latents, the loss, backward, gradient clipping, AdamW), plus, for rows from images, the VAE
and text-encoder calls (:func:`bare_encode`); it runs right after each of the row's timed steps in
the same process, and ``x bare`` is the median over steps of the per-step ratio.

Memory: ``torch.cuda.max_memory_allocated`` on GPU (reset per row); on the CPU the peak resident
set size of a fresh process per row (``--isolate``, the default there), which includes building
the model and the row's cache. Use ``--no-floor`` for memory figures (no floor, no bare step).

Examples::

    python benchmarks/bench_train.py --preset tiny --device cpu --out benchmarks/results/cpu-tiny.json
    python benchmarks/bench_train.py --preset sd15 --device cuda --dtype fp16 --gradient-checkpointing \\
        --out benchmarks/results/h100-sd15.json
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import io
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:  # run from a checkout without installing smpo
    sys.path.insert(0, str(ROOT / "src"))

from smpo.io import atomic_path, model_identity, write_json  # noqa: E402
from smpo.models import FamilyAdapter, make_adapter  # noqa: E402
from smpo.objective import ObjectiveConfig  # noqa: E402
from smpo.train.config import TrainConfig  # noqa: E402
from smpo.train.loop import train_step  # noqa: E402
from smpo.train.setup import TrainingSetup, make_accelerator, prepare_training, resolve_config  # noqa: E402

METHODS = ("smpo", "smpo-land-on-t", "smpo-cached", "smpo-land-on-t-cached", "dpo", "kto", "mapo", "sft",
           "authors-recipe")
SMPO_ROWS = ("smpo", "smpo-land-on-t", "smpo-cached", "smpo-land-on-t-cached")
MODES = ("full", "lora")
SOURCES = ("cache", "images")
AUTHORS_GRID = {"sd15": 5, "sdxl": 10, "sd3": 10, "flux": 10}  # the inversion grid per family (ALGORITHM.md
# section 6; SD3/FLUX: their recipes' 10-step Euler grid)
PRESET_FAMILIES = {"tiny": ("sd15", "sdxl", "sd3", "flux"), "sd15": ("sd15",), "sdxl": ("sdxl",)}
FLOW = ("sd3", "flux")
FLOW_ROWS = ("smpo", "dpo", "kto", "mapo", "sft")
"""Rows of the flow families: their inversion always lands on s (no land-on-t variant), the cached
inversion is DDIM-only, and no authors' script exists for them."""
BARE_FAMILIES = ("sd15",)
"""Families the bare DPO step is written for (one text encoder, epsilon prediction, no added conditioning)."""
PRECISION = {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
"""``cpu``: the seconds this process computed, blind to the time a shared machine's other jobs take
from it (meaningful on the CPU with ``--threads 1``; on a GPU use ``wall``)."""


@dataclass
class Settings:
    preset: str
    family: str
    device: str
    dtype: str
    gradient_checkpointing: bool
    steps: int
    warmup: int
    pairs_per_step: int
    lora_rank: int
    optimizer: str
    seed: int = 0
    floor: bool = True  # measure the SmPO rows' floor and every row's bare step between its steps
    resolution: int | None = None  # pixels; default the preset's
    clock: str = "wall"  # wall: time.perf_counter; cpu: this process's CPU time (time.process_time)
    data_workers: int | None = None  # data.num_workers of the rows; default the training default


@dataclass
class Timers:
    total: float = 0.0
    unet_forward: float = 0.0
    backward: float = 0.0
    """From the end of the policy's forward call to the optimizer step, less the network calls in
    between (the reference's): the loss, the backward pass and gradient clipping."""
    optimizer: float = 0.0
    encode: float = 0.0


@dataclass
class Row:
    family: str
    preset: str
    mode: str
    method: str
    source: str
    pairs_per_step: int
    pairs: int
    seconds_per_pair: float
    unet_evals_per_pair: float
    unet_calls_per_pair: float
    seconds_per_pair_mean: float
    peak_memory_gib: float
    memory_kind: str
    share_outside_unet: float
    last_loss: float
    objective: dict[str, Any]
    timers: dict[str, float] = field(default_factory=dict)
    floor_seconds_per_pair: float = float("nan")
    """SmPO rows: the median over timed steps of (a DPO step of the same batch, run right after the
    row's step in the same process) + (the row's step's no-grad UNet calls, less the reference call
    DPO also makes, replayed as calls of the frozen network of the same batch sizes), per pair."""
    full_batch_floor_seconds_per_pair: float = float("nan")
    """The same with the extra evaluations priced at the full batch's per-sample cost."""
    floor_ratio: float = float("nan")
    """SmPO rows: the median over timed steps of (step time / that step's floor): each step against
    the floor measured right after it (robust to the machine's drift)."""
    full_batch_floor_ratio: float = float("nan")
    dpo_ratio: float = float("nan")
    """SmPO rows: the median over timed steps of (step time / the DPO step run right after it)."""
    bare_seconds_per_pair: float = float("nan")
    """SD1.5 rows: the median bare DPO step (plus the VAE and text encoder for rows from images) of
    the row's batch size, run right after each of its timed steps, per pair."""
    bare_ratio: float = float("nan")
    """The median over timed steps of (step time / the bare step run right after it)."""
    bare_ratio_quartiles: list[float] = field(default_factory=list)
    """The first and third quartiles of those per-step ratios (their spread)."""
    bare_decoded_ratio: float = float("nan")
    """Rows from images: the same ratio against the bare step plus a plain decoding of the pairs'
    JPEG bytes (``bare_decode``: PIL decode, bilinear resize, tensor), which any step from images makes."""
    bare_decoded_ratio_quartiles: list[float] = field(default_factory=list)
    nograd_calls: dict[int, int] = field(default_factory=dict)
    """The timed steps' no-grad UNet calls (inversion and reference), counted by batch size."""
    frozen_call_seconds: dict[int, float] = field(default_factory=dict)
    """Median seconds of one no-grad call of the frozen network (reference copy in full mode, the
    adapters-off view in LoRA mode) at each batch size, measured between the row's steps."""


# --------------------------------------------------------------------------------------------
# The row's model, data and run


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_family(family: str, preset: str, device: torch.device, seed: int) -> FamilyAdapter:
    """The preset pipeline built directly on ``device`` (random init there is fast), as an adapter,
    with its modules frozen as ``smpo.models.load_family`` leaves them."""
    from smpo.models.presets import build_pipeline

    with torch.device(device):
        pipe = build_pipeline(family, preset, seed=seed)  # type: ignore[arg-type]
    suffixes = {"sd15": ("",), "sdxl": ("", "_2"), "sd3": ("", "_2", "_3"), "flux": ("", "_2")}[family]
    encoders = [getattr(pipe, f"text_encoder{k}") for k in suffixes]
    tokenizers = [getattr(pipe, f"tokenizer{k}") for k in suffixes]
    network = pipe.transformer if family in FLOW else pipe.unet
    for module in [network, pipe.vae, *encoders]:
        module.requires_grad_(False)
    adapter = make_adapter(family, network=network, vae=pipe.vae, text_encoders=encoders, tokenizers=tokenizers,
                           scheduler=pipe.scheduler, source=f"preset {preset}")
    return adapter.to(device)


def objective_for(method: str, family: str) -> ObjectiveConfig:
    grid = AUTHORS_GRID[family]
    if method in ("smpo", "authors-recipe"):
        return ObjectiveConfig(method="smpo", inversion_steps=grid, renoise_iters=1, land_on_t=False)
    if method == "smpo-land-on-t":
        return ObjectiveConfig(method="smpo", inversion_steps=grid, renoise_iters=1, land_on_t=True)
    if method in ("smpo-cached", "smpo-land-on-t-cached"):
        return ObjectiveConfig(method="smpo", inversion_steps=grid, renoise_iters=1, inverting_network="reference",
                               land_on_t=method == "smpo-land-on-t-cached")
    return ObjectiveConfig(method=method)


def write_dataset(folder: Path, num_pairs: int, resolution: int, seed: int) -> Path:
    """``num_pairs`` pairs of random JPEGs (``resolution`` px) and captions in the ``smpo label`` schema."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(seed)

    def jpeg() -> bytes:
        out = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)).save(out, format="JPEG")
        return out.getvalue()

    rows = [{"pair_id": f"p{i:04d}", "caption": f"a photograph of an astronaut riding a horse, number {i}",
             "jpg_0": jpeg(), "jpg_1": jpeg(), "label_0": float(i % 2 == 0), "winner": 0 if i % 2 == 0 else 1,
             "score_0": 0.3, "score_1": 0.2, "p_win": 0.65} for i in range(num_pairs)]
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), folder / "shard-00000.parquet")
    return folder


class RowData:
    """The labelled datasets of a process's rows and the caches made of them, each made once, untimed."""

    def __init__(self, folder: Path, num_pairs: int, seed: int):
        self.folder, self.num_pairs, self.seed = folder, num_pairs, seed
        self.datasets: dict[int, Path] = {}
        self.caches: dict[Any, Path] = {}

    def dataset(self, resolution: int) -> Path:
        """The pairs as images of ``resolution`` px (what the rows train at)."""
        if resolution not in self.datasets:
            self.datasets[resolution] = write_dataset(self.folder / f"dataset-{resolution}", self.num_pairs,
                                                      resolution, self.seed)
        return self.datasets[resolution]

    def cache(self, fam: FamilyAdapter, inversion: Any = None) -> Path:
        """``smpo cache`` of the dataset for ``fam`` (its initial network inverting when ``inversion``)."""
        from smpo.data.cache import build_cache

        key = (fam.name, fam.resolution, inversion)
        if key not in self.caches:
            folder = self.folder / f"cache-{len(self.caches)}"
            build_cache(self.dataset(fam.resolution), folder, fam, model=inversion.unet if inversion else "",
                        progress=False, inversion=inversion)
            self.caches[key] = folder
        return self.caches[key]


def row_config(settings: Settings, method: str, mode: str, source: str, data: RowData,
               fam: FamilyAdapter) -> TrainConfig:
    """The ``smpo train`` config of a row (resolved as ``train`` resolves it)."""
    from smpo.data.latent_cache import InversionSpec

    authors = method == "authors-recipe"
    config = TrainConfig(objective=objective_for(method, settings.family))
    config.model.pretrained, config.model.family = f"preset {settings.preset}", settings.family
    config.model.finetune, config.model.lora_rank = mode, settings.lora_rank  # type: ignore[assignment]
    config.model.gradient_checkpointing = settings.gradient_checkpointing
    optimizer = settings.optimizer if settings.optimizer != "auto" else "adafactor" if settings.family == "sdxl" else "adamw"
    config.optim.optimizer = optimizer  # type: ignore[assignment]
    config.optim.batch_size = 1 if authors else settings.pairs_per_step
    config.optim.gradient_accumulation_steps, config.optim.warmup_steps = 1, 0
    config.optim.max_steps = 10**9
    config.run.output_dir, config.run.seed = str(data.folder / "run"), settings.seed
    config.run.mixed_precision, config.run.progress = PRECISION[settings.dtype], False  # type: ignore[assignment]
    config.data.resolution, config.data.num_workers = settings.resolution, settings.data_workers
    if source == "images":
        config.data.dataset, config.data.vae_sample = str(data.dataset(fam.resolution)), authors
    else:
        cached = method.endswith("-cached")
        objective = config.objective.resolved()
        spec = InversionSpec(unet=model_identity(config.model.pretrained), steps=objective.inversion_steps,
                             renoise_iters=objective.effective_renoise_iters, land_on_t=objective.land_on_t,
                             guidance=objective.inversion_guidance) if cached else None
        config.data.cache, config.data.cached_inversion = str(data.cache(fam, spec)), cached
        if cached:  # every image then has its stored inversion (a flip or a dropped prompt is inverted live)
            config.data.random_flip, config.data.empty_prompt_rate = False, 0.0
    return resolve_config(config)


# --------------------------------------------------------------------------------------------
# Timing from outside: module and optimizer hooks


def _batch_size(args: tuple, kwargs: dict) -> int:
    first = next(v for v in [*args, *kwargs.values()] if isinstance(v, torch.Tensor))
    return int(first.shape[0])


class CallTimer:
    """Times and counts a step's network calls with torch hooks, without touching the training code.

    Forward hooks on the denoising networks (the policy's module; in full mode also the frozen
    reference copy; a LoRA reference view calls the policy's module) time each call and count
    the no-grad ones by batch size; hooks on the VAE encoder and the text encoders time encoding;
    the optimizer's step hooks time the optimizer step and, with the end of the policy's
    forward call, the backward pass. Only while ``recording``.
    """

    def __init__(self, networks: list[torch.nn.Module], encoders: list[torch.nn.Module], optimizer: Any,
                 device: torch.device, clock: Any = time.perf_counter):
        self.device, self.clock, self.recording, self.timers = device, clock, True, Timers()
        self.nograd_calls: dict[int, int] = {}
        self._start = 0.0
        self._grad_end: float | None = None  # end of the last forward call with gradients
        self._after_grad = 0.0  # network seconds since then
        self.handles = []
        for module in networks:
            self.handles += [module.register_forward_pre_hook(self._begin, with_kwargs=True),
                             module.register_forward_hook(self._network_end, with_kwargs=True)]
        for module in encoders:
            self.handles += [module.register_forward_pre_hook(self._begin, with_kwargs=True),
                             module.register_forward_hook(self._encoder_end, with_kwargs=True)]
        self.handles += [optimizer.register_step_pre_hook(self._optimizer_begin),
                         optimizer.register_step_post_hook(self._optimizer_end)]

    def _now(self) -> float:
        _sync(self.device)
        return self.clock()

    def _begin(self, module: Any, args: tuple, kwargs: dict) -> None:
        if self.recording:
            self._start = self._now()

    def _network_end(self, module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        if not self.recording:
            return
        end = self._now()
        seconds = end - self._start
        self.timers.unet_forward += seconds
        if torch.is_grad_enabled():
            self._grad_end, self._after_grad = end, 0.0
        else:
            size = _batch_size(args, kwargs)
            self.nograd_calls[size] = self.nograd_calls.get(size, 0) + 1
            self._after_grad += seconds

    def _encoder_end(self, module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        if self.recording:
            self.timers.encode += self._now() - self._start

    def _optimizer_begin(self, optimizer: Any, args: tuple, kwargs: dict) -> None:
        if not self.recording:
            return
        self._start = self._now()
        if self._grad_end is not None:
            self.timers.backward += self._start - self._grad_end - self._after_grad
        self._grad_end = None

    def _optimizer_end(self, optimizer: Any, args: tuple, kwargs: dict) -> None:
        if self.recording:
            self.timers.optimizer += self._now() - self._start

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


# --------------------------------------------------------------------------------------------
# The bare DPO step, written plainly


def bare_encode(fam: FamilyAdapter, pixels: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE (posterior mean) and text-encoder calls a step from images makes, plainly."""
    vae, encoder, tokenizer = fam.vae, fam.text_encoders[0], fam.tokenizers[0]
    weight = next(vae.parameters())  # (diffusers' `vae.device` and `vae.dtype` walk every submodule per call)
    latents = vae.encode(pixels.to(weight.device, weight.dtype)).latent_dist.mean * vae.config.scaling_factor
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return latents.float(), encoder(ids.to(encoder.device))[0].float()


def bare_decode(jpegs: list[bytes], resolution: int) -> torch.Tensor:
    """The pixels of JPEG bytes, plainly: PIL decode, bilinear resize to ``resolution``, [-1, 1]."""
    from PIL import Image

    images = [Image.open(io.BytesIO(b)).convert("RGB").resize((resolution, resolution), Image.BILINEAR)
              for b in jpegs]
    pixels = torch.stack([torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8) for im in images])
    return pixels.view(-1, resolution, resolution, 3).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def bare_dpo_step(unet: Any, reference: Any, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter],
                  latents: torch.Tensor, text: torch.Tensor, alphas_cumprod: torch.Tensor, *, beta: float,
                  max_grad_norm: float, autocast: Any, generator: torch.Generator) -> float:
    """A Diffusion-DPO step's arithmetic: one policy and one reference call on the 2B winner and
    loser latents (shared t and noise per pair), the loss, backward, clipping, the optimizer step."""
    n, device = latents.shape[0] // 2, latents.device
    t = torch.randint(0, alphas_cumprod.shape[0], (n,), generator=generator).to(device).repeat(2)
    noise = torch.randn((n, *latents.shape[1:]), generator=generator).to(device).repeat(2, 1, 1, 1)
    abar = alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * latents + (1 - abar).sqrt() * noise
    states = text.repeat(2, 1, 1)
    with autocast:
        model = (unet(x_t, t, encoder_hidden_states=states).sample.float() - noise).pow(2).mean(dim=(1, 2, 3))
        with torch.no_grad():
            ref = (reference(x_t, t, encoder_hidden_states=states).sample.float() - noise).pow(2).mean(dim=(1, 2, 3))
    (model_w, model_l), (ref_w, ref_l) = model.chunk(2), ref.chunk(2)
    loss = -F.logsigmoid(-0.5 * beta * ((model_w - ref_w) - (model_l - ref_l))).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


# --------------------------------------------------------------------------------------------
# One row


def _peak(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "peak_rss_process"


def _ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b)) if b else float("nan")


def run_row(settings: Settings, method: str, mode: str, source: str, data: RowData) -> Row:
    """Time one (method, mode, source) row: a fresh model, set up and stepped by the training code."""
    device = torch.device(settings.device)
    fam = build_family(settings.family, settings.preset, device, settings.seed)
    if settings.resolution:
        fam.resolution = settings.resolution  # as `smpo cache --resolution` sets it
    config = row_config(settings, method, mode, source, data, fam)
    accelerator = make_accelerator(config)
    torch.manual_seed(config.run.seed)  # as `train` seeds before the setup (the LoRA weights)
    setup = prepare_training(config, accelerator, fam)
    per_step = config.optim.batch_size
    reference = setup.reference
    networks = [fam.network] + ([reference] if isinstance(reference, torch.nn.Module) else [])
    encoders = [getattr(fam.vae, "encoder", fam.vae), *fam.text_encoders] if source == "images" else []
    clock = CLOCKS[settings.clock]
    timer = CallTimer(networks, encoders, getattr(setup.optimizer, "optimizer", setup.optimizer), device, clock)
    half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.run.mixed_precision)
    autocast = torch.autocast(device.type, dtype=half or torch.float32, enabled=half is not None)
    steps = settings.steps * settings.pairs_per_step // per_step
    warmup = max(settings.warmup * settings.pairs_per_step // per_step, settings.warmup)
    latent_shape = (fam.latent_channels, fam.latent_size, fam.latent_size)
    cond = fam.encode_prompts([""]).to(device) if settings.floor else None

    def timed_step(step: int, run: TrainingSetup) -> tuple[float, float]:
        """One training step of ``run``; (seconds, loss)."""
        _sync(device)
        start = clock()
        record = train_step(run, step)
        _sync(device)
        return clock() - start, record["loss"]

    def frozen_call(size: int) -> float:
        """Seconds of one no-grad call of the frozen network on ``size`` latents."""
        g = torch.Generator().manual_seed(size)
        x = torch.randn(size, *latent_shape, generator=g).to(device)
        t = torch.randint(0, fam.num_timesteps, (size,), generator=g).to(device)
        with torch.no_grad(), autocast:
            _sync(device)
            start = clock()
            fam.network_output(reference, x, t, cond.index([0] * size))  # type: ignore[union-attr]
            _sync(device)
        return clock() - start

    bare = settings.floor and settings.family in BARE_FAMILIES
    if bare:
        policy_network = accelerator.unwrap_model(setup.policy)
        bare_params = [p for p in policy_network.parameters() if p.requires_grad]
        o = config.optim
        bare_optimizer = torch.optim.AdamW(bare_params, lr=o.learning_rate, betas=(o.adam_beta1, o.adam_beta2),
                                           eps=o.adam_epsilon, weight_decay=o.weight_decay)
        bare_reference = reference if reference is not None else policy_network
        alphas = fam.alphas_cumprod.to(device)
        captions = [f"a photograph of an astronaut riding a horse, number {i}" for i in range(per_step)]
        with torch.no_grad():
            text = fam.encode_prompts(captions).hidden_states.to(device)
        if source == "images":  # the bytes of the row's own first pairs
            import pyarrow.parquet as pq

            table = pq.read_table(data.dataset(fam.resolution) / "shard-00000.parquet", columns=["jpg_0", "jpg_1"])
            jpegs = [b for pair in zip(table["jpg_0"].to_pylist(), table["jpg_1"].to_pylist()) for b in pair]
            jpegs = (jpegs * (2 * per_step))[:2 * per_step]

    def bare_step(step: int) -> tuple[float, float]:
        """Seconds of the bare DPO step (with the encoders for rows from images) of the row's batch
        size, and of its plain JPEG decoding before it (0 for rows from the cache)."""
        g = torch.Generator().manual_seed(settings.seed + step)
        r = fam.resolution
        latents = torch.randn(2 * per_step, *latent_shape, generator=g).to(device)
        pixels = torch.rand(2 * per_step, 3, r, r, generator=g).mul(2).sub(1).to(device)
        decoding = 0.0
        if source == "images":
            start = clock()
            decoded = bare_decode(jpegs, r).to(device)
            decoding = clock() - start
            assert decoded.shape == pixels.shape
        _sync(device)
        start = clock()
        states = text
        if source == "images":
            with torch.no_grad():
                latents, states = bare_encode(fam, pixels, captions)
        bare_dpo_step(policy_network, bare_reference, bare_optimizer, bare_params, latents, states, alphas,
                      beta=5000.0, max_grad_norm=config.optim.max_grad_norm or 1.0, autocast=autocast, generator=g)
        _sync(device)
        return clock() - start, decoding

    last_loss = float("nan")
    step_times: list[float] = []
    floors: list[float] = []
    full_batch_floors: list[float] = []
    dpo_times: list[float] = []
    bare_times: list[float] = []
    decode_times: list[float] = []
    call_times: dict[int, list[float]] = {}
    calls_total: dict[int, int] = {}
    dpo_run = dataclasses.replace(setup, config=dataclasses.replace(
        config, objective=ObjectiveConfig(method="dpo").resolved()))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        for step in range(warmup + steps):
            if step == warmup:
                fam.reset_counters()
                timer.timers = Timers()
                calls_total.clear()
            timer.nograd_calls.clear()
            seconds, last_loss = timed_step(step, setup)
            if step < warmup:
                continue
            step_times.append(seconds)
            timer.timers.total += seconds
            for size, n in timer.nograd_calls.items():
                calls_total[size] = calls_total.get(size, 0) + n
            counters = (fam.network_evals, fam.network_calls)
            timer.recording = False
            if bare:
                bare_seconds, decode_seconds = bare_step(step)
                bare_times.append(bare_seconds)
                decode_times.append(decode_seconds)
            if method in SMPO_ROWS and settings.floor:
                # The floor, interleaved with the row's steps in this process (the machine's speed
                # drifts): a DPO step of the same batch, and one frozen call of each size.
                calls = dict(timer.nograd_calls)
                full = 2 * per_step
                calls[full] = calls.get(full, 0) - 1  # the reference call of the loss, as in DPO
                dpo_seconds, _ = timed_step(step, dpo_run)
                replay = {size: [frozen_call(size) for _ in range(n)] for size, n in calls.items() if n > 0}
                full_price = frozen_call(full)
                for size, values in replay.items():
                    call_times.setdefault(size, []).extend(values)
                dpo_times.append(dpo_seconds)
                floors.append(dpo_seconds + sum(sum(values) for values in replay.values()))
                extra_evals = sum(size * n for size, n in calls.items())
                full_batch_floors.append(dpo_seconds + extra_evals * full_price / full)
            timer.recording = True
            fam.network_evals, fam.network_calls = counters
    finally:
        timer.remove()
    pairs = steps * per_step
    peak, kind = _peak(device)
    timers = timer.timers
    inside = timers.unet_forward + timers.backward + timers.optimizer
    bare_ratios = [a / b for a, b in zip(step_times, bare_times)]
    quartiles = statistics.quantiles(bare_ratios, n=4)[::2] if len(bare_ratios) > 1 else bare_ratios * 2
    decoded = [b + d for b, d in zip(bare_times, decode_times)] if source == "images" else []
    decoded_ratios = [a / b for a, b in zip(step_times, decoded)]
    decoded_quartiles = (statistics.quantiles(decoded_ratios, n=4)[::2] if len(decoded_ratios) > 1
                         else decoded_ratios * 2)
    row = Row(
        family=settings.family, preset=settings.preset, mode=mode, method=method, source=source,
        pairs_per_step=per_step, pairs=pairs, seconds_per_pair=statistics.median(step_times) / per_step,
        seconds_per_pair_mean=timers.total / pairs, unet_evals_per_pair=fam.network_evals / pairs,
        unet_calls_per_pair=fam.network_calls / pairs, peak_memory_gib=peak, memory_kind=kind,
        share_outside_unet=(timers.total - inside - timers.encode) / timers.total if timers.total else 0.0,
        last_loss=last_loss, objective=asdict(config.objective),
        timers={k: v / pairs for k, v in asdict(timers).items()},
        floor_seconds_per_pair=statistics.median(floors) / per_step if floors else float("nan"),
        full_batch_floor_seconds_per_pair=(statistics.median(full_batch_floors) / per_step
                                           if full_batch_floors else float("nan")),
        nograd_calls=calls_total,
        frozen_call_seconds={size: statistics.median(v) for size, v in sorted(call_times.items())},
        floor_ratio=_ratio(step_times, floors), full_batch_floor_ratio=_ratio(step_times, full_batch_floors),
        dpo_ratio=_ratio(step_times, dpo_times),
        bare_seconds_per_pair=statistics.median(bare_times) / per_step if bare_times else float("nan"),
        bare_ratio=_ratio(step_times, bare_times), bare_ratio_quartiles=quartiles,
        bare_decoded_ratio=_ratio(step_times, decoded), bare_decoded_ratio_quartiles=decoded_quartiles,
    )
    return row


# --------------------------------------------------------------------------------------------
# Driver


def _rows_to_run(args: argparse.Namespace, family: str) -> list[tuple[str, str, str]]:
    methods, modes = _split(args.methods, METHODS, "--methods"), _split(args.modes, MODES, "--modes")
    sources = _split(args.sources, SOURCES, "--sources")
    rows = [(method, mode, source) for mode in MODES if mode in modes for method in methods for source in SOURCES
            if source in sources and (family not in FLOW or method in FLOW_ROWS)
            and not (method == "authors-recipe" and (mode != "full" or source != "images"))
            and not (method.endswith("-cached") and source != "cache")]
    if "authors-recipe" in methods and ("full" not in modes or "images" not in sources):
        print("note: authors-recipe runs in full mode from images only; add --modes full --sources images",
              file=sys.stderr)
    return rows


def _split(value: str, allowed: tuple[str, ...], option: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in items if v not in allowed]
    if unknown:
        raise SystemExit(f"{option}: unknown {', '.join(unknown)}; choose from {', '.join(allowed)}")
    return items


def _settings(args: argparse.Namespace, family: str) -> Settings:
    return Settings(preset=args.preset, family=family, device=args.device, dtype=args.dtype,
                    gradient_checkpointing=args.gradient_checkpointing, steps=args.steps, warmup=args.warmup,
                    pairs_per_step=args.pairs_per_step, lora_rank=args.lora_rank, optimizer=args.optimizer,
                    seed=args.seed, floor=not args.no_floor, resolution=args.resolution, clock=args.clock,
                    data_workers=args.data_workers)


def _run_isolated(args: argparse.Namespace, family: str, method: str, mode: str, source: str) -> dict[str, Any]:
    """Run one row in a fresh process (its peak RSS is the row's alone)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--preset", args.preset, "--families", family,
                   "--device", args.device, "--dtype", args.dtype, "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--pairs-per-step", str(args.pairs_per_step),
                   "--lora-rank", str(args.lora_rank), "--optimizer", args.optimizer, "--seed", str(args.seed),
                   "--methods", method, "--modes", mode, "--sources", source, "--no-isolate", "--row-out", str(out)]
        if args.resolution:
            command += ["--resolution", str(args.resolution)]
        command += ["--clock", args.clock]
        if args.data_workers is not None:
            command += ["--data-workers", str(args.data_workers)]
        if args.threads:
            command += ["--threads", str(args.threads)]
        if args.gradient_checkpointing:
            command.append("--gradient-checkpointing")
        if args.no_floor:
            command.append("--no-floor")
        done = subprocess.run(command, check=False)
        if done.returncode != 0 or not out.exists():
            return {"family": family, "method": method, "mode": mode, "source": source,
                    "error": f"exit status {done.returncode}"}
        return json.loads(out.read_text())


def _row_data(args: argparse.Namespace, family: str, folder: Path) -> RowData:
    """The datasets (and caches) of ``family``'s rows: 4 steps' pairs, so the epochs wrap."""
    return RowData(folder / family, 4 * args.pairs_per_step, args.seed)


def environment(args: argparse.Namespace) -> dict[str, Any]:
    import diffusers
    import transformers

    info = {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "machine": platform.machine(),
            "cpu_threads": torch.get_num_threads(), "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}
    if args.device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


def markdown(results: dict[str, Any]) -> str:
    env, rows = results["environment"], [r for r in results["rows"] if "error" not in r]
    lines = [f"# Training-step benchmark: preset `{results['preset']}` on {env.get('gpu') or env.get('cpu')}", "",
             f"Command: `{env['command']}`", "",
             f"torch {env['torch']}, diffusers {env['diffusers']}, transformers {env['transformers']}; "
             f"dtype {results['dtype']}, gradient checkpointing {results['gradient_checkpointing']}, "
             f"optimizer {results['optimizer']}, {results['steps']} timed steps after {results['warmup']} warm-up, "
             f"{results.get('clock', 'wall')} clock, data workers "
             f"{'default' if results.get('data_workers') is None else results['data_workers']}.", "",
             "| family | mode | method | source | pairs/step | s/pair (median step) | s/pair (mean) | UNet evals/pair | "
             "peak memory (GiB) | time outside UNet+optimizer | bare s/pair | x bare (quartiles) | "
             "x bare + decoding (quartiles) | floor s/pair | x floor | x full-batch floor | x DPO (same process) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        bare = (f"| {r['bare_seconds_per_pair']:.4f} | {r['bare_ratio']:.3f}x ({r['bare_ratio_quartiles'][0]:.3f}-"
                f"{r['bare_ratio_quartiles'][1]:.3f}) " if math.isfinite(r["bare_ratio"]) else "| | ")
        dq = r.get("bare_decoded_ratio_quartiles") or []
        bare += (f"| {r['bare_decoded_ratio']:.3f}x ({dq[0]:.3f}-{dq[1]:.3f}) "
                 if math.isfinite(r.get("bare_decoded_ratio", float("nan"))) else "| ")
        floor = (f"| {r['floor_seconds_per_pair']:.4f} | {r['floor_ratio']:.2f}x | {r['full_batch_floor_ratio']:.2f}x | "
                 f"{r['dpo_ratio']:.2f}x |" if math.isfinite(r["floor_seconds_per_pair"]) else "| | | | |")
        lines.append(f"| {r['family']} | {r['mode']} | {r['method']} | {r['source']} | {r['pairs_per_step']} "
                     f"| {r['seconds_per_pair']:.4f} | {r['seconds_per_pair_mean']:.4f} | {r['unet_evals_per_pair']:.1f} "
                     f"| {r['peak_memory_gib']:.2f} | {100 * r['share_outside_unet']:.1f}% {bare}{floor}")
    for r in results["rows"]:
        if "error" in r:
            lines.append(f"| {r['family']} | {r['mode']} | {r['method']} | {r['source']} | failed: {r['error']} "
                         "| | | | | | | | | | | | |")
    lines += ["", "Memory: " + ("CUDA max_memory_allocated per row." if rows and rows[0]["memory_kind"].startswith("cuda")
                                else "peak RSS of a fresh process per row (includes building the model and its cache)."),
              "Every row is a `smpo train` run (`prepare_training`, `train_step`) reading a `smpo cache` folder or "
              "images. Seconds per pair: the median step time (robust to a shared machine's stalls) over the "
              "pairs of a step; the mean is beside it. UNet evals count forward sample-evaluations (a call on 4 "
              "latents counts 4); KTO's pair is its two images. 'Time outside' is the share of the step spent "
              "neither in network forward calls, the backward pass (with the loss and clipping), the optimizer "
              "step nor the VAE/text encoding.",
              "Bare (SD1.5 rows): the DPO step's arithmetic written plainly in the benchmark (one policy and one "
              "reference call on the 2B latents, the loss, backward, clipping, AdamW), plus the VAE and text-encoder "
              "calls for rows from images, of the row's batch size, run right after each timed step in the same "
              "process; 'x bare' is the median over steps of each step's time over the bare step's, with the first "
              "and third quartiles of those ratios. 'x bare + decoding' (rows from images) adds to the bare step "
              "a plain decoding of the row's JPEG bytes (PIL decode, bilinear resize, tensor: `bare_decode`).",
              "Floor (SmPO rows), measured in the row's own process, interleaved with its steps (a shared "
              "machine's speed drifts): after each timed step, a DPO step of the same batch "
              "size, plus the step's no-grad UNet calls (inversion; the samples leave it at their own t, so later "
              "calls are smaller), less the reference call DPO also makes, replayed as calls of the frozen network "
              "(reference copy in full mode, adapters-off view in LoRA mode) of the same sizes; the median over "
              "steps. 'x floor' is the median over steps of each step's time over the floor measured right after it; "
              "'x DPO (same process)' likewise over the DPO step run right after it. The ratios in the list below "
              "compare rows run in different processes (at different moments of a shared machine). 'x full-batch "
              "floor' prices the extra evaluations at the full batch's per-sample cost instead (a bound a "
              "per-sample-t inversion cannot reach where small calls cost more per sample).",
              ""]
    lines += _ratios(rows)
    return "\n".join(lines) + "\n"


def _ratios(rows: list[dict[str, Any]]) -> list[str]:
    by = {(r["family"], r["mode"], r["method"], r["source"]): r["seconds_per_pair"] for r in rows}
    out = ["Ratios (median step times):", ""]
    for (family, mode, method, source), seconds in sorted(by.items()):
        if method in SMPO_ROWS and (family, mode, "dpo", source) in by:
            out.append(f"- {family} {mode} from {source}: {method} / dpo time per pair = "
                       f"{seconds / by[family, mode, 'dpo', source]:.2f}x")
        if method in SMPO_ROWS and (family, "full", "authors-recipe", "images") in by:
            out.append(f"- {family} {mode} from {source}: authors-recipe / {method} time per pair = "
                       f"{by[family, 'full', 'authors-recipe', 'images'] / seconds:.2f}x")
    return out if len(out) > 2 else []


def write_results(path: Path, results: dict[str, Any]) -> None:
    write_json(path, results)
    with atomic_path(path.with_suffix(".md")) as tmp:
        tmp.write_text(markdown(results))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", choices=list(PRESET_FAMILIES), help="architecture preset")
    parser.add_argument("--families", default=None, help="comma list of sd15,sdxl,sd3,flux (default: the preset's; tiny: all four)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", help="fp32, fp16 or bf16 (mixed precision; the reference in it)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma list from {', '.join(METHODS)}")
    parser.add_argument("--modes", default="full,lora", help="comma list from full, lora")
    parser.add_argument("--sources", default="cache,images", help="comma list from cache, images (what the rows read)")
    parser.add_argument("--resolution", type=int, default=None, help="training resolution in pixels (default the preset's)")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps per row (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--pairs-per-step", type=int, default=4, help="pairs per step of our rows (default 4)")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--optimizer", default="auto", choices=["auto", "adamw", "adafactor", "adamw8bit"],
                        help="optim.optimizer of the rows; auto: AdamW, Adafactor for SDXL")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clock", default="wall", choices=list(CLOCKS),
                        help="wall (default) or cpu: this process's CPU time, for a shared CPU machine with --threads 1")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--data-workers", type=int, default=None,
                        help="data.num_workers of the rows (default the training default: 2 with a GPU, 0 on the CPU)")
    parser.add_argument("--no-floor", action="store_true",
                        help="skip the SmPO rows' floor (a DPO step and a replay of the inversion after each step) "
                             "and the bare DPO step after each step")
    parser.add_argument("--out", default=None, help="results JSON (the .md table beside it); default results/<device>-<preset>.json")
    isolate = parser.add_mutually_exclusive_group()
    isolate.add_argument("--isolate", dest="isolate", action="store_true", default=None,
                         help="one process per row (default on the CPU, for per-row peak RSS)")
    isolate.add_argument("--no-isolate", dest="isolate", action="store_false")
    parser.add_argument("--row-out", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    families = _split(args.families, PRESET_FAMILIES["tiny"], "--families") if args.families else PRESET_FAMILIES[args.preset]
    isolate = args.isolate if args.isolate is not None else args.device == "cpu"
    if args.row_out:  # a child of --isolate: one family, one row
        family = families[0]
        (method, mode, source), = _rows_to_run(args, family)
        with tempfile.TemporaryDirectory() as tmp:
            row = run_row(_settings(args, family), method, mode, source, _row_data(args, family, Path(tmp)))
        Path(args.row_out).write_text(json.dumps(asdict(row)))
        return 0
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"{args.device.split(':')[0]}-{args.preset}.json")
    results: dict[str, Any] = {"preset": args.preset, "dtype": args.dtype, "steps": args.steps, "warmup": args.warmup,
                               "clock": args.clock, "data_workers": args.data_workers,
                               "gradient_checkpointing": args.gradient_checkpointing, "optimizer": args.optimizer,
                               "environment": environment(args), "rows": []}
    for family in families:
        with tempfile.TemporaryDirectory() as tmp:
            data = None if isolate else _row_data(args, family, Path(tmp))
            for method, mode, source in _rows_to_run(args, family):
                print(f"[bench] {args.preset}/{family} {mode} {method} from {source} ...", file=sys.stderr, flush=True)
                if isolate:
                    row = _run_isolated(args, family, method, mode, source)
                else:
                    try:
                        row = asdict(run_row(_settings(args, family), method, mode, source, data))  # type: ignore[arg-type]
                    except Exception as error:  # keep the other rows; name the failure in the table
                        row = {"family": family, "method": method, "mode": mode, "source": source,
                               "error": f"{type(error).__name__}: {error}"}
                        if args.device.startswith("cuda"):
                            torch.cuda.empty_cache()
                gc.collect()  # the finished row's model
                if args.device.startswith("cuda"):
                    torch.cuda.empty_cache()
                results["rows"].append(row)
                write_results(out, results)
                summary = {k: row[k] for k in ("seconds_per_pair", "bare_ratio", "unet_evals_per_pair",
                                               "peak_memory_gib") if k in row}
                print(f"[bench]   {summary or row.get('error')}", file=sys.stderr, flush=True)
        gc.collect()
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
