"""What a run's weights, gradients, optimizer state and reference need per process, before renting
machines (``smpo train --dry-run``; the arithmetic and a measured step are in docs/benchmarks.md).

Parameters are counted without loading a weight: each network is built from its ``config.json``
on the meta device (no memory, no download beyond the config files). Bytes per parameter, as
smpo keeps them on a GPU (``auto`` mixed precision: fp16, bf16 when sharded; both 2 bytes):

- full fine-tuning: the trained weights 4 (float32 masters), their gradient 4, the optimizer's
  state (AdamW 8, 8-bit AdamW 2, Adafactor about 0: its second moment is factored), the frozen
  reference in ``reference_dtype`` (2 in half precision, 4 in float32); SFT and MaPO have none;
- LoRA: the base weights in the half dtype 2, the adapters 4 + 4 + optimizer (as above);
- sharded over N processes (FSDP2) all of that is divided by N; SmPO's live inversion then
  gathers the inverting network whole, in the compute dtype (``smpo.models.sharded``);
- the frozen VAE and text encoders in the half dtype when training from images (from a cache
  they stay idle in host memory: 0 on the GPU).

Not counted: activations (they depend on resolution, batch and gradient checkpointing; the
measured SD1.5 step of docs/benchmarks.md shows their size), the one block being gathered, the
CUDA context and the allocator's slack.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GB = 1e9
OPTIMIZER_BYTES = {"adamw": 8.0, "adamw8bit": 2.0, "adafactor": 0.0}
"""Optimizer state per trained parameter, in bytes."""


@dataclass(frozen=True)
class ParameterCounts:
    """The parameters of a pipeline, counted from its config files."""

    network: int
    """The trained network (UNet or transformer)."""
    lora: int
    """LoRA adapters of the run's rank on the network's attention projections."""
    frozen: int
    """The VAE and text encoders."""


def _meta_count(cls: Any, config: dict[str, Any]) -> tuple[int, Any]:
    import torch

    with torch.device("meta"):
        module = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    return sum(p.numel() for p in module.parameters()), module


def lora_count(network: Any, rank: int) -> int:
    """Parameters that ``smpo.models.add_lora`` adds: ``rank x (in + out)`` per adapted linear layer."""
    import torch

    from smpo.models.lora import DEFAULT_TARGET_MODULES

    return sum(rank * (m.in_features + m.out_features) for name, m in network.named_modules()
               if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t)
                                                         for t in DEFAULT_TARGET_MODULES))


def count_parameters(pretrained: str, family: str, *, lora_rank: int, unet: str | None = None) -> ParameterCounts:
    """Count the parameters of ``pretrained`` (a pipeline folder or hub id) from its config files."""
    import diffusers
    import transformers

    from smpo.models import FAMILIES

    adapter = FAMILIES[family]
    network_cls = getattr(diffusers, adapter.network_class)
    source, subfolder = (unet, None) if unet else (pretrained, adapter.network_folder)
    try:
        config = network_cls.load_config(source, subfolder=subfolder)
    except OSError:  # a pipeline folder or hub id given as --unet
        config = network_cls.load_config(source, subfolder=adapter.network_folder)
    network, module = _meta_count(network_cls, config)
    frozen, _ = _meta_count(diffusers.AutoencoderKL, diffusers.AutoencoderKL.load_config(pretrained, subfolder="vae"))
    for folder, kind in adapter.text_encoder_classes:
        encoder_config = transformers.AutoConfig.from_pretrained(pretrained, subfolder=folder)
        frozen += _meta_count(getattr(transformers, kind), encoder_config)[0]
    return ParameterCounts(network=network, lora=lora_count(module, lora_rank), frozen=frozen)


@dataclass(frozen=True)
class Estimate:
    """Bytes per process, by what they hold."""

    weights: float
    gradients: float
    optimizer: float
    reference: float
    gathered: float
    encoders: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.reference + self.gathered + self.encoders


def estimate(counts: ParameterCounts, *, finetune: str, optimizer: str, processes: int, sharded: bool,
             reference_bytes: float, compute_bytes: float, needs_reference: bool, gathers_inverter: bool,
             from_cache: bool, half_bytes: float = 2.0) -> Estimate:
    """Bytes per process (module docstring); ``reference_bytes`` / ``compute_bytes`` per parameter."""
    sharded = sharded and processes > 1  # one process holds everything anyway
    n = processes if sharded else 1
    P, L = counts.network, counts.lora
    per_trained = OPTIMIZER_BYTES[optimizer]
    if finetune == "lora":
        weights, trained, reference = half_bytes * P + 4 * L, L, 0.0
    else:
        weights, trained = 4.0 * P, P
        reference = reference_bytes * P if needs_reference else 0.0
    gathered = compute_bytes * P if sharded and gathers_inverter else 0.0
    return Estimate(weights=weights / n, gradients=4.0 * trained / n, optimizer=per_trained * trained / n,
                    reference=reference / n, gathered=gathered,
                    encoders=0.0 if from_cache else half_bytes * counts.frozen)


def dry_run_report(config: Any) -> str:
    """The estimate for ``config`` (a resolved ``TrainConfig``) at 1, 8 and 64 processes, as text."""
    from smpo.models import detect_family
    from smpo.processes import launched_processes
    from smpo.train.sharding import sharding_enabled

    m, o = config.model, config.objective
    family = m.family if m.family != "auto" else detect_family(m.pretrained)
    counts = count_parameters(m.pretrained, family, lora_rank=m.lora_rank, unet=m.unet)
    sharded = sharding_enabled(config)
    precision = config.run.mixed_precision
    half = precision in ("auto", "fp16", "bf16")
    compute = 2.0 if half else 4.0
    ref = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0}.get(m.reference_dtype, compute)
    gathers = o.noising != "forward"  # (Re)Noise inversion: its network gathered whole when sharded
    lines = [f"{family}: trained network {counts.network / 1e6:,.1f} M parameters"
             + (f", LoRA rank {m.lora_rank} adapters {counts.lora / 1e6:,.2f} M" if m.finetune == "lora" else "")
             + f", VAE and text encoders {counts.frozen / 1e6:,.1f} M (counted from the config files)",
             f"{m.finetune} fine-tuning, {config.optim.optimizer}, mixed precision {precision} "
             f"({'2' if half else '4'} bytes computed), {'sharded (FSDP2)' if sharded else 'a whole copy per process'}",
             "GB per process (weights + gradients + optimizer + reference + gathered for the inversion + encoders):"]
    counts_to_show = sorted({1, 8, 64, launched_processes()})
    for n in counts_to_show:
        e = estimate(counts, finetune=m.finetune, optimizer=config.optim.optimizer, processes=n, sharded=sharded,
                     reference_bytes=ref, compute_bytes=compute, needs_reference=o.needs_reference,
                     gathers_inverter=gathers, from_cache=bool(config.data.cache), half_bytes=2.0 if half else 4.0)
        parts = " + ".join(f"{v / GB:.2f}" for v in (e.weights, e.gradients, e.optimizer, e.reference, e.gathered,
                                                     e.encoders))
        lines.append(f"  {n:>3} processes: {parts} = {e.total / GB:.2f} GB")
    lines.append("Not counted: activations (resolution, batch, --gradient-checkpointing), the CUDA context; "
                 "docs/benchmarks.md has a measured step.")
    return "\n".join(lines)
