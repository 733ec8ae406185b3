"""Is the toy bench reproducible? Two checks, each writing a JSON result.

``quick``: the `--quick` preset twice, each in a fresh cache root (data, training, samples: everything rebuilt), and the
two reports compared once times, reuse flags and paths are removed (`toybench.without_timings`); the result lists every
differing key (none is the claim).

``cell``: one full (method, training seed) cell of a bench cache recomputed from scratch in a fresh cache root and
compared with the cached cell: every tensor of its final weights, its final metrics, and its evaluation samples pixel
for pixel. The synthetic data is linked, not rebuilt (it is the input every cell shares; its own determinism is the
synthetic source's, tested in tests/test_synthetic.py). Run it with the thread count the cache was built with (the run
key includes it):

    OMP_NUM_THREADS=1 python benchmarks/bench_reproducibility.py quick --out benchmarks/results/bench-reproducibility-quick.json
    OMP_NUM_THREADS=1 python benchmarks/bench_reproducibility.py cell --cache-root /work/bench_cache --method dpo --train-seed 1 \
        --out benchmarks/results/bench-reproducibility-cell.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def differences(a, b, path: str = "") -> list[str]:
    """The key paths where two JSON-like values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b))
        return [d for k in keys for d in (differences(a[k], b[k], f"{path}.{k}") if k in a and k in b else [f"{path}.{k}"])]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [path or "."]


def quick(methods: tuple[str, ...]) -> dict:
    from diffalign.eval.toybench import QUICK, BenchSettings, run_toy_bench, without_timings

    reports, seconds = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for run in ("first", "second"):
            root = Path(tmp) / run
            settings = BenchSettings(methods=methods, workdir=root / "work", cache_root=root / "cache", eval_split="train")  # no held-out look
            settings = dataclasses.replace(settings, **QUICK)
            started = time.perf_counter()
            reports.append(without_timings(run_toy_bench(settings, root / "report.json")))
            seconds.append(time.perf_counter() - started)
    diff = differences(*reports)
    return {"check": "quick preset twice, fresh cache roots", "methods": list(methods), "seconds": seconds, "differences": diff,
            "identical": not diff, "win_rates": {m: r["win_rate"] for m, r in reports[0]["methods"].items()}}


def cell(cache_root: Path, method: str, train_seed: int) -> dict:
    import torch
    from safetensors.torch import load_file

    from diffalign.config import ModelConfig
    from diffalign.eval import toybench as bench
    from diffalign.models.loading import load_components
    from diffalign.models.sampling import load_trained_unet, sample_images

    settings = bench.BenchSettings(methods=(method,), cache_root=cache_root)
    cached = bench.method_config(method, settings, train_seed=train_seed)
    cached_run = Path(cached.train.output_dir)
    if not bench.run_is_complete(cached_run):
        raise SystemExit(f"{cached_run}: the cell is not in the cache (train it with diffalign bench toy first)")
    with tempfile.TemporaryDirectory() as tmp:
        fresh_settings = dataclasses.replace(settings, cache_root=Path(tmp))
        data = Path(cached.data.cache_dir)
        (Path(tmp) / "data").mkdir()
        os.symlink(data, Path(tmp) / "data" / data.name)  # the shared input, not the cell
        fresh = bench.method_config(method, fresh_settings, train_seed=train_seed)
        assert Path(fresh.train.output_dir).name == cached_run.name, "the run key must not depend on the cache root"
        started = time.perf_counter()
        record, reused = bench.ensure_run(fresh)
        seconds = time.perf_counter() - started
        assert not reused
        run = Path(fresh.train.output_dir)
        tensors, unequal = 0, []
        for file in sorted((cached_run / "final").rglob("*.safetensors")):
            a, b = load_file(str(file)), load_file(str(run / file.relative_to(cached_run)))
            tensors += len(a)
            unequal += [f"{file.name}:{k}" for k in a if a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]
        cached_done = json.loads((cached_run / "done.json").read_text())
        metrics_equal = {k: v for k, v in record["metrics"].items() if "per_s" not in k} == {
            k: v for k, v in cached_done["metrics"].items() if "per_s" not in k}

        # the evaluation samples: the cached cell's, against the recomputed model's
        _, prompts, seeds = bench._eval_set(settings)
        sample_kw = dict(num_inference_steps=settings.num_inference_steps, guidance_scale=settings.guidance_scale, resolution=32)
        folder = cache_root / "samples" / bench.sample_key(cached_run.name, prompts, seeds, sample_kw, bench.source_digest())
        if not (folder / bench.DONE).is_file():
            raise SystemExit(f"{folder}: no cached samples of the cell (run the bench that trained it)")
        old, _ = bench.cached_samples(folder, make=None)  # complete: read, never made
        components = load_components(ModelConfig(pretrained=settings.model))
        new = sample_images(components, prompts, seeds, unet=load_trained_unet(components, run / "final"), **sample_kw)
        differing = sum(not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(old, new))
    return {"check": "one cell recomputed from scratch", "cell": f"{method} (seed {train_seed})", "run_key": cached_run.name,
            "train_seconds": seconds, "tensors": tensors, "unequal_tensors": unequal, "metrics_equal": metrics_equal,
            "samples": len(new), "differing_samples": differing,
            "identical": not unequal and metrics_equal and differing == 0 and tensors > 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("check", choices=("quick", "cell"))
    parser.add_argument("--methods", default="dpo", help="quick: the methods (SFT always runs)")
    parser.add_argument("--cache-root", type=Path, help="cell: the bench cache holding the cell")
    parser.add_argument("--method", default="dpo")
    parser.add_argument("--train-seed", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.check == "quick":
        result = quick(tuple(args.methods.split(",")))
    else:
        if args.cache_root is None:
            parser.error("cell needs --cache-root")
        result = cell(args.cache_root, args.method, args.train_seed)
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if not result["identical"]:
        raise SystemExit("not reproduced: see the differences above")


if __name__ == "__main__":
    main()
