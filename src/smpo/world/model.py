"""The miniature world's text-to-image model, built from the SD1.5 family's classes.

A ``StableDiffusionPipeline`` made of a diffusers ``UNet2DConditionModel``, a transformers
``CLIPTextModel`` with a word-level ``CLIPTokenizer`` over the grammar's words (made offline), an
``AutoencoderKL`` (32x32 RGB <-> 16x16x4 latents) and the SD1.5 ``DDIMScheduler``. Saved with
``save_pretrained`` it is an ordinary SD1.5 pipeline folder, so every SD1.5 code path loads it
unchanged. ``base_path()`` is the pretrained base shipped in the package (see ``base/README.md``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from smpo.world.grammar import vocabulary
from smpo.world.render import RESOLUTION

MAX_TOKENS = 16  # the longest prompt is 12 tokens with its start and end tokens

SCHEDULER: dict[str, Any] = dict(  # SD1.5's training schedule
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
)
UNET: dict[str, Any] = dict(
    sample_size=RESOLUTION // 2, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
    attention_head_dim=8, norm_num_groups=8,
)
VAE: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=RESOLUTION, layers_per_block=1,
    block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2, mid_block_add_attention=False,
    up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
)
TEXT: dict[str, Any] = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            projection_dim=32, max_position_embeddings=MAX_TOKENS)


def base_path() -> Path:
    """The pretrained base pipeline folder shipped inside the package."""
    return Path(__file__).with_name("base")


def make_word_tokenizer(folder: str | Path | None = None):
    """A ``CLIPTokenizer`` whose merges spell each grammar word (and ",") as one token.

    CLIP's BPE splits a word into characters, the last one marked ``</w>``, then applies merges;
    one merge chain per word rebuilds the word. BPE applies the lowest-ranked merge first, so the
    chains of longer words come first: a short word's merge (say "t o" of "top") must not fire
    inside a longer word ("bottom") before that word's own chain. Unknown words fall back to
    characters (or the unknown token), so any text tokenizes.
    """
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    merges: list[tuple[str, str]] = []

    def add(token: str) -> None:
        vocab.setdefault(token, len(vocab))

    for word in sorted([*vocabulary(), ","], key=lambda w: (-len(w), w)):
        symbols = [*word[:-1], word[-1] + "</w>"]
        for symbol in symbols:
            add(symbol)
        current = symbols[0]
        for symbol in symbols[1:]:
            if (current, symbol) not in merges:
                merges.append((current, symbol))
            current += symbol
            add(current)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)
    if folder is not None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(folder)
    return tokenizer


def build_world_pipeline(seed: int = 0):
    """A world ``StableDiffusionPipeline`` with random weights (``seed`` fixes them)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = make_word_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        **TEXT, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    return StableDiffusionPipeline(
        vae=AutoencoderKL(**VAE, scaling_factor=1.0), text_encoder=text_encoder, tokenizer=tokenizer,
        unet=UNet2DConditionModel(**UNET), scheduler=DDIMScheduler(**SCHEDULER), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)


def load_world_pipeline(path: str | Path | None = None, *, device: str | torch.device = "cpu"):
    """Load a world pipeline folder (default: the shipped base) with ``StableDiffusionPipeline``."""
    from diffusers import StableDiffusionPipeline

    folder = Path(path) if path is not None else base_path()
    if not (folder / "model_index.json").exists():
        raise FileNotFoundError(f"{folder} is not a diffusers pipeline folder (no model_index.json); "
                                "make one with `smpo world pretrain --output DIR`")
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
