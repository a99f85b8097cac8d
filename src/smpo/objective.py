"""The per-batch computation of every method: noise the latents, run the networks, call the loss.

Data flows one way (STYLE.md): a batch of latents and conditioning -> noising (forward, ALGORITHM.md
section 1, or (Re)Noise inversion, section 3) -> per-sample errors ``m`` (policy) and ``r``
(reference) -> a pure loss from ``smpo.losses`` (sections 1, 2, 4). The ablation rungs of
section 5 are plain settings of :class:`ObjectiveConfig` (``noising`` x ``labels``).

Randomness is per pair: pair ``i``'s timestep ``t ~ U{0..T-1}`` and noise ``eps ~ N(0, I)`` are
drawn from a ``torch.Generator`` seeded with ``batch.seeds[i]`` (the training loop derives it from
the run seed, the pair id and the epoch), so what a pair is trained on does not depend on the
batch it lands in, the number of processes or the accumulation split. Winner and loser share
``t`` and, when forward-noised, ``eps``.

Speed: winner and loser go through each network in ONE call of ``2B`` samples; the inversion
inverts both images together. ``family.unet_evals`` counts the UNet sample-evaluations.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import Tensor

from smpo.inversion import finish_from_levels, implied_noise
from smpo.losses import LOSSES, LossOutput, per_sample_mse
from smpo.models.family import Conditioning, FamilyAdapter
from smpo.models.lora import inference_view

Method = Literal["smpo", "dpo", "kto", "mapo", "sft"]
Noising = Literal["forward", "ddim-inversion", "renoise"]
Labels = Literal["binary", "smoothed"]

METHODS: tuple[str, ...] = ("smpo", "dpo", "kto", "mapo", "sft")
NOISINGS: tuple[str, ...] = ("forward", "ddim-inversion", "renoise")
TIMESTEP_SAMPLINGS: tuple[str, ...] = ("uniform", "logit_normal", "mode")
DEFAULT_BETA: dict[str, float] = {"smpo": 2000.0, "dpo": 5000.0, "kto": 1000.0, "mapo": 0.1, "sft": 0.0}
"""ALGORITHM.md sections 2 and 4 (SmPO: 2000 for SD1.5, 5000 for SDXL; recipes set it per family)."""


@dataclass
class ObjectiveConfig:
    """What is computed for a batch. ``None`` fields take the method's default (:meth:`resolved`)."""

    method: str = "smpo"
    """Loss: smpo | dpo | kto | mapo | sft (ALGORITHM.md sections 1, 2, 4)."""
    beta: float | None = None
    """Loss scale: smpo 2000 (SD1.5) / 5000 (SDXL), dpo 5000, kto 1000, mapo 0.1 (its odds-ratio weight)."""
    gamma: float = 10.0
    """SmPO sensitivity: lambda = gamma (2 p_win - 1), Eq. 12."""
    noising: str | None = None
    """forward (random eps, section 1) | ddim-inversion (no renoise) | renoise (section 3). Default: renoise for smpo, forward otherwise."""
    labels: str | None = None
    """smoothed (per-pair p_win, Eq. 11) | binary (human labels, the DPO loss: p_win = 1 and lambda = 1). Default: smoothed for smpo, binary otherwise."""
    inversion_steps: int = 5
    """Size of the DDIM inversion grid over [0, T) (authors: 5 for SD1.5, 10 for SDXL)."""
    renoise_iters: int = 1
    """ReNoise iterations per inversion step (Eq. 14); ignored (0) with noising=ddim-inversion."""
    inversion_guidance: float = 1.0
    """CFG weight during inversion; 1 uses the conditional prediction alone (paper Table 6)."""
    inverting_network: str = "policy"
    """Which network inverts: policy (the authors', under no_grad) | reference."""
    land_on_t: bool = False
    """True: end the inversion exactly at t (paper Eq. 13). False (default): the authors' grid, as
    their script runs under diffusers 0.20 (the latent ends at the grid level >= t); the world study
    found it ahead on validation prompts in every inversion rung (docs/world.md)."""
    inversion_noise: float = 0.0
    """Off (0) by default. DDIM-InPO's fresh noise (the same authors' CVPR 2025 script uses 0.1):
    after each inversion step add this times the step's DDPM standard deviation times fresh
    Gaussian noise, drawn per image from its pair's seed (``smpo.inversion.renoise_invert``)."""
    mapo_snr: float = 0.5
    """MaPO's s in f(s m) (ALGORITHM.md section 4)."""
    timestep_sampling: str = "uniform"
    """How each pair's level t is drawn: uniform over [0, T) (the paper; SD1.5/SDXL) | logit_normal |
    mode, diffusers' compute_density_for_timestep_sampling for SD3/FLUX training (u in [0, 1] maps
    to the level of scheduler.timesteps[int(u T)], as diffusers' flow training scripts index it)."""
    logit_mean: float = 0.0
    """timestep_sampling=logit_normal: the mean of the normal before the sigmoid."""
    logit_std: float = 1.0
    """timestep_sampling=logit_normal: its standard deviation."""
    mode_scale: float = 1.29
    """timestep_sampling=mode: the scale of the mode-sampling density (SD3 paper)."""

    def resolved(self) -> ObjectiveConfig:
        """A copy with the method defaults filled in, validated."""
        if self.method not in METHODS:
            raise ValueError(f"objective.method {self.method!r}: choose from {', '.join(METHODS)}")
        smpo = self.method == "smpo"
        cfg = replace(
            self,
            beta=DEFAULT_BETA[self.method] if self.beta is None else float(self.beta),
            noising=self.noising or ("renoise" if smpo else "forward"),
            labels=self.labels or ("smoothed" if smpo else "binary"),
        )
        if cfg.noising not in NOISINGS:
            raise ValueError(f"objective.noising {cfg.noising!r}: choose from {', '.join(NOISINGS)}")
        if cfg.labels not in ("binary", "smoothed"):
            raise ValueError(f"objective.labels {cfg.labels!r}: choose from binary, smoothed")
        if cfg.labels == "smoothed" and not smpo:
            raise ValueError(f"objective.labels=smoothed needs method smpo (got {cfg.method})")
        if cfg.inverting_network not in ("policy", "reference"):
            raise ValueError(f"objective.inverting_network {cfg.inverting_network!r}: choose from policy, reference")
        if cfg.inversion_noise < 0:
            raise ValueError(f"objective.inversion_noise must be >= 0; got {cfg.inversion_noise}")
        if cfg.inversion_noise and cfg.noising == "forward":
            raise ValueError("objective.inversion_noise needs an inverting noising (renoise or ddim-inversion)")
        if cfg.timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"objective.timestep_sampling {cfg.timestep_sampling!r}: choose from "
                             f"{', '.join(TIMESTEP_SAMPLINGS)}")
        if cfg.inversion_steps < 1 or cfg.renoise_iters < 0:
            raise ValueError("objective.inversion_steps must be >= 1 and renoise_iters >= 0; "
                             f"got {cfg.inversion_steps} and {cfg.renoise_iters}")
        return cfg

    @property
    def effective_renoise_iters(self) -> int:
        return 0 if self.noising == "ddim-inversion" else self.renoise_iters

    @property
    def needs_reference(self) -> bool:
        """Whether ``compute_loss`` needs a reference network (loss or inversion)."""
        cfg = self.resolved()
        inverts_with_ref = cfg.noising != "forward" and cfg.inverting_network == "reference"
        return cfg.method in ("smpo", "dpo", "kto") or inverts_with_ref


@dataclass
class PairBatch:
    """``B`` preference pairs, winner first.

    ``cond``: the prompts' conditioning (for SDXL with the winners' size/crop ``time_ids``);
    ``cond_l``: the losers' when it differs (SDXL: their own ``time_ids``), else ``None``.
    ``p_win``: ``[B]`` smoothed probability that the winner is preferred (Eq. 11).
    ``seeds``: one per pair; the loop derives each from (run seed, pair id, epoch).
    ``uncond``: the empty prompt's conditioning, a batch of 1 (needed for inversion guidance != 1).
    ``inverted_w`` / ``inverted_l``: the reference's inversion of each image at the grid levels,
    ``[B, L, ...]``, when read from a cache made with ``smpo cache --store-inversion`` (NaN rows:
    none stored for that image as batched, e.g. flipped or with its prompt dropped; inverted live).
    """

    latents_w: Tensor
    latents_l: Tensor
    cond: Conditioning
    p_win: Tensor
    seeds: list[int]
    uncond: Conditioning | None = None
    cond_l: Conditioning | None = None
    inverted_w: Tensor | None = None
    inverted_l: Tensor | None = None

    def __len__(self) -> int:
        return self.latents_w.shape[0]

    def to(self, device: torch.device | str) -> PairBatch:
        """This batch with every tensor on ``device`` (dtypes kept)."""
        return PairBatch(latents_w=self.latents_w.to(device), latents_l=self.latents_l.to(device),
                         cond=self.cond.to(device), p_win=self.p_win.to(device), seeds=list(self.seeds),
                         uncond=None if self.uncond is None else self.uncond.to(device),
                         cond_l=None if self.cond_l is None else self.cond_l.to(device),
                         inverted_w=None if self.inverted_w is None else self.inverted_w.to(device),
                         inverted_l=None if self.inverted_l is None else self.inverted_l.to(device))

    @property
    def inverted(self) -> Tensor | None:
        """The stored inversions of the ``2B`` images, winners first (``None`` without a cache of them)."""
        if self.inverted_w is None or self.inverted_l is None:
            return None
        return torch.cat([self.inverted_w, self.inverted_l])

    def to_images(self) -> ImageBatch:
        """The ``2B`` images as an unpaired batch: winners desirable, losers undesirable (for KTO).

        Each image gets its own seed derived from its pair's (independent t and eps per image).
        """
        seeds = [derive_seed(s, 0) for s in self.seeds] + [derive_seed(s, 1) for s in self.seeds]
        desirable = torch.cat([torch.ones(len(self), dtype=torch.bool), torch.zeros(len(self), dtype=torch.bool)])
        return ImageBatch(latents=torch.cat([self.latents_w, self.latents_l]),
                          cond=Conditioning.cat([self.cond, self.cond_l if self.cond_l is not None else self.cond]),
                          desirable=desirable.to(self.latents_w.device), seeds=seeds, uncond=self.uncond,
                          inverted=self.inverted)


@dataclass
class ImageBatch:
    """``B`` single images for unpaired methods (Diffusion-KTO): ``desirable[i]`` is y in ALGORITHM.md section 4."""

    latents: Tensor
    cond: Conditioning
    desirable: Tensor
    seeds: list[int]
    uncond: Conditioning | None = None
    inverted: Tensor | None = None  # stored inversions at the grid levels, [B, L, ...] (see PairBatch)

    def __len__(self) -> int:
        return self.latents.shape[0]


@dataclass
class NoisedBatch:
    """The noised latents and the target noise of a batch (exposed for tests and diagnostics)."""

    x_t: Tensor
    t: Tensor
    eps: Tensor
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Per-pair randomness


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any hashable parts (e.g. ``(seed, pair_id, epoch, "noise")`` or ``(seed, k)``).

    Uses a cryptographic hash of the parts' text, so it is the same on every process, platform
    and Python run (``hash()`` of a string is salted per process).
    """
    text = "\x1f".join(repr(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def draw_t_and_noise(seeds: Sequence[int], shape: Sequence[int], num_timesteps: int,
                     device: torch.device | str = "cpu", *, sampling: str = "uniform", logit_mean: float = 0.0,
                     logit_std: float = 1.0, mode_scale: float = 1.29) -> tuple[Tensor, Tensor]:
    """Per-sample ``t ~ U{0..T-1}`` (``LongTensor[B]``) and ``eps ~ N(0, I)`` (``[B, *shape]``).

    Sample ``i`` draws from a CPU generator seeded with ``seeds[i]`` (t first, then eps), so the
    draw is the same on every device and in every batch composition.

    ``sampling`` other than ``uniform``: ``u`` from diffusers' ``compute_density_for_timestep_sampling``
    (``logit_normal``, ``mode``) on the same generator, and ``t = T - 1 - int(u T)``: diffusers' flow
    training scripts take ``scheduler.timesteps[int(u T)]`` from a DEScending table, whose entry
    ``k`` is the ascending level ``T - 1 - k`` that ``t`` indexes here.
    """
    ts, noises = [], []
    for seed in seeds:
        g = torch.Generator().manual_seed(int(seed))
        if sampling == "uniform":
            ts.append(torch.randint(0, num_timesteps, (1,), generator=g))
        else:
            from diffusers.training_utils import compute_density_for_timestep_sampling

            u = compute_density_for_timestep_sampling(sampling, 1, logit_mean=logit_mean, logit_std=logit_std,
                                                      mode_scale=mode_scale, generator=g)
            k = (u * num_timesteps).long().clamp(0, num_timesteps - 1)
            ts.append(num_timesteps - 1 - k)
        noises.append(torch.randn(tuple(shape), generator=g))
    return torch.cat(ts).to(device), torch.stack(noises).to(device)


def _draw(batch_seeds: Sequence[int], shape: Sequence[int], family: FamilyAdapter, cfg: ObjectiveConfig,
          device: torch.device | str) -> tuple[Tensor, Tensor]:
    """``draw_t_and_noise`` with the config's level sampling."""
    return draw_t_and_noise(batch_seeds, shape, family.num_timesteps, device, sampling=cfg.timestep_sampling,
                            logit_mean=cfg.logit_mean, logit_std=cfg.logit_std, mode_scale=cfg.mode_scale)


# --------------------------------------------------------------------------------------------
# Noising


def noise_latents(family: FamilyAdapter, inverter: Any, x0: Tensor, t: Tensor, eps: Tensor, cond: Conditioning,
                  cfg: ObjectiveConfig, uncond: Conditioning | None = None,
                  seeds: Sequence[int] | None = None, stored: Tensor | None = None) -> NoisedBatch:
    """``x_t`` and the target noise for clean latents ``x0`` at per-sample ``t``.

    forward: ``x_t = sqrt(abar) x0 + sqrt(1-abar) eps`` with the given ``eps`` (section 1; a flow
    family: ``(1 - s) x0 + s eps``, ``family.add_noise``).
    ddim-inversion / renoise: ``x_t_hat`` = (Re)Noise inversion of ``x0`` up to ``t`` by
    ``inverter`` under no_grad, and its implied noise ``eps_hat`` (section 3; a flow family's
    Euler inversion, ``family.invert``); ``eps`` is unused.
    ``uncond`` (batch of 1, the empty prompt) is needed when ``cfg.inversion_guidance != 1``; it
    keeps each image's own SDXL ``time_ids``. ``seeds`` (one per row of ``x0``) seed the fresh
    noise of ``cfg.inversion_noise``. ``stored``: the reference's inversion of each row at the grid
    levels (``smpo cache --store-inversion``); the inversion then only finishes from them
    (`smpo.inversion.finish_from_levels`: nothing left on the authors' grid, one renoised step to
    ``t`` when landing on it), which equals inverting with the reference up to the fp16 storage.
    """
    if cfg.noising == "forward":
        return NoisedBatch(family.add_noise(x0, eps, t), t, eps)
    if inverter is None:
        raise ValueError(f"noising={cfg.noising} with inverting_network={cfg.inverting_network} needs that network")
    unc = None
    if cfg.inversion_guidance != 1.0:
        if uncond is None:
            raise ValueError(f"inversion_guidance={cfg.inversion_guidance} needs the batch's uncond (empty prompt)")
        unc = cond.drop_text(torch.ones(len(cond), dtype=torch.bool), uncond)
    with torch.no_grad():
        if stored is not None:
            if family.prediction_type_family != "diffusion":
                raise ValueError(f"stored inversions are DDIM inversions: the {family.name} family has none")
            x_t = _finish_stored(family, inverter, x0, t, cond, unc, cfg, stored)
            eps_hat = implied_noise(x_t, x0, t, family.alphas_cumprod)
        else:
            x_t, eps_hat = family.invert(
                inverter, x0, t, cond, uncond=unc, num_steps=cfg.inversion_steps,
                renoise_iters=cfg.effective_renoise_iters, guidance=cfg.inversion_guidance, land_on_t=cfg.land_on_t,
                step_noise=cfg.inversion_noise,
                generators=_inversion_generators(seeds, x0.shape[0]) if cfg.inversion_noise else None)
    return NoisedBatch(x_t.detach(), t, eps_hat.detach())


def _finish_stored(family: FamilyAdapter, inverter: Any, x0: Tensor, t: Tensor, cond: Conditioning,
                   unc: Conditioning | None, cfg: ObjectiveConfig, stored: Tensor) -> Tensor:
    """``x_t`` from stored inversions; rows of ``stored`` that are NaN (no stored inversion: a
    flipped image, a dropped prompt) are inverted live with the same network (``family.invert``)."""
    if cfg.inverting_network != "reference" or cfg.inversion_noise:
        raise ValueError("stored inversions hold the reference's deterministic inversion: they need "
                         "objective.inverting_network=reference and no inversion_noise")
    live = stored[:, 0].reshape(stored.shape[0], -1)[:, :1].isnan().flatten()
    kw = dict(num_steps=cfg.inversion_steps, renoise_iters=cfg.effective_renoise_iters, land_on_t=cfg.land_on_t)
    if not bool(live.any()):  # the usual case
        return finish_from_levels(family.eps_fn(inverter, cond, unc, cfg.inversion_guidance), x0, stored, t,
                                  family.alphas_cumprod, **kw)
    x_t = torch.empty_like(x0)
    kept, inverted = torch.nonzero(~live).flatten(), torch.nonzero(live).flatten()
    if kept.numel():
        eps_fn = family.eps_fn(inverter, cond.index(kept), None if unc is None else unc.index(kept),
                               cfg.inversion_guidance)
        x_t[kept] = finish_from_levels(eps_fn, x0[kept], stored[kept], t[kept], family.alphas_cumprod, **kw)
    x_t[inverted] = family.invert(inverter, x0[inverted], t[inverted], cond.index(inverted),
                                  uncond=None if unc is None else unc.index(inverted), guidance=cfg.inversion_guidance,
                                  step_noise=0.0, generators=None, **kw)[0]
    return x_t


def _inversion_generators(seeds: Sequence[int] | None, rows: int) -> list[torch.Generator]:
    if seeds is None or len(seeds) != rows:
        raise ValueError(f"objective.inversion_noise needs one seed per image ({rows}); got {seeds}")
    return [torch.Generator().manual_seed(derive_seed(s, "inversion-noise")) for s in seeds]


def errors(family: FamilyAdapter, network: Any, noised: NoisedBatch, x0: Tensor, cond: Conditioning) -> Tensor:
    """Per-sample ``||target - network(x_t, t, c)||^2`` (mean over elements), ``[B]``."""
    output = family.unet_output(network, noised.x_t, noised.t, cond)
    return per_sample_mse(output, family.target(x0, noised.eps, noised.t))


# --------------------------------------------------------------------------------------------
# The objective


def compute_loss(family: FamilyAdapter, policy: Any, reference: Any | None, batch: PairBatch | ImageBatch,
                 cfg: ObjectiveConfig, *, mean_over_processes: Callable[[Tensor], Tensor] | None = None) -> LossOutput:
    """The loss of ``cfg.method`` on ``batch`` (differentiable w.r.t. ``policy``'s trainable weights).

    ``policy``: the UNet being trained. ``reference``: a frozen UNet, the LoRA adapters-off view
    (``smpo.models.reference_view``) or ``None`` for reference-free methods (mapo, sft).
    KTO accepts an :class:`ImageBatch` or a :class:`PairBatch` (split into its images); its
    reference point is the mean implicit reward of this batch, or, given ``mean_over_processes``
    (the training loop passes accelerate's mean-reduce), of this pass's batches on all processes
    (as the authors compute it).
    """
    cfg = cfg.resolved()
    if cfg.needs_reference and reference is None:
        raise ValueError(f"method {cfg.method} (inverting with {cfg.inverting_network}) needs a reference network")
    inverter = policy if cfg.inverting_network == "policy" else reference
    if inverter is policy and cfg.noising != "forward":
        # LoRA: the no-grad inversion calls run with the adapters folded into the weights
        # (each call then costs what the base network costs; equal up to rounding).
        inverter = inference_view(policy)
    if cfg.method == "kto":
        images = batch if isinstance(batch, ImageBatch) else batch.to_images()
        return _kto(family, policy, reference, inverter, images, cfg, mean_over_processes)
    if not isinstance(batch, PairBatch):
        raise TypeError(f"method {cfg.method} needs a PairBatch, got {type(batch).__name__}")
    if cfg.method == "sft":
        return _sft(family, policy, inverter, batch, cfg)
    return _pairwise(family, policy, reference, inverter, batch, cfg)


def _pairwise(family: FamilyAdapter, policy: Any, reference: Any | None, inverter: Any, batch: PairBatch,
              cfg: ObjectiveConfig) -> LossOutput:
    """smpo, dpo, mapo: winner and loser share t (and eps when forward-noised), one call per network."""
    device = batch.latents_w.device
    t, eps = _draw(batch.seeds, batch.latents_w.shape[1:], family, cfg, device)
    x0 = torch.cat([batch.latents_w, batch.latents_l]).float()
    cond = Conditioning.cat([batch.cond, batch.cond_l if batch.cond_l is not None else batch.cond])
    image_seeds = [derive_seed(s, 0) for s in batch.seeds] + [derive_seed(s, 1) for s in batch.seeds]
    noised = noise_latents(family, inverter, x0, torch.cat([t, t]), torch.cat([eps, eps]), cond, cfg, batch.uncond,
                           image_seeds, batch.inverted)
    model_w, model_l = errors(family, policy, noised, x0, cond).chunk(2)
    if cfg.method == "mapo":
        out = LOSSES["mapo"](model_w, model_l, beta=cfg.beta, snr=cfg.mapo_snr, num_timesteps=family.num_timesteps)
    else:
        with torch.no_grad():
            ref_w, ref_l = errors(family, reference, noised, x0, cond).chunk(2)
        if cfg.labels == "binary":
            # Binary labels (p_w = 1, lambda = 1): Diffusion-DPO, also for the smpo rungs
            # "+ inversion" and "+ renoise" of the ablation ladder (ALGORITHM.md section 5).
            out = LOSSES["dpo"](model_w, model_l, ref_w, ref_l, beta=cfg.beta)
        else:
            out = LOSSES["smpo"](model_w, model_l, ref_w, ref_l, p_win=batch.p_win.to(device).float(),
                                 beta=cfg.beta, gamma=cfg.gamma)
    out.metrics["t_mean"] = t.float().mean()
    return out


def _sft(family: FamilyAdapter, policy: Any, inverter: Any, batch: PairBatch, cfg: ObjectiveConfig) -> LossOutput:
    """SFT on the winner image only (ALGORITHM.md section 4)."""
    x0 = batch.latents_w.float()
    t, eps = _draw(batch.seeds, x0.shape[1:], family, cfg, x0.device)
    noised = noise_latents(family, inverter, x0, t, eps, batch.cond, cfg, batch.uncond, batch.seeds, batch.inverted_w)
    out = LOSSES["sft"](errors(family, policy, noised, x0, batch.cond))
    out.metrics["t_mean"] = t.float().mean()
    return out


def _kto(family: FamilyAdapter, policy: Any, reference: Any, inverter: Any, batch: ImageBatch,
         cfg: ObjectiveConfig, mean_over_processes: Callable[[Tensor], Tensor] | None = None) -> LossOutput:
    """Diffusion-KTO: independent t and eps per image (ALGORITHM.md section 4)."""
    x0 = batch.latents.float()
    t, eps = _draw(batch.seeds, x0.shape[1:], family, cfg, x0.device)
    noised = noise_latents(family, inverter, x0, t, eps, batch.cond, cfg, batch.uncond, batch.seeds, batch.inverted)
    model = errors(family, policy, noised, x0, batch.cond)
    with torch.no_grad():
        ref = errors(family, reference, noised, x0, batch.cond)
    point = None
    if mean_over_processes is not None:
        point = mean_over_processes((ref - model).detach().mean())
    out = LOSSES["kto"](model, ref, desirable=batch.desirable.to(x0.device), beta=cfg.beta, reference_point=point)
    out.metrics["t_mean"] = t.float().mean()
    return out
