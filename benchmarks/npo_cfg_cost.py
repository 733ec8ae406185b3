"""Cost of NPO-CFG generation against plain CFG with the same positive model, and against the official two-UNet way.

Every variant samples the same prompts, seeds and DDIM steps (latents out: the VAE decode is the same for all) with
the same positive model θ_base + η (η a rank-8 LoRA on the attention projections, unfused as diffalign loads it):

- ``plain CFG``: diffusers' pipeline with η as an adapter; one UNet call on the 2B-row CFG batch per step.
- ``NPO-CFG, one UNet``: `load_npo(δ, positive=η)`: the same UNet, adapters switched per branch (`set_adapters`), one
  call of B rows per branch and step.
- ``NPO-CFG, two UNets (official)``: what `G-U-N/Diffusion-NPO`'s pipelines do: two UNets with the offsets fused
  (θ_base + η; θ_base + α·η + β·δ), one call of B rows each per step.
- ``plain CFG (copy)``: a second plain pipeline, so its ratio shows the noise.

Time: all variants in one process, interleaved, the order rotating each round, after `--warmup` untimed rounds; the
ratio is the MEDIAN over rounds of (variant time / the plain CFG time of the same round). Memory: the bytes of the
distinct weight tensors each variant holds (exact), and the peak resident memory of a fresh process that loads the
model, builds only that variant and samples once (`ru_maxrss`; torch's own libraries are most of it at toy size).

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/npo_cfg_cost.py --out benchmarks/results/npo-cfg-cost-cpu.json
    OMP_NUM_THREADS=2 python benchmarks/npo_cfg_cost.py --model sd15-size --rounds 3 --steps 2 --out benchmarks/results/npo-cfg-cost-sd15size-cpu.json
    python benchmarks/npo_cfg_cost.py --rounds 1 --warmup 0 --steps 2 --no-rss     # smoke check
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VARIANTS = ("plain CFG", "plain CFG (copy)", "NPO-CFG, one UNet", "NPO-CFG, two UNets (official)")
PROMPTS = ["a red circle on a white background", "a small blue square on a black background", "a large green triangle on a gray background",
           "a yellow star on a blue background"]
ALPHA, BETA = 1.0, 1.0
SD15_SIZE_BASE = "builtin:tiny-sd15"


def _lora_file(pipe, folder: Path, seed: int) -> Path:
    """A rank-8 LoRA on every attention projection, random non-zero weights, saved as the official NPO scripts save."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = copy.deepcopy(pipe.unet)
    unet.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if ".lora_" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    type(pipe).save_lora_weights(str(folder), unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)))
    return folder / "pytorch_lora_weights.safetensors"


def build(variant: str, model: str, workdir: Path):
    """The pipeline of one variant (its own copy of every weight)."""
    from diffalign.config import ModelConfig
    from diffalign.models.loading import build_pipeline, load_components
    from diffalign.pipelines import GuidanceBranches, StableDiffusionNPOPipeline, StableDiffusionXLNPOPipeline
    from diffalign.pipelines.weights import add_lora_offset

    components = load_components(ModelConfig(pretrained=SD15_SIZE_BASE if model == "sd15-size" else model))
    if model == "sd15-size":  # an SD1.5-size UNet (random weights) on the tiny SD1.5's text encoder and VAE
        from diffusers import UNet2DConditionModel

        torch.manual_seed(0)
        width = components.text_encoders[0].config.hidden_size
        components.unet = UNet2DConditionModel(sample_size=32, cross_attention_dim=width).eval().requires_grad_(False)
    base = build_pipeline(components)
    eta, delta = workdir / "eta" / "pytorch_lora_weights.safetensors", workdir / "delta" / "pytorch_lora_weights.safetensors"
    if not eta.is_file():
        _lora_file(base, eta.parent, seed=1), _lora_file(base, delta.parent, seed=2)
    npo_cls = StableDiffusionXLNPOPipeline if base.__class__.__name__.startswith("StableDiffusionXL") else StableDiffusionNPOPipeline
    if variant.startswith("plain CFG"):
        base.load_lora_weights(str(eta.parent), adapter_name="positive")
        return base
    pipe = npo_cls.from_pipe(base)
    if variant == "NPO-CFG, one UNet":
        return pipe.load_npo(delta, positive=eta, alpha=ALPHA, beta=BETA)
    # the official way: two UNets with every offset fused
    positive, negative = copy.deepcopy(base.unet), copy.deepcopy(base.unet)
    pipe.load_npo(delta, positive=eta, alpha=ALPHA, beta=BETA)  # the adapters whose dense offsets are fused below
    add_lora_offset(positive, pipe.unet, "positive", 1.0)
    add_lora_offset(negative, pipe.unet, "positive", ALPHA)
    add_lora_offset(negative, pipe.unet, "npo", BETA)
    pipe.register_modules(unet=positive)
    pipe.branches = GuidanceBranches(positive, negative)
    return pipe


def weight_bytes(pipe) -> int:
    """Bytes of the distinct UNet tensors the variant holds (base, LoRAs, a second UNet)."""
    unets = [pipe.unet] + ([pipe.branches.negative_unet] if getattr(pipe, "branches", None) else [])
    seen = {}
    for unet in unets:
        for t in list(unet.parameters()) + list(unet.buffers()):
            seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


@torch.no_grad()
def sample(pipe, args) -> None:
    generators = [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]
    pipe.set_progress_bar_config(disable=True)
    pipe(PROMPTS, num_inference_steps=args.steps, guidance_scale=5.0, generator=generators, output_type="latent")


def _peak_mib() -> float:
    """This process's peak resident memory: VmHWM (reset by exec, unlike ru_maxrss, which on Linux keeps the forking
    parent's peak), else ru_maxrss."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss(variant: str, args, workdir: Path) -> float:
    """Peak resident MiB of a fresh process that builds only `variant` and samples once."""
    cmd = [sys.executable, __file__, "--one", variant, "--model", args.model, "--steps", str(args.steps), "--workdir", str(workdir)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin:toy", help="builtin:toy, or sd15-size: SD1.5's UNet architecture (860M "
                   "parameters, random weights; cross-attention as wide as the tiny text encoder) at 32x32 latents")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-rss", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--out", default=None)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process: build one variant, print its peak RSS (MiB)
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.one:
        pipe = build(args.one, args.model, Path(args.workdir))
        sample(pipe, args)
        print(_peak_mib())
        return

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        pipes = {v: build(v, args.model, workdir) for v in VARIANTS}
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for r in range(args.warmup + args.rounds):
            order = VARIANTS[r % len(VARIANTS):] + VARIANTS[: r % len(VARIANTS)]
            for v in order:
                start = time.perf_counter()
                sample(pipes[v], args)
                if r >= args.warmup:
                    times[v].append(time.perf_counter() - start)
        weights = {v: weight_bytes(pipes[v]) / 2**20 for v in VARIANTS}
        del pipes  # free this process's copies before the memory probes start theirs (an SD1.5-size UNet is 3.2 GB)
        gc.collect()
        rss = {} if args.no_rss else {v: peak_rss(v, args, workdir) for v in VARIANTS if v != "plain CFG (copy)"}
        rows = []
        for v in VARIANTS:
            ratio = statistics.median(t / b for t, b in zip(times[v], times["plain CFG"]))
            rows.append({"variant": v, "time_ratio": ratio, "seconds": statistics.median(times[v]), "weight_mib": weights[v],
                         "peak_rss_mib": rss.get(v)})

    plain = rows[0]
    machine = f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    lines = [f"NPO-CFG cost, {args.model}, {len(PROMPTS)} prompts, {args.steps} DDIM steps, guidance 5 "
             f"(median of {args.rounds} interleaved rounds; {machine})",
             "", "| variant | time ÷ plain CFG | s per call | weights (MiB) | ÷ plain | peak RSS (MiB) |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        rss_text = "—" if r["peak_rss_mib"] is None else f"{r['peak_rss_mib']:.0f}"
        lines.append(f"| {r['variant']} | {r['time_ratio']:.3f} | {r['seconds']:.3f} | {r['weight_mib']:.1f} | "
                     f"{r['weight_mib'] / plain['weight_mib']:.3f} | {rss_text} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=2) + "\n")
        out.with_suffix(".md").write_text(table)


if __name__ == "__main__":
    main()
