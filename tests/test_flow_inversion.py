"""Flow-matching inversion (Euler + ReNoise) on an analytic Gaussian data distribution.

Data ``x0 ~ N(mu, sd^2)`` per element and noise ``eps ~ N(0, 1)`` give ``x_s = (1 - s) x0 + s eps``
the marginal ``N(m_s, V_s)`` with ``m_s = (1 - s) mu`` and ``V_s = (1 - s)^2 sd^2 + s^2``; the exact
velocity ``E[eps - x0 | x_s = x]`` is ``(s - (1 - s) sd^2) (x - m_s) / V_s - mu``, and the ODE maps
``x0`` to ``m_s + sqrt(V_s) (x0 - mu) / sd`` (quantiles are preserved).
"""

from __future__ import annotations

import math

import pytest
import torch

from smpo.inversion import (
    flow_euler_sample,
    flow_grid,
    flow_implied_noise,
    flow_implied_velocity,
    flow_renoise_invert,
)

MU, SD = 0.7, 0.5


def velocity(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    s = s.to(x.dtype).view(-1, *[1] * (x.dim() - 1))
    m, var = (1 - s) * MU, (1 - s) ** 2 * SD**2 + s**2
    return (s - (1 - s) * SD**2) * (x - m) / var - MU


def exact_point(x0: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    s = s.to(x0.dtype).view(-1, *[1] * (x0.dim() - 1))
    return (1 - s) * MU + ((1 - s) ** 2 * SD**2 + s**2).sqrt() * (x0 - MU) / SD


@pytest.fixture
def x0() -> torch.Tensor:
    return MU + SD * torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def uniform_grid(n: int) -> torch.Tensor:
    return torch.linspace(0, 1, n + 1, dtype=torch.float64)[1:-1]


def test_gaussian_velocity_is_the_derivative_of_the_exact_flow(x0):
    s, h = torch.full((3,), 0.4, dtype=torch.float64), 1e-6
    numeric = (exact_point(x0, s + h) - exact_point(x0, s - h)) / (2 * h)
    torch.testing.assert_close(velocity(exact_point(x0, s), s), numeric, atol=1e-6, rtol=1e-6)


def test_plain_euler_inversion_converges_to_the_exact_ode_point(x0):
    sigma = torch.tensor([0.3, 0.65, 1.0], dtype=torch.float64)
    target = exact_point(x0, sigma)
    errors = [(flow_renoise_invert(velocity, x0, sigma, uniform_grid(n), renoise_iters=0) - target).abs().max().item()
              for n in (4, 8, 16, 32, 64)]
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.15 * errors[1] and errors[-1] < 0.05, errors  # first order: halves with the step
    assert errors[-1] / errors[-2] == pytest.approx(0.5, abs=0.1)


def test_lands_exactly_on_sigma_and_walks_only_levels_below_it(x0):
    sigma = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    calls = []

    def v(x, s, index=None):
        calls.append((index.tolist(), s.tolist()))
        return velocity(x, s)

    _, trajectory = flow_renoise_invert(v, x0, sigma, uniform_grid(4), renoise_iters=0, return_trajectory=True)
    torch.testing.assert_close(trajectory[-1][0], sigma)
    # grid 0.25, 0.5, 0.75: sample 0 walks none, sample 1 walks 0.25, sample 2 all three; then each lands on sigma
    assert [c[0] for c in calls] == [[1, 2], [2], [2], [0, 1, 2]]
    # one Euler step from the clean image with the velocity at (x0, s): x0 + s v(x0, s)
    one = flow_renoise_invert(velocity, x0[:1], sigma[:1], uniform_grid(4), renoise_iters=0)
    torch.testing.assert_close(one, x0[:1] + 0.1 * velocity(x0[:1], sigma[:1]))


def test_renoise_is_the_mean_of_the_velocity_estimates(x0):
    s = torch.tensor([0.4], dtype=torch.float64)
    x = x0[:1]
    v0 = velocity(x, s)
    x1 = x + 0.4 * v0
    v1 = velocity(x1, s)
    x2 = x + 0.4 * (v0 + v1) / 2
    v2 = velocity(x2, s)
    expected = x + 0.4 * (v0 + v1 + v2) / 3
    got = flow_renoise_invert(velocity, x, s, torch.empty(0, dtype=torch.float64), renoise_iters=2)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("steps", [2, 4])
def test_renoise_lowers_the_invert_then_reconstruct_error(x0, steps):
    sigma = torch.tensor([0.5, 0.8, 1.0], dtype=torch.float64)
    grid = uniform_grid(steps)

    def roundtrip(iters: int) -> float:
        x_s = flow_renoise_invert(velocity, x0, sigma, grid, renoise_iters=iters)
        return (flow_euler_sample(velocity, x_s, sigma, grid) - x0).pow(2).mean().sqrt().item()

    errors = [roundtrip(k) for k in (0, 1, 3)]
    assert errors[1] < 0.9 * errors[0] and errors[2] < 0.75 * errors[0] and errors[2] < errors[1], errors


def test_implied_noise_and_velocity_invert_the_forward_noising(x0):
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sigma = torch.tensor([0.2, 0.5, 1.0], dtype=torch.float64)
    s = sigma.view(-1, 1, 1, 1)
    x_s = (1 - s) * x0 + s * eps
    torch.testing.assert_close(flow_implied_noise(x_s, x0, sigma), eps)
    torch.testing.assert_close(flow_implied_velocity(x_s, x0, sigma), eps - x0)


def test_flow_grid_reads_the_schedule():
    sigmas = torch.arange(1, 1001, dtype=torch.float64) / 1000
    assert flow_grid(5, sigmas).tolist() == pytest.approx([0.201, 0.401, 0.601, 0.801])
    assert flow_grid(1, sigmas).numel() == 0
    with pytest.raises(ValueError):
        flow_grid(0, sigmas)
    assert math.isfinite(float(sigmas.sum()))
