"""Preference losses as pure functions over per-sample errors (ALGORITHM.md sections 1, 2 and 4).

No function here sees a network. Each takes per-sample error tensors of shape ``[B]`` (the MEAN
squared error of one sample's prediction over all its latent elements, see `per_sample_mse`) and
returns a `LossOutput`: the batch mean ``loss``, the per-sample ``losses`` and detached
``metrics`` named as the field names them (Diffusion-DPO's implicit accuracy, TRL's reward
margin...). The method table (`smpo.methods`) names each method's function.

Notation: ``model_*`` are the policy's errors ``m = ||eps - eps_theta(x_t, t, c)||^2``, ``ref_*``
the frozen reference's ``r``; ``_w`` is the preferred (winner) image, ``_l`` the other one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from smpo.preference import sensitivity_ratio


@dataclass
class LossOutput:
    """What every loss returns."""

    loss: Tensor
    """Scalar: the mean of ``losses`` over the batch (what is back-propagated)."""
    losses: Tensor
    """``[B]``: one loss per pair (per image for KTO and SFT)."""
    metrics: dict[str, Tensor] = field(default_factory=dict)
    """Detached scalars for logging."""


def per_sample_mse(pred: Tensor, target: Tensor) -> Tensor:
    """``||pred - target||^2`` as the MEAN over every non-batch dimension, in float32: ``[B]``.

    The betas of ALGORITHM.md are calibrated for the mean, not the sum.
    """
    diff = pred.float() - target.float()
    return diff.pow(2).flatten(1).mean(dim=1)


def _check_same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    first = next(iter(shapes.values()))
    if len(first) != 1 or any(s != first for s in shapes.values()):
        raise ValueError(f"expected per-sample tensors of one shape [B]; got {shapes}")


def _accuracy(inside: Tensor) -> Tensor:
    """Share of pairs whose implicit preference agrees with the label; an exact tie counts 1/2."""
    return ((inside > 0).float() + 0.5 * (inside == 0).float()).mean()


def _pairwise_metrics(inside: Tensor, model_w: Tensor, model_l: Tensor, ref_w: Tensor, ref_l: Tensor,
                      scale: Tensor | float) -> dict[str, Tensor]:
    reward_w = -scale * (model_w - ref_w)
    reward_l = -scale * (model_l - ref_l)
    return {
        "implicit_acc": _accuracy(inside),
        "reward_margin": inside.mean(),
        "reward_w": reward_w.mean(),
        "reward_l": reward_l.mean(),
        "model_mse_w": model_w.mean(),
        "model_mse_l": model_l.mean(),
        "ref_mse_w": ref_w.mean(),
        "ref_mse_l": ref_l.mean(),
    }


def sft_loss(model_w: Tensor) -> LossOutput:
    """Supervised fine-tuning on the preferred image: ``L = ||eps - eps_theta(x_t^w, t, c)||^2``."""
    _check_same_shape(model_w=model_w)
    return LossOutput(loss=model_w.mean(), losses=model_w, metrics={"model_mse_w": model_w.detach().mean()})


def dpo_loss(model_w: Tensor, model_l: Tensor, ref_w: Tensor, ref_l: Tensor, *, beta: float) -> LossOutput:
    """Diffusion-DPO (Wallace et al. 2023, Eq. 6 as implemented; ALGORITHM.md section 1).

    ``L = -log sigmoid(-(beta/2) * [(m_w - r_w) - (m_l - r_l)])``.
    """
    _check_same_shape(model_w=model_w, model_l=model_l, ref_w=ref_w, ref_l=ref_l)
    scale = 0.5 * beta
    inside = -scale * ((model_w - ref_w) - (model_l - ref_l))
    losses = -F.logsigmoid(inside)
    with torch.no_grad():
        metrics = _pairwise_metrics(inside, model_w, model_l, ref_w, ref_l, scale)
    return LossOutput(loss=losses.mean(), losses=losses, metrics=metrics)


def smpo_loss(model_w: Tensor, model_l: Tensor, ref_w: Tensor, ref_l: Tensor, *, p_win: Tensor | float,
              beta: float, gamma: float = 10.0) -> LossOutput:
    """SmPO (paper Eq. 10, estimated as Eq. 15-16; ALGORITHM.md section 2).

    ``L = -log sigmoid(-(beta/2) * lambda * [(m_w - r_w) - (m_l - r_l)])`` with the per-pair
    weight-to-sensitivity ratio ``lambda = gamma * (2 p_win - 1)`` (Eq. 12). ``p_win`` is the
    smoothed probability that the ``_w`` image is preferred, one per pair. At ``p_win = 0.5`` the
    loss is log 2 with zero gradient; with ``p_win = 1`` and ``gamma = 1`` it is Diffusion-DPO.
    """
    _check_same_shape(model_w=model_w, model_l=model_l, ref_w=ref_w, ref_l=ref_l)
    p_win = torch.as_tensor(p_win, dtype=model_w.dtype, device=model_w.device).expand_as(model_w)
    if bool(((p_win < 0) | (p_win > 1)).any()):
        raise ValueError(f"p_win must lie in [0, 1]; got values from {p_win.min().item()} to {p_win.max().item()}")
    lam = sensitivity_ratio(p_win, gamma)
    scale = 0.5 * beta * lam
    inside = -scale * ((model_w - ref_w) - (model_l - ref_l))
    losses = -F.logsigmoid(inside)
    with torch.no_grad():
        metrics = _pairwise_metrics(inside, model_w, model_l, ref_w, ref_l, scale)
        metrics["lambda"] = lam.mean()
        metrics["p_win"] = p_win.mean()
    return LossOutput(loss=losses.mean(), losses=losses, metrics=metrics)


def _odds_ratio_term(x: Tensor) -> Tensor:
    """MaPO's ``f(x) = x / (e^x - 1)``, with its limit 1 at ``x = 0``."""
    small = x.abs() < 1e-6
    safe = torch.where(small, torch.ones_like(x), x)
    return torch.where(small, 1.0 - 0.5 * x, safe / torch.expm1(safe))


def mapo_loss(model_w: Tensor, model_l: Tensor, *, beta: float = 0.1, snr: float = 0.5,
              num_timesteps: int = 1000) -> LossOutput:
    """MaPO (Hong et al. 2024; ALGORITHM.md section 4), reference-free.

    ``L = mean(m_w) - beta * mean(log sigmoid(T * [f(s m_w) - f(s m_l)]))`` with
    ``f(x) = x / (e^x - 1)``, ``s = snr`` and ``T = num_timesteps``.
    """
    _check_same_shape(model_w=model_w, model_l=model_l)
    log_odds = _odds_ratio_term(snr * model_w) - _odds_ratio_term(snr * model_l)
    ratio = F.logsigmoid(num_timesteps * log_odds)
    losses = model_w - beta * ratio
    with torch.no_grad():
        metrics = {
            "implicit_acc": _accuracy(log_odds),
            "reward_margin": log_odds.mean(),
            "ratio": ratio.mean(),
            "model_mse_w": model_w.mean(),
            "model_mse_l": model_l.mean(),
        }
    return LossOutput(loss=losses.mean(), losses=losses, metrics=metrics)


def kto_loss(model: Tensor, ref: Tensor, *, desirable: Tensor, beta: float = 1000.0,
             reference_point: Tensor | float | None = None) -> LossOutput:
    """Diffusion-KTO (Li et al. 2024; ALGORITHM.md section 4), unpaired.

    Implicit reward ``g = r - m``; reference point ``z0 = max(0, mean g)`` over the global batch,
    detached; ``L = mean(1 - sigmoid((2y - 1) * beta * (g - z0)))`` with ``y = desirable``.
    Under several processes, pass ``reference_point`` computed from the gathered ``g`` (the
    mean over all processes' images); by default it is this batch's.
    """
    _check_same_shape(model=model, ref=ref)
    desirable = torch.as_tensor(desirable, device=model.device)
    if desirable.shape != model.shape:
        raise ValueError(f"desirable must have shape {tuple(model.shape)}; got {tuple(desirable.shape)}")
    implicit_reward = ref - model
    if reference_point is None:
        z0 = implicit_reward.detach().mean().clamp(min=0)
    else:
        z0 = torch.as_tensor(reference_point, dtype=model.dtype, device=model.device).detach().clamp(min=0)
    sign = 2.0 * desirable.to(model.dtype) - 1.0
    losses = 1.0 - torch.sigmoid(sign * beta * (implicit_reward - z0))
    with torch.no_grad():
        metrics = {
            "implicit_acc": _accuracy(sign * (implicit_reward - z0)),
            "reward_margin": (sign * implicit_reward).mean(),
            "kl_reference_point": z0,
            "model_mse": model.mean(),
            "ref_mse": ref.mean(),
        }
    return LossOutput(loss=losses.mean(), losses=losses, metrics=metrics)


LOG2 = math.log(2.0)
"""SmPO's loss of a pair whose labels are even (``p_win = 0.5``, so ``lambda = 0``)."""
