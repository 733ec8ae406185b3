"""Cost of one training step of each offline method, against its own floor and against a Diffusion-DPO step on the same
model, batch and data.

Every variant is a real `PreferenceTrainer` (`PreferenceTrainer(cfg).setup(components)`, then `optimizer_step()`)
built from the same config (the `toy/dpo` recipe's model, LoRA, data, optimizer and batch) with only the `method`
section changed, on ONE shared latent cache (a synthetic K = 4 cache: pairs for the pairwise methods, ranked
lists for RankDPO, per-scorer scores for SmPO). All trainers hold copies of the same weights, draw the same
items in the same order and, at a given step, the same per-item t and ε (counter-based draws), so round r
trains every variant on the same batch.

Timing: all variants in one process, interleaved: each round steps every variant once, the order rotating by
one per round, after `--warmup` untimed rounds. The reported ratio is the MEDIAN over rounds of (variant's step
time / the DPO step time of the same round); `dpo (copy)` is a second, identical DPO trainer, so its ratio
shows the measurement noise. Absolute times are context only.

Forward counts: the UNet calls of every step are counted by wrapping the trainer's `Models.policy` and
`Models.reference` (rows per call; a call under `no_grad` that is not the reference's own forward is an
inversion call), and checked against `diffalign.diffusion.inversion_levels` on the step's t. They are reported
in units of one forward over the 2B images of a DPO step's pairs ("pair forwards"): a DPO step is 1 policy
forward (+ its backward) and 1 reference forward. `E[...]` is the expectation under t ~ U{0..T-1}; the
sequential calls are the inversion's UNet calls one after another (max over the batch, ×2 with ReNoise).

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/method_step_cost.py --out benchmarks/results/method-step-cost-cpu.json
    python benchmarks/method_step_cost.py --models toy --batch 2 --rounds 1 --warmup 0 --prompts 4     # smoke check
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

MODELS = {"toy": "builtin:toy", "tiny-sdxl": "builtin:tiny-sdxl"}

# name -> the method section (everything else is the shared toy/dpo config); beta does not change the cost
VARIANTS: dict[str, dict] = {
    "dpo": {"name": "dpo"},
    "dpo (copy)": {"name": "dpo"},
    "dpo, label_noise conservative ε=0.1": {"name": "dpo", "label_noise": "conservative", "noise_rate": 0.1},
    "dpo, label_noise unbiased ε=0.1": {"name": "dpo", "label_noise": "unbiased", "noise_rate": 0.1},
    "inpo, inversion_steps 10": {"name": "inpo", "inversion_steps": 10},
    "inpo, inversion_steps 10, inversion_model reference": {"name": "inpo", "inversion_steps": 10, "inversion_model": "reference"},
    "inpo, inversion_steps 5": {"name": "inpo", "inversion_steps": 5},
    "smpo, inversion_steps 10 (ReNoise)": {"name": "smpo", "inversion_steps": 10, "reward": "toy-checklist"},
    "smpo, inversion_steps 5 (ReNoise)": {"name": "smpo", "inversion_steps": 5, "reward": "toy-checklist"},
    "rankdpo, K = 4": {"name": "rankdpo"},
    "dense, weighted": {"name": "dense"},
    "dense, sampled": {"name": "dense", "variant": "sampled"},
    "sft": {"name": "sft"},
    "npo": {"name": "npo"},
    "self_npo, K = 5": {"name": "self_npo"},
}


def base_config(args, model: str, workdir: Path) -> dict:
    from diffalign.config import load_config

    cfg = load_config("toy/dpo").model_dump(mode="json")
    cfg["model"]["pretrained"] = MODELS[model]
    cfg["model"]["finetune"] = args.finetune
    cfg["data"]["cache_dir"] = str(workdir / f"cache-{model}")
    cfg["data"]["source"].update(num_prompts=args.prompts, num_inference_steps=args.sampling_steps)
    cfg["train"].update(batch_size=args.batch, max_steps=1_000_000, checkpoint_every=0)
    return cfg


def variant_config(base: dict, method: dict, workdir: Path, tag: str):
    from diffalign.config import validate_config

    cfg = copy.deepcopy(base)
    cfg["method"] = dict(method)
    cfg["train"]["output_dir"] = str(workdir / tag)
    return validate_config(cfg, origin="benchmarks/method_step_cost.py")


class Counter:
    """UNet rows per step, by kind: 'train' (policy forward with gradients), 'reference' (the reference's training
    forward), 'inversion' (no-gradient calls of either UNet inside the inversion), 'teacher' (Self-NPO's EMA teacher);
    plus the sequential call counts of the inversion and the teacher, the t of each step's batch, and the first
    training call's inputs (what the floor replays)."""

    def __init__(self, trainer):
        self.rows = {"train": 0, "reference": 0, "inversion": 0, "teacher": 0}
        self.inversion_calls = self.teacher_calls = 0
        self.t: torch.Tensor | None = None
        self.sample: tuple | None = None
        models, method = trainer.models, trainer.method
        policy, reference, teacher, loss = models.policy, models.reference, models.teacher, method.loss

        def count_policy(x_t, t, cond):
            kind = "train" if torch.is_grad_enabled() else "inversion"
            self.rows[kind] += x_t.shape[0]
            self.inversion_calls += kind == "inversion"
            if kind == "train" and self.sample is None:
                self.sample = (x_t.detach().clone(), t.clone(), cond)
            return policy(x_t, t, cond)

        def count_teacher(x_t, t, cond):
            self.rows["teacher"] += x_t.shape[0]
            self.teacher_calls += 1
            return teacher(x_t, t, cond)

        def count_reference(x_t, t, cond):
            kind = "reference" if torch.is_grad_enabled() else "inversion"  # the inversion predicts under no_grad
            self.rows[kind] += x_t.shape[0]
            self.inversion_calls += kind == "inversion"
            return reference(x_t, t, cond)

        def record_loss(models_, batch, draws):
            self.t = batch.t.clone()
            return loss(models_, batch, draws)

        models.policy, models.reference, models.teacher, method.loss = count_policy, count_reference, count_teacher, record_loss

    def take(self) -> dict:
        out = {**self.rows, "inversion_calls": self.inversion_calls, "teacher_calls": self.teacher_calls, "t": self.t.tolist()}
        self.rows = dict.fromkeys(self.rows, 0)
        self.inversion_calls = self.teacher_calls = 0
        return out


class Floor:
    """A variant's own floor: only the UNet work its step cannot avoid, replayed from the step's counted forwards on
    inputs captured once (no data loading, noising, batch building, loss algebra or metrics):

        one policy forward + backward over the step's training rows (one call, whatever the method's call pattern),
        one reference forward over its reference rows (LoRA: adapters disabled; full: the frozen copy),
        its inversion and teacher calls, one after another, each over its rows (they are sequential by nature),
        gradient clip and AdamW step.

    It trains its own copy of the variant's UNet with its own AdamW (the variant's weights and moments stay its own).
    ``ours ÷ floor`` is then what the method's code adds to the work it must do."""

    def __init__(self, trainer, sample, inversion_model: str = "policy"):
        from floor import UNetReplay

        self.replay = UNetReplay(trainer, sample)
        self.inversion_model = inversion_model  # the UNet that inverts (InPO's option): the policy or the reference

    def step(self, counts: dict) -> None:
        r = self.replay
        r.train_forward(counts["train"])
        with torch.no_grad():
            if counts["reference"]:
                with r.reference() as reference:
                    r.forward(reference, counts["reference"])
            with r.reference() if self.inversion_model == "reference" else contextlib.nullcontext(r.unet) as inverting:
                for _ in range(counts["inversion_calls"]):
                    r.forward(inverting, counts["inversion"] // counts["inversion_calls"])
            for _ in range(counts["teacher_calls"]):  # the teacher is a copy of the policy: the same cost
                r.forward(r.unet, counts["teacher"] // counts["teacher_calls"])
        r.step()


def predicted_inversion(method: dict, t: torch.Tensor, num_train_timesteps: int) -> tuple[int, int]:
    """(inversion rows, sequential inversion calls) of one step from `inversion_levels` on the batch's t."""
    from diffalign.diffusion import inversion_levels

    if method["name"] not in ("inpo", "smpo"):
        return 0, 0
    renoise = method["name"] == "smpo"
    _, calls = inversion_levels(t, method["inversion_steps"], num_train_timesteps, "exact", renoise=renoise)
    return 2 * int(calls.sum()), int(calls.max())  # two images (winner, loser) per item, each inverted from its x_0


def expected_inversion(method: dict, num_train_timesteps: int) -> float:
    """E over t ~ U{0..T-1} of the inversion's UNet calls per image, in pair forwards (= calls per image)."""
    from diffalign.diffusion import inversion_levels

    if method["name"] not in ("inpo", "smpo"):
        return 0.0
    _, calls = inversion_levels(
        torch.arange(num_train_timesteps), method["inversion_steps"], num_train_timesteps, "exact", renoise=method["name"] == "smpo"
    )
    return float(calls.float().mean())


def measure(args, model: str, workdir: Path) -> dict:
    from diffalign.data import prepare_cache
    from diffalign.models.loading import load_components
    from diffalign.trainers.loop import PreferenceTrainer

    base = base_config(args, model, workdir)
    first = variant_config(base, VARIANTS["dpo"], workdir, f"{model}-prepare")
    master = load_components(first.model)
    t0 = time.perf_counter()
    prepare_cache(first, copy.deepcopy(master), progress=False)
    prepare_s = time.perf_counter() - t0
    names = [n for n in VARIANTS if not args.variants or n in args.variants or n == "dpo"]
    trainers, counters = {}, {}
    for i, name in enumerate(names):
        trainer = PreferenceTrainer(variant_config(base, VARIANTS[name], workdir, f"{model}-{i}"))
        trainer.setup(copy.deepcopy(master))  # finds the cache complete; each trainer its own copy of the same weights
        trainers[name], counters[name] = trainer, Counter(trainer)
    T = trainers["dpo"].batch_rules.num_train_timesteps
    items = len(trainers["dpo"].dataset)
    floors = {}
    for _ in range(max(args.warmup, 1)):  # at least one untimed step: it captures the inputs each floor replays
        for name in names:
            trainers[name].optimizer_step()
            count = counters[name].take()
            floors.setdefault(name, Floor(trainers[name], counters[name].sample, VARIANTS[name].get("inversion_model", "policy")))
            floors[name].step(count)
    seconds = {n: [] for n in names}
    floor_seconds = {n: [] for n in names}
    counts = {n: [] for n in names}
    for r in range(args.rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            out = trainers[name].optimizer_step()
            seconds[name].append(time.perf_counter() - t0)
            if not all(torch.isfinite(torch.tensor(v)) for v in out.values()):
                print(f"warning: {model} {name}: non-finite metrics in round {r}: {out}", flush=True)
            counts[name].append(counters[name].take())
            t0 = time.perf_counter()  # the variant's floor, replaying this very step's forwards
            floors[name].step(counts[name][-1])
            floor_seconds[name].append(time.perf_counter() - t0)
        ratios = ", ".join(f"{seconds[n][-1] / seconds['dpo'][-1]:.2f}" for n in names[1:])
        print(f"{model}: round {r + 1}/{args.rounds}: dpo {seconds['dpo'][-1] * 1e3:.0f} ms; ratios {ratios}", flush=True)
    rows = {}
    for name in names:
        method = VARIANTS[name]
        pair_rows = 2 * args.batch  # rows of one DPO pair forward
        ratios = [s / d for s, d in zip(seconds[name], seconds["dpo"])]
        inv_rows, seq_calls = [], []
        for c in counts[name]:
            predicted_rows, predicted_seq = predicted_inversion(method, torch.tensor(c["t"]), T)
            if (predicted_rows, predicted_seq) != (c["inversion"], c["inversion_calls"]):
                raise SystemExit(
                    f"{model} {name}: counted {c['inversion']} inversion rows in {c['inversion_calls']} calls, "
                    f"inversion_levels predicts {predicted_rows} in {predicted_seq}"
                )
            inv_rows.append(c["inversion"] / pair_rows)
            seq_calls.append(c["inversion_calls"])
        over_floor = [s / f for s, f in zip(seconds[name], floor_seconds[name])]
        rows[name] = {
            "method": method,
            "floor_ratio_median": statistics.median(over_floor),
            "floor_ratio_q1_q3": quartiles(over_floor),
            "floor_ms_median": 1e3 * statistics.median(floor_seconds[name]),
            "teacher_forwards": statistics.mean(c["teacher"] / pair_rows for c in counts[name]),
            "ratio_median": statistics.median(ratios),
            "ratio_q1_q3": quartiles(ratios),
            "ratio_of_medians": statistics.median(seconds[name]) / statistics.median(seconds["dpo"]),
            "ms_median": 1e3 * statistics.median(seconds[name]),
            "train_forwards": statistics.mean(c["train"] / pair_rows for c in counts[name]),
            "reference_forwards": statistics.mean(c["reference"] / pair_rows for c in counts[name]),
            "inversion_forwards_mean": statistics.mean(inv_rows),
            "inversion_forwards_expected": expected_inversion(method, T),
            "inversion_sequential_calls_mean": statistics.mean(seq_calls),
            "ratios": [round(x, 4) for x in ratios],
            "ms_all": [round(1e3 * s, 2) for s in seconds[name]],
        }
        extra = rows[name]["inversion_forwards_mean"]
        rows[name]["step_cost_per_inversion_forward"] = (rows[name]["ratio_median"] - 1) / extra if extra else None
    unet = trainers["dpo"].components.unet
    params = sum(p.numel() for p in unet.parameters())
    return {"model": MODELS[model], "unet_params": params, "items": items, "prepare_seconds": prepare_s, "num_train_timesteps": T, "variants": rows}


def quartiles(values: list[float]) -> list[float] | None:
    """[Q1, Q3] of the rounds (None for one round)."""
    if len(values) < 2:
        return None
    q = statistics.quantiles(values, n=4)
    return [q[0], q[2]]


def markdown(model: str, res: dict, args) -> str:
    lines = [
        f"**{model}** (`{res['model']}`, UNet {res['unet_params'] / 1e6:.2f} M params, {args.finetune}, {args.batch} items × "
        f"32 px per step, {res['items']} cached items, {args.rounds} interleaved rounds after {args.warmup} warm-up)",
        "",
        "| variant | time ÷ own floor (median of rounds) | IQR | time ÷ DPO (median of rounds) | IQR | policy fwd+bwd | reference fwd | "
        "inversion fwd (this run) | inversion fwd E[t~U] | sequential inversion calls | teacher fwd | ms/step (median) | floor ms/step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def iqr(q) -> str:
        return "–" if q is None else f"{q[0]:.2f}–{q[1]:.2f}"

    for name, r in res["variants"].items():
        inv = "0" if not r["inversion_forwards_mean"] else f"{r['inversion_forwards_mean']:.2f}"
        exp = "0" if not r["inversion_forwards_expected"] else f"{r['inversion_forwards_expected']:.2f}"
        seq = "0" if not r["inversion_sequential_calls_mean"] else f"{r['inversion_sequential_calls_mean']:.1f}"
        lines.append(
            f"| {name} | **{r['floor_ratio_median']:.2f}** | {iqr(r['floor_ratio_q1_q3'])} | **{r['ratio_median']:.2f}** | "
            f"{iqr(r['ratio_q1_q3'])} | {r['train_forwards']:g} | {r['reference_forwards']:g} | {inv} | {exp} | {seq} | "
            f"{r['teacher_forwards']:g} | {r['ms_median']:.0f} | {r['floor_ms_median']:.0f} |"
        )
    lines += ["", "Forwards are in pair forwards (one UNet forward over the 2B images of a DPO step's B pairs). The floor replays "
              "each step's counted forwards alone (`Floor`: one policy forward + backward, the reference forward, the inversion "
              "or teacher calls one after another, clip, AdamW), right after the step, on its own copy of the weights."]
    per = {n: r["step_cost_per_inversion_forward"] for n, r in res["variants"].items() if r["step_cost_per_inversion_forward"]}
    if per:
        lines.append(
            "Extra time per inversion pair forward, (ratio − 1) ÷ inversion fwd, in DPO steps: "
            + "; ".join(f"{n}: {v:.3f}" for n, v in per.items())
            + "."
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--batch", type=int, default=8, help="items (pairs for the pairwise methods) per step")
    p.add_argument("--finetune", choices=["lora", "full"], default="lora", help="lora: the toy recipes' setting")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--prompts", type=int, default=32, help="toy training captions in the shared synthetic cache (K = 4 each)")
    p.add_argument("--sampling-steps", type=int, default=4, help="DDIM steps that generate the cached images (not timed)")
    p.add_argument("--variants", nargs="*", default=None, help="a subset of the variant names (dpo is always run)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workdir", default=None, help="keep the caches and trainer outputs here (default: a temporary folder)")
    p.add_argument("--out", default=None, help="JSON path (a .md table beside it)")
    args = p.parse_args(argv)
    from report import write_report

    import diffalign

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # random-ish weights make subnormals; x86 slows down 5-10x on them (docs/benchmarks.md)
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="method-step-cost-")
    workdir = Path(args.workdir or tmp.name)
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    result = {
        "command": " ".join(sys.argv),
        "args": vars(args),
        "machine": {
            "cpu": cpu,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "diffalign": getattr(diffalign, "__version__", None),
        },
        "models": {},
    }
    tables = []
    for model in args.models:
        result["models"][model] = res = measure(args, model, workdir)
        tables.append(markdown(model, res, args))
    if tmp is not None:
        tmp.cleanup()
    write_report(args.out, result, "\n".join(tables))
    return result


if __name__ == "__main__":
    main()
