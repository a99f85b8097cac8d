"""ImageReward on transformers' BLIP classes: formula, prompt handling and the published key layout."""

import pytest
import torch
import torch.nn.functional as F

from smpo.rewards import load_scorer
from smpo.rewards.imagereward import MAX_PROMPT_TOKENS, REWARD_MEAN, REWARD_STD, tiny_imagereward_parts
from smpo.rewards.preprocess import clip_center_crop


def test_normalisation_constants():
    assert (MAX_PROMPT_TOKENS, REWARD_MEAN, REWARD_STD) == (35, 0.16717362830052426, 1.0333394966054072)


def test_score_by_hand(tiny_scorer, images, prompts):
    scorer = tiny_scorer("imagereward")
    model = scorer.model
    pixels = torch.stack([clip_center_crop(image, 32) for image in images])
    tokens = scorer.tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert tokens["input_ids"].shape == (5, 35)
    assert (tokens["input_ids"][:, 0] == scorer.tokenizer.cls_token_id).all()
    with torch.no_grad():
        image_tokens = model.vision(pixel_values=pixels).last_hidden_state  # [5, 1 + 16 patches, 32]
        assert image_tokens.shape == (5, 17, 32)
        text = model.text(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                          encoder_hidden_states=image_tokens, encoder_attention_mask=torch.ones(5, 17, dtype=torch.long),
                          is_decoder=False).last_hidden_state
        y = text[:, 0]
        for index in (0, 2, 4, 6, 7):
            y = F.linear(y, model.head.layers[index].weight, model.head.layers[index].bias)
    expected = (y.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072
    scores = scorer(images, prompts)
    assert torch.allclose(scores, expected, atol=1e-5)
    assert scores.std() > 1e-3


def test_text_encoder_is_bidirectional_and_sees_the_image(tiny_scorer, images):
    scorer = tiny_scorer("imagereward")
    image = images[:1]
    # With a causal mask the [CLS] feature could not see the words after it; here it must.
    assert scorer(image, ["a red cat"]) != scorer(image, ["a red dog"])
    assert scorer(images[:1], ["a cat"]) != scorer(images[1:2], ["a cat"])


def test_prompt_truncated_to_35_tokens(tiny_scorer, images):
    scorer = tiny_scorer("imagereward")
    long = "a cat " * 40
    ids = scorer.tokens([long])["input_ids"][0]
    assert ids.shape == (35,) and ids[-1] == scorer.tokenizer.sep_token_id
    assert scorer(images[:1], [long]) == scorer(images[:1], [long + " red dog photo"])


def test_same_input_same_score_at_any_batch_size(tiny_scorer, images, prompts):
    scorer = tiny_scorer("imagereward")
    first = scorer(images, prompts)
    assert torch.equal(first, scorer(images, prompts))
    one_by_one = torch.cat([scorer(images[i:i + 1], prompts[i:i + 1]) for i in range(5)])
    assert torch.allclose(first, one_by_one, atol=1e-4, rtol=0)


def test_incomplete_folder(tmp_path):
    (tmp_path / "vision").mkdir()
    with pytest.raises(FileNotFoundError, match="not an ImageReward folder; missing text, tokenizer, head.safetensors"):
        load_scorer("imagereward", path=tmp_path)


# --- the published ImageReward.pt layout ---------------------------------------------------------------------

V_WIDTH, T_WIDTH, PATCH, IMAGE, LAYERS = 128, 128, 8, 32, 2  # default heads: 128 // 64 = 2 each


def published_state_dict(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under ImageReward.pt's names: BLIP ViT (timm names), BLIP BERT (med.py names), mlp."""
    from transformers import BlipTextConfig
    from transformers.models.blip.modeling_blip_text import BlipTextModel

    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.1):
        return torch.randn(*shape, generator=g) * scale

    sd = {"blip.visual_encoder.cls_token": r(1, 1, V_WIDTH), "blip.visual_encoder.pos_embed": r(1, 17, V_WIDTH),
          "blip.visual_encoder.patch_embed.proj.weight": r(V_WIDTH, 3, PATCH, PATCH),
          "blip.visual_encoder.patch_embed.proj.bias": r(V_WIDTH),
          "blip.visual_encoder.norm.weight": 1 + r(V_WIDTH), "blip.visual_encoder.norm.bias": r(V_WIDTH),
          "blip.vision_proj.weight": r(256, V_WIDTH), "blip.text_proj.weight": r(256, T_WIDTH),  # unused by scoring
          "blip.text_encoder.embeddings.position_ids": torch.arange(40).unsqueeze(0)}
    for i in range(LAYERS):
        p = f"blip.visual_encoder.blocks.{i}."
        sd.update({p + "norm1.weight": 1 + r(V_WIDTH), p + "norm1.bias": r(V_WIDTH),
                   p + "attn.qkv.weight": r(3 * V_WIDTH, V_WIDTH), p + "attn.qkv.bias": r(3 * V_WIDTH),
                   p + "attn.proj.weight": r(V_WIDTH, V_WIDTH), p + "attn.proj.bias": r(V_WIDTH),
                   p + "norm2.weight": 1 + r(V_WIDTH), p + "norm2.bias": r(V_WIDTH),
                   p + "mlp.fc1.weight": r(4 * V_WIDTH, V_WIDTH), p + "mlp.fc1.bias": r(4 * V_WIDTH),
                   p + "mlp.fc2.weight": r(V_WIDTH, 4 * V_WIDTH), p + "mlp.fc2.bias": r(V_WIDTH)})
    # med.py's BERT names are the ones transformers' BlipTextModel kept: take the names and shapes from it.
    shapes = BlipTextModel(BlipTextConfig(vocab_size=vocab, hidden_size=T_WIDTH, intermediate_size=4 * T_WIDTH,
                                          num_hidden_layers=LAYERS, num_attention_heads=2, max_position_embeddings=40,
                                          encoder_hidden_size=V_WIDTH, is_decoder=True), add_pooling_layer=False)
    for name, tensor in shapes.state_dict().items():
        if not name.endswith("position_ids"):
            sd["blip.text_encoder." + name] = 1 + r(*tensor.shape) if "LayerNorm.weight" in name else r(*tensor.shape)
    for index, (n_out, n_in) in zip((0, 2, 4, 6, 7), ((1024, T_WIDTH), (128, 1024), (64, 128), (16, 64), (1, 16))):
        sd[f"mlp.layers.{index}.weight"], sd[f"mlp.layers.{index}.bias"] = r(n_out, n_in), r(n_out)
    return sd


def reference_vit(sd: dict[str, torch.Tensor], pixels: torch.Tensor, heads: int = 2) -> torch.Tensor:
    """BLIP's (timm) ViT forward on the published names: pre-norm blocks, packed qkv, final LayerNorm eps 1e-6."""
    v = "blip.visual_encoder."

    def ln(x, name):
        return F.layer_norm(x, (V_WIDTH,), sd[name + ".weight"], sd[name + ".bias"], eps=1e-6)

    x = F.conv2d(pixels, sd[v + "patch_embed.proj.weight"], sd[v + "patch_embed.proj.bias"], stride=PATCH)
    x = torch.cat([sd[v + "cls_token"].expand(len(x), 1, V_WIDTH), x.flatten(2).transpose(1, 2)], 1) + sd[v + "pos_embed"]
    batch, length, _ = x.shape
    for i in range(LAYERS):
        p = f"{v}blocks.{i}."
        qkv = F.linear(ln(x, p + "norm1"), sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
        q, k, val = qkv.reshape(batch, length, 3, heads, V_WIDTH // heads).permute(2, 0, 3, 1, 4)
        attention = ((q @ k.transpose(-2, -1)) * (V_WIDTH // heads) ** -0.5).softmax(-1)
        out = (attention @ val).transpose(1, 2).reshape(batch, length, V_WIDTH)
        x = x + F.linear(out, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        h = F.gelu(F.linear(ln(x, p + "norm2"), sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]))
        x = x + F.linear(h, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
    return ln(x, v + "norm")


@pytest.fixture(scope="module")
def published_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imagereward-pt")
    _, tokenizer = tiny_imagereward_parts()
    tokenizer.save_pretrained(folder / "tokenizer")  # found beside the file, so no hub tokenizer is needed
    sd = published_state_dict(vocab=len(tokenizer))
    torch.save(sd, folder / "ImageReward.pt")
    return folder / "ImageReward.pt", sd


def test_published_layout_maps_onto_blip_classes(published_checkpoint, images, prompts):
    path, sd = published_checkpoint
    scorer = load_scorer("imagereward", path=path, device="cpu", batch_size=2)
    model = scorer.model
    assert model.vision.config.num_attention_heads == 2 and model.vision.config.layer_norm_eps == 1e-6
    pixels = scorer.pixel_values(images)
    with torch.no_grad():
        assert torch.allclose(model.vision(pixel_values=pixels).last_hidden_state, reference_vit(sd, pixels), atol=1e-4)
    for name in ("encoder.layer.1.crossattention.self.key.weight", "embeddings.word_embeddings.weight",
                 "encoder.layer.0.output.LayerNorm.bias"):
        assert torch.equal(model.text.state_dict()[name], sd["blip.text_encoder." + name])
    assert torch.equal(model.head.layers[7].weight, sd["mlp.layers.7.weight"])
    raw = torch.cat([model.raw_reward(pixels[i:i + 1], **scorer.tokens(prompts[i:i + 1])) for i in range(5)])
    assert torch.allclose(scorer(images, prompts), (raw - REWARD_MEAN) / REWARD_STD, atol=1e-4)


def test_published_layout_errors(published_checkpoint, tmp_path):
    _, sd = published_checkpoint
    broken = {k: v for k, v in sd.items() if k != "blip.text_encoder.encoder.layer.0.crossattention.self.key.weight"}
    torch.save(broken, tmp_path / "ImageReward.pt")
    (tmp_path / "tokenizer").symlink_to(published_checkpoint[0].parent / "tokenizer")
    with pytest.raises(ValueError, match=r"the text encoder weights do not fit; missing \['encoder.layer.0.crossattention"):
        load_scorer("imagereward", path=tmp_path / "ImageReward.pt")
    torch.save(dict(sd, **{"blip.visual_encoder.blocks.0.ls1.gamma": torch.ones(V_WIDTH)}), tmp_path / "ImageReward.pt")
    with pytest.raises(KeyError, match="blip.visual_encoder.blocks.0.ls1.gamma"):
        load_scorer("imagereward", path=tmp_path / "ImageReward.pt")
    torch.save({k: v for k, v in sd.items() if not k.startswith("mlp.")}, tmp_path / "ImageReward.pt")
    with pytest.raises(ValueError, match=r"no mlp.\* keys; is this an ImageReward checkpoint"):
        load_scorer("imagereward", path=tmp_path / "ImageReward.pt")
