"""smpo: SmPO-Diffusion (smoothed preference optimisation with ReNoise inversion) and its baselines."""

__version__ = "0.1.0"
