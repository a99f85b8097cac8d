"""Load a text-to-image pipeline for evaluation: a base model, optionally with a trained UNet or LoRA,
a different scheduler, or a ControlNet.

- The base model is a diffusers pipeline folder or hub id; its family (``sd15``, ``sdxl``, ``sd3``
  or ``flux``) is read from the pipeline class named in ``model_index.json``, and the family's
  adapter class names its pipeline class (``smpo.models.FAMILIES``, ``smpo.models.detect_family``).
- A trained output is either a full network (a folder with ``config.json`` of a
  ``UNet2DConditionModel``, or of an ``SD3Transformer2DModel`` / ``FluxTransformer2DModel``,
  directly or in a ``unet/`` or ``transformer/`` subfolder) or a LoRA in the diffusers format
  (``pytorch_lora_weights.safetensors``, directly or in a ``lora/`` subfolder, loaded with
  ``pipeline.load_lora_weights``). An `smpo train` run's ``final/`` folder is either.
- A ControlNet (``ControlNetModel`` folder or hub id; SD1.5 and SDXL) turns the pipeline into the
  family's ControlNet pipeline sharing the same components (``from_pipe``).

Every per-family answer (pipeline, network and ControlNet classes, safety checker, whether the
sampler may be swapped) comes from the family's adapter class.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from smpo.models import FAMILIES, detect_family, diffusers_dtype_kwarg

# Paper Appendix D: CFG 7.5 for SD1.5 and 5 for SDXL; the pipelines' defaults for SD3 (7) and FLUX
# (its distilled guidance, 3.5).
FAMILY_GUIDANCE_SCALE = {name: adapter.guidance_scale for name, adapter in FAMILIES.items()}
LORA_FILES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "pndm": "PNDMScheduler",
    "unipc": "UniPCMultistepScheduler",
}


def load_pipeline(model: str | os.PathLike, *, family: str | None = None, unet: str | os.PathLike | None = None,
                  lora_scale: float = 1.0, scheduler: str | None = None, controlnet: str | os.PathLike | None = None,
                  dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                  safety_checker: bool = False):
    """The pipeline used by :func:`smpo.evaluation.generate.generate`, and its family."""
    import diffusers

    from smpo.io import check_model_source

    model = check_model_source(model, "--model")
    unet = None if unet is None else check_model_source(unet, "--unet")
    controlnet = None if controlnet is None else check_model_source(controlnet, "--controlnet")
    family = family or detect_family(model)
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    adapter = FAMILIES[family]
    if controlnet is not None and adapter.controlnet_pipeline_class is None:
        supported = [name for name, cls in FAMILIES.items() if cls.controlnet_pipeline_class is not None]
        raise ValueError(f"--controlnet is supported for {' and '.join(supported)} models, not {family}")
    if scheduler and not adapter.scheduler_swappable:
        raise ValueError(f"--scheduler swaps DDPM-family samplers; a {family} model samples with its flow-matching "
                         "scheduler")
    cls = getattr(diffusers, adapter.pipeline_class)
    kwargs: dict[str, Any] = {**diffusers_dtype_kwarg(dtype), **adapter.pipeline_kwargs(safety_checker=safety_checker)}
    trained = trained_output_kind(unet) if unet is not None else None
    if trained is not None and trained[0] == "unet":
        kwargs[adapter.network_folder] = load_trained_unet(unet, dtype=dtype, network_class=adapter.network_class)
    pipe = cls.from_pretrained(model, **kwargs)
    adapter.prepare_pipeline(pipe)
    if trained is not None and trained[0] == "lora":
        pipe.load_lora_weights(trained[1], adapter_name="trained")
        pipe.set_adapters(["trained"], adapter_weights=[lora_scale])
    if scheduler:
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    if controlnet is not None:
        cn = diffusers.ControlNetModel.from_pretrained(controlnet, **diffusers_dtype_kwarg(dtype))
        pipe = getattr(diffusers, adapter.controlnet_pipeline_class).from_pipe(pipe, controlnet=cn)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device), family


def trained_output_kind(path: str | os.PathLike) -> tuple[str, str, str | None]:
    """What a trained output holds: ``(kind, location, subfolder)``.

    ``kind`` is ``unet``, a full network (load ``location``/``subfolder`` with the family's network
    class: ``UNet2DConditionModel``, or the SD3/FLUX transformer) or ``lora``
    (``load_lora_weights(location)``). Accepted layouts: a network folder (``config.json``), a folder
    with ``unet/`` or ``transformer/`` (a pipeline folder, or an `smpo train` run's ``final/``), a LoRA folder
    (``pytorch_lora_weights.safetensors``) or a folder with ``lora/`` holding one; local or on the hub.
    """
    location = str(path)
    if Path(path).is_dir():
        def has(name: str) -> bool:
            return (Path(path) / name).is_file()
    else:
        from huggingface_hub import list_repo_files

        files = set(list_repo_files(location))

        def has(name: str) -> bool:
            return name in files
    for sub in ("unet", "transformer"):
        if has(f"{sub}/config.json"):
            return "unet", location, sub
    if has("config.json"):
        return "unet", location, None
    for sub in ("", "lora/"):
        if any(has(sub + name) for name in LORA_FILES):
            return "lora", location if not sub else f"{location.rstrip('/')}/lora", None
    raise ValueError(f"{path}: neither a UNet (config.json, or unet/config.json) nor a diffusers LoRA "
                     f"({' / '.join(LORA_FILES)}, or lora/ holding one)")


def load_trained_unet(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                      network_class: str = "UNet2DConditionModel"):
    """A full trained network from ``path``, ``path/unet`` or ``path/transformer`` (``network_class``:
    the family's, e.g. ``SD3Transformer2DModel``)."""
    import diffusers

    kind, location, subfolder = trained_output_kind(path)
    if kind != "unet":
        raise ValueError(f"{path} holds a LoRA, not a full UNet")
    return getattr(diffusers, network_class).from_pretrained(location, subfolder=subfolder,
                                                             **diffusers_dtype_kwarg(dtype))


def make_scheduler(name: str, config: Any):
    """A scheduler named in :data:`SCHEDULERS`, built from the pipeline's scheduler config."""
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose from {', '.join(SCHEDULERS)}")
    return getattr(diffusers, SCHEDULERS[name]).from_config(config)
