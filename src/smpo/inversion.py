"""Few-step DDIM inversion with ReNoise (SmPO Sec. 4.2, Eq. 13-14; ALGORITHM.md section 3), and its
flow-matching form (Euler inversion of the sampling ODE with ReNoise, for SD3 and FLUX; the last
section of this module).

Everything here depends only on a noise predictor ``eps_fn(x, t) -> eps`` (a batch and a
``LongTensor[B]`` of per-sample timesteps) and the scheduler's ``alphas_cumprod``; nothing knows
about UNets or diffusers objects.

The DDIM inversion step from level ``s`` to a higher level ``s'`` with noise estimate ``e``::

    x0_hat = (x_s - sqrt(1 - abar[s]) e) / sqrt(abar[s])
    x_s'   = sqrt(abar[s']) x0_hat + sqrt(1 - abar[s']) e

The clean image is the level ``CLEAN = -1`` with ``abar = 1``.

Two ways to walk the grid (``land_on_t``):

* ``True`` (default, the paper's Eq. 13): the grid levels are those of diffusers'
  ``DDIMInverseScheduler.set_timesteps(num_steps)`` (``k * T // num_steps + steps_offset``); each
  sample walks the grid levels strictly below its ``t``, then takes one more (renoised) step from
  the last of them exactly to ``t``. Noise is estimated at the destination level of each step,
  ``e0 = eps(x_s, s')``, as diffusers' inversion loops and ReNoise do.
* ``False``: the authors' training script as it runs with the diffusers release it pins (0.20).
  Its grid is ``k * T // num_steps + steps_offset - T // num_steps`` (``[-199, 1, 201, 401, 601]``
  for 5 steps); every grid point ``u < t`` is a step from ``u`` to ``u + T // num_steps`` with the
  noise estimated at ``(x, u)`` (the first call gets the negative timestep ``u = -199``, whose
  ``abar`` is diffusers 0.20's ``initial_alpha_cumprod``: 1 with ``set_alpha_to_one``, else
  ``alphas_cumprod[0]``, as SD1.5's and SDXL's scheduler configs say; ``initial_abar``). The latent ends at the smallest level ``>= t`` of
  ``{1, 201, ..., 801}`` (``t > 801`` stays at 801), not at ``t``. (From diffusers 0.22 on, the
  same loop ends at the largest level below ``t`` instead.)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

EpsFn = Callable[..., Tensor]
CLEAN = -1  # the level of the clean image, abar = 1


def _abar(alphas_cumprod: Tensor, levels: Tensor, below_zero: float = 1.0) -> Tensor:
    """``abar`` at integer levels; levels below 0 take ``below_zero`` (1: the clean image)."""
    ac = alphas_cumprod.to(device=levels.device, dtype=torch.float64)
    return torch.where(levels >= 0, ac[levels.clamp(min=0)], torch.full_like(ac[0], below_zero))


def initial_abar(alphas_cumprod: Tensor, set_alpha_to_one: bool) -> float:
    """diffusers 0.20's ``DDIMInverseScheduler.initial_alpha_cumprod``: the ``abar`` of the authors'
    grid's negative first level (1 with ``set_alpha_to_one``, else ``alphas_cumprod[0]``)."""
    return 1.0 if set_alpha_to_one else float(alphas_cumprod[0])


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    return v.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def ddim_step(x_s: Tensor, eps: Tensor, abar_s: Tensor, abar_next: Tensor) -> Tensor:
    """One deterministic DDIM move from ``abar_s`` to ``abar_next`` (either direction), per sample.

    ``x0_hat = (x_s - sqrt(1 - abar_s) eps) / sqrt(abar_s)``;
    ``x_next = sqrt(abar_next) x0_hat + sqrt(1 - abar_next) eps``.
    """
    abar_s, abar_next = _bcast(abar_s, x_s), _bcast(abar_next, x_s)
    x0_hat = (x_s - (1 - abar_s).sqrt() * eps) / abar_s.sqrt()
    return abar_next.sqrt() * x0_hat + (1 - abar_next).sqrt() * eps


def implied_noise(x_t: Tensor, x0: Tensor, t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """The noise that puts ``x0`` at ``x_t`` on level ``t``: ``(x_t - sqrt(abar[t]) x0) / sqrt(1 - abar[t])``."""
    abar = _bcast(_abar(alphas_cumprod, t.long()), x_t)
    return (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()


def _accepts_index(fn: EpsFn) -> bool:
    """Whether ``fn`` takes ``index=`` (the batch rows it is called on), so it can be run on a subset."""
    try:
        return "index" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def step_noise_std(abar_low: Tensor, abar_high: Tensor) -> Tensor:
    """The DDPM posterior standard deviation between two levels, as diffusers'
    ``DDIMScheduler._get_variance(high, low)`` computes its square:
    ``sqrt((1 - abar_low) / (1 - abar_high) * (1 - abar_high / abar_low))`` (0 from the clean image)."""
    return ((1 - abar_low) / (1 - abar_high) * (1 - abar_high / abar_low)).clamp(min=0).sqrt()


def _per_sample_randn(shape: torch.Size, rows: Tensor, generators: Sequence[torch.Generator] | None) -> Tensor:
    if generators is None:
        return torch.randn(rows.numel(), *shape)
    return torch.stack([torch.randn(tuple(shape), generator=generators[int(r)]) for r in rows.tolist()])


def _predictor(eps_fn: EpsFn) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """``predict(x, levels, rows)``: ``eps_fn`` called on the rows ``rows`` of the full batch."""
    if _accepts_index(eps_fn):
        return lambda x, levels, rows: eps_fn(x, levels, index=rows)
    return lambda x, levels, rows: eps_fn(x, levels)


def _renoise_step(predict: Callable[[Tensor, Tensor, Tensor], Tensor], x_s: Tensor, rows: Tensor, frm: Tensor,
                  to: Tensor, eval_at: Tensor, alphas_cumprod: Tensor, renoise_iters: int,
                  start_abar: float = 1.0) -> Tensor:
    """One ReNoise step (Eq. 14) of ``x_s`` (the rows ``rows``) from levels ``frm`` to ``to``, the
    noise estimated at ``eval_at``: ``renoise_iters`` re-evaluations, each re-stepping from ``x_s``
    with the mean of the estimates so far."""
    abar_s, abar_to = _abar(alphas_cumprod, frm, start_abar), _abar(alphas_cumprod, to)
    eps_sum = predict(x_s, eval_at, rows)
    x_new = ddim_step(x_s, eps_sum, abar_s, abar_to)
    for i in range(1, renoise_iters + 1):
        eps_sum = eps_sum + predict(x_new, eval_at, rows)
        x_new = ddim_step(x_s, eps_sum / (i + 1), abar_s, abar_to)
    return x_new


def inversion_grid(num_steps: int, num_train_timesteps: int, *, land_on_t: bool = True,
                   steps_offset: int = 1) -> Tensor:
    """The levels a step of the inversion lands on (``land_on_t=True``), or the authors' UNet-call
    grid (``land_on_t=False``, see the module docstring)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1; got {num_steps}")
    ratio = num_train_timesteps // num_steps
    levels = torch.arange(num_steps) * ratio + steps_offset
    return levels if land_on_t else levels - ratio


def renoise_invert(eps_fn: EpsFn, x0: Tensor, t: Tensor, alphas_cumprod: Tensor, *, num_steps: int,
                   renoise_iters: int = 1, land_on_t: bool = True, return_trajectory: bool = False,
                   steps_offset: int = 1, initial_abar: float = 1.0, step_noise: float = 0.0,
                   generators: Sequence[torch.Generator] | None = None
                   ) -> Tensor | tuple[Tensor, list[tuple[Tensor, Tensor]]]:
    """Invert DDIM from the clean ``x0`` up to level ``t`` (per sample), with ReNoise (Eq. 13-14).

    Args:
        eps_fn: ``eps_fn(x, t)`` predicts the noise of a batch at per-sample levels. If it also
            accepts ``index=`` (the rows of the full batch it is given), it is called only on the
            samples still inverting, which saves network evaluations when ``t`` differs per sample.
        x0: clean latents ``[B, ...]``.
        t: ``LongTensor[B]``, the level each sample stops at.
        alphas_cumprod: the scheduler's cumulative product of alphas, ``[T]``.
        num_steps: size of the inversion grid over ``[0, T)``.
        renoise_iters: 0 is plain DDIM inversion; each iteration evaluates the noise at the new
            point and re-steps from the start point with the average of all estimates so far.
        land_on_t: end exactly at ``t`` (default: the paper's Eq. 13, which this function states), or
            reproduce the authors' grid (module docstring). Training's ``ObjectiveConfig.land_on_t``
            defaults to the authors' grid and always passes its value through the family adapter.
        return_trajectory: also return the visited points, a list of ``(levels[B], latents)`` in
            ascending order, the last being the returned point. A sample that has finished keeps
            repeating its last point while others go on. The clean start is not included.
        steps_offset: the scheduler's ``steps_offset`` (1 for SD1.5 and SDXL).
        initial_abar: with ``land_on_t=False``, the ``abar`` the first step starts from at the
            grid's negative level, as diffusers 0.20's ``DDIMInverseScheduler`` takes it: 1 when
            the scheduler config says ``set_alpha_to_one``, else ``alphas_cumprod[0]`` (SD1.5's and
            SDXL's configs; ``FamilyAdapter.initial_abar``). Ignored with ``land_on_t=True``, whose
            clean image has ``abar = 1`` (Eq. 13).
        step_noise: DDIM-InPO's fresh noise (off at 0): after each step from ``s`` up to ``s'``,
            add ``step_noise * sigma * z``, ``z ~ N(0, I)``, with ``sigma`` the DDPM posterior
            standard deviation between the two levels (`step_noise_std`); the authors' InPO
            script uses 0.1. The point is then no longer the deterministic inversion of ``x0``.
        generators: with ``step_noise``, one CPU generator per sample (its draws do not depend
            on the batch a sample is in); ``None`` uses the global generator.

    Returns:
        ``x_t`` (and the trajectory). Compute the target noise with `implied_noise`.
    """
    if renoise_iters < 0:
        raise ValueError(f"renoise_iters must be >= 0; got {renoise_iters}")
    t = torch.as_tensor(t, device=x0.device).long().reshape(-1)
    if t.shape[0] != x0.shape[0]:
        raise ValueError(f"t has {t.shape[0]} entries for a batch of {x0.shape[0]}")
    T = alphas_cumprod.shape[0]
    if bool(((t < 0) | (t >= T)).any()):
        raise ValueError(f"t must lie in [0, {T}); got {t.tolist()}")
    grid = inversion_grid(num_steps, T, land_on_t=land_on_t, steps_offset=steps_offset).to(x0.device)
    ratio = T // num_steps
    start_abar = 1.0 if land_on_t else float(initial_abar)
    predict = _predictor(eps_fn)

    x = x0.clone()
    level = torch.full_like(t, CLEAN)
    trajectory: list[tuple[Tensor, Tensor]] = []

    def step(rows: Tensor, frm: Tensor, to: Tensor, eval_at: Tensor) -> None:
        """ReNoise step of the samples ``rows`` from level ``frm`` to level ``to``."""
        x_s = x if rows.numel() == x.shape[0] else x[rows]
        x_new = _renoise_step(predict, x_s, rows, frm, to, eval_at, alphas_cumprod, renoise_iters, start_abar)
        if step_noise:
            abar_s, abar_to = _abar(alphas_cumprod, frm, start_abar), _abar(alphas_cumprod, to)
            z = _per_sample_randn(x_s.shape[1:], rows, generators).to(x_new)
            x_new = x_new + step_noise * _bcast(step_noise_std(abar_s, abar_to), x_new) * z
        x[rows] = x_new
        level[rows] = to
        if return_trajectory:
            trajectory.append((level.clone(), x.clone()))

    for u in grid.tolist():
        rows = torch.nonzero(u < t).flatten()  # grid points below each sample's t
        if rows.numel() == 0:
            break
        if land_on_t:
            dest = torch.full_like(rows, u)
            step(rows, level[rows], dest, dest)
        else:
            at = torch.full_like(rows, u)
            step(rows, at, at + ratio, at)
    if land_on_t:
        rows = torch.arange(x.shape[0], device=x.device)
        step(rows, level.clone(), t, t)

    x_t = x
    return (x_t, trajectory) if return_trajectory else x_t


# --------------------------------------------------------------------------------------------
# Flow matching (SD3, FLUX): Euler inversion of the sampling ODE with ReNoise
#
# A flow-matching model noises linearly, ``x_s = (1 - s) x0 + s eps`` at noise level (sigma)
# ``s`` in [0, 1], and its network predicts the velocity ``v(x_s, s) ~ eps - x0``; sampling
# integrates ``dx/ds = v`` from ``s = 1`` down to 0 with Euler steps ``x_s = x_s' + (s - s') v``.
# The inversion walks the other way, from the clean ``x0`` (``s = 0``) up to each sample's ``s``:
#
#     x_s' = x_s + (s' - s) v0,          v0 = v(x_s, s')
#
# (the velocity at the current point and the destination level, as the DDIM inversion above
# takes its noise estimate). ReNoise (Eq. 14 in flow form) re-evaluates the velocity at the new
# point, ``v_k = v(x_s'^(k), s')``, and re-steps from ``x_s`` with the mean of all estimates so
# far. The grid's levels strictly below ``s`` are walked, then one more renoised step lands
# exactly on ``s``. The point's implied noise and velocity are
#
#     eps_hat = (x_s - (1 - s) x0) / s,     v_hat = eps_hat - x0 = (x_s - x0) / s.

VelocityFn = Callable[..., Tensor]


def flow_grid(num_steps: int, sigmas: Tensor) -> Tensor:
    """The inversion grid of ``num_steps`` over a schedule's ascending ``sigmas`` ``[T]``: the levels
    ``sigmas[k * T // num_steps]`` for ``k = 1 .. num_steps - 1`` (the clean start ``s = 0`` is
    implicit), the flow analogue of :func:`inversion_grid`."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1; got {num_steps}")
    T = sigmas.shape[0]
    return sigmas[torch.arange(1, num_steps) * (T // num_steps)]


def flow_implied_noise(x_s: Tensor, x0: Tensor, sigma: Tensor) -> Tensor:
    """The noise that puts ``x0`` at ``x_s`` on level ``sigma``: ``(x_s - (1 - s) x0) / s``."""
    s = _bcast(sigma, x_s)
    return (x_s - (1 - s) * x0) / s


def flow_implied_velocity(x_s: Tensor, x0: Tensor, sigma: Tensor) -> Tensor:
    """The velocity target of the point ``x_s`` of ``x0``: ``eps_hat - x0 = (x_s - x0) / s``."""
    return flow_implied_noise(x_s, x0, sigma) - x0


def flow_renoise_invert(velocity_fn: VelocityFn, x0: Tensor, sigma: Tensor, grid: Tensor, *,
                        renoise_iters: int = 1, return_trajectory: bool = False
                        ) -> Tensor | tuple[Tensor, list[tuple[Tensor, Tensor]]]:
    """Euler-invert the flow ODE from the clean ``x0`` up to level ``sigma`` (per sample), with ReNoise.

    Args:
        velocity_fn: ``velocity_fn(x, s)`` predicts the velocity of a batch at per-sample float
            levels ``s`` ``[B]``; if it also accepts ``index=`` (the rows of the full batch it is
            given) it is called only on the samples still inverting.
        x0: clean latents ``[B, ...]``.
        sigma: ``[B]`` levels in ``(0, 1]`` each sample stops at.
        grid: ascending intermediate levels (e.g. :func:`flow_grid`); each sample walks those
            strictly below its ``sigma`` and then steps exactly to ``sigma``.
        renoise_iters: 0 is plain Euler inversion; each iteration re-evaluates the velocity at the
            new point and re-steps from the start point with the mean of all estimates so far.
        return_trajectory: also return ``(levels[B], latents)`` after each step (finished samples
            repeat their last point).

    Returns:
        ``x_s`` (and the trajectory). Its target noise is `flow_implied_noise`.
    """
    if renoise_iters < 0:
        raise ValueError(f"renoise_iters must be >= 0; got {renoise_iters}")
    sigma = torch.as_tensor(sigma, device=x0.device).to(x0.dtype).reshape(-1)
    if sigma.shape[0] != x0.shape[0]:
        raise ValueError(f"sigma has {sigma.shape[0]} entries for a batch of {x0.shape[0]}")
    if bool(((sigma <= 0) | (sigma > 1)).any()):
        raise ValueError(f"sigma must lie in (0, 1]; got {sigma.tolist()}")
    predict = _predictor(velocity_fn)
    x = x0.clone()
    level = torch.zeros_like(sigma)
    trajectory: list[tuple[Tensor, Tensor]] = []

    def step(rows: Tensor, to: Tensor) -> None:
        full = rows.numel() == x.shape[0]
        x_s = x if full else x[rows]
        ds = _bcast(to - level[rows], x_s)
        v_sum = predict(x_s, to, rows)
        x_new = x_s + ds * v_sum
        for i in range(1, renoise_iters + 1):
            v_sum = v_sum + predict(x_new, to, rows)
            x_new = x_s + ds * (v_sum / (i + 1))
        x[rows] = x_new
        level[rows] = to
        if return_trajectory:
            trajectory.append((level.clone(), x.clone()))

    for u in grid.to(device=x0.device, dtype=x0.dtype).tolist():
        rows = torch.nonzero(u < sigma).flatten()
        if rows.numel() == 0:
            break
        step(rows, torch.full((rows.numel(),), u, device=x0.device, dtype=x0.dtype))
    step(torch.arange(x.shape[0], device=x.device), sigma.clone())
    return (x, trajectory) if return_trajectory else x


def flow_euler_sample(velocity_fn: VelocityFn, x_s: Tensor, sigma: Tensor, grid: Tensor) -> Tensor:
    """The Euler sampler from level ``sigma`` down to 0 over the same grid (reconstruction):
    ``x_{s'} = x_s + (s' - s) v(x_s, s)`` through the grid levels below ``sigma``, then to 0."""
    sigma = torch.as_tensor(sigma, device=x_s.device).to(x_s.dtype).reshape(-1)
    x, level = x_s.clone(), sigma.clone()
    for u in [*reversed(grid.to(device=x_s.device, dtype=x_s.dtype).tolist()), 0.0]:
        rows = torch.nonzero(u < level).flatten()
        if rows.numel() == 0:
            continue
        to = torch.full((rows.numel(),), u, device=x.device, dtype=x.dtype)
        v = velocity_fn(x[rows], level[rows])
        x[rows] = x[rows] + _bcast(to - level[rows], v) * v
        level[rows] = to
    return x


# --------------------------------------------------------------------------------------------
# Cached inversion: the grid levels computed once per image, the rest at training time


def stored_levels(num_steps: int, num_train_timesteps: int, *, steps_offset: int = 1) -> Tensor:
    """The levels whose latents a cached inversion stores, in both modes: ``k * T // num_steps +
    steps_offset`` (``[1, 201, 401, 601, 801]`` for 5 steps)."""
    return inversion_grid(num_steps, num_train_timesteps, land_on_t=True, steps_offset=steps_offset)


def invert_to_levels(eps_fn: EpsFn, x0: Tensor, alphas_cumprod: Tensor, *, num_steps: int, renoise_iters: int = 1,
                     land_on_t: bool = True, steps_offset: int = 1, initial_abar: float = 1.0) -> Tensor:
    """The inversion of ``x0`` at every `stored_levels` level, ``[B, num_steps, ...]``: the points
    `renoise_invert` passes through on its way to the top of the range (with ``land_on_t`` the
    steps to the grid levels; without, the authors' steps, each ending on a grid level)."""
    top = torch.full((x0.shape[0],), alphas_cumprod.shape[0] - 1, dtype=torch.long, device=x0.device)
    _, trajectory = renoise_invert(eps_fn, x0, top, alphas_cumprod, num_steps=num_steps, renoise_iters=renoise_iters,
                                   land_on_t=land_on_t, return_trajectory=True, steps_offset=steps_offset,
                                   initial_abar=initial_abar)
    expected = stored_levels(num_steps, alphas_cumprod.shape[0], steps_offset=steps_offset).to(x0.device)
    for k, (levels, _) in enumerate(trajectory[:num_steps]):
        if bool((levels != expected[k]).any()):  # the grid's top must lie below T - 1
            raise ValueError(f"inversion step {k} ended at {levels.tolist()}, not at level {int(expected[k])}")
    return torch.stack([x for _, x in trajectory[:num_steps]], dim=1)


def finish_from_levels(eps_fn: EpsFn | None, x0: Tensor, stored: Tensor, t: Tensor, alphas_cumprod: Tensor, *,
                       num_steps: int, renoise_iters: int = 1, land_on_t: bool = True,
                       steps_offset: int = 1) -> Tensor:
    """`renoise_invert`'s result from the stored levels of `invert_to_levels` (``stored``: ``[B, L, ...]``).

    Authors' grid (``land_on_t=False``): the stored level at the smallest grid level ``>= t`` (the
    last one for ``t`` above it) is the answer; no network is called (``eps_fn`` may be ``None``).
    ``land_on_t=True``: from the stored level just below ``t`` (the clean ``x0`` when none is) one
    more ReNoise step to ``t``, evaluated at ``t``, as `renoise_invert` ends.
    """
    t = torch.as_tensor(t, device=x0.device).long().reshape(-1)
    grid = stored_levels(num_steps, alphas_cumprod.shape[0], steps_offset=steps_offset).to(x0.device)
    if stored.shape[:2] != (x0.shape[0], grid.numel()) or stored.shape[2:] != x0.shape[1:]:
        raise ValueError(f"stored levels of shape {tuple(stored.shape)} do not fit latents {tuple(x0.shape)} "
                         f"and a {grid.numel()}-step grid")
    rows = torch.arange(x0.shape[0], device=x0.device)
    above = torch.searchsorted(grid, t)  # index of the first grid level >= t = number of levels below t
    if not land_on_t:
        return stored[rows, above.clamp(max=grid.numel() - 1)].to(x0.dtype)
    if eps_fn is None:
        raise ValueError("land_on_t=True needs eps_fn for the last step to t")
    below = above - 1
    has = (below >= 0).view(-1, *([1] * (x0.dim() - 1)))
    x_s = torch.where(has, stored[rows, below.clamp(min=0)].to(x0.dtype), x0)
    frm = torch.where(below >= 0, grid[below.clamp(min=0)], torch.full_like(t, CLEAN))
    return _renoise_step(_predictor(eps_fn), x_s, rows, frm, t, t, alphas_cumprod, renoise_iters)
