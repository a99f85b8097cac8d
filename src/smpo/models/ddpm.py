"""The noise-predicting (DDPM-family) adapters: SD1.5-style and SDXL pipelines.

A DDPM-family model noises along the variance-preserving schedule ``alphas_cumprod`` (ALGORITHM.md
section 1) and predicts the noise ``eps`` or ``v = sqrt(abar) eps - sqrt(1 - abar) x0``, as its
scheduler's ``prediction_type`` says (:meth:`DDPMAdapter.target`, :meth:`~DDPMAdapter.eps_from_output`).
Its inversion is (Re)Noise DDIM inversion (``smpo.inversion.renoise_invert``, section 3), which
``smpo cache --store-inversion`` can store at the grid levels and training finish from them.

The families differ only in how prompts become conditioning: SD1.5 takes the CLIP text encoder's
last hidden state; SDXL the penultimate hidden states of both encoders, concatenated, plus the
second encoder's pooled projection and the six ``add_time_ids`` from each image's real original
size and crop.

Loading reads a diffusers pipeline folder or hub id, optionally with a separate VAE (e.g.
``madebyollin/sdxl-vae-fp16-fix``) and a separate initial UNet (the paper's SD1.5 run starts from
an SFT-tuned UNet, ALGORITHM.md section 6).

Imports ``smpo.models.base``, ``smpo.models.conditioning`` and ``smpo.inversion``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from smpo import inversion
from smpo.models.base import FamilyAdapter, InversionSettings, diffusers_dtype_kwarg, freeze, module_dtype
from smpo.models.conditioning import Conditioning, Size, guided_fn


@dataclass(kw_only=True)
class DDPMAdapter(FamilyAdapter):
    """A noise-predicting family. ``alphas_cumprod`` (float32, ``[T]``, on ``device``) and
    ``prediction_type`` (``epsilon`` or ``v_prediction``) come from the scheduler config."""

    alphas_cumprod: Tensor
    set_alpha_to_one: bool = True
    """The sampling scheduler's ``set_alpha_to_one`` (False for SD1.5 and SDXL): what diffusers 0.20's
    ``DDIMInverseScheduler`` takes as ``abar`` of the authors' grid's negative first level."""

    scheduler_swappable: ClassVar[bool] = True
    stores_inversion: ClassVar[bool] = True
    supports_inversion_noise: ClassVar[bool] = True

    @staticmethod
    def shard_units(network: Any) -> list[Any]:
        """A UNet's residual, attention and resampling blocks: the members of each down, mid and up
        block's module lists (``resnets``, ``attentions``, ``downsamplers``, ``upsamplers``), the
        granularity at which its activations flow and its skip connections are taken."""
        stages = [*network.down_blocks, *([network.mid_block] if network.mid_block is not None else []),
                  *network.up_blocks]
        return [unit for stage in stages for group in stage.children()
                if isinstance(group, torch.nn.ModuleList) for unit in group]

    def __post_init__(self) -> None:
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"{self.source or 'model'}: scheduler prediction_type {self.prediction_type!r} is not "
                             "supported; expected 'epsilon' or 'v_prediction'")

    @property
    def initial_abar(self) -> float:
        """diffusers 0.20's ``initial_alpha_cumprod``: 1, or ``abar[0]`` when ``set_alpha_to_one`` is False."""
        return inversion.initial_abar(self.alphas_cumprod, self.set_alpha_to_one)

    @property
    def num_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @property
    def device(self) -> torch.device:
        return self.alphas_cumprod.device

    def to(self, device: torch.device | str) -> DDPMAdapter:
        """Move every component and ``alphas_cumprod`` to ``device``; dtypes are kept."""
        super().to(device)
        self.alphas_cumprod = self.alphas_cumprod.to(device)
        return self

    # ---- the UNet and its parametrisation
    def network_output(self, network: Any, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        dtype = module_dtype(network)
        self.network_evals += x_t.shape[0]
        self.network_calls += 1
        out = network(x_t.to(dtype), t.to(x_t.device), **cond.to(x_t.device, dtype).network_kwargs(), return_dict=False)[0]
        return out.float()

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

    def implied_noise(self, x_t: Tensor, x0: Tensor, t: Tensor) -> Tensor:
        """``(x_t - sqrt(abar[t]) x0) / sqrt(1 - abar[t])`` (``smpo.inversion.implied_noise``)."""
        return inversion.implied_noise(x_t, x0, t, self.alphas_cumprod)

    def eps_fn(self, network: Any, cond: Conditioning, uncond: Conditioning | None = None,
               guidance: float = 1.0) -> Callable[..., Tensor]:
        """``eps_fn(x, t, index=None) -> eps`` for ``smpo.inversion`` (ALGORITHM.md section 3).

        ``index`` names the rows of ``cond`` that ``x`` holds (the inversion evaluates only the
        samples still moving). ``guidance == 1`` uses the conditional prediction alone (paper
        Table 6); otherwise ``e_uncond + w (e_cond - e_uncond)``, both branches in one UNet call.
        ``uncond`` is a batch of 1 (broadcast) or of ``len(cond)``.
        """
        return guided_fn(lambda x, t, c: self.predict_noise(network, x, t, c), cond, uncond, guidance)

    # ---- inversion
    def _invert(self, network: Any, x0: Tensor, t: Tensor, cond: Conditioning, settings: InversionSettings, *,
                uncond: Conditioning | None, generators: Sequence[torch.Generator] | None) -> tuple[Tensor, Tensor]:
        """(Re)Noise DDIM inversion (``smpo.inversion.renoise_invert``), every setting as it says."""
        eps_fn = self.eps_fn(network, cond, uncond, settings.guidance)
        x_t = inversion.renoise_invert(eps_fn, x0, t, self.alphas_cumprod, num_steps=settings.num_steps,
                                       renoise_iters=settings.renoise_iters, land_on_t=settings.land_on_t,
                                       initial_abar=self.initial_abar, step_noise=settings.step_noise,
                                       generators=generators)
        return x_t, self.implied_noise(x_t, x0, t)

    def invert_to_levels(self, network: Any, x0: Tensor, cond: Conditioning, *, uncond: Conditioning | None,
                         num_steps: int, renoise_iters: int, guidance: float = 1.0,
                         land_on_t: bool = False) -> Tensor:
        """``smpo.inversion.invert_to_levels`` by ``network`` with this schedule."""
        return inversion.invert_to_levels(self.eps_fn(network, cond, uncond, guidance), x0, self.alphas_cumprod,
                                          num_steps=num_steps, renoise_iters=renoise_iters, land_on_t=land_on_t,
                                          initial_abar=self.initial_abar)

    def finish_from_levels(self, network: Any, x0: Tensor, stored: Tensor, t: Tensor, cond: Conditioning, *,
                           uncond: Conditioning | None, num_steps: int, renoise_iters: int, guidance: float = 1.0,
                           land_on_t: bool = False) -> Tensor:
        """``smpo.inversion.finish_from_levels`` by ``network`` with this schedule."""
        return inversion.finish_from_levels(self.eps_fn(network, cond, uncond, guidance), x0, stored, t,
                                            self.alphas_cumprod, num_steps=num_steps, renoise_iters=renoise_iters,
                                            land_on_t=land_on_t)

    @staticmethod
    def _tokenize(tokenizer: Any, prompts: list[str], encoder: Any) -> Tensor:
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        return ids.to(encoder.device)

    # ---- loading
    @classmethod
    def from_pretrained(cls, model: str, *, vae: str | None, network: str | None, revision: str | None,
                        variant: str | None, dtype: torch.dtype, with_network: bool) -> DDPMAdapter:
        """The UNet (or only its config without ``with_network``), VAE, text encoders and scheduler."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

        scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler", revision=revision)
        if not with_network:
            unet_model = None
            unet_config = UNet2DConditionModel.load_config(model, subfolder="unet", revision=revision)
        elif network is not None:
            unet_model = _load_unet(UNet2DConditionModel, str(network), revision, variant, dtype)
        else:
            unet_model = UNet2DConditionModel.from_pretrained(model, subfolder="unet", revision=revision,
                                                              variant=variant, **diffusers_dtype_kwarg(dtype))
        if unet_model is not None:
            unet_config = unet_model.config
        vae_repo, vae_sub = (str(vae), None) if vae is not None else (model, "vae")
        vae_config = AutoencoderKL.load_config(vae_repo, subfolder=vae_sub, revision=revision)
        # A VAE that asks for ``force_upcast`` (the original SDXL VAE overflows in fp16) stays float32.
        vae_dtype = torch.float32 if dtype == torch.float16 and vae_config.get("force_upcast", False) else dtype
        vae_model = AutoencoderKL.from_pretrained(vae_repo, subfolder=vae_sub, revision=revision,
                                                  variant=None if vae is not None else variant,
                                                  **diffusers_dtype_kwarg(vae_dtype))
        encoders, tokenizers = cls.load_text_encoders(model, revision=revision, variant=variant, dtype=dtype)
        freeze([unet_model, vae_model, *encoders])
        return cls.from_components(network=unet_model, vae=vae_model, text_encoders=encoders, tokenizers=tokenizers,
                                   scheduler=scheduler, network_config=unet_config, source=model)

    @classmethod
    def from_components(cls, *, network: Any, vae: Any, text_encoders: list[Any], tokenizers: list[Any],
                        scheduler: Any, network_config: Any = None, source: str = "") -> DDPMAdapter:
        """``scheduler``: any diffusers scheduler of the pipeline (only its training schedule and
        ``prediction_type`` are read); ``network_config`` defaults to ``network.config`` (its
        ``sample_size`` times the VAE factor is the resolution)."""
        from diffusers import DDPMScheduler

        schedule = DDPMScheduler.from_config(scheduler.config)
        config = network_config if network_config is not None else network.config
        sample_size = int(config["sample_size"])
        vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        return cls(network=network, vae=vae, text_encoders=list(text_encoders), tokenizers=list(tokenizers),
                   alphas_cumprod=schedule.alphas_cumprod.float().clone(),
                   prediction_type=schedule.config.prediction_type, resolution=sample_size * vae_factor,
                   source=source, set_alpha_to_one=bool(scheduler.config.get("set_alpha_to_one", True)))


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


class SD15Adapter(DDPMAdapter):
    """SD1.x/SD2.x-style: one CLIP text encoder, its last hidden state is the conditioning."""

    name: ClassVar[str] = "sd15"
    pipeline_marker: ClassVar[str] = "StableDiffusion"
    text_encoder_classes: ClassVar[tuple[tuple[str, str], ...]] = (("text_encoder", "CLIPTextModel"),)
    controlnet_pipeline_class: ClassVar[str | None] = "StableDiffusionControlNetPipeline"
    has_safety_checker: ClassVar[bool] = True

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], *, original_sizes: Sequence[Size] | None = None,
                       crops_coords: Sequence[Size] | None = None) -> Conditioning:
        ids = self._tokenize(self.tokenizers[0], list(prompts), self.text_encoders[0])
        hidden = self.text_encoders[0](ids, return_dict=False)[0]
        return Conditioning(hidden)


class SDXLAdapter(DDPMAdapter):
    """SDXL: two CLIP text encoders (penultimate states concatenated), pooled text embeds and time ids."""

    name: ClassVar[str] = "sdxl"
    pipeline_marker: ClassVar[str] = "StableDiffusionXL"
    image_keys: ClassVar[tuple[str, ...]] = ("time_ids",)
    text_encoder_classes: ClassVar[tuple[tuple[str, str], ...]] = (
        ("text_encoder", "CLIPTextModel"), ("text_encoder_2", "CLIPTextModelWithProjection"))
    pipeline_class: ClassVar[str] = "StableDiffusionXLPipeline"
    controlnet_pipeline_class: ClassVar[str | None] = "StableDiffusionXLControlNetPipeline"
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


DDPM_FAMILIES: dict[str, type[DDPMAdapter]] = {"sd15": SD15Adapter, "sdxl": SDXLAdapter}
"""The noise-predicting adapters by family name."""
