"""Throughput of the synthetic source: one prompt per pipeline call (before) against a window of prompts per call (now).

Both variants are the same `SyntheticGenerator` on the same prompts, seeds and model, sharing one loaded copy of
the model; they differ only in `prompts_per_call`:

per-prompt  1: the K images of one prompt per pipeline call (what the source did up to VERSION 2);
window      `prompts_per_call(K)` (16 for K = 4: 64 images per call), what it does now.

Each is timed twice per round: `sample` (`generate` for every prompt: the pipeline calls, text encoders, UNet
steps, VAE decode) and `items` (what the cache builder consumes: sampling, the toy checklist's scores, φ and
the PNG bytes). Both run in one process, interleaved (per-prompt, window, window, per-prompt, ...: the order
flips every round) after one warm-up of each; ratios are ratios of medians. The images of the two variants are
compared byte for byte (PNG) and pixel for pixel: batched kernels may round differently at another batch size.

    python benchmarks/synthetic_throughput.py --out benchmarks/results/synthetic-throughput-cpu.json
    python benchmarks/synthetic_throughput.py --prompts 4 --steps 2 --rounds 1     # smoke check, seconds
"""

from __future__ import annotations

import argparse
import io
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="builtin:toy")
    parser.add_argument("--prompts", type=int, default=48, help="the first N toy training captions")
    parser.add_argument("--k", type=int, default=4, help="images per prompt")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--out", default=None, help="JSON path (a .md table beside it)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "benchmarks"))
    from report import write_report

    from diffalign.config import validate_config
    from diffalign.data.sources import open_source
    from diffalign.data.sources.synthetic import prompts_per_call
    from diffalign.models.loading import load_components
    from diffalign.toy.scenes import TRAIN

    torch.set_num_threads(args.threads)
    prompts = [spec.caption for spec in TRAIN[: args.prompts]]
    cfg = validate_config({
        "model": {"pretrained": args.model},
        "data": {"resolution": args.resolution, "source": {
            "kind": "synthetic", "prompts": prompts, "images_per_prompt": args.k, "num_inference_steps": args.steps,
            "guidance_scale": args.guidance, "scorers": ["toy-checklist"]}},
    })
    components = load_components(cfg.model)
    window = prompts_per_call(args.k)
    per_call = {"per-prompt": 1, "window": window}

    def source(variant: str):
        s = open_source(cfg.data.source, cfg)
        s.share_components(components, cfg.model)
        s.prompts_per_call = per_call[variant]  # the one difference between the variants
        return s

    def sample(variant: str) -> list:
        s = source(variant)
        images = [im for i in range(len(prompts)) for im in s.generate(i)]
        s.close()
        return images

    def items(variant: str) -> list:
        s = source(variant)
        out = list(s.items())
        s.close()
        return out

    jobs = {"sample": sample, "items": items}
    kept: dict = {}
    for variant in per_call:  # warm-up; the items kept for the comparison below
        for job, fn in jobs.items():
            kept[job, variant] = fn(variant)
    times: dict[str, list[float]] = {f"{job}/{variant}": [] for job in jobs for variant in per_call}
    for r in range(args.rounds):
        order = list(per_call) if r % 2 == 0 else list(reversed(per_call))
        for job, fn in jobs.items():
            for variant in order:
                started = time.perf_counter()
                fn(variant)
                times[f"{job}/{variant}"].append(time.perf_counter() - started)
                print(f"round {r + 1}/{args.rounds}: {job}/{variant} {times[f'{job}/{variant}'][-1]:.1f} s", file=sys.stderr, flush=True)

    n_images = len(prompts) * args.k
    median = {k: statistics.median(v) for k, v in times.items()}
    per_image = {k: v / n_images for k, v in median.items()}
    ratio = {job: median[f"{job}/per-prompt"] / median[f"{job}/window"] for job in jobs}

    old_items, new_items = kept["items", "per-prompt"], kept["items", "window"]
    pngs = [(a, b) for x, y in zip(old_items, new_items) for a, b in zip(x.images, y.images)]
    diffs = [int(np.abs(np.asarray(Image.open(io.BytesIO(a)), dtype=np.int16) - np.asarray(Image.open(io.BytesIO(b)), dtype=np.int16)).max())
             for a, b in pngs]
    same_scores = sum(x.extra_scores == y.extra_scores for x, y in zip(old_items, new_items))
    same_phi = sum(list(x.scores) == list(y.scores) for x, y in zip(old_items, new_items))
    identity = {"images": len(pngs), "png_identical": sum(a == b for a, b in pngs), "max_pixel_diff": max(diffs),
                "images_with_diff": sum(d > 0 for d in diffs), "items": len(old_items),
                "items_with_identical_raw_scores": same_scores, "items_with_identical_phi": same_phi}
    result = {
        "model": args.model, "prompts": len(prompts), "k": args.k, "images": n_images, "steps": args.steps,
        "guidance": args.guidance, "resolution": args.resolution, "threads": args.threads, "rounds": args.rounds,
        "prompts_per_call": per_call, "seconds": times, "median_seconds": median, "seconds_per_image": per_image,
        "ratio_per_prompt_over_window": ratio, "per_prompt_vs_window_bits": identity,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
                    "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
    }
    table = ("| job | variant | prompts per call | median s | s / image |\n|---|---|---:|---:|---:|\n"
             + "".join(f"| {job} | {variant} | {per_call[variant]} | {median[f'{job}/{variant}']:.2f} | {per_image[f'{job}/{variant}']:.4f} |\n"
                       for job in jobs for variant in per_call)
             + f"\nper-prompt / window: sample **{ratio['sample']:.2f}x**, items **{ratio['items']:.2f}x** "
               f"({len(prompts)} prompts x K={args.k} = {n_images} images, {args.model}, {args.resolution} px, {args.steps} DDIM steps, "
               f"guidance {args.guidance}, {args.threads} torch threads, {args.rounds} rounds interleaved)\n"
             + f"\nsame bits? {identity['png_identical']}/{identity['images']} PNGs identical; {identity['images_with_diff']} differ, "
               f"by at most {identity['max_pixel_diff']} level(s); raw scores identical for {same_scores}/{len(old_items)} items, "
               f"phi for {same_phi}/{len(old_items)}\n")
    write_report(args.out, result, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
