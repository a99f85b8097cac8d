"""ImageReward v1.0 on transformers' BLIP classes, reading the published ``ImageReward.pt`` by key mapping.

Score (ALGORITHM.md section 7)::

    v = ViT-L(x)                                      # BLIP image tokens [B, 197, 1024], after the final LayerNorm
    h = BERT(prompt tokens, cross-attending to v)     # bidirectional text encoder, cross-attention in every layer
    raw = head(h[:, 0])                               # the [CLS] feature through the linear stack
    score = (raw - 0.16717362830052426) / 1.0333394966054072

Prompts are BERT-uncased tokens, ``[CLS] ... [SEP]``, padded / truncated to 35 tokens (the ids are
used as tokenized: no ``[ENC]`` in place of ``[CLS]``). Images use the OpenAI CLIP transform at 224
(:func:`smpo.rewards.preprocess.clip_center_crop`: resize and crop, then RGB, as ImageReward's).

The published checkpoint's layout (``ImageReward.pt``, a flat state dict):
``blip.visual_encoder.*`` (timm/BLIP ViT: ``cls_token``, ``pos_embed``, ``patch_embed.proj``,
``blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``norm``),
``blip.text_encoder.*`` (BLIP's ``med.py`` BERT, the names transformers' ``BlipTextModel`` kept),
``mlp.layers.*`` (the head), plus ``blip.vision_proj``/``blip.text_proj`` which scoring does not use
and the ``blip.text_encoder.embeddings.position_ids`` buffer, which is dropped (see docs/scorers.md,
"Verified against", for the reference files these names were read from).

Local folder format: ``vision/`` (``BlipVisionModel``), ``text/`` (``BlipTextModel``),
``tokenizer/`` (a BERT tokenizer), ``head.safetensors`` (``layers.*``). A file path is read as the
published ``.pt`` layout.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from smpo.rewards.base import Scorer, read_state_dict, tokenizer_beside
from smpo.rewards.heads import LinearStackHead
from smpo.rewards.preprocess import clip_center_crop, stack

IMAGEREWARD_REPO = "zai-org/ImageReward"
IMAGEREWARD_FILE = "ImageReward.pt"
BERT_TOKENIZER = "bert-base-uncased"
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MAX_PROMPT_TOKENS = 35

# BLIP ViT-L/16 at 224 (ImageReward's vit="large"): LayerNorm eps 1e-6, exact GELU.
VIT_L_CONFIG: dict = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                          image_size=224, patch_size=16, layer_norm_eps=1e-6, hidden_act="gelu")
# BLIP's med_config.json (BERT-base, 30522 + [DEC] + [ENC] tokens, cross-attention width = ViT-L width).
# is_decoder=True only makes transformers build the cross-attention layers; scoring calls the
# encoder with is_decoder=False, i.e. a bidirectional self-attention mask, as BLIP's encoder does.
MED_CONFIG: dict = dict(vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, max_position_embeddings=512, layer_norm_eps=1e-12, hidden_act="gelu",
                        encoder_hidden_size=1024, is_decoder=True, pad_token_id=0, bos_token_id=30522, sep_token_id=102,
                        eos_token_id=102)

_VISION_RENAMES = {
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "norm.weight": "post_layernorm.weight",
    "norm.bias": "post_layernorm.bias",
}
_BLOCK_RENAMES = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
                  "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$")


class ImageRewardModel(nn.Module):
    """BLIP image encoder + BLIP text encoder (cross-attending) + linear-stack head -> raw reward."""

    def __init__(self, vision, text, head: LinearStackHead) -> None:
        super().__init__()
        self.vision = vision
        self.text = text
        self.head = head

    def raw_reward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor) -> torch.Tensor:
        """Un-normalised reward ``head(h[:, 0])``, float32 ``[B]``."""
        image_tokens = self.vision(pixel_values=pixel_values).last_hidden_state
        image_mask = torch.ones(image_tokens.shape[:-1], dtype=torch.long, device=image_tokens.device)
        text = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_tokens,
                         encoder_attention_mask=image_mask, is_decoder=False)
        cls_feature = text.last_hidden_state[:, 0, :].float()
        return self.head(cls_feature.to(next(self.head.parameters()).dtype))


class ImageRewardScorer(Scorer):
    """``(raw - 0.16717...) / 1.03333...``: ImageReward's normalised reward."""

    name = "imagereward"
    scale = "normalised ImageReward, mean 0 / std 1 over its training set's images (typically -2 to 2)"

    def __init__(self, model: ImageRewardModel, tokenizer, *, device: torch.device, dtype: torch.dtype,
                 batch_size: int = 16) -> None:
        super().__init__(device=device, dtype=dtype, batch_size=batch_size)
        model.vision.to(device=self.device, dtype=dtype)
        model.text.to(device=self.device, dtype=dtype)
        model.head.to(device=self.device, dtype=torch.float32)
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_size = int(model.vision.config.image_size)

    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return stack(images, clip_center_crop, self.image_size)

    def tokens(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """BERT tokens padded/truncated to 35 (``[CLS]`` first, ``[SEP]`` last real token)."""
        out = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_PROMPT_TOKENS,
                             return_tensors="pt")
        return {"input_ids": out["input_ids"].to(self.device), "attention_mask": out["attention_mask"].to(self.device)}

    def raw_batch(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        pixels = self.pixel_values(images).to(device=self.device, dtype=self.dtype)
        return self.model.raw_reward(pixels, **self.tokens(prompts))

    def score_batch(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        return (self.raw_batch(images, prompts) - REWARD_MEAN) / REWARD_STD


def map_imagereward_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """Split the published flat state dict into (vision, text, head) state dicts with transformers names.

    Keys outside ``blip.visual_encoder``, ``blip.text_encoder`` and ``mlp`` are ignored (projections
    used only for BLIP's contrastive loss); an unknown key inside the image encoder raises ``KeyError``.
    """
    vision, text, head, unknown = {}, {}, {}, []
    for key, value in state.items():
        if key.startswith("blip.visual_encoder."):
            name = key.removeprefix("blip.visual_encoder.")
            if name in _VISION_RENAMES:
                vision[_VISION_RENAMES[name]] = value
            elif (match := _BLOCK.match(name)) and match.group(2) in _BLOCK_RENAMES:
                vision[f"encoder.layers.{match.group(1)}.{_BLOCK_RENAMES[match.group(2)]}.{match.group(3)}"] = value
            else:
                unknown.append(key)
        elif key.startswith("blip.text_encoder."):
            name = key.removeprefix("blip.text_encoder.")
            if not name.endswith("position_ids"):
                text[name] = value
        elif key.startswith("mlp."):
            head[key.removeprefix("mlp.")] = value
    if unknown:
        raise KeyError(f"unknown ImageReward image-encoder keys: {unknown[:8]}")
    return vision, text, head


def configs_from_state_dict(vision: dict, text: dict, heads: tuple[int, int] | None = None):
    """``BlipVisionConfig`` and ``BlipTextConfig`` read from mapped tensor shapes (ViT-L/BERT-base when they match).

    Head counts are not in the shapes: ``heads=(vision, text)``, default 16 / 12 for the published
    widths 1024 / 768, else width // 64 (at least 1).
    """
    from transformers import BlipTextConfig, BlipVisionConfig

    v_width = vision["embeddings.class_embedding"].shape[-1]
    patch = vision["embeddings.patch_embedding.weight"].shape[-1]
    grid = int(round((vision["embeddings.position_embedding"].shape[1] - 1) ** 0.5))
    v_layers = 1 + max(int(k.split(".")[2]) for k in vision if k.startswith("encoder.layers."))
    t_width = text["embeddings.word_embeddings.weight"].shape[1]
    t_layers = 1 + max(int(k.split(".")[2]) for k in text if k.startswith("encoder.layer."))
    default_heads = (16 if v_width == 1024 else max(1, v_width // 64), 12 if t_width == 768 else max(1, t_width // 64))
    vision_heads, text_heads = heads or default_heads
    vision_config = BlipVisionConfig(**dict(
        VIT_L_CONFIG, hidden_size=v_width, num_hidden_layers=v_layers, num_attention_heads=vision_heads,
        patch_size=patch, image_size=grid * patch,
        intermediate_size=vision["encoder.layers.0.mlp.fc1.weight"].shape[0]))
    vocab = text["embeddings.word_embeddings.weight"].shape[0]
    text_config = BlipTextConfig(**dict(
        MED_CONFIG, vocab_size=vocab, hidden_size=t_width, num_hidden_layers=t_layers, num_attention_heads=text_heads,
        intermediate_size=text["encoder.layer.0.intermediate.dense.weight"].shape[0],
        max_position_embeddings=text["embeddings.position_embeddings.weight"].shape[0],
        encoder_hidden_size=v_width,  # the cross-attention reads the image tokens
        bos_token_id=min(MED_CONFIG["bos_token_id"], vocab - 1), sep_token_id=min(MED_CONFIG["sep_token_id"], vocab - 1),
        eos_token_id=min(MED_CONFIG["eos_token_id"], vocab - 1)))
    return vision_config, text_config


def _load_strict(module: nn.Module, state: dict, source: str, part: str) -> None:
    result = module.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or result.unexpected_keys:
        raise ValueError(f"{source}: the {part} weights do not fit; missing {missing[:8]}, "
                         f"unexpected {result.unexpected_keys[:8]}")


def load_imagereward_checkpoint(path: str | os.PathLike, heads: tuple[int, int] | None = None) -> ImageRewardModel:
    """A float32 :class:`ImageRewardModel` from a checkpoint file in the published ``ImageReward.pt`` layout."""
    from transformers import BlipTextModel, BlipVisionModel

    state = {k: v.float() for k, v in read_state_dict(path).items()}
    vision_state, text_state, head_state = map_imagereward_state_dict(state)
    for part, mapped in (("blip.visual_encoder", vision_state), ("blip.text_encoder", text_state), ("mlp", head_state)):
        if not mapped:
            raise ValueError(f"{path}: no {part}.* keys; is this an ImageReward checkpoint?")
    vision_config, text_config = configs_from_state_dict(vision_state, text_state, heads)
    vision = BlipVisionModel(vision_config)
    text = BlipTextModel(text_config, add_pooling_layer=False)
    _load_strict(vision, vision_state, str(path), "image encoder")
    _load_strict(text, text_state, str(path), "text encoder")
    head = LinearStackHead.from_state_dict(head_state, f"{path} (mlp.*)")
    return ImageRewardModel(vision, text, head).eval()


def load_imagereward_folder(folder: str | os.PathLike) -> tuple[ImageRewardModel, object]:
    """Model and tokenizer from the local folder format (see the module doc)."""
    from safetensors.torch import load_file
    from transformers import BlipTextModel, BlipVisionModel

    folder = Path(folder)
    needed = ["vision", "text", "tokenizer", "head.safetensors"]
    missing = [name for name in needed if not (folder / name).exists()]
    if missing:
        raise FileNotFoundError(f"{folder}: not an ImageReward folder; missing {', '.join(missing)} "
                                f"(expected {', '.join(needed)}, or pass the ImageReward.pt file)")
    vision = BlipVisionModel.from_pretrained(str(folder / "vision"))
    text = BlipTextModel.from_pretrained(str(folder / "text"), add_pooling_layer=False)
    head = LinearStackHead.from_state_dict(load_file(str(folder / "head.safetensors")), str(folder / "head.safetensors"))
    return ImageRewardModel(vision, text, head).eval(), _auto_tokenizer(folder / "tokenizer")


def _auto_tokenizer(folder: str | os.PathLike):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def blip_tokenizer(source: str | os.PathLike = BERT_TOKENIZER):
    """BLIP's tokenizer: BERT uncased plus ``[DEC]`` (bos) and ``[ENC]``, as ImageReward's ``init_tokenizer``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(source))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def load_imagereward(path: str | os.PathLike | None = None, *, device: torch.device, dtype: torch.dtype,
                     batch_size: int = 16) -> ImageRewardScorer:
    """ImageReward v1.0: ``ImageReward.pt`` from the hub repo ``zai-org/ImageReward`` by default; a
    local ``.pt`` file in that layout (with the BERT tokenizer of the hub, or one saved beside the
    file), or a local folder (module doc)."""
    if path is None:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(IMAGEREWARD_REPO, IMAGEREWARD_FILE)
    if Path(path).is_dir():
        model, tokenizer = load_imagereward_folder(path)
    elif Path(path).is_file():
        beside = tokenizer_beside(path)
        tokenizer = blip_tokenizer() if beside is None else _auto_tokenizer(beside)
        model = load_imagereward_checkpoint(path)
    else:
        raise FileNotFoundError(f"imagereward: {path} is neither an ImageReward.pt file nor a folder")
    return ImageRewardScorer(model, tokenizer, device=device, dtype=dtype, batch_size=batch_size)


_TINY_VOCAB = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-")
               + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"] + ["a", "the", "cat", "dog", "red", "photo", "of"])


def tiny_imagereward_parts(seed: int = 0):
    """A tiny random model (image 32, patch 8, widths 32/24) and a tiny offline BERT tokenizer."""
    from transformers import BertTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(dict.fromkeys(_TINY_VOCAB))})
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    torch.manual_seed(seed)
    vision = BlipVisionModel(BlipVisionConfig(**dict(VIT_L_CONFIG, hidden_size=32, intermediate_size=48,
                                                     num_hidden_layers=2, num_attention_heads=4, image_size=32,
                                                     patch_size=8)))
    vocab = len(tokenizer)
    text = BlipTextModel(BlipTextConfig(**dict(MED_CONFIG, vocab_size=vocab, hidden_size=24, intermediate_size=40,
                                               num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=40,
                                               encoder_hidden_size=32, bos_token_id=tokenizer.bos_token_id,
                                               sep_token_id=tokenizer.sep_token_id, eos_token_id=tokenizer.sep_token_id)),
                         add_pooling_layer=False)
    head = LinearStackHead(24)
    with torch.no_grad():  # larger head weights than the default init, so scores differ visibly between inputs
        for layer in head.layers:
            if isinstance(layer, nn.Linear):
                layer.weight.mul_(3.0)
    return ImageRewardModel(vision.eval(), text.eval(), head.eval()), tokenizer


def save_imagereward_folder(folder: str | os.PathLike, model: ImageRewardModel, tokenizer) -> Path:
    """Write the local folder format: ``vision/``, ``text/``, ``tokenizer/``, ``head.safetensors``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    model.vision.save_pretrained(folder / "vision")
    model.text.save_pretrained(folder / "text")
    tokenizer.save_pretrained(folder / "tokenizer")
    save_file({k: v.contiguous() for k, v in model.head.state_dict().items()}, str(folder / "head.safetensors"))
    return folder
