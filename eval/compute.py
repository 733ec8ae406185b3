"""Training compute of a bench cell, counted: UNet forward-equivalents and images sampled per optimizer step.

A probe builds the method's trainer on its own config (a scratch output directory), counts the rows of every UNet call
it makes (`Models._run`: policy, reference, teacher, sampling) over one optimizer step, or over one rollout round and
the steps that train it for an online method, and divides by the steps. A row with gradient counts 3 (its backward
costs about two forwards), a row without 1, the unit of `benchmarks/online_step_cost.py` (a toy Diffusion-DPO step,
16 pairs: 3·32 + 32 = 128). Times the run's optimizer steps, that is the cell's compute; an offline cell also leans on
the shared synthetic data (its images are counted once, in the report's data section).

A probe result is stored under ``<cache_root>/compute/<key>.json``, keyed by the method's config without its seed (the
count does not depend on it), the package's source digest, `numerics()` and this module's source.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from diffalign.config import Config, validate_config
from diffalign.io import atomic_write_text


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


def cell_compute(cfg: Config, steps: int, train_seconds: float, root: Path, code: str) -> dict:
    """The cell's training compute: the probe's per-step counts (computed or reused) times its `steps`, and its wall time."""
    import sys

    from diffalign.eval.toybench import _digest, _locked, numerics

    dumped = cfg.model_dump(mode="json")
    dumped["train"] = {k: v for k, v in dumped["train"].items() if k not in ("output_dir", "seed")}
    dumped["data"].pop("cache_dir", None)
    key = _digest({"config": dumped, "code": code, "numerics": numerics(), "source": Path(sys.modules[__name__].__file__).read_text()})
    path = root / "compute" / f"{key}.json"
    with _locked(path.with_suffix(".lock")):
        if path.is_file():
            per_step = json.loads(path.read_text())
        else:
            per_step = probe(cfg)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(per_step, indent=2) + "\n")
    return {"steps": steps, "forward_equivalents": per_step["forward_equivalents_per_step"] * steps,
            "images_sampled": per_step["images_per_step"] * steps, "train_seconds": train_seconds, "per_step": per_step}
