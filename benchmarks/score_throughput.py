"""Throughput of `diffalign score` against the bare model forward, measured in one run.

A folder of N PNG images (smooth gradients plus noise, `--size` px square, with metadata.jsonl) is scored
with PickScore built on a random-weight CLIP of the chosen size (default ViT-B/16 vision, 512-wide text):

bare     `PickScore.score_pixels` on pixel tensors preprocessed before timing, in batches of B: the model
         forward (both towers, cosine, logit scale) and nothing else; prompts are tokenized inside, as in
         `score`.
score    `eval.folderscore.score_records` on the folder: decoding and the official preprocessing in worker
         threads overlapped with the forward of the previous batch, the same batches, results gathered.

Both run in one process, interleaved (bare, score, bare, score, ...) after one warm-up of each; the
reported ratio is median(score) / median(bare). torch uses `--threads` threads in both.

    python benchmarks/score_throughput.py --out benchmarks/results/score-throughput-cpu.json
    python benchmarks/score_throughput.py --preset tiny --images 16 --rounds 1     # smoke check, seconds
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from report import write_report

REPO = Path(__file__).resolve().parents[1]

PRESETS = {
    # ViT-B/16 image tower (86M) and CLIP's 512-wide, 12-layer text tower: the size the issue names
    "vit-b16": {"vision": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=16),
                "text": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8), "projection_dim": 512},
    "tiny": {"vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=32),
             "text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2), "projection_dim": 16},
}


def write_clip(path: Path, preset: str) -> Path:
    from transformers import CLIPConfig, CLIPModel

    from diffalign.models.tokenizer import build_clip_tokenizer

    p = PRESETS[preset]
    config = CLIPConfig(text_config={**p["text"], "max_position_embeddings": 77, "vocab_size": 49408, "eos_token_id": 2},
                        vision_config={**p["vision"], "image_size": 224}, projection_dim=p["projection_dim"])
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(path)
    build_clip_tokenizer().save_pretrained(path)
    return path


def write_images(folder: Path, n: int, size: int) -> None:
    from diffalign.eval.imagefolder import write_folder

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    images = []
    for i in range(n):
        base = np.stack([xx, yy, (xx + yy) / 2], -1) * rng.uniform(100, 255, 3)
        images.append(Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)))
    prompts = [f"a photo number {i} of a gradient with noise, in the style of test {i % 7}" for i in range(n)]
    write_folder(folder, images, prompts, list(range(n)), model="benchmark")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="vit-b16")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2, help="decoding threads")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="JSON path (a .md table beside it)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from diffalign.eval.folderscore import score_records
    from diffalign.eval.imagefolder import read_folder
    from diffalign.scorers.pickscore import PickScore

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="diffalign-score-bench-"))
    scorer = PickScore(write_clip(work / "clip", args.preset), device=args.device, batch_size=args.batch_size)
    folder = work / "images"
    write_images(folder, args.images, args.size)
    records = read_folder(folder)
    prompts = [r.prompt for r in records]
    pixels = [scorer.preprocess([Image.open(folder / r.file) for r in records[i : i + args.batch_size]])
              for i in range(0, len(records), args.batch_size)]

    def bare() -> None:
        with torch.no_grad():
            for j, p in enumerate(pixels):
                scorer.score_pixels(p.to(scorer.device), prompts[j * args.batch_size : (j + 1) * args.batch_size])["overall"].cpu()
        if scorer.device.type == "cuda":
            torch.cuda.synchronize()

    def folder_score() -> None:
        score_records(folder, records, {"pickscore": scorer}, batch_size=args.batch_size, workers=args.workers, progress=False)
        if scorer.device.type == "cuda":
            torch.cuda.synchronize()

    times = {"bare": [], "score": []}
    for name, fn in (("bare", bare), ("score", folder_score)):  # warm-up
        fn()
    for _ in range(args.rounds):
        for name, fn in (("bare", bare), ("score", folder_score)):
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    median = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "preset": args.preset, "images": args.images, "size": args.size, "batch_size": args.batch_size, "workers": args.workers,
        "threads": args.threads, "device": args.device, "rounds": args.rounds, "seconds": times, "median_seconds": median,
        "images_per_second": {k: args.images / v for k, v in median.items()}, "ratio_score_over_bare": median["score"] / median["bare"],
        "machine": {"platform": platform.platform(), "cpus": torch.get_num_threads(), "torch": torch.__version__,
                    "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
    }
    table = ("| variant | median s | images/s |\n|---|---:|---:|\n"
             + "".join(f"| {k} | {median[k]:.2f} | {result['images_per_second'][k]:.1f} |\n" for k in ("bare", "score"))
             + f"\nscore / bare = **{result['ratio_score_over_bare']:.3f}** ({args.images} images of {args.size}², batch "
               f"{args.batch_size}, {args.workers} decoding threads, {args.threads} torch threads, {args.preset})\n")
    write_report(args.out, result, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
