"""`diffalign toy pretrain`: train the toy pipeline from scratch on procedural scenes, on a CPU.

Stage 1 trains the VAE to reconstruct 32 px scenes (MSE + a small KL term, as LDM autoencoders), then sets
its ``scaling_factor`` to 1 / std of the latents. Stage 2 trains the UNet and both text encoders jointly on
those latents with the ε-prediction objective of DDPM, 10% empty captions (for classifier-free guidance)
and an EMA of the weights, which is what is saved. Only `scenes.TRAIN` captions are seen; `HELD_OUT`
captions stay unseen for evaluation. Reproducible by seed on the same platform and thread count.
"""

from __future__ import annotations

import copy
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from diffalign.diffusion import add_noise
from diffalign.models.loading import Components
from diffalign.toy.model import RESOLUTION, save_toy_weights, toy_pipeline
from diffalign.toy.scenes import TRAIN, render, sample_scene


@dataclass
class PretrainConfig:
    seed: int = 0
    vae_steps: int = 1500
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    unet_steps: int = 6000
    unet_lr: float = 3e-4
    warmup: int = 200
    batch: int = 64
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    threads: int = 2


def scene_batch(rng: random.Random, n: int) -> tuple[torch.Tensor, list[str]]:
    """n random training scenes as (n, 3, 32, 32) in [-1, 1] and their captions."""
    specs = [rng.choice(TRAIN) for _ in range(n)]
    seeds = [rng.randrange(1 << 30) for _ in range(n)]
    arr = np.stack([np.asarray(render(sample_scene(s, k), RESOLUTION)) for s, k in zip(specs, seeds)])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, [s.caption for s in specs]


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + np.cos(np.pi * (step - warmup) / max(1, total - warmup)))


def train_vae(pipe, cfg: PretrainConfig, rng: random.Random, progress: bool) -> dict:
    vae = pipe.vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, cfg.vae_steps, 100))
    bar = tqdm(range(cfg.vae_steps), desc="toy VAE", disable=not progress)
    for _ in bar:
        x, _ = scene_batch(rng, cfg.batch)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        rec = (recon - x).pow(2).mean()
        loss = rec + cfg.kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(rec=f"{rec.item():.4f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        x, _ = scene_batch(rng, 512)
        std = vae.encode(x).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    return {"vae_reconstruction_mse": rec.item(), "latent_std": std}


def train_denoiser(pipe, cfg: PretrainConfig, rng: random.Random, progress: bool) -> dict:
    modules = [pipe.unet, pipe.text_encoder, pipe.text_encoder_2]
    for m in modules:
        m.train().requires_grad_(True)
    params = [p for m in modules for p in m.parameters()]
    ema = [copy.deepcopy(m).requires_grad_(False) for m in modules]
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, cfg.unet_steps, cfg.warmup))
    components = Components("sdxl", pipe.unet, pipe.vae, [pipe.text_encoder, pipe.text_encoder_2], [pipe.tokenizer, pipe.tokenizer_2],
                            pipe.scheduler, "epsilon", "toy")
    alphas = pipe.scheduler.alphas_cumprod.float()
    time_ids = torch.tensor([[RESOLUTION, RESOLUTION, 0, 0, RESOLUTION, RESOLUTION]], dtype=torch.float32)
    gen = torch.Generator().manual_seed(cfg.seed)
    bar = tqdm(range(cfg.unet_steps), desc="toy UNet + text encoders", disable=not progress)
    running = None
    for _ in bar:
        x, captions = scene_batch(rng, cfg.batch)
        captions = ["" if rng.random() < cfg.caption_dropout else c for c in captions]
        with torch.no_grad():
            z = pipe.vae.encode(x).latent_dist.sample(generator=gen) * pipe.vae.config.scaling_factor
        embeds, pooled = _encode(components, captions)
        noise = torch.randn(z.shape, generator=gen)
        t = torch.randint(0, alphas.numel(), (z.shape[0],), generator=gen)
        pred = pipe.unet(add_noise(z, noise, t, alphas), t, encoder_hidden_states=embeds,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.expand(z.shape[0], -1)}).sample
        loss = (pred - noise).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for live, avg in zip(modules, ema):
                for p, q in zip(live.parameters(), avg.parameters()):
                    q.lerp_(p, 1 - cfg.ema_decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.set_postfix(loss=f"{running:.4f}")
    pipe.unet, pipe.text_encoder, pipe.text_encoder_2 = (m.eval() for m in ema)
    return {"denoising_loss_ema": running}


def _encode(components: Components, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """`encode_prompts` with gradients (the text encoders train jointly with the UNet)."""
    hidden, pooled = [], None
    for tokenizer, encoder in zip(components.tokenizers, components.text_encoders):
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = getattr(out, "text_embeds", None)
    return torch.cat(hidden, dim=-1), pooled


def pretrain(out: str | Path, cfg: PretrainConfig = PretrainConfig(), progress: bool = True) -> Path:
    """Train the toy pipeline and write its fp16 weights (plus ``pretrain.json``) to `out`."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    pipe = toy_pipeline(cfg.seed)
    started = time.perf_counter()
    report = {"config": asdict(cfg)}
    report.update(train_vae(pipe, cfg, rng, progress))
    report["vae_seconds"] = time.perf_counter() - started
    report.update(train_denoiser(pipe, cfg, rng, progress))
    report["seconds"] = time.perf_counter() - started
    save_toy_weights(pipe, out)
    (Path(out) / "pretrain.json").write_text(json.dumps(report, indent=2) + "\n")
    return Path(out)
