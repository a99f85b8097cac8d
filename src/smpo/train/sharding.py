"""How the processes of a run share the work: a whole copy per process (data parallel) or sharded
(FSDP2, ``torch.distributed.fsdp.fully_shard``).

Sharded, each of the N processes keeps 1/N of every weight of the trained network, of its
gradient and of its optimizer state, and 1/N of the frozen reference network of full fine-tuning
(a LoRA run's reference is the same network with its adapters off, so it is sharded with it). A
network is cut into units, the blocks its family names (``FamilyAdapter.shard_units``) plus the
root (everything else); a unit's weights are gathered whole just before its forward and freed
after it, and gathered again in the backward. Each pass's gradient is reduce-scattered at once, so
gradients stay sharded during accumulation too (one reduce-scatter per pass).

One code path for every device: smpo calls ``fully_shard`` itself, with the family's units and
accelerate's mixed-precision choice (``MixedPrecisionPolicy``: weights gathered and computed in the
half dtype, gradients reduced in float32; autocast as without sharding). On CUDA, accelerate's
FSDP2 plugin (``accelerate launch --config_file configs/accelerate/fsdp.yaml``) selects it and its
settings are checked (:func:`check_sharding`); on CPU processes (gloo), where ``Accelerator(cpu=True)`` would drop the plugin
and run plain DDP, the same file or ``--sharding fsdp`` selects the same path. accelerate still
owns the process group, autocast, the loss scaling of accumulation and the trackers; the sharded
network and its optimizer are not handed to ``accelerator.prepare``. SmPO's inversion, whose
number of calls differs between processes, runs with the inverting network gathered whole
(``smpo.models.sharded.gathered``).

Checkpoints hold the sharded state (``torch.distributed.checkpoint``: each process writes its
shards of the trained weights and of the optimizer state) plus each process's schedule and RNG
state; the export gathers the whole state dict onto the main process, which writes the usual
diffusers folder or LoRA file.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from smpo.options import ConfigError
from smpo.processes import launched_processes

SHARDED_FOLDER = "sharded"
"""The checkpoint's subfolder written by ``torch.distributed.checkpoint``."""

# accelerate launch passes its config file's fsdp_config to the processes as FSDP_* variables. The
# settings smpo does not implement, each with the value it needs and why.
_REQUIRED_LAUNCH_SETTINGS: dict[str, tuple[str, str]] = {
    "FSDP_VERSION": ("2", "smpo shards with FSDP2 (fsdp_version: 2)"),
    "FSDP_OFFLOAD_PARAMS": ("false", "parameter offloading to the CPU is not supported"),
    "FSDP_CPU_RAM_EFFICIENT_LOADING": ("false", "every process loads the weights, then shards them"),
    "FSDP_ACTIVATION_CHECKPOINTING": ("false", "use smpo's --gradient-checkpointing instead"),
    "FSDP_RESHARD_AFTER_FORWARD": ("true", "smpo frees each block's gathered weights after its forward"),
}


def launched_with_fsdp() -> bool:
    """Whether ``accelerate launch`` was given an FSDP config (it sets ``ACCELERATE_USE_FSDP``)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def sharding_enabled(config: Any) -> bool:
    """Whether ``config`` (a ``TrainConfig``) trains sharded in this launch (``run.sharding``)."""
    choice = config.run.sharding
    if choice == "auto":
        return launched_with_fsdp() and launched_processes() > 1
    return choice == "fsdp"


def check_sharding(config: Any) -> None:
    """Raise :class:`ConfigError` for a sharded run that cannot work, with the reason."""
    if not sharding_enabled(config):
        return
    if config.run.mixed_precision == "fp16":
        raise ConfigError("--mixed-precision fp16 cannot be sharded (a loss scaler would see only its process's "
                          "shard of the gradient); use bf16")
    if launched_processes() < 2:
        raise ConfigError("--sharding fsdp needs several processes: launch with torchrun --nproc_per_node N "
                          "or accelerate launch --config_file configs/accelerate/fsdp.yaml")
    if launched_with_fsdp():
        for name, (needed, why) in _REQUIRED_LAUNCH_SETTINGS.items():
            value = os.environ.get(name, needed).lower()
            if value != needed:
                raise ConfigError(f"accelerate config {name.lower()}={value}: {why}")


# ---------------------------------------------------------------------------------------------
# Sharding the networks


def shard_network(network: torch.nn.Module, units: list[torch.nn.Module], *, mesh: Any,
                  param_dtype: torch.dtype | None) -> None:
    """``fully_shard`` each of ``units``, then ``network`` itself (the root: the rest), in place.

    ``param_dtype``: the dtype weights are gathered and computed in (mixed precision), gradients
    being reduced in float32; ``None``: their own dtype.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = (MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype
              else MixedPrecisionPolicy())
    for unit in units:  # each unit's weights are freed after its forward and gathered again in the backward
        fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    fully_shard(network, mesh=mesh, mp_policy=policy, reshard_after_forward=True)


def shard_models(family: Any, policy: torch.nn.Module, reference: Any, *, device: torch.device,
                 processes: int, param_dtype: torch.dtype | None) -> None:
    """Shard the policy and, if it is a network of its own, the frozen reference, over ``processes``."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (processes,))
    shard_network(policy, family.shard_units(policy), mesh=mesh, param_dtype=param_dtype)
    if isinstance(reference, torch.nn.Module):  # not a LoRA adapters-off view of the policy
        shard_network(reference, family.shard_units(reference), mesh=mesh, param_dtype=None)


def local_numel(network: Any) -> tuple[int, int]:
    """``(held here, in total)`` parameter elements of ``network`` (a sharded one holds its shards)."""
    from torch.distributed.tensor import DTensor

    held = total = 0
    for p in network.parameters():
        total += p.numel()
        held += p.to_local().numel() if isinstance(p, DTensor) else p.numel()
    return held, total


# ---------------------------------------------------------------------------------------------
# The run's distributed services: one class per way of sharing the work


@dataclass
class DataParallel:
    """A whole network per process, prepared by accelerate (DDP when there are several)."""

    accelerator: Any

    sharded = False

    def accumulate(self, policy: Any) -> contextlib.AbstractContextManager:
        """accelerate's accumulation: the gradient all-reduced on the last pass only."""
        return self.accelerator.accumulate(policy)

    def clip_grad_norm(self, parameters: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
        """torch's clipping after accelerate's unscaling (fp16): the gradients are whole tensors here,
        so accelerate's DTensor-aware grouping (a Python pass over every parameter) is not needed."""
        self.accelerator.unscale_gradients()
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)

    def optimizer_step(self, optimizer: Any) -> None:
        """The prepared optimizer's step. Where accelerate's wrapper would only call the wrapped
        optimizer's step (no fp16 scaler, no XLA, the accumulation's last pass), that is called
        directly: the wrapper looks up an optional package twice per call (0.3 ms a step)."""
        from accelerate.utils import DistributedType

        plain = (getattr(optimizer, "scaler", True) is None and self.accelerator.sync_gradients
                 and self.accelerator.distributed_type not in (DistributedType.XLA, DistributedType.DEEPSPEED))
        (optimizer.optimizer if plain else optimizer).step()

    def save_state(self, folder: Path) -> None:
        self.accelerator.save_state(str(folder), safe_serialization=True)

    def load_state(self, folder: Path) -> None:
        self.accelerator.load_state(str(folder))

    def export_state(self, policy: Any, *, lora: bool) -> tuple[Any, dict[str, Any] | None]:
        """``(network, None)``: the whole network is in this process, its own state dict is exported."""
        return self.accelerator.unwrap_model(policy), None


@dataclass
class FullySharded:
    """FSDP2: the policy (and the reference) sharded by :func:`shard_models`, its optimizer over the shards."""

    accelerator: Any
    policy: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any

    sharded = True

    @contextlib.contextmanager
    def accumulate(self, policy: Any) -> Iterator[None]:
        """accelerate's accumulation bookkeeping (loss divided by the passes, ``sync_gradients``);
        FSDP2 reduce-scatters every pass's gradient, so accumulated gradients stay sharded."""
        with self.accelerator.accumulate():
            yield

    def optimizer_step(self, optimizer: Any) -> None:
        """The optimizer over the shards, stepped."""
        optimizer.step()

    def clip_grad_norm(self, parameters: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
        """The norm of the whole gradient (over every process's shards), clipped as one vector."""
        from torch.distributed.tensor import DTensor

        norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        return norm.full_tensor() if isinstance(norm, DTensor) else norm

    def _state(self) -> tuple[dict[str, Any], Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        options = StateDictOptions(ignore_frozen_params=True)  # LoRA: the adapters, not the base weights
        model, optim = get_state_dict(self.policy, self.optimizer, options=options)
        return {"model": model, "optimizer": optim}, options

    def _process_file(self, folder: Path) -> Path:
        return folder / f"process-{self.accelerator.process_index}.pt"

    def save_state(self, folder: Path) -> None:
        """Each process writes its shards (and its schedule and RNG state) into ``folder``."""
        import torch.distributed.checkpoint as dcp

        state, _ = self._state()
        dcp.save(state, checkpoint_id=str(folder / SHARDED_FOLDER))
        torch.save({"scheduler": self.scheduler.state_dict(), "rng": torch.get_rng_state()},
                   self._process_file(folder))

    def load_state(self, folder: Path) -> None:
        """Restore what :meth:`save_state` wrote, each process its own shards."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        if not (folder / SHARDED_FOLDER).is_dir():
            raise FileNotFoundError(f"{folder} was not written by a sharded run (no {SHARDED_FOLDER}/); "
                                    "resume it with --sharding none")
        state, options = self._state()
        dcp.load(state, checkpoint_id=str(folder / SHARDED_FOLDER))
        set_state_dict(self.policy, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"], options=options)
        local = torch.load(self._process_file(folder), weights_only=False)
        self.scheduler.load_state_dict(local["scheduler"])
        torch.set_rng_state(local["rng"])

    def export_state(self, policy: Any, *, lora: bool) -> tuple[Any, dict[str, Any]]:
        """The whole state dict gathered onto the main process (empty on the others)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=lora)
        return policy, get_model_state_dict(policy, options=options)
