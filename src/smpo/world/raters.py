"""Simulated raters, and the Pick-a-Pic-schema pair dataset they label.

Each rater weighs prompt fidelity against image quality in their own way (``fidelity_weight``),
judges with Bradley-Terry noise (the first image wins with probability
``sigmoid(decisiveness * (u_0 - u_1))`` where ``u = w * fidelity + (1 - w) * quality``), and calls
a tie when the two utilities are closer than their ``tie_margin``. Their labels play the part of
Pick-a-Pic's human labels: noisy, binary or tied, and inconsistent between raters.

``label_pairs`` has one random rater label each pair of images and returns rows in the columns
of Pick-a-Pic v2 (``jpg_0``/``jpg_1`` hold PNG bytes, lossless at 32x32), which ``write_parquet``
writes, so that the ``smpo label`` reader takes them as it takes the real dataset (``smpo world
pairs``, :mod:`smpo.world.pairset`, samples the images).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from smpo.io import atomic_path
from smpo.labels import TIE, human_winner
from smpo.world.reward import WorldScorer


@dataclass(frozen=True)
class Rater:
    """One simulated person."""

    user_id: int
    fidelity_weight: float  # w: 1 cares only about matching the prompt, 0 only about image quality
    decisiveness: float  # Bradley-Terry scale on the utility difference
    tie_margin: float  # utility differences below this are ties

    def utility(self, fidelity: float, quality: float) -> float:
        return self.fidelity_weight * fidelity + (1.0 - self.fidelity_weight) * quality

    def prob_first(self, utility_0: float, utility_1: float) -> float:
        """Bradley-Terry probability that the first image wins (given that it is not a tie)."""
        return 1.0 / (1.0 + math.exp(-self.decisiveness * (utility_0 - utility_1)))

    def label(self, utility_0: float, utility_1: float, rng: np.random.Generator) -> float:
        """Pick-a-Pic's ``label_0``: 1 (first preferred), 0 (second preferred) or 0.5 (tie)."""
        if abs(utility_0 - utility_1) < self.tie_margin:
            return TIE
        return 1.0 if rng.random() < self.prob_first(utility_0, utility_1) else 0.0


def make_raters(count: int = 20, *, seed: int = 0) -> list[Rater]:
    """``count`` raters with varied tastes: fidelity weight in [0.2, 0.95], decisiveness in [5, 40]
    (log-uniform), tie margin in [0.005, 0.04]."""
    rng = np.random.default_rng(seed)
    return [Rater(user_id=i, fidelity_weight=float(rng.uniform(0.2, 0.95)),
                  decisiveness=float(np.exp(rng.uniform(np.log(5), np.log(40)))),
                  tie_margin=float(rng.uniform(0.005, 0.04))) for i in range(count)]


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def label_pairs(pairs: list[tuple[Image.Image, Image.Image]], prompts: list[str], raters: list[Rater], *,
                scorer: WorldScorer | None = None, seed: int = 0,
                models: list[tuple[str, str]] | None = None, uids: list[tuple[str, str]] | None = None,
                examples_per_prompt: int = 1) -> list[dict]:
    """Pick-a-Pic-schema rows: one random rater labels each pair.

    ``models``: each pair's generators (``model_0`` / ``model_1``; default the base for both);
    ``uids``: each pair's image uids (default ``"{pair:06d}-{side}"``).
    """
    scorer = scorer or WorldScorer()
    flat = [im for pair in pairs for im in pair]
    parts = scorer.components(flat, [p for p in prompts for _ in (0, 1)])
    fidelity, quality = parts["fidelity"].tolist(), parts["quality"].tolist()
    rng = np.random.default_rng(seed)
    rows = []
    for i, ((image_0, image_1), prompt) in enumerate(zip(pairs, prompts)):
        rater = raters[int(rng.integers(len(raters)))]
        label_0 = rater.label(rater.utility(fidelity[2 * i], quality[2 * i]),
                              rater.utility(fidelity[2 * i + 1], quality[2 * i + 1]), rng)
        uid_0, uid_1 = uids[i] if uids else (f"{i:06d}-0", f"{i:06d}-1")
        model_0, model_1 = models[i] if models else ("world-base", "world-base")
        rows.append(dict(
            ranking_id=i, user_id=rater.user_id, caption=prompt, num_example_per_prompt=examples_per_prompt,
            jpg_0=png_bytes(image_0), jpg_1=png_bytes(image_1), label_0=label_0, label_1=1.0 - label_0,
            image_0_uid=uid_0, image_1_uid=uid_1, model_0=model_0, model_1=model_1,
            best_image_uid="" if human_winner(label_0) is None else (uid_0, uid_1)[human_winner(label_0)],
            has_label=True, are_different=True,
        ))
    return rows


PAIRS_FILE = "train-00000-of-00001.parquet"


def write_parquet(rows: list[dict], path: str | Path) -> Path:
    """Write rows as one parquet shard, atomically."""
    import pandas as pd

    with atomic_path(path) as tmp:
        pd.DataFrame(rows).to_parquet(tmp, index=False)
    return Path(path)
