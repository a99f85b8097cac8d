"""Preference data: the Pick-a-Pic schema (:mod:`smpo.data.schema`), its sources
(:mod:`smpo.data.sources`) and the pair reader (:mod:`smpo.data.pairs`), smoothed labels
(:mod:`smpo.data.label`, ``smpo label``) and the latent cache (``smpo cache``).

The reader is imported here; the labelling names (``label_pairs``, ``LabelSummary``,
``load_labelled``, ``labelled_shards``, ``read_label_metadata``) are imported on first use, so
``import smpo.data`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from smpo.data.pairs import iter_pairs
from smpo.data.schema import MissingColumnsError, PreferencePair, ReadStats, SkippedPair
from smpo.data.sources import PairSource, open_source

_LABEL_NAMES = ("LabelSummary", "label_pairs", "labelled_shards", "load_labelled", "read_label_metadata")


def __getattr__(name: str) -> Any:
    if name in _LABEL_NAMES:
        return getattr(importlib.import_module("smpo.data.label"), name)
    raise AttributeError(f"module 'smpo.data' has no attribute {name!r}")


__all__ = [
    "MissingColumnsError",
    "PairSource",
    "PreferencePair",
    "ReadStats",
    "SkippedPair",
    "iter_pairs",
    "open_source",
    *_LABEL_NAMES,
]
