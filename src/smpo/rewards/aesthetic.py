"""LAION "improved aesthetic predictor": a linear stack on the normalised CLIP ViT-L/14 image embedding.

Score (ALGORITHM.md section 7, the paper's "Aesthetic" column)::

    e = f_image(x) / ||f_image(x)||          # OpenAI CLIP ViT-L/14 projected image embedding, 768-d
    score = head(e)                          # about 1-10 (trained on AVA-style 1-10 ratings)

``head`` is :class:`smpo.rewards.heads.LinearStackHead`: Linear(768, 1024), Dropout(0.2),
Linear(1024, 128), Dropout(0.2), Linear(128, 64), Dropout(0.1), Linear(64, 16), Linear(16, 1)
(state-dict keys ``layers.{0,2,4,6,7}``), no activations; dropout is inactive at inference. The
prompt is ignored.

Local format (``path``): a folder with ``clip/`` (a transformers ``CLIPVisionModelWithProjection`` or
``CLIPModel``) and a head file ``head.safetensors`` or ``head.pth`` (or the original
``sac+logos+ava1-l14-linearMSE.pth``); or just a head file, the backbone then coming from the hub.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from smpo.rewards.base import Scorer, embedding
from smpo.rewards.heads import LinearStackHead
from smpo.rewards.preprocess import clip_center_crop, stack

OPENAI_CLIP_L14 = "openai/clip-vit-large-patch14"
HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"
HEAD_URL = f"https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/{HEAD_FILE}"
_HEAD_NAMES = ("head.safetensors", "head.pth", HEAD_FILE)


class AestheticScorer(Scorer):
    """``head(normalised CLIP image embedding)``; the head runs in float32 whatever the backbone dtype."""

    name = "aesthetic"
    scale = "LAION aesthetic score, roughly 1-10 (SD1.5 images typically 5-6.5); prompt ignored"

    def __init__(self, backbone, head: LinearStackHead, *, device: torch.device, dtype: torch.dtype,
                 batch_size: int = 16) -> None:
        super().__init__(device=device, dtype=dtype, batch_size=batch_size)
        in_dim = head.embed_dim
        if backbone.config.projection_dim != in_dim:
            raise ValueError(f"aesthetic: the CLIP backbone's projection_dim is {backbone.config.projection_dim} "
                             f"but the head expects {in_dim}-d embeddings (OpenAI CLIP ViT-L/14 gives 768)")
        self.backbone = backbone.to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        self.head = head.to(device=self.device, dtype=torch.float32).eval().requires_grad_(False)
        self.image_size = int(backbone.config.vision_config.image_size
                              if hasattr(backbone.config, "vision_config") else backbone.config.image_size)

    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return stack(images, clip_center_crop, self.image_size)

    def image_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """L2-normalised projected image embeddings, float32 ``[B, 768]``."""
        pixels = self.pixel_values(images).to(device=self.device, dtype=self.dtype)
        if hasattr(self.backbone, "get_image_features"):
            features = embedding(self.backbone.get_image_features(pixel_values=pixels))
        else:
            features = self.backbone(pixel_values=pixels).image_embeds
        return F.normalize(features.float(), dim=-1)

    def score_batch(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        return self.head(self.image_embeddings(images))


def load_head(path: str | os.PathLike | None = None) -> LinearStackHead:
    """The head from a ``.safetensors``/``.pth`` file, or (``None``) the published one, downloaded once."""
    if path is None:
        state = torch.hub.load_state_dict_from_url(HEAD_URL, map_location="cpu", weights_only=True, file_name=HEAD_FILE)
    elif str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    return LinearStackHead.from_state_dict(state, str(path or HEAD_URL))


def _load_backbone(source: str | os.PathLike):
    from transformers import CLIPVisionModelWithProjection

    return CLIPVisionModelWithProjection.from_pretrained(str(source))


def _find_head(folder: Path) -> Path:
    for name in _HEAD_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder}: no aesthetic head; expected one of {', '.join(_HEAD_NAMES)} "
                            f"beside a clip/ backbone folder")


def load_aesthetic(path: str | os.PathLike | None = None, *, device: torch.device, dtype: torch.dtype,
                   batch_size: int = 16) -> AestheticScorer:
    """The aesthetic scorer: hub backbone + published head by default; see the module doc for ``path``."""
    if path is None:
        backbone, head = _load_backbone(OPENAI_CLIP_L14), load_head(None)
    elif Path(path).is_file():
        backbone, head = _load_backbone(OPENAI_CLIP_L14), load_head(path)
    elif Path(path).is_dir():
        folder = Path(path)
        head = load_head(_find_head(folder))
        backbone = _load_backbone(folder / "clip" if (folder / "clip").is_dir() else OPENAI_CLIP_L14)
    else:
        raise FileNotFoundError(f"aesthetic: {path} is neither a head file nor a folder")
    return AestheticScorer(backbone, head, device=device, dtype=dtype, batch_size=batch_size)


def tiny_aesthetic_parts(seed: int = 0):
    """A tiny random ``CLIPVisionModelWithProjection`` (projection_dim 768, image 32) and a random head."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=768)
    return CLIPVisionModelWithProjection(config).eval(), LinearStackHead(768).eval()


def save_aesthetic_folder(folder: str | os.PathLike, backbone, head: LinearStackHead) -> Path:
    """Write the local format: ``folder/clip/`` (backbone) and ``folder/head.safetensors``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    backbone.save_pretrained(folder / "clip")
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(folder / "head.safetensors"))
    return folder
