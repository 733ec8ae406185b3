"""Cost of the online methods: one rollout round and the optimizer steps that train it, per method, on the toy recipes.

Every method is a real `PreferenceTrainer` built from its toy recipe (`configs/toy/<method>.yaml`, `--set` overrides for
all); the UNet calls are counted by wrapping the trainer's `Models.policy` and `Models.reference` (rows per call, with
or without gradient). Reported per optimizer step, the round's sampling amortised over its steps:

- images/s of the rollout round (sampling, decoding and rewards: everything `OnlineFeed.collect` does),
- UNet row-forwards: sampling (no gradient; CFG doubles the rows), training (with gradient), reference (no gradient),
- "forward-equivalents": forwards + 3 × trained rows (a backward costs about two forwards), the unit the toy bench's
  equal-compute comparison uses; a Diffusion-DPO step of the toy recipe (16 pairs: 32 trained rows, 32 reference
  rows) is 3·32 + 32 = 128, 51,200 over its 400 steps,
- seconds per optimizer step (sampling share included). Absolute times are context only; counts are exact.

    OMP_NUM_THREADS=2 python benchmarks/online_step_cost.py --out benchmarks/results/online-step-cost-cpu.json
    python benchmarks/online_step_cost.py --methods grpo --set method.group_size=4 --set method.groups_per_round=2 --set train.batch_size=4
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

METHODS = ("pref_grpo", "grpo", "dense_online", "tailorpo")
DPO_STEP_FORWARD_EQUIVALENTS = 3 * 32 + 32  # toy/dpo: 16 pairs, policy forward + backward on 32 rows, reference on 32


class Counter:
    """Wraps a `Models` view and counts the rows of its UNet calls."""

    def __init__(self, models):
        self.models, self.rows = models, {"sampling": 0, "trained": 0, "reference": 0}
        policy, reference = models.policy, models.reference

        def counted_policy(x, t, cond):
            self.rows["trained" if torch.is_grad_enabled() else "sampling"] += x.shape[0]
            return policy(x, t, cond)

        def counted_reference(x, t, cond):
            self.rows["reference"] += x.shape[0]
            return reference(x, t, cond)

        models.policy, models.reference = counted_policy, counted_reference

    def take(self) -> dict:
        out, self.rows = dict(self.rows), {k: 0 for k in self.rows}
        return out


def measure(method: str, overrides: list[str]) -> dict:
    from diffalign.config import load_config
    from diffalign.trainers.loop import PreferenceTrainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(f"toy/{method}", [*overrides, f"train.output_dir={tmp}", "log.progress=false"])
        trainer = PreferenceTrainer(cfg)
        trainer.setup()
        feed, counter = trainer.feed, Counter(trainer.models)
        start = time.perf_counter()
        feed.round = feed.collect(trainer.models, 0)
        rollout_s = time.perf_counter() - start
        rollout_rows = counter.take()
        steps, start = feed.steps_per_round, time.perf_counter()
        for _ in range(steps):
            trainer.optimizer_step()
        train_s = time.perf_counter() - start
        train_rows = counter.take()
    per_step = {k: (rollout_rows[k] + train_rows[k]) / steps for k in rollout_rows}
    equivalents = per_step["sampling"] + per_step["reference"] + 3 * per_step["trained"]
    return {"method": method, "round_images": feed.round_size, "steps_per_round": steps,
            "rollout_images_per_s": feed.round_size / rollout_s, "seconds_per_step": (rollout_s + train_s) / steps,
            "unet_rows_per_step": per_step, "forward_equivalents_per_step": equivalents,
            "steps_at_dpo_compute": round(400 * DPO_STEP_FORWARD_EQUIVALENTS / equivalents)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--set", action="append", default=[], help="override for every method, e.g. train.batch_size=4")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = [measure(m, args.set) for m in args.methods.split(",")]
    print("| method | images per round | steps per round | rollout images/s | s per step | sampling rows | trained rows | "
          "reference rows | forward-eq. per step | steps at DPO's compute |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        u = r["unet_rows_per_step"]
        print(f"| {r['method']} | {r['round_images']} | {r['steps_per_round']} | {r['rollout_images_per_s']:.1f} | "
              f"{r['seconds_per_step']:.2f} | {u['sampling']:.0f} | {u['trained']:.0f} | {u['reference']:.0f} | "
              f"{r['forward_equivalents_per_step']:.0f} | {r['steps_at_dpo_compute']} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"threads": torch.get_num_threads(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
