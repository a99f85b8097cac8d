"""The one scorer interface shared by labelling (ALGORITHM.md section 2) and evaluation (section 7).

A scorer maps a batch of (image, prompt) pairs to one float per pair::

    scores = scorer(images, prompts)   # list[PIL.Image], list[str] -> float32 Tensor[B] on the CPU

It splits the input into chunks of ``batch_size`` internally, runs under ``torch.no_grad`` on its
own device and dtype, and returns the same numbers whatever the chunking (every backbone here scores
each pair independently of the others in its batch).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image


class Scorer(ABC):
    """Base class of every reward model: batching, input checks, device and dtype.

    Subclasses set ``name`` and ``scale`` (a one-line description of the output's range and units)
    and implement :meth:`score_batch` for one chunk.
    """

    name: str = "scorer"
    scale: str = ""

    def __init__(self, *, device: torch.device, dtype: torch.dtype, batch_size: int = 16) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.batch_size = batch_size

    @abstractmethod
    def score_batch(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        """Scores of one chunk (at most ``batch_size`` pairs), any device and float dtype, shape [b]."""

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        """Score each ``(images[i], prompts[i])``; returns a float32 CPU tensor of shape [len(images)]."""
        return self._batched(self.score_batch, images, prompts)

    def _batched(self, fn, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        check_inputs(images, prompts, self.name)
        chunks = [
            fn(images[i : i + self.batch_size], prompts[i : i + self.batch_size]).float().cpu().reshape(-1)
            for i in range(0, len(images), self.batch_size)
        ]
        return torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.float32)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, device={self.device}, dtype={self.dtype}, batch_size={self.batch_size})"


def check_inputs(images: Sequence[Image.Image], prompts: Sequence[str], name: str) -> None:
    """Refuse mismatched lengths, non-images and non-strings with a message naming the scorer."""
    if isinstance(prompts, str):
        raise TypeError(f"{name}: prompts must be a list of strings, got a single string")
    if len(images) != len(prompts):
        raise ValueError(f"{name}: got {len(images)} images but {len(prompts)} prompts; pass one prompt per image")
    for i, (image, prompt) in enumerate(zip(images, prompts)):
        if not isinstance(image, Image.Image):
            raise TypeError(f"{name}: images[{i}] is a {type(image).__name__}, expected a PIL.Image.Image")
        if not isinstance(prompt, str):
            raise TypeError(f"{name}: prompts[{i}] is a {type(prompt).__name__}, expected a str")


def embedding(output: torch.Tensor | object) -> torch.Tensor:
    """The projected embedding of ``CLIPModel.get_{image,text}_features``.

    transformers < 5 returns the tensor itself; transformers 5 returns an output object whose
    ``pooler_output`` holds the projected embedding.
    """
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if pooled is None:
        raise TypeError(f"cannot find an embedding in {type(output).__name__}; expected a tensor or pooler_output")
    return pooled


def tokenizer_beside(checkpoint: str | Path) -> Path | None:
    """A tokenizer saved next to a checkpoint file: ``<folder>/tokenizer/`` or tokenizer files in ``<folder>``.

    Lets a converted checkpoint file travel with its tokenizer (and lets tests stay offline);
    ``None`` means the caller falls back to the scorer's hub tokenizer.
    """
    folder = Path(checkpoint).parent
    for candidate in (folder / "tokenizer", folder):
        if (candidate / "tokenizer_config.json").is_file():
            return candidate
    return None


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a checkpoint file (``.safetensors`` or a torch pickle read with ``weights_only=True``).

    Unwraps ``{"state_dict": ...}`` (HPS v2 checkpoints, whose reference loader reads
    ``checkpoint["state_dict"]``; other entries such as an epoch number are ignored) and strips a
    ``module.`` prefix (DDP). Pickles that need more than tensors and plain containers are refused
    (``weights_only=True``) with a message saying how to convert them.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - re-raised with the file named
            raise ValueError(
                f"cannot read {path} as a weights-only torch checkpoint ({error}); if you trust the file, "
                "re-save its tensors once, e.g. torch.load(path, weights_only=False)['state_dict'] written "
                "with safetensors.torch.save_file, and pass the .safetensors file") from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (found {type(state).__name__})")
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"{path} is not a state dict of tensors; non-tensor entries: {not_tensors[:8]}")
    return {k.removeprefix("module."): v for k, v in state.items()}
