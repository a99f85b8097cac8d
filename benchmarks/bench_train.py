"""Training-step benchmark: seconds per pair, UNet evaluations per pair and peak memory per method.

A script, not a test. For one architecture preset (``tiny``, ``sd15``, ``sdxl``: diffusers models
built from their configs with random weights, no download) it times an optimizer step of every
method, full fine-tuning and LoRA, and writes the results as JSON plus a markdown table, row by
row (a crash keeps the finished rows).

Rows:

- ``smpo``: our SmPO with the authors' inversion settings (their grid, ``land_on_t=False``, one
  renoise iteration, 5 grid steps for SD1.5 and 10 for SDXL), inverting with the policy.
- ``smpo-land-on-t``: the same with the inversion ending exactly at ``t`` (the paper's Eq. 13).
- ``smpo-cached``, ``smpo-land-on-t-cached``: the same two with the reference inverting and its
  inversion read from the cache (``smpo cache --store-inversion``, ``data.cached_inversion``): the
  stored levels are computed before each step, untimed, as the cache would hold them.
- ``dpo``, ``kto``, ``mapo``, ``sft``: the baselines (forward noising). KTO's pair is its two images.
- ``authors-recipe`` (full mode only): what the authors' script does each step: one pair, the VAE
  and the text encoder run every step, two full UNets (trainable policy + separate frozen
  reference), inversion by the policy on their grid with one renoise iteration.

Our rows read latents and text conditioning as ``smpo cache`` stores them (random tensors of the
right shapes: loading them is not timed), take ``--pairs-per-step`` pairs per step, and use the
adapters-off view of the same UNet as the LoRA reference. The authors' row runs the same number of
pairs, one per step, with the same per-pair seeds (so the same timesteps).

Memory: ``torch.cuda.max_memory_allocated`` on GPU (reset per row); on the CPU the peak resident
set size of a fresh process per row (``--isolate``, the default there), which includes building
the model.

Examples::

    python benchmarks/bench_train.py --preset tiny --device cpu --out benchmarks/results/cpu-tiny.json
    python benchmarks/bench_train.py --preset sd15 --device cuda --dtype fp16 --gradient-checkpointing \\
        --out benchmarks/results/h100-sd15.json
"""

from __future__ import annotations

import argparse
import copy
import gc
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

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:  # run from a checkout without installing smpo
    sys.path.insert(0, str(ROOT / "src"))

from smpo.io import atomic_path, resolve_dtype, write_json  # noqa: E402
from smpo.models import (  # noqa: E402
    Conditioning,
    FamilyAdapter,
    add_lora,
    has_lora,
    lora_parameters,
    make_adapter,
    reference_view,  # noqa: E402
)
from smpo.objective import ObjectiveConfig, PairBatch, compute_loss  # noqa: E402

METHODS = ("smpo", "smpo-land-on-t", "smpo-cached", "smpo-land-on-t-cached", "dpo", "kto", "mapo", "sft",
           "authors-recipe")
SMPO_ROWS = ("smpo", "smpo-land-on-t", "smpo-cached", "smpo-land-on-t-cached")
MODES = ("full", "lora")
AUTHORS_GRID = {"sd15": 5, "sdxl": 10, "sd3": 10, "flux": 10}  # the inversion grid per family (ALGORITHM.md
# section 6; SD3/FLUX: their recipes' 10-step Euler grid)
PRESET_FAMILIES = {"tiny": ("sd15", "sdxl", "sd3", "flux"), "sd15": ("sd15",), "sdxl": ("sdxl",)}
FLOW = ("sd3", "flux")
FLOW_ROWS = ("smpo", "dpo", "kto", "mapo", "sft")
"""Rows of the flow families: their inversion always lands on s (no land-on-t variant), the cached
inversion is DDIM-only, and no authors' script exists for them."""
PROMPT = "a photograph of an astronaut riding a horse on the moon"


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
    floor: bool = True  # measure the SmPO rows' floor between their steps


@dataclass
class Timers:
    total: float = 0.0
    unet_forward: float = 0.0
    backward: float = 0.0
    optimizer: float = 0.0
    encode: float = 0.0


@dataclass
class Row:
    family: str
    preset: str
    mode: str
    method: str
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
    nograd_calls: dict[int, int] = field(default_factory=dict)
    """The timed steps' no-grad UNet calls (inversion and reference), counted by batch size."""
    frozen_call_seconds: dict[int, float] = field(default_factory=dict)
    """Median seconds of one no-grad call of the frozen network (reference copy in full mode, the
    adapters-off view in LoRA mode) at each batch size, measured between the row's steps."""


# --------------------------------------------------------------------------------------------
# Setup


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_family(family: str, preset: str, device: torch.device, seed: int) -> FamilyAdapter:
    """The preset pipeline built directly on ``device`` (random init there is fast), as an adapter."""
    from smpo.models.presets import build_pipeline

    with torch.device(device):
        pipe = build_pipeline(family, preset, seed=seed)  # type: ignore[arg-type]
    suffixes = {"sd15": ("",), "sdxl": ("", "_2"), "sd3": ("", "_2", "_3"), "flux": ("", "_2")}[family]
    encoders = [getattr(pipe, f"text_encoder{k}") for k in suffixes]
    tokenizers = [getattr(pipe, f"tokenizer{k}") for k in suffixes]
    network = pipe.transformer if family in FLOW else pipe.unet
    for module in [network, pipe.vae, *encoders]:
        module.requires_grad_(False)
    adapter = make_adapter(family, unet=network, vae=pipe.vae, text_encoders=encoders, tokenizers=tokenizers,
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


def _optimizer(name: str, params: list[torch.nn.Parameter], family: str) -> torch.optim.Optimizer:
    if name == "auto":
        name = "adafactor" if family == "sdxl" else "adamw"
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-8)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=1e-8, scale_parameter=False, relative_step=False, warmup_init=False)
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-8)
    raise ValueError(f"unknown optimizer {name!r}; choose from auto, adamw, adafactor, sgd")


def _prepare_networks(fam: FamilyAdapter, mode: str, dtype: torch.dtype, checkpointing: bool,
                      lora_rank: int) -> tuple[Any, Any]:
    """The policy and reference of a row. Full: the fp32 UNet trains, a ``dtype`` copy is the reference.
    LoRA: the UNet in ``dtype`` with fp32 adapters; the reference is its adapters-off view."""
    unet = fam.unet
    if mode == "full":
        if has_lora(unet):
            raise RuntimeError("full-mode rows must run before LoRA rows (the UNet already has adapters)")
        unet.to(torch.float32).requires_grad_(True)
        reference = copy.deepcopy(unet).to(dtype).requires_grad_(False)
    else:
        if not has_lora(unet):
            unet.requires_grad_(False)
            if unet.dtype != dtype:
                unet.to(dtype)
            add_lora(unet, rank=lora_rank)
        reference = reference_view(unet)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    return unet, reference


def _cached_batch(shape: tuple[int, int], cond: Conditioning, seeds: list[int], device: torch.device,
                  generator: torch.Generator) -> PairBatch:
    """A batch as read from ``smpo cache``: fp16 latents and conditioning, moved to the device."""
    (c, s), n = shape, len(seeds)
    latents = torch.randn(2, n, c, s, s, generator=generator).half().to(device)
    return PairBatch(latents_w=latents[0].float(), latents_l=latents[1].float(),
                     cond=cond.index([0] * n).to(device), p_win=torch.full((n,), 0.65, device=device), seeds=seeds)


def _authors_batch(fam: FamilyAdapter, seed: int, device: torch.device, generator: torch.Generator,
                   timers: Timers) -> PairBatch:
    """One pair encoded from pixels and text at this step, as the authors' script does."""
    _sync(device)
    start = time.perf_counter()
    r = fam.resolution
    pixels = torch.rand(2, 3, r, r, generator=generator).mul(2).sub(1).to(device)
    latents = fam.encode_images(pixels, sample=True)
    cond = fam.encode_prompts([PROMPT])
    _sync(device)
    timers.encode += time.perf_counter() - start
    return PairBatch(latents_w=latents[:1], latents_l=latents[1:], cond=cond,
                     p_win=torch.full((1,), 0.65, device=device), seeds=[seed])


def _store_inversion(fam: FamilyAdapter, reference: Any, batch: PairBatch, cfg: ObjectiveConfig) -> None:
    """Attach the reference's inversion at the grid levels as ``smpo cache --store-inversion``
    computes and stores it (``smpo.data.cache.invert_images``, fp16)."""
    from smpo.data.cache import InversionSpec, invert_images

    spec = InversionSpec(unet="the row's reference", steps=cfg.inversion_steps, renoise_iters=cfg.effective_renoise_iters,
                         land_on_t=cfg.land_on_t, guidance=cfg.inversion_guidance)
    batch.inverted_w, batch.inverted_l = (
        invert_images(fam, x0, batch.cond, spec, x0.shape[0], network=reference).half().float().to(x0.device)
        for x0 in (batch.latents_w, batch.latents_l))


def run_row(fam: FamilyAdapter, settings: Settings, method: str, mode: str, *, free_encoders: bool = False) -> Row:
    """Time one (method, mode) row. ``free_encoders``: drop the VAE and text encoders for rows that
    read the cache (a one-row process measuring its peak RSS)."""
    device = torch.device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    authors = method == "authors-recipe"
    cfg = objective_for(method, settings.family)
    text_modules = [fam.vae, *fam.text_encoders]
    for module in text_modules:  # our rows read the cache: the VAE and text encoders stay off the device
        module.to(device if authors else "cpu")
    cond = fam.encode_prompts([PROMPT]) if not authors else None
    latent_shape = (fam.latent_channels, fam.latent_size)
    if not authors and free_encoders:
        # (a flow adapter reads its VAE's config for the latent size and FLUX's packing: keep that)
        fam.vae, fam.text_encoders = (fam.vae if settings.family in FLOW else None), []
        del text_modules
        gc.collect()
    policy, reference = _prepare_networks(fam, mode, dtype, settings.gradient_checkpointing, settings.lora_rank)
    params = [p for p in policy.parameters() if p.requires_grad] if mode == "full" else lora_parameters(policy)
    optimizer = _optimizer(settings.optimizer, params, settings.family)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    timers = Timers()

    original_unet_output = fam.unet_output
    original_velocity = getattr(fam, "velocity", None)  # flow families invert through it (float levels)
    nograd_calls: dict[int, int] = {}  # the step's no-grad UNet calls by batch size
    recording = [True]
    inside = [False]  # within a timed call (a flow family's unet_output calls its velocity: count once)

    def timed(call: Any) -> Any:
        """``call`` (the adapter's unet_output or velocity) timed and counted while recording."""
        def wrapper(network: Any, x: torch.Tensor, level: torch.Tensor, c: Conditioning) -> torch.Tensor:
            if not recording[0] or inside[0]:
                return call(network, x, level, c)
            if not torch.is_grad_enabled():
                nograd_calls[x.shape[0]] = nograd_calls.get(x.shape[0], 0) + 1
            _sync(device)
            start = time.perf_counter()
            inside[0] = True
            try:
                out = call(network, x, level, c)
            finally:
                inside[0] = False
            _sync(device)
            timers.unet_forward += time.perf_counter() - start
            return out

        return wrapper

    fam.unet_output = timed(original_unet_output)  # type: ignore[method-assign]
    if original_velocity is not None:
        fam.velocity = timed(original_velocity)  # type: ignore[attr-defined]
    per_step = 1 if authors else settings.pairs_per_step
    steps = settings.steps * settings.pairs_per_step // per_step
    warmup = max(settings.warmup * settings.pairs_per_step // per_step, settings.warmup)
    generator = torch.Generator().manual_seed(settings.seed)

    def one_step(step: int, objective: ObjectiveConfig) -> tuple[float, float]:
        """One optimizer step of ``objective``; (seconds, loss)."""
        nonlocal timers
        _sync(device)
        start = time.perf_counter()
        seeds = [settings.seed + step * per_step + i for i in range(per_step)]
        if authors:
            batch = _authors_batch(fam, seeds[0], device, generator, timers)
        else:
            batch = _cached_batch(latent_shape, cond, seeds, device, generator)  # type: ignore[arg-type]
            if objective is cfg and method.endswith("-cached"):  # made by `smpo cache`, not by the step
                mark, counters, was_recording = time.perf_counter(), (fam.unet_evals, fam.unet_calls), recording[0]
                recording[0] = False
                with autocast:
                    _store_inversion(fam, reference, batch, cfg.resolved())
                recording[0] = was_recording
                fam.unet_evals, fam.unet_calls = counters
                start += time.perf_counter() - mark
        with autocast:
            out = compute_loss(fam, policy, reference, batch, objective)
        _sync(device)
        mark = time.perf_counter()
        out.loss.backward()
        _sync(device)
        backward = time.perf_counter() - mark
        mark = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        if recording[0]:
            timers.backward += backward
            timers.optimizer += time.perf_counter() - mark
            timers.total += time.perf_counter() - start
        return time.perf_counter() - start, float(out.loss.detach())

    def frozen_call(size: int) -> float:
        """Seconds of one no-grad call of the frozen network on ``size`` latents."""
        g = torch.Generator().manual_seed(size)
        x = torch.randn(size, latent_shape[0], latent_shape[1], latent_shape[1], generator=g).to(device)
        t = torch.randint(0, fam.num_timesteps, (size,), generator=g).to(device)
        c = cond.index([0] * size).to(device)  # type: ignore[union-attr]
        with torch.no_grad(), autocast:
            _sync(device)
            start = time.perf_counter()
            original_unet_output(reference, x, t, c)
            _sync(device)
        return time.perf_counter() - start

    last_loss = float("nan")
    step_times: list[float] = []
    floors: list[float] = []
    full_batch_floors: list[float] = []
    dpo_times: list[float] = []
    call_times: dict[int, list[float]] = {}
    calls_total: dict[int, int] = {}
    dpo_cfg = ObjectiveConfig(method="dpo")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        for step in range(warmup + steps):
            if step == warmup:
                fam.reset_counters()
                timers = Timers()
                calls_total.clear()
            nograd_calls.clear()
            seconds, last_loss = one_step(step, cfg)
            if step < warmup:
                continue
            step_times.append(seconds)
            for size, n in nograd_calls.items():
                calls_total[size] = calls_total.get(size, 0) + n
            if method in SMPO_ROWS and settings.floor:
                # The floor, interleaved with the row's steps in this process (the machine's speed
                # drifts): a DPO step of the same batch size, and one frozen call of each size.
                calls, counters = dict(nograd_calls), (fam.unet_evals, fam.unet_calls)
                full = 2 * per_step
                calls[full] = calls.get(full, 0) - 1  # the reference call of the loss, as in DPO
                recording[0] = False
                dpo_seconds, _ = one_step(step, dpo_cfg)
                replay = {size: [frozen_call(size) for _ in range(n)] for size, n in calls.items() if n > 0}
                full_price = frozen_call(full)
                recording[0] = True
                fam.unet_evals, fam.unet_calls = counters
                for size, values in replay.items():
                    call_times.setdefault(size, []).extend(values)
                dpo_times.append(dpo_seconds)
                floors.append(dpo_seconds + sum(sum(values) for values in replay.values()))
                extra_evals = sum(size * n for size, n in calls.items())
                full_batch_floors.append(dpo_seconds + extra_evals * full_price / full)
    finally:
        fam.unet_output = original_unet_output  # type: ignore[method-assign]
        if original_velocity is not None:
            del fam.velocity  # the class's method again
    pairs = steps * per_step
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device) / 2**30, "cuda_max_allocated"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "peak_rss_process"
    inside = timers.unet_forward + timers.backward + timers.optimizer
    call_seconds = {size: statistics.median(v) for size, v in sorted(call_times.items())}
    row = Row(
        family=settings.family, preset=settings.preset, mode=mode, method=method, pairs_per_step=per_step,
        pairs=pairs, seconds_per_pair=statistics.median(step_times) / per_step,
        seconds_per_pair_mean=timers.total / pairs, unet_evals_per_pair=fam.unet_evals / pairs,
        unet_calls_per_pair=fam.unet_calls / pairs, peak_memory_gib=peak, memory_kind=kind,
        share_outside_unet=(timers.total - inside - timers.encode) / timers.total if timers.total else 0.0,
        last_loss=last_loss, objective=asdict(cfg.resolved()),
        timers={k: v / pairs for k, v in asdict(timers).items()},
        floor_seconds_per_pair=statistics.median(floors) / per_step if floors else float("nan"),
        full_batch_floor_seconds_per_pair=(statistics.median(full_batch_floors) / per_step
                                           if full_batch_floors else float("nan")),
        nograd_calls=calls_total, frozen_call_seconds=call_seconds,
        floor_ratio=statistics.median(a / b for a, b in zip(step_times, floors)) if floors else float("nan"),
        full_batch_floor_ratio=(statistics.median(a / b for a, b in zip(step_times, full_batch_floors))
                                if full_batch_floors else float("nan")),
        dpo_ratio=statistics.median(a / b for a, b in zip(step_times, dpo_times)) if dpo_times else float("nan"),
    )
    optimizer.state.clear()  # free the optimizer state before the next row (the closures keep the names)
    params.clear()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


# --------------------------------------------------------------------------------------------
# Driver


def _rows_to_run(args: argparse.Namespace, family: str) -> list[tuple[str, str]]:
    methods, modes = _split(args.methods, METHODS, "--methods"), _split(args.modes, MODES, "--modes")
    rows = [(method, mode) for mode in MODES if mode in modes for method in methods
            if not (method == "authors-recipe" and mode != "full") and (family not in FLOW or method in FLOW_ROWS)]
    if "authors-recipe" in methods and "full" not in modes:
        print("note: authors-recipe runs in full mode only (two full UNets); add --modes full", file=sys.stderr)
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
                    seed=args.seed, floor=not args.no_floor)


def _run_isolated(args: argparse.Namespace, family: str, method: str, mode: str) -> dict[str, Any]:
    """Run one row in a fresh process (its peak RSS is the row's alone)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--preset", args.preset, "--families", family,
                   "--device", args.device, "--dtype", args.dtype, "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--pairs-per-step", str(args.pairs_per_step),
                   "--lora-rank", str(args.lora_rank), "--optimizer", args.optimizer, "--seed", str(args.seed),
                   "--methods", method, "--modes", mode, "--no-isolate", "--row-out", str(out)]
        if args.threads:
            command += ["--threads", str(args.threads)]
        if args.gradient_checkpointing:
            command.append("--gradient-checkpointing")
        if args.no_floor:
            command.append("--no-floor")
        done = subprocess.run(command, check=False)
        if done.returncode != 0 or not out.exists():
            return {"family": family, "method": method, "mode": mode, "error": f"exit status {done.returncode}"}
        return json.loads(out.read_text())


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
             f"optimizer {results['optimizer']}, {results['steps']} timed steps after {results['warmup']} warm-up.", "",
             "| family | mode | method | pairs/step | s/pair (median step) | s/pair (mean) | UNet evals/pair | "
             "peak memory (GiB) | time outside UNet+optimizer | floor s/pair | x floor | x full-batch floor | "
             "x DPO (same process) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    floors = floor_of(rows)
    for r in rows:
        floor = floors.get((r["family"], r["mode"], r["method"]))
        tail = (f"| {floor:.4f} | {r['floor_ratio']:.2f}x | {r['full_batch_floor_ratio']:.2f}x | "
                f"{r['dpo_ratio']:.2f}x |" if floor else "| | | | |")
        lines.append(f"| {r['family']} | {r['mode']} | {r['method']} | {r['pairs_per_step']} | {r['seconds_per_pair']:.4f} "
                     f"| {r['seconds_per_pair_mean']:.4f} | {r['unet_evals_per_pair']:.1f} | {r['peak_memory_gib']:.2f} "
                     f"| {100 * r['share_outside_unet']:.1f}% {tail}")
    for r in results["rows"]:
        if "error" in r:
            lines.append(f"| {r['family']} | {r['mode']} | {r['method']} | failed: {r['error']} | | | | | | | | | |")
    lines += ["", "Memory: " + ("CUDA max_memory_allocated per row." if rows and rows[0]["memory_kind"].startswith("cuda")
                                else "peak RSS of a fresh process per row (includes building the model)."),
              "Seconds per pair: the median step time (robust to a shared machine's stalls) over the "
              "pairs of a step; the mean is beside it. UNet evals count forward sample-evaluations (a call on 4 latents counts 4); KTO's pair is its two "
              "images. 'Time outside' is the share of the step spent neither in UNet forward calls, the backward "
              "pass, the optimizer step nor (authors-recipe) the VAE/text encoding.",
              "Floor (SmPO rows), measured in the row's own process, interleaved with its steps (a shared "
              "machine's speed drifts between processes): after each timed step, a DPO step of the same batch "
              "size, plus the step's no-grad UNet calls (inversion; the samples leave it at their own t, so later "
              "calls are smaller), less the reference call DPO also makes, replayed as calls of the frozen network "
              "(reference copy in full mode, adapters-off view in LoRA mode) of the same sizes; the median over "
              "steps. 'x floor' is the median over steps of each step's time over the floor measured right after it; "
              "'x DPO (same process)' likewise over the DPO step run right after it. The ratios in the list below "
              "compare rows run in different processes (at different moments of a shared machine). 'x full-batch floor' prices the extra evaluations at the full batch's per-sample cost "
              "instead (a bound a per-sample-t inversion cannot reach where small calls cost more per sample).",
              ""]
    lines += _ratios(rows)
    return "\n".join(lines) + "\n"


def floor_of(rows: list[dict[str, Any]]) -> dict[tuple[str, str, str], float]:
    """Each SmPO row's floor in seconds per pair (``Row.floor_seconds_per_pair``), by (family, mode, method)."""
    return {(r["family"], r["mode"], r["method"]): r["floor_seconds_per_pair"] for r in rows
            if r["method"] in SMPO_ROWS and math.isfinite(r.get("floor_seconds_per_pair", float("nan")))}


def _ratios(rows: list[dict[str, Any]]) -> list[str]:
    by = {(r["family"], r["mode"], r["method"]): r["seconds_per_pair"] for r in rows}
    out = ["Ratios (median step times):", ""]
    for (family, mode, method), seconds in sorted(by.items()):
        if method in SMPO_ROWS and (family, mode, "dpo") in by:
            out.append(f"- {family} {mode}: {method} / dpo time per pair = {seconds / by[family, mode, 'dpo']:.2f}x")
        if method in SMPO_ROWS and (family, "full", "authors-recipe") in by:
            out.append(f"- {family} {mode}: authors-recipe / {method} time per pair = "
                       f"{by[family, 'full', 'authors-recipe'] / seconds:.2f}x")
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
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps per row (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--pairs-per-step", type=int, default=4, help="pairs per step of our rows (default 4)")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--optimizer", default="auto", help="auto (AdamW; Adafactor for SDXL), adamw, adafactor, sgd")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-floor", action="store_true",
                        help="skip the SmPO rows' floor (a DPO step and a replay of the inversion after each step)")
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
        (method, mode), = _rows_to_run(args, family)
        fam = build_family(family, args.preset, torch.device(args.device), args.seed)
        row = run_row(fam, _settings(args, family), method, mode, free_encoders=True)
        Path(args.row_out).write_text(json.dumps(asdict(row)))
        return 0
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"{args.device.split(':')[0]}-{args.preset}.json")
    results: dict[str, Any] = {"preset": args.preset, "dtype": args.dtype, "steps": args.steps, "warmup": args.warmup,
                               "gradient_checkpointing": args.gradient_checkpointing, "optimizer": args.optimizer,
                               "environment": environment(args), "rows": []}
    for family in families:
        fam = None if isolate else build_family(family, args.preset, torch.device(args.device), args.seed)
        for method, mode in _rows_to_run(args, family):
            print(f"[bench] {args.preset}/{family} {mode} {method} ...", file=sys.stderr, flush=True)
            if isolate:
                row = _run_isolated(args, family, method, mode)
            else:
                try:
                    row = asdict(run_row(fam, _settings(args, family), method, mode))  # type: ignore[arg-type]
                except Exception as error:  # keep the other rows; name the failure in the table
                    row = {"family": family, "method": method, "mode": mode, "error": f"{type(error).__name__}: {error}"}
                    if args.device.startswith("cuda"):
                        torch.cuda.empty_cache()
            results["rows"].append(row)
            write_results(out, results)
            summary = {k: row[k] for k in ("seconds_per_pair", "unet_evals_per_pair", "peak_memory_gib") if k in row}
            print(f"[bench]   {summary or row.get('error')}", file=sys.stderr, flush=True)
        del fam
        gc.collect()
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
