"""The authors'-grid inversion equals the authors' loop under diffusers 0.20.0 (issue 14).

``tests/golden/authors_inversion.json`` was written by ``tests/golden/make_authors_inversion.py``
in a side environment with diffusers 0.20.0 (the command is in that script's docstring).
"""

import json
from pathlib import Path

import pytest
import torch

from smpo.inversion import implied_noise, initial_abar, inversion_grid, renoise_invert

GOLDEN = json.loads((Path(__file__).parent / "golden" / "authors_inversion.json").read_text())


def predictor(name, x, t):  # the formulas of make_authors_inversion.py
    s = t.double().reshape(-1, *([1] * (x.dim() - 1)))
    if name == "tanh":
        return 0.8 * torch.tanh(x) + 0.05 * x * torch.cos(s / 157.0) + 0.1 * torch.sin(s / 300.0)
    return (0.3 + s / 2000.0) * x + 0.2


def schedule():
    from diffusers import DDIMScheduler, DDPMScheduler

    config = GOLDEN["scheduler"]
    sampler = DDIMScheduler(**config)  # what a pipeline folder holds
    ac = DDPMScheduler.from_config(sampler.config).alphas_cumprod.float()
    return ac, initial_abar(ac, sampler.config.set_alpha_to_one)


def test_grid_is_the_inverse_schedulers():
    for family, steps in GOLDEN["grids"].items():
        assert inversion_grid(steps, 1000, land_on_t=False).tolist() == GOLDEN["inverse_timesteps"][family]


def test_first_level_abar_follows_set_alpha_to_one():
    ac, first = schedule()
    assert first == pytest.approx(float(ac[0])) and first < 1  # SD1.5 / SDXL: set_alpha_to_one false
    assert initial_abar(ac, True) == 1.0


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=lambda c: f"{c['family']}-{c['predictor']}-t{c['t']}")
def test_authors_grid_equals_diffusers_0_20_loop(case):
    ac, first = schedule()
    shape = GOLDEN["shape"]
    x0 = torch.tensor(case["x0"], dtype=torch.float64).reshape(shape)
    t = torch.full((shape[0],), case["t"])
    x_t = renoise_invert(lambda x, s: predictor(case["predictor"], x, s), x0, t, ac, num_steps=case["steps"],
                         renoise_iters=1, land_on_t=False, initial_abar=first)
    eps = implied_noise(x_t, x0, t, ac)
    assert torch.allclose(x_t.flatten(), torch.tensor(case["x_t"], dtype=torch.float64), rtol=0, atol=1e-6)
    assert torch.allclose(eps.flatten(), torch.tensor(case["noise"], dtype=torch.float64), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_per_sample_t_in_one_batch_equals_each_alone(family):
    """One batch with a different t per sample: each equals the loop run for its t alone."""
    ac, first = schedule()
    cases = [c for c in GOLDEN["cases"] if c["family"] == family and c["predictor"] == "tanh"]
    picked = cases[:: max(1, len(cases) // 6)][:6]
    x0 = torch.stack([torch.tensor(c["x0"], dtype=torch.float64).reshape(GOLDEN["shape"])[0] for c in picked])
    t = torch.tensor([c["t"] for c in picked])
    x_t = renoise_invert(lambda x, s: predictor("tanh", x, s), x0, t, ac, num_steps=GOLDEN["grids"][family],
                         renoise_iters=1, land_on_t=False, initial_abar=first)
    half = len(picked[0]["x_t"]) // GOLDEN["shape"][0]
    for row, c in enumerate(picked):
        expected = torch.tensor(c["x_t"][:half], dtype=torch.float64)
        assert torch.allclose(x_t[row].flatten(), expected, rtol=0, atol=1e-6), c["t"]


def test_without_the_first_level_fix_the_loops_differ():
    """The deviation the fix removes: abar = 1 at the first level moves x_t near t = 0 by far more than 1e-6."""
    ac, _ = schedule()
    case = next(c for c in GOLDEN["cases"] if c["family"] == "sd15" and c["t"] == 1)
    x0 = torch.tensor(case["x0"], dtype=torch.float64).reshape(GOLDEN["shape"])
    t = torch.full((GOLDEN["shape"][0],), 1)
    x_t = renoise_invert(lambda x, s: predictor(case["predictor"], x, s), x0, t, ac, num_steps=5, renoise_iters=1,
                         land_on_t=False, initial_abar=1.0)
    assert (x_t.flatten() - torch.tensor(case["x_t"], dtype=torch.float64)).abs().max() > 1e-3
