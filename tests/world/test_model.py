import json

import pytest
import torch

from smpo.cli import main
from smpo.world.grammar import split
from smpo.world.model import base_path, build_world_pipeline, load_world_pipeline, make_word_tokenizer
from smpo.world.reward import load_world_scorer


def test_word_tokenizer_gives_one_token_per_word(tmp_path):
    tokenizer = make_word_tokenizer(tmp_path / "tok")
    prompt = "a small red circle on the left, white background"
    ids = tokenizer(prompt).input_ids
    # <start> + 9 words + "," + <end>
    assert len(ids) == 12
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens[1:4] == ["a</w>", "small</w>", "red</w>"] and tokens[8] == ",</w>"
    from transformers import CLIPTokenizer

    assert CLIPTokenizer.from_pretrained(tmp_path / "tok")(prompt).input_ids == ids
    longest = max(split("all"), key=lambda p: len(tokenizer(p).input_ids))
    assert len(tokenizer(longest).input_ids) <= tokenizer.model_max_length


def test_random_world_pipeline_saves_and_loads_as_sd15(tmp_path):
    from diffusers import StableDiffusionPipeline

    build_world_pipeline(seed=0).save_pretrained(tmp_path / "pipe", safe_serialization=True)
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "pipe")
    assert pipe.vae_scale_factor == 2 and pipe.unet.config.sample_size == 16
    image = pipe("a small red circle on the left, white background", num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)


def test_shipped_base_loads_with_stable_diffusion_pipeline():
    from diffusers import StableDiffusionPipeline

    folder = base_path()
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    sizes = sum(f.stat().st_size for f in folder.rglob("*.safetensors"))
    assert sizes < 8_000_000
    recipe = json.loads((folder / "pretrain.json").read_text())
    assert recipe["seed"] == 0
    image = load_world_pipeline()("a large blue square in the center, gray background", num_inference_steps=4,
                                  generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)


def _mean_reward(pipe, prompts, steps=8):
    pipe.set_progress_bar_config(disable=True)
    images = pipe(prompts, num_inference_steps=steps, guidance_scale=3.0,
                  generator=[torch.Generator().manual_seed(i) for i in range(len(prompts))]).images
    return load_world_scorer()(images, prompts).mean().item()


def test_shipped_base_beats_its_random_initialisation():
    """The shipped command's output (3000 steps) against the weights it started from (same seed)."""
    prompts = split("held_out")[:24]
    before = _mean_reward(build_world_pipeline(seed=0), prompts)
    after = _mean_reward(load_world_pipeline(), prompts)
    print(f"world reward: random init {before:.3f}, shipped base {after:.3f}")
    assert after > before + 0.2, (before, after)


def test_short_pretraining_lowers_reconstruction_and_denoising_errors(tmp_path, cli_error):
    """A few steps of the shipped command, through the CLI: both stages learn, and the recipe is saved."""
    import numpy as np

    from smpo.world.pretrain import load_pretrain_config, to_tensor
    from smpo.world.render import render

    out = tmp_path / "base"
    assert main(["world", "pretrain", "--output", str(out), "--seed", "0", "--steps", "30", "--vae-steps", "40",
                 "--batch-size", "8", "--pool-size", "64", "--device", "cpu"]) == 0
    recipe = load_pretrain_config(out)
    assert (recipe.steps, recipe.vae_steps, recipe.batch_size, recipe.seed) == (30, 40, 8, 0)
    random_pipe, trained = build_world_pipeline(seed=0), load_world_pipeline(out)
    rng = np.random.default_rng(123)
    x = to_tensor([render(p, rng=rng) for p in split("held_out")[:16]])
    with torch.no_grad():
        def reconstruction_error(vae):
            return torch.nn.functional.mse_loss(vae.decode(vae.encode(x).latent_dist.mean).sample, x).item()

        assert reconstruction_error(trained.vae) < 0.5 * reconstruction_error(random_pipe.vae)
        scale = trained.vae.config.scaling_factor
        assert scale != 1.0  # set to 1 / std of the latents
        x0 = trained.vae.encode(x).latent_dist.mean * scale
        gen = torch.Generator().manual_seed(0)
        t = torch.randint(0, 1000, (16,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        abar = trained.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
        ids = trained.tokenizer(split("held_out")[:16], padding="max_length", return_tensors="pt").input_ids

        def denoising_error(pipe):
            return torch.nn.functional.mse_loss(pipe.unet(x_t, t, pipe.text_encoder(ids)[0]).sample, eps).item()

        assert denoising_error(trained) < 0.8 * denoising_error(random_pipe)
    # an existing output is refused without --overwrite
    assert "pass --overwrite" in cli_error(["world", "pretrain", "--output", str(out), "--steps", "1", "--vae-steps", "1"])


@pytest.mark.slow  # about 8 minutes on one CPU thread; `pytest -m "not slow"` leaves it out
def test_pretraining_from_the_shipped_command_raises_the_world_reward(tmp_path):
    """The shipped command cut to 800 UNet steps (a quarter) raises the held-out world reward over
    its random initialisation (CPU, one thread: 0.142 -> 0.222 at 20 DDIM steps, CFG 3; H200: 0.14 -> 0.23)."""
    out = tmp_path / "base"
    assert main(["world", "pretrain", "--output", str(out), "--seed", "0", "--steps", "800", "--device", "cpu"]) == 0
    prompts = split("held_out")[:24]
    before = _mean_reward(build_world_pipeline(seed=0), prompts, steps=20)
    after = _mean_reward(load_world_pipeline(out), prompts, steps=20)
    print(f"world reward: random init {before:.3f}, after 800 pretraining steps {after:.3f}")
    assert after > before + 0.05, (before, after)


def test_every_grammar_word_is_a_single_token():
    from smpo.world.grammar import vocabulary

    tokenizer = make_word_tokenizer()
    for word in vocabulary():
        assert tokenizer.convert_ids_to_tokens(tokenizer(word).input_ids) == [
            "<|startoftext|>", f"{word}</w>", "<|endoftext|>"], word
