"""Method adapters: what each objective needs from the loop, and how its loss is formed from errors.

The loop reads the declaration (`needs_reference`, `uses_loser`) instead of branching on method names;
the losses themselves are the pure functions of `diffalign.objectives`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from diffalign.config import DPOMethod, SFTMethod
from diffalign.objectives import dpo_loss, sft_loss

Metrics = dict[str, torch.Tensor]


@dataclass(frozen=True)
class PairMethod:
    """An offline objective on (winner, loser) errors under shared t and ε."""

    name: str
    needs_reference: bool
    uses_loser: bool
    compute: Callable[..., tuple[torch.Tensor, Metrics]]


def _dpo(beta: float):
    def compute(model_err_w, model_err_l, ref_err_w, ref_err_l, label):
        out = dpo_loss(model_err_w, model_err_l, ref_err_w, ref_err_l, beta=beta, label=label)
        z = out.logits.detach()
        return out.loss, {
            "loss": out.loss.detach(),
            "implicit_acc": ((z > 0).float() + 0.5 * (z == 0).float()).mean(),
            "reward_margin": z.mean(),
            "model_mse": 0.5 * (model_err_w.detach().mean() + model_err_l.detach().mean()),
            "ref_mse": 0.5 * (ref_err_w.mean() + ref_err_l.mean()),
        }

    return compute


def _sft(model_err_w, model_err_l, ref_err_w, ref_err_l, label):
    loss = sft_loss(model_err_w)
    return loss, {"loss": loss.detach(), "model_mse": model_err_w.detach().mean()}


def build_method(cfg: DPOMethod | SFTMethod) -> PairMethod:
    if isinstance(cfg, DPOMethod):
        return PairMethod("dpo", needs_reference=True, uses_loser=True, compute=_dpo(cfg.beta))
    if isinstance(cfg, SFTMethod):
        return PairMethod("sft", needs_reference=False, uses_loser=False, compute=_sft)
    raise ValueError(f"method {cfg.name!r} has no trainer adapter yet")
