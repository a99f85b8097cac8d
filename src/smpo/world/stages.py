"""The world's pipeline stages, shared by ``smpo demo`` and ``smpo study``.

Each stage goes through the library's own API (no world-only shortcuts), with one budget
(:class:`DemoConfig`): make the pair set (:func:`make_pairs`), label it with the world reward
model (:func:`label`), the ``smpo train`` config of a method (:func:`train_config`), a
checkpoint's network as a folder ``smpo generate`` loads (:func:`checkpoint_unet`), and sampling
and scoring prompts (:func:`score_images`). The demo (:mod:`smpo.world.demo`) runs them once per
method; the study (:mod:`smpo.world.study`) once per job. Neither imports the other.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from smpo.io import atomic_path
from smpo.methods import METHODS, get_method
from smpo.objective import NOISINGS

METHOD_NAMES = {name: method.display_name for name, method in METHODS.items()}
"""The display name of each method the world trains (reports, plots, grid rows)."""

SMPO_NOISINGS = tuple(reversed(NOISINGS))
"""SmPO's ways of finding x_t in the demo: the paper's ReNoise and the Table 3 ablations."""


def inverts_by_default(method: str) -> bool:
    """Whether ``method`` finds x_t by inversion unless told otherwise (SmPO): the methods the
    demo's ``--smpo-noising`` applies to."""
    return get_method(method).default_noising != "forward"


def method_objective(method: str, smpo_noising: str) -> dict[str, Any] | None:
    """The objective settings a demo run gives ``method`` beyond its defaults: SmPO's x_t."""
    return {"noising": smpo_noising} if inverts_by_default(method) else None


@dataclass(frozen=True)
class DemoConfig:
    """The world's budget (the demo's options; the study's jobs use it too). The defaults fit
    10 minutes on 2 CPU cores; ``smpo.world.demo.QUICK`` fits 2."""

    pairs: int | None = None
    """make this many preference pairs anew (seeded by --seed); none: the shipped set of 2048 pairs"""
    train_steps: int = 40
    """optimizer steps per method"""
    batch_size: int = 8
    """pairs per optimizer step"""
    learning_rate: float | None = None
    """one learning rate for every method; none: each method's rate tuned by the shipped study (not scaled
    by the batch)"""
    eval_every: int = 20
    """evaluate the held-out reward every N steps (and at the end)"""
    eval_prompts: int = 93
    """held-out prompts to evaluate (93 = all, the least noisy median)"""
    images_per_prompt: int = 2
    """held-out images per prompt (seeds shared by every model)"""
    sample_steps: int = 10
    """DDIM steps of every sample (pairs and evaluation)"""
    guidance_scale: float = 3.0
    """classifier-free guidance scale of every sample"""
    raters: int = 20
    """simulated raters per pair (pairs made anew only)"""
    methods: tuple[str, ...] = ("smpo", "dpo")
    """methods to train, comma-separated (also kto, mapo, sft)"""
    smpo_noising: str = "renoise"
    """how SmPO finds x_t: renoise (the paper's); ddim-inversion and forward are Table 3 ablations"""
    seed: int = 0
    """seed of the pairs, raters, training and sampling"""


def make_pairs(base: Path, out: Path, cfg: DemoConfig) -> Path:
    """The shipped pair set (``smpo.world.pairset``, read as a downloaded dataset), or with
    ``cfg.pairs`` a new one of that many pairs (seeded by ``cfg.seed``; kept if already written:
    the shard is written atomically)."""
    from smpo.world.pairset import make_pair_set, pair_set_path
    from smpo.world.raters import PAIRS_FILE

    if cfg.pairs is None:
        return pair_set_path()
    if (out / PAIRS_FILE).is_file():
        return out
    return make_pair_set(base, out, pairs=cfg.pairs, seed=cfg.seed, raters=cfg.raters, progress=True)


def label(pairs: Path, out: Path, *, progress: bool = False) -> dict[str, Any]:
    """``smpo label`` with the world reward model (human ties kept: SmPO uses every pair); an
    unfinished labelling resumes, a finished one is read back."""
    from smpo.data.label import LABELS_FILE, LabelSummary, label_pairs
    from smpo.io import read_json

    if (out / LABELS_FILE).is_file():
        return asdict(LabelSummary.from_dict(read_json(out / LABELS_FILE)))

    summary = label_pairs(pairs, out, scorer="world", keep_ties=True, progress=progress)
    return asdict(summary)


def train_config(method: str, base: Path, dataset: Path, run_dir: Path, cfg: DemoConfig,
                 objective: dict[str, Any] | None = None, resume: bool = False, progress: bool = False,
                 unet: Path | None = None):
    """The ``smpo train`` config of one method: the paper's objective settings (method defaults:
    beta, gamma 10, ReNoise with a 5-step grid for SmPO), the budget of ``cfg``; ``unet``: start
    from this UNet folder instead of the base's."""
    from smpo.objective import ObjectiveConfig
    from smpo.train.config import DataConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig

    return TrainConfig(
        model=ModelConfig(pretrained=str(base), finetune="full", unet=None if unet is None else str(unet)),
        # No horizontal flips: they would turn "on the left" images into right ones.
        data=DataConfig(dataset=str(dataset), random_flip=False),
        objective=ObjectiveConfig(method=method, **(objective or {})),
        optim=OptimConfig(learning_rate=cfg.learning_rate, scale_lr=False, warmup_steps=0,
                          batch_size=cfg.batch_size, gradient_accumulation_steps=1, max_steps=cfg.train_steps),
        run=RunConfig(output_dir=str(run_dir), seed=cfg.seed, mixed_precision="no", checkpoint_every=cfg.eval_every,
                      resume=resume,
                      keep_checkpoints=cfg.train_steps // max(cfg.eval_every, 1) + 1, progress=progress),
    ).validate()


def checkpoint_unet(checkpoint: Path, base: Path, out: Path) -> Path:
    """A training checkpoint's policy weights as a UNet folder that ``smpo generate --unet`` loads
    (kept if already written: it is written atomically)."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    if out.is_dir():
        return out

    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    weights = checkpoint / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{checkpoint}: no model.safetensors (not a full fine-tuning checkpoint)")
    unet.load_state_dict(load_file(weights))
    with atomic_path(out) as tmp:
        unet.save_pretrained(tmp, safe_serialization=True)
    return out


def score_images(base: Path, unet: Path | None, prompts: list[str], out: Path, cfg: DemoConfig, scorer: Any,
                 name: str, *, images_per_prompt: int = 1, progress: bool = False) -> list[float]:
    """Sample the prompts (``smpo generate``'s API; image ``i`` of prompt ``p`` has the same seed for
    every model), score them (``smpo evaluate``'s API); return the rewards in (prompt, image) order."""
    from smpo.evaluation.evaluate import evaluate_folder
    from smpo.evaluation.generate import generate_images
    from smpo.evaluation.pipelines import load_pipeline

    pipe, _ = load_pipeline(base, unet=unet)
    generate_images(pipe, prompts, out, guidance_scale=cfg.guidance_scale, num_inference_steps=cfg.sample_steps,
                    images_per_prompt=images_per_prompt, seed=cfg.seed, seed_per_prompt=True, batch_size=32,
                    settings={"model": str(base), "unet": str(unet) if unet else None, "name": name},
                    progress=progress)
    table, _ = evaluate_folder(out, ["world"], loaded={"world": scorer}, num_resamples=200, seed=cfg.seed,
                               progress=False)
    table = table.sort_values(["prompt_index", "image_index"])
    return [float(v) for v in table["world"]]
