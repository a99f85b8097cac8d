"""DDIM inversion with ReNoise (ALGORITHM.md section 3), on stand-in noise predictors."""

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDPMScheduler

from smpo.inversion import ddim_step, implied_noise, inversion_grid, renoise_invert

SCHED = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
ABAR = DDPMScheduler(**SCHED).alphas_cumprod.double()


def nonlinear_eps(x, t):
    """A smooth stand-in network: depends on x and on t."""
    s = (t.double() / 1000.0).view(-1, *([1] * (x.dim() - 1)))
    return torch.tanh(x) * (0.5 + s) + 0.1 * torch.sin(3 * x) - 0.2 * s


class Gaussian:
    """Data x0 ~ N(mu, sigma^2) per element: the exact noise predictor and ODE solution are known."""

    def __init__(self, mu=0.3, sigma=0.5):
        self.mu, self.sigma = mu, sigma

    def eps(self, x, t):
        a = ABAR[t].view(-1, *([1] * (x.dim() - 1)))
        return (1 - a).sqrt() * (x - a.sqrt() * self.mu) / (a * self.sigma**2 + 1 - a)

    def exact(self, x0, t):
        """The probability-flow ODE maps quantiles: the exact point at level t."""
        a = ABAR[t].view(-1, *([1] * (x0.dim() - 1)))
        return a.sqrt() * self.mu + (a * self.sigma**2 + 1 - a).sqrt() * (x0 - self.mu) / self.sigma


def test_grids():
    assert inversion_grid(5, 1000).tolist() == [1, 201, 401, 601, 801]
    assert inversion_grid(5, 1000, land_on_t=False).tolist() == [-199, 1, 201, 401, 601]
    assert inversion_grid(10, 1000).tolist()[:3] == [1, 101, 201]


def test_ddim_step_by_hand():
    x, e = torch.tensor([[0.5, -1.0]], dtype=torch.float64), torch.tensor([[0.2, 0.1]], dtype=torch.float64)
    a_s, a_n = torch.tensor([0.9], dtype=torch.float64), torch.tensor([0.4], dtype=torch.float64)
    x0_hat = (x - (1 - 0.9) ** 0.5 * e) / 0.9**0.5
    assert torch.allclose(ddim_step(x, e, a_s, a_n), 0.4**0.5 * x0_hat + 0.6**0.5 * e)


def test_implied_noise_recovers_forward_noise():
    x0, eps = torch.randn(3, 4, 2, 2, dtype=torch.float64), torch.randn(3, 4, 2, 2, dtype=torch.float64)
    t = torch.tensor([0, 500, 999])
    a = ABAR[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    assert torch.allclose(implied_noise(x_t, x0, t, ABAR), eps, atol=1e-9)


@pytest.mark.parametrize("t_end", [1, 401, 801])
def test_plain_inversion_matches_diffusers_ddim_inverse_scheduler(t_end):
    torch.manual_seed(0)
    x0 = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    sched = DDIMInverseScheduler(**SCHED, clip_sample=False, set_alpha_to_one=True, steps_offset=1)
    sched.set_timesteps(5)
    x = x0.clone()
    for s in sched.timesteps.tolist():
        if s > t_end:
            break
        e = nonlinear_eps(x, torch.full((2,), s))
        x = sched.step(e, s, x).prev_sample
    ours = renoise_invert(nonlinear_eps, x0, torch.full((2,), t_end), ABAR, num_steps=5, renoise_iters=0)
    assert torch.allclose(ours, x, atol=1e-10)


def test_one_step_from_clean_is_forward_noising_with_the_predicted_noise():
    x0 = torch.randn(2, 3, dtype=torch.float64)
    t = torch.tensor([0, 0])  # below the first grid level: a single landing step
    x_t = renoise_invert(nonlinear_eps, x0, t, ABAR, num_steps=5, renoise_iters=0)
    a = ABAR[0]
    assert torch.allclose(x_t, a.sqrt() * x0 + (1 - a).sqrt() * nonlinear_eps(x0, t))


def test_renoise_averages_the_estimates_by_hand():
    x0 = torch.randn(1, 3, dtype=torch.float64)
    t = torch.tensor([300])
    calls = []

    def eps(x, tt):
        calls.append(tt.tolist())
        return nonlinear_eps(x, tt)

    got = renoise_invert(eps, x0, t, ABAR, num_steps=4, renoise_iters=2)
    # grid [1, 251, 501, 751]: steps clean->1, 1->251, then land 251->300; 3 evaluations each
    assert calls == [[1]] * 3 + [[251]] * 3 + [[300]] * 3
    x, lvl = x0.clone(), None
    for to in (1, 251, 300):
        a_s = torch.tensor([1.0 if lvl is None else ABAR[lvl].item()], dtype=torch.float64)
        a_t = ABAR[[to]]
        tt = torch.tensor([to])
        e0 = nonlinear_eps(x, tt)
        x1 = ddim_step(x, e0, a_s, a_t)
        e1 = nonlinear_eps(x1, tt)
        x2 = ddim_step(x, (e0 + e1) / 2, a_s, a_t)
        e2 = nonlinear_eps(x2, tt)
        x, lvl = ddim_step(x, (e0 + e1 + e2) / 3, a_s, a_t), to
    assert torch.allclose(got, x, atol=1e-12)


def test_land_on_t_ends_exactly_at_t():
    x0 = torch.randn(4, 2, dtype=torch.float64)
    t = torch.tensor([0, 137, 601, 999])
    _, traj = renoise_invert(nonlinear_eps, x0, t, ABAR, num_steps=5, return_trajectory=True)
    assert traj[-1][0].tolist() == t.tolist()
    levels = torch.stack([lv for lv, _ in traj])
    assert bool((levels[1:] >= levels[:-1]).all())  # ascending per sample


def test_authors_grid_ends_at_the_smallest_level_at_or_above_t():
    x0 = torch.randn(6, 2, dtype=torch.float64)
    t = torch.tensor([0, 1, 201, 500, 700, 950])
    calls = []

    def eps(x, tt):
        calls.append(tt.tolist())
        return nonlinear_eps(x, tt)

    _, traj = renoise_invert(eps, x0, t, ABAR, num_steps=5, renoise_iters=1, land_on_t=False,
                             return_trajectory=True)
    assert traj[-1][0].tolist() == [1, 1, 201, 601, 801, 801]
    assert calls[0] == [-199] * 6  # the first UNet call gets a negative timestep
    # and the step from -199 starts at the clean image: plain step = forward noising to level 1
    x_plain = renoise_invert(nonlinear_eps, x0[:1], t[:1], ABAR, num_steps=5, renoise_iters=0, land_on_t=False)
    e = nonlinear_eps(x0[:1], torch.tensor([-199]))
    assert torch.allclose(x_plain, ABAR[1].sqrt() * x0[:1] + (1 - ABAR[1]).sqrt() * e)


@pytest.mark.parametrize("land_on_t", [True, False])
def test_per_sample_t_equals_each_sample_alone(land_on_t):
    torch.manual_seed(1)
    x0 = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    t = torch.tensor([999, 10, 450, 620])
    batch = renoise_invert(nonlinear_eps, x0, t, ABAR, num_steps=5, renoise_iters=1, land_on_t=land_on_t)
    for i in range(4):
        alone = renoise_invert(nonlinear_eps, x0[i : i + 1], t[i : i + 1], ABAR, num_steps=5,
                               renoise_iters=1, land_on_t=land_on_t)
        assert torch.allclose(batch[i : i + 1], alone, atol=1e-12)


def test_index_aware_eps_fn_runs_only_active_rows():
    x0 = torch.randn(3, 2, dtype=torch.float64)
    t = torch.tensor([50, 700, 999])
    sizes = []

    def eps(x, tt, index=None):
        sizes.append(x.shape[0])
        assert index is not None and index.numel() == x.shape[0]
        return nonlinear_eps(x, tt)

    a = renoise_invert(eps, x0, t, ABAR, num_steps=5, renoise_iters=0)
    b = renoise_invert(nonlinear_eps, x0, t, ABAR, num_steps=5, renoise_iters=0)
    assert torch.allclose(a, b)
    # grid levels below t: 1 for all three, 201/401/601 for two, 801 for one, then the landing
    assert sizes == [3, 2, 2, 2, 1, 3]


def test_plain_inversion_approaches_the_exact_ode_point():
    model = Gaussian()
    torch.manual_seed(0)
    x0 = model.mu + model.sigma * torch.randn(8, 16, dtype=torch.float64)
    t = torch.full((8,), 800)
    exact = model.exact(x0, t)
    errors = [(renoise_invert(model.eps, x0, t, ABAR, num_steps=k, renoise_iters=0) - exact).abs().max().item()
              for k in (2, 4, 10, 50, 200)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.05 * errors[0]  # first order in the step: 0.97 at 2 steps, 0.023 at 200


def reconstruct(eps_fn, x_t, trajectory):
    """DDIM sampling back down the visited levels to the clean image."""
    levels = [lv for lv, _ in trajectory]
    x = x_t
    for j in range(len(levels) - 1, -1, -1):
        e = eps_fn(x, levels[j])
        a_from = ABAR[levels[j]]
        a_to = ABAR[levels[j - 1]] if j > 0 else torch.ones_like(a_from)
        x = ddim_step(x, e, a_from, a_to)
    return x


def test_renoise_improves_invert_then_reconstruct():
    model = Gaussian(mu=0.0, sigma=1.5)
    torch.manual_seed(0)
    x0 = model.sigma * torch.randn(4, 64, dtype=torch.float64)
    t = torch.full((4,), 900)
    errors = []
    for iters in (0, 1, 2, 4):
        x_t, traj = renoise_invert(model.eps, x0, t, ABAR, num_steps=4, renoise_iters=iters,
                                   return_trajectory=True)
        errors.append((reconstruct(model.eps, x_t, traj) - x0).pow(2).mean().sqrt().item())
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.5 * errors[0]


def test_bad_arguments():
    x0 = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="entries"):
        renoise_invert(nonlinear_eps, x0, torch.tensor([1]), ABAR, num_steps=5)
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        renoise_invert(nonlinear_eps, x0, torch.tensor([1, 1000]), ABAR, num_steps=5)
    with pytest.raises(ValueError, match="num_steps"):
        renoise_invert(nonlinear_eps, x0, torch.tensor([1, 2]), ABAR, num_steps=0)


def test_implied_noise_inverts_diffusers_add_noise():
    sched = DDPMScheduler(**SCHED)
    x0, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([3, 400, 998])
    x_t = sched.add_noise(x0, eps, t)
    assert torch.allclose(implied_noise(x_t, x0, t, sched.alphas_cumprod), eps, atol=1e-4)


def test_ddim_step_downwards_matches_diffusers_ddim_scheduler():
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(**SCHED, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    sched.set_timesteps(10)
    x, e = torch.randn(2, 4, 3, 3, dtype=torch.float64), torch.randn(2, 4, 3, 3, dtype=torch.float64)
    t = int(sched.timesteps[3])  # 601 -> 501
    expected = sched.step(e, t, x, eta=0.0).prev_sample
    ours = ddim_step(x, e, ABAR[[t, t]], ABAR[[t - 100, t - 100]])
    assert torch.allclose(ours, expected, atol=1e-10)


def test_step_noise_std_is_diffusers_ddim_variance():
    from diffusers import DDIMScheduler

    from smpo.inversion import step_noise_std

    sched = DDIMScheduler(**SCHED, set_alpha_to_one=False)
    for low, high in [(1, 201), (201, 401), (601, 801), (37, 250), (-199, 1)]:
        expected = float(sched._get_variance(high, low)) ** 0.5  # timestep=high, prev_timestep=low
        a_low = ABAR[[low]] if low >= 0 else torch.tensor([ABAR[0].item()], dtype=torch.float64)
        assert float(step_noise_std(a_low, ABAR[[high]])) == pytest.approx(expected, rel=1e-5)
    assert float(step_noise_std(torch.tensor([1.0], dtype=torch.float64), ABAR[[300]])) == 0.0  # from clean


def test_inpo_step_noise_by_hand():
    """DDIM-InPO's loop: each renoised step from u to u + T/steps (authors' grid), then
    ``eta * sqrt(DDIMScheduler._get_variance(u + T/steps, u)) * z`` with fresh ``z``."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(**SCHED, set_alpha_to_one=False)
    x0 = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([450, 230])
    gens = [torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)]
    got = renoise_invert(nonlinear_eps, x0, t, ABAR, num_steps=5, land_on_t=False, initial_abar=float(ABAR[0]),
                         step_noise=0.1, generators=gens)
    for i in range(2):
        g = torch.Generator().manual_seed(5 + i)
        x = x0[i:i + 1].clone()
        for u in (-199, 1, 201, 401):
            if u >= int(t[i]):
                break
            uu = torch.tensor([u])
            a_s = torch.tensor([ABAR[0].item() if u < 0 else ABAR[u].item()], dtype=torch.float64)
            a_n = ABAR[[u + 200]]
            e0 = nonlinear_eps(x, uu)
            e1 = nonlinear_eps(ddim_step(x, e0, a_s, a_n), uu)
            x = ddim_step(x, (e0 + e1) / 2, a_s, a_n)
            x = x + 0.1 * float(sched._get_variance(u + 200, u)) ** 0.5 * torch.randn(3, generator=g)
        torch.testing.assert_close(got[i:i + 1], x, atol=1e-6, rtol=1e-6)
    plain = renoise_invert(nonlinear_eps, x0, t, ABAR, num_steps=5, land_on_t=False, initial_abar=float(ABAR[0]))
    assert not torch.allclose(got, plain)


@pytest.mark.parametrize("land_on_t", [True, False])
@pytest.mark.parametrize("renoise_iters", [0, 1, 2])
def test_finishing_from_stored_levels_equals_the_full_inversion(land_on_t, renoise_iters):
    from smpo.inversion import finish_from_levels, invert_to_levels, stored_levels

    x0 = torch.randn(12, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    # every region: at and around each grid level, below the first, above the last
    t = torch.tensor([0, 1, 2, 150, 200, 201, 202, 400, 601, 800, 801, 999])
    kw = dict(num_steps=5, renoise_iters=renoise_iters, land_on_t=land_on_t)
    initial = float(ABAR[0])
    stored = invert_to_levels(nonlinear_eps, x0, ABAR, initial_abar=initial, **kw)
    assert stored.shape == (12, 5, 2, 3)
    assert stored_levels(5, 1000).tolist() == [1, 201, 401, 601, 801]
    calls = []

    def counting(x, tt):
        calls.append(x.shape[0])
        return nonlinear_eps(x, tt)

    got = finish_from_levels(counting, x0, stored, t, ABAR, **kw)
    expected = renoise_invert(nonlinear_eps, x0, t, ABAR, initial_abar=initial, **kw)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    # the authors' grid needs no network; landing on t takes one renoised step for every sample
    assert calls == ([] if not land_on_t else [12] * (renoise_iters + 1))
    half = finish_from_levels(counting, x0, stored.half(), t, ABAR, **kw)  # as `smpo cache` stores them
    assert (half - expected).abs().max() < 5e-3


def test_finish_from_levels_checks_shapes():
    from smpo.inversion import finish_from_levels

    with pytest.raises(ValueError, match="do not fit"):
        finish_from_levels(None, torch.zeros(2, 3), torch.zeros(2, 4, 3), torch.tensor([5, 6]), ABAR, num_steps=5,
                           land_on_t=False)
