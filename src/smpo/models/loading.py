"""Which families there are, which one a pipeline is, and loading it: the :data:`FAMILIES` registry,
:func:`detect_family` (the one rule, used by training, the cache and the evaluation pipelines) and
:func:`load_family` / :func:`make_adapter`.

Imports ``smpo.models.ddpm``, ``smpo.models.flow`` (their adapters), ``smpo.models.base`` and, when
loading, ``smpo.io`` (``check_model_source``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from smpo.models.base import FamilyAdapter
from smpo.models.ddpm import DDPM_FAMILIES
from smpo.models.flow import FLOW_FAMILIES

FAMILIES: dict[str, type[FamilyAdapter]] = {**DDPM_FAMILIES, **FLOW_FAMILIES}
"""The adapters by family name (``--family``)."""
FAMILY_NAMES: tuple[str, ...] = tuple(FAMILIES)
"""The family names, for command-line choices (``auto`` comes before them where detection is allowed)."""


def read_model_index(model: str | os.PathLike, revision: str | None = None) -> dict[str, Any]:
    """``model_index.json`` of a pipeline folder, or downloaded from the hub when ``model`` is not a folder."""
    path = Path(model)
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise FileNotFoundError(f"{path} is not a diffusers pipeline folder: model_index.json is missing")
        return json.loads(index.read_text())
    from huggingface_hub import hf_hub_download

    return json.loads(Path(hf_hub_download(str(model), "model_index.json", revision=revision)).read_text())


def detect_family(model: str | os.PathLike | Mapping[str, Any], revision: str | None = None) -> str:
    """The family of a pipeline folder or hub id, or of its already-read ``model_index.json``.

    The pipeline class named there decides: the family whose ``pipeline_marker`` it contains, the
    longest marker first (``StableDiffusion3*`` is ``sd3``, ``Flux*`` ``flux``, ``StableDiffusionXL*``
    ``sdxl``, any other ``StableDiffusion*`` ``sd15``). A class no family names (a community or an
    LCM pipeline) is read by its components when it holds a UNet: ``sdxl`` with a second text
    encoder, else ``sd15``. Anything else, or a folder without ``model_index.json``, is a ValueError.
    """
    if isinstance(model, Mapping):
        index, where = model, "model_index.json"
    else:
        try:
            index, where = read_model_index(model, revision), str(model)
        except FileNotFoundError as e:
            raise ValueError(f"{model}: not a diffusers pipeline (no usable model_index.json: {e})") from None
    class_name = str(index.get("_class_name", ""))
    for cls in sorted(FAMILIES.values(), key=lambda c: -len(c.pipeline_marker)):
        if cls.pipeline_marker in class_name:
            return cls.name
    if "unet" in index:  # the family with the most text encoders whose extra ones (after the first) are there
        for cls in sorted(DDPM_FAMILIES.values(), key=lambda c: -len(c.text_encoder_classes)):
            if all(folder in index for folder, _ in cls.text_encoder_classes[1:]):
                return cls.name
    raise ValueError(f"{where}: pipeline class {class_name!r} is neither an SD1.5, SDXL, SD3 nor a FLUX pipeline")


def load_family(model: str | os.PathLike, *, family: str = "auto", vae: str | os.PathLike | None = None,
                network: str | os.PathLike | None = None, revision: str | None = None, variant: str | None = None,
                dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                with_network: bool = True) -> FamilyAdapter:
    """Load a text-to-image pipeline from a diffusers folder or hub id as a :class:`FamilyAdapter`.

    ``family``: a name of :data:`FAMILIES` or ``"auto"`` (:func:`detect_family` on ``model_index.json``).
    For ``sd3``/``flux`` the network is the pipeline's ``transformer`` (``network`` then names a
    separate initial transformer) and the adapter is a ``smpo.models.flow.FlowAdapter``.
    ``vae``: a separate VAE (folder or hub id, e.g. ``madebyollin/sdxl-vae-fp16-fix``).
    ``network``: a separate initial UNet (a folder with ``config.json`` + weights, or a pipeline
    folder / hub id with a ``unet`` (or ``transformer``) subfolder). All components are loaded in ``dtype`` and frozen
    (``requires_grad=False``); the training loop unfreezes what it trains. ``with_network=False``
    skips the network's weights (``adapter.network`` is then ``None``; for caching latents and prompts).
    """
    from smpo.io import check_model_source

    model = check_model_source(model, "--model")
    vae = None if vae is None else check_model_source(vae, "--vae")
    network = None if network is None else check_model_source(network, "--unet")
    index = read_model_index(model, revision)
    name = detect_family(index) if family == "auto" else family
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; choose from auto, {', '.join(FAMILIES)}")
    adapter = FAMILIES[name].from_pretrained(model, vae=vae, network=network, revision=revision, variant=variant,
                                             dtype=dtype, with_network=with_network)
    return adapter.to(device)


def make_adapter(family: str, *, network: Any, vae: Any, text_encoders: list[Any], tokenizers: list[Any],
                 scheduler: Any, network_config: Any = None, source: str = "") -> FamilyAdapter:
    """An adapter over already-built components (e.g. a pipeline object's ``unet`` or ``transformer``, ``vae``...).

    ``scheduler``: any scheduler of the pipeline (only its training schedule and ``prediction_type``
    are read). ``network_config`` (the network's config; its sizes give the resolution) defaults to
    ``network.config``.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; choose from {', '.join(FAMILIES)}")
    return FAMILIES[family].from_components(network=network, vae=vae, text_encoders=text_encoders, tokenizers=tokenizers,
                                            scheduler=scheduler, network_config=network_config, source=source)
