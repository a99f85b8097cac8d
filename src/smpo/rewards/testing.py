"""Tiny scorers for tests: the real classes with small random weights, saved in each scorer's local format.

``save_tiny_scorer(name, folder)`` writes a folder that ``load_scorer(name, path=folder)`` loads
through exactly the code path a user's checkpoint takes; nothing is downloaded.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

TINY_IMAGE_SIZE = 32

_TINY_VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    image_size=TINY_IMAGE_SIZE, patch_size=8)
_TINY_TEXT = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=77)


def _save_tokenizer(folder: Path):
    from smpo.models.presets import make_char_tokenizer

    return make_char_tokenizer(folder)


def tiny_clip_model(*, projection_dim: int = 16, hidden_act: str = "gelu", logit_scale: float = math.log(50.0),
                    vocab_size: int = 514, seed: int = 0):
    """A random transformers ``CLIPModel`` with the tiny config (image size 32, patch 8, width 32)."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    text = dict(_TINY_TEXT, vocab_size=vocab_size, hidden_act=hidden_act, bos_token_id=0, eos_token_id=1,
                pad_token_id=1)
    config = CLIPConfig(text_config=text, vision_config=dict(_TINY_VISION, hidden_act=hidden_act),
                        projection_dim=projection_dim, logit_scale_init_value=logit_scale)
    return CLIPModel(config).eval()


def _save_clip_like(folder: Path, *, logit_scale: float, seed: int) -> Path:
    tokenizer = _save_tokenizer(folder)
    model = tiny_clip_model(logit_scale=logit_scale, vocab_size=len(tokenizer), seed=seed)
    model.save_pretrained(folder)
    return folder


def _save_pickscore(folder: Path) -> Path:
    # logit_scale exp = 50, not CLIP's 100, so a test can tell the learned scale from a constant 100.
    return _save_clip_like(folder, logit_scale=math.log(50.0), seed=0)


def _save_clip(folder: Path) -> Path:
    return _save_clip_like(folder, logit_scale=math.log(100.0), seed=1)


def _save_hpsv21(folder: Path) -> Path:
    return _save_clip_like(folder, logit_scale=math.log(100.0), seed=2)


def _save_aesthetic(folder: Path) -> Path:
    from smpo.rewards.aesthetic import save_aesthetic_folder, tiny_aesthetic_parts

    backbone, head = tiny_aesthetic_parts()
    return save_aesthetic_folder(folder, backbone, head)


def _save_imagereward(folder: Path) -> Path:
    from smpo.rewards.imagereward import save_imagereward_folder, tiny_imagereward_parts

    return save_imagereward_folder(folder, *tiny_imagereward_parts())


_SAVERS: dict[str, Callable[[Path], Path]] = {
    "pickscore": _save_pickscore,
    "clip": _save_clip,
    "hpsv2.1": _save_hpsv21,
    "aesthetic": _save_aesthetic,
    "imagereward": _save_imagereward,
}


def save_tiny_scorer(name: str, folder: str | Path) -> Path:
    """Build a tiny random model of scorer ``name``'s classes and save it to ``folder``; returns the folder.

    ``load_scorer(name, path=folder)`` then loads it offline through the user's code path.
    """
    saver = _SAVERS.get(name.lower())
    if saver is None:
        raise ValueError(f"no tiny model for scorer {name!r}; choose from {', '.join(_SAVERS)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return saver(folder)
