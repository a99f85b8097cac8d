"""The generators and the scorer of ``smpo pairs``, as the user spells them.

Generators. Each is a diffusers pipeline (folder or hub id of any family
:func:`smpo.evaluation.pipelines.load_pipeline` takes: SD1.5, SDXL, SD3, FLUX), optionally with a
trained network or LoRA from ``smpo train``, its own sampler settings, and a name that the pair
set records in ``model_0``/``model_1``. Two spellings, one record (:class:`GeneratorSpec`):

- on the command line, ``--model NAME=PATH`` (repeated; ``PATH`` alone names the generator by the
  folder's or hub id's last part), and ``--generator-options NAME:key=value,key=value`` (repeated)
  for the settings that differ from the shared ones (``--steps``, ``--guidance-scale``...);
- a YAML file, ``--generators file.yaml``: a list of mappings with the same keys, e.g.
  ``[{name: base, model: stable-diffusion-v1-5/stable-diffusion-v1-5, steps: 30},
  {name: tuned, model: stable-diffusion-v1-5/stable-diffusion-v1-5, unet: runs/smpo/final, lora_scale: 0.8}]``.

Scorer. One name of :data:`smpo.rewards.SCORERS` (or ``world``), or a weighted mix
``pickscore=0.7,hpsv2.1=0.3``: an image's score is ``sum_i w_i * s_i`` of the scorers' RAW scores
(no rescaling, so it stays a pure function of the image and the prompt; mind that the scorers'
scales differ, docs/scorers.md). Each part's own score is kept too (``score_0_<name>``...).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import torch
from PIL import Image

from smpo.options import ConfigError, apply_overrides

# Short keys a user may write for a field of GeneratorSpec.
OPTION_ALIASES = {"guidance": "guidance_scale", "cfg": "guidance_scale"}


@dataclass(frozen=True)
class GeneratorSpec:
    """One generator of a pair set (each field is one key of ``--generator-options`` / the YAML)."""

    name: str
    """Recorded in model_0 / model_1 and in the image ids."""
    model: str
    """Base model: a diffusers pipeline folder or hub id (SD1.5, SDXL, SD3 or FLUX family), or
    ``python:MODULE:FACTORY[:ARG]`` (:func:`python_generator_factory`)."""
    unet: str | None = None
    """A trained network or LoRA (an `smpo train` run's final/ folder), as `smpo generate --unet`."""
    lora_scale: float = 1.0
    """Weight of a LoRA given as unet."""
    steps: int | None = None
    """Sampling steps (default: --steps)."""
    guidance_scale: float | None = None
    """CFG scale (default: --guidance-scale, else the family's: 7.5 SD1.5, 5 SDXL, 7 SD3, 3.5 FLUX)."""
    height: int | None = None
    """Image height (default: --height, else the model's)."""
    width: int | None = None
    """Image width (default: --width, else the model's)."""
    scheduler: str | None = None
    """Sampler (default: the model's own), as `smpo generate --scheduler`."""
    negative_prompt: str | None = None
    """Negative prompt (default: none)."""


PYTHON_PREFIX = "python:"
"""``--model NAME=python:MODULE:FACTORY[:ARG]``: a generator that is not a diffusers pipeline."""


def is_python_generator(model: str) -> bool:
    return model.startswith(PYTHON_PREFIX)


def python_generator_factory(model: str) -> tuple[Any, list[str]]:
    """The factory of ``python:MODULE:FACTORY[:ARG]`` and its arguments (``[ARG]`` or none).

    ``FACTORY(*args)`` makes an object called as a diffusers text-to-image pipeline is
    (``prompt`` list, ``generator`` list of seeded CPU generators, ``num_inference_steps``,
    ``guidance_scale``, ``height``, ``width``, ``output_type="pil"``; it may ignore what it does
    not use) that returns an object with ``images``: a renderer, an API client, a pipeline of
    another library. Raises :class:`ConfigError` naming what cannot be found.
    """
    parts = model[len(PYTHON_PREFIX):].split(":", 2)
    if len(parts) < 2 or not all(parts[:2]):
        raise ConfigError(f"--model {model!r}: expected python:MODULE:FACTORY[:ARG]")
    try:
        module = importlib.import_module(parts[0])
    except ImportError as err:
        raise ConfigError(f"--model {model!r}: cannot import {parts[0]} ({err})") from None
    factory = getattr(module, parts[1], None)
    if not callable(factory):
        raise ConfigError(f"--model {model!r}: {parts[0]} has no callable {parts[1]}")
    return factory, parts[2:]


PYTHON_FAMILY = "python"
"""The family recorded for a ``python:`` generator."""


def generator_family(spec: GeneratorSpec, *, keep_latents: bool = False) -> str:
    """The family of a generator's model (``python`` for a ``python:`` generator), after checking
    that its sources exist; one line naming the generator otherwise."""
    from smpo.io import check_model_source
    from smpo.models.loading import detect_family

    if is_python_generator(spec.model):
        python_generator_factory(spec.model)
        if spec.unet is not None or keep_latents:
            raise ConfigError(f"--model {spec.name}: a Python generator takes no unet and keeps no latents")
        return PYTHON_FAMILY
    check_model_source(spec.model, f"--model {spec.name}")
    if spec.unet is not None:
        check_model_source(spec.unet, f"--generator-options {spec.name}:unet")
    return detect_family(spec.model)


def _default_name(model: str) -> str:
    return PurePosixPath(str(model).rstrip("/").replace(os.sep, "/")).name or str(model)


def parse_generators(models: Sequence[str], options: Sequence[str] = (), *,
                     yaml_file: str | None = None) -> list[GeneratorSpec]:
    """The generators from ``--model`` values, ``--generator-options`` values and a YAML file.

    Raises :class:`smpo.options.ConfigError` (one line) on a bad spelling, a repeated name, an
    unknown key or option, or options for a generator that is not given.
    """
    specs: list[GeneratorSpec] = []
    for text in models:
        name, sep, model = text.partition("=")
        if not sep:
            name, model = _default_name(text), text
        if not name or not model:
            raise ConfigError(f"--model {text!r}: expected NAME=PATH (or PATH alone)")
        specs.append(GeneratorSpec(name=name, model=model))
    if yaml_file is not None:
        specs.extend(_read_yaml(yaml_file))
    if not specs:
        raise ConfigError("give at least one generator: --model NAME=PATH (repeated) or --generators FILE.yaml")
    names = [s.name for s in specs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"generator name(s) {', '.join(repeated)} given twice; name each --model NAME=PATH")
    by_name = {s.name: s for s in specs}
    for text in options:
        name, sep, rest = text.partition(":")
        if not sep or name not in by_name:
            known = ", ".join(by_name)
            raise ConfigError(f"--generator-options {text!r}: expected NAME:key=value,... with NAME one of {known}")
        by_name[name] = _with_options(by_name[name], _key_values(rest, f"--generator-options {text!r}"),
                                      source=f"--generator-options {name}")
    return [by_name[n] for n in names]


def _key_values(text: str, where: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{where}: {item!r} is not key=value")
        values[key.strip()] = value.strip()
    return values


def _with_options(spec: GeneratorSpec, values: dict[str, Any], *, source: str) -> GeneratorSpec:
    values = {OPTION_ALIASES.get(k, k): v for k, v in values.items()}
    if "name" in values or "model" in values:
        raise ConfigError(f"{source}: name and model are set by --model NAME=PATH, not here")
    return apply_overrides(spec, values, source=source)


def _read_yaml(path: str) -> list[GeneratorSpec]:
    import yaml

    with open(path) as f:
        data = yaml.safe_load(f)
    if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
        raise ConfigError(f"{path}: expected a list of generators, each a mapping with name and model")
    specs = []
    for k, entry in enumerate(data):
        entry = {OPTION_ALIASES.get(key, key): value for key, value in entry.items()}
        if "model" not in entry:
            raise ConfigError(f"{path}: generator {k} has no model")
        base = GeneratorSpec(name=str(entry.pop("name", _default_name(str(entry["model"])))),
                             model=str(entry.pop("model")))
        specs.append(apply_overrides(base, entry, source=f"{path} generator {k}"))
    return specs


def resolved(spec: GeneratorSpec, **shared: Any) -> GeneratorSpec:
    """``spec`` with each unset sampler field taken from ``shared`` (the command's own options)."""
    fill = {k: v for k, v in shared.items() if getattr(spec, k) is None and v is not None}
    return dataclasses.replace(spec, **fill)


# ---------------------------------------------------------------------------------------------------
# Scorer: one reward model or a weighted mix.


def parse_scorer(text: str) -> dict[str, float]:
    """``{scorer name: weight}`` from ``pickscore`` or ``pickscore=0.7,hpsv2.1=0.3``."""
    from smpo.rewards import scorer_names

    known = scorer_names()
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise ConfigError("--scorer is empty")
    weights: dict[str, float] = {}
    for part in parts:
        name, sep, weight = part.partition("=")
        name = name.strip().lower()
        if name not in known:
            raise ConfigError(f"unknown scorer {name!r} in --scorer {text!r}; choose from {', '.join(known)}")
        if name in weights:
            raise ConfigError(f"scorer {name!r} given twice in --scorer {text!r}")
        if not sep and len(parts) > 1:
            raise ConfigError(f"--scorer {text!r}: give every scorer of a mix a weight (name=weight)")
        try:
            weights[name] = float(weight) if sep else 1.0
        except ValueError:
            raise ConfigError(f"--scorer {text!r}: weight {weight!r} of {name} is not a number") from None
    return weights


def parse_scorer_paths(values: Sequence[str], weights: dict[str, float]) -> dict[str, str]:
    """``{scorer name: weights path}`` from ``--scorer-path PATH`` (one scorer) or ``NAME=PATH`` (repeated)."""
    paths: dict[str, str] = {}
    for text in values:
        name, sep, path = text.partition("=")
        if sep and name.strip().lower() in weights:
            paths[name.strip().lower()] = path
        elif len(weights) == 1:
            paths[next(iter(weights))] = text
        else:
            raise ConfigError(f"--scorer-path {text!r}: with a mix of scorers write NAME=PATH, NAME one of "
                              f"{', '.join(weights)}")
    return paths


class MixedScorer:
    """``sum_i w_i * scorer_i(images, prompts)``; :attr:`last_parts` holds each scorer's scores of the last call."""

    def __init__(self, weights: dict[str, float], paths: dict[str, str], *, device: torch.device,
                 dtype: torch.dtype, batch_size: int) -> None:
        from smpo.rewards import load_scorer

        self.weights = dict(weights)
        self.scorers = {name: load_scorer(name, paths.get(name), device=device, dtype=dtype, batch_size=batch_size)
                        for name in weights}
        self.last_parts: dict[str, torch.Tensor] = {}

    @property
    def name(self) -> str:
        if len(self.weights) == 1 and next(iter(self.weights.values())) == 1.0:
            return next(iter(self.weights))
        return ",".join(f"{n}={w:g}" for n, w in self.weights.items())

    def __call__(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        with torch.inference_mode():
            self.last_parts = {name: torch.as_tensor(scorer(images, prompts)).detach().cpu().to(torch.float64)
                               for name, scorer in self.scorers.items()}
        return sum(self.weights[n] * s for n, s in self.last_parts.items())  # type: ignore[return-value]
