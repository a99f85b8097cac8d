"""Architecture presets built from configs with random weights: no download needed.

``tiny`` is what tests and the CPU use; ``sd15`` and ``sdxl`` have the real architectures (for
benchmarks of speed and memory). The flow-matching families ``sd3`` and ``flux`` have a ``tiny``
preset (``SD3Transformer2DModel`` / ``FluxTransformer2DModel``, ``FlowMatchEulerDiscreteScheduler``,
CLIP and T5 encoders), sized after diffusers' own pipeline tests. Every preset is made of the same classes as the real checkpoints
(diffusers ``UNet2DConditionModel``/``AutoencoderKL``, transformers ``CLIPTextModel``...) and is
saved as an ordinary diffusers pipeline folder, so it loads through the exact code path that a
user's checkpoint takes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch

Family = Literal["sd15", "sdxl", "sd3", "flux"]
Preset = Literal["tiny", "sd15", "sdxl"]

_SCHEDULER = dict(  # the SD1.5 / SDXL training schedule
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
)

_UNET: dict[tuple[str, str], dict[str, Any]] = {
    ("sd15", "tiny"): dict(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4, norm_num_groups=16,
    ),
    ("sd15", "sd15"): dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8),
    ("sdxl", "tiny"): dict(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=64,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2), use_linear_projection=True, norm_num_groups=16,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
    ),
    ("sdxl", "sdxl"): dict(
        sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    ),
}

_VAE: dict[str, dict[str, Any]] = {
    "tiny": dict(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                 layers_per_block=1, sample_size=16),
    "real": dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2, sample_size=512),
}

_TEXT: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                 vocab_size=1000, projection_dim=32),
    "clip-l": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   vocab_size=49408, projection_dim=768, hidden_act="quick_gelu"),
    "clip-bigg": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                      vocab_size=49408, projection_dim=1280, hidden_act="gelu"),
}


def make_char_tokenizer(folder: str | Path, *, model_max_length: int = 77):
    """A ``CLIPTokenizer`` over single bytes (no merges), made offline and saved to ``folder``."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    chars = sorted(pre_tokenizers.ByteLevel.alphabet())  # the 256 byte-level symbols
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab.update({c: len(vocab) + i for i, c in enumerate(chars)})
    vocab.update({c + "</w>": len(vocab) + i for i, c in enumerate(chars)})
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)
    Path(folder).mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    return tokenizer


def make_char_t5_tokenizer(folder: str | Path, *, model_max_length: int = 32):
    """A ``T5TokenizerFast`` (unigram) over single characters, made offline and saved to ``folder``.

    The tiny flow presets' stand-in for T5's sentencepiece vocabulary (as ``make_char_tokenizer`` is
    CLIP's); ``model_max_length`` is the T5 sequence length the adapters and tests use.
    """
    import string

    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(c, -2.0) for c in string.ascii_letters + string.digits + string.punctuation]
    tokenizer = T5TokenizerFast(vocab=pieces, extra_ids=0)
    tokenizer.model_max_length = model_max_length
    Path(folder).mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    return tokenizer


FLOW_FAMILIES = ("sd3", "flux")

_FLOW_VAE = dict(  # diffusers' SD3/FLUX pipeline tests' VAE, with two blocks (a factor 2 down)
    in_channels=3, out_channels=3, block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
    use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
)
_TINY_T5 = dict(d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                is_encoder_decoder=False, use_cache=False)


def _flow_scheduler(family: Family):
    """SD3's training schedule: shift 3; FLUX.1-dev's: dynamic shifting by image size (shift 3 in training)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if family == "sd3":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                           base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                           max_image_seq_len=4096)


def _build_flow_pipeline(family: Family, preset: Preset, clip_tokenizer: Any, t5_tokenizer: Any):
    """A tiny ``StableDiffusion3Pipeline`` or ``FluxPipeline`` (random weights, 32 px images)."""
    from diffusers import (
        AutoencoderKL,
        FluxPipeline,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    if preset != "tiny":
        raise ValueError(f"no preset {preset!r} for family {family!r}; choose from ['tiny']")
    common = dict(max_position_embeddings=77, bos_token_id=clip_tokenizer.bos_token_id,
                  eos_token_id=clip_tokenizer.eos_token_id, pad_token_id=clip_tokenizer.pad_token_id)
    clip = dict(hidden_size=16, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, vocab_size=1000,
                projection_dim=16, hidden_act="gelu")
    t5 = T5EncoderModel(T5Config(**_TINY_T5, vocab_size=len(t5_tokenizer), pad_token_id=t5_tokenizer.pad_token_id,
                                 eos_token_id=t5_tokenizer.eos_token_id, decoder_start_token_id=0))
    scheduler = _flow_scheduler(family)
    if family == "sd3":
        vae = AutoencoderKL(**_FLOW_VAE, latent_channels=4, sample_size=32)
        # 16 + 16 CLIP states (concatenated, 32) = the T5 width = joint_attention_dim; pooled 16 + 16.
        transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4,
                                            num_layers=2, attention_head_dim=8, num_attention_heads=4,
                                            caption_projection_dim=32, joint_attention_dim=32,
                                            pooled_projection_dim=32, pos_embed_max_size=16)
        return StableDiffusion3Pipeline(
            transformer=transformer, scheduler=scheduler, vae=vae,
            text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**clip, **common)), tokenizer=clip_tokenizer,
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**clip, **common)), tokenizer_2=clip_tokenizer,
            text_encoder_3=t5, tokenizer_3=t5_tokenizer)
    # FLUX packs 2x2 latent patches: in_channels = 4 x the VAE's latent channels. The VAE's
    # sample_size is the family's training resolution (FLUX.1's VAE config says 1024).
    vae = AutoencoderKL(**_FLOW_VAE, latent_channels=4, sample_size=32)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=[4, 4, 8])
    return FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae,
                        text_encoder=CLIPTextModel(CLIPTextConfig(**clip, **common)), tokenizer=clip_tokenizer,
                        text_encoder_2=t5, tokenizer_2=t5_tokenizer)


def build_pipeline(family: Family = "sd15", preset: Preset = "tiny", *, seed: int = 0,
                   tokenizer_dir: str | Path | None = None):
    """A diffusers pipeline of ``family`` with the ``preset`` architecture and random weights."""
    import tempfile

    if family in FLOW_FAMILIES:
        torch.manual_seed(seed)
        root = Path(tokenizer_dir or tempfile.mkdtemp(prefix="smpo-tok-"))
        return _build_flow_pipeline(family, preset, make_char_tokenizer(root / "clip"),
                                    make_char_t5_tokenizer(root / "t5"))

    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if (family, preset) not in _UNET:
        raise ValueError(f"no preset {preset!r} for family {family!r}; "
                         f"choose from {sorted(p for f, p in _UNET if f == family)}")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**_UNET[family, preset])
    vae_cfg = dict(_VAE["tiny" if preset == "tiny" else "real"])
    vae = AutoencoderKL(**vae_cfg, scaling_factor=0.18215 if family == "sd15" else 0.13025)
    if family == "sdxl" and preset != "tiny":
        vae.register_to_config(force_upcast=True, sample_size=1024)
    tokenizer = make_char_tokenizer(tokenizer_dir or tempfile.mkdtemp(prefix="smpo-tok-"))
    scheduler = DDIMScheduler(**_SCHEDULER)
    text_1 = _TEXT["tiny" if preset == "tiny" else "clip-l"]
    common = dict(max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if family == "sd15":
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_1, **common))
        return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    text_2 = _TEXT["tiny" if preset == "tiny" else "clip-bigg"]
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_1, **common))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_2, **common))
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)


def save_pipeline(folder: str | Path, family: Family = "sd15", preset: Preset = "tiny", *, seed: int = 0) -> Path:
    """Build a preset pipeline and ``save_pretrained`` it to ``folder`` (safetensors)."""
    folder = Path(folder)
    pipe = build_pipeline(family, preset, seed=seed)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
