"""The names other modules imported from ``smpo.models.family`` before the model layer was split by
responsibility (issue 18); import them from ``smpo.models`` instead. Kept only until the callers
(objective, data/cache, train/*, world/study) move; nothing in ``smpo.models`` imports this module."""

from smpo.models.base import FamilyAdapter
from smpo.models.conditioning import Conditioning, prepare_image
from smpo.models.loading import FAMILIES, load_family

__all__ = ["FAMILIES", "Conditioning", "FamilyAdapter", "load_family", "prepare_image"]
