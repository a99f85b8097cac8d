"""Read open_clip CLIP checkpoints (HPS v2.1, ViT-H-14) into a transformers ``CLIPModel``, without open_clip.

open_clip's ``CLIP`` (the OpenAI layout) and transformers' ``CLIPModel`` hold the same tensors under
different names; three things differ beyond the names:

- attention: open_clip stores ``attn.in_proj_weight`` ``[3D, D]`` (q, k, v stacked, in that order)
  and ``attn.in_proj_bias`` ``[3D]``; transformers has separate ``q_proj``/``k_proj``/``v_proj``;
- projections: open_clip multiplies ``x @ proj`` with ``visual.proj`` ``[D, P]`` and
  ``text_projection`` ``[D, P]``; transformers' ``nn.Linear`` weights are their transposes ``[P, D]``;
- the image patch convolution ``visual.conv1`` has no bias, like transformers' ``patch_embedding``.
"""

from __future__ import annotations

import os
import re

import torch

from smpo.rewards.base import read_state_dict

# open_clip ViT-H-14 (laion2B-s32B-b79K, and HPS v2 / v2.1 which fine-tune it): width 1280 / 32 layers
# / 16 heads / patch 14 for the image tower, width 1024 / 24 layers / 16 heads for the text tower,
# 1024-d joint embedding, exact GELU, LayerNorm eps 1e-5, 77-token context.
VIT_H_14_CONFIG: dict = dict(
    projection_dim=1024,
    vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                       patch_size=14, image_size=224, hidden_act="gelu", layer_norm_eps=1e-5),
    text_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                     vocab_size=49408, max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5,
                     bos_token_id=49406, eos_token_id=49407, pad_token_id=1),
)

_BLOCK_RENAMES = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}
_TOP_RENAMES = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
}
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_IGNORED = {"attn_mask", "logit_bias"}
_REQUIRED = ("visual.conv1.weight", "visual.positional_embedding", "token_embedding.weight", "positional_embedding",
             "text_projection", "visual.transformer.resblocks.0.mlp.c_fc.weight", "transformer.resblocks.0.mlp.c_fc.weight")
_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")


def openclip_to_transformers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename (and split / transpose) an open_clip ``CLIP`` state dict into ``CLIPModel`` keys.

    Raises ``KeyError`` naming any key it does not know, so a checkpoint of another layout
    (e.g. a ``CustomTextCLIP`` with an HF text tower) fails loudly instead of loading half.
    """
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        if key in _IGNORED:
            continue
        if key in _TOP_RENAMES:
            out[_TOP_RENAMES[key]] = value
        elif key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.t().contiguous()
        elif match := _BLOCK.match(key):
            tower = "vision_model" if match.group(1) else "text_model"
            prefix = f"{tower}.encoder.layers.{match.group(2)}."
            rest = match.group(3)
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = rest.rsplit("_", 1)[1]  # "weight" or "bias"
                for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{prefix}self_attn.{name}.{kind}"] = part.contiguous()
                continue
            module, _, param = rest.rpartition(".")
            if module not in _BLOCK_RENAMES:
                unknown.append(key)
                continue
            out[f"{prefix}{_BLOCK_RENAMES[module]}.{param}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise KeyError(f"not an open_clip CLIP (OpenAI-layout) state dict; unknown keys: {unknown[:8]}"
                       + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else ""))
    return out


def clip_config_from_openclip(state_dict: dict[str, torch.Tensor], heads: tuple[int, int] | None = None,
                              tokenizer=None):
    """The ``CLIPConfig`` of an open_clip state dict: ViT-H-14 when the shapes match it.

    Other sizes are read from the tensor shapes; head counts cannot be, so they come from
    ``heads=(vision_heads, text_heads)``; the default is open_clip's rule, width // 64 (at least 1),
    except for the ViT-H image tower (width 1280), whose heads are 80 wide (16 heads).

    The text tower pools at the first end-of-text token, whose id comes from ``tokenizer`` (default:
    the CLIP BPE's 49407, the largest id, which is where open_clip's argmax pooling lands too).
    """
    from transformers import CLIPConfig

    v_width = state_dict["visual.conv1.weight"].shape[0]
    t_width = state_dict["token_embedding.weight"].shape[1]
    v_layers = 1 + max(int(m.group(2)) for k in state_dict if (m := _BLOCK.match(k)) and m.group(1))
    t_layers = 1 + max(int(m.group(2)) for k in state_dict if (m := _BLOCK.match(k)) and not m.group(1))
    vision_heads, text_heads = heads or (16 if v_width == 1280 else max(1, v_width // 64), max(1, t_width // 64))
    patch = state_dict["visual.conv1.weight"].shape[-1]
    grid = int(round((state_dict["visual.positional_embedding"].shape[0] - 1) ** 0.5))
    vision = dict(VIT_H_14_CONFIG["vision_config"], hidden_size=v_width, num_hidden_layers=v_layers,
                  num_attention_heads=vision_heads, patch_size=patch, image_size=grid * patch,
                  intermediate_size=state_dict["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0])
    text = dict(VIT_H_14_CONFIG["text_config"], hidden_size=t_width, num_hidden_layers=t_layers,
                num_attention_heads=text_heads, vocab_size=state_dict["token_embedding.weight"].shape[0],
                max_position_embeddings=state_dict["positional_embedding"].shape[0],
                intermediate_size=state_dict["transformer.resblocks.0.mlp.c_fc.weight"].shape[0])
    if tokenizer is not None:
        text.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=state_dict["text_projection"].shape[1])


def load_openclip_checkpoint(path: str | os.PathLike, heads: tuple[int, int] | None = None, tokenizer=None):
    """A float32 transformers ``CLIPModel`` holding the weights of the open_clip checkpoint at ``path``.

    Pass the ``tokenizer`` the model will be used with, so that text pooling uses its end-of-text id.
    """
    from transformers import CLIPModel

    state = {k: v.float() for k, v in read_state_dict(path).items()}
    absent = [k for k in _REQUIRED if k not in state]
    if absent:
        raise ValueError(f"{path}: not an open_clip CLIP checkpoint; missing {', '.join(absent)}")
    config = clip_config_from_openclip(state, heads, tokenizer)
    with torch.device("meta"):
        model = CLIPModel(config)
    mapped = openclip_to_transformers(state)
    result = model.load_state_dict(mapped, strict=False, assign=True)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or result.unexpected_keys:
        raise ValueError(f"{path}: checkpoint does not fit a CLIP model; missing {missing[:8]}, "
                         f"unexpected {result.unexpected_keys[:8]}")
    _materialize_buffers(model)
    return model.eval()


def _materialize_buffers(model) -> None:
    """Recreate the ``position_ids`` buffers left on the meta device by the meta-device construction."""
    for module in model.modules():
        ids = getattr(module, "position_ids", None)
        if isinstance(ids, torch.Tensor) and ids.is_meta:
            module.register_buffer("position_ids", torch.arange(ids.shape[-1]).expand(1, -1), persistent=False)
