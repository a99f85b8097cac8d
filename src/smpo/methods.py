"""The method table: every fact about a training method in one frozen record (ALGORITHM.md sections 1-5).

A `Method` names its loss (a pure function of `smpo.losses`), the kind of batch it consumes, whether
it needs a reference network, and its defaults (beta, noising, labels). The objective, the data
reader, the model card, the demo and the study read these records; nothing outside this module
and `smpo.losses` asks which method it is running.

The objective hands every method's loss the same `LossInputs` (the per-sample errors it measured
and the settings); each record's ``apply`` maps them onto its pure loss's arguments, the way
k-diffusion gives every sampler one signature.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from torch import Tensor

from smpo.losses import LossOutput, dpo_loss, kto_loss, mapo_loss, sft_loss, smpo_loss


class BatchKind(Enum):
    """What a method trains on, and so how the objective noises a batch."""

    PAIRWISE = "pairwise"
    """Winner and loser of each pair (`smpo.batch.PairBatch`), sharing t (and eps when forward-noised)."""
    UNPAIRED = "unpaired"
    """Single images, each desirable or not (`smpo.batch.ImageBatch`; a PairBatch is split), independent t and eps."""
    WINNER_ONLY = "winner-only"
    """The winner image of each pair (`smpo.batch.PairBatch`), independent t and eps."""


@dataclass(frozen=True)
class LossInputs:
    """What the objective measured on one batch, and the settings a loss reads.

    ``model`` / ``ref``: the policy's and the reference's per-sample errors ``m`` and ``r``
    (`smpo.losses`), in the batch's image order: ``[2B]`` winners then losers for a pairwise
    batch, ``[B]`` for the winner only or unpaired images; ``ref`` is ``None`` for a method
    without a reference. ``p_win``: a pairwise batch's ``[B]`` winner probabilities (read with
    ``smoothed`` labels). ``desirable`` and ``reference_point``: an unpaired batch's labels and
    KTO's reference point over all processes (``None``: this batch's).
    """

    model: Tensor
    ref: Tensor | None
    beta: float
    gamma: float
    smoothed: bool
    mapo_snr: float
    num_timesteps: int
    p_win: Tensor | None = None
    desirable: Tensor | None = None
    reference_point: Tensor | None = None

    def pairs(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(model_w, model_l, ref_w, ref_l)`` of a pairwise batch measured with a reference."""
        if self.ref is None:
            raise ValueError("this loss needs the reference network's errors")
        model_w, model_l = self.model.chunk(2)
        ref_w, ref_l = self.ref.chunk(2)
        return model_w, model_l, ref_w, ref_l


Loss = Callable[..., LossOutput]


@dataclass(frozen=True)
class Method:
    """One training method: what it is, what it consumes, and its defaults."""

    name: str
    """The config's and the CLI's spelling (``objective.method``)."""
    display_name: str
    """Short, for plots and tables."""
    description: str
    """Long, for the model card."""
    paper: str | None
    """The paper's address (``None`` for plain supervised fine-tuning)."""
    loss: Loss
    """The pure loss over per-sample errors (`smpo.losses`)."""
    apply: Callable[[Loss, LossInputs], LossOutput]
    """Calls ``loss`` (its first argument) with the arguments it takes from the objective's `LossInputs`."""
    batch_kind: BatchKind
    """What it trains on, and so what the objective noises."""
    needs_reference: bool
    """Whether the loss reads a frozen reference network's errors (an inversion may need one anyway)."""
    default_beta: float
    default_noising: str
    """forward | ddim-inversion | renoise (`smpo.objective.NOISINGS`)."""
    default_labels: str
    """binary | smoothed (`smpo.labels.LABELS`)."""
    smoothed_labels: bool
    """Whether labels=smoothed is allowed (its loss reads p_win and gamma, Eq. 12)."""

    def compute(self, inputs: LossInputs) -> LossOutput:
        """This method's loss on what the objective measured."""
        return self.apply(self.loss, inputs)


def _winner_only(loss: Loss, x: LossInputs) -> LossOutput:
    return loss(x.model)


def _reference_pairs(loss: Loss, x: LossInputs) -> LossOutput:
    return loss(*x.pairs(), beta=x.beta)


def _smoothed_pairs(loss: Loss, x: LossInputs) -> LossOutput:
    if not x.smoothed:
        # Binary labels (p_w = 1, lambda = 1): Diffusion-DPO, also for the smpo rungs "+ inversion"
        # and "+ renoise" of the ablation ladder (ALGORITHM.md section 5).
        return METHODS["dpo"].compute(x)
    if x.p_win is None:
        raise ValueError("smoothed labels need the batch's p_win")
    return loss(*x.pairs(), p_win=x.p_win, beta=x.beta, gamma=x.gamma)


def _reference_free_pairs(loss: Loss, x: LossInputs) -> LossOutput:
    model_w, model_l = x.model.chunk(2)
    return loss(model_w, model_l, beta=x.beta, snr=x.mapo_snr, num_timesteps=x.num_timesteps)


def _unpaired(loss: Loss, x: LossInputs) -> LossOutput:
    if x.ref is None or x.desirable is None:
        raise ValueError("an unpaired loss needs the reference network's errors and each image's desirable label")
    return loss(x.model, x.ref, desirable=x.desirable, beta=x.beta, reference_point=x.reference_point)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("smpo", "SmPO", "SmPO-Diffusion (smoothed preference optimisation with ReNoise inversion)",
           "https://arxiv.org/abs/2506.02698", smpo_loss, _smoothed_pairs, BatchKind.PAIRWISE,
           needs_reference=True, default_beta=2000.0, default_noising="renoise", default_labels="smoothed",
           smoothed_labels=True),
    Method("dpo", "Diffusion-DPO", "Diffusion-DPO", "https://arxiv.org/abs/2311.12908", dpo_loss, _reference_pairs,
           BatchKind.PAIRWISE, needs_reference=True, default_beta=5000.0, default_noising="forward",
           default_labels="binary", smoothed_labels=False),
    Method("kto", "Diffusion-KTO", "Diffusion-KTO", "https://arxiv.org/abs/2404.04465", kto_loss, _unpaired,
           BatchKind.UNPAIRED, needs_reference=True, default_beta=1000.0, default_noising="forward",
           default_labels="binary", smoothed_labels=False),
    Method("mapo", "MaPO", "MaPO", "https://arxiv.org/abs/2406.06424", mapo_loss, _reference_free_pairs,
           BatchKind.PAIRWISE, needs_reference=False, default_beta=0.1, default_noising="forward",
           default_labels="binary", smoothed_labels=False),
    Method("sft", "SFT", "supervised fine-tuning (SFT)", None, sft_loss, _winner_only, BatchKind.WINNER_ONLY,
           needs_reference=False, default_beta=0.0, default_noising="forward", default_labels="binary",
           smoothed_labels=False),
)}
"""Method name -> record. Default betas: ALGORITHM.md sections 2 and 4 (SmPO: 2000 for SD1.5, 5000
for SDXL; recipes set it per family; MaPO's is its odds-ratio weight; SFT has none)."""

LOSSES: dict[str, Loss] = {name: m.loss for name, m in METHODS.items()}
"""Method name -> its pure loss function (`smpo.losses`)."""


def get_method(name: str) -> Method:
    """The record of method ``name``; ValueError naming the choices for an unknown one."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}") from None
