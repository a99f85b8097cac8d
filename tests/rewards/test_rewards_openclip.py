"""open_clip -> transformers conversion, checked against an independent open_clip-layout forward pass."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from smpo.rewards import load_scorer
from smpo.rewards.openclip_keys import (
    VIT_H_14_CONFIG,
    clip_config_from_openclip,
    load_openclip_checkpoint,
    openclip_to_transformers,
)
from smpo.rewards.preprocess import pad_to_square

WIDTH, LAYERS, HEADS, EMBED, VOCAB, PATCH, IMAGE = 128, 2, 2, 24, 514, 8, 32


def openclip_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under open_clip's ``CLIP`` key names (width 128 -> 2 heads of 64)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.05):
        return torch.randn(*shape, generator=g) * scale

    sd = {"positional_embedding": r(77, WIDTH), "text_projection": r(WIDTH, EMBED), "logit_scale": torch.tensor(4.6),
          "token_embedding.weight": r(VOCAB, WIDTH), "ln_final.weight": 1 + r(WIDTH), "ln_final.bias": r(WIDTH),
          "visual.class_embedding": r(WIDTH), "visual.positional_embedding": r((IMAGE // PATCH) ** 2 + 1, WIDTH),
          "visual.proj": r(WIDTH, EMBED), "visual.conv1.weight": r(WIDTH, 3, PATCH, PATCH),
          "visual.ln_pre.weight": 1 + r(WIDTH), "visual.ln_pre.bias": r(WIDTH),
          "visual.ln_post.weight": 1 + r(WIDTH), "visual.ln_post.bias": r(WIDTH),
          "attn_mask": torch.zeros(77, 77)}
    for tower in ("", "visual."):
        for i in range(LAYERS):
            p = f"{tower}transformer.resblocks.{i}."
            sd.update({p + "ln_1.weight": 1 + r(WIDTH), p + "ln_1.bias": r(WIDTH),
                       p + "attn.in_proj_weight": r(3 * WIDTH, WIDTH, scale=0.2), p + "attn.in_proj_bias": r(3 * WIDTH),
                       p + "attn.out_proj.weight": r(WIDTH, WIDTH, scale=0.2), p + "attn.out_proj.bias": r(WIDTH),
                       p + "ln_2.weight": 1 + r(WIDTH), p + "ln_2.bias": r(WIDTH),
                       p + "mlp.c_fc.weight": r(4 * WIDTH, WIDTH, scale=0.2), p + "mlp.c_fc.bias": r(4 * WIDTH),
                       p + "mlp.c_proj.weight": r(WIDTH, 4 * WIDTH, scale=0.2), p + "mlp.c_proj.bias": r(WIDTH)})
    return sd


def _ln(x, sd, name):
    return F.layer_norm(x, (x.shape[-1],), sd[name + ".weight"], sd[name + ".bias"])


def _resblock(x, sd, p, mask=None):
    """open_clip ResidualAttentionBlock: torch's MultiheadAttention on the packed in_proj, exact GELU MLP."""
    attention = nn.MultiheadAttention(WIDTH, HEADS, batch_first=True)
    attention.load_state_dict({"in_proj_weight": sd[p + "attn.in_proj_weight"], "in_proj_bias": sd[p + "attn.in_proj_bias"],
                               "out_proj.weight": sd[p + "attn.out_proj.weight"], "out_proj.bias": sd[p + "attn.out_proj.bias"]})
    h = _ln(x, sd, p + "ln_1")
    x = x + attention(h, h, h, need_weights=False, attn_mask=mask)[0]
    h = F.gelu(F.linear(_ln(x, sd, p + "ln_2"), sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"]))
    return x + F.linear(h, sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])


def reference_image_features(sd, pixels):
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual.class_embedding"].expand(len(x), 1, WIDTH), x], dim=1) + sd["visual.positional_embedding"]
    x = _ln(x, sd, "visual.ln_pre")
    for i in range(LAYERS):
        x = _resblock(x, sd, f"visual.transformer.resblocks.{i}.")
    return _ln(x[:, 0], sd, "visual.ln_post") @ sd["visual.proj"]


def reference_text_features(sd, ids):
    x = sd["token_embedding.weight"][ids] + sd["positional_embedding"][: ids.shape[1]]
    causal = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)
    for i in range(LAYERS):
        x = _resblock(x, sd, f"transformer.resblocks.{i}.", causal)
    x = _ln(x, sd, "ln_final")
    return x[torch.arange(len(ids)), ids.argmax(-1)] @ sd["text_projection"]  # pooled at the end-of-text token


def test_key_mapping_reproduces_openclip_features(tiny_folder, images, prompts):
    from transformers import AutoTokenizer, CLIPModel

    tokenizer = AutoTokenizer.from_pretrained(tiny_folder("hpsv2.1"))  # char-level CLIP tokenizer, eot = id 1
    sd = openclip_state_dict()
    config = clip_config_from_openclip(sd, tokenizer=tokenizer)
    assert config.text_config.eos_token_id == 1
    assert (config.vision_config.num_attention_heads, config.text_config.num_attention_heads) == (2, 2)
    assert (config.vision_config.image_size, config.projection_dim) == (IMAGE, EMBED)
    model = CLIPModel(config).eval()
    missing, unexpected = model.load_state_dict(openclip_to_transformers(sd), strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing)

    ids = tokenizer(prompts, padding="max_length", truncation=True, max_length=77, return_tensors="pt")["input_ids"]
    ids_openclip = torch.where(ids == 1, torch.tensor(VOCAB - 1), ids)  # open_clip pools at argmax: make eot the max id
    sd_openclip = dict(sd, **{"token_embedding.weight": sd["token_embedding.weight"].clone()})
    sd_openclip["token_embedding.weight"][VOCAB - 1] = sd["token_embedding.weight"][1]
    pixels = torch.stack([pad_to_square(image, IMAGE) for image in images])
    with torch.no_grad():
        got_image = model.get_image_features(pixel_values=pixels)
        got_text = model.get_text_features(input_ids=ids, attention_mask=(ids != -1).long())
        got_image = getattr(got_image, "pooler_output", got_image)
        got_text = getattr(got_text, "pooler_output", got_text)
        assert torch.allclose(got_image, reference_image_features(sd, pixels), atol=1e-5)
        assert torch.allclose(got_text, reference_text_features(sd_openclip, ids_openclip), atol=1e-5)


def test_hpsv21_scores_an_openclip_checkpoint_file(tmp_path, tiny_folder, images, prompts):
    """The .pt path end to end: {'state_dict': {'module.' + key: fp16}} with a tokenizer saved beside it."""
    from transformers import AutoTokenizer

    sd = openclip_state_dict(seed=1)
    torch.save({"state_dict": {"module." + k: v.half() for k, v in sd.items()}, "epoch": 3}, tmp_path / "HPS_v2.1.pt")
    AutoTokenizer.from_pretrained(tiny_folder("hpsv2.1")).save_pretrained(tmp_path)
    scorer = load_scorer("hpsv2.1", path=tmp_path / "HPS_v2.1.pt", device="cpu", batch_size=4)

    rounded = {k: v.half().float() for k, v in sd.items()}
    tokens = scorer.tokenizer(prompts, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
    ids = torch.where(tokens["input_ids"] == 1, torch.tensor(VOCAB - 1), tokens["input_ids"])
    rounded["token_embedding.weight"][VOCAB - 1] = rounded["token_embedding.weight"][1]
    with torch.no_grad():
        image = F.normalize(reference_image_features(rounded, scorer.pixel_values(images)), dim=-1)
        text = F.normalize(reference_text_features(rounded, ids), dim=-1)
    assert torch.allclose(scorer(images, prompts), 100 * (image * text).sum(-1), atol=1e-3)


def test_vit_h_14_config_from_shapes():
    shapes = {"visual.conv1.weight": (1280, 3, 14, 14), "token_embedding.weight": (49408, 1024),
              "visual.positional_embedding": (257, 1280), "positional_embedding": (77, 1024),
              "text_projection": (1024, 1024), "visual.transformer.resblocks.31.ln_1.weight": (1280,),
              "visual.transformer.resblocks.0.mlp.c_fc.weight": (5120, 1280),
              "transformer.resblocks.23.ln_1.weight": (1024,), "transformer.resblocks.0.mlp.c_fc.weight": (4096, 1024)}
    config = clip_config_from_openclip({k: torch.empty(s, device="meta") for k, s in shapes.items()})
    for tower in ("vision_config", "text_config"):
        for key, value in VIT_H_14_CONFIG[tower].items():
            assert getattr(getattr(config, tower), key) == value, (tower, key)
    assert config.projection_dim == 1024


def test_unknown_keys_are_named(tmp_path):
    sd = openclip_state_dict()
    sd["visual.transformer.resblocks.0.ls_1.gamma"] = torch.ones(WIDTH)
    with pytest.raises(KeyError, match=r"unknown keys: \['visual.transformer.resblocks.0.ls_1.gamma'\]"):
        openclip_to_transformers(sd)
    torch.save({"weights": 1}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"bad.pt is not a state dict of tensors; non-tensor entries: \['weights'\]"):
        load_openclip_checkpoint(tmp_path / "bad.pt")
    torch.save({"visual.conv1.weight": torch.zeros(1)}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="partial.pt: not an open_clip CLIP checkpoint; missing visual.positional_embedding"):
        load_openclip_checkpoint(tmp_path / "partial.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt does not exist"):
        load_openclip_checkpoint(tmp_path / "missing.pt")
