"""Settings of ``smpo online`` (each field is one command-line option; its docstring is the help),
and the ``smpo pairs`` and ``smpo train`` configs of one round built from them.

The training recipe is an ``smpo train`` config (``--train-config`` YAML, or a ``TrainConfig`` given
to :func:`smpo.online.run_online`), overlaid with the few training options named here and with
``--train-option section.field=value``; the round driver then fills what is specific to a round:
the base model, the round's pairs, its run folder, its seed, its starting weights and reference.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from smpo.data.make_pairs import PairsConfig
from smpo.data.pairing import PairingRule
from smpo.options import ConfigError


@dataclass
class OnlineConfig:
    """Settings of `smpo online` (each field is one command-line option)."""

    model: str
    """Base model: a diffusers pipeline folder or hub id (the round-0 policy, and the frozen reference by default)."""
    prompts: str
    """Training prompts, sampled every round: parti, hpdv2, or a .txt/.json/.jsonl/.tsv/.csv file."""
    output: str
    """The run folder (an unfinished run there with the same settings is resumed)."""
    scorer: str = "pickscore"
    """Reward model: pickscore, hpsv2.1, imagereward, aesthetic, clip, world; or a weighted mix (as smpo pairs)."""
    scorer_path: list[str] | None = None
    """Weights of the scorer (folder/file/hub id); with a mix NAME=PATH, repeated."""
    rounds: int = 2
    """R: rounds of sample, score, pair, train."""
    images_per_prompt: int = 4
    """K: images sampled per prompt each round by the current policy."""
    limit: int | None = None
    """Keep only the first N training prompts."""
    sample_steps: int = 50
    """Sampling steps of the policy."""
    guidance_scale: float | None = None
    """CFG scale of sampling (default: the family's)."""
    height: int | None = None
    """Sampled image height (default: the model's)."""
    width: int | None = None
    """Sampled image width (default: the model's)."""
    seed: int = 0
    """Base seed of the images: round r, prompt p, image i starts from seed + r x 10000 x prompts + 10000 p + i."""
    pairing: PairingRule = "best-worst"
    """How a prompt's images become pairs (as smpo pairs --pairing)."""
    pairs_per_prompt: int | None = 1
    """Most pairs per prompt and round (none: as many as the rule gives)."""
    min_gap: float = 0.0
    """Smallest score difference of a pair."""
    score_min: float | None = None
    """Lower end of Eq. 11's score range for every round (with --score-max; default: round 0's range)."""
    score_max: float | None = None
    """Upper end of Eq. 11's score range for every round (with --score-min; default: round 0's range)."""
    sampled_latents: bool = False
    """Train on the latents the policy sampled (smpo pairs --keep-latents, smpo train data.stored_latents) instead of the stored images re-encoded by the VAE."""
    reference: Literal["base", "round"] = "base"
    """The reference network: base (the frozen base model, every round) or round (the policy at the start of the round: iterative DPO)."""
    replay_rounds: int | None = 0
    """Train on the latest round's pairs and those of up to N earlier rounds (0: the latest only; none: all)."""
    train_steps: int = 20
    """S: optimizer steps of training per round."""
    train_config: str | None = None
    """An smpo train recipe (YAML) for everything about training not set here, e.g. configs/sd15/smpo.yaml."""
    train_option: list[str] | None = None
    """An smpo train setting, section.field=value (repeat), e.g. optim.warmup_steps=0 objective.beta=5000."""
    method: str | None = None
    """Training method (default: the recipe's, smpo): smpo, dpo, kto, mapo or sft."""
    finetune: Literal["full", "lora"] | None = None
    """full or lora (default: the recipe's)."""
    lora_rank: int | None = None
    """LoRA rank (default: the recipe's)."""
    learning_rate: float | None = None
    """Learning rate per pair (default: the recipe's)."""
    train_batch_size: int | None = None
    """Pairs per process per pass (default: the recipe's)."""
    gradient_accumulation_steps: int | None = None
    """Passes per optimizer step (default: the recipe's)."""
    checkpoint_every: int | None = None
    """Checkpoint every N training steps of a round (default: the recipe's; a killed round resumes from the last)."""
    eval_prompts: str | None = None
    """Evaluation prompts: the base and every round's trained policy are sampled and scored on them."""
    eval_limit: int | None = None
    """Keep only the first N evaluation prompts."""
    eval_images_per_prompt: int = 1
    """Images per evaluation prompt."""
    eval_seed: int = 0
    """Seed of the evaluation images (the same every round: rounds are compared on the same noise)."""
    sample_batch_size: int = 4
    """Images per pipeline call."""
    score_batch_size: int = 16
    """Images per scorer forward pass."""
    shard_size: int = 100
    """Prompts per shard of a round's sampling (the unit of resumption and of the split over processes)."""
    image_format: str = "png"
    """Stored image encoding of the pairs: png, jpeg or webp."""
    dtype: str | None = None
    """Sampling and scoring dtype: fp32, fp16 or bf16 (default fp16 on CUDA, fp32 elsewhere)."""
    overwrite: bool = False
    """Replace an existing run folder."""
    progress: bool = True
    """Show progress bars."""

    def validate(self) -> OnlineConfig:
        checks = [
            (self.rounds >= 1, "--rounds must be at least 1"),
            (self.images_per_prompt >= 2, "--images-per-prompt must be at least 2 (a pair needs two images)"),
            (self.train_steps >= 1, "--train-steps must be at least 1"),
            (self.replay_rounds is None or self.replay_rounds >= 0, "--replay-rounds must be >= 0 (or none)"),
            (self.eval_images_per_prompt >= 1, "--eval-images-per-prompt must be at least 1"),
            ((self.score_min is None) == (self.score_max is None), "give both --score-min and --score-max, or neither"),
            (self.score_min is None or self.score_max > self.score_min, "--score-max must be above --score-min"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        return self

    def settings(self) -> dict[str, Any]:
        """What fixes the run's results; a resumed run must repeat it."""
        data = dataclasses.asdict(self)
        for key in ("output", "overwrite", "progress"):
            data.pop(key)
        if not self.sampled_latents:  # absent from the settings of runs made before it existed
            data.pop("sampled_latents")
        return data


# The fields above that override the recipe, and where each goes in a TrainConfig.
TRAIN_OVERRIDES = {"method": ("objective", "method"), "finetune": ("model", "finetune"),
                   "lora_rank": ("model", "lora_rank"), "learning_rate": ("optim", "learning_rate"),
                   "train_batch_size": ("optim", "batch_size"),
                   "gradient_accumulation_steps": ("optim", "gradient_accumulation_steps"),
                   "checkpoint_every": ("run", "checkpoint_every")}


def base_train_config(config: OnlineConfig, recipe: Any = None) -> Any:
    """The training recipe of every round: ``recipe`` (a ``TrainConfig``), else ``--train-config``,
    else smpo train's defaults; then ``--train-option`` values; then the options of ``config``."""
    from smpo.train.config import TrainConfig, config_from_dict, load_config

    if recipe is None:
        recipe = load_config(config.train_config) if config.train_config else TrainConfig()
    values: dict[str, dict[str, Any]] = {}
    for text in config.train_option or []:
        key, sep, value = text.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot:
            raise ConfigError(f"--train-option {text!r}: expected section.field=value, e.g. optim.warmup_steps=0")
        values.setdefault(section, {})[name] = value.strip()
    for option, (section, name) in TRAIN_OVERRIDES.items():
        if getattr(config, option) is not None:
            values.setdefault(section, {})[name] = getattr(config, option)
    train = config_from_dict(values, source="smpo online's training options", base=recipe)
    if train.model.finetune == "lora" and config.reference == "base" and train.model.unet is not None:
        raise ConfigError("LoRA with a separate initial network (model.unet) and --reference base: the policy would "
                          "be that network plus adapters, which a pipeline cannot sample; merge it into the base "
                          "pipeline or use --reference round")
    if train.model.reference_unet is not None or train.model.lora_weights is not None:
        raise ConfigError("model.reference_unet and model.lora_weights are set by smpo online for each round")
    return train


def round_seed(config: OnlineConfig, round_index: int, num_prompts: int) -> int:
    """The image seed base of a round: no image of one round shares a seed with one of another."""
    return config.seed + round_index * 10000 * num_prompts


def pairs_config(config: OnlineConfig, round_index: int, num_prompts: int, output: Path, policy: str | None,
                 score_range: tuple[float, float] | None) -> PairsConfig:
    """The ``smpo pairs`` job of one round: K images per prompt by the round's policy (the base
    pipeline with ``policy``, a trained network or LoRA), scored, paired, labelled over ``score_range``."""
    options = [f"round-{round_index:03d}:unet={policy}"] if policy is not None else []
    lo, hi = score_range if score_range is not None else (None, None)
    return PairsConfig(
        prompts=config.prompts, output=str(output), model=[f"round-{round_index:03d}={config.model}"],
        generator_options=options, scorer=config.scorer, scorer_path=config.scorer_path,
        images_per_prompt=config.images_per_prompt, steps=config.sample_steps, guidance_scale=config.guidance_scale,
        height=config.height, width=config.width, seed=round_seed(config, round_index, num_prompts),
        pairing=config.pairing, min_gap=config.min_gap, pairs_per_prompt=config.pairs_per_prompt, limit=config.limit,
        batch_size=config.sample_batch_size, score_batch_size=config.score_batch_size, shard_size=config.shard_size,
        image_format=config.image_format, dtype=config.dtype, score_min=lo, score_max=hi,
        pair_id_prefix=f"r{round_index:03d}-", keep_image_scores=True, keep_latents=config.sampled_latents,
        progress=config.progress)


def round_train_config(train: Any, config: OnlineConfig, round_index: int, *, dataset: Path, run_dir: Path,
                       policy: str | None, base_network: str | None) -> Any:
    """The ``smpo train`` run of one round: S steps on ``dataset``, starting from ``policy`` (the
    round's starting weights; None: the base), against the reference that ``config.reference`` names.

    Full fine-tuning starts ``model.unet`` at the policy; with ``--reference base`` the reference is
    the base network (``model.reference_unet``), else the starting copy. LoRA with ``--reference
    base`` continues the previous round's adapters (``model.lora_weights``) on the base, whose
    adapters-off network is the reference; with ``--reference round`` fresh adapters go on the
    merged previous policy (``policy`` is then a full network).
    """
    model = dataclasses.replace(train.model, pretrained=config.model)
    if train.model.finetune == "lora" and config.reference == "base":
        model = dataclasses.replace(model, lora_weights=policy)
    else:
        model = dataclasses.replace(model, unet=policy if policy is not None else base_network)
        if config.reference == "base" and policy is not None and train.model.finetune == "full":
            model = dataclasses.replace(model, reference_unet=base_network or config.model)
    return dataclasses.replace(
        train, model=model, data=dataclasses.replace(train.data, dataset=str(dataset), cache=None,
                                                     stored_latents=config.sampled_latents),
        optim=dataclasses.replace(train.optim, max_steps=config.train_steps),
        run=dataclasses.replace(train.run, output_dir=str(run_dir), seed=train.run.seed + round_index, resume=True,
                                overwrite=False, progress=config.progress))
