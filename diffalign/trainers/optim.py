"""Optimizer and learning-rate schedule from `OptimConfig`."""

from __future__ import annotations

import torch
from diffusers.optimization import get_scheduler

from diffalign.config import ConfigError, OptimConfig


def effective_lr(cfg: OptimConfig, batch_size: int, grad_accum: int, num_processes: int) -> float:
    """The official `--scale_lr`: lr × batch × accumulation × processes."""
    return cfg.lr * batch_size * grad_accum * num_processes if cfg.scale_lr else cfg.lr


def build_optimizer(params: list[torch.nn.Parameter], cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        kernel = {"fused": True} if cfg.fused else {}
        return torch.optim.AdamW(params, lr=lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, **kernel)
    if cfg.fused:
        raise ConfigError(f"optim.fused applies to optim.optimizer = adamw, not {cfg.optimizer}")
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError("optim.optimizer = adamw8bit needs bitsandbytes: pip install 'diffalign[bnb]'") from None
        return bnb.optim.AdamW8bit(params, lr=lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    from transformers.optimization import Adafactor

    # As the official SDXL path: fixed lr (no relative step), no warmup init inside Adafactor.
    return Adafactor(params, lr=lr, weight_decay=cfg.weight_decay, relative_step=False, scale_parameter=False, warmup_init=False)


def build_lr_schedule(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int):
    """Stepped once per optimizer step (not once per process, unlike accelerate's prepared schedulers)."""
    return get_scheduler(cfg.schedule, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=max_steps)
