"""`diffalign prepare` images/s against the work it cannot avoid: bare VAE encoding (and the text encoders).

The source is a Pick-a-Pic-v2-format parquet (caption, jpg_0, jpg_1, label_0: JPEG bytes, as the real shards
store them) of `--pairs` toy pairs drawn at `--image-size` px, cached at `--resolution` px with an SDXL-family
VAE and both SDXL text encoders (random weights; widths ÷ `--vae-div` / `--text-div`, 1 = the real sizes).

prepare   `prepare_cache` into a fresh directory: parquet reading, JPEG decoding and resize/crop/flip in
          `data.decode_workers` threads, VAE posterior of every image in batches of `data.encode_batch_size`,
          the captions' embeddings, shards, index and manifest written atomically.
vae       the floor: the same images, decoded and placed once beforehand (not timed), through
          `encode_images` in the same batches, results moved to the CPU in the cache dtype. Nothing else.
text      the captions' embeddings alone (each distinct caption once, in the same batches, plus the empty one).
decode    the images' decoding and placement alone (one thread): what the decode workers overlap with the VAE.

One process, interleaved: each round runs every variant once, the order rotating, after one untimed warm-up
round; each ratio is the median over the rounds of the per-round ratio.

    python benchmarks/prepare_throughput.py --out benchmarks/results/prepare-throughput-cpu.json
    python benchmarks/prepare_throughput.py --pairs 4 --resolution 64 --vae-div 8 --text-div 8 --rounds 1   # smoke
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

VARIANTS = ("prepare", "vae", "text", "decode")


def build_parts(args):
    """VAE and both text encoders of the SDXL family (random weights, widths ÷ div), no UNet."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from train_step import sdxl_text_configs, sdxl_vae_config
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from diffalign.models.loading import Components
    from diffalign.models.tiny import SD_SCHEDULER
    from diffalign.models.tokenizer import build_clip_tokenizer

    torch.manual_seed(1)
    vae = AutoencoderKL(**sdxl_vae_config(args.vae_div, args.resolution)).eval()
    torch.manual_seed(2)
    one, two = sdxl_text_configs(args.text_div)
    encoders = [CLIPTextModel(one).eval(), CLIPTextModelWithProjection(two).eval()]
    tokenizers = [build_clip_tokenizer(), build_clip_tokenizer(pad_token="!")]
    return Components("sdxl", None, vae, encoders, tokenizers, DDPMScheduler(**SD_SCHEDULER), "epsilon", "benchmark:prepare")


def config(args, parquet: Path, cache_dir: Path):
    from diffalign.config import validate_config

    return validate_config({
        "model": {"pretrained": "benchmark:prepare"},  # the components are passed in, never loaded
        "data": {"source": {"kind": "pickapic", "path": str(parquet)}, "cache_dir": str(cache_dir),
                 "resolution": args.resolution, "encode_batch_size": args.encode_batch_size,
                 "decode_workers": args.decode_workers, "latent_dtype": "float16"},
    }, origin="benchmarks/prepare_throughput.py")


def source_items(cfg):
    from diffalign.data.sources import open_source

    source = open_source(cfg.data.source, cfg)
    try:
        return list(source.items(0))
    finally:
        close = getattr(source, "close", None)
        if close is not None:
            close()


def decode_all(cfg, items):
    """Every item's images placed exactly as `prepare` places them."""
    from diffalign.data.cache import place_item

    return [place_item(cfg.data, it) for it in items]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=48)
    p.add_argument("--image-size", type=int, default=512, help="stored JPEG size (Pick-a-Pic v2: 512 to 1024)")
    p.add_argument("--resolution", type=int, default=256, help="cache resolution (data.resolution)")
    p.add_argument("--vae-div", type=int, default=1, help="SDXL VAE widths divided by this (1: the real VAE)")
    p.add_argument("--text-div", type=int, default=1, help="SDXL text encoders' widths divided by this (1: real sizes)")
    p.add_argument("--encode-batch-size", type=int, default=8)
    p.add_argument("--decode-workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", type=Path, default=None, help="write the results here (json; a .md table beside it)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from diffalign.data import prepare_cache
    from diffalign.data.cache import DTYPES
    from diffalign.data.sources.demo import write_demo_parquet
    from diffalign.models.loading import encode_images, encode_prompts

    work = Path(tempfile.mkdtemp(prefix="prepare_throughput_"))
    try:
        parquet = write_demo_parquet(work / "train.parquet", num_pairs=args.pairs, image_size=args.image_size, seed=0)
        parts = build_parts(args)
        cfg = config(args, parquet, work / "cache")
        items = source_items(cfg)
        placed = [img.pixels for per_item in decode_all(cfg, items) for img in per_item]  # the floor's input, decoded once
        captions = sorted({it.caption for it in items}) + [""]
        n_images, bs, dtype = len(placed), args.encode_batch_size, DTYPES[cfg.data.latent_dtype]

        def run_prepare():
            shutil.rmtree(work / "cache", ignore_errors=True)
            prepare_cache(cfg, parts, progress=False)

        @torch.no_grad()
        def run_vae():
            for i in range(0, n_images, bs):
                mean, logvar = encode_images(parts.vae, torch.stack(placed[i : i + bs]))
                mean.to("cpu", dtype), logvar.to("cpu", dtype)

        def run_text():
            for i in range(0, len(captions), bs):
                encode_prompts(parts, captions[i : i + bs], torch.device("cpu"))

        runs = {"prepare": run_prepare, "vae": run_vae, "text": run_text, "decode": lambda: decode_all(cfg, items)}
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for r in range(args.rounds + 1):
            order = VARIANTS[r % len(VARIANTS):] + VARIANTS[: r % len(VARIANTS)]
            for v in order:
                start = time.perf_counter()
                runs[v]()
                if r:  # round 0 warms up
                    times[v].append(time.perf_counter() - start)
            print(f"round {r}: " + ", ".join(f"{v} {times[v][-1]:.2f} s" for v in VARIANTS) if r else "warm-up done", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def median_ratio(a, b_sum):
        return statistics.median(x / sum(parts_) for x, parts_ in zip(times[a], zip(*(times[b] for b in b_sum))))

    result = {
        "device": "cpu", "cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "images": n_images, "distinct_captions": len(captions) - 1,
        "vae_params": sum(q.numel() for q in parts.vae.encoder.parameters()) + sum(q.numel() for q in parts.vae.quant_conv.parameters()),
        "seconds": times,
        "ms_per_image": {v: 1000 * statistics.median(times[v]) / n_images for v in VARIANTS},
        "images_per_s": {v: n_images / statistics.median(times[v]) for v in VARIANTS},
        "ratio_prepare_over_vae": median_ratio("prepare", ["vae"]),
        "ratio_prepare_over_vae_and_text": median_ratio("prepare", ["vae", "text"]),
    }
    table = "\n".join([
        f"`prepare` against bare encoding: {n_images} images ({args.pairs} Pick-a-Pic-format pairs, JPEG {args.image_size} px, "
        f"{result['distinct_captions']} distinct captions) cached at {args.resolution} px, SDXL VAE ÷ {args.vae_div}, text encoders "
        f"÷ {args.text_div}, batch {bs}, {args.decode_workers} decode threads, {result['torch_threads']} torch threads, "
        f"median of {args.rounds} interleaved rounds.",
        "",
        "| variant | ms/image | images/s |",
        "|---|---:|---:|",
        *(f"| {v} | {result['ms_per_image'][v]:.1f} | {result['images_per_s'][v]:.2f} |" for v in VARIANTS),
        "",
        f"prepare ÷ vae: **{result['ratio_prepare_over_vae']:.3f}**; prepare ÷ (vae + text): "
        f"**{result['ratio_prepare_over_vae_and_text']:.3f}**",
    ])
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
