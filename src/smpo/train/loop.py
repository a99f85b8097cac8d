"""The one training loop of every method (ALGORITHM.md sections 1-6); "step" means optimizer step.

    data (pairs or cache) -> FamilyAdapter (encode) -> smpo.objective.compute_loss -> optimizer

Python API (used by ``smpo train`` and ``smpo demo``)::

    from smpo.train import TrainConfig, load_config, train
    config = load_config("configs/sd15/smpo.yaml")
    config.model.pretrained, config.data.dataset, config.run.output_dir = "...", "...", "runs/a"
    result = train(config)
    result.export          # final/unet (full) or final/lora (LoRA)
    result.metrics[-1]     # {"step": ..., "loss": ..., "implicit_acc": ..., "lr": ...}
    result.checkpoints     # the checkpoint folders kept

Launch on several GPUs with ``accelerate launch -m smpo.cli train ...``: one process per device;
each process trains its share of every optimizer step's pairs (``smpo.train.data.Layout``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from smpo.train.checkpoint import (
    CONFIG_FILE,
    checkpoint_only_lora,
    export_full,
    export_lora,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from smpo.train.config import TrainConfig, dump_config
from smpo.train.data import Layout, open_pairs

METRICS_FILE = "metrics.jsonl"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped before the optimizer step."""


@dataclass
class TrainResult:
    """What :func:`train` produced."""

    run_dir: Path
    """The run folder (``config.run.output_dir``)."""
    config: TrainConfig
    """The resolved config (also saved as ``run_dir/config.yaml`` and in every checkpoint)."""
    family: str
    """``sd15``, ``sdxl``, ``sd3`` or ``flux``."""
    step: int
    """Optimizer steps done in total (including those before a resume)."""
    metrics: list[dict[str, float]] = field(default_factory=list)
    """One record per optimizer step of this call (also appended to ``run_dir/metrics.jsonl``)."""
    checkpoints: list[Path] = field(default_factory=list)
    """The checkpoint folders kept, oldest first."""
    export: Path | None = None
    """``run_dir/final/unet`` (full fine-tuning; ``final/transformer`` for SD3/FLUX) or ``run_dir/final/lora`` (LoRA)."""


StepCallback = Callable[[int, dict[str, float]], None]


def train(config: TrainConfig, *, on_step: StepCallback | None = None) -> TrainResult:
    """Train with ``config``; return the run's outputs. See the module docstring.

    ``on_step(step, metrics)`` is called on every process after each optimizer step (step counts
    from 1); an exception it raises stops the run there (tests use it to kill a run).
    """
    config.validate()
    # The method's defaults filled in (beta, noising, labels): what is saved is what was run.
    config = dataclasses.replace(config, objective=config.objective.resolved())
    accelerator = make_accelerator(config)
    run_dir = _prepare_run_dir(config, accelerator)
    torch.manual_seed(config.run.seed)  # same initial LoRA weights on every process

    family = load_model(config, accelerator.device)
    policy, reference = setup_models(family, config)
    pairs = open_pairs(config, family)
    layout = Layout(len(pairs), config.optim.batch_size, accelerator.num_processes,
                    config.optim.gradient_accumulation_steps)
    if layout.steps_per_epoch == 0:
        raise ValueError(f"{len(pairs)} pairs are fewer than one optimizer step's {layout.global_batch} "
                         "(batch_size x gradient_accumulation_steps x processes)")
    lr = config.optim.learning_rate * (layout.global_batch if config.optim.scale_lr else 1)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = make_optimizer(config, params, lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_factor(config.optim.warmup_steps))
    policy, optimizer = accelerator.prepare(policy, optimizer)
    if config.model.finetune == "lora":
        checkpoint_only_lora(accelerator)
    # The scheduler is NOT prepared: accelerate would step it once per process per step.
    accelerator.register_for_checkpointing(scheduler)

    start = 0
    config_yaml = dump_config(config)
    if config.run.resume:
        start = _resume(accelerator, run_dir, layout)
    if accelerator.is_main_process:
        (run_dir / CONFIG_FILE).write_text(config_yaml)
    if config.run.report_to != "none":
        accelerator.init_trackers("smpo", config=_flat(config))

    result = TrainResult(run_dir=run_dir, config=config, family=family.name, step=start)
    bar = _progress(config, accelerator, start)
    try:
        for step in range(start, config.optim.max_steps):
            record = _train_step(step, family, policy, reference, pairs, layout, optimizer, scheduler,
                                 accelerator, config)
            result.step = step + 1
            result.metrics.append(record)
            _log(record, accelerator, run_dir, config, bar)
            if on_step is not None:
                on_step(step + 1, record)
            every = config.run.checkpoint_every
            if (every and (step + 1) % every == 0) or step + 1 == config.optim.max_steps:
                save_checkpoint(accelerator, run_dir, step + 1, config_yaml=config_yaml,
                                state={"step": step + 1, "epoch": layout.epoch_of(step + 1),
                                       "global_batch": layout.global_batch},
                                keep=config.run.keep_checkpoints)
    finally:
        if bar is not None:
            bar.close()
    accelerator.wait_for_everyone()
    result.checkpoints = list_checkpoints(run_dir)
    result.export = export(accelerator, policy, run_dir, config, family.name, step=result.step,
                           metrics=result.metrics[-1] if result.metrics else None)
    accelerator.end_training()
    return result


# ---------------------------------------------------------------------------------------------
# One optimizer step


def _train_step(step: int, family: Any, policy: Any, reference: Any, pairs: Any, layout: Layout,
                optimizer: Any, scheduler: Any, accelerator: Any, config: TrainConfig) -> dict[str, float]:
    """Accumulate ``gradient_accumulation_steps`` micro-batches, check the loss, step the optimizer.

    accelerate's ``accumulate`` skips the gradient all-reduce on all but the last pass and
    divides each pass's loss by the number of passes, so the step's gradient is the mean over its
    ``layout.global_batch`` pairs whatever the split.
    """
    from smpo.objective import compute_loss

    started = time.perf_counter()
    evals_before = family.unet_evals
    passes = layout.accumulation
    epoch = layout.epoch_of(step)
    sums: dict[str, torch.Tensor] = {}
    grad_norm = None
    lr = scheduler.get_last_lr()[0]
    policy.train()
    # KTO's reference point is a mean over all processes' batches of a pass (compute_loss).
    reduce_mean = functools.partial(accelerator.reduce, reduction="mean") if accelerator.num_processes > 1 else None
    for micro in range(passes):
        indices = layout.indices(config.run.seed, step, accelerator.process_index, micro)
        batch = pairs.batch(indices, epoch)
        with accelerator.accumulate(policy), accelerator.autocast():
            out = compute_loss(family, policy, reference, batch, config.objective, mean_over_processes=reduce_mean)
            accelerator.backward(out.loss)
            for name, value in {"loss": out.loss, **out.metrics}.items():
                value = torch.as_tensor(value, device=accelerator.device).detach().float()
                sums[name] = sums.get(name, 0.0) + value / passes
            if micro < passes - 1:
                continue
            means = {name: accelerator.reduce(value, reduction="mean") for name, value in sums.items()}
            if not torch.isfinite(means["loss"]):
                optimizer.zero_grad(set_to_none=True)
                last = latest_checkpoint(Path(config.run.output_dir))
                raise NonFiniteLossError(f"the loss is {means['loss'].item()} at step {step + 1}; stopped before "
                                         f"its optimizer step. Last good checkpoint: {last or 'none yet'}")
            if config.optim.max_grad_norm is not None:
                grad_norm = accelerator.clip_grad_norm_(policy.parameters(), config.optim.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - started
    record = {"step": step + 1, "epoch": epoch, "lr": lr, "pairs_per_s": layout.global_batch / seconds,
              "seconds": seconds, "unet_evals": float(family.unet_evals - evals_before),
              **{name: float(value) for name, value in means.items()}}
    if grad_norm is not None:
        record["grad_norm"] = float(grad_norm)
    return record


# ---------------------------------------------------------------------------------------------
# Setup


def resolve_mixed_precision(config: TrainConfig) -> str:
    choice = config.run.mixed_precision
    if choice == "auto":
        return "fp16" if torch.cuda.is_available() else "no"
    return choice


def make_accelerator(config: TrainConfig) -> Any:
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


def _resume(accelerator: Any, run_dir: Path, layout: Layout) -> int:
    """Restore the latest checkpoint of ``run_dir``, if any; return the step to continue from."""
    ckpt = latest_checkpoint(run_dir)
    start = 0
    if ckpt is not None:
        state = load_checkpoint(accelerator, ckpt)
        start = int(state["step"])
        accelerator.print(f"resumed from {ckpt} at step {start}")
        if state.get("global_batch") != layout.global_batch:
            accelerator.print(f"warning: the checkpoint was made with a global batch of {state.get('global_batch')} "
                              f"pairs, this run has {layout.global_batch}: the data order will not continue exactly")
    if accelerator.is_main_process:
        _truncate_metrics(run_dir / METRICS_FILE, start)  # records after the checkpoint are redone
    return start


def _check_tracker(report: str) -> None:
    """A clear message when the chosen tracker's package is missing (they are optional extras)."""
    import importlib.util

    needs = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}.get(report, ())
    if needs and not any(importlib.util.find_spec(name) for name in needs):
        raise ImportError(f"--report-to {report} needs the {needs[0]} package: pip install 'smpo[tracking]'")


def _prepare_run_dir(config: TrainConfig, accelerator: Any) -> Path:
    from smpo.io import OutputExistsError, prepare_output_dir

    run_dir = Path(config.run.output_dir)
    if accelerator.is_main_process:
        has_outputs = run_dir.is_dir() and any(run_dir.iterdir())
        if has_outputs and not (config.run.overwrite or config.run.resume):
            raise OutputExistsError(f"{run_dir} already exists and is not empty; pass --resume to continue "
                                    "its latest checkpoint or --overwrite to replace it")
        prepare_output_dir(run_dir, overwrite=config.run.overwrite and not config.run.resume, resume=True)
    accelerator.wait_for_everyone()
    return run_dir


def load_model(config: TrainConfig, device: torch.device) -> Any:
    """The model family adapter, loaded in float32 (the trained weights' master precision)."""
    from smpo.models.family import load_family

    m = config.model
    return load_family(m.pretrained, family=m.family, vae=m.vae, unet=m.unet, revision=m.revision,
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
    unet = family.unet
    if config.model.finetune == "lora":
        reference = _add_adapters(unet, config)
    else:
        reference = _frozen_copy(unet, config) if config.objective.needs_reference else None
        unet.requires_grad_(True)
    if config.model.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    return unet, reference


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


def _add_adapters(unet: Any, config: TrainConfig) -> Any:
    """Add LoRA to ``unet`` (base weights in the mixed-precision dtype, adapters in float32);
    return the adapters-off reference view, or ``None`` when the method needs no reference."""
    from smpo.models.lora import add_lora, reference_view

    half = _half_dtype(config)
    if half is not None:
        unet.to(dtype=half)
    add_lora(unet, rank=config.model.lora_rank, alpha=config.model.lora_alpha)
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return reference_view(unet) if config.objective.needs_reference else None


def _frozen_copy(unet: Any, config: TrainConfig) -> Any:
    """The full fine-tuning reference: a frozen copy of the initial UNet."""
    import copy

    reference = copy.deepcopy(unet).requires_grad_(False).eval()
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


def export(accelerator: Any, policy: Any, run_dir: Path, config: TrainConfig, family: str, *, step: int = 0,
           metrics: dict[str, float] | None = None) -> Path:
    """Write the final weights and return their folder.

    Every process calls this: under FSDP or DeepSpeed ZeRO-3 the weights are gathered from the
    processes' shards first; the main process writes.
    """
    from smpo.models.family import FAMILIES

    network = FAMILIES[family].network_folder  # unet, or transformer for SD3/FLUX
    folder = run_dir / "final" / ("lora" if config.model.finetune == "lora" else network)
    state = accelerator.get_state_dict(policy)
    if accelerator.is_main_process:
        unet = accelerator.unwrap_model(policy)
        if config.model.finetune == "lora":
            export_lora(unet, folder, family, state)
        else:
            export_full(unet, folder, state)
        (run_dir / "final" / CONFIG_FILE).write_text(dump_config(config))
        from smpo.train.card import model_card

        (folder / "README.md").write_text(model_card(config, family, kind=config.model.finetune.replace("full", network),
                                                     steps=step, metrics=metrics))
    accelerator.wait_for_everyone()
    return folder


# ---------------------------------------------------------------------------------------------
# Logging


_BAR_KEYS = {"loss": "loss", "implicit_acc": "acc", "reward_margin": "margin"}


def _progress(config: TrainConfig, accelerator: Any, start: int) -> Any:
    if not (config.run.progress and accelerator.is_local_main_process):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=config.optim.max_steps, initial=start, desc="train", unit="step", dynamic_ncols=True)


def _log(record: dict[str, float], accelerator: Any, run_dir: Path, config: TrainConfig, bar: Any) -> None:
    if bar is not None:
        shown = {"pairs/s": f"{record['pairs_per_s']:.3g}", "lr": f"{record['lr']:.2e}"}
        shown.update({short: f"{record[key]:.4g}" for key, short in _BAR_KEYS.items() if key in record})
        bar.set_postfix(shown, refresh=False)
        bar.update(1)
    if record["step"] % config.run.log_every and record["step"] != config.optim.max_steps:
        return
    if config.run.report_to != "none":
        accelerator.log({k: v for k, v in record.items() if k != "step"}, step=int(record["step"]))
    if accelerator.is_main_process:
        with open(run_dir / METRICS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop records past ``last_step`` (steps that a resumed run will redo)."""
    if path.is_file():
        kept = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= last_step]
        path.write_text("".join(line + "\n" for line in kept))


def _flat(config: TrainConfig) -> dict[str, Any]:
    """Scalars of the config for the trackers' hyper-parameter tables."""
    out: dict[str, Any] = {}
    for section, values in config.to_dict().items():
        for key, value in values.items():
            out[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out

