"""Checkpoints (atomic, keep the last N, exact resume) and the final export.

A checkpoint is a folder ``<run>/checkpoints/step-000050/`` holding what ``accelerate`` saves
(model or LoRA-wrapped model, optimizer, learning-rate scheduler, every process's RNG states),
plus ``trainer_state.json`` (the step, which is the data position, see ``smpo.train.data``) and
``config.yaml`` (the resolved config). It is written under a temporary name and renamed when
complete, so a killed run never leaves a half-written folder that ``--resume`` could pick.

The final export is what other tools load:

- full fine-tuning: ``<run>/final/unet/``, a folder that ``UNet2DConditionModel.from_pretrained``
  loads (drop it into a pipeline as ``unet=``); for SD3 / FLUX ``<run>/final/transformer/``
  (``SD3Transformer2DModel`` / ``FluxTransformer2DModel``, the pipeline's ``transformer=``);
- LoRA: ``<run>/final/lora/pytorch_lora_weights.safetensors`` in diffusers' format, loaded by
  ``pipeline.load_lora_weights("<run>/final/lora")``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from smpo.io import write_json

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.yaml"
_NAME = re.compile(r"^step-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Finished checkpoints of a run, oldest first (temporary folders are ignored)."""
    folder = Path(run_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(accelerator: Any, run_dir: str | os.PathLike, step: int, *, config_yaml: str,
                    state: dict[str, Any], keep: int, save_state: Callable[[Path], None] | None = None) -> Path:
    """Save a checkpoint of ``step`` atomically and delete all but the last ``keep``.

    Every process calls this (accelerate writes each process's RNG state, and sharded
    optimizers write their shards). All processes write into one temporary folder with a fixed
    name (a per-process random name, as ``smpo.io.atomic_path`` makes, cannot be shared); the
    main process renames it once everyone is done. ``save_state(folder)`` writes the processes'
    state (default: ``accelerator.save_state``; a sharded run writes its shards, ``smpo.train.sharding``).
    """
    folder = Path(run_dir) / CHECKPOINTS
    final = folder / checkpoint_name(step)
    tmp = folder / f".{final.name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if save_state is None:
        accelerator.save_state(str(tmp), safe_serialization=True)
    else:
        save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(tmp / STATE_FILE, state)
        (tmp / CONFIG_FILE).write_text(config_yaml)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(path: str | os.PathLike, *, load_state: Callable[[Path], None]) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and RNG states from ``path`` with ``load_state(path)``
    (``accelerator.load_state``, or a sharded run's); return its trainer state."""
    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise FileNotFoundError(f"{path} is not a finished checkpoint ({STATE_FILE} is missing)")
    load_state(path)
    return json.loads(state_file.read_text())


def export_full(network: Any, folder: str | os.PathLike, state_dict: dict[str, Any] | None = None, *,
                class_name: str | None = None) -> Path:
    """Save a trained network where its diffusers class's ``from_pretrained(folder)`` loads it.

    ``state_dict``: the weights when they are not all in ``network`` (gathered from FSDP shards;
    diffusers' ``save_pretrained`` would save the module's own, sharded, tensors), written in
    diffusers' layout (``diffusion_pytorch_model.safetensors``, split past 10 GB with an index).
    ``class_name``: the diffusers class recorded in ``config.json`` (a sharded network's own class
    is FSDP's subclass of it, ``FSDPUNet2DConditionModel``).
    """
    from smpo.io import atomic_path

    folder = Path(folder)
    with atomic_path(folder) as tmp:
        if state_dict is None:
            network.save_pretrained(tmp, safe_serialization=True)
        else:
            network.save_config(tmp)
            _save_weights(state_dict, Path(tmp))
        if class_name is not None:
            config_file = Path(tmp) / "config.json"
            config = json.loads(config_file.read_text())
            config["_class_name"] = class_name
            config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


def _save_weights(state_dict: dict[str, Any], folder: Path, max_shard_size: str = "10GB") -> None:
    """``state_dict`` as diffusers writes a model's weights (its file names, shard size and index)."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(
        state_dict, filename_pattern="diffusion_pytorch_model{suffix}.safetensors", max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({name: state_dict[name].contiguous() for name in names}, folder / filename, metadata={"format": "pt"})
    if split.is_sharded:
        write_json(folder / "diffusion_pytorch_model.safetensors.index.json",
                   {"metadata": split.metadata, "weight_map": split.tensor_to_filename})


def lora_state_dict(network: Any, state_dict: dict[str, Any] | None = None) -> dict[str, Any]:
    """The UNet's LoRA weights in diffusers' key format (what ``load_lora_weights`` expects)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    adapter = next(iter(getattr(network, "peft_config", {"default": None})))
    return convert_state_dict_to_diffusers(get_peft_model_state_dict(network, state_dict=state_dict,
                                                                     adapter_name=adapter))


def export_lora(network: Any, folder: str | os.PathLike, family: str, state_dict: dict[str, Any] | None = None) -> Path:
    """Save the network's LoRA adapters as ``pytorch_lora_weights.safetensors`` in ``folder``.

    The adapter's config (rank, alpha, target modules) is stored in the file's metadata so that
    ``pipeline.load_lora_weights`` restores the same scale.
    """
    import diffusers

    from smpo.io import atomic_path
    from smpo.models import FAMILIES

    pipeline_cls = getattr(diffusers, FAMILIES[family].pipeline_class)
    prefix = FAMILIES[family].network_folder  # the keyword prefix: unet_lora_layers / transformer_lora_layers
    peft_config = getattr(network, "peft_config", {})
    metadata = next(iter(peft_config.values())).to_dict() if peft_config else None
    if metadata is not None:
        metadata = {k: (sorted(v) if isinstance(v, set) else v) for k, v in metadata.items()}
    folder = Path(folder)
    with atomic_path(folder) as tmp:
        pipeline_cls.save_lora_weights(tmp, safe_serialization=True,
                                       **{f"{prefix}_lora_layers": lora_state_dict(network, state_dict),
                                          f"{prefix}_lora_adapter_metadata": metadata})
    return folder


def checkpoint_only_lora(accelerator: Any) -> None:
    """Make checkpoints of a LoRA run hold the adapters, not a copy of the frozen base UNet.

    Registers accelerate save/load hooks: saving keeps only the ``lora_`` entries of the model's
    state dict; loading restores them and checks that every adapter weight was found.
    """
    def keep_lora(models: list, weights: list, output_dir: str) -> None:
        for i, state in enumerate(weights):
            weights[i] = {k: v for k, v in state.items() if "lora_" in k}

    def load_lora(models: list, input_dir: str) -> None:
        from safetensors.torch import load_file

        for i in reversed(range(len(models))):
            model = models.pop(i)  # accelerate then skips it
            path = Path(input_dir) / ("model.safetensors" if i == 0 else f"model_{i}.safetensors")
            result = model.load_state_dict(load_file(str(path)), strict=False)
            missing = [k for k in result.missing_keys if "lora_" in k]
            if result.unexpected_keys or missing:
                raise ValueError(f"{path} does not match this run's LoRA adapters: missing {missing[:5]}, "
                                 f"unexpected {list(result.unexpected_keys)[:5]}")

    accelerator.register_save_state_pre_hook(keep_lora)
    accelerator.register_load_state_pre_hook(load_lora)
