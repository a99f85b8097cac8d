"""Reward models ("scorers") for labelling (ALGORITHM.md section 2) and evaluation (section 7).

One interface for all of them (see :class:`smpo.rewards.base.Scorer`)::

    from smpo.rewards import load_scorer
    scorer = load_scorer("pickscore", path=None, device="cuda", dtype="fp16", batch_size=32)
    scores = scorer(images, prompts)        # float32 CPU tensor [B]

``SCORERS`` names the paper's five scorers; :func:`scorer_names` adds the built-in miniature
world's reward model (``world``). The registry maps names to ``"module:function"`` strings and
imports a backbone only when it is loaded, so ``import smpo.rewards`` stays light. Each scorer's
preprocessing and output scale are documented in docs/scorers.md.
"""

from __future__ import annotations

import importlib
import inspect
import os

import torch

from smpo.rewards.base import Scorer

_PAPER_LOADERS: dict[str, str] = {
    "pickscore": "smpo.rewards.clip_scorers:load_pickscore",
    "hpsv2.1": "smpo.rewards.clip_scorers:load_hpsv21",
    "imagereward": "smpo.rewards.imagereward:load_imagereward",
    "aesthetic": "smpo.rewards.aesthetic:load_aesthetic",
    "clip": "smpo.rewards.clip_scorers:load_clip",
}
_OTHER_LOADERS: dict[str, str] = {
    "world": "smpo.world.reward:load_world_scorer",
}

SCORERS: tuple[str, ...] = tuple(_PAPER_LOADERS)
"""The five scorers of the paper's evaluation (Table 2) and labelling ablation (Table 7)."""

DEFAULT_BATCH_SIZE = 16


def scorer_names() -> tuple[str, ...]:
    """Every name :func:`load_scorer` accepts: the five paper scorers, then ``world``."""
    return SCORERS + tuple(_OTHER_LOADERS)


def load_scorer(name: str, path: str | os.PathLike | None = None, *, device: str | torch.device | None = None,
                dtype: str | torch.dtype | None = None, batch_size: int = DEFAULT_BATCH_SIZE) -> Scorer:
    """Load the scorer ``name`` (case-insensitive) from its default hub id, or from ``path``.

    ``path`` is a local folder or file in the scorer's format (docs/scorers.md) or another hub id.
    ``device`` defaults to the best available one; ``dtype`` (``"fp32"``, ``"fp16"``, ``"bf16"`` or a
    ``torch.dtype``) defaults to fp16 on CUDA and fp32 elsewhere. Scores always come back as
    float32 on the CPU.
    """
    from smpo.io import resolve_device, resolve_dtype

    key = name.lower() if isinstance(name, str) else name
    target = {**_PAPER_LOADERS, **_OTHER_LOADERS}.get(key)
    if target is None:
        raise ValueError(f"unknown scorer {name!r}; choose from {', '.join(scorer_names())}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    module_name, function_name = target.split(":")
    loader = getattr(importlib.import_module(module_name), function_name)
    resolved_device = resolve_device(device)
    options = {"device": resolved_device, "dtype": resolve_dtype(dtype, resolved_device)}
    if "batch_size" in inspect.signature(loader).parameters:  # the world scorer measures pixels: no batches
        options["batch_size"] = batch_size
    return loader(path, **options)


__all__ = ["SCORERS", "Scorer", "load_scorer", "scorer_names"]
