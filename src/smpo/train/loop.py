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

What a run builds before its first step is :mod:`smpo.train.setup` (``prepare_training``);
one optimizer step is :func:`train_step`, which the training-step benchmark also calls.

Launch on several GPUs with ``accelerate launch -m smpo.cli train ...``: one process per device;
each process trains its share of every optimizer step's pairs (``smpo.train.data.Layout``).
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from smpo.train.checkpoint import (
    CONFIG_FILE,
    export_full,
    export_lora,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from smpo.train.config import TrainConfig, dump_config
from smpo.train.setup import TrainingSetup, load_model, make_accelerator, prepare_training, resolve_config

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


def train(config: TrainConfig, *, on_step: StepCallback | None = None,
          end_process_group: bool = True) -> TrainResult:
    """Train with ``config``; return the run's outputs. See the module docstring.

    ``on_step(step, metrics)`` is called on every process after each optimizer step (step counts
    from 1); an exception it raises stops the run there (tests use it to kill a run).
    ``end_process_group=False`` keeps the launch's process group for a caller that goes on using
    it (``smpo online``'s next round); the trackers are finished either way.
    """
    config = resolve_config(config)
    accelerator = make_accelerator(config)
    run_dir = _prepare_run_dir(config, accelerator)
    torch.manual_seed(config.run.seed)  # same initial LoRA weights on every process

    family = load_model(config, accelerator.device)
    setup = prepare_training(config, accelerator, family)
    layout = setup.layout

    start = 0
    config_yaml = dump_config(config)
    if config.run.resume:
        start = _resume(setup, run_dir)
    if accelerator.is_main_process:
        (run_dir / CONFIG_FILE).write_text(config_yaml)
    if config.run.report_to != "none":
        accelerator.init_trackers("smpo", config=_flat(config))

    result = TrainResult(run_dir=run_dir, config=config, family=family.name, step=start)
    bar = _progress(config, accelerator, start)
    try:
        for step in range(start, config.optim.max_steps):
            record = train_step(setup, step)
            result.step = step + 1
            result.metrics.append(record)
            _log(record, accelerator, run_dir, config, bar)
            if on_step is not None:
                on_step(step + 1, record)
            every = config.run.checkpoint_every
            if (every and (step + 1) % every == 0) or step + 1 == config.optim.max_steps:
                save_checkpoint(accelerator, run_dir, step + 1, config_yaml=config_yaml,
                                save_state=setup.parallel.save_state,
                                state={"step": step + 1, "epoch": layout.epoch_of(step + 1),
                                       "global_batch": layout.global_batch},
                                keep=config.run.keep_checkpoints)
    finally:
        setup.batches.close()
        if bar is not None:
            bar.close()
    accelerator.wait_for_everyone()
    result.checkpoints = list_checkpoints(run_dir)
    last = result.metrics[-1] if result.metrics else _last_record(run_dir / METRICS_FILE)  # killed while exporting
    result.export = export(setup, run_dir, step=result.step, metrics=last)
    if end_process_group:
        accelerator.end_training()
    else:
        for tracker in accelerator.trackers:
            tracker.finish()
    return result


# ---------------------------------------------------------------------------------------------
# One optimizer step


def train_step(setup: TrainingSetup, step: int) -> dict[str, float]:
    """Optimizer step ``step`` (0-based) of ``setup``: accumulate ``gradient_accumulation_steps``
    micro-batches, check the loss, step the optimizer; return the step's record.

    accelerate's ``accumulate`` skips the gradient all-reduce on all but the last pass and
    divides each pass's loss by the number of passes, so the step's gradient is the mean over its
    ``layout.global_batch`` pairs whatever the split.
    """
    from smpo.objective import compute_loss

    config, accelerator, family, policy = setup.config, setup.accelerator, setup.family, setup.policy
    layout, optimizer, scheduler = setup.layout, setup.optimizer, setup.scheduler
    started = time.perf_counter()
    evals_before = family.network_evals
    passes = layout.accumulation
    epoch = layout.epoch_of(step)
    names: list[str] = []
    sums: torch.Tensor | None = None  # the loss and the metrics, stacked: one reduce and one sync a step
    grad_norm = None
    lr = scheduler.get_last_lr()[0]
    if not policy.training:  # (a walk over every module: skipped when nothing switched it off)
        policy.train()
    # KTO's reference point is a mean over all processes' batches of a pass (compute_loss).
    reduce_mean = functools.partial(accelerator.reduce, reduction="mean") if accelerator.num_processes > 1 else None
    for micro in range(passes):
        batch = setup.batches(step, micro)
        with setup.parallel.accumulate(policy), accelerator.autocast():
            out = compute_loss(family, policy, setup.reference, batch, config.objective,
                               mean_over_processes=reduce_mean)
            accelerator.backward(out.loss)
            values = {"loss": out.loss, **out.metrics}
            names = list(values)
            stacked = torch.stack([v.detach() for v in values.values()]).to(accelerator.device, torch.float32)
            sums = stacked / passes if sums is None else sums + stacked / passes
            if micro < passes - 1:
                continue
            if accelerator.num_processes > 1:
                sums = accelerator.reduce(sums, reduction="mean")
            means = dict(zip(names, sums.tolist()))
            if not math.isfinite(means["loss"]):
                optimizer.zero_grad(set_to_none=True)
                last = latest_checkpoint(Path(config.run.output_dir))
                raise NonFiniteLossError(f"the loss is {means['loss']} at step {step + 1}; stopped before "
                                         f"its optimizer step. Last good checkpoint: {last or 'none yet'}")
            if config.optim.max_grad_norm is not None:
                grad_norm = setup.parallel.clip_grad_norm(setup.parameters, config.optim.max_grad_norm)
            setup.parallel.optimizer_step(optimizer)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - started
    record = {"step": step + 1, "epoch": epoch, "lr": lr, "pairs_per_s": layout.global_batch / seconds,
              "seconds": seconds, "unet_evals": float(family.network_evals - evals_before), **means}
    if grad_norm is not None:
        record["grad_norm"] = float(grad_norm)
    return record


# ---------------------------------------------------------------------------------------------
# The run folder


def _resume(setup: TrainingSetup, run_dir: Path) -> int:
    """Restore the latest checkpoint of ``run_dir``, if any; return the step to continue from."""
    accelerator, layout = setup.accelerator, setup.layout
    ckpt = latest_checkpoint(run_dir)
    start = 0
    if ckpt is not None:
        state = load_checkpoint(ckpt, load_state=setup.parallel.load_state)
        start = int(state["step"])
        accelerator.print(f"resumed from {ckpt} at step {start}")
        if state.get("global_batch") != layout.global_batch:
            accelerator.print(f"warning: the checkpoint was made with a global batch of {state.get('global_batch')} "
                              f"pairs, this run has {layout.global_batch}: the data order will not continue exactly")
    if accelerator.is_main_process:
        _truncate_metrics(run_dir / METRICS_FILE, start)  # records after the checkpoint are redone
    return start


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


def export(setup: TrainingSetup, run_dir: Path, *, step: int = 0, metrics: dict[str, float] | None = None) -> Path:
    """Write the final weights and return their folder.

    Every process calls this: sharded, the whole state dict is gathered from the processes'
    shards first (``TrainingSetup.parallel``); the main process writes.
    """
    from smpo.models import FAMILIES

    accelerator, config, family = setup.accelerator, setup.config, setup.family.name
    network_folder = FAMILIES[family].network_folder  # unet, or transformer for SD3/FLUX
    lora = config.model.finetune == "lora"
    folder = run_dir / "final" / ("lora" if lora else network_folder)
    network, state = setup.parallel.export_state(setup.policy, lora=lora)
    if accelerator.is_main_process:
        from smpo.io import remove_temporaries

        remove_temporaries(run_dir / "final")  # what a kill during an earlier export left
        if lora:
            export_lora(network, folder, family, state)
        else:
            export_full(network, folder, state, class_name=FAMILIES[family].network_class)
        (run_dir / "final" / CONFIG_FILE).write_text(dump_config(config))
        from smpo.train.card import model_card

        (folder / "README.md").write_text(model_card(config, family, kind=config.model.finetune.replace("full", network_folder),
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


def _last_record(path: Path) -> dict[str, float] | None:
    """The last record of ``metrics.jsonl`` (which the main process writes), if any."""
    lines = [line for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return json.loads(lines[-1]) if lines else None


def _flat(config: TrainConfig) -> dict[str, Any]:
    """Scalars of the config for the trackers' hyper-parameter tables."""
    out: dict[str, Any] = {}
    for section, values in config.to_dict().items():
        for key, value in values.items():
            out[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out

