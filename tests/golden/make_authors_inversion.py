"""Reference values of the authors' inversion loop, run with diffusers 0.20.0 (issue 14).

The SmPO authors' training script pins diffusers 0.20.0. Its inversion (a ``DDIMInverseScheduler``
grid, one ReNoise iteration, the noise of each step estimated at the step's start timestep, the
batch's first ``t`` deciding the steps) is run here with that release, on analytic noise
predictors and seeded latents, for the SD1.5 (5 steps) and SDXL (10 steps) scheduler configs, for
``t`` on and around every grid point. ``tests/test_inversion_golden.py`` compares
``smpo.inversion.renoise_invert(..., land_on_t=False)`` against the file this writes.

This script does not import smpo (smpo needs a newer diffusers). Regenerate the fixture with:

    python3 -m venv /tmp/d020 && /tmp/d020/bin/pip install torch==2.13.0 && \
    /tmp/d020/bin/pip install diffusers==0.20.0 huggingface_hub==0.16.4 'numpy<2' && \
    /tmp/d020/bin/python tests/golden/make_authors_inversion.py --output tests/golden/authors_inversion.json
"""

from __future__ import annotations

import argparse
import json

import torch

# The scheduler configs of stable-diffusion-v1-5 and stable-diffusion-xl-base-1.0 (the fields
# the schedule and the inverse scheduler read).
SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "set_alpha_to_one": False, "steps_offset": 1, "clip_sample": False, "prediction_type": "epsilon",
             "timestep_spacing": "leading"}
GRIDS = {"sd15": 5, "sdxl": 10}
SHAPE = (2, 2, 3, 3)  # two latents per case


def predictor(name: str, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Analytic noise predictors (float64), the same formulas as tests/test_inversion_golden.py."""
    s = t.double().reshape(-1, *([1] * (x.dim() - 1)))
    if name == "tanh":
        return 0.8 * torch.tanh(x) + 0.05 * x * torch.cos(s / 157.0) + 0.1 * torch.sin(s / 300.0)
    if name == "affine":
        return (0.3 + s / 2000.0) * x + 0.2
    raise ValueError(name)


def authors_loop(inverse, abar, x0: torch.Tensor, t: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' loop for one batch sharing ``t`` (their ``timesteps[0]``)."""
    start = x0.clone()
    x = x0.clone()
    steps = inverse.timesteps[inverse.timesteps < t]
    for u in steps:
        u_batch = u.repeat(x.shape[0])
        e = predictor(name, x, u_batch)
        x1 = inverse.step(e, u, x).prev_sample
        e1 = predictor(name, x1, u_batch)
        x = inverse.step((e + e1) / 2, u, x).prev_sample
    a = abar[t]
    noise = (x - start * a ** 0.5) / (1 - a) ** 0.5
    return x, noise


def main() -> None:
    import diffusers
    from diffusers import DDIMInverseScheduler, DDPMScheduler

    parser = argparse.ArgumentParser()
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    if diffusers.__version__ != "0.20.0":
        raise SystemExit(f"needs diffusers 0.20.0 (the authors' pin), found {diffusers.__version__}")
    abar = DDPMScheduler(**{k: v for k, v in SCHEDULER.items() if k not in ("set_alpha_to_one",)}).alphas_cumprod
    cases = []
    for family, steps in GRIDS.items():
        inverse = DDIMInverseScheduler(**SCHEDULER)
        inverse.set_timesteps(steps)
        grid = [int(u) for u in inverse.timesteps]
        ts = sorted({v for g in grid for v in (g - 1, g, g + 1) if 0 <= v < 1000} | {0, 2, 500, 999})
        for name, seed in (("tanh", 0), ("affine", 1)):
            x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
            for t in ts:
                x_t, noise = authors_loop(inverse, abar, x0, t, name)
                cases.append({"family": family, "steps": steps, "predictor": name, "seed": seed, "t": t,
                              "x0": x0.flatten().tolist(), "x_t": x_t.flatten().tolist(),
                              "noise": noise.flatten().tolist()})
    data = {"diffusers": diffusers.__version__, "torch": torch.__version__, "scheduler": SCHEDULER, "grids": GRIDS,
            "shape": list(SHAPE), "inverse_timesteps": {f: None for f in GRIDS}, "cases": cases}
    for family, steps in GRIDS.items():
        inverse = DDIMInverseScheduler(**SCHEDULER)
        inverse.set_timesteps(steps)
        data["inverse_timesteps"][family] = [int(u) for u in inverse.timesteps]
    with open(args.output, "w") as f:
        json.dump(data, f)
    print(f"wrote {len(cases)} cases to {args.output}")


if __name__ == "__main__":
    main()
