"""Pretrain the world's base model on rendered images: ``smpo world pretrain``.

Two stages, both on renders of the TRAIN prompts only (the held-out prompts stay unseen):

1. the VAE learns to reconstruct renders (mean squared error plus a small KL term), and its
   ``scaling_factor`` is set so that latents have unit variance, as SD1.5's is;
2. the UNet and the text encoder learn to predict the noise (the usual epsilon objective, with
   10% of captions dropped so that classifier-free guidance works).

Few steps give a deliberately imperfect base: its samples are often right, often wrong in
colour, shape or place, or blurry, which leaves room for preference fine-tuning.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from smpo.io import atomic_path, write_json
from smpo.world.grammar import split
from smpo.world.model import build_world_pipeline
from smpo.world.render import render


@dataclass(frozen=True)
class PretrainConfig:
    """Settings of ``smpo world pretrain`` (the shipped base uses the defaults, see base/README.md)."""

    seed: int = 0
    steps: int = 3000  # UNet + text encoder optimizer steps
    vae_steps: int = 400  # VAE optimizer steps (first stage)
    batch_size: int = 32
    learning_rate: float = 5e-4
    vae_learning_rate: float = 1e-3
    kl_weight: float = 1e-6
    empty_prompt_share: float = 0.1  # captions replaced by "" (classifier-free guidance)
    pool_size: int = 4096  # renders encoded once for the UNet stage


def to_tensor(images: list) -> torch.Tensor:
    """PIL images -> ``[B, 3, H, W]`` in [-1, 1]."""
    arrays = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2) / 127.5 - 1.0


def _renders(prompts: list[str], rng: np.random.Generator) -> torch.Tensor:
    return to_tensor([render(p, rng=rng) for p in prompts])


def train_vae(vae, cfg: PretrainConfig, rng: np.random.Generator, prompts: list[str],
              device: torch.device = torch.device("cpu")) -> None:
    """Stage 1; sets ``vae.config.scaling_factor`` to 1 / (std of the latents)."""
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_learning_rate)
    for _ in (bar := tqdm(range(cfg.vae_steps), desc="pretrain vae", leave=False)):
        x = _renders(list(rng.choice(prompts, cfg.batch_size)), rng).to(device)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(recon, x) + cfg.kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        latents = vae.encode(_renders(list(rng.choice(prompts, 256)), rng).to(device)).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))


def train_denoiser(pipe, cfg: PretrainConfig, rng: np.random.Generator, prompts: list[str],
                   device: torch.device = torch.device("cpu")) -> None:
    """Stage 2: epsilon prediction on a pool of encoded renders (UNet and text encoder train)."""
    vae, unet, text_encoder, tokenizer, scheduler = (pipe.vae, pipe.unet, pipe.text_encoder, pipe.tokenizer,
                                                     pipe.scheduler)
    captions = list(rng.choice(prompts, cfg.pool_size))
    with torch.no_grad():
        moments = torch.cat([vae.encode(_renders(captions[i:i + 256], rng).to(device)).latent_dist.parameters
                             for i in range(0, cfg.pool_size, 256)])
    scale = vae.config.scaling_factor
    unet.train()
    text_encoder.train()
    opt = torch.optim.AdamW([*unet.parameters(), *text_encoder.parameters()], lr=cfg.learning_rate)
    alphas_cumprod = scheduler.alphas_cumprod.to(device)
    gen = torch.Generator().manual_seed(cfg.seed)
    for _ in (bar := tqdm(range(cfg.steps), desc="pretrain unet", leave=False)):
        idx = torch.from_numpy(rng.integers(0, cfg.pool_size, cfg.batch_size)).to(device)
        mean, logvar = moments[idx].chunk(2, dim=1)
        # Noise is drawn on the CPU from one seeded generator, whatever the device.
        x0 = (mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=gen).to(device)) * scale
        text = ["" if rng.random() < cfg.empty_prompt_share else captions[i] for i in idx.tolist()]
        ids = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        t = torch.randint(0, len(alphas_cumprod), (cfg.batch_size,), generator=gen).to(device)
        eps = torch.randn(x0.shape, generator=gen).to(device)
        abar = alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
        pred = unet(x_t, t, text_encoder(ids)[0]).sample
        loss = F.mse_loss(pred, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    unet.eval()
    text_encoder.eval()


def pretrain(output: str | Path, cfg: PretrainConfig = PretrainConfig(), *, device: str | torch.device = "cpu"):
    """Build a random world pipeline, train it (both stages) on ``device``, save it to ``output``
    (on the CPU, in float32); return it."""
    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    prompts = split("train")
    pipe = build_world_pipeline(seed=cfg.seed).to(device)
    if cfg.vae_steps > 0:
        train_vae(pipe.vae, cfg, rng, prompts, device)
    if cfg.steps > 0:
        train_denoiser(pipe, cfg, rng, prompts, device)
    pipe.to("cpu")
    with atomic_path(output) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        write_json(Path(tmp) / "pretrain.json", {**asdict(cfg), "device": device.type,
                                                  "torch": torch.__version__})
    return pipe


def load_pretrain_config(folder: str | Path) -> PretrainConfig:
    """The settings a pipeline folder was pretrained with (its ``pretrain.json``)."""
    recorded = json.loads((Path(folder) / "pretrain.json").read_text())
    return PretrainConfig(**{k: v for k, v in recorded.items() if k in PretrainConfig.__dataclass_fields__})
