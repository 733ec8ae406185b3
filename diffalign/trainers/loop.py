"""The one training loop, on accelerate. It knows no method by name: it builds what the method's `Needs` ask for.

Read top to bottom: `__init__` validates, `setup` builds in dependency order, `train` runs the steps,
`save_checkpoint` / `resume` keep crash-safe state, `finish` exports the weights and prints a summary.

Per optimizer step and process: `grad_accum` micro-batches; each becomes a `LatentBatch` (all K images of
each item, one t, ε and caption dropout per item, the real preference signal) and the method turns it into a
loss through `Models` (policy, reference: adapters disabled for LoRA, a frozen copy for full fine-tuning).
Randomness is counter-based (`diffalign.randomness`), the data order is indexed (`sampler.py`), so a resumed
run continues exactly where a committed checkpoint left it.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed

from diffalign.config import Config, dump_config
from diffalign.data import LatentPairDataset, prepare_cache
from diffalign.data.manifest import evaluation_only, read_manifest, refuse_evaluation_only
from diffalign.io import atomic_write_text, load_safetensors, save_safetensors, torch_load, torch_save
from diffalign.locks import directory_lock
from diffalign.models.init_from import start_from
from diffalign.models.loading import Components, load_components
from diffalign.models.lora import attach_lora, save_lora, save_lora_kohya, trainable_state_dict
from diffalign.models.quiet import quiet_loading
from diffalign.randomness import Draws, seed63
from diffalign.trainers import checkpoint as ckpt
from diffalign.trainers import deepspeed_zero as zero
from diffalign.trainers.batch import BatchRules, build_batch
from diffalign.trainers.methods import build_method
from diffalign.trainers.model_card import model_card
from diffalign.trainers.models import Models, Schedule
from diffalign.trainers.optim import build_lr_schedule, build_optimizer, effective_lr
from diffalign.trainers.report import MetricsLog, print_summary
from diffalign.trainers.sampler import GlobalBatchSampler
from diffalign.trainers.sharding import (
    SHARDED_DIR,
    ShardingError,
    fsdp_plugin,
    fsdp_requested,
    full_state_dict,
    full_value,
    load_sharded,
    refuse_unsupported,
    save_full_unet,
    save_sharded,
    shard,
    shard_summary,
)
from diffalign.trainers.speed import apply_speed_options, sdpa_context
from diffalign.trainers.teacher import EMATeacher
from diffalign.trainers.validation import Validation, check_validation_scorers

# Fields that must match between a checkpoint and the run resuming it (the rest may change, e.g. max_steps).
# Fields that decide what is trained, on which items in which order: a checkpoint resumes only under the same values.
# Every other setting may change on resume; the changes are applied (the optimizer's lr, betas, eps and weight decay
# included) and printed.
IDENTITY_FIELDS = (
    "model.pretrained", "model.single_file_config", "model.revision", "model.variant", "model.init_from", "model.prediction_type", "model.finetune",
    "model.lora", "method", "data.resolution", "data.time_ids", "data.caption_dropout", "data.ties", "data.min_score_gap",
    "data.phi_ties", "optim.optimizer", "train.seed", "train.batch_size", "train.grad_accum", "train.mixed_precision",
)
# Settings that never count as a change on resume (where the run lives, whether it resumes).
_NOT_SETTINGS = ("train.output_dir", "train.resume")
# Which items a cache yields and how they pair. 2: `data.ties = drop` also drops items whose best and worst images tie
# by rank or score (before: only label 0.5), and labelled pairs keep soft labels. A checkpoint of rules 1 would resume
# on another item set and data order, so it is refused with that reason.
PAIRING_RULES = 2


class TrainingError(RuntimeError):
    """Training cannot continue (non-finite loss, unusable checkpoint); the message says where."""


@dataclass
class TrainResult:
    output_dir: Path
    final_dir: Path
    steps: int
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)


def _dotted(cfg: Config, key: str):
    node = cfg.model_dump(mode="json")
    for part in key.split("."):
        node = node[part]
    return node


class PreferenceTrainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.method = build_method(cfg.method)
        self.online = self.method.needs.feed == "prompts"
        if self.online != (cfg.data.source.kind == "prompts"):
            raise TrainingError(
                f"method {self.method.name!r} " + ("samples its own images: data.source.kind must be 'prompts'" if self.online else
                                                    "trains on cached images: data.source.kind 'prompts' is for online methods"))
        if self.online and cfg.model.finetune == "lora" and cfg.model.lora.dropout > 0:
            raise TrainingError("online methods need model.lora.dropout = 0: dropout would make the trained policy differ from the "
                                "one that sampled the rollouts (their ratio must start at 1)")
        self.output_dir = Path(cfg.train.output_dir)
        self.checkpoint_root = self.output_dir / "checkpoints"
        self.held = contextlib.ExitStack()  # what this run holds until it ends: the output directory's lock

    # ------------------------------------------------------------------------------------------ setup

    def setup(self, components: Components | None = None) -> None:
        cfg = self.cfg
        tracker = None if cfg.log.tracker == "none" else cfg.log.tracker
        if tracker == "wandb" and importlib.util.find_spec("wandb") is None:
            raise TrainingError("log.tracker = wandb needs wandb: pip install 'diffalign[wandb]' (or log.tracker=tensorboard)")
        if evaluation_only(cfg):  # refused before the cache is built; a marked cache is refused again when read
            raise TrainingError(f"data.source.evaluation_only: the cache at {cfg.data.cache_dir} is evaluation-only (held-out "
                                "captions) and may never become training data; evaluate with it (`diffalign eval ranking`)")
        self.zero = zero.deepspeed_requested()  # DeepSpeed ZeRO, from the accelerate config (`diffalign.trainers.deepspeed_zero`)
        if self.zero:
            if importlib.util.find_spec("deepspeed") is None:
                raise TrainingError("the accelerate config asks for DeepSpeed, which is not installed: pip install 'diffalign[deepspeed]'")
            try:  # before accelerate starts (it would fall back or fail less clearly)
                zero.refuse_unsupported(cfg, self.online)
            except zero.DeepSpeedConfigError as e:
                raise TrainingError(str(e)) from None
        self.accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision, log_with=tracker, project_dir=str(self.output_dir / "logs"),
                                       **(zero.accelerator_kwargs() if self.zero else {}))
        acc = self.accelerator
        if self.zero:  # 'auto' values from this config, before `prepare` builds the engine; a mismatch is named
            try:
                zero.resolve(acc.state.deepspeed_plugin, cfg, acc.num_processes)
            except zero.DeepSpeedConfigError as e:
                raise TrainingError(str(e)) from None
        if acc.is_main_process:  # one run writes an output directory at a time (the other ranks are this run's own)
            self.held.enter_context(directory_lock(self.output_dir, "train.output_dir"))
        self.sharded = fsdp_requested(acc)  # FSDP2 full shard, from the accelerate config (`diffalign.trainers.sharding`)
        if self.sharded:
            try:
                refuse_unsupported(cfg)
                self.fsdp_plugin = fsdp_plugin(acc)
            except ShardingError as e:
                raise TrainingError(str(e)) from None
        if cfg.train.mixed_precision == "fp16" and acc.device.type == "cpu":
            raise TrainingError("train.mixed_precision = fp16 needs a GPU; on the CPU use 'no' or 'bf16'")
        check_validation_scorers(cfg, warn=acc.is_main_process)  # unknown validation scorers fail before anything loads
        self.validation = Validation(cfg.eval, cfg.data.resolution, lora=cfg.model.finetune == "lora")
        set_seed(cfg.train.seed)  # only for anything outside our counter-based draws
        if cfg.train.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True

        # 1. the frozen parts and the data: components load once; the cache is built by the main process (an online
        #    method's data is its prompt list; its text encoders and VAE stay on the device for the rollouts)
        with zero.whole_models(acc) if self.zero else contextlib.nullcontext():  # never partitioned at construction
            self.components = components or load_components(cfg.model)
        if self.online:
            self._setup_prompts()
        else:
            self._setup_cache()

        # 2. the trained UNet; the reference is made BEFORE any checkpoint is loaded, so it stays the base (or the
        #    previous output of `model.init_from`, merged after the cache, which always comes from `model.pretrained`)
        if cfg.model.init_from:
            with zero.whole_models(acc) if self.zero else contextlib.nullcontext():
                self.components = start_from(self.components, cfg.model.init_from)
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.train.mixed_precision, torch.float32)
        unet = self.components.unet
        self.lora = cfg.model.finetune == "lora"
        self.reference = None
        if self.lora:
            with quiet_loading():  # the frozen base in the weight dtype (one move, no fp32 transient)
                unet.to(acc.device, dtype=self.weight_dtype)
            attach_lora(unet, cfg.model.lora)
            for p in unet.parameters():  # LoRA parameters train in fp32 under mixed precision
                if p.requires_grad:
                    p.data = p.data.float()
        else:
            unet.requires_grad_(True)
            if self.method.needs.reference:  # copied and cast on the host, then moved
                with quiet_loading():
                    self.reference = copy.deepcopy(unet).requires_grad_(False).eval().to(dtype=self.weight_dtype)
                if self.sharded:  # forward-only, sharded like the policy
                    shard(self.reference.to(acc.device), self.fsdp_plugin)
                elif cfg.model.reference_offload and acc.device.type != "cpu":
                    from accelerate import cpu_offload

                    cpu_offload(self.reference, execution_device=acc.device)
                else:
                    self.reference.to(acc.device)
            unet.to(acc.device)
            if self.sharded:  # parameters become DTensors split over the processes; the optimizer is built on them below
                shard(unet, self.fsdp_plugin)
        self.teacher = None  # an EMA copy of the policy as it starts (Self-NPO), made before training changes it
        if self.method.needs.teacher_decay is not None:
            self.teacher = EMATeacher(unet, self.method.needs.teacher_decay)
        if cfg.model.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        if cfg.model.attention == "xformers":
            try:
                import xformers  # noqa: F401
            except ImportError:
                raise TrainingError("model.attention = xformers needs xformers: pip install 'diffalign[xformers]'") from None
            unet.enable_xformers_memory_efficient_attention()
        for note in apply_speed_options(cfg.model, unet, self.reference, acc.device):
            if acc.is_main_process:
                print(f"diffalign train: {note}", flush=True)
        unet.train()
        for module in (self.components.vae, *self.components.text_encoders):
            module.requires_grad_(False)

        # 3. optimizer, schedule, EMA
        self.trainable = params = [p for p in unet.parameters() if p.requires_grad]
        self.lr = effective_lr(cfg.optim, cfg.train.batch_size, cfg.train.grad_accum, acc.num_processes)
        optimizer = build_optimizer(params, cfg.optim, self.lr)
        self.lr_schedule = build_lr_schedule(optimizer, cfg.optim, cfg.train.max_steps)
        self.ema = None
        if cfg.train.ema.enabled:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(params, decay=cfg.train.ema.decay)
        if self.sharded:  # already sharded: no DDP wrapper (accelerate would add one on the CPU fallback)
            self.unet, self.optimizer = unet, acc.prepare_optimizer(optimizer)
        else:
            self.unet, self.optimizer = acc.prepare(unet, optimizer)

        scheduler = self.components.scheduler
        self.schedule = Schedule(scheduler.alphas_cumprod.float(), self.components.prediction_type)
        if not self.online:
            self.batch_rules = BatchRules(
                num_train_timesteps=scheduler.config.num_train_timesteps,
                scaling_factor=self.components.vae.config.scaling_factor,
                empty_prompt_embeds=self.dataset.empty_prompt_embeds,
                empty_pooled=self.dataset.empty_pooled,
                caption_dropout=cfg.data.caption_dropout,
            )
        self.models = Models(self.unet, acc, self.schedule, self.weight_dtype, lora=self.lora, frozen_reference=self.reference,
                             teacher=self.teacher.unet if self.teacher else None, attention=sdpa_context(cfg.model.sdpa_backend, acc.device))

        # 4. where to start
        self.step, self.micro_batch = 0, 0
        self.skipped_steps = self.skips_in_a_row = 0
        self.feed = None
        if self.online:
            from diffalign.trainers.online import OnlineFeed, OnlineSetupError

            try:
                self.feed = OnlineFeed(cfg, self.method, self.prompts, self.components, acc, self.scorers)
            except OnlineSetupError as e:
                raise TrainingError(str(e)) from None
        self.resumed_from = self.resume()
        if not self.online:
            self.sampler = GlobalBatchSampler(
                len(self.dataset), cfg.train.batch_size, cfg.train.seed, acc.num_processes, acc.process_index, self.micro_batch
            )
            self.loader = iter(
                torch.utils.data.DataLoader(
                    self.dataset, batch_size=cfg.train.batch_size, sampler=self.sampler, num_workers=cfg.train.dataloader_workers
                )
            )
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.output_dir / "config.yaml", dump_config(cfg))
        if tracker:
            acc.init_trackers(cfg.log.project, config=_flat_hparams(cfg))
        self.metrics_log = MetricsLog(self.output_dir / "metrics.jsonl", acc.is_main_process, self.step if self.resumed_from else None)

    def _setup_cache(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        with acc.main_process_first():
            if acc.is_main_process:  # encodes on the GPU when there is one, then gives the encoders back
                prepare_cache(cfg, self.components, progress=cfg.log.progress)  # builds, or verifies a complete cache once
        self.manifest = read_manifest(Path(cfg.data.cache_dir))
        refuse_evaluation_only(self.manifest, cfg.data.cache_dir)  # held-out captions never become training data
        self.dataset = LatentPairDataset(cfg.data.cache_dir, cfg.data, manifest=self.manifest)
        if len(self.dataset) == 0:
            raise TrainingError(f"data: no usable items in {cfg.data.cache_dir} (ties dropped: data.ties = {cfg.data.ties})")
        if self.method.needs.preferences and self.dataset.k == 1:
            raise TrainingError(f"method {self.method.name!r} trains on preferences, but the cache at {cfg.data.cache_dir} holds single "
                                f"captioned images (data.source.kind = {cfg.data.source.kind}); use a preference source, or a method "
                                "that needs none (self_npo)")
        if hasattr(self.method, "use_data"):  # a method that needs whole-cache statistics (e.g. SmPO's score range)
            self.method.use_data(self.dataset)

    def _setup_prompts(self) -> None:
        from diffalign.data.digest import json_digest
        from diffalign.data.sources.prompts import training_prompts
        from diffalign.scorers.registry import load_scorers

        cfg, acc = self.cfg, self.accelerator
        self.prompts = training_prompts(cfg.data.source)
        self.manifest = {"fingerprint": "prompts:" + json_digest(self.prompts)}  # the run's data identity
        self.dataset = None
        c = self.components
        with quiet_loading():
            for module in (c.vae, *c.text_encoders):
                module.to(acc.device).requires_grad_(False)
        self.scorers = load_scorers(self.method.scorer_names(), cfg.method.scorer_options, device=str(acc.device))

    def describe(self) -> str:
        c, n = self.cfg.train, self.accelerator.num_processes
        data = f"{len(self.prompts)} prompts" if self.online else f"{len(self.dataset)} items"
        line = (
            f"{self.method.name} · {self.components.family} · {self.cfg.model.finetune} · {data} · "
            f"global batch {c.batch_size} × {c.grad_accum} accum × {n} proc = {c.batch_size * c.grad_accum * n} · lr {self.lr:g}"
        )
        if self.zero:
            line += f" · DeepSpeed ZeRO-{zero.zero_stage(self.accelerator)}"
        return line + (f" · FSDP2: {shard_summary(self.unet)}" if self.sharded else "")

    # ------------------------------------------------------------------------------------------ train

    def micro_step(self, raw: dict, micro: int) -> tuple[dict[str, torch.Tensor], str | None]:
        """Loss and backward of one micro-batch; returns its metrics and, if its loss was not finite, why (no backward)."""
        acc = self.accelerator
        b, n = self.cfg.train.batch_size, acc.num_processes
        first = micro * b * n + acc.process_index * b  # this micro-batch's place in the step's global batch
        ids = raw["item_id"].tolist()
        draws = Draws(self.cfg.train.seed, self.step, range(first, first + len(ids)), ids)
        with self._lora_dropout_rng(first):
            return self._backward(lambda: self.method.loss(self.models, build_batch(raw, self.batch_rules, draws), draws),
                                  self.cfg.train.grad_accum, f"micro-batch {micro}, items {ids}")

    def _micro_batch(self, last: bool):
        """The context of one micro-batch's backward: no gradient sync before the step's last (DDP); under DeepSpeed, the
        engine's accumulation boundary at the last (its backward then takes the step)."""
        self.boundary = last
        return contextlib.nullcontext() if last or self.zero else self.accelerator.no_sync(self.unet)

    def _backward(self, compute, divisor: int, where: str) -> tuple[dict[str, torch.Tensor], str | None]:
        """Backward of `compute()`'s loss / divisor when it is finite on every process; else why not (no backward)."""
        loss, metrics = compute()
        if not self._finite_everywhere(loss):
            if torch.isfinite(loss):
                return metrics, f"non-finite loss on another process at step {self.step}, {where}"
            shown = ", ".join(f"{k} {v.item():.4g}" for k, v in metrics.items() if k != "loss")
            return metrics, f"non-finite loss {loss.item()} at step {self.step}, {where} ({shown})"
        if self.zero:
            zero.zero_backward(self.unet, loss / divisor, boundary=self.boundary)
        else:
            self.accelerator.backward(loss / divisor)
        return metrics, None

    def online_micro_steps(self) -> tuple[dict[str, torch.Tensor], str | None, dict]:
        """An online step's backwards: per micro-batch of trajectories, one per trained step (`trainers.online`).
        Returns the averaged metrics, why the step is skipped (if it is) and the round's metrics (at its first step)."""
        micro_batches, round_metrics = self.feed.step_batches(self.models, self.step)  # rollouts in train mode too (no dropout)
        sums: dict[str, torch.Tensor] = {}
        divisor = sum(len(batches) for batches in micro_batches)  # one backward per batch: the step's mean loss
        for micro, batches in enumerate(micro_batches):
            for j, batch in enumerate(batches):
                last = micro == len(micro_batches) - 1 and j == len(batches) - 1
                draws = Draws(self.cfg.train.seed, self.step, *batch.draws_key)
                with self._micro_batch(last):
                    metrics, skip = self._backward(lambda: self.method.loss(self.models, batch, draws), divisor,
                                                   f"micro-batch {micro}, batch {j}, slots {draws.slots}")
                if skip is not None:
                    return sums, skip, round_metrics
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0) + v.float() / divisor
        return sums, None, round_metrics

    def _finite_everywhere(self, value: torch.Tensor) -> bool:
        """Whether `value` is finite on every process (all processes then skip or step together)."""
        finite = torch.isfinite(value.detach()).all().float().reshape(1)
        if self.accelerator.num_processes > 1:
            finite = self.accelerator.gather(finite.to(self.accelerator.device)).min()
        return bool(finite.item())

    @contextlib.contextmanager
    def _lora_dropout_rng(self, first_slot: int):
        """LoRA dropout draws its masks from torch's global generator: seed it per (step, place in the global batch), so the
        masks are counter-based like every other draw (a resumed run draws the same ones; ranks draw different ones)."""
        if not (self.lora and self.cfg.model.lora.dropout > 0):
            yield
            return
        devices = [self.accelerator.device] if self.accelerator.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # the global generators are restored on exit
            torch.manual_seed(seed63(f"{self.cfg.train.seed}/{self.step}/{first_slot}/lora_dropout"))
            yield

    def offline_micro_steps(self) -> tuple[dict[str, torch.Tensor], str | None]:
        cfg = self.cfg
        sums: dict[str, torch.Tensor] = {}
        skip = None  # why this step is skipped (a non-finite loss or gradient norm), if it is
        for micro in range(cfg.train.grad_accum):
            batch = next(self.loader)
            self.micro_batch += 1
            if skip is not None:
                continue  # the step's remaining data is consumed unread, so the data order stays that of an unskipped run
            last = micro == cfg.train.grad_accum - 1
            with self._micro_batch(last):
                metrics, skip = self.micro_step(batch, micro)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0) + v.float() / cfg.train.grad_accum
        return sums, skip

    def optimizer_step(self) -> dict[str, float]:
        acc, cfg = self.accelerator, self.cfg
        round_metrics = {}
        if self.online:
            sums, skip, round_metrics = self.online_micro_steps()
        else:
            sums, skip = self.offline_micro_steps()
        lr = self.lr_schedule.get_last_lr()[0]  # the lr this step uses
        grad_norm = None
        if skip is None and cfg.optim.max_grad_norm is not None:
            if self.sharded:  # the norm over every shard (a DTensor until made whole)
                grad_norm = full_value(torch.nn.utils.clip_grad_norm_(self.trainable, cfg.optim.max_grad_norm))
            else:
                grad_norm = acc.clip_grad_norm_(self.trainable, cfg.optim.max_grad_norm)
            if getattr(acc, "scaler", None) is None and not self._finite_everywhere(torch.as_tensor(grad_norm)):
                skip = f"non-finite gradient norm {float(grad_norm)} at step {self.step}"
        stepped = False
        if skip is None:
            self.optimizer.step()
            stepped = not self.optimizer.step_was_skipped  # fp16: the GradScaler skips steps with inf/NaN gradients
        if stepped:  # the schedule and the EMA advance on real updates only (a skipped warmup step is not warmup)
            self.lr_schedule.step()
            if self.ema is not None:
                self.ema.step(self.trainable)
            if self.teacher is not None:
                self.teacher.update(acc.unwrap_model(self.unet))
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        out = {k: acc.reduce(v.detach(), reduction="mean").item() for k, v in sums.items()}
        out |= {k: float(v) for k, v in round_metrics.items()}  # the same on every process (rewards of the gathered round)
        out["lr"] = lr
        if grad_norm is not None:
            out["grad_norm"] = float(grad_norm)
        if skip is not None:
            self._skipped(skip)
            out["skipped"] = 1.0
        else:
            self.skips_in_a_row = 0
        return out

    def _skipped(self, why: str) -> None:
        """Apply `train.nonfinite` to a step skipped for a non-finite loss or gradient norm."""
        cfg = self.cfg.train
        advice = "lower optim.lr, check the cache, or use train.mixed_precision=bf16 instead of fp16"
        if cfg.nonfinite == "stop":
            raise TrainingError(f"{why}; {advice} (train.nonfinite = stop)")
        self.skipped_steps += 1
        self.skips_in_a_row += 1
        if self.skips_in_a_row >= cfg.max_skips_in_a_row:
            raise TrainingError(f"{why}; {self.skips_in_a_row} steps in a row skipped (train.max_skips_in_a_row): {advice}")
        if self.accelerator.is_main_process:
            print(f"diffalign train: step skipped: {why} ({self.skipped_steps} skipped so far)", flush=True)

    def train(self) -> TrainResult:
        with self.held:  # the output directory is released when the run ends, however it ends
            return self._train()

    def _train(self) -> TrainResult:
        cfg, acc = self.cfg, self.accelerator
        samples_per_step = cfg.train.batch_size * cfg.train.grad_accum * acc.num_processes
        if acc.is_main_process:
            print(f"diffalign train: {self.describe()}" + (f" · resumed from {self.resumed_from}" if self.resumed_from else ""))
        bar = _progress(cfg, self.step, acc.is_main_process)
        started = time.perf_counter()
        while self.step < cfg.train.max_steps:
            t0 = time.perf_counter()
            metrics = self.optimizer_step()
            metrics["samples_per_s"] = samples_per_step / max(time.perf_counter() - t0, 1e-9)
            if self.step % cfg.log.every == 0 or self.step == cfg.train.max_steps:
                acc.log(metrics, step=self.step)
                self.metrics_log.write(self.step, metrics)
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{metrics[k]:.4g}" for k in self.method.progress_keys if k in metrics})
            if cfg.eval.validation_every and self.step % cfg.eval.validation_every == 0:
                self.validate()
            if cfg.train.checkpoint_every and self.step % cfg.train.checkpoint_every == 0 and self.step < cfg.train.max_steps:
                self.save_checkpoint()
        if bar is not None:
            bar.close()
        self.save_checkpoint()
        return self.finish(time.perf_counter() - started)

    def validate(self) -> None:
        acc = self.accelerator
        if acc.is_main_process:
            path = self.output_dir / "validation" / f"step-{self.step:08d}.png"
            grid, scores = self.validation.run(self.components, acc.unwrap_model(self.unet), acc.device, path)
            if scores:  # val/<scorer>: curves beside the training metrics
                acc.log(scores, step=self.step)
                self.metrics_log.write(self.step, scores)
            for tracker in acc.trackers:
                if tracker.name == "tensorboard":
                    import numpy as np

                    tracker.writer.add_image("validation", np.asarray(grid), self.step, dataformats="HWC")
        acc.wait_for_everyone()

    # ------------------------------------------------------------------------------------ checkpoints

    def _identity(self) -> dict:
        ident = {k: _dotted(self.cfg, k) for k in IDENTITY_FIELDS}
        ident["num_processes"] = self.accelerator.num_processes
        if self.sharded:  # a sharded checkpoint holds no trainable.safetensors: never resumed data-parallel, nor the reverse
            ident["sharding"] = "fsdp2"
        elif self.zero:
            ident["sharding"] = f"deepspeed-zero{zero.zero_stage(self.accelerator)}"
        ident["cache"] = self.manifest.get("fingerprint") or self.manifest.get("source_hash")
        ident["pairing_rules"] = PAIRING_RULES
        return ident

    def save_checkpoint(self) -> Path | None:
        """Stage every file, commit with a marker written last, prune only after the commit. A write that fails on any
        process (read-only or full disk, an I/O error) fails the save everywhere with a `CheckpointError` naming the
        path and the rank: nothing is committed and the previous checkpoint stays as it was."""
        acc = self.accelerator
        staging = ckpt.staging_path(self.checkpoint_root, self.step)
        error = None
        try:
            if acc.is_main_process:
                ckpt.stage(self.checkpoint_root, self.step)
        except OSError as e:
            error = e
        acc.wait_for_everyone()
        if error is None:
            try:
                self._write_checkpoint_files(staging)
            except OSError as e:
                error = e
        self._all_saved(error, staging)
        committed = None
        try:
            if acc.is_main_process:
                protect = [self.resumed_from] if self.resumed_from else []
                committed = ckpt.commit(self.checkpoint_root, self.step, staging, self.cfg.train.keep_last, protect=protect)
        except OSError as e:
            error = e
        self._all_saved(error, staging)
        return committed

    def _write_checkpoint_files(self, staging: Path) -> None:
        acc = self.accelerator
        torch_save(staging / f"rng-rank{acc.process_index}.pt", _rng_state())
        ckpt.fault_point(f"checkpoint.write.rank{acc.process_index}")  # the kill tests' one dead rank
        if self.feed is not None:  # the rollout round in progress, this process's share
            self.feed.save(staging, self.step)
        if self.sharded:  # every process writes its shards of the model and the optimizer state
            save_sharded(staging / SHARDED_DIR, self.unet, self.optimizer.optimizer)
        if self.zero:  # every process writes its partition of the model and the optimizer state
            zero.save_zero(staging / zero.ZERO_DIR, self.unet)
        if not acc.is_main_process:
            return
        if not (self.sharded or self.zero):
            save_safetensors(staging / "trainable.safetensors", trainable_state_dict(acc.unwrap_model(self.unet)))
            ckpt.fault_point("checkpoint.write")
            torch_save(staging / "optimizer.pt", self.optimizer.state_dict())
        torch_save(staging / "lr_schedule.pt", self.lr_schedule.state_dict())
        if self.ema is not None:
            torch_save(staging / "ema.pt", self.ema.state_dict())
        if self.teacher is not None:
            save_safetensors(staging / "teacher.safetensors", self.teacher.state_dict())
        scaler = getattr(acc, "scaler", None)
        if scaler is not None:
            torch_save(staging / "scaler.pt", scaler.state_dict())
        ckpt.fault_point("checkpoint.write")
        state = {"step": self.step, "micro_batch": self.micro_batch, "skipped_steps": self.skipped_steps,
                 "skips_in_a_row": self.skips_in_a_row, "identity": self._identity()}
        atomic_write_text(staging / "state.json", json.dumps(state, indent=2))
        atomic_write_text(staging / "config.yaml", dump_config(self.cfg))

    def _all_saved(self, error: OSError | None, staging: Path) -> None:
        """Raise on every process if the save failed on any (every process takes part, so none waits forever)."""
        acc = self.accelerator
        failed = acc.gather(torch.tensor([int(error is not None)], device=acc.device)).nonzero().flatten().tolist()
        if not failed:
            return
        previous = ckpt.latest(self.checkpoint_root) if self.checkpoint_root.is_dir() else None
        what = f"{getattr(error, 'filename', None) or staging}: {error.strerror or error}" if error is not None else "see that rank's error"
        raise ckpt.CheckpointError(f"checkpoint of step {self.step} not saved: rank {', '.join(map(str, failed))} could not write it "
                              f"({what}); nothing was committed" + (f", {previous} is intact" if previous else ""))

    def resume(self) -> Path | None:
        """Load the checkpoint named by `train.resume` ('latest' = newest committed; none yet = fresh start)."""
        want = self.cfg.train.resume
        if want is None:
            return None
        path = ckpt.latest(self.checkpoint_root) if want == "latest" else Path(want)
        if path is None:
            return None
        if not path.is_dir():
            raise TrainingError(f"train.resume: no checkpoint directory {path} (use 'latest' for the newest in {self.checkpoint_root})")
        ckpt.verify(path)
        state = json.loads((path / "state.json").read_text())
        rules = state["identity"].get("pairing_rules", 1)
        if rules != PAIRING_RULES:
            raise TrainingError(
                f"cannot resume from {path}: it was written under pairing rules {rules} (this diffalign: {PAIRING_RULES}). Since "
                "rules 2, data.ties = drop also drops items whose best and worst images tie by rank or score, and labelled pairs keep "
                "soft labels, so the resumed run would see other items in another order; start a new run (another "
                "train.output_dir, or train.resume=null)"
            )
        diffs = _identity_diffs(state["identity"], self._identity())
        if diffs:
            raise TrainingError(f"cannot resume from {path}: the run differs in " + "; ".join(diffs))
        if self.sharded:
            load_sharded(path / SHARDED_DIR, self.unet, self.optimizer.optimizer)
        elif self.zero:
            zero.load_zero(path / zero.ZERO_DIR, self.unet)
        else:
            self._load_trainable(path)
            self.optimizer.load_state_dict(torch_load(path / "optimizer.pt"))
        self.lr_schedule.load_state_dict(torch_load(path / "lr_schedule.pt"))
        self._apply_changed_settings(path)
        if self.ema is not None:
            if not (path / "ema.pt").is_file():
                raise TrainingError(f"cannot resume from {path} with train.ema.enabled: the checkpoint has no EMA (ema.pt)")
            load_ema(self.ema, torch_load(path / "ema.pt"), self.trainable[0].device)
        if self.teacher is not None:
            if not (path / "teacher.safetensors").is_file():
                raise TrainingError(f"cannot resume from {path}: method {self.method.name!r} needs its EMA teacher (teacher.safetensors)")
            self.teacher.load_state_dict(load_safetensors(path / "teacher.safetensors"))
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None:
            scaler.load_state_dict(torch_load(path / "scaler.pt"))
        rng_file = path / f"rng-rank{self.accelerator.process_index}.pt"
        if not rng_file.is_file():
            raise TrainingError(f"{rng_file}: missing RNG state for this process")
        _set_rng_state(torch_load(rng_file))
        if self.feed is not None:
            try:
                self.feed.load(path, state["step"])
            except (FileNotFoundError, ValueError) as e:
                raise TrainingError(f"cannot resume from {path}: {e}") from None
        self.step, self.micro_batch = state["step"], state["micro_batch"]
        self.skipped_steps, self.skips_in_a_row = state.get("skipped_steps", 0), state.get("skips_in_a_row", 0)
        return path

    def _load_trainable(self, path: Path) -> None:
        unet = self.accelerator.unwrap_model(self.unet)
        saved = load_safetensors(path / "trainable.safetensors")
        own = dict(unet.named_parameters())
        expected = {n for n, p in own.items() if p.requires_grad}
        if set(saved) != expected:
            missing, extra = sorted(expected - set(saved))[:3], sorted(set(saved) - expected)[:3]
            raise TrainingError(f"{path / 'trainable.safetensors'}: parameter names differ (missing {missing}, unexpected {extra})")
        with torch.no_grad():
            for name, tensor in saved.items():
                own[name].copy_(tensor)

    def _apply_changed_settings(self, path: Path) -> None:
        """Settings outside the identity may change on resume: print each change, and give the restored optimizer and LR
        schedule this run's lr, betas, eps and weight decay (their saved state would silently keep the old ones)."""
        saved = yaml.safe_load((path / "config.yaml").read_text())
        changes = _changed_settings(saved, self.cfg.model_dump(mode="json"))
        if changes and self.accelerator.is_main_process:
            print(f"diffalign train: resuming from {path} with changed settings (applied): " + "; ".join(changes), flush=True)
        optim, schedule = self.cfg.optim, self.lr_schedule
        adam = {"betas": tuple(optim.betas), "eps": optim.eps} if optim.optimizer != "adafactor" else {}  # Adafactor's eps is a pair
        for group in self.optimizer.param_groups:
            group.update(initial_lr=self.lr, weight_decay=optim.weight_decay, **adam)
        schedule.base_lrs = [self.lr] * len(self.optimizer.param_groups)
        # the lr at the restored position under this run's schedule (its lambdas come from this config, not the checkpoint)
        schedule._last_lr = [base * f(schedule.last_epoch) for base, f in zip(schedule.base_lrs, schedule.lr_lambdas)]
        for group, lr in zip(self.optimizer.param_groups, schedule._last_lr):
            group["lr"] = lr

    # ----------------------------------------------------------------------------------------- finish

    def finish(self, seconds: float) -> TrainResult:
        acc = self.accelerator
        final_dir = self.output_dir / "final"
        summary = self.metrics_log.summary()
        full = None  # a sharded or partitioned model's whole weights, gathered by every process, kept by the main one
        if self.sharded:
            full = full_state_dict(self.unet)
        elif self.zero:
            full = acc.get_state_dict(self.unet)
        if acc.is_main_process:
            unet = acc.unwrap_model(self.unet)
            if self.ema is not None:
                self.ema.store(unet.parameters())
                self.ema.copy_to(self.trainable)
            final_dir.mkdir(parents=True, exist_ok=True)
            if self.lora:
                weights = save_lora(unet, final_dir, self.components.family).name
                if self.cfg.train.export_kohya:
                    save_lora_kohya(unet, final_dir)
            elif full is not None:
                save_full_unet(unet, full, final_dir / "unet")
                weights = "unet/"
            else:
                unet.save_pretrained(final_dir / "unet")
                weights = "unet/"
            if self.ema is not None:
                self.ema.restore(unet.parameters())
            atomic_write_text(final_dir / "config.yaml", dump_config(self.cfg))
            atomic_write_text(final_dir / "README.md", model_card(self.cfg, self.step, weights))
            atomic_write_text(self.output_dir / "summary.json", json.dumps({"steps": self.step, "seconds": seconds, **summary}, indent=2))
            self.metrics_log.plot(self.output_dir / "curves.png")
            if self.cfg.log.progress:
                print_summary(self, seconds, summary, final_dir)
        acc.wait_for_everyone()
        acc.end_training()
        return TrainResult(self.output_dir, final_dir, self.step, seconds, summary)


def train(cfg: Config, components: Components | None = None) -> TrainResult:
    """Prepare the cache if needed, train, checkpoint, export. The library entry point of `diffalign train`."""
    trainer = PreferenceTrainer(cfg)
    with trainer.held:  # the output directory's lock, taken in setup (released here if setup fails)
        trainer.setup(components)
        return trainer.train()


# ----------------------------------------------------------------------------------------------- helpers


def _progress(cfg: Config, start: int, enabled: bool):
    if not (enabled and cfg.log.progress):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.train.max_steps, initial=start, desc="train", unit="step", dynamic_ncols=True)


def load_ema(ema, state: dict, device: torch.device) -> None:
    """Load an EMA state (read onto the CPU) and move it to the trained parameters' device: diffusers' EMAModel keeps
    the loaded tensors where they were read, and its next `step` would mix devices."""
    ema.load_state_dict(state)
    ema.to(device=device)


def _identity_diffs(saved: dict, now: dict, prefix: str = "") -> list[str]:
    """'key (checkpoint a, config b)' for every leaf where a checkpoint's identity and this run's differ."""
    out = []
    for key in sorted(set(saved) | set(now), key=str):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _identity_diffs(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} (checkpoint {a!r}, config {b!r})")
    return out


def _changed_settings(saved: dict, now: dict, prefix: str = "") -> list[str]:
    """'key: old -> new' for every setting that differs between two config dumps (identity fields are checked apart)."""
    out = []
    for key in sorted(set(saved) | set(now)):
        dotted = f"{prefix}{key}"
        a, b = saved.get(key), now.get(key)
        if dotted in _NOT_SETTINGS or dotted in IDENTITY_FIELDS:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed_settings(a, b, dotted + ".")
        elif a != b:
            out.append(f"{dotted}: {a!r} -> {b!r}")
    return out


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]), "python_pos": random.getstate()[2]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _flat_hparams(cfg: Config) -> dict:
    flat = {}

    def walk(prefix, node):
        for k, v in node.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                walk(key + "/", v)
            else:
                flat[key] = v if isinstance(v, (int, float, str, bool)) else str(v)

    walk("", cfg.model_dump(mode="json"))
    return flat
