"""What the study runs: its rungs (the Table 3 ladder and the baselines), its settings, its jobs.

Also the study's answers to the demo: the shipped summary of the full study (the tuned learning
rates the demo trains with) and which rung a demo method is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smpo.io import read_json


@dataclass(frozen=True)
class Rung:
    """One row of the study: a training method and its objective settings."""

    key: str
    label: str
    method: str
    objective: dict[str, Any] = field(default_factory=dict)
    start: str | None = None
    """A method to train first (``"sft"``: SFT on the winners, with the same budget, rate and seed),
    then train this rung from that UNet (policy and reference), as the paper's SD1.5 run starts
    from an SFT-tuned UNet. The lift is still measured against the base."""
    cached_inversion: bool = False
    """Train from the study's ``smpo cache --store-inversion`` of the pair set (the base inverts,
    once) with ``data.cached_inversion`` (the objective must invert with the reference)."""
    online: str | None = None
    """Train with ``smpo online`` instead of on the pair set, with this reference (``base`` or
    ``round``, ``smpo online --reference``); the rounds are ``StudyConfig.online_*``."""


RUNGS: tuple[Rung, ...] = (
    Rung("dpo", "Diffusion-DPO", "dpo"),
    Rung("inversion-t", "+ DDIM inversion (on t)", "smpo",
         {"labels": "binary", "noising": "ddim-inversion", "land_on_t": True}),
    Rung("inversion-grid", "+ DDIM inversion (authors' grid)", "smpo",
         {"labels": "binary", "noising": "ddim-inversion", "land_on_t": False}),
    Rung("renoise-t", "+ ReNoise (on t)", "smpo", {"labels": "binary", "noising": "renoise", "land_on_t": True}),
    Rung("renoise-grid", "+ ReNoise (authors' grid)", "smpo",
         {"labels": "binary", "noising": "renoise", "land_on_t": False}),
    Rung("smpo-t", "+ smoothed labels = SmPO (on t)", "smpo", {"land_on_t": True}),
    Rung("smpo-grid", "+ smoothed labels = SmPO (authors' grid)", "smpo", {"land_on_t": False}),
    Rung("smpo-forward", "SmPO, forward noising", "smpo", {"noising": "forward"}),
    # Probes (issue 10, item 5): the same authors' DDIM-InPO fresh noise; the paper's SFT start.
    Rung("smpo-inpo", "SmPO + InPO fresh noise 0.1 (authors' grid)", "smpo",
         {"land_on_t": False, "inversion_noise": 0.1}),
    Rung("smpo-after-sft", "SFT, then SmPO (authors' grid; twice the steps)", "smpo", {"land_on_t": False},
         start="sft"),
    # Controls of the SFT start: the same two stages with DPO, and SFT for both stages.
    Rung("dpo-after-sft", "SFT, then Diffusion-DPO (twice the steps)", "dpo", start="sft"),
    Rung("sft-after-sft", "SFT, then SFT again (twice the steps)", "sft", start="sft"),
    # Issue 11: the reference's inversion, stored once by `smpo cache` (equal to inverting with the
    # reference live, up to fp16), on the authors' grid: no inversion call is left in training.
    Rung("smpo-cached", "SmPO, reference inversion cached (authors' grid)", "smpo",
         {"land_on_t": False, "inverting_network": "reference"}, cached_inversion=True),
    # Issue 20: on-policy rounds (smpo online) within the same 40 steps of 8 pairs.
    Rung("online-smpo", "online SmPO (frozen base reference)", "smpo", online="base"),
    Rung("online-dpo", "online Diffusion-DPO (frozen base reference)", "dpo", online="base"),
    Rung("online-dpo-round", "online Diffusion-DPO (each round's start as reference)", "dpo", online="round"),
    Rung("kto", "Diffusion-KTO", "kto"),
    Rung("mapo", "MaPO", "mapo"),
    Rung("sft", "SFT (winners)", "sft"),
)
RUNG_BY_KEY = {r.key: r for r in RUNGS}


@dataclass(frozen=True)
class StudyConfig:
    """The study's settings (``smpo study``'s options); the budget defaults are the demo's
    (``smpo.world.stages.DemoConfig``)."""

    rungs: tuple[str, ...] = tuple(r.key for r in RUNGS)
    """rungs to run, comma-separated (the ladder's keys)"""
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    """report seeds (training, pair order, t/noise and image seeds), at least 2; one number N on the command
    line means the seeds 0..N-1"""
    tune_seeds: tuple[int, ...] = (1000, 1001)
    """tuning seeds, never reported"""
    lr_grid: tuple[float, ...] = (1e-5, 3e-5, 1e-4)
    """learning rates every rung's tuning starts from"""
    lr_bounds: tuple[float, float] = (1e-7, 1e-2)
    """the tuning extends a rung's grid past an edge its best rate lies on (half a decade at a time: 1e-5,
    3e-6, 1e-6, ...) until the best lies inside, within these bounds; equal bounds to the grid's ends turn
    the extension off"""
    paper_lr: float = 1e-5
    """the 'paper' rows' learning rate: the paper's per-step rate, 1e-8 per pair x 1024 pairs a step"""
    train_steps: int = 40
    """optimizer steps of every run"""
    batch_size: int = 8
    """pairs per optimizer step"""
    eval_every: int = 20
    """steps between held-out checkpoints (report runs)"""
    images_per_prompt: int = 2
    """held-out images per prompt (93 prompts)"""
    validation_images_per_prompt: int = 2
    """validation images per prompt (45 prompts)"""
    sample_steps: int = 10
    """DDIM steps of every sample"""
    guidance_scale: float = 3.0
    """classifier-free guidance scale of every sample"""
    online_rounds: int = 4
    """online rungs: rounds of smpo online within the budget's steps (40 steps: 4 rounds of 10); each round
    samples, with the current policy, steps x batch prompts of the pair split (drawn by the job's seed)"""
    online_images_per_prompt: int = 4
    """online rungs: images per prompt and round (the best against the worst by the world reward: one pair each)"""
    max_prompts: int | None = None
    """use only the first N prompts of each split (quick runs)"""
    curve_rungs: tuple[str, ...] = ("dpo", "smpo-t", "smpo-grid", "smpo-forward", "online-smpo", "online-dpo",
                                    "online-dpo-round")
    """rungs whose tuned runs are evaluated at every checkpoint, not only the last"""


QUICK = StudyConfig(rungs=("dpo", "smpo-t", "sft"), seeds=(0, 1), tune_seeds=(1000,), lr_grid=(1e-5, 1e-4),
                    lr_bounds=(3e-6, 1e-4), paper_lr=1e-5, online_rounds=2, online_images_per_prompt=2, train_steps=2, batch_size=2, eval_every=1, images_per_prompt=1,
                    validation_images_per_prompt=1, sample_steps=4, max_prompts=6,
                    curve_rungs=("dpo", "smpo-t", "sft"))


def split_prompts(cfg: StudyConfig, split_name: str) -> list[str]:
    """The prompts of a split of the world's grammar (the first ``cfg.max_prompts`` if set)."""
    from smpo.world.grammar import split

    prompts = split(split_name)
    return prompts[: cfg.max_prompts] if cfg.max_prompts else prompts


@dataclass(frozen=True)
class Job:
    """One training run (or the base, ``rung == "base"``) evaluated on one split."""

    rung: str
    lr: float
    seed: int
    split: str  # "validation" (tuning) or "held_out" (report)
    curve: bool = field(default=False, compare=False)  # evaluate every checkpoint, not only the last

    @property
    def name(self) -> str:
        if self.rung == "base":
            return f"base/seed{self.seed}-{self.split}"
        return f"{self.rung}/lr{self.lr:g}-seed{self.seed}-{self.split}"


SUMMARY_FILE = Path(__file__).parents[1] / "study-summary.json"
"""The shipped result of the full study (``smpo study``; the command and its wall time inside):
the chosen learning rates and every row, without the per-image scores. ``smpo demo`` reads it."""


def shipped_summary() -> dict[str, Any] | None:
    """The shipped study's summary (:data:`SUMMARY_FILE`), or ``None`` where none ships."""
    return read_json(SUMMARY_FILE) if SUMMARY_FILE.is_file() else None


def demo_rung(method: str, smpo_noising: str = "renoise") -> str | None:
    """The study's rung of a demo method (``None`` for settings the study does not run)."""
    from smpo.world.stages import inverts_by_default

    if not inverts_by_default(method):
        return method if method in RUNG_BY_KEY else None
    if smpo_noising == "forward":
        return "smpo-forward"
    if smpo_noising == "renoise":
        from smpo.objective import ObjectiveConfig

        return "smpo-t" if ObjectiveConfig().land_on_t else "smpo-grid"
    return None
