"""Training compute of a bench cell, counted: UNet forward-equivalents and images sampled per optimizer step.

`probe` builds the method's trainer on its own config (a scratch output directory), counts the rows of every UNet call
it makes (`Models._run`: policy, reference, teacher, sampling) over one optimizer step, or over one rollout round and
the steps that train it for an online method, and divides by the steps. A row with gradient counts 3 (its backward
costs about two forwards), a row without 1, the unit of `benchmarks/online_step_cost.py` (a toy Diffusion-DPO step,
16 pairs: 3·32 + 32 = 128). `totals` multiplies by the run's optimizer steps: the cell's compute (an offline cell also
leans on the shared synthetic data, whose images the bench counts once). The bench stores each probe by content key.
"""

from __future__ import annotations

import tempfile

import torch

from diffalign.config import Config, validate_config


class RowCounter:
    """Counts the rows of every UNet call a trainer's `Models` makes: with gradient (trained) and without."""

    def __init__(self, models):
        self.rows = {"with_grad": 0, "no_grad": 0}
        run = models._run

        def counted(unet, x_t, t, cond):
            self.rows["with_grad" if torch.is_grad_enabled() else "no_grad"] += x_t.shape[0]
            return run(unet, x_t, t, cond)

        models._run = counted

    @property
    def forward_equivalents(self) -> int:
        return self.rows["no_grad"] + 3 * self.rows["with_grad"]


def probe(cfg: Config) -> dict:
    """Per optimizer step of `cfg`: UNet forward-equivalents, the rows behind them, and images sampled (online rounds)."""
    from diffalign.trainers.loop import PreferenceTrainer

    with tempfile.TemporaryDirectory() as tmp:
        raw = cfg.model_dump(mode="json")
        raw["train"]["output_dir"] = tmp
        raw["log"].update(progress=False, tracker="none")
        raw["eval"]["validation_every"] = 0
        trainer = PreferenceTrainer(validate_config(raw, origin="compute probe"))
        trainer.setup()
        counter = RowCounter(trainer.models)
        steps = trainer.feed.steps_per_round if trainer.feed is not None else 1  # an online round and the steps it trains
        for _ in range(steps):
            trainer.optimizer_step()
        images = trainer.feed.round_size / steps if trainer.feed is not None else 0.0
    return {"forward_equivalents_per_step": counter.forward_equivalents / steps,
            "rows_per_step": {k: v / steps for k, v in counter.rows.items()}, "images_per_step": images, "probe_steps": steps}


def totals(per_step: dict, steps: int, train_seconds: float) -> dict:
    """A cell's training compute: `probe`'s per-step counts times its optimizer `steps`, and its wall time."""
    return {"steps": steps, "forward_equivalents": per_step["forward_equivalents_per_step"] * steps,
            "images_sampled": per_step["images_per_step"] * steps, "train_seconds": train_seconds, "per_step": per_step}
