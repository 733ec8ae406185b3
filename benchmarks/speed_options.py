"""The speed options of the config, each toggled alone against the defaults: one Diffusion-DPO step, ratios in one process.

Variants (every one a real `PreferenceTrainer` from the `toy/dpo` recipe on one shared cache, `--finetune` lora or full;
`method_step_cost.base_config` builds the shared config):

    defaults                  model.sdpa_backend auto, channels_last off, compile off; optim.fused off
    defaults (copy)           a second identical trainer: its ratio shows the measurement noise
    sdpa flash / math         model.sdpa_backend forced ('efficient' and 'cudnn' are CUDA kernels: GPU runs only)
    channels_last             model.channels_last
    fused AdamW               optim.fused
    compile                   model.compile (its compile time falls in the untimed warm-up rounds; reported apart)
    gradient checkpointing    model.gradient_checkpointing (a memory option: its price in time)

Not here: train.mixed_precision (accelerate fixes the precision once per process, so it cannot be interleaved; the
GPU profile runs it apart). Timing as in method_step_cost.py: rounds step every variant once, in rotating order, after `--warmup` untimed rounds;
the ratio is the median over rounds of (variant's step time / the defaults' step time of the same round).

    OMP_NUM_THREADS=1 python benchmarks/speed_options.py --finetune lora --out benchmarks/results/speed-options-cpu-lora.json
    python benchmarks/speed_options.py --rounds 1 --warmup 1 --prompts 4 --batch 2 --variants "fused AdamW"   # smoke check
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

VARIANTS: dict[str, dict[str, dict]] = {  # name -> {section: {key: value}} over the shared config
    "defaults": {},
    "defaults (copy)": {},
    "sdpa flash": {"model": {"sdpa_backend": "flash"}},
    "sdpa math": {"model": {"sdpa_backend": "math"}},
    "channels_last": {"model": {"channels_last": True}},
    "fused AdamW": {"optim": {"fused": True}},
    "compile": {"model": {"compile": True}},
    "gradient checkpointing": {"model": {"gradient_checkpointing": True}},
}


def measure(args, workdir: Path) -> dict:
    from method_step_cost import base_config

    from diffalign.config import validate_config
    from diffalign.data import prepare_cache
    from diffalign.models.loading import load_components
    from diffalign.trainers.loop import PreferenceTrainer

    base = base_config(args, args.model, workdir)
    names = [n for n in VARIANTS if not args.variants or n in args.variants or n == "defaults"]
    configs = {}
    for i, name in enumerate(names):
        cfg = copy.deepcopy(base)
        for section, values in VARIANTS[name].items():
            cfg[section].update(values)
        cfg["train"]["output_dir"] = str(workdir / f"run-{i}")
        configs[name] = validate_config(cfg, origin="benchmarks/speed_options.py")
    master = load_components(configs["defaults"].model)
    prepare_cache(configs["defaults"], copy.deepcopy(master), progress=False)
    trainers = {}
    for name in names:
        trainers[name] = PreferenceTrainer(configs[name])
        trainers[name].setup(copy.deepcopy(master))
    warmup_seconds = {n: 0.0 for n in names}
    for _ in range(args.warmup):
        for name in names:
            t0 = time.perf_counter()
            trainers[name].optimizer_step()
            warmup_seconds[name] += time.perf_counter() - t0
    seconds = {n: [] for n in names}
    for r in range(args.rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            trainers[name].optimizer_step()
            seconds[name].append(time.perf_counter() - t0)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {seconds[n][-1] / seconds['defaults'][-1]:.2f}" for n in names[1:]),
              flush=True)
    rows = {}
    for name in names:
        ratios = [s / d for s, d in zip(seconds[name], seconds["defaults"])]
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else None
        rows[name] = {"overrides": VARIANTS[name], "ratio_median": statistics.median(ratios), "ratio_q1_q3": [q[0], q[2]] if q else None,
                      "ms_median": 1e3 * statistics.median(seconds[name]), "warmup_seconds": warmup_seconds[name]}
    return {"model": args.model, "finetune": args.finetune, "device": str(trainers["defaults"].accelerator.device), "variants": rows}


def markdown(res: dict, args) -> str:
    lines = [f"`{res['model']}` toy/dpo recipe, {res['finetune']}, {args.batch} pairs per step, device {res['device']}, "
             f"{args.rounds} interleaved rounds after {args.warmup} warm-up", "",
             "| variant | time ÷ defaults (median of rounds) | IQR | ms/step (median) | warm-up s (incl. compile) |",
             "|---|---:|---:|---:|---:|"]
    for name, r in res["variants"].items():
        iqr = "–" if r["ratio_q1_q3"] is None else f"{r['ratio_q1_q3'][0]:.2f}–{r['ratio_q1_q3'][1]:.2f}"
        lines.append(f"| {name} | **{r['ratio_median']:.2f}** | {iqr} | {r['ms_median']:.0f} | {r['warmup_seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["toy", "tiny-sdxl"], default="toy")
    p.add_argument("--finetune", choices=["lora", "full"], default="lora")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds (compile happens here)")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--sampling-steps", type=int, default=4)
    p.add_argument("--variants", nargs="*", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="JSON path (a .md table beside it)")
    args = p.parse_args(argv)
    from report import write_report

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    with tempfile.TemporaryDirectory(prefix="speed-options-") as tmp:
        result = {"command": " ".join(sys.argv), "args": vars(args), "torch": torch.__version__, "result": measure(args, Path(tmp))}
    write_report(args.out, result, markdown(result["result"], args))
    return result


if __name__ == "__main__":
    main()
