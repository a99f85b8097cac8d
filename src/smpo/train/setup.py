"""Everything a training run builds before its first step: the accelerator, the model family,
the policy and reference networks, the pair source and its layout, the optimizer and the schedule.

``smpo train`` (``smpo.train.loop.train``) and ``benchmarks/bench_train.py`` both build their
runs with :func:`prepare_training`, so the benchmark times what users run.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from smpo.train.checkpoint import checkpoint_only_lora
from smpo.train.config import TrainConfig
from smpo.train.data import Layout, open_pairs
from smpo.train.prefetch import StepBatches, default_workers
from smpo.train.sharding import (
    DataParallel,
    FullySharded,
    check_sharding,
    local_numel,
    shard_models,
    sharding_enabled,
)


@dataclass
class TrainingSetup:
    """What the step loop runs with (:func:`smpo.train.loop.train_step` reads it)."""

    config: TrainConfig
    """The resolved config of the run."""
    accelerator: Any
    """The run's ``accelerate.Accelerator``."""
    family: Any
    """The model family adapter (``smpo.models.FamilyAdapter``)."""
    policy: Any
    """The trainable network, prepared by accelerate."""
    reference: Any
    """The frozen reference network (the adapters-off view for LoRA), or ``None``."""
    pairs: Any
    """The pair source (``smpo.train.data.open_pairs``)."""
    layout: Layout
    """How each optimizer step's pairs split among processes and accumulation passes."""
    optimizer: Any
    """The optimizer, prepared by accelerate."""
    scheduler: torch.optim.lr_scheduler.LambdaLR
    """The learning-rate schedule (not prepared: accelerate would step it once per process)."""
    parameters: list[torch.nn.Parameter]
    """The policy's trainable parameters (the optimizer's), listed once: gradient clipping reads them
    every step (with LoRA, 64 of the tiny UNet's 272; iterating the frozen ones cost 0.2 ms a step)."""
    parallel: DataParallel | FullySharded
    """How the processes share the work: accumulation, clipping, checkpoint state, export
    (``smpo.train.sharding``)."""
    batches: StepBatches
    """This process's micro-batch of each step, from ``pairs`` (``smpo.train.prefetch``)."""


def resolve_config(config: TrainConfig) -> TrainConfig:
    """``config`` checked (``TrainConfig.validate``) with its method's defaults filled in (beta,
    noising, labels): what is saved is what was run."""
    config.validate()
    check_sharding(config)
    return dataclasses.replace(config, objective=config.objective.resolved())


def prepare_training(config: TrainConfig, accelerator: Any, family: Any) -> TrainingSetup:
    """Build the run of the resolved ``config`` on ``family`` (``load_model``): networks, pairs,
    layout, optimizer and schedule, prepared by ``accelerator`` and registered for checkpointing.

    Seed torch (``config.run.seed``) before calling: the LoRA weights are drawn here.
    """
    policy, reference = setup_models(family, config)
    pairs = open_pairs(config, family)
    layout = Layout(len(pairs), config.optim.batch_size, accelerator.num_processes,
                    config.optim.gradient_accumulation_steps)
    if layout.steps_per_epoch == 0:
        raise ValueError(f"{len(pairs)} pairs are fewer than one optimizer step's {layout.global_batch} "
                         "(batch_size x gradient_accumulation_steps x processes)")
    lr = config.optim.learning_rate * (layout.global_batch if config.optim.scale_lr else 1)
    sharded = sharding_enabled(config)
    if sharded:  # before the optimizer: it steps the shards
        shard_models(family, policy, reference, device=accelerator.device, processes=accelerator.num_processes,
                     param_dtype=_half_dtype(config))
        _say_what_is_held(accelerator, policy, reference)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = make_optimizer(config, params, lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_factor(config.optim.warmup_steps))
    parallel: DataParallel | FullySharded
    if sharded:
        parallel = FullySharded(accelerator, policy, optimizer, scheduler)
    else:
        policy, optimizer = accelerator.prepare(policy, optimizer)
        if config.model.finetune == "lora":
            checkpoint_only_lora(accelerator)
        # The scheduler is NOT prepared: accelerate would step it once per process per step.
        accelerator.register_for_checkpointing(scheduler)
        parallel = DataParallel(accelerator)
    workers = config.data.num_workers
    batches = StepBatches(pairs, layout, seed=config.run.seed, rank=accelerator.process_index,
                          workers=default_workers(accelerator.device) if workers is None else workers)
    return TrainingSetup(config=config, accelerator=accelerator, family=family, policy=policy, reference=reference,
                         pairs=pairs, layout=layout, optimizer=optimizer, scheduler=scheduler,
                         parameters=params, parallel=parallel, batches=batches)


def _say_what_is_held(accelerator: Any, policy: Any, reference: Any) -> None:
    """One line per process: the share of the networks' parameters it holds."""
    held, total = local_numel(policy)
    line = f"process {accelerator.process_index} of {accelerator.num_processes} holds {held:,} of the policy's {total:,} parameters"
    if isinstance(reference, torch.nn.Module):
        ref_held, ref_total = local_numel(reference)
        line += f" and {ref_held:,} of the reference's {ref_total:,}"
    print(f"smpo train: {line}", flush=True)



def resolve_mixed_precision(config: TrainConfig) -> str:
    """``run.mixed_precision`` with ``auto`` decided: fp16 on CUDA (bf16 when sharded: no loss
    scaler sees a sharded gradient whole), none on the CPU."""
    choice = config.run.mixed_precision
    if choice == "auto":
        if not torch.cuda.is_available():
            return "no"
        return "bf16" if sharding_enabled(config) else "fp16"
    return choice


def make_accelerator(config: TrainConfig) -> Any:
    """The run's ``accelerate.Accelerator`` (precision, accumulation, tracker, project folder)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import ProjectConfiguration

    # accelerate keeps its settings in process-wide singletons; a second `train` call in the same
    # process (the demo, tests) may use another precision or accumulation. The process group
    # (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    report = config.run.report_to
    _check_tracker(report)
    # Several processes on a machine without CUDA (torchrun / accelerate launch --cpu): gloo on CPUs.
    cpu_processes = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(
        cpu=cpu_processes,
        mixed_precision=resolve_mixed_precision(config),
        gradient_accumulation_steps=config.optim.gradient_accumulation_steps,
        log_with=None if report == "none" else report,
        project_config=ProjectConfiguration(project_dir=config.run.output_dir,
                                            logging_dir=str(Path(config.run.output_dir) / "logs")),
    )


def _check_tracker(report: str) -> None:
    """A clear message when the chosen tracker's package is missing (they are optional extras)."""
    import importlib.util

    needs = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}.get(report, ())
    if needs and not any(importlib.util.find_spec(name) for name in needs):
        raise ImportError(f"--report-to {report} needs the {needs[0]} package: pip install 'smpo[tracking]'")


def load_model(config: TrainConfig, device: torch.device) -> Any:
    """The model family adapter, loaded in float32 (the trained weights' master precision)."""
    from smpo.models import load_family

    m = config.model
    return load_family(m.pretrained, family=m.family, vae=m.vae, network=m.unet, revision=m.revision,
                       dtype=torch.float32, device=device)


def _half_dtype(config: TrainConfig) -> torch.dtype | None:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(resolve_mixed_precision(config))


def setup_models(family: Any, config: TrainConfig) -> tuple[Any, Any]:
    """``(policy, reference)``: the trainable UNet and the frozen reference network.

    Full fine-tuning: the reference is a frozen copy made before training, in the mixed-precision
    dtype (fp16 on CUDA by default) unless ``reference_dtype`` says otherwise. LoRA: the reference
    is the same UNet with its adapters switched off (``smpo.models.lora.reference_view``); the
    base weights are kept in the mixed-precision dtype and only the adapters train, in float32.
    Methods that need no reference (``sft``, ``mapo`` inverting with the policy) get ``None``.
    """
    _place_encoders(family, config)
    network = family.network
    if config.model.finetune == "lora":
        reference = _add_adapters(network, config)
    else:
        reference = _frozen_copy(network, config, family) if config.objective.needs_reference else None
        network.requires_grad_(True)
    if config.model.gradient_checkpointing:
        network.enable_gradient_checkpointing()
    network.train()
    return network, reference


def _place_encoders(family: Any, config: TrainConfig) -> None:
    """The frozen VAE and text encoders: idle on the CPU when training from a cache, else in the
    mixed-precision dtype (a VAE that asks for ``force_upcast``, as the original SDXL one, stays fp32)."""
    half = _half_dtype(config)
    if config.data.cache:
        for module in [family.vae, *family.text_encoders]:
            module.to("cpu")
    elif half is not None:
        for module in family.text_encoders:
            module.to(dtype=half)
        if not getattr(family.vae.config, "force_upcast", False):
            family.vae.to(dtype=half)


def _add_adapters(network: Any, config: TrainConfig) -> Any:
    """Add LoRA to ``network`` (base weights in the mixed-precision dtype, adapters in float32);
    return the adapters-off reference view, or ``None`` when the method needs no reference."""
    from smpo.models.lora import add_lora, reference_view

    half = _half_dtype(config)
    if half is not None:
        network.to(dtype=half)
    add_lora(network, rank=config.model.lora_rank, alpha=config.model.lora_alpha)
    if config.model.lora_weights is not None:
        from smpo.models.lora import load_lora_weights

        load_lora_weights(network, config.model.lora_weights)
    for p in network.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return reference_view(network) if config.objective.needs_reference else None


def _frozen_copy(network: Any, config: TrainConfig, family: Any) -> Any:
    """The full fine-tuning reference: a frozen copy of the initial UNet, or ``model.reference_unet``."""
    import copy

    m = config.model
    if m.reference_unet is not None:
        from smpo.models import load_family

        network = load_family(m.pretrained, family=family.name, vae=m.vae, network=m.reference_unet, revision=m.revision,
                           dtype=torch.float32, device=family.device).network
    reference = copy.deepcopy(network).requires_grad_(False).eval()
    dtype = _reference_dtype(config)
    if dtype != reference.dtype:
        reference.to(dtype=dtype)
    return reference


def _reference_dtype(config: TrainConfig) -> torch.dtype:
    """``auto``: the mixed-precision dtype, so that the policy (under autocast) and the reference
    compute alike and their errors match at the start; float32 without mixed precision."""
    choice = config.model.reference_dtype
    if choice == "auto":
        return _half_dtype(config) or torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[choice]


def make_optimizer(config: TrainConfig, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """The ``optim.optimizer`` of ``config`` over ``params`` at learning rate ``lr``."""
    o = config.optim
    if o.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_epsilon,
                                 weight_decay=o.weight_decay)
    if o.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        # A fixed learning rate (no relative step / parameter scaling), as the authors' SDXL runs.
        return Adafactor(params, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False,
                         weight_decay=o.weight_decay)
    if o.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ImportError("--optimizer adamw8bit needs bitsandbytes: pip install 'smpo[bnb]'") from None
        return bnb.optim.AdamW8bit(params, lr=lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_epsilon,
                                   weight_decay=o.weight_decay)
    raise ValueError(f"unknown optimizer {o.optimizer!r}")


def warmup_factor(warmup_steps: int) -> Callable[[int], float]:
    """Constant learning rate after a linear warm-up: the factor of step ``s`` (0-based) is
    ``(s + 1) / (warmup_steps + 1)`` for ``s < warmup_steps``, then 1. (Unlike diffusers'
    ``constant_with_warmup``, the first step does not have a learning rate of zero.)"""
    def factor(step: int) -> float:
        return min(1.0, (step + 1) / (warmup_steps + 1))

    return factor
