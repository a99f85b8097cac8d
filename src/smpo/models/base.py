"""The model-family interface: :class:`FamilyAdapter`, the :class:`InversionSettings` its inversion
reads, and the loading helpers every family shares (dtypes, text encoders, freezing).

Everything below the adapter (noising, inversion, losses, the training loop, the cache, the
evaluation pipelines) works on latents, a :class:`Conditioning` and the adapter's methods and
class attributes, and never asks which family it is running (STYLE.md, "Our shape"). A family
answers for itself: how prompts become conditioning, what its network is trained to output, how a
latent is noised and inverted, whether an inversion can be stored, which text encoders, pipeline
and ControlNet pipeline classes it has, whether it carries a safety checker, and whether its
sampler may be swapped. The noise-predicting families (SD1.5, SDXL) are in ``smpo.models.ddpm``,
the flow-matching ones (SD3, FLUX) in ``smpo.models.flow``; ``smpo.models.loading`` names them.

Imports ``smpo.models.conditioning`` only (the families use ``smpo.inversion``, not this module).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from smpo.models.conditioning import Conditioning, Size

# --------------------------------------------------------------------------------------------
# Loading helpers every family uses


def module_dtype(module: Any) -> torch.dtype:
    """The dtype a network's inputs are cast to: its first floating parameter's (the value of
    diffusers' ``ModelMixin.dtype`` for networks without layerwise-casting hooks, which smpo never
    attaches; that property walks every submodule on each call, 2-3 ms a network call on the CPU,
    docs/benchmarks.md). Objects without parameters (the LoRA views) give their ``dtype``."""
    parameters = getattr(module, "parameters", None)
    if parameters is None:
        return module.dtype
    return next((p.dtype for p in parameters() if p.is_floating_point()), torch.float32)


def module_device(module: torch.nn.Module) -> torch.device:
    """Where a network's inputs go: its first parameter's device (diffusers' ``ModelMixin.device``
    walks every submodule on each call: 0.26 ms for the tiny VAE, a step from images asks once)."""
    return next(module.parameters()).device


def diffusers_dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """Recent diffusers name ``from_pretrained``'s argument ``dtype`` (``torch_dtype`` is deprecated
    there with a FutureWarning); older releases only know ``torch_dtype``."""
    try:
        from diffusers.utils.deprecation_utils import _TORCH_DTYPE_DEPRECATION_MESSAGE  # noqa: F401
    except ImportError:
        return {"torch_dtype": dtype}
    return {"dtype": dtype}


def transformers_dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """transformers 5 names the argument ``dtype``; 4.x ``torch_dtype``."""
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return {"dtype": dtype} if major >= 5 else {"torch_dtype": dtype}


def freeze(modules: Sequence[Any]) -> None:
    """``requires_grad=False`` and eval mode for every loaded component (``None`` skipped); the
    training loop unfreezes what it trains."""
    for module in modules:
        if module is not None:
            module.requires_grad_(False)
            module.eval()


# --------------------------------------------------------------------------------------------
# The adapter interface


@dataclass(frozen=True)
class InversionSettings:
    """One inversion's settings (``objective.inversion_*``, ``smpo cache --store-inversion``), read
    by each family's inversion as its math has them (:meth:`FamilyAdapter.invert`)."""

    num_steps: int
    """Size of the inversion grid over the schedule."""
    renoise_iters: int
    """ReNoise iterations per step (0: plain DDIM / Euler inversion)."""
    guidance: float = 1.0
    """Classifier-free guidance of the inverting network (1: the conditional prediction alone)."""
    land_on_t: bool = False
    """DDIM: end exactly on ``t`` or, False, on the authors' grid level. A flow inversion always
    lands on its level: there is no authors' flow grid to reproduce."""
    step_noise: float = 0.0
    """DDIM-InPO's fresh noise per step; only families with ``supports_inversion_noise`` have it."""


@dataclass(kw_only=True)
class FamilyAdapter(ABC):
    """A loaded text-to-image model: components plus the family-specific glue.

    ``network`` is the network to train (the policy; a transformer for SD3/FLUX); ``vae`` and the text
    encoders are frozen and used under ``no_grad``. ``prediction_type`` comes from the pipeline's
    scheduler config (``epsilon``, ``v_prediction``, or ``flow``). ``resolution`` is the pixel size
    the network was trained at.

    ``network_evals`` counts network sample-evaluations made through :meth:`network_output` (a call with
    a batch of 4 adds 4) and ``network_calls`` the calls; the benchmark reads and resets them.
    """

    name: ClassVar[str] = "base"
    pipeline_marker: ClassVar[str] = ""
    """What the pipeline class named in ``model_index.json`` contains for this family (``detect_family``)."""
    image_keys: ClassVar[tuple[str, ...]] = ()
    """Keys of ``Conditioning.added`` that depend on the image (its size and crop), not the prompt."""
    text_encoder_classes: ClassVar[tuple[tuple[str, str], ...]] = ()
    """The text encoders as ``(pipeline folder / attribute, transformers class)``, in conditioning
    order; each has the tokenizer named by :meth:`tokenizer_folder`."""
    pipeline_class: ClassVar[str] = "StableDiffusionPipeline"
    """The diffusers pipeline class of the family (export, ``smpo generate``)."""
    controlnet_pipeline_class: ClassVar[str | None] = None
    """The diffusers ControlNet pipeline of the family (``smpo generate --controlnet``); ``None``: unsupported."""
    has_safety_checker: ClassVar[bool] = False
    """Whether the family's pipeline carries a safety checker (:meth:`pipeline_kwargs` disables it)."""
    scheduler_swappable: ClassVar[bool] = False
    """Whether ``smpo generate --scheduler`` may swap its sampler for a DDPM-family one."""
    stores_inversion: ClassVar[bool] = False
    """Whether ``smpo cache --store-inversion`` can store its inversion (:meth:`invert_to_levels`)."""
    supports_inversion_noise: ClassVar[bool] = False
    """Whether its inversion has DDIM-InPO's fresh step noise (``InversionSettings.step_noise``)."""
    prediction_type_family: ClassVar[str] = "diffusion"
    """What kind of model it is, for messages: ``diffusion`` (eps / v prediction, DDPM-family
    samplers) or ``flow`` (velocity, flow matching). Callers ask the flags above, not this."""
    network_class: ClassVar[str] = "UNet2DConditionModel"
    """The diffusers class of the trained network."""
    network_folder: ClassVar[str] = "unet"
    """The pipeline's subfolder of the trained network, and the prefix of its LoRA keys
    (``unet_lora_layers`` / ``transformer_lora_layers`` of ``save_lora_weights``)."""
    guidance_scale: ClassVar[float] = 7.5
    """Default CFG of ``smpo generate`` (paper Appendix D: 7.5 for SD1.5, 5 for SDXL)."""

    network: Any
    vae: Any
    text_encoders: list[Any]
    tokenizers: list[Any]
    prediction_type: str
    resolution: int
    source: str = ""
    network_evals: int = field(default=0, init=False)
    network_calls: int = field(default=0, init=False)

    # ---- what the family's pipeline and components are
    @classmethod
    def prepare_pipeline(cls, pipe: Any) -> None:
        """Family-specific settings of a loaded diffusers pipeline for ``smpo generate`` (none by default)."""
        return None

    @classmethod
    def sampled_latents(cls, pipe: Any, latents: Tensor, *, height: int, width: int) -> Tensor:
        """The latents of a pipeline's last sampling step, ``[B, C, h, w]`` in the space training
        uses (:meth:`encode_images`': shifted and scaled); the pipeline's own layout otherwise."""
        return latents

    @classmethod
    def pipeline_kwargs(cls, *, safety_checker: bool) -> dict[str, Any]:
        """Keyword arguments of the pipeline's ``from_pretrained``: without ``safety_checker``, the
        family's safety checker (if it has one) is left out."""
        if cls.has_safety_checker and not safety_checker:
            return {"safety_checker": None, "requires_safety_checker": False}
        return {}

    @staticmethod
    def shard_units(network: Any) -> list[Any]:
        """The blocks of ``network`` that sharded training (FSDP2, ``smpo.train.sharding``) makes its
        own units, each gathered whole for its forward and freed after it; the rest of the network
        (embeddings, the first and last layers) is the root unit. None: one unit for the network."""
        return []

    @staticmethod
    def tokenizer_folder(encoder_folder: str) -> str:
        """The tokenizer beside a text encoder: ``text_encoder_2`` -> ``tokenizer_2``."""
        return encoder_folder.replace("text_encoder", "tokenizer")

    @classmethod
    def load_text_encoders(cls, model: str, *, revision: str | None, variant: str | None,
                           dtype: torch.dtype) -> tuple[list[Any], list[Any]]:
        """The family's text encoders (in ``dtype``) and tokenizers from a pipeline folder or hub id."""
        import transformers

        kwargs = transformers_dtype_kwarg(dtype)
        encoders = [getattr(transformers, kind).from_pretrained(model, subfolder=folder, revision=revision,
                                                                variant=variant, **kwargs)
                    for folder, kind in cls.text_encoder_classes]
        tokenizers = [transformers.AutoTokenizer.from_pretrained(model, subfolder=cls.tokenizer_folder(folder),
                                                                 revision=revision)
                      for folder, _ in cls.text_encoder_classes]
        return encoders, tokenizers

    @classmethod
    @abstractmethod
    def from_pretrained(cls, model: str, *, vae: str | None, network: str | None, revision: str | None,
                        variant: str | None, dtype: torch.dtype, with_network: bool) -> FamilyAdapter:
        """The family's components from a pipeline folder or hub id, frozen (``smpo.models.load_family``)."""

    @classmethod
    @abstractmethod
    def from_components(cls, *, network: Any, vae: Any, text_encoders: list[Any], tokenizers: list[Any],
                        scheduler: Any, network_config: Any = None, source: str = "") -> FamilyAdapter:
        """An adapter over built components (``smpo.models.make_adapter``)."""

    # ---- basic properties
    @property
    @abstractmethod
    def num_timesteps(self) -> int:
        """Training levels ``T``: ``t`` is drawn from ``0 .. T-1``."""

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """Where the schedule lives (the components are moved with it by :meth:`to`)."""

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.resolution // self.vae_scale_factor

    def to(self, device: torch.device | str) -> FamilyAdapter:
        """Move every component to ``device``; dtypes are kept (families also move their schedule)."""
        for module in [self.network, self.vae, *self.text_encoders]:
            if module is not None:
                module.to(device)
        return self

    def reset_counters(self) -> None:
        self.network_evals = 0
        self.network_calls = 0

    # ---- images and prompts
    @torch.no_grad()
    def encode_images(self, pixels: Tensor, *, sample: bool = False, generator: torch.Generator | None = None,
                      generators: Sequence[torch.Generator] | None = None) -> Tensor:
        """VAE latents of ``pixels`` ``[B, 3, H, W]`` in [-1, 1], times the VAE scaling factor.

        The posterior mean by default (deterministic, what a cache stores); ``sample=True`` draws
        from the posterior as the authors' script does (its std is tiny), with ``generator``, or
        with one CPU generator per image (``generators``: the draw does not depend on the batch).
        """
        vae = self.vae
        dist = vae.encode(pixels.to(device=module_device(vae), dtype=module_dtype(vae))).latent_dist
        if sample and generators is not None:
            eps = torch.stack([torch.randn(dist.mean.shape[1:], generator=g) for g in generators])
            latents = dist.mean + dist.std * eps.to(device=dist.mean.device, dtype=dist.mean.dtype)
        else:
            latents = dist.sample(generator) if sample else dist.mean
        shift = getattr(vae.config, "shift_factor", None)
        if shift is not None:
            latents = latents - shift
        return (latents * vae.config.scaling_factor).float()

    @abstractmethod
    def encode_prompts(self, prompts: list[str], *, original_sizes: Sequence[Size] | None = None,
                       crops_coords: Sequence[Size] | None = None) -> Conditioning:
        """Conditioning for ``prompts`` (one per sample; "" is the empty prompt).

        ``original_sizes`` / ``crops_coords`` are each image's (height, width) before resizing and
        (top, left) of its crop; only families that condition on them (SDXL) use them, and the
        default is the square target size with no crop.
        """

    def image_conditioning(self, cond: Conditioning, *, original_sizes: Sequence[Size] | None = None,
                           crops_coords: Sequence[Size] | None = None) -> Conditioning:
        """``cond`` with its image-dependent parts (SDXL's ``time_ids``) recomputed for other images.

        Builds the loser's conditioning from the winner's text. Families that condition only on
        text return ``cond`` unchanged.
        """
        return cond

    # ---- the network and its parametrisation
    @abstractmethod
    def network_output(self, network: Any, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """Raw output of ``network`` (the policy, a frozen reference or a LoRA reference view) at integer
        levels ``t`` (``LongTensor[B]``) in float32; inputs are cast to the network's dtype."""

    @abstractmethod
    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """Forward noising of ``x0`` with ``eps`` to the levels ``t``."""

    @abstractmethod
    def target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """What the network is trained to output at ``add_noise(x0, eps, t)``."""

    @abstractmethod
    def eps_from_output(self, output: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The noise estimate implied by a raw network output at ``(x_t, t)``."""

    @abstractmethod
    def implied_noise(self, x_t: Tensor, x0: Tensor, t: Tensor) -> Tensor:
        """The noise that puts ``x0`` at ``x_t`` on the levels ``t`` (the target of an inverted point)."""

    def predict_noise(self, network: Any, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """``network``'s noise estimate at ``(x_t, t)``, whatever the model predicts."""
        return self.eps_from_output(self.network_output(network, x_t, t, cond), x_t, t)

    # ---- inversion
    def invert(self, network: Any, x0: Tensor, t: Tensor, cond: Conditioning, *, uncond: Conditioning | None,
               num_steps: int, renoise_iters: int, guidance: float = 1.0, land_on_t: bool = False,
               step_noise: float = 0.0, generators: Sequence[torch.Generator] | None = None) -> tuple[Tensor, Tensor]:
        """The (ReNoise) inversion of ``x0`` up to ``t`` by ``network`` (ALGORITHM.md section 3) and
        its implied noise: ``(x_t, eps_hat)``. Call under ``no_grad``. The keywords are the fields
        of :class:`InversionSettings`; ``uncond`` is the batch's empty-prompt conditioning (one row
        per sample) when ``guidance != 1``; ``generators`` (one per row) draw ``step_noise``."""
        settings = InversionSettings(num_steps=num_steps, renoise_iters=renoise_iters, guidance=guidance,
                                     land_on_t=land_on_t, step_noise=step_noise)
        if settings.step_noise and not self.supports_inversion_noise:
            raise ValueError(f"objective.inversion_noise (DDIM-InPO's fresh noise) is not defined for "
                             f"{self.prediction_type_family} models ({self.name})")
        return self._invert(network, x0, t, cond, settings, uncond=uncond, generators=generators)

    @abstractmethod
    def _invert(self, network: Any, x0: Tensor, t: Tensor, cond: Conditioning, settings: InversionSettings, *,
                uncond: Conditioning | None, generators: Sequence[torch.Generator] | None) -> tuple[Tensor, Tensor]:
        """The family's inversion behind :meth:`invert` (its settings checked against the family)."""

    def invert_to_levels(self, network: Any, x0: Tensor, cond: Conditioning, *, uncond: Conditioning | None,
                         num_steps: int, renoise_iters: int, guidance: float = 1.0,
                         land_on_t: bool = False) -> Tensor:
        """The inversion of ``x0`` at every stored level, ``[B, num_steps, ...]`` (``smpo cache
        --store-inversion``); only families with ``stores_inversion`` have one."""
        raise ValueError(f"stored inversions are DDIM inversions (--store-inversion); the {self.name} family "
                         "inverts at training time")

    def finish_from_levels(self, network: Any, x0: Tensor, stored: Tensor, t: Tensor, cond: Conditioning, *,
                           uncond: Conditioning | None, num_steps: int, renoise_iters: int, guidance: float = 1.0,
                           land_on_t: bool = False) -> Tensor:
        """:meth:`invert`'s ``x_t`` from the levels :meth:`invert_to_levels` stored; only families
        with ``stores_inversion`` have one."""
        raise ValueError(f"stored inversions are DDIM inversions: the {self.name} family has none")
