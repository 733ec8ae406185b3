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
- its own floor (`Floor`): after each round, the round's counted UNet calls replayed alone in order (sampling, each
  trained call's forward + backward, reference) plus the optimizer steps; ``÷ own floor`` is the median over rounds.

    OMP_NUM_THREADS=2 python benchmarks/online_step_cost.py --out benchmarks/results/online-step-cost-cpu.json
    python benchmarks/online_step_cost.py --methods grpo --set method.group_size=4 --set method.groups_per_round=2 --set train.batch_size=4
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

METHODS = ("pref_grpo", "grpo", "dense_online", "tailorpo")
DPO_STEP_FORWARD_EQUIVALENTS = 3 * 32 + 32  # toy/dpo: 16 pairs, policy forward + backward on 32 rows, reference on 32


class Counter:
    """Wraps a `Models` view and counts the rows of its UNet calls; keeps every call's (kind, rows) in order and the first
    trained call's inputs (what the floor replays)."""

    def __init__(self, models):
        self.models, self.rows, self.calls, self.sample = models, {"sampling": 0, "trained": 0, "reference": 0}, [], None
        policy, reference = models.policy, models.reference

        def counted_policy(x, t, cond):
            kind = "trained" if torch.is_grad_enabled() else "sampling"
            self.rows[kind] += x.shape[0]
            self.calls.append((kind, x.shape[0]))
            if kind == "trained" and self.sample is None:
                self.sample = (x.detach().clone(), t.clone(), cond)
            return policy(x, t, cond)

        def counted_reference(x, t, cond):
            self.rows["reference"] += x.shape[0]
            self.calls.append(("reference", x.shape[0]))
            return reference(x, t, cond)

        models.policy, models.reference = counted_policy, counted_reference

    def watch(self, feed) -> None:
        """Also count the round's other unavoidable work, in order with the UNet calls: prompt encoding (`feed.encode`),
        VAE decoding (the VAE's `decode`, with or without gradient) and reward calls (each scorer's `score`)."""
        encode, vae = feed.encode, feed.components.vae
        decode = vae.decode
        self.originals = {"encode": encode, "decode": decode}  # what the floor calls (uncounted)

        def counted_encode(prompts):
            self.calls.append(("encode", len(prompts)))
            self.prompts = self.prompts or list(prompts)
            return encode(prompts)

        def counted_decode(z, *args, **kwargs):
            self.calls.append(("decode_grad" if torch.is_grad_enabled() else "decode", z.shape[0]))
            self.latents = z.detach().clone() if self.latents is None else self.latents
            return decode(z, *args, **kwargs)

        feed.encode, vae.decode, self.prompts, self.latents, self.images = counted_encode, counted_decode, None, None, None
        for name, scorer in feed.scorers.items():  # the leaf calls: `score`, and a checklist's `answers` (its vote judge's)
            for method in ("score", "answers"):
                if not hasattr(scorer, method):
                    continue

                self.originals[f"{method}:{name}"] = getattr(scorer, method)

                def counted(images, prompts, call=getattr(scorer, method), kind=f"{method}:{name}"):
                    self.calls.append((kind, len(prompts)))
                    self.images = self.images if self.images is not None else images
                    return call(images, prompts)

                setattr(scorer, method, counted)

    def take(self) -> tuple[dict, list]:
        out, calls, self.rows, self.calls = dict(self.rows), self.calls, {k: 0 for k in self.rows}, []
        return out, calls


class Floor:
    """An online round's floor: its counted calls replayed alone, in order and with the same sizes each, on inputs
    captured once and on a copy of the UNet with its own AdamW: prompt encoding, UNet sampling calls (no gradient; the
    trajectory's steps are sequential by nature), VAE decoding (with a backward where the method decoded with
    gradient: TailorPO's guidance), reward calls, each trained call's forward + backward (the methods back-propagate
    per trained step), the reference calls (LoRA: adapters off), and a clip + AdamW step per optimizer step. No
    log-probabilities, advantages, plans or batch building: ``ours ÷ floor`` is what the method's code adds."""

    def __init__(self, trainer, sample, counter):
        from floor import UNetReplay

        self.replay = UNetReplay(trainer, sample)
        self.calls_of = counter.originals  # the uncounted encode, VAE decode and scorer calls
        self.prompts, self.latents, self.images = counter.prompts, counter.latents, counter.images

    def _decode(self, rows: int, grad: bool) -> None:
        z = self.latents[torch.arange(rows) % self.latents.shape[0]]
        decode = self.calls_of["decode"]
        if not grad:
            with torch.no_grad():
                decode(z)
            return
        z = z.detach().requires_grad_(True)  # as a guidance gradient through the decoder
        decode(z).sample.float().mean().backward()

    def round(self, calls: list, steps: int) -> None:
        r = self.replay
        for kind, rows in calls:
            if kind == "trained":
                r.train_forward(rows)
            elif kind == "decode_grad":
                self._decode(rows, grad=True)
            else:
                with torch.no_grad():
                    self._replay_no_grad(kind, rows)
        for _ in range(steps):
            r.step(zero_grad=False)
        r.optimizer.zero_grad(set_to_none=True)

    def _replay_no_grad(self, kind: str, rows: int) -> None:
        r = self.replay
        prompts = [self.prompts[i % len(self.prompts)] for i in range(rows)]
        if kind == "encode":
            self.calls_of["encode"](prompts)
        elif kind == "decode":
            self._decode(rows, grad=False)
        elif kind.startswith(("score:", "answers:")):
            index = [i % len(self.images) for i in range(rows)]
            images = self.images[index] if torch.is_tensor(self.images) else [self.images[i] for i in index]
            self.calls_of[kind](images, prompts)
        elif kind == "sampling":
            r.forward(r.unet, rows)
        else:  # the reference
            with r.reference() as reference:
                r.forward(reference, rows)


def measure(method: str, overrides: list[str], rounds: int) -> dict:
    """`rounds` rollout rounds, each with the optimizer steps that train it, then its floor (the same calls replayed)."""
    from diffalign.config import load_config
    from diffalign.trainers.loop import PreferenceTrainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(f"toy/{method}", [*overrides, f"train.output_dir={tmp}", "log.progress=false"])
        trainer = PreferenceTrainer(cfg)
        trainer.setup()
        feed, counter, floor = trainer.feed, Counter(trainer.models), None
        counter.watch(feed)
        steps = feed.steps_per_round
        rollout_s, train_s, floor_s, ratios = [], [], [], []
        for r in range(rounds):
            start = time.perf_counter()
            feed.round = feed.collect(trainer.models, feed.round_of(trainer.step))  # the round the next steps train
            rollout_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            for _ in range(steps):
                trainer.optimizer_step()
            train_s.append(time.perf_counter() - start)
            rows, calls = counter.take()
            floor = floor or Floor(trainer, counter.sample, counter)
            start = time.perf_counter()
            floor.round(calls, steps)
            floor_s.append(time.perf_counter() - start)
            ratios.append((rollout_s[-1] + train_s[-1]) / floor_s[-1])
            print(f"{method}: round {r + 1}/{rounds}: ours {rollout_s[-1] + train_s[-1]:.2f} s, floor {floor_s[-1]:.2f} s", flush=True)
    per_step = {k: v / steps for k, v in rows.items()}
    equivalents = per_step["sampling"] + per_step["reference"] + 3 * per_step["trained"]
    median = statistics.median
    return {"method": method, "round_images": feed.round_size, "steps_per_round": steps, "rounds": rounds,
            "rollout_images_per_s": feed.round_size / median(rollout_s),
            "seconds_per_step": median(r + t for r, t in zip(rollout_s, train_s)) / steps,
            "floor_seconds_per_step": median(floor_s) / steps, "floor_ratio_median": median(ratios), "floor_ratios": ratios,
            "unet_calls_per_round": len(calls), "unet_rows_per_step": per_step, "forward_equivalents_per_step": equivalents,
            "steps_at_dpo_compute": round(400 * DPO_STEP_FORWARD_EQUIVALENTS / equivalents)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--set", action="append", default=[], help="override for every method, e.g. train.batch_size=4")
    parser.add_argument("--rounds", type=int, default=3, help="rollout rounds per method (the first includes warm-up)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = [measure(m, args.set, args.rounds) for m in args.methods.split(",")]
    print("| method | ÷ own floor (median of rounds) | images per round | steps per round | rollout images/s | s per step | "
          "floor s per step | sampling rows | trained rows | reference rows | forward-eq. per step | steps at DPO's compute |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        u = r["unet_rows_per_step"]
        print(f"| {r['method']} | **{r['floor_ratio_median']:.2f}** | {r['round_images']} | {r['steps_per_round']} | "
              f"{r['rollout_images_per_s']:.1f} | {r['seconds_per_step']:.2f} | {r['floor_seconds_per_step']:.2f} | {u['sampling']:.0f} | "
              f"{u['trained']:.0f} | {u['reference']:.0f} | {r['forward_equivalents_per_step']:.0f} | {r['steps_at_dpo_compute']} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"threads": torch.get_num_threads(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
