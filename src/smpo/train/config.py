"""Training configuration: typed dataclasses, YAML recipes, command-line overrides.

One ``TrainConfig`` holds five sections: ``model``, ``data``, ``objective`` (the method and its
knobs, :class:`smpo.objective.ObjectiveConfig`), ``optim`` and ``run``. Each field is documented
once, by the string literal under it; that string is also the field's ``--help`` text, so the
documentation of a YAML recipe, of the Python API and of the command line cannot drift apart.

Precedence, lowest first: the dataclass defaults (the paper's SD1.5 settings, ALGORITHM.md
section 6), a YAML recipe (``--config configs/sdxl/smpo.yaml``), then command-line options
(``--beta 5000 --method dpo``). On the command line every field is ``--field-name``; names are
unique across sections. In YAML, fields sit under their section::

    objective:
      method: smpo
      beta: 2000
    optim:
      learning_rate: 1.0e-8
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from smpo.labels import LABELS
from smpo.methods import METHODS
from smpo.models import FAMILY_NAMES
from smpo.objective import NOISINGS, TIMESTEP_SAMPLINGS, ObjectiveConfig
from smpo.options import ConfigError, add_dataclass_arguments, apply_overrides, field_docs, option_name

__all__ = ["CHOICES", "SECTIONS", "ConfigError", "DataConfig", "ModelConfig", "OptimConfig", "RunConfig",
           "TrainConfig", "add_config_arguments", "config_from_args", "config_from_dict", "dump_config",
           "field_docs", "load_config", "option_name", "save_config"]


@dataclass
class ModelConfig:
    pretrained: str = ""
    """Base model: a diffusers pipeline folder or a hub id (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5)."""
    family: str = "auto"
    """Model family; `auto` reads it from the pipeline folder (model_index.json)."""
    vae: str | None = None
    """Optional separate VAE (folder or hub id), e.g. madebyollin/sdxl-vae-fp16-fix for SDXL in fp16."""
    unet: str | None = None
    """Optional initial network (`--network`): a UNet, or an SD3/FLUX transformer (folder or hub id); the paper's
    SD1.5 run starts from an SFT-tuned UNet."""
    revision: str | None = None
    """Hub revision of `pretrained`."""
    finetune: Literal["full", "lora"] = "full"
    """`full`: train every UNet weight against a separate frozen reference copy; `lora`: train LoRA
    adapters, the reference being the same UNet with its adapters switched off."""
    lora_rank: int = 64
    """LoRA rank (with --finetune lora)."""
    lora_alpha: float | None = None
    """LoRA alpha; default: equal to the rank (scale 1)."""
    lora_weights: str | None = None
    """With --finetune lora: start the adapters from these weights (an `smpo train` run's final/lora
    folder, same rank and alpha) instead of fresh ones; the reference stays the adapters-off network."""
    reference_unet: str | None = None
    """Full fine-tuning: the frozen reference network (folder or hub id, as --unet) when it is not the
    initial UNet; e.g. the base model's while --unet starts from an earlier run (`smpo online`)."""
    gradient_checkpointing: bool = False
    """Recompute UNet activations in the backward pass: less memory, about 30% more time."""
    reference_dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    """Dtype of the frozen reference UNet of full fine-tuning; `auto`: the mixed-precision dtype
    (fp16 on CUDA by default), fp32 without mixed precision."""


@dataclass
class DataConfig:
    dataset: str = ""
    """Labelled dataset (output of `smpo label`): a folder of parquet shards. Images are decoded,
    resized, centre-cropped and encoded by the VAE on the fly."""
    cache: str | None = None
    """Output folder of `smpo cache` for this model; when given, training reads latents and text
    embeddings from it and never decodes an image or runs the VAE or text encoders."""
    resolution: int | None = None
    """Training resolution in pixels; default: the model's native size (UNet sample size x VAE factor)."""
    cached_inversion: bool = False
    """Use the reference's inversions stored in data.cache (`smpo cache --store-inversion`): SmPO
    with objective.inverting_network=reference then only finishes each inversion (nothing left on
    the authors' grid; one renoised step when landing on t). Flipped images and dropped prompts
    are inverted live (docs/training.md, "Cached reference inversion")."""
    empty_prompt_rate: float = 0.2
    """Share of captions replaced by the empty prompt (the authors' proportion_empty_prompts)."""
    random_flip: bool = True
    """Flip both images of a pair horizontally with probability 1/2 (decided per pair from the seed)."""
    max_pairs: int | None = None
    """Use only the first N pairs of the dataset (in file order)."""
    flip_per_image: bool = False
    """With random_flip: flip each image of a pair on its own draw (the authors' per-image transform)
    instead of one flip for both (smpo's default: a pair's two images stay comparable)."""
    vae_sample: bool = False
    """Encode images with a posterior sample (the authors' `latent_dist.sample()`, seeded per image,
    pair and epoch) instead of the posterior mean (smpo's default; what `smpo cache` stores)."""
    stored_latents: bool = False
    """Train on the sampled latents a set made by `smpo pairs --keep-latents` stores (latent_0,
    latent_1) instead of encoding its images with the VAE; for a model with the generators' VAE,
    at the resolution they sampled (each image's size is the latent's, uncropped)."""
    size_conditioning: Literal["image", "target"] = "image"
    """SDXL micro-conditioning of training images: `image` (each image's real original size and crop,
    as diffusers' SDXL fine-tuning scripts do) or `target` (the fixed (R, R, 0, 0, R, R) of the
    training resolution R for every image, as the SmPO and Diffusion-DPO authors' scripts do, and as
    sampling at R asks). SD1.5 ignores it."""
    kto_desirable_share: float = 0.5
    """KTO only: expected share of desirable images among those drawn (the authors' weighted
    sampler; 0.5 default, 0.8 in their example)."""
    num_workers: int | None = None
    """Worker processes that read, decode and crop the next micro-batches' images while the step
    runs (a --dataset; a cache is read in the step); the batches are the same for any number.
    Default: 2 with a GPU, 0 on the CPU (the step's threads use the cores)."""


@dataclass
class OptimConfig:
    optimizer: Literal["adamw", "adafactor", "adamw8bit"] = "adamw"
    """`adamw` (torch), `adafactor` (transformers; the paper's SDXL choice) or `adamw8bit`
    (bitsandbytes, `pip install smpo[bnb]`)."""
    learning_rate: float = 1e-8
    """Learning rate per pair; with --scale-lr the rate used is this times the global batch."""
    scale_lr: bool = True
    """Multiply the learning rate by the global batch in pairs (batch x accumulation x processes)."""
    warmup_steps: int = 100
    """Linear warm-up over this many optimizer steps, then constant."""
    batch_size: int = 1
    """Pairs per process in one forward/backward pass."""
    gradient_accumulation_steps: int = 128
    """Forward/backward passes per optimizer step; one step sees batch x accumulation x processes pairs."""
    max_steps: int = 200
    """Optimizer steps to train."""
    max_grad_norm: float | None = 1.0
    """Clip the gradient norm to this value; null disables clipping."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 1e-2
    """Decoupled weight decay (AdamW, Adafactor)."""


@dataclass
class RunConfig:
    output_dir: str = ""
    """Run folder: resolved config, metrics.jsonl, checkpoints/ and the final export."""
    seed: int = 0
    """Seed of the data order and of every pair's t, noise, empty prompt and flip."""
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    """accelerate mixed precision; `auto`: fp16 on CUDA (bf16 when sharded), none elsewhere."""
    sharding: Literal["auto", "none", "fsdp"] = "auto"
    """`fsdp`: shard the trained network, its gradients, optimizer state and the frozen reference
    across the processes (FSDP2; docs/training.md, "Sharded training"); `none`: a whole copy per
    process (data parallel); `auto`: fsdp when launched with an accelerate FSDP config
    (configs/accelerate/fsdp.yaml), else none."""
    checkpoint_every: int = 50
    """Save a checkpoint every N optimizer steps (and at the end); 0: only at the end."""
    keep_checkpoints: int = 3
    """Keep the last N checkpoints; older ones are deleted."""
    resume: bool = False
    """Continue from the latest checkpoint in output_dir."""
    overwrite: bool = False
    """Delete an existing non-empty output_dir first."""
    report_to: Literal["none", "tensorboard", "wandb", "all"] = "none"
    """Trackers through accelerate (tensorboard and wandb are optional extras: `pip install smpo[tracking]`)."""
    log_every: int = 1
    """Log metrics to the trackers and metrics.jsonl every N steps."""
    progress: bool = True
    """Show a progress bar."""


CHOICES: dict[str, tuple[str, ...]] = {
    "family": ("auto", *FAMILY_NAMES), "method": tuple(METHODS), "noising": NOISINGS, "labels": LABELS,
    "inverting_network": ("policy", "reference"), "timestep_sampling": TIMESTEP_SAMPLINGS,
}
"""Allowed values of string fields not typed as a ``Literal`` (checked on the command line and in YAML)."""

SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "objective": ObjectiveConfig,
    "optim": OptimConfig,
    "run": RunConfig,
}


@dataclass
class TrainConfig:
    """Everything a training run needs; see the section classes for each field."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> TrainConfig:
        """Raise :class:`ConfigError` for values that cannot train; return self."""
        checks = [
            (bool(self.model.pretrained), "model.pretrained is required (a diffusers folder or hub id)"),
            (bool(self.data.dataset) or bool(self.data.cache), "data.dataset or data.cache is required"),
            (bool(self.run.output_dir), "run.output_dir is required"),
            (0.0 <= self.data.empty_prompt_rate <= 1.0, "data.empty_prompt_rate must be in [0, 1]"),
            (0.0 < self.data.kto_desirable_share < 1.0, "data.kto_desirable_share must be in (0, 1)"),
            (self.data.num_workers is None or self.data.num_workers >= 0, "data.num_workers must be >= 0"),
            (self.optim.batch_size >= 1, "optim.batch_size must be >= 1"),
            (self.optim.gradient_accumulation_steps >= 1, "optim.gradient_accumulation_steps must be >= 1"),
            (self.optim.max_steps >= 1, "optim.max_steps must be >= 1"),
            (self.optim.warmup_steps >= 0, "optim.warmup_steps must be >= 0"),
            (self.optim.learning_rate > 0, "optim.learning_rate must be > 0"),
            (self.model.lora_rank >= 1, "model.lora_rank must be >= 1"),
            (self.model.lora_weights is None or self.model.finetune == "lora",
             "model.lora_weights needs model.finetune lora"),
            (self.model.reference_unet is None or self.model.finetune == "full",
             "model.reference_unet is for full fine-tuning (a LoRA run's reference is its adapters-off network)"),
            (self.run.keep_checkpoints >= 1, "run.keep_checkpoints must be >= 1"),
            (self.run.checkpoint_every >= 0, "run.checkpoint_every must be >= 0"),
            (self.run.log_every >= 1, "run.log_every must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        return self

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}


# ---------------------------------------------------------------------------------------------
# YAML


def config_from_dict(data: dict[str, Any] | None, *, source: str = "<dict>",
                     base: TrainConfig | None = None) -> TrainConfig:
    """Overlay a nested ``{section: {field: value}}`` mapping on ``base`` (default: defaults).

    Unknown sections or fields raise :class:`ConfigError` naming the key and ``source``.
    """
    base = base if base is not None else TrainConfig()
    config = TrainConfig(**{name: dataclasses.replace(getattr(base, name)) for name in SECTIONS})
    for section, values in (data or {}).items():
        if section not in SECTIONS:
            raise ConfigError(f"unknown key {section!r} in {source}; sections are {', '.join(SECTIONS)}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: {section!r} must be a mapping of options")
        setattr(config, section, apply_overrides(getattr(config, section), values, source=source,
                                                 choices=CHOICES, section=section))
    return config


def load_config(path: str | os.PathLike, *, base: TrainConfig | None = None) -> TrainConfig:
    """Read a YAML recipe; raises :class:`ConfigError` on unknown keys or bad values."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (model, data, objective, optim, run)")
    return config_from_dict(data, source=str(path), base=base)


def dump_config(config: TrainConfig) -> str:
    """The config as YAML text that :func:`load_config` reads back to an equal config."""
    def plain(value: Any) -> Any:
        return list(value) if isinstance(value, tuple) else value

    data = {s: {k: plain(v) for k, v in d.items()} for s, d in config.to_dict().items()}
    return yaml.safe_dump(data, sort_keys=False)


def save_config(config: TrainConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically."""
    from smpo.io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(dump_config(config))


# ---------------------------------------------------------------------------------------------
# Command line


# Extra spellings of some options, so that every command takes ``--model`` and ``--output``.
ALIASES: dict[str, tuple[str, ...]] = {"output_dir": ("--output",), "pretrained": ("--model",),
                                      "unet": ("--network",), "reference_unet": ("--reference-network",)}


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--field-name`` option per config field, grouped by section, help from the docstrings.

    Defaults are suppressed, so :func:`config_from_args` sees only what the user typed.
    """
    parser.add_argument("--config", metavar="YAML", help="a recipe, e.g. configs/sd15/smpo.yaml; "
                        "options given on the command line override it")
    seen: dict[str, str] = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if f.name in seen:
                raise ConfigError(f"option {f.name} is in both {seen[f.name]} and {section}")
            seen[f.name] = section
        add_dataclass_arguments(parser.add_argument_group(section), cls, dest_prefix=f"{section}.",
                                aliases=ALIASES, choices=CHOICES)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults, then ``args.config`` (YAML) if given, then the options given on the command line."""
    config_path = getattr(args, "config", None)
    config = load_config(config_path) if config_path else TrainConfig()
    overrides: dict[str, dict[str, Any]] = {}
    for key, value in vars(args).items():
        if "." in key:
            section, name = key.split(".", 1)
            overrides.setdefault(section, {})[name] = value
    return config_from_dict(overrides, source="the command line", base=config)
