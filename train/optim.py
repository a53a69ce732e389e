"""AdamW and the learning-rate schedules (warmup + cosine, warmup-stable-decay, constant)."""
from __future__ import annotations

import math

import torch
from torch import nn

from train.config import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm gains and other 1-D tensors are not decayed).
    Fused on CUDA unless disabled; on CPU torch's foreach path is the fast one."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    fused = cfg.fused if cfg.fused is not None else device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             fused=fused or None, foreach=None if fused else True)


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Learning rate for optimizer step `step` (0-based). Warmup is linear from lr/warmup to lr;
    then cosine to min_lr, or (wsd) constant until the last `decay_fraction` of steps and linear
    down to min_lr, or constant."""
    lr, min_lr = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return lr
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.schedule == "cosine":
        return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    # wsd: stable, then linear decay over the last decay_fraction of the post-warmup steps
    decay_start = 1.0 - cfg.decay_fraction
    if progress <= decay_start or cfg.decay_fraction == 0:
        return lr
    return lr - (lr - min_lr) * (progress - decay_start) / cfg.decay_fraction


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
