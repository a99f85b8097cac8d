"""`smpo generate`: images for a prompt set with a fixed seed per image (ALGORITHM.md section 7).

Each image ``(prompt index p, image index i)`` gets its own ``torch.Generator`` (on the CPU, so the
starting noise is the same on every device) seeded by :func:`image_seed`. Nothing else is random in
a deterministic sampler (DDIM, the SD schedulers' default), so an image does not depend on the
batch size, on which other prompts share its batch, or on how many GPUs split the work (exactly so
on the CPU; GPU kernels may round differently at another batch size).

Defaults follow the paper (Appendix D): one image per prompt, seed 0, CFG 7.5 (SD1.5) or 5 (SDXL);
with a ControlNet: CFG 5 and conditioning scale 0.3 (canny) or 0.5 (depth).

Output folder: ``images/PPPPP_II.png``, ``manifest.jsonl`` (see :mod:`smpo.evaluation.manifest`)
and ``generation.json`` (the settings, written first). Every PNG is written atomically; a rerun
skips the images that exist, so a killed run resumes where it stopped (and its output is an
uninterrupted run's). A rerun with settings that change the images (model, seed, CFG, steps...) is
refused unless ``--overwrite``, a killed run's rerun too.

Several GPUs: ``accelerate launch -m smpo.cli generate ...``; process ``k`` of ``n`` takes the
prompts whose index is ``k`` modulo ``n``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from smpo.evaluation.control import (
    CONTROL_GUIDANCE_SCALE,
    CONTROL_TYPES,
    DEFAULT_CONDITIONING_SCALE,
    ControlImages,
)
from smpo.evaluation.manifest import SETTINGS, ImageRecord, image_file, read_manifest, write_manifest
from smpo.evaluation.pipelines import FAMILY_GUIDANCE_SCALE, SCHEDULERS, detect_family, load_pipeline
from smpo.io import (
    atomic_path,
    prepare_output_dir,
    read_json,
    refuse_changed_settings,
    remove_temporaries,
    resolve_device,
    resolve_dtype,
    write_json,
)
from smpo.options import add_dataclass_arguments, dataclass_from_args
from smpo.prompts import Prompt, load_prompts

MAX_IMAGES_PER_PROMPT = 10_000


@dataclass
class GenerateConfig:
    """Settings of `smpo generate` (each field is one command-line option)."""

    model: str
    """Base model: a diffusers pipeline folder or hub id (SD1.5, SDXL, SD3 or FLUX family)."""
    prompts: str
    """Prompt set: parti, hpdv2, an HPDv2 benchmark folder, or a .txt/.json/.jsonl/.tsv/.csv file."""
    out: str
    """Output folder."""
    unet: str | None = None
    """Trained output: a full UNet or SD3/FLUX transformer folder (or its parent with unet/ or transformer/) or a diffusers LoRA folder."""
    lora_scale: float = 1.0
    """Weight of a LoRA given with --unet."""
    categories: list[str] | None = None
    """Keep only these prompt categories."""
    limit: int | None = None
    """Keep only the first N prompts (after the category filter)."""
    images_per_prompt: int = 1
    """Images per prompt."""
    seed: int = 0
    """Base seed (the paper: 0)."""
    seed_per_prompt: bool = False
    """Vary the seed with the prompt index too (default: every prompt's image i uses seed + i, as the paper)."""
    guidance_scale: float | None = None
    """CFG scale; default 7.5 (SD1.5), 5 (SDXL), 5 with a ControlNet."""
    steps: int = 50
    """Sampling steps."""
    scheduler: str | None = None
    """Sampler (default: the model's own scheduler)."""
    height: int | None = None
    """Image height (default: the model's)."""
    width: int | None = None
    """Image width (default: the model's)."""
    negative_prompt: str | None = None
    """Negative prompt (default: none, i.e. the empty prompt)."""
    batch_size: int = 4
    """Images per forward pass (does not change the images)."""
    dtype: str | None = None
    """fp32, fp16 or bf16 (default fp16 on CUDA, fp32 elsewhere)."""
    device: str | None = None
    """Device (default: this process's accelerate device)."""
    controlnet: str | None = None
    """ControlNet folder or hub id."""
    control_type: str | None = None
    """canny or depth (needed with --controlnet)."""
    control_images: str | None = None
    """Folder of control source images (an `smpo generate` output, files named by prompt index, or one image)."""
    control_maps: bool = False
    """The control images are already edge/depth maps."""
    conditioning_scale: float | None = None
    """ControlNet conditioning scale; default 0.3 (canny), 0.5 (depth)."""
    canny_low: float = 100.0
    """Canny low threshold."""
    canny_high: float = 200.0
    """Canny high threshold."""
    depth_model: str | None = None
    """Depth estimator (transformers folder or hub id) to turn control images into depth maps."""
    safety_checker: bool = False
    """Keep the SD1.5 safety checker (off by default: it blanks images and skews scores)."""
    overwrite: bool = False
    """Replace an existing output folder."""


def image_seed(seed: int, prompt_index: int, image_index: int, *, per_prompt: bool = False) -> int:
    """The seed of image ``image_index`` of prompt ``prompt_index``.

    Default ``seed + image_index``: the paper uses seed 0 for every prompt's (one) image.
    ``per_prompt`` gives every prompt its own seeds: ``seed + 10000 * prompt_index + image_index``.
    """
    if not 0 <= image_index < MAX_IMAGES_PER_PROMPT:
        raise ValueError(f"image_index must be in [0, {MAX_IMAGES_PER_PROMPT}), got {image_index}")
    return seed + image_index + (MAX_IMAGES_PER_PROMPT * prompt_index if per_prompt else 0)


def as_prompts(prompts: Sequence[Prompt | str]) -> list[Prompt]:
    """Plain strings become prompts indexed by their position."""
    return [p if isinstance(p, Prompt) else Prompt(str(p), i) for i, p in enumerate(prompts)]


def plan_images(prompts: Sequence[Prompt | str], *, images_per_prompt: int = 1, seed: int = 0,
                seed_per_prompt: bool = False) -> list[ImageRecord]:
    """Every image to make, in (prompt index, image index) order."""
    if images_per_prompt < 1:
        raise ValueError(f"images_per_prompt must be at least 1, got {images_per_prompt}")
    plan = []
    for p in as_prompts(prompts):
        for i in range(images_per_prompt):
            plan.append(ImageRecord(file=image_file(p.index, i), prompt_index=p.index, image_index=i,
                                    seed=image_seed(seed, p.index, i, per_prompt=seed_per_prompt),
                                    prompt=p.text, category=p.category, challenge=p.challenge))
    return plan


def generate_images(pipe, prompts: Sequence[Prompt | str], out: str | Path, *, guidance_scale: float,
                    num_inference_steps: int = 50, images_per_prompt: int = 1, seed: int = 0,
                    seed_per_prompt: bool = False, batch_size: int = 4, height: int | None = None,
                    width: int | None = None, negative_prompt: str | None = None,
                    control_image: Callable[[int], Image.Image] | None = None,
                    conditioning_scale: float | None = None, process_index: int = 0, num_processes: int = 1,
                    settings: Mapping[str, object] | None = None, finish: bool = True,
                    progress: bool = True) -> list[ImageRecord]:
    """Make the missing images of ``prompts`` in ``out/images`` with a loaded pipeline (the Python API).

    ``pipe`` is any diffusers-style text-to-image pipeline: called with ``prompt`` (list),
    ``guidance_scale``, ``num_inference_steps``, ``height``, ``width``, ``generator`` (one
    ``torch.Generator`` per image), ``output_type="pil"`` (and ``negative_prompt``, ``image``,
    ``controlnet_conditioning_scale`` when used), it returns an object whose ``images`` are PIL
    images. ``control_image(prompt_index)`` gives the ControlNet conditioning image.

    With ``finish`` (single-process use) the manifest and ``generation.json`` are written too; the
    sampling arguments plus ``settings`` (e.g. the model's name) are recorded there, and a rerun
    into the same folder with other ones is refused. :func:`generate` passes ``finish=False`` and
    writes them itself once every process is done. Returns the records of all planned images.
    """
    out = Path(out)
    plan = plan_images(prompts, images_per_prompt=images_per_prompt, seed=seed, seed_per_prompt=seed_per_prompt)
    recorded = {"guidance_scale": guidance_scale, "steps": num_inference_steps, "seed": seed,
                "seed_per_prompt": seed_per_prompt, "height": height, "width": width,
                "negative_prompt": negative_prompt, "conditioning_scale": conditioning_scale, **(settings or {})}
    if finish:
        out.mkdir(parents=True, exist_ok=True)
        _start_or_resume(out, recorded, plan)
    mine = [r for r in plan if r.prompt_index % num_processes == process_index]
    todo = [r for r in mine if not (out / r.file).is_file()]
    batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    bar = tqdm(total=len(todo), desc="generate", unit="img", disable=not progress)
    for batch in batches:
        images = sample_batch(pipe, batch, guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
                         height=height, width=width, negative_prompt=negative_prompt,
                         control_image=control_image, conditioning_scale=conditioning_scale)
        for record, image in zip(batch, images):
            with atomic_path(out / record.file) as tmp:
                image.save(tmp, format="PNG")
        bar.update(len(batch))
    bar.close()
    if finish:
        finish_output(out, plan, recorded)
    return plan


def sample_batch(pipe, batch: Sequence[ImageRecord], *, guidance_scale: float, num_inference_steps: int,
                 height: int | None, width: int | None, negative_prompt: str | None,
                 control_image: Callable[[int], Image.Image] | None, conditioning_scale: float | None,
                 on_latents: Callable[[torch.Tensor], Any] | None = None) -> list[Image.Image]:
    """One pipeline call for the images of ``batch`` (``smpo generate`` and ``smpo pairs`` both sample here).

    One CPU generator per image: its starting noise does not depend on the batch or the device.
    ``on_latents`` is given the latents of the last sampling step (the ones the pipeline decodes,
    in its own layout), caught by the pipeline's ``callback_on_step_end``."""
    generators = [torch.Generator(device="cpu").manual_seed(r.seed) for r in batch]
    kwargs: dict[str, Any] = dict(prompt=[r.prompt for r in batch], guidance_scale=guidance_scale,
                                  num_inference_steps=num_inference_steps, height=height, width=width,
                                  generator=generators, output_type="pil")
    last: list[torch.Tensor] = []
    if on_latents is not None:
        def keep(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            last[:] = [tensors["latents"]]
            return tensors

        kwargs.update(callback_on_step_end=keep, callback_on_step_end_tensor_inputs=["latents"])
    if negative_prompt is not None:
        kwargs["negative_prompt"] = [negative_prompt] * len(batch)
    if control_image is not None:
        kwargs["image"] = [control_image(r.prompt_index) for r in batch]
        kwargs["controlnet_conditioning_scale"] = conditioning_scale
    images = pipe(**kwargs).images
    if on_latents is not None:
        on_latents(last[0].detach().float().cpu())
    return images


def image_settings(config: GenerateConfig, family: str) -> dict:
    """The settings that decide what the images look like: a rerun must match them to resume."""
    keys = ("model", "unet", "lora_scale", "seed", "seed_per_prompt", "guidance_scale", "steps", "scheduler",
            "height", "width", "negative_prompt", "controlnet", "control_type", "control_images", "control_maps",
            "conditioning_scale", "canny_low", "canny_high", "depth_model", "safety_checker")
    settings = {k: getattr(config, k) for k in keys}
    settings.update(prompts=config.prompts, family=family)
    return settings


def resolve_defaults(config: GenerateConfig, family: str) -> GenerateConfig:
    """Fill the family / ControlNet defaults of CFG and conditioning scale (paper Appendix D)."""
    if config.controlnet is not None:
        if config.control_type not in CONTROL_TYPES:
            raise ValueError(f"--controlnet needs --control-type, one of {', '.join(CONTROL_TYPES)}")
        if config.control_images is None:
            raise ValueError("--controlnet needs --control-images (a folder of source images or maps)")
        if config.conditioning_scale is None:
            config.conditioning_scale = DEFAULT_CONDITIONING_SCALE[config.control_type]
        if config.guidance_scale is None:
            config.guidance_scale = CONTROL_GUIDANCE_SCALE
    if config.guidance_scale is None:
        config.guidance_scale = FAMILY_GUIDANCE_SCALE[family]
    return config


def _start_or_resume(out: Path, settings: dict, plan: Sequence[ImageRecord]) -> None:
    """Refuse to resume into ``out`` when its images were made with other settings or prompts;
    else note the settings before any image (a killed run's rerun is held to them) and remove the
    image a kill left half-written."""
    path = out / SETTINGS
    if path.is_file():
        refuse_changed_settings(out, read_json(path).get("image_settings", {}), settings, what="images")
    earlier = {(r.prompt_index, r.image_index): r.prompt for r in _earlier_records(out)}
    for r in plan:
        old = earlier.get((r.prompt_index, r.image_index))
        if old is not None and old != r.prompt:
            raise ValueError(f"{out}: prompt {r.prompt_index} was {old!r} in an earlier run, now {r.prompt!r}; "
                             "use another output folder or --overwrite")
    if not path.is_file():
        write_json(path, {"image_settings": settings})  # num_images comes at the end (finish_output)
    for folder in (out, out / "images"):
        remove_temporaries(folder)


def generate(config: GenerateConfig) -> Path:
    """Run `smpo generate` from a config; returns the output folder."""
    from smpo.processes import process_state

    state = process_state()
    prompts = load_prompts(config.prompts, categories=config.categories, limit=config.limit)
    family = detect_family(config.model)
    config = resolve_defaults(config, family)
    settings = image_settings(config, family)
    out = Path(config.out)
    if state.is_main_process:
        prepare_output_dir(out, overwrite=config.overwrite, resume=True)
        plan = plan_images(prompts, images_per_prompt=config.images_per_prompt, seed=config.seed,
                           seed_per_prompt=config.seed_per_prompt)
        _start_or_resume(out, settings, plan)
    state.wait_for_everyone()

    device = resolve_device(config.device) if config.device else state.device
    dtype = resolve_dtype(config.dtype, device)
    pipe, _ = load_pipeline(config.model, family=family, unet=config.unet, lora_scale=config.lora_scale,
                            scheduler=config.scheduler, controlnet=config.controlnet, dtype=dtype, device=device,
                            safety_checker=config.safety_checker)
    control = None
    if config.controlnet is not None:
        control = ControlImages(config.control_images, config.control_type, maps=config.control_maps,
                                canny_low=config.canny_low, canny_high=config.canny_high,
                                depth_model=config.depth_model, device=str(device))
    plan = generate_images(pipe, prompts, out, guidance_scale=config.guidance_scale,
                           num_inference_steps=config.steps, images_per_prompt=config.images_per_prompt,
                           seed=config.seed, seed_per_prompt=config.seed_per_prompt, batch_size=config.batch_size,
                           height=config.height, width=config.width, negative_prompt=config.negative_prompt,
                           control_image=control, conditioning_scale=config.conditioning_scale,
                           process_index=state.process_index, num_processes=state.num_processes,
                           finish=False, progress=state.is_local_main_process)
    state.wait_for_everyone()
    if state.is_main_process:
        finish_output(out, plan, settings)
    return out


def finish_output(out: Path, plan: Sequence[ImageRecord], settings: dict) -> None:
    """Write the manifest (this run's images plus earlier runs' into the same folder) and the settings."""
    records = {(r.prompt_index, r.image_index): r for r in _earlier_records(out)}
    for r in plan:
        if (out / r.file).is_file():
            records[(r.prompt_index, r.image_index)] = r
    write_manifest(out, list(records.values()))
    write_json(out / SETTINGS, {"image_settings": settings, "num_images": len(records)})


def _earlier_records(out: Path) -> list[ImageRecord]:
    return read_manifest(out) if (out / "manifest.jsonl").is_file() else []


_CHOICES = {"scheduler": sorted(SCHEDULERS), "control_type": list(CONTROL_TYPES)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, GenerateConfig, choices=_CHOICES,
                            aliases={"out": ("--output",), "guidance_scale": ("--cfg",), "unet": ("--network",)})


def run(args: argparse.Namespace) -> int:
    out = generate(dataclass_from_args(GenerateConfig, args, choices=_CHOICES))
    print(f"images and manifest in {out}")
    return 0


__all__ = ["GenerateConfig", "generate", "generate_images", "image_seed", "plan_images"]
