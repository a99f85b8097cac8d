"""Model-family adapters: one interface over SD1.5-style and SDXL pipelines.

Everything below the adapter (noising, inversion, losses, the training loop) works on latents,
a :class:`Conditioning` and the adapter's methods, and never asks which family it is running
(STYLE.md, "Our shape"). A family differs only in

- how prompts become conditioning (SD1.5: the CLIP text encoder's last hidden state; SDXL: the
  penultimate hidden states of both encoders, concatenated, plus the second encoder's pooled
  projection and the six ``add_time_ids`` from each image's real original size and crop), and
- its scheduler's ``prediction_type`` (epsilon or v-prediction), handled by :meth:`target` and
  :meth:`eps_from_output`.

``load_family`` reads a diffusers pipeline folder or hub id, optionally with a separate VAE
(e.g. ``madebyollin/sdxl-vae-fp16-fix``) and a separate initial UNet (the paper's SD1.5 run starts
from an SFT-tuned UNet, ALGORITHM.md section 6).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

Size = tuple[int, int]  # (height, width)


# --------------------------------------------------------------------------------------------
# Conditioning


@dataclass
class Conditioning:
    """Everything the UNet needs besides ``x_t`` and ``t``, batched along dim 0.

    ``hidden_states``: ``[B, L, D]`` text-encoder states (``encoder_hidden_states``).
    ``added``: SDXL's ``added_cond_kwargs``: ``{"text_embeds": [B, P], "time_ids": [B, 6]}``;
    ``None`` for SD1.5-style models.
    """

    hidden_states: Tensor
    added: dict[str, Tensor] | None = None

    def __len__(self) -> int:
        return self.hidden_states.shape[0]

    def _map(self, fn: Callable[[Tensor], Tensor]) -> Conditioning:
        added = None if self.added is None else {k: fn(v) for k, v in self.added.items()}
        return Conditioning(fn(self.hidden_states), added)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Conditioning:
        """Move to ``device`` and cast floating tensors to ``dtype``."""
        return self._map(lambda x: x.to(device=device, dtype=dtype if x.is_floating_point() else None))

    def repeat(self, n: int) -> Conditioning:
        """``n`` copies stacked along the batch: ``[c_0..c_B-1, c_0..c_B-1, ...]`` (winner+loser in one call)."""
        return self._map(lambda x: torch.cat([x] * n))

    def index(self, idx: Tensor | Sequence[int] | slice) -> Conditioning:
        """The samples ``idx`` (an index tensor, a list of indices, a boolean mask or a slice)."""
        if isinstance(idx, Sequence) and not isinstance(idx, Tensor):
            idx = torch.as_tensor(list(idx), dtype=torch.long)
        return self._map(lambda x: x[idx.to(x.device) if isinstance(idx, Tensor) else idx])

    @staticmethod
    def cat(items: Sequence[Conditioning]) -> Conditioning:
        """Concatenate along the batch (all items of the same family)."""
        if not items:
            raise ValueError("Conditioning.cat needs at least one item")
        hidden = torch.cat([c.hidden_states for c in items])
        if items[0].added is None:
            return Conditioning(hidden)
        keys = items[0].added.keys()
        return Conditioning(hidden, {k: torch.cat([c.added[k] for c in items]) for k in keys})  # type: ignore[index]

    def drop_text(self, mask: Tensor, empty: Conditioning) -> Conditioning:
        """Replace the TEXT parts of the samples where ``mask`` is true by ``empty`` (a batch of 1).

        Used for the empty-prompt rate (ALGORITHM.md section 4, "Common extras"): the prompt is
        dropped but SDXL's size/crop ``time_ids`` stay those of the image.
        """
        mask = mask.to(device=self.hidden_states.device, dtype=torch.bool)

        def pick(own: Tensor, other: Tensor) -> Tensor:
            other = other.to(device=own.device, dtype=own.dtype).expand_as(own)
            return torch.where(mask.view(-1, *[1] * (own.dim() - 1)), other, own)

        hidden = pick(self.hidden_states, empty.hidden_states)
        if self.added is None:
            return Conditioning(hidden)
        added = dict(self.added)
        if "text_embeds" in added and empty.added is not None:
            added["text_embeds"] = pick(added["text_embeds"], empty.added["text_embeds"])
        return Conditioning(hidden, added)

    def unet_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``UNet2DConditionModel.forward``."""
        kwargs: dict[str, Any] = {"encoder_hidden_states": self.hidden_states}
        if self.added is not None:
            kwargs["added_cond_kwargs"] = self.added
        return kwargs


def guided_fn(predict: Callable[[Tensor, Tensor, Conditioning], Tensor], cond: Conditioning,
              uncond: Conditioning | None, guidance: float) -> Callable[..., Tensor]:
    """``fn(x, level, index=None)``: ``predict(x, level, c)`` on the rows ``index`` of ``cond`` (all
    when ``None``), with classifier-free guidance ``p_uncond + w (p_cond - p_uncond)`` when
    ``guidance != 1`` (both branches in one call; ``uncond`` a batch of 1 or of ``len(cond)``).
    The inversion's noise predictor (`FamilyAdapter.eps_fn`) and the flow inversion's velocity
    (``FlowAdapter.velocity_fn``) are both this."""
    if guidance != 1.0 and uncond is None:
        raise ValueError(f"inversion guidance {guidance} needs the empty-prompt conditioning (uncond)")

    def fn(x: Tensor, level: Tensor, index: Tensor | None = None) -> Tensor:
        rows = index if index is not None else torch.arange(x.shape[0])
        c = cond if index is None and len(cond) == x.shape[0] else cond.index(rows)
        if guidance == 1.0:
            return predict(x, level, c)
        assert uncond is not None
        u = uncond.index(torch.zeros_like(rows)) if len(uncond) == 1 else uncond.index(rows)
        both = Conditioning.cat([c, u.to(c.hidden_states.device)])
        p_cond, p_uncond = predict(torch.cat([x, x]), torch.cat([level, level]), both).chunk(2)
        return p_uncond + guidance * (p_cond - p_uncond)

    return fn


# --------------------------------------------------------------------------------------------
# Image preprocessing shared by the cache and the training loop


@dataclass
class PreparedImage:
    """A resized and cropped image: ``pixels`` ``[3, R, R]`` in [-1, 1], plus what SDXL conditions on."""

    pixels: Tensor
    original_size: Size  # (height, width) before resizing
    crop_top_left: Size  # (top, left) of the crop in the resized image


def prepare_image(image: Any, resolution: int, *, center_crop: bool = True, flip: bool = False,
                  generator: torch.Generator | None = None) -> PreparedImage:
    """Resize the shorter side of a PIL image to ``resolution`` (bilinear), crop a square, scale to [-1, 1].

    Centre crop by default; ``center_crop=False`` draws the crop from ``generator`` (the authors'
    random crop). ``flip`` mirrors the result horizontally (the pair's flip is drawn by the loop).
    The original size and the crop's top-left corner are returned for SDXL's ``add_time_ids``.
    """
    from PIL import Image

    image = image.convert("RGB")
    original = (image.height, image.width)
    scale = resolution / min(original)
    new_h, new_w = max(resolution, round(original[0] * scale)), max(resolution, round(original[1] * scale))
    image = image.resize((new_w, new_h), Image.BILINEAR)
    if center_crop:
        top, left = (new_h - resolution) // 2, (new_w - resolution) // 2
    else:
        top = int(torch.randint(0, new_h - resolution + 1, (1,), generator=generator))
        left = int(torch.randint(0, new_w - resolution + 1, (1,), generator=generator))
    image = image.crop((left, top, left + resolution, top + resolution))
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(resolution, resolution, 3)
    pixels = pixels.permute(2, 0, 1).float().div(127.5).sub(1.0)
    if flip:
        pixels = pixels.flip(-1)
    return PreparedImage(pixels, original, (top, left))


# --------------------------------------------------------------------------------------------
# Adapters


@dataclass
class FamilyAdapter:
    """A loaded text-to-image model: components plus the family-specific glue.

    ``unet`` is the network to train (the policy); ``vae`` and the text encoders are frozen and
    used under ``no_grad``. ``alphas_cumprod`` (float32, ``[T]``, on ``device``) and
    ``prediction_type`` come from the pipeline's scheduler config. ``resolution`` is the pixel
    size matching the UNet's ``sample_size``.

    ``unet_evals`` counts UNet sample-evaluations made through :meth:`unet_output` (a call with a
    batch of 4 adds 4) and ``unet_calls`` the calls; the benchmark reads and resets them.
    """

    name: ClassVar[str] = "base"
    image_keys: ClassVar[tuple[str, ...]] = ()
    """Keys of ``Conditioning.added`` that depend on the image (its size and crop), not the prompt."""
    pipeline_class: ClassVar[str] = "StableDiffusionPipeline"
    """The diffusers pipeline class of the family (export, ``smpo generate``)."""
    network_class: ClassVar[str] = "UNet2DConditionModel"
    """The diffusers class of the trained network."""
    network_folder: ClassVar[str] = "unet"
    """The pipeline's subfolder of the trained network, and the prefix of its LoRA keys
    (``unet_lora_layers`` / ``transformer_lora_layers`` of ``save_lora_weights``)."""
    guidance_scale: ClassVar[float] = 7.5
    """Default CFG of ``smpo generate`` (paper Appendix D: 7.5 for SD1.5, 5 for SDXL)."""
    prediction_type_family: ClassVar[str] = "diffusion"
    """``diffusion`` (eps / v prediction, DDPM-family samplers) or ``flow`` (velocity, flow matching)."""

    @classmethod
    def prepare_pipeline(cls, pipe: Any) -> None:
        """Family-specific settings of a loaded diffusers pipeline for ``smpo generate`` (none here)."""

    unet: Any
    vae: Any
    text_encoders: list[Any]
    tokenizers: list[Any]
    alphas_cumprod: Tensor
    prediction_type: str
    resolution: int
    source: str = ""
    set_alpha_to_one: bool = True
    """The sampling scheduler's ``set_alpha_to_one`` (False for SD1.5 and SDXL): what diffusers 0.20's
    ``DDIMInverseScheduler`` takes as ``abar`` of the authors' grid's negative first level."""
    unet_evals: int = field(default=0, init=False)
    unet_calls: int = field(default=0, init=False)

    @property
    def initial_abar(self) -> float:
        """diffusers 0.20's ``initial_alpha_cumprod``: 1, or ``abar[0]`` when ``set_alpha_to_one`` is False."""
        from smpo.inversion import initial_abar

        return initial_abar(self.alphas_cumprod, self.set_alpha_to_one)

    def __post_init__(self) -> None:
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"{self.source or 'model'}: scheduler prediction_type {self.prediction_type!r} is not "
                             "supported; expected 'epsilon' or 'v_prediction'")

    # ---- basic properties
    @property
    def num_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @property
    def device(self) -> torch.device:
        return self.alphas_cumprod.device

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def latent_size(self) -> int:
        return self.resolution // 2 ** (len(self.vae.config.block_out_channels) - 1)

    def to(self, device: torch.device | str) -> FamilyAdapter:
        """Move every component (and ``alphas_cumprod``) to ``device``; dtypes are kept."""
        for module in [self.unet, self.vae, *self.text_encoders]:
            if module is not None:
                module.to(device)
        self.alphas_cumprod = self.alphas_cumprod.to(device)
        return self

    def reset_counters(self) -> None:
        self.unet_evals = 0
        self.unet_calls = 0

    # ---- images
    @torch.no_grad()
    def encode_images(self, pixels: Tensor, *, sample: bool = False, generator: torch.Generator | None = None,
                      generators: Sequence[torch.Generator] | None = None) -> Tensor:
        """VAE latents of ``pixels`` ``[B, 3, H, W]`` in [-1, 1], times the VAE scaling factor.

        The posterior mean by default (deterministic, what a cache stores); ``sample=True`` draws
        from the posterior as the authors' script does (its std is tiny), with ``generator``, or
        with one CPU generator per image (``generators``: the draw does not depend on the batch).
        """
        vae = self.vae
        dist = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
        if sample and generators is not None:
            eps = torch.stack([torch.randn(dist.mean.shape[1:], generator=g) for g in generators])
            latents = dist.mean + dist.std * eps.to(device=dist.mean.device, dtype=dist.mean.dtype)
        else:
            latents = dist.sample(generator) if sample else dist.mean
        shift = getattr(vae.config, "shift_factor", None)
        if shift is not None:
            latents = latents - shift
        return (latents * vae.config.scaling_factor).float()

    # ---- prompts
    def encode_prompts(self, prompts: list[str], *, original_sizes: Sequence[Size] | None = None,
                       crops_coords: Sequence[Size] | None = None) -> Conditioning:
        """Conditioning for ``prompts`` (one per sample; "" is the empty prompt).

        ``original_sizes`` / ``crops_coords`` are each image's (height, width) before resizing and
        (top, left) of its crop; only families that condition on them (SDXL) use them, and the
        default is the square target size with no crop.
        """
        raise NotImplementedError

    def image_conditioning(self, cond: Conditioning, *, original_sizes: Sequence[Size] | None = None,
                           crops_coords: Sequence[Size] | None = None) -> Conditioning:
        """``cond`` with its image-dependent parts (SDXL's ``time_ids``) recomputed for other images.

        Builds the loser's conditioning from the winner's text. Families that condition only on
        text return ``cond`` unchanged.
        """
        return cond

    @staticmethod
    def _tokenize(tokenizer: Any, prompts: list[str], encoder: Any) -> Tensor:
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        return ids.to(encoder.device)

    # ---- the UNet and its parametrisation
    def unet_output(self, unet: Any, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """Raw output of ``unet`` (the policy, a frozen reference or a LoRA reference view) in float32.

        Inputs are cast to the network's dtype; ``t`` is a ``LongTensor[B]``.
        """
        dtype = _module_dtype(unet)
        self.unet_evals += x_t.shape[0]
        self.unet_calls += 1
        out = unet(x_t.to(dtype), t.to(x_t.device), **cond.to(x_t.device, dtype).unet_kwargs(), return_dict=False)[0]
        return out.float()

    def predict_noise(self, unet: Any, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """``unet``'s noise estimate at ``(x_t, t)``, whatever the model predicts (eps or v)."""
        return self.eps_from_output(self.unet_output(unet, x_t, t, cond), x_t, t)

    def _coefficients(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """``(sqrt(abar[t]), sqrt(1 - abar[t]))`` shaped to broadcast over ``like``; ``t < 0`` is the clean image."""
        t = t.to(like.device).long()
        ac = self.alphas_cumprod.to(like.device).float()
        abar = torch.where(t >= 0, ac[t.clamp(min=0)], torch.ones_like(ac[0]))
        shape = (-1,) + (1,) * (like.dim() - 1)
        return abar.sqrt().view(shape), (1.0 - abar).sqrt().view(shape)

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """Forward noising (ALGORITHM.md section 1): ``sqrt(abar[t]) x0 + sqrt(1 - abar[t]) eps``."""
        a, s = self._coefficients(t, x0)
        return a * x0 + s * eps

    def target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """What the network is trained to output: ``eps``, or ``v = sqrt(abar) eps - sqrt(1-abar) x0``."""
        if self.prediction_type == "epsilon":
            return eps
        a, s = self._coefficients(t, x0)
        return a * eps - s * x0

    def eps_from_output(self, output: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The noise estimate implied by a raw output (for inversion): ``eps = sqrt(abar) v + sqrt(1-abar) x_t``."""
        if self.prediction_type == "epsilon":
            return output
        a, s = self._coefficients(t, x_t)
        return a * output + s * x_t

    def invert(self, network: Any, x0: Tensor, t: Tensor, cond: Conditioning, *, uncond: Conditioning | None,
               num_steps: int, renoise_iters: int, guidance: float, land_on_t: bool, step_noise: float,
               generators: Sequence[torch.Generator] | None) -> tuple[Tensor, Tensor]:
        """(Re)Noise DDIM inversion of ``x0`` up to ``t`` by ``network`` (ALGORITHM.md section 3) and
        its implied noise: ``(x_t, eps_hat)``. Call under ``no_grad``. The arguments are those of
        ``smpo.inversion.renoise_invert``; ``uncond`` is the batch's empty-prompt conditioning
        (one row per sample) when ``guidance != 1``. Flow families override this."""
        from smpo.inversion import implied_noise, renoise_invert

        eps_fn = self.eps_fn(network, cond, uncond, guidance)
        x_t = renoise_invert(eps_fn, x0, t, self.alphas_cumprod, num_steps=num_steps, renoise_iters=renoise_iters,
                             land_on_t=land_on_t, initial_abar=self.initial_abar, step_noise=step_noise,
                             generators=generators)
        return x_t, implied_noise(x_t, x0, t, self.alphas_cumprod)

    def eps_fn(self, unet: Any, cond: Conditioning, uncond: Conditioning | None = None,
               guidance: float = 1.0) -> Callable[..., Tensor]:
        """``eps_fn(x, t, index=None) -> eps`` for ``smpo.inversion`` (ALGORITHM.md section 3).

        ``index`` names the rows of ``cond`` that ``x`` holds (the inversion evaluates only the
        samples still moving). ``guidance == 1`` uses the conditional prediction alone (paper
        Table 6); otherwise ``e_uncond + w (e_cond - e_uncond)``, both branches in one UNet call.
        ``uncond`` is a batch of 1 (broadcast) or of ``len(cond)``.
        """
        return guided_fn(lambda x, t, c: self.predict_noise(unet, x, t, c), cond, uncond, guidance)


class SD15Adapter(FamilyAdapter):
    """SD1.x/SD2.x-style: one CLIP text encoder, its last hidden state is the conditioning."""

    name: ClassVar[str] = "sd15"

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], *, original_sizes: Sequence[Size] | None = None,
                       crops_coords: Sequence[Size] | None = None) -> Conditioning:
        ids = self._tokenize(self.tokenizers[0], list(prompts), self.text_encoders[0])
        hidden = self.text_encoders[0](ids, return_dict=False)[0]
        return Conditioning(hidden)


class SDXLAdapter(FamilyAdapter):
    """SDXL: two CLIP text encoders (penultimate states concatenated), pooled text embeds and time ids."""

    name: ClassVar[str] = "sdxl"
    image_keys: ClassVar[tuple[str, ...]] = ("time_ids",)
    pipeline_class: ClassVar[str] = "StableDiffusionXLPipeline"
    guidance_scale: ClassVar[float] = 5.0

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], *, original_sizes: Sequence[Size] | None = None,
                       crops_coords: Sequence[Size] | None = None) -> Conditioning:
        prompts = list(prompts)
        states, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            out = encoder(self._tokenize(tokenizer, prompts, encoder), output_hidden_states=True, return_dict=True)
            states.append(out.hidden_states[-2])  # penultimate layer, as SDXL was trained
            pooled = out.text_embeds if hasattr(out, "text_embeds") else out[0]  # the last encoder's projection
        hidden = torch.cat(states, dim=-1)
        time_ids = self.time_ids(len(prompts), original_sizes, crops_coords).to(hidden.device)
        added = {"text_embeds": pooled, "time_ids": time_ids}
        return Conditioning(hidden, added)

    def time_ids(self, n: int, original_sizes: Sequence[Size] | None = None,
                 crops_coords: Sequence[Size] | None = None) -> Tensor:
        """``[n, 6]``: original (h, w), crop (top, left), target (h, w), per image (SDXL micro-conditioning)."""
        r = self.resolution
        sizes = list(original_sizes) if original_sizes is not None else [(r, r)] * n
        crops = list(crops_coords) if crops_coords is not None else [(0, 0)] * n
        if len(sizes) != n or len(crops) != n:
            raise ValueError(f"expected {n} original sizes and crops, got {len(sizes)} and {len(crops)}")
        rows = [[*map(float, s), *map(float, c), float(r), float(r)] for s, c in zip(sizes, crops)]
        return torch.tensor(rows, dtype=torch.float32, device=self.device)

    def image_conditioning(self, cond: Conditioning, *, original_sizes: Sequence[Size] | None = None,
                           crops_coords: Sequence[Size] | None = None) -> Conditioning:
        added = dict(cond.added or {})
        added["time_ids"] = self.time_ids(len(cond), original_sizes, crops_coords).to(cond.hidden_states.device)
        return replace(cond, added=added)


# --------------------------------------------------------------------------------------------
# Loading


def _module_dtype(module: Any) -> torch.dtype:
    dtype = getattr(module, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    return next(module.parameters()).dtype


def _read_model_index(model: str, revision: str | None) -> dict[str, Any]:
    path = Path(model)
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise FileNotFoundError(f"{path} is not a diffusers pipeline folder: model_index.json is missing")
        return json.loads(index.read_text())
    from huggingface_hub import hf_hub_download

    return json.loads(Path(hf_hub_download(model, "model_index.json", revision=revision)).read_text())


def detect_family(model_index: dict[str, Any]) -> str:
    """``sd3`` / ``flux`` from the pipeline class (``StableDiffusion3*``, ``Flux*``); otherwise ``sdxl``
    when the pipeline has a second text encoder, else ``sd15``."""
    flow = flow_family_of(str(model_index.get("_class_name", "")))
    if flow is not None:
        return flow
    return "sdxl" if "text_encoder_2" in model_index else "sd15"


def load_family(model: str | os.PathLike, *, family: str = "auto", vae: str | os.PathLike | None = None,
                unet: str | os.PathLike | None = None, revision: str | None = None, variant: str | None = None,
                dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                with_unet: bool = True) -> FamilyAdapter:
    """Load a text-to-image pipeline from a diffusers folder or hub id as a :class:`FamilyAdapter`.

    ``family``: ``"sd15"``, ``"sdxl"``, ``"sd3"``, ``"flux"`` or ``"auto"`` (read from ``model_index.json``).
    For ``sd3``/``flux`` the network is the pipeline's ``transformer`` (``unet`` then names a
    separate initial transformer) and the adapter is a ``smpo.models.flow.FlowAdapter``.
    ``vae``: a separate VAE (folder or hub id, e.g. ``madebyollin/sdxl-vae-fp16-fix``).
    ``unet``: a separate initial UNet (a folder with ``config.json`` + weights, or a pipeline
    folder / hub id with a ``unet`` subfolder). All components are loaded in ``dtype`` and frozen
    (``requires_grad=False``); the training loop unfreezes what it trains. ``with_unet=False``
    skips the UNet's weights (``adapter.unet`` is then ``None``; for caching latents and prompts).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    from smpo.io import check_model_source

    model = check_model_source(model, "--model")
    vae = None if vae is None else check_model_source(vae, "--vae")
    unet = None if unet is None else check_model_source(unet, "--unet")
    index = _read_model_index(model, revision)
    name = detect_family(index) if family == "auto" else family
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; choose from auto, {', '.join(FAMILIES)}")
    if name in FLOW_FAMILIES:
        return load_flow_family(model, name, vae=vae, unet=unet, revision=revision, variant=variant, dtype=dtype,
                                with_unet=with_unet).to(device)

    def load(cls: Any, repo: str, subfolder: str | None, **kw: Any) -> Any:
        return cls.from_pretrained(repo, subfolder=subfolder, revision=revision, variant=variant, **kw)

    scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler", revision=revision)
    if not with_unet:
        unet_model = None
        unet_config = UNet2DConditionModel.load_config(model, subfolder="unet", revision=revision)
    elif unet is not None:
        unet_model = _load_unet(UNet2DConditionModel, str(unet), revision, variant, dtype)
    else:
        unet_model = load(UNet2DConditionModel, model, "unet", **diffusers_dtype_kwarg(dtype))
    if unet_model is not None:
        unet_config = unet_model.config
    vae_repo, vae_sub = (str(vae), None) if vae is not None else (model, "vae")
    vae_config = AutoencoderKL.load_config(vae_repo, subfolder=vae_sub, revision=revision)
    # A VAE that asks for ``force_upcast`` (the original SDXL VAE overflows in fp16) stays float32.
    vae_dtype = torch.float32 if dtype == torch.float16 and vae_config.get("force_upcast", False) else dtype
    vae_model = AutoencoderKL.from_pretrained(vae_repo, subfolder=vae_sub, revision=revision,
                                              variant=None if vae is not None else variant, **diffusers_dtype_kwarg(vae_dtype))
    text_dtype = _transformers_dtype_kwarg(dtype)
    if name == "sd15":
        tokenizers = [AutoTokenizer.from_pretrained(model, subfolder="tokenizer", revision=revision)]
        encoders = [load(CLIPTextModel, model, "text_encoder", **text_dtype)]
    else:
        tokenizers = [AutoTokenizer.from_pretrained(model, subfolder=sub, revision=revision)
                      for sub in ("tokenizer", "tokenizer_2")]
        encoders = [load(CLIPTextModel, model, "text_encoder", **text_dtype),
                    load(CLIPTextModelWithProjection, model, "text_encoder_2", **text_dtype)]
    for module in [m for m in (unet_model, vae_model, *encoders) if m is not None]:
        module.requires_grad_(False)
        module.eval()
    adapter = make_adapter(name, unet=unet_model, vae=vae_model, text_encoders=encoders, tokenizers=tokenizers,
                           scheduler=scheduler, unet_sample_size=int(unet_config["sample_size"]), source=model)
    return adapter.to(device)


def make_adapter(family: str, *, unet: Any, vae: Any, text_encoders: list[Any], tokenizers: list[Any],
                 scheduler: Any, unet_sample_size: int | None = None, source: str = "") -> FamilyAdapter:
    """An adapter over already-built components (e.g. a pipeline object's ``unet``, ``vae``...).

    ``scheduler``: any diffusers scheduler of the pipeline (only its training schedule and
    ``prediction_type`` are read). ``unet_sample_size`` defaults to ``unet.config.sample_size``.
    """
    from diffusers import DDPMScheduler

    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; choose from {', '.join(FAMILIES)}")
    if family in FLOW_FAMILIES:
        from smpo.models.flow import make_flow_adapter

        return make_flow_adapter(family, unet=unet, vae=vae, text_encoders=text_encoders, tokenizers=tokenizers,
                                 scheduler=scheduler, source=source)
    schedule = DDPMScheduler.from_config(scheduler.config)
    sample_size = unet_sample_size if unet_sample_size is not None else int(unet.config.sample_size)
    vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return FAMILIES[family](
        unet=unet, vae=vae, text_encoders=list(text_encoders), tokenizers=list(tokenizers),
        alphas_cumprod=schedule.alphas_cumprod.float().clone(), prediction_type=schedule.config.prediction_type,
        resolution=sample_size * vae_factor, source=source,
        set_alpha_to_one=bool(scheduler.config.get("set_alpha_to_one", True)),
    )


def _load_unet(cls: Any, path: str, revision: str | None, variant: str | None, dtype: torch.dtype) -> Any:
    """A UNet from its own folder (``config.json`` at the top) or from a pipeline's ``unet`` subfolder."""
    local = Path(path)
    subfolder = "unet" if (local / "unet").is_dir() or (not local.exists() and not _hub_has_config(path, revision)) \
        else None
    return cls.from_pretrained(path, subfolder=subfolder, revision=revision, variant=variant,
                               **diffusers_dtype_kwarg(dtype))


def _hub_has_config(repo: str, revision: str | None) -> bool:
    from huggingface_hub import file_exists

    return bool(file_exists(repo, "config.json", revision=revision))


def diffusers_dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """Recent diffusers name ``from_pretrained``'s argument ``dtype`` (``torch_dtype`` is deprecated
    there with a FutureWarning); older releases only know ``torch_dtype``."""
    try:
        from diffusers.utils.deprecation_utils import _TORCH_DTYPE_DEPRECATION_MESSAGE  # noqa: F401
    except ImportError:
        return {"torch_dtype": dtype}
    return {"dtype": dtype}


def _transformers_dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """transformers 5 names the argument ``dtype``; 4.x ``torch_dtype``."""
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return {"dtype": dtype} if major >= 5 else {"torch_dtype": dtype}


# The flow-matching families (SD3, FLUX) live in smpo.models.flow, which builds on this module.
from smpo.models.flow import FLOW_FAMILIES, flow_family_of, load_flow_family  # noqa: E402

FAMILIES: dict[str, type[FamilyAdapter]] = {"sd15": SD15Adapter, "sdxl": SDXLAdapter, **FLOW_FAMILIES}
"""The adapters by family name (``--family``)."""
