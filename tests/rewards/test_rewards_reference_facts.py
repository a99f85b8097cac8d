"""Facts read from the scorers' reference code (docs/scorers.md, "Verified against"), one test per fact.

Key names below are written out literally from the reference modules (BLIP's ``vit.py`` / ``med.py`` in
zai-org/ImageReward, open_clip's ``transformer.py``), not taken from the transformers classes they are
mapped onto, so a renamed transformers parameter or a wrong mapping fails here.
"""

import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from smpo.rewards.imagereward import (
    configs_from_state_dict,
    load_imagereward_checkpoint,
    map_imagereward_state_dict,
    tiny_imagereward_parts,
)
from smpo.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, clip_center_crop, pad_to_square

MEAN = torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)
STD = torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)

# --- ImageReward.pt ----------------------------------------------------------------------------------------------
# ImageReward(nn.Module) holds `blip` (BLIP_Pretrain: visual_encoder, text_encoder, vision_proj, text_proj) and
# `mlp` (MLP: `layers` Sequential); ImageReward.pt is its flat state dict (the official loader passes it straight
# to load_state_dict). ViT-L: patch 16, depth 24, width 1024, image 224, qkv bias on. BERT (med_config.json):
# 12 layers, vocab 30524 (BERT's 30522 + [DEC] + [ENC]), 512 positions, cross-attention in every layer with key /
# value reading the 1024-wide image tokens, a persistent `position_ids` buffer, no token-type embeddings, no pooler.
V_WIDTH, T_WIDTH, VOCAB, POSITIONS = 32, 16, 30524, 512


def imagereward_published_shapes(v: int = V_WIDTH, t: int = T_WIDTH) -> dict[str, tuple[int, ...]]:
    """Every key of ImageReward.pt with its shape, at widths ``v`` (image) and ``t`` (text) instead of 1024 / 768."""
    shapes: dict[str, tuple[int, ...]] = {
        "blip.visual_encoder.cls_token": (1, 1, v), "blip.visual_encoder.pos_embed": (1, 197, v),
        "blip.visual_encoder.patch_embed.proj.weight": (v, 3, 16, 16), "blip.visual_encoder.patch_embed.proj.bias": (v,),
        "blip.visual_encoder.norm.weight": (v,), "blip.visual_encoder.norm.bias": (v,),
        "blip.text_encoder.embeddings.position_ids": (1, POSITIONS),
        "blip.text_encoder.embeddings.word_embeddings.weight": (VOCAB, t),
        "blip.text_encoder.embeddings.position_embeddings.weight": (POSITIONS, t),
        "blip.text_encoder.embeddings.LayerNorm.weight": (t,), "blip.text_encoder.embeddings.LayerNorm.bias": (t,),
        "blip.vision_proj.weight": (256, v), "blip.vision_proj.bias": (256,),
        "blip.text_proj.weight": (256, t), "blip.text_proj.bias": (256,),
    }
    for i in range(24):
        p = f"blip.visual_encoder.blocks.{i}."
        for name, shape in (("norm1", (v,)), ("norm2", (v,))):
            shapes[p + name + ".weight"], shapes[p + name + ".bias"] = shape, shape
        for name, (n_out, n_in) in (("attn.qkv", (3 * v, v)), ("attn.proj", (v, v)), ("mlp.fc1", (4 * v, v)),
                                    ("mlp.fc2", (v, 4 * v))):
            shapes[p + name + ".weight"], shapes[p + name + ".bias"] = (n_out, n_in), (n_out,)
    for i in range(12):
        p = f"blip.text_encoder.encoder.layer.{i}."
        linears = {"attention.self.query": (t, t), "attention.self.key": (t, t), "attention.self.value": (t, t),
                   "attention.output.dense": (t, t), "crossattention.self.query": (t, t),
                   "crossattention.self.key": (t, v), "crossattention.self.value": (t, v),
                   "crossattention.output.dense": (t, t), "intermediate.dense": (4 * t, t), "output.dense": (t, 4 * t)}
        for name, (n_out, n_in) in linears.items():
            shapes[p + name + ".weight"], shapes[p + name + ".bias"] = (n_out, n_in), (n_out,)
        for name in ("attention.output.LayerNorm", "crossattention.output.LayerNorm", "output.LayerNorm"):
            shapes[p + name + ".weight"], shapes[p + name + ".bias"] = (t,), (t,)
    for index, (n_out, n_in) in zip((0, 2, 4, 6, 7), ((1024, t), (128, 1024), (64, 128), (16, 64), (1, 16))):
        shapes[f"mlp.layers.{index}.weight"], shapes[f"mlp.layers.{index}.bias"] = (n_out, n_in), (n_out,)
    return shapes


def _random_tensor(name: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Weights at a scale where attention really mixes tokens (fan-in scaled matrices, LayerNorm gains near 1)."""
    if name.endswith("position_ids"):
        return torch.arange(shape[-1]).expand(shape).clone()
    module = name.rsplit(".", 2)[-2]  # e.g. "LayerNorm", "norm1", "query"
    if name.endswith("weight") and (module == "LayerNorm" or module.startswith("norm")):
        return 1 + 0.1 * torch.randn(*shape, generator=g)
    if name.endswith("weight") and len(shape) == 2 and "embeddings" not in name:
        return torch.randn(*shape, generator=g) / shape[1] ** 0.5
    return torch.randn(*shape, generator=g) * (1.0 if "embeddings" in name else 0.1)


@pytest.fixture(scope="module")
def imagereward_published(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    state = {k: _random_tensor(k, s, g) for k, s in imagereward_published_shapes().items()}
    path = tmp_path_factory.mktemp("imagereward-full") / "ImageReward.pt"
    torch.save(state, path)
    return path, state


def test_imagereward_every_published_key_is_mapped_or_known_unused(imagereward_published):
    _, state = imagereward_published
    vision, text, head = map_imagereward_state_dict(state)
    assert len(state) == 15 + 24 * 12 + 12 * 26 + 10  # 625 keys
    assert len(vision) == 6 + 24 * 12 and len(text) == 4 + 12 * 26 and len(head) == 10
    # The only keys scoring leaves out: BLIP's contrastive projections and the position_ids buffer.
    assert len(state) - len(vision) - len(text) - len(head) == 5


def test_imagereward_published_layout_loads_strictly_at_full_depth(imagereward_published):
    path, state = imagereward_published
    vision_state, text_state, _ = map_imagereward_state_dict(state)
    vision_config, text_config = configs_from_state_dict(vision_state, text_state, heads=(2, 2))
    assert (vision_config.image_size, vision_config.patch_size, vision_config.num_hidden_layers) == (224, 16, 24)
    assert vision_config.layer_norm_eps == 1e-6 and vision_config.hidden_act == "gelu"
    assert (text_config.vocab_size, text_config.max_position_embeddings, text_config.num_hidden_layers) == (VOCAB, 512, 12)
    assert text_config.encoder_hidden_size == V_WIDTH and text_config.layer_norm_eps == 1e-12

    model = load_imagereward_checkpoint(path, heads=(2, 2))  # raises on any missing or unexpected key
    assert set(model.vision.state_dict()) == set(vision_state)
    assert set(model.text.state_dict()) == set(text_state)  # position_ids is a non-persistent buffer there
    assert torch.equal(model.vision.state_dict()["encoder.layers.23.self_attn.qkv.bias"],
                       state["blip.visual_encoder.blocks.23.attn.qkv.bias"])
    assert torch.equal(model.text.state_dict()["encoder.layer.11.crossattention.self.value.weight"],
                       state["blip.text_encoder.encoder.layer.11.crossattention.self.value.weight"])
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([[101, 1037, 4937, 102]])  # [CLS] a cat [SEP] in bert-base-uncased
    with torch.no_grad():
        image_tokens = model.vision(pixel_values=pixels).last_hidden_state
        assert image_tokens.shape == (1, 197, V_WIDTH)  # 1 + (224 / 16) ** 2 tokens
        raw = model.raw_reward(pixels, ids, torch.ones_like(ids))
    assert raw.shape == (1,) and torch.isfinite(raw).all()


def test_imagereward_tokenizer_appends_dec_and_enc_and_keeps_cls_first():
    # init_tokenizer: bert-base-uncased + bos_token "[DEC]" + additional special "[ENC]" (ids 30522, 30523 for the
    # real vocabulary); ImageReward.score tokenizes the prompt as is, so the first id stays [CLS], not [ENC].
    _, tokenizer = tiny_imagereward_parts()
    base = len(tokenizer) - 2
    assert tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [base, base + 1]
    assert tokenizer.bos_token == "[DEC]" and "[ENC]" in tokenizer.all_special_tokens
    ids = tokenizer(["a cat"], padding="max_length", truncation=True, max_length=35)["input_ids"][0]
    assert ids[0] == tokenizer.cls_token_id and len(ids) == 35


# --- the CLIP-style transforms: resize and crop first, RGB conversion last --------------------------------------
# OpenAI CLIP's and ImageReward's `_transform` and open_clip's validation transform: Resize(n, BICUBIC),
# CenterCrop(n), convert("RGB"), ToTensor, Normalize. transformers' CLIPImageProcessor converts to RGB first.

def test_clip_transform_converts_to_rgb_after_the_resize():
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (40, 56, 4), dtype=np.uint8)
    rgba[:, :20, 3] = 0  # transparent, but coloured, pixels: PIL resizes RGBA with premultiplied alpha
    image = Image.fromarray(rgba, "RGBA")
    reference = image.resize((int(32 * 56 / 40), 32), Image.BICUBIC)  # (44, 32), in RGBA
    reference = reference.crop((6, 0, 38, 32)).convert("RGB")  # offset round(12 / 2) = 6
    expected = (torch.from_numpy(np.asarray(reference, dtype=np.float32) / 255).permute(2, 0, 1) - MEAN) / STD
    assert torch.equal(clip_center_crop(image, 32), expected)
    converted_first = clip_center_crop(image.convert("RGB"), 32)
    assert (converted_first - expected).abs().max() > 0.1  # the order matters for this image


# --- HPS v2's transform: ToTensor first, then ResizeMaxSize on the tensor, then zero padding ------------------------

def test_hps_resize_is_antialiased_bicubic_on_the_float_tensor():
    # A sharp vertical edge, 64x32 -> 32x16: bicubic rings, and the tensor resize keeps values outside [0, 1].
    array = np.zeros((32, 64, 3), dtype=np.uint8)
    array[:, 32:] = 255
    out = pad_to_square(Image.fromarray(array), 32)
    unit = torch.from_numpy(array.astype(np.float32) / 255).permute(2, 0, 1)
    resized = F.interpolate(unit[None], size=(16, 32), mode="bicubic", align_corners=False, antialias=True)[0]
    assert resized.max() > 1.0 and resized.min() < 0.0  # overshoot: no uint8 rounding, no clamping
    expected = torch.zeros(3, 32, 32)
    expected[:, 8:24] = resized
    assert torch.allclose(out, (expected - MEAN) / STD, atol=1e-6)
    white = (1 - MEAN) / STD
    assert (out[:, 8:24] > white + 1e-3).any()  # a PIL (uint8) resize could never exceed pure white


def test_hps_flat_colour_is_exact_after_resize_and_pad():
    out = pad_to_square(Image.new("RGB", (100, 60), (200, 100, 50)), 50)  # -> 50x30, rows 10..39
    colour = (torch.tensor([200.0, 100.0, 50.0]).view(3, 1, 1) / 255 - MEAN) / STD
    assert torch.allclose(out[:, 10:40], colour.expand(3, 30, 50), atol=1e-5)
    assert torch.allclose(out[:, :10], (-MEAN / STD).expand(3, 10, 50), atol=1e-6)


# --- the LAION aesthetic head ------------------------------------------------------------------------------------

REAL_HEAD = Path(os.environ.get(
    "SMPO_AESTHETIC_HEAD",
    Path(__file__).resolve().parents[2].parent / "shared" / "data" / "aesthetic" / "sac+logos+ava1-l14-linearMSE.pth",
))


@pytest.mark.skipif(not REAL_HEAD.is_file(), reason=f"real aesthetic head not found at {REAL_HEAD}")
def test_aesthetic_head_file_stores_cuda_tensors():
    # The file in the improved-aesthetic-predictor repository (sha256 21dd590f...f0e0, the one in shared/data).
    with zipfile.ZipFile(REAL_HEAD) as archive:
        pickle_bytes = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    assert b"cuda:0" in pickle_bytes  # so it must be read with map_location="cpu" on a CPU machine
    state = torch.load(REAL_HEAD, map_location="cpu", weights_only=True)
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        "layers.0.weight": (1024, 768), "layers.0.bias": (1024,), "layers.2.weight": (128, 1024), "layers.2.bias": (128,),
        "layers.4.weight": (64, 128), "layers.4.bias": (64,), "layers.6.weight": (16, 64), "layers.6.bias": (16,),
        "layers.7.weight": (1, 16), "layers.7.bias": (1,)}


# --- the aesthetic embedding: transformers' image_embeds is OpenAI CLIP's encode_image ----------------------------
# OpenAI CLIP's VisionTransformer: conv1 (no bias), [class_embedding; patches] + positional_embedding, ln_pre,
# resblocks (QuickGELU MLP), ln_post on the class token, @ proj. The improved-aesthetic-predictor then L2-normalises
# encode_image's output before its head.

def _openai_encode_image(model, pixels: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's image forward written from its layout, on the weights of a transformers vision model."""
    sd, config = model.state_dict(), model.config
    width, heads = config.hidden_size, config.num_attention_heads

    def ln(x, name):
        return F.layer_norm(x, (width,), sd[name + ".weight"], sd[name + ".bias"], eps=config.layer_norm_eps)

    x = F.conv2d(pixels, sd["vision_model.embeddings.patch_embedding.weight"], stride=config.patch_size)
    x = x.flatten(2).transpose(1, 2)
    cls = sd["vision_model.embeddings.class_embedding"].expand(len(x), 1, width)
    x = ln(torch.cat([cls, x], 1) + sd["vision_model.embeddings.position_embedding.weight"], "vision_model.pre_layrnorm")
    for i in range(config.num_hidden_layers):
        p = f"vision_model.encoder.layers.{i}."
        attention = torch.nn.MultiheadAttention(width, heads, batch_first=True)
        attention.load_state_dict({
            "in_proj_weight": torch.cat([sd[p + f"self_attn.{n}_proj.weight"] for n in "qkv"]),
            "in_proj_bias": torch.cat([sd[p + f"self_attn.{n}_proj.bias"] for n in "qkv"]),
            "out_proj.weight": sd[p + "self_attn.out_proj.weight"], "out_proj.bias": sd[p + "self_attn.out_proj.bias"]})
        h = ln(x, p + "layer_norm1")
        x = x + attention(h, h, h, need_weights=False)[0]
        h = F.linear(ln(x, p + "layer_norm2"), sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])
        x = x + F.linear(h * torch.sigmoid(1.702 * h), sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])  # QuickGELU
    return ln(x[:, 0], "vision_model.post_layernorm") @ sd["visual_projection.weight"].T


def test_aesthetic_backbone_embedding_is_openai_encode_image(tiny_scorer, images):
    scorer = tiny_scorer("aesthetic")
    assert scorer.backbone.config.hidden_act == "quick_gelu"  # as OpenAI CLIP ViT-L/14 (transformers' CLIP default)
    pixels = scorer.pixel_values(images)
    with torch.no_grad():
        expected = F.normalize(_openai_encode_image(scorer.backbone, pixels), dim=-1)
        assert torch.allclose(scorer.image_embeddings(images), expected, atol=1e-5)


# --- checkpoint files: HPS v2's loader reads checkpoint["state_dict"] (no "module." prefix, loaded strictly) ------

def test_state_dict_unwrapped_and_unsafe_pickles_refused_with_a_way_out(tmp_path):
    import argparse

    from smpo.rewards.base import read_state_dict

    weights = {"logit_scale": torch.tensor(4.6052), "visual.proj": torch.ones(2, 3)}
    torch.save({"state_dict": weights, "epoch": 1, "name": "hps"}, tmp_path / "plain.pt")
    assert set(read_state_dict(tmp_path / "plain.pt")) == {"logit_scale", "visual.proj"}
    torch.save({"state_dict": weights, "args": argparse.Namespace(lr=1e-5)}, tmp_path / "with-args.pt")
    with pytest.raises(ValueError, match=r"(?s)with-args.pt as a weights-only torch checkpoint .*re-save its tensors once"):
        read_state_dict(tmp_path / "with-args.pt")


# --- ImageReward's text encoder: BLIP med.py's BertModel in "multimodal" mode, written out from its layout ---------
# embeddings = LayerNorm(word + position); each layer: bidirectional self-attention (padding masked), residual
# + LayerNorm; cross-attention to every image token, residual + LayerNorm; GELU feed-forward, residual + LayerNorm.

def _med_text_encoder(state: dict, ids: torch.Tensor, mask: torch.Tensor, image: torch.Tensor, heads: int = 2,
                      causal: bool = False):
    t = "blip.text_encoder."

    def ln(x, name):
        return F.layer_norm(x, (x.shape[-1],), state[name + ".weight"], state[name + ".bias"], eps=1e-12)

    def lin(x, name):
        return F.linear(x, state[name + ".weight"], state[name + ".bias"])

    def attention(x, context, prefix, bias):
        def split(y):
            return y.view(y.shape[0], y.shape[1], heads, -1).transpose(1, 2)

        q, k, v = split(lin(x, prefix + "self.query")), split(lin(context, prefix + "self.key")), split(lin(context, prefix + "self.value"))
        weights = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + bias).softmax(-1)
        out = (weights @ v).transpose(1, 2).reshape(x.shape)
        return ln(lin(out, prefix + "output.dense") + x, prefix + "output.LayerNorm")

    x = state[t + "embeddings.word_embeddings.weight"][ids] + state[t + "embeddings.position_embeddings.weight"][: ids.shape[1]]
    x = ln(x, t + "embeddings.LayerNorm")
    text_bias = (1.0 - mask[:, None, None, :].float()) * -10000.0  # no causal part: the encoder is bidirectional
    if causal:  # BLIP's decoder mode, for contrast only
        text_bias = text_bias + torch.full((ids.shape[1], ids.shape[1]), -10000.0).triu(1)
    for i in range(12):
        p = f"{t}encoder.layer.{i}."
        x = attention(x, x, p + "attention.", text_bias)
        x = attention(x, image, p + "crossattention.", 0.0)
        x = ln(lin(F.gelu(lin(x, p + "intermediate.dense")), p + "output.dense") + x, p + "output.LayerNorm")
    return x


def test_imagereward_text_encoder_matches_med_layout(imagereward_published):
    path, state = imagereward_published
    model = load_imagereward_checkpoint(path, heads=(2, 2))
    image_tokens = torch.randn(2, 197, V_WIDTH, generator=torch.Generator().manual_seed(2))
    ids = torch.tensor([[101, 1037, 4937, 102, 0, 0], [101, 1037, 2417, 3899, 2006, 102]])
    mask = (ids != 0).long()
    with torch.no_grad():
        got = model.text(input_ids=ids, attention_mask=mask, encoder_hidden_states=image_tokens,
                         encoder_attention_mask=torch.ones(2, 197, dtype=torch.long), is_decoder=False).last_hidden_state
        expected = _med_text_encoder(state, ids, mask, image_tokens)
    assert torch.allclose(got[:, 0], expected[:, 0], atol=1e-5)  # the [CLS] feature the head reads
    assert torch.allclose(got[mask.bool()], expected[mask.bool()], atol=1e-5)
    # The weights are large enough for the masks to matter: a causal or an unmasked encoder would not match.
    causal = _med_text_encoder(state, ids, mask, image_tokens, causal=True)
    unmasked = _med_text_encoder(state, ids, torch.ones_like(mask), image_tokens)
    assert (causal[:, 0] - expected[:, 0]).abs().max() > 0.05 and (unmasked[0, 0] - expected[0, 0]).abs().max() > 0.05
