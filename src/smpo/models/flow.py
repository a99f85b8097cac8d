"""Flow-matching families: Stable Diffusion 3 and FLUX behind the same adapter interface.

A flow-matching model noises linearly and predicts a velocity (ALGORITHM-NOTES.md, "Flow
matching")::

    x_s = (1 - s) x0 + s eps,        v(x_s, s) ~ eps - x0,        s = sigma in [0, 1].

The objective keeps drawing an integer level ``t`` per pair (``smpo.objective.draw_t_and_noise``);
the adapter maps it to ``s = sigmas[t]``, the scheduler's training sigmas in ascending order
(``FlowMatchEulerDiscreteScheduler.sigmas`` flipped: SD3's are shifted by 3, FLUX.1's, with dynamic
shifting, are not). Everything that differs from the noise-predicting families is an adapter
method: :meth:`FlowAdapter.add_noise`, :meth:`~FlowAdapter.target` (the velocity ``eps - x0``),
:meth:`~FlowAdapter.network_output` (the network's velocity at ``sigmas[t]``) and
:meth:`~FlowAdapter.invert` (Euler inversion with ReNoise, ``smpo.inversion.flow_renoise_invert``).

A flow family has no ``alphas_cumprod``: its schedule is ``sigmas``, and it stores no inversion
(``stores_inversion`` is False) and has no DDIM-InPO step noise. ``network`` is the transformer (the
adapter interface keeps its name). Prompts are encoded by the
pipeline class's own ``encode_prompt`` over the adapter's text encoders, so training, the cache
and ``smpo generate`` see the same embeddings:

- SD3: two CLIP encoders (penultimate states, concatenated and zero-padded to T5's width) followed
  along the sequence by T5's states; the two pooled projections concatenated
  (``Conditioning.added["text_embeds"]``, passed as ``pooled_projections``).
- FLUX: T5's states; CLIP's pooled output. The transformer takes 2x2-packed latents, their
  position ids, zero text ids and (FLUX.1-dev) the distilled guidance scale; the adapter packs
  and unpacks, so latents stay ``[B, C, h, w]`` everywhere else.

Imports ``smpo.models.base``, ``smpo.models.conditioning`` and ``smpo.inversion``.
"""

from __future__ import annotations

import os
from abc import abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from smpo import inversion
from smpo.models.base import FamilyAdapter, InversionSettings, diffusers_dtype_kwarg, freeze, module_dtype
from smpo.models.conditioning import Conditioning, Size, guided_fn


@dataclass(kw_only=True)
class FlowAdapter(FamilyAdapter):
    """A flow-matching family. ``sigmas``: ``[T]`` ascending training sigmas (``t`` indexes them)."""

    sigmas: Tensor
    prediction_type: str = "flow"
    max_sequence_length: int = 256
    """T5 tokens per prompt (the pipeline's default, or less if the tokenizer is shorter)."""

    timestep_scale: ClassVar[float] = 1.0
    """The transformer's ``timestep`` input is ``sigma * timestep_scale``."""
    default_max_sequence_length: ClassVar[int] = 256
    """The pipeline's default ``max_sequence_length`` (StableDiffusion3Pipeline 256, FluxPipeline 512)."""
    pipeline_class: ClassVar[str] = ""
    prediction_type_family: ClassVar[str] = "flow"

    @staticmethod
    def shard_units(network: Any) -> list[Any]:
        """A diffusion transformer's blocks: SD3's ``transformer_blocks`` (joint text-image
        attention), FLUX's double-stream ``transformer_blocks`` and ``single_transformer_blocks``;
        nearly all the weights are in them, in equal slices."""
        return [*getattr(network, "transformer_blocks", ()), *getattr(network, "single_transformer_blocks", ())]

    def __post_init__(self) -> None:
        if self.prediction_type != "flow":
            raise ValueError(f"{self.source or 'model'}: a flow-matching family needs prediction_type 'flow', "
                             f"got {self.prediction_type!r}")
        if self.sigmas.dim() != 1:
            raise ValueError("a flow-matching family needs its ascending training sigmas, one per level")

    @property
    def num_timesteps(self) -> int:
        return int(self.sigmas.shape[0])

    @property
    def device(self) -> torch.device:
        return self.sigmas.device

    def to(self, device: torch.device | str) -> FlowAdapter:
        """Move every component and ``sigmas`` to ``device``; dtypes are kept."""
        super().to(device)
        self.sigmas = self.sigmas.to(device)
        return self

    # ---- the flow parametrisation
    def sigma_of(self, t: Tensor) -> Tensor:
        """``sigmas[t]`` (float32, ``[B]``)."""
        return self.sigmas.to(t.device)[t.long()].float()

    def _s(self, t: Tensor, like: Tensor) -> Tensor:
        return self.sigma_of(t.to(like.device)).view(-1, *[1] * (like.dim() - 1))

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """Forward noising of flow matching: ``(1 - s) x0 + s eps`` with ``s = sigmas[t]``."""
        s = self._s(t, x0)
        return (1 - s) * x0 + s * eps

    def target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """The velocity ``eps - x0`` (with the implied noise, the implied velocity of an inverted point)."""
        return eps - x0

    def eps_from_output(self, output: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The noise implied by a velocity: ``eps = x_s + (1 - s) v``."""
        return x_t + (1 - self._s(t, x_t)) * output

    def implied_noise(self, x_t: Tensor, x0: Tensor, t: Tensor) -> Tensor:
        """``(x_s - (1 - s) x0) / s`` with ``s = sigmas[t]`` (``smpo.inversion.flow_implied_noise``)."""
        return inversion.flow_implied_noise(x_t, x0, self.sigma_of(t.to(x0.device)))

    def network_output(self, network: Any, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """The network's velocity at ``(x_t, sigmas[t])`` in float32 (``t`` a ``LongTensor[B]``)."""
        return self.velocity(network, x_t, self.sigma_of(t.to(x_t.device)), cond)

    def velocity(self, network: Any, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        """The network's velocity at float levels ``sigma`` ``[B]`` (inputs cast to its dtype)."""
        dtype = module_dtype(network)
        self.network_evals += x.shape[0]
        self.network_calls += 1
        cond = cond.to(x.device, dtype)
        out = self._forward(network, x.to(dtype), sigma.to(device=x.device, dtype=dtype) * self.timestep_scale, cond)
        return out.float()

    @abstractmethod
    def _forward(self, network: Any, x: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
        """The transformer called as the family's pipeline calls it."""

    def velocity_fn(self, network: Any, cond: Conditioning, uncond: Conditioning | None = None,
                    guidance: float = 1.0) -> Callable[..., Tensor]:
        """``velocity_fn(x, sigma, index=None) -> v`` for ``smpo.inversion.flow_renoise_invert``;
        ``guidance != 1`` mixes in the unconditional velocity, both in one call (as ``DDPMAdapter.eps_fn``)."""
        return guided_fn(lambda x, sigma, c: self.velocity(network, x, sigma, c), cond, uncond, guidance)

    def _invert(self, network: Any, x0: Tensor, t: Tensor, cond: Conditioning, settings: InversionSettings, *,
                uncond: Conditioning | None, generators: Sequence[torch.Generator] | None) -> tuple[Tensor, Tensor]:
        """Euler inversion with ReNoise from ``x0`` up to ``s = sigmas[t]`` over ``settings.num_steps``
        grid levels of the schedule, always landing exactly on ``s``; returns ``(x_s, eps_hat)``."""
        sigma = self.sigma_of(t.to(x0.device))
        v_fn = self.velocity_fn(network, cond, uncond, settings.guidance)
        grid = inversion.flow_grid(settings.num_steps, self.sigmas.to(x0.device))
        x_s = inversion.flow_renoise_invert(v_fn, x0, sigma, grid, renoise_iters=settings.renoise_iters)
        return x_s, inversion.flow_implied_noise(x_s, x0, sigma)

    # ---- prompts, through the pipeline class's own encode_prompt
    def _text_pipeline(self) -> Any:
        import diffusers

        pipe = self.__dict__.get("_text_pipe")
        if pipe is None:
            pipe = getattr(diffusers, self.pipeline_class)(**self._text_components())
            self.__dict__["_text_pipe"] = pipe
        return pipe

    def _text_components(self) -> dict[str, Any]:
        """The text encoders and tokenizers by the pipeline's argument names, nothing else."""
        parts: dict[str, Any] = dict(transformer=None, scheduler=None, vae=None)
        for (folder, _), encoder, tokenizer in zip(self.text_encoder_classes, self.text_encoders, self.tokenizers):
            parts[folder], parts[self.tokenizer_folder(folder)] = encoder, tokenizer
        return parts

    def _text_device(self) -> torch.device:
        return next(self.text_encoders[0].parameters()).device

    # ---- loading
    @classmethod
    def resolution_of(cls, vae_config: Any, network_config: Any) -> int:
        """The training resolution: the VAE's ``sample_size`` (FLUX's transformer has no size; 1024 for FLUX.1)."""
        return int(_get(vae_config, "sample_size"))

    @classmethod
    def from_pretrained(cls, model: str, *, vae: str | None, network: str | None, revision: str | None,
                        variant: str | None, dtype: torch.dtype, with_network: bool) -> FlowAdapter:
        """The transformer (``network`` names a separate initial one; only its config without
        ``with_network``), VAE, text encoders and scheduler of a ``StableDiffusion3Pipeline`` /
        ``FluxPipeline`` folder or hub id."""
        import diffusers
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

        network_cls = getattr(diffusers, cls.network_class)
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(model, subfolder="scheduler", revision=revision)
        if not with_network:
            network, network_config = None, network_cls.load_config(model, subfolder="transformer", revision=revision)
        else:
            repo, sub = (model, "transformer") if network is None else (network, _network_subfolder(network))
            network = network_cls.from_pretrained(repo, subfolder=sub, revision=revision, variant=variant,
                                                  **diffusers_dtype_kwarg(dtype))
            network_config = network.config
        vae_repo, vae_sub = (str(vae), None) if vae is not None else (model, "vae")
        vae_model = AutoencoderKL.from_pretrained(vae_repo, subfolder=vae_sub, revision=revision,
                                                  variant=None if vae is not None else variant,
                                                  **diffusers_dtype_kwarg(dtype))
        encoders, tokenizers = cls.load_text_encoders(model, revision=revision, variant=variant, dtype=dtype)
        freeze([network, vae_model, *encoders])
        return cls.from_components(network=network, vae=vae_model, text_encoders=encoders, tokenizers=tokenizers,
                                   scheduler=scheduler, network_config=network_config, source=model)

    @classmethod
    def from_components(cls, *, network: Any, vae: Any, text_encoders: list[Any], tokenizers: list[Any],
                        scheduler: Any, network_config: Any = None, source: str = "") -> FlowAdapter:
        """``scheduler`` is the pipeline's ``FlowMatchEulerDiscreteScheduler`` (rebuilt from its config,
        so a pipeline's ``set_timesteps`` does not matter); ``network_config`` defaults to ``network.config``."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        sigmas = training_sigmas(FlowMatchEulerDiscreteScheduler.from_config(scheduler.config))
        resolution = cls.resolution_of(vae.config, network_config if network_config is not None else network.config)
        t5 = tokenizers[-1]
        max_len = min(cls.default_max_sequence_length,
                      int(getattr(t5, "model_max_length", cls.default_max_sequence_length)))
        return cls(network=network, vae=vae, text_encoders=list(text_encoders), tokenizers=list(tokenizers),
                   resolution=resolution, source=source, sigmas=sigmas, max_sequence_length=max_len)


class SD3Adapter(FlowAdapter):
    """Stable Diffusion 3: ``SD3Transformer2DModel``; CLIP-L and CLIP-G with projection, and T5."""

    name: ClassVar[str] = "sd3"
    pipeline_marker: ClassVar[str] = "StableDiffusion3"
    text_encoder_classes: ClassVar[tuple[tuple[str, str], ...]] = (
        ("text_encoder", "CLIPTextModelWithProjection"), ("text_encoder_2", "CLIPTextModelWithProjection"),
        ("text_encoder_3", "T5EncoderModel"))
    default_max_sequence_length: ClassVar[int] = 256
    timestep_scale: ClassVar[float] = 1000.0  # the pipeline passes scheduler.timesteps = sigma * 1000
    pipeline_class: ClassVar[str] = "StableDiffusion3Pipeline"
    network_class: ClassVar[str] = "SD3Transformer2DModel"
    network_folder: ClassVar[str] = "transformer"
    guidance_scale: ClassVar[float] = 7.0  # StableDiffusion3Pipeline's default CFG

    @classmethod
    def resolution_of(cls, vae_config: Any, network_config: Any) -> int:
        """The transformer's ``sample_size`` times the VAE factor (128 x 8 = 1024)."""
        return int(_get(network_config, "sample_size")) * 2 ** (len(_get(vae_config, "block_out_channels")) - 1)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], *, original_sizes: Sequence[Size] | None = None,
                       crops_coords: Sequence[Size] | None = None) -> Conditioning:
        hidden, _, pooled, _ = self._text_pipeline().encode_prompt(
            list(prompts), prompt_2=None, prompt_3=None, device=self._text_device(), do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length)
        return Conditioning(hidden, {"text_embeds": pooled})

    def _forward(self, network: Any, x: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
        assert cond.added is not None
        return network(hidden_states=x, timestep=timestep, encoder_hidden_states=cond.hidden_states,
                       pooled_projections=cond.added["text_embeds"], return_dict=False)[0]


@dataclass(kw_only=True)
class FluxAdapter(FlowAdapter):
    """FLUX.1: ``FluxTransformer2DModel`` on 2x2-packed latents; CLIP (pooled) and T5 (states).

    ``guidance``: the distilled guidance scale given to a transformer with ``guidance_embeds``
    (FLUX.1-dev) in every training and inversion call; 3.5, the default of ``FluxPipeline`` and of
    diffusers' FLUX DreamBooth scripts.
    """

    guidance: float = 3.5

    name: ClassVar[str] = "flux"
    pipeline_marker: ClassVar[str] = "Flux"
    text_encoder_classes: ClassVar[tuple[tuple[str, str], ...]] = (
        ("text_encoder", "CLIPTextModel"), ("text_encoder_2", "T5EncoderModel"))
    default_max_sequence_length: ClassVar[int] = 512
    timestep_scale: ClassVar[float] = 1.0  # FluxPipeline passes timestep / 1000 = sigma
    pipeline_class: ClassVar[str] = "FluxPipeline"
    network_class: ClassVar[str] = "FluxTransformer2DModel"
    network_folder: ClassVar[str] = "transformer"
    guidance_scale: ClassVar[float] = 3.5  # FluxPipeline's default (distilled) guidance

    @classmethod
    def prepare_pipeline(cls, pipe: Any) -> None:
        """FluxPipeline's default size is ``128 x vae factor`` whatever the model; make it the
        family's training resolution, the VAE's ``sample_size`` (1024 for FLUX.1 either way)."""
        pipe.default_sample_size = int(pipe.vae.config.sample_size) // pipe.vae_scale_factor

    @classmethod
    def sampled_latents(cls, pipe: Any, latents: Tensor, *, height: int, width: int) -> Tensor:
        """FluxPipeline samples 2x2-packed latents: unpacked here (what its decoding does)."""
        return pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], *, original_sizes: Sequence[Size] | None = None,
                       crops_coords: Sequence[Size] | None = None) -> Conditioning:
        hidden, pooled, _ = self._text_pipeline().encode_prompt(
            list(prompts), prompt_2=None, device=self._text_device(), max_sequence_length=self.max_sequence_length)
        return Conditioning(hidden, {"text_embeds": pooled})

    def _forward(self, network: Any, x: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
        from diffusers import FluxPipeline

        assert cond.added is not None
        b, c, h, w = x.shape
        packed = FluxPipeline._pack_latents(x, b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)
        txt_ids = torch.zeros(cond.hidden_states.shape[1], 3, device=x.device, dtype=x.dtype)
        guidance = None
        if getattr(network.config, "guidance_embeds", False):
            guidance = torch.full((b,), float(self.guidance), device=x.device, dtype=torch.float32)
        out = network(hidden_states=packed, timestep=timestep, guidance=guidance,
                      pooled_projections=cond.added["text_embeds"], encoder_hidden_states=cond.hidden_states,
                      txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        return FluxPipeline._unpack_latents(out, h * self.vae_scale_factor, w * self.vae_scale_factor,
                                            self.vae_scale_factor)


FLOW_FAMILIES: dict[str, type[FlowAdapter]] = {"sd3": SD3Adapter, "flux": FluxAdapter}
"""The flow-matching adapters by family name."""


def _get(config: Any, key: str) -> Any:
    return config[key] if isinstance(config, dict) else getattr(config, key)


def training_sigmas(scheduler: Any) -> Tensor:
    """The scheduler's training sigmas in ascending order (``sigmas[t]``, ``t = 0 .. T-1``)."""
    return scheduler.sigmas.float().flip(0).clone()


def _network_subfolder(path: str | os.PathLike) -> str | None:
    """``transformer`` when ``path`` is a pipeline folder (or an `smpo train` run's ``final/``), else None."""
    local = Path(path)
    return "transformer" if (local / "transformer").is_dir() else None
