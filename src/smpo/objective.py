"""The per-batch computation of every method: noise the latents, run the networks, call the loss.

Data flows one way (STYLE.md): a batch of latents and conditioning -> noising (forward, ALGORITHM.md
section 1, or (Re)Noise inversion, section 3) -> per-sample errors ``m`` (policy) and ``r``
(reference) -> the method's loss (its record in ``smpo.methods``, a pure function of ``smpo.losses``;
sections 1, 2, 4). The record's batch kind says what is noised: winner and loser, the winner only,
or single images. The ablation rungs of section 5 are plain settings of :class:`ObjectiveConfig`
(``noising`` x ``labels``).

Randomness is per pair: pair ``i``'s timestep ``t ~ U{0..T-1}`` and noise ``eps ~ N(0, I)`` are
drawn from a ``torch.Generator`` seeded with ``batch.seeds[i]`` (the training loop derives it from
the run seed, the pair id and the epoch), so what a pair is trained on does not depend on the
batch it lands in, the number of processes or the accumulation split. Winner and loser share
``t`` and, when forward-noised, ``eps``.

Speed: winner and loser go through each network in ONE call of ``2B`` samples; the inversion
inverts both images together. ``family.network_evals`` counts the network sample-evaluations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from smpo.batch import ImageBatch, NoisedBatch, PairBatch, derive_seed
from smpo.labels import LABELS
from smpo.losses import LossOutput, per_sample_mse
from smpo.methods import METHODS, BatchKind, LossInputs, Method, get_method
from smpo.models import Conditioning, FamilyAdapter
from smpo.models.lora import inference_view
from smpo.models.sharded import gathered

NOISINGS: tuple[str, ...] = ("forward", "ddim-inversion", "renoise")
TIMESTEP_SAMPLINGS: tuple[str, ...] = ("uniform", "logit_normal", "mode")


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
        method = get_method(self.method)
        cfg = replace(
            self,
            beta=method.default_beta if self.beta is None else float(self.beta),
            noising=self.noising or method.default_noising,
            labels=self.labels or method.default_labels,
        )
        if cfg.noising not in NOISINGS:
            raise ValueError(f"objective.noising {cfg.noising!r}: choose from {', '.join(NOISINGS)}")
        if cfg.labels not in LABELS:
            raise ValueError(f"objective.labels {cfg.labels!r}: choose from {', '.join(LABELS)}")
        if cfg.labels == "smoothed" and not method.smoothed_labels:
            allowed = " or ".join(m.name for m in METHODS.values() if m.smoothed_labels)
            raise ValueError(f"objective.labels=smoothed needs method {allowed} (got {cfg.method})")
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
        return get_method(cfg.method).needs_reference or inverts_with_ref


# --------------------------------------------------------------------------------------------
# Per-pair randomness


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
    g = torch.Generator()  # reseeded per sample (building a generator per sample cost more than its draws)
    for seed in seeds:
        g.manual_seed(int(seed))
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
    with torch.no_grad(), gathered(inverter):  # a sharded network: its calls differ in number between processes
        if stored is not None:
            if not family.stores_inversion:
                raise ValueError(f"stored inversions are DDIM inversions: the {family.name} family has none")
            x_t = _finish_stored(family, inverter, x0, t, cond, unc, cfg, stored)
            eps_hat = family.implied_noise(x_t, x0, t)
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
        return family.finish_from_levels(inverter, x0, stored, t, cond, uncond=unc,
                                         guidance=cfg.inversion_guidance, **kw)
    x_t = torch.empty_like(x0)
    kept, inverted = torch.nonzero(~live).flatten(), torch.nonzero(live).flatten()
    if kept.numel():
        x_t[kept] = family.finish_from_levels(inverter, x0[kept], stored[kept], t[kept], cond.index(kept),
                                              uncond=None if unc is None else unc.index(kept),
                                              guidance=cfg.inversion_guidance, **kw)
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
    output = family.network_output(network, noised.x_t, noised.t, cond)
    return per_sample_mse(output, family.target(x0, noised.eps, noised.t))


# --------------------------------------------------------------------------------------------
# The objective


def compute_loss(family: FamilyAdapter, policy: Any, reference: Any | None, batch: PairBatch | ImageBatch,
                 cfg: ObjectiveConfig, *, mean_over_processes: Callable[[Tensor], Tensor] | None = None) -> LossOutput:
    """The loss of ``cfg.method`` on ``batch`` (differentiable w.r.t. ``policy``'s trainable weights).

    ``policy``: the network being trained. ``reference``: a frozen network, the LoRA adapters-off
    view (``smpo.models.reference_view``) or ``None`` for reference-free methods (mapo, sft).
    An unpaired method (KTO) accepts an :class:`ImageBatch` or a :class:`PairBatch` (split into its
    images); its reference point is the mean implicit reward of this batch, or, given
    ``mean_over_processes`` (the training loop passes accelerate's mean-reduce), of this pass's
    batches on all processes (as the authors compute it).
    """
    cfg = cfg.resolved()
    method = get_method(cfg.method)
    if cfg.needs_reference and reference is None:
        raise ValueError(f"method {cfg.method} (inverting with {cfg.inverting_network}) needs a reference network")
    inverter = policy if cfg.inverting_network == "policy" else reference
    if inverter is policy and cfg.noising != "forward":
        # LoRA: the no-grad inversion calls run with the adapters folded into the weights
        # (each call then costs what the base network costs; equal up to rounding).
        inverter = inference_view(policy)
    if method.batch_kind is BatchKind.UNPAIRED:
        images = batch if isinstance(batch, ImageBatch) else batch.to_images()
        return _unpaired(method, family, policy, reference, inverter, images, cfg, mean_over_processes)
    if not isinstance(batch, PairBatch):
        raise TypeError(f"method {cfg.method} needs a PairBatch, got {type(batch).__name__}")
    if method.batch_kind is BatchKind.WINNER_ONLY:
        return _winner_only(method, family, policy, inverter, batch, cfg)
    return _pairwise(method, family, policy, reference, inverter, batch, cfg)


def _loss_inputs(cfg: ObjectiveConfig, family: FamilyAdapter, model: Tensor, ref: Tensor | None, *,
                 p_win: Tensor | None = None, desirable: Tensor | None = None,
                 reference_point: Tensor | None = None) -> LossInputs:
    """The measured errors and the resolved config's loss settings, as every method's loss reads them."""
    if cfg.beta is None:
        raise ValueError("objective.beta is unresolved: call ObjectiveConfig.resolved() first")
    return LossInputs(model=model, ref=ref, beta=cfg.beta, gamma=cfg.gamma, smoothed=cfg.labels == "smoothed",
                      mapo_snr=cfg.mapo_snr, num_timesteps=family.num_timesteps, p_win=p_win, desirable=desirable,
                      reference_point=reference_point)


def _reference_errors(method: Method, family: FamilyAdapter, reference: Any, noised: NoisedBatch, x0: Tensor,
                      cond: Conditioning) -> Tensor | None:
    """The reference's per-sample errors under no_grad, when the method's loss reads them."""
    if not method.needs_reference:
        return None
    with torch.no_grad():
        return errors(family, reference, noised, x0, cond)


def _pairwise(method: Method, family: FamilyAdapter, policy: Any, reference: Any | None, inverter: Any,
              batch: PairBatch, cfg: ObjectiveConfig) -> LossOutput:
    """Winner and loser share t (and eps when forward-noised), one call of ``2B`` samples per network."""
    device = batch.latents_w.device
    t, eps = _draw(batch.seeds, batch.latents_w.shape[1:], family, cfg, device)
    x0 = torch.cat([batch.latents_w, batch.latents_l]).float()
    cond = Conditioning.cat([batch.cond, batch.cond_l if batch.cond_l is not None else batch.cond])
    # Each image's own seed, for the inversion's fresh noise only.
    image_seeds = ([derive_seed(s, 0) for s in batch.seeds] + [derive_seed(s, 1) for s in batch.seeds]
                   if cfg.inversion_noise else None)
    noised = noise_latents(family, inverter, x0, torch.cat([t, t]), torch.cat([eps, eps]), cond, cfg, batch.uncond,
                           image_seeds, batch.inverted)
    model = errors(family, policy, noised, x0, cond)
    ref = _reference_errors(method, family, reference, noised, x0, cond)
    out = method.compute(_loss_inputs(cfg, family, model, ref, p_win=batch.p_win.to(device).float()))
    out.metrics["t_mean"] = t.float().mean()
    return out


def _winner_only(method: Method, family: FamilyAdapter, policy: Any, inverter: Any, batch: PairBatch,
                 cfg: ObjectiveConfig) -> LossOutput:
    """The winner image only (SFT, ALGORITHM.md section 4)."""
    x0 = batch.latents_w.float()
    t, eps = _draw(batch.seeds, x0.shape[1:], family, cfg, x0.device)
    noised = noise_latents(family, inverter, x0, t, eps, batch.cond, cfg, batch.uncond, batch.seeds, batch.inverted_w)
    out = method.compute(_loss_inputs(cfg, family, errors(family, policy, noised, x0, batch.cond), None))
    out.metrics["t_mean"] = t.float().mean()
    return out


def _unpaired(method: Method, family: FamilyAdapter, policy: Any, reference: Any, inverter: Any, batch: ImageBatch,
              cfg: ObjectiveConfig, mean_over_processes: Callable[[Tensor], Tensor] | None = None) -> LossOutput:
    """Single images with independent t and eps (Diffusion-KTO, ALGORITHM.md section 4)."""
    x0 = batch.latents.float()
    t, eps = _draw(batch.seeds, x0.shape[1:], family, cfg, x0.device)
    noised = noise_latents(family, inverter, x0, t, eps, batch.cond, cfg, batch.uncond, batch.seeds, batch.inverted)
    model = errors(family, policy, noised, x0, batch.cond)
    ref = _reference_errors(method, family, reference, noised, x0, batch.cond)
    point = None
    if mean_over_processes is not None and ref is not None:
        # The reference point z0 over the global batch: the mean implicit reward g = r - m.
        point = mean_over_processes((ref - model).detach().mean())
    out = method.compute(_loss_inputs(cfg, family, model, ref, desirable=batch.desirable.to(x0.device),
                                      reference_point=point))
    out.metrics["t_mean"] = t.float().mean()
    return out
