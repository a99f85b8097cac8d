"""CLIP-similarity scorers: PickScore, CLIP and HPS v2.1 (ALGORITHM.md sections 2 and 7).

All three compute ``multiplier * cos(f_image(x), f_text(c))`` with a transformers ``CLIPModel``;
they differ in weights, multiplier and image preprocessing:

| name       | weights                                        | multiplier              | preprocessing      |
|------------|------------------------------------------------|-------------------------|--------------------|
| pickscore  | ``yuvalkirstain/PickScore_v1``                 | ``logit_scale.exp()``   | ``hf_clip_center_crop`` |
| clip       | ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``       | 100                     | ``clip_center_crop`` |
| hpsv2.1    | HPS v2.1 open_clip ViT-H-14 state dict         | 100                     | ``pad_to_square``    |

PickScore's ``logit_scale.exp()`` is read from the checkpoint (about 100: CLIP-H's value, fine-tuned
unclamped at a small learning rate); the raw cosine, which the SmPO authors normalise into ``p_win``
(ALGORITHM.md section 2), is :meth:`ClipSimilarityScorer.cosine`. For HPS v2.1 the raw cosine is
what ``hpsv2.score`` returns, and 100 x cosine is the scale of HPS v2's benchmark tables and of the
paper's, which this scorer returns.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from smpo.rewards.base import Scorer, embedding, tokenizer_beside
from smpo.rewards.preprocess import clip_center_crop, hf_clip_center_crop, pad_to_square, stack

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
LAION_CLIP_H = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
HPSV21_REPO = "xswu/HPSv2"
HPSV21_FILE = "HPS_v2.1_compressed.pt"

Transform = Callable[[Image.Image, int], torch.Tensor]


class ClipSimilarityScorer(Scorer):
    """``score = multiplier * cosine(image embedding, text embedding)`` with a transformers CLIPModel.

    ``multiplier=None`` means the model's own ``logit_scale.exp()`` (PickScore).
    """

    def __init__(self, model, tokenizer, *, name: str, transform: Transform, multiplier: float | None,
                 scale: str, device: torch.device, dtype: torch.dtype, batch_size: int = 16) -> None:
        super().__init__(device=device, dtype=dtype, batch_size=batch_size)
        self.model = model.to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        self.scale = scale
        self.transform = transform
        self.image_size = int(model.config.vision_config.image_size)
        self.max_length = min(int(tokenizer.model_max_length), int(model.config.text_config.max_position_embeddings))
        self._multiplier = multiplier

    @property
    def multiplier(self) -> float:
        """The factor applied to the cosine: fixed (100), or ``logit_scale.exp()`` computed in float32."""
        if self._multiplier is not None:
            return float(self._multiplier)
        return float(self.model.logit_scale.detach().float().exp())

    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The preprocessed batch ``[B, 3, S, S]`` (float32, CPU)."""
        return stack(images, self.transform, self.image_size)

    def image_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """L2-normalised projected image embeddings, float32 ``[B, D]``."""
        pixels = self.pixel_values(images).to(device=self.device, dtype=self.dtype)
        return F.normalize(embedding(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1)

    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """L2-normalised projected text embeddings, float32 ``[B, D]`` (prompts truncated to the context)."""
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                                max_length=self.max_length, return_tensors="pt")
        features = self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                attention_mask=tokens["attention_mask"].to(self.device))
        return F.normalize(embedding(features).float(), dim=-1)

    def cosine_batch(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        return (self.image_embeddings(images) * self.text_embeddings(prompts)).sum(-1)

    @torch.no_grad()
    def cosine(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        """The raw cosine similarity in [-1, 1], float32 CPU ``[B]`` (what PickScore's authors normalise)."""
        return self._batched(self.cosine_batch, images, prompts)

    def score_batch(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        return self.multiplier * self.cosine_batch(images, prompts)


def _has_tokenizer(folder: Path) -> bool:
    return folder.is_dir() and any((folder / f).exists() for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json"))


def _load_tokenizer(source: str | os.PathLike, fallback: str):
    """The tokenizer saved in a local model folder, else the one of the hub repo ``fallback``."""
    from transformers import AutoTokenizer

    folder = Path(source)
    return AutoTokenizer.from_pretrained(str(folder) if _has_tokenizer(folder) else fallback)


def _load_clip_folder(source: str | os.PathLike, tokenizer_fallback: str):
    """A transformers ``CLIPModel`` and its tokenizer from a hub id or a local ``save_pretrained`` folder."""
    from transformers import CLIPModel

    if Path(source).exists() and not Path(source).is_dir():
        raise ValueError(f"{source} is a file; this scorer expects a transformers CLIPModel folder or hub id")
    model = CLIPModel.from_pretrained(str(source))
    return model, _load_tokenizer(source, tokenizer_fallback)


def load_pickscore(path: str | os.PathLike | None = None, *, device: torch.device, dtype: torch.dtype,
                   batch_size: int = 16) -> ClipSimilarityScorer:
    """PickScore_v1: a CLIP ViT-H-14 fine-tuned on Pick-a-Pic, with the laion CLIP-H tokenizer.

    ``path``: a local CLIPModel folder (its tokenizer is used when it has one) or a hub id.
    """
    model, tokenizer = _load_clip_folder(path or PICKSCORE_MODEL, LAION_CLIP_H)
    return ClipSimilarityScorer(model, tokenizer, name="pickscore", transform=hf_clip_center_crop, multiplier=None,
                                scale="logit_scale.exp() x cosine (100 x cosine for PickScore_v1), typically 18-24",
                                device=device, dtype=dtype, batch_size=batch_size)


def load_clip(path: str | os.PathLike | None = None, *, device: torch.device, dtype: torch.dtype,
              batch_size: int = 16) -> ClipSimilarityScorer:
    """CLIP score: open_clip ViT-H-14 laion2B-s32B-b79K (its transformers port), 100 x cosine."""
    model, tokenizer = _load_clip_folder(path or LAION_CLIP_H, LAION_CLIP_H)
    return ClipSimilarityScorer(model, tokenizer, name="clip", transform=clip_center_crop, multiplier=100.0,
                                scale="100 x cosine, in [-100, 100] (typically 25-40)",
                                device=device, dtype=dtype, batch_size=batch_size)


def load_hpsv21(path: str | os.PathLike | None = None, *, device: torch.device, dtype: torch.dtype,
                batch_size: int = 16) -> ClipSimilarityScorer:
    """HPS v2.1: an open_clip ViT-H-14 checkpoint, converted on load to a transformers CLIPModel.

    ``path``: a local CLIPModel folder (e.g. a converted checkpoint saved with ``save_pretrained``),
    an open_clip state-dict file (``.pt``/``.bin``/``.safetensors``), or ``None`` for
    ``HPS_v2.1_compressed.pt`` from the hub repo ``xswu/HPSv2``. The tokenizer is the laion CLIP-H
    one (the same BPE as open_clip's) unless the folder has its own, or, for a file, a tokenizer
    is saved beside it (``tokenizer/`` or tokenizer files in the same folder).
    """
    from smpo.rewards.openclip_keys import load_openclip_checkpoint

    if path is None:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(HPSV21_REPO, HPSV21_FILE)
    if Path(path).is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_beside(path) or LAION_CLIP_H))
        model = load_openclip_checkpoint(path, tokenizer=tokenizer)
    else:
        model, tokenizer = _load_clip_folder(path, LAION_CLIP_H)
    return ClipSimilarityScorer(model, tokenizer, name="hpsv2.1", transform=pad_to_square, multiplier=100.0,
                                scale="100 x cosine (hpsv2.score returns the cosine itself), typically 25-35",
                                device=device, dtype=dtype, batch_size=batch_size)
