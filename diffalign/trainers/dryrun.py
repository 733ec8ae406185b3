"""`diffalign train CONFIG --dry-run`: what a run would do and cost, without training it.

Prints the resolved config with where each value came from, the effective batch and learning rate, the cache status,
and time and memory per optimizer step measured on a few micro-batches of the real code path (the trainer's own setup,
batch building and method loss). Nothing is written to `train.output_dir` and the real cache is not built: when it is
not ready, the steps are timed on the built-in demo pairs at the configured resolution, in a temporary directory.
An optimizer step is estimated as `grad_accum` measured micro-batches plus one measured optimizer update.
"""

from __future__ import annotations

import resource
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from diffalign.config import Config, load_config
from diffalign.config.loading import show_config
from diffalign.data.errors import DataError
from diffalign.data.manifest import check_cache
from diffalign.trainers.optim import effective_lr


@dataclass
class DryRun:
    """What `dry_run` measured; `lines()` is what it prints."""

    config_text: str
    batch: str
    lr: str
    cache: str
    timed_on: str = ""
    micro_s: float = float("nan")
    optimizer_s: float = float("nan")
    step_s: float = float("nan")
    run_h: float = float("nan")
    peak_memory: str = ""
    rollout: str = ""  # online methods: the rollout round's cost, amortised over its steps
    rollout_share_s: float = 0.0

    def lines(self) -> list[str]:
        return [
            self.config_text.rstrip("\n"),
            "",
            f"effective batch  {self.batch}",
            f"learning rate    {self.lr}",
            f"cache            {self.cache}",
            f"timed on         {self.timed_on}",
            f"per micro-batch  {self.micro_s:.3f} s (forward + backward)",
            f"optimizer update {self.optimizer_s:.3f} s",
            *([f"rollout round    {self.rollout}"] if self.rollout else []),
            f"per step         {self.step_s:.3f} s (estimated: grad_accum x micro-batch + update"
            + (" + rollout share" if self.rollout else "") + ", one process)",
            f"whole run        {self.run_h:.2f} h for train.max_steps (one process; ÷ processes under accelerate launch)",
            f"peak memory      {self.peak_memory}",
            "dry run: nothing was trained or written",
        ]


def dry_run(path: str | Path | None, overrides: list[str], micro_batches: int = 3) -> DryRun:
    """Measure `micro_batches` micro-batches (after one warm-up) of the run `load_config(path, overrides)` describes."""
    cfg = load_config(path, overrides)
    t = cfg.train
    report = DryRun(
        config_text=show_config(path, overrides),
        batch=f"{t.batch_size} per micro-batch x {t.grad_accum} accumulation x processes "
        f"(= {t.batch_size * t.grad_accum} per process per step; x N under accelerate launch)",
        lr=f"{effective_lr(cfg.optim, t.batch_size, t.grad_accum, 1):g} on one process"
        + (" (optim.scale_lr: multiplied by the number of processes under accelerate launch)" if cfg.optim.scale_lr else ""),
        cache=_cache_status(cfg),
    )
    with tempfile.TemporaryDirectory(prefix="diffalign-dry-run-") as tmp:
        timing_cfg, report.timed_on = _timing_config(cfg, report.cache.startswith("ready"), Path(tmp), micro_batches)
        if cfg.train.mixed_precision == "fp16" and not torch.cuda.is_available():
            timing_cfg = timing_cfg.model_copy(update={"train": timing_cfg.train.model_copy(update={"mixed_precision": "no"})})
            report.timed_on += "; fp16 needs a GPU: timed in fp32 on this CPU"
        _measure(timing_cfg, report, micro_batches)
    report.step_s = t.grad_accum * report.micro_s + report.optimizer_s + report.rollout_share_s
    report.run_h = report.step_s * t.max_steps / 3600
    return report


def _cache_status(cfg: Config) -> str:
    if cfg.data.source.kind == "prompts":
        return "none: an online method samples its images during training (data.source.kind = prompts)"
    root = Path(cfg.data.cache_dir)
    try:
        manifest = check_cache(cfg)
    except DataError as e:  # missing, unfinished, or built for other settings: the message says which
        return f"not ready: {str(e).splitlines()[0]}"
    counts = manifest["counts"]
    return f"ready at {root}: {counts['items']} items ({counts['skipped']} skipped, {counts['ties']} ties) in {counts['shards']} shards"


def _timing_config(cfg: Config, cache_ready: bool, tmp: Path, micro_batches: int) -> tuple[Config, str]:
    """The config the timing runs under: the same model, method, precision and batch, one micro-batch per step, in `tmp`."""
    data = cfg.model_dump(mode="json")
    data["train"].update(output_dir=str(tmp / "run"), max_steps=micro_batches + 1, grad_accum=1, checkpoint_every=0,
                         resume=None, dataloader_workers=0)
    data["log"].update(tracker="none", progress=False)
    data["eval"]["validation_every"] = 0
    if cfg.data.source.kind == "prompts":
        return Config.model_validate(data), f"the run's own prompts ({cfg.method.name} samples its images)"
    if cache_ready:
        return Config.model_validate(data), f"the real cache ({cfg.data.cache_dir})"
    pairs = cfg.train.batch_size * (micro_batches + 1)
    data["data"].update(source={"kind": "demo", "num_pairs": pairs, "image_size": cfg.data.resolution},
                        cache_dir=str(tmp / "cache"), max_items=None, min_score_gap=0.0, ties="keep", scores=[], score_options={},
                        reward_scorer=None)
    return Config.model_validate(data), f"{pairs} built-in demo pairs at {cfg.data.resolution} px (the real cache is not ready)"


def _measure(cfg: Config, report: DryRun, micro_batches: int) -> None:
    from diffalign.trainers.loop import PreferenceTrainer

    trainer = PreferenceTrainer(cfg)
    trainer.setup()
    device = trainer.accelerator.device
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    def timed(fn) -> float:
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    if trainer.online:
        _measure_online(trainer, report, micro_batches, timed)
    else:
        _measure_offline(trainer, report, micro_batches, timed)
    if cuda:
        report.peak_memory = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB allocated on {device}"
    else:
        report.peak_memory = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB process RSS (CPU run)"


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def _measure_offline(trainer, report: DryRun, micro_batches: int, timed) -> None:
    micro, update = [], []
    for i in range(micro_batches + 1):  # the first is a warm-up (allocations, kernel selection)
        batch = next(trainer.loader)
        m = timed(lambda: trainer.micro_step(batch, 0))
        u = timed(lambda: (trainer.optimizer.step(), trainer.optimizer.zero_grad(set_to_none=True)))
        trainer.step += 1
        if i:
            micro.append(m)
            update.append(u)
    report.micro_s, report.optimizer_s = _median(micro), _median(update)


def _measure_online(trainer, report: DryRun, micro_batches: int, timed) -> None:
    """One rollout round (sampling, decoding, rewards), then the training steps on it: a whole step each (every
    micro-batch and trained step; reported per micro-batch of the real run) and the optimizer update."""
    feed = trainer.feed
    rollout = timed(lambda: setattr(feed, "round", feed.collect(trainer.models, 0)))
    steps = min(feed.steps_per_round, micro_batches + 1)
    report.rollout = (f"{rollout:.3f} s for {feed.round_size} trajectories ({feed.grid.steps} steps, G = {feed.group_size}), "
                      f"over {feed.steps_per_round} optimizer steps")
    report.rollout_share_s = rollout / feed.steps_per_round
    grads, update = [], []
    for i in range(steps):
        g = timed(lambda: trainer.online_micro_steps())
        u = timed(lambda: (trainer.optimizer.step(), trainer.optimizer.zero_grad(set_to_none=True)))
        trainer.step += 1
        if i or steps == 1:
            grads.append(g)
            update.append(u)
    report.micro_s, report.optimizer_s = _median(grads), _median(update)  # the timing config has grad_accum 1
