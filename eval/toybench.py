"""`diffalign bench toy`: does a method move the toy model toward the preference? Measured like a paper's table.

1. Data: one synthetic preference cache (RankDPO's Syn-Pic recipe): K images per training caption sampled
   from the base toy model, ranked by the toy checklist (φ = averaged pairwise win-rate).
2. Train: SFT on the winners (always, the baseline to beat) and each requested method, from its shipped
   config `configs/toy/<method>.yaml`.
3. Evaluate: the same held-out captions and seeds for the base and every aligned model; score with the
   toy checklist; win-rate of aligned over base (ties ½, 95% bootstrap interval clustered by prompt) and
   mean score change per dimension.

The report records the hashes of the base weights, the scorer configuration and the held-out split, which
are frozen before any method is tuned.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from diffalign.config import BUILTIN_TOY, ModelConfig, apply_overrides, read_yaml, shipped_config_path, validate_config
from diffalign.data import prepare_cache
from diffalign.eval.imagefolder import write_folder
from diffalign.eval.winrate import win_rate
from diffalign.models.loading import load_components
from diffalign.models.sampling import sample_images
from diffalign.scorers import load_scorer
from diffalign.scorers.registry import scorer_identity
from diffalign.toy.checklist import TOY_CHECKLIST
from diffalign.toy.scenes import HELD_OUT, TRAIN

SCORER = "toy-checklist"


@dataclass
class BenchSettings:
    methods: tuple[str, ...] = ("dpo",)
    model: str = BUILTIN_TOY
    workdir: Path = Path("outputs/bench_toy")
    train_rounds: int = 16  # synthetic ranked lists per training caption (each of K images, its own seeds): 1,600 lists
    images_per_prompt: int = 4  # K (Syn-Pic: 4)
    eval_split: str = "held_out"  # "held_out" for reported numbers; "train" (other seeds) to tune methods without touching held-out
    eval_prompts: int | None = None  # captions to evaluate (None: all of the split)
    eval_seeds: int = 4  # samples per held-out caption
    num_inference_steps: int = 20
    guidance_scale: float = 3.0
    max_steps: int | None = None  # cap every method's training steps (quick runs)
    overrides: tuple[str, ...] = ()  # dotted overrides: "key=value" for every method's config, "dpo:key=value" for one
    seed: int = 0


# The CI-size configuration (`diffalign bench toy --quick`, tests/test_toybench.py): one ranked list per training
# caption, 10 DDIM steps, 100 training steps, 2 seeds per held-out caption. It shows the direction, not the number.
QUICK = dict(train_rounds=1, eval_seeds=2, num_inference_steps=10, max_steps=100)


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def frozen_hashes(model: str) -> dict[str, str]:
    """What must not change while methods are tuned: base weights, scorer, held-out split."""
    from diffalign.data.identity import weights_digest

    return {
        "base_weights": _digest(weights_digest(ModelConfig(pretrained=model))),
        "scorer_config": _digest(scorer_identity(SCORER)),
        "held_out_split": _digest([s.caption for s in HELD_OUT]),
    }


def method_config(name: str, settings: BenchSettings):
    """The method's shipped toy config, pointed at the bench's model, shared cache and output directory."""
    path = shipped_config_path(f"toy/{name}")
    if path is None:
        raise ValueError(f"no toy config for method {name!r} (configs/toy/{name}.yaml)")
    raw = read_yaml(path)
    raw.setdefault("model", {})["pretrained"] = settings.model
    data = raw.setdefault("data", {})
    data["cache_dir"] = str(settings.workdir / "cache")
    source = data.setdefault("source", {"kind": "synthetic"})
    source.update(prompts=[s.caption for s in TRAIN] * settings.train_rounds, images_per_prompt=settings.images_per_prompt,
                  scorers=[SCORER], num_inference_steps=settings.num_inference_steps, guidance_scale=settings.guidance_scale,
                  seed=settings.seed)
    raw.setdefault("train", {})["output_dir"] = str(settings.workdir / name)
    if settings.max_steps is not None:
        raw["train"]["max_steps"] = settings.max_steps
    return validate_config(apply_overrides(raw, method_overrides(name, settings.overrides)), origin=f"{path} (bench toy)")


def method_overrides(name: str, overrides: tuple[str, ...]) -> list[str]:
    """The overrides for method `name`: unscoped ones ("optim.lr=1e-4") and those scoped to it ("dpo:method.beta=2000")."""
    out = []
    for o in overrides:
        scope, sep, rest = o.partition(":")
        if not sep or "=" in scope:  # no scope (a value may contain ':')
            out.append(o)
        elif scope == name:
            out.append(rest)
    return out


def _scores(scorer, images, prompts) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in scorer.score(images, prompts).items()}


def _grid(columns: dict[str, list[Image.Image]], rows: int, scale: int = 3) -> Image.Image:
    names = list(columns)
    side = columns[names[0]][0].width * scale
    head = 14
    grid = Image.new("RGB", (side * len(names), head + side * rows), "white")
    draw = ImageDraw.Draw(grid)
    for c, name in enumerate(names):
        draw.text((c * side + 2, 1), name, fill="black")
        for r in range(rows):
            grid.paste(columns[name][r].resize((side, side), Image.Resampling.NEAREST), (c * side, head + r * side))
    return grid


def markdown_table(report: dict) -> str:
    dims = [d for d in TOY_CHECKLIST.dimensions]
    lines = [
        "| method | win-rate vs base [95% CI] | n (prompts) | " + " | ".join(f"Δ{d}" for d in dims) + " | Δoverall | train s | eval s |",
        "|---|---|---|" + "---:|" * (len(dims) + 3),
    ]
    for name, r in report["methods"].items():
        cells = [f"{r['win_rate']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]", f"{r['n']} ({r['prompts']})"]
        cells += [f"{r['dims'][d]:+.3f}" for d in dims] + [f"{r['dims']['overall']:+.3f}", f"{r['train_seconds']:.0f}", f"{r['eval_seconds']:.0f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    base = report["base"]["scores"]
    lines.append("")
    lines.append("Base model on the same samples: " + ", ".join(f"{k} {v:+.3f}" for k, v in base.items()))
    return "\n".join(lines) + "\n"


def run_toy_bench(settings: BenchSettings, out: str | Path, progress: bool = True) -> dict:
    """Run the bench; write `out` (JSON), a markdown table, a base-vs-aligned grid and each model's samples
(``samples/<model>/`` with ``metadata.jsonl``) beside it."""
    from tqdm.auto import tqdm

    from diffalign.trainers.loop import PreferenceTrainer

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    scorer = load_scorer(SCORER)
    if settings.eval_split not in ("held_out", "train"):
        raise ValueError(f"eval_split must be 'held_out' or 'train', got {settings.eval_split!r}")
    split = HELD_OUT if settings.eval_split == "held_out" else TRAIN
    held = split[: settings.eval_prompts] if settings.eval_prompts else split
    prompts = [s.caption for s in held for _ in range(settings.eval_seeds)]
    seeds = [10_000 + settings.seed * 1_000 + j for _ in held for j in range(settings.eval_seeds)]  # unlike any synthetic-data seed
    sample_kw = dict(num_inference_steps=settings.num_inference_steps, guidance_scale=settings.guidance_scale, resolution=32)
    methods = ["sft", *(m for m in settings.methods if m != "sft")]
    report = {"settings": {**dataclasses.asdict(settings), "workdir": str(settings.workdir)}, "hashes": frozen_hashes(settings.model), "methods": {}}

    # 1. data: the shared synthetic cache, sampled from the base model and ranked by the checklist
    started = time.perf_counter()
    prepare_cache(method_config(methods[0], settings), progress=progress)
    report["data_seconds"] = time.perf_counter() - started

    # 2. the base model's samples, once
    started = time.perf_counter()
    base_images = sample_images(load_components(ModelConfig(pretrained=settings.model)), prompts, seeds, **sample_kw)
    base = _scores(scorer, base_images, prompts)
    report["base"] = {"scores": {k: float(base[k].mean()) for k in ("overall", *TOY_CHECKLIST.dimensions)},
                      "colour_accuracy": float((base["colour"] > 0).float().mean()), "eval_seconds": time.perf_counter() - started}
    columns = {"base": base_images}
    samples = out.parent / "samples"  # each model's images with metadata.jsonl: `diffalign compare` re-derives the table from them
    write_folder(samples / "base", base_images, prompts, seeds, model=settings.model, steps=settings.num_inference_steps,
                 guidance=settings.guidance_scale)

    # 3. each method: train, sample the same prompts and seeds, compare
    for name in tqdm(methods, desc="bench toy", disable=not progress):
        cfg = method_config(name, settings)
        started = time.perf_counter()
        trainer = PreferenceTrainer(cfg)
        trainer.setup()
        trainer.train()
        train_seconds = time.perf_counter() - started
        started = time.perf_counter()
        unet = trainer.accelerator.unwrap_model(trainer.unet).eval()
        images = sample_images(trainer.components, prompts, seeds, unet=unet, **sample_kw)
        scores = _scores(scorer, images, prompts)
        wr = win_rate(scores["overall"].tolist(), base["overall"].tolist(), prompts, seed=settings.seed)
        dims = {d: float((scores[d] - base[d]).mean()) for d in ("overall", *TOY_CHECKLIST.dimensions)}
        questions = {q.key: float(((scores[q.key] > 0).float() - (base[q.key] > 0).float()).mean()) for q in TOY_CHECKLIST.questions}
        report["methods"][name] = {**wr.as_dict(), "train_seconds": train_seconds, "eval_seconds": time.perf_counter() - started,
                                   "dims": dims, "yes_rate_change": questions}
        columns[name] = images
        write_folder(samples / name, images, prompts, seeds, model=settings.model, adapter=str(cfg.train.output_dir),
                     steps=settings.num_inference_steps, guidance=settings.guidance_scale)

    report["total_seconds"] = report["data_seconds"] + report["base"]["eval_seconds"] + sum(
        r["train_seconds"] + r["eval_seconds"] for r in report["methods"].values())
    out.write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown_table(report))
    rows = min(8, len(held))
    shown = [i * len(held) // rows * settings.eval_seeds for i in range(rows)]  # the first seed of captions spread over the split
    _grid({k: [v[j] for j in shown] for k, v in columns.items()}, rows).save(out.with_suffix(".png"))
    return report
