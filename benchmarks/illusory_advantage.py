"""The illusory advantage on the toy world: GRPO with a pointwise reward beside Pref-GRPO, at checkpoints over training.

Pref-GRPO (arXiv:2508.20751) argues that group-normalising a pointwise reward divides near-equal scores by a tiny
standard deviation, so trivial differences (e.g. saturation) get large advantages and the model over-optimises them
while the reward keeps rising. This script trains `toy/grpo` and `toy/pref_grpo` (the shipped recipes, their own
rollout budgets) and, at `--checkpoints` points of each run plus the base model, samples the same training captions
and seeds and reports:

- the mean checklist score (the pointwise reward GRPO optimises; Pref-GRPO is judged by the question vote),
- the yes-rate of every checklist question,
- the mean colour saturation of the samples (HSV S over all pixels, and over the object's pixels only),
- the within-group reward spread the rollouts saw (the training log's `win_rate_std` / advantage inputs).

Each checkpoint is a resumed run exporting `final/` at that step (resume is exact, so the snapshots are the points of
one uninterrupted run); everything is cached in `--work`, so a rerun continues.

    OMP_NUM_THREADS=2 python benchmarks/illusory_advantage.py --work outputs/illusory --out benchmarks/results/illusory-advantage-cpu.json

The committed table (docs/toy_world.md) was measured with the recipes of commit 97c3d11: graded rewards, no KL, one
micro-batch per step, Pref-GRPO without a vote margin. Those runs, with today's recipes otherwise:

    python benchmarks/illusory_advantage.py --set train.grad_accum=1 --set method.kl_beta=0 --set pref_grpo:method.vote_margin=0 \
        --set 'grpo:method.scorer_options={toy-checklist: {graded: true}}'

    python benchmarks/illusory_advantage.py --work /tmp/ia --steps 8 --checkpoints 2 --prompts 4 --seeds 1   # smoke check
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

METHODS = ("grpo", "pref_grpo")


def snapshot(method: str, step: int, work: Path, extra: list[str]) -> Path:
    """The run of `method` trained to `step` (resumed from its last checkpoint), its export copied to snapshots/."""
    from diffalign.cli import main

    out = work / "snapshots" / method / f"step-{step:05d}"
    if (out / "config.yaml").is_file():
        return out
    run = work / "runs" / method
    args = [f"train.max_steps={step}", f"train.output_dir={run}", "train.resume=latest", "train.keep_last=1", *extra]
    if main(["train", f"toy/{method}", *args]) != 0:
        raise SystemExit(f"training {method} to step {step} failed")
    shutil.copytree(run / "final", out, dirs_exist_ok=True)
    return out


def saturation(images) -> tuple[float, float]:
    """(mean HSV saturation of all pixels, of the object's pixels) over the images, in [0, 1]."""
    from diffalign.toy.checklist import OBJECT_DISTANCE

    everything, objects = [], []
    for image in images:
        rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
        hi, lo = rgb.max(-1), rgb.min(-1)
        s = np.where(hi > 0, (hi - lo) / np.maximum(hi, 1e-9), 0.0)
        border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
        mask = np.linalg.norm(rgb - np.median(border, axis=0), axis=-1) > OBJECT_DISTANCE
        everything.append(s.mean())
        if mask.any():
            objects.append(s[mask].mean())
    return float(np.mean(everything)), float(np.mean(objects)) if objects else float("nan")


def evaluate(components, final_dir: Path | None, prompts: list[str], seeds: list[int], scorer) -> dict:
    from diffalign.models.sampling import load_trained_unet, sample_images
    from diffalign.toy.checklist import TOY_CHECKLIST

    unet = None if final_dir is None else load_trained_unet(components, final_dir)
    images = sample_images(components, prompts, seeds, unet=unet, num_inference_steps=20, guidance_scale=3.0)
    scores = scorer.score(images, prompts)
    sat_all, sat_object = saturation(images)
    return {"reward": float(scores["overall"].mean()),
            "yes_rate": {q.key: float((scores[q.key] > 0).float().mean()) for q in TOY_CHECKLIST.questions},
            "saturation": sat_all, "object_saturation": sat_object}


def training_log(work: Path, method: str) -> dict:
    """Per logged round: the step, the rollouts' mean reward and (Pref-GRPO) the within-group win-rate spread."""
    rows = [json.loads(line) for line in (work / "runs" / method / "metrics.jsonl").read_text().splitlines()]
    return {"rounds": [{k: r[k] for k in ("step", "reward", "win_rate_std") if k in r} for r in rows if "reward" in r]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="outputs/illusory")
    parser.add_argument("--out", default="benchmarks/results/illusory-advantage-cpu.json")
    parser.add_argument("--steps", type=int, default=200, help="training steps (the recipes' 200)")
    parser.add_argument("--checkpoints", type=int, default=4, help="evenly spaced evaluation points")
    parser.add_argument("--prompts", type=int, default=50, help="training captions evaluated (spread over the split)")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--set", action="append", default=[],
                        help="override for both runs (optim.lr=1e-4), or for one (grpo:method.kl_beta=0)")
    args = parser.parse_args()

    from diffalign.config import ModelConfig
    from diffalign.eval.toybench import method_overrides
    from diffalign.models.loading import load_components
    from diffalign.toy.checklist import toy_checklist_scorer
    from diffalign.toy.scenes import TRAIN

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    specs = [TRAIN[i * len(TRAIN) // args.prompts] for i in range(args.prompts)]
    prompts = [s.caption for s in specs for _ in range(args.seeds)]
    seeds = [30_000 + j for _ in specs for j in range(args.seeds)]  # unlike the bench's evaluation and guidance seeds
    points = [round(args.steps * (i + 1) / args.checkpoints) for i in range(args.checkpoints)]
    components, scorer = load_components(ModelConfig(pretrained="builtin:toy")), toy_checklist_scorer()
    report = {"steps": points, "prompts": args.prompts, "seeds": args.seeds, "overrides": args.set,
              "base": evaluate(components, None, prompts, seeds, scorer), "methods": {}}
    for method in METHODS:
        rows = []
        for step in points:
            final = snapshot(method, step, work, method_overrides(method, tuple(args.set)))
            rows.append({"step": step, **evaluate(components, final, prompts, seeds, scorer)})
            print(f"{method} step {step}: reward {rows[-1]['reward']:+.3f}, saturation {rows[-1]['saturation']:.3f}", flush=True)
        report["methods"][method] = {"checkpoints": rows, "training": training_log(work, method)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))


def markdown(report: dict) -> str:
    from diffalign.toy.checklist import TOY_CHECKLIST

    keys = [q.key for q in TOY_CHECKLIST.questions]
    lines = ["| model | step | reward | saturation | object saturation | " + " | ".join(keys) + " |",
             "|---|---:|---:|---:|---:|" + "---:|" * len(keys)]

    def row(name, step, r):
        return (f"| {name} | {step} | {r['reward']:+.3f} | {r['saturation']:.3f} | {r['object_saturation']:.3f} | "
                + " | ".join(f"{r['yes_rate'][k]:.2f}" for k in keys) + " |")

    lines.append(row("base", 0, report["base"]))
    for method, data in report["methods"].items():
        lines += [row(method, r["step"], r) for r in data["checkpoints"]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
