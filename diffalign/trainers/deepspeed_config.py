"""DeepSpeed ZeRO launches (`configs/accelerate/deepspeed_zero2.yaml`, `deepspeed_zero3.yaml`): the plugin's 'auto' values
filled from the diffalign config, and a clear refusal to train until a GPU run has verified the path.

The shipped accelerate configs leave batch, accumulation, clipping and precision to the diffalign config, so a run has one
source of truth for them. `resolve` fills DeepSpeed's 'auto' entries with accelerate's own `deepspeed_config_process`:

    train_micro_batch_size_per_gpu = train.batch_size
    gradient_accumulation_steps    = train.grad_accum
    train_batch_size               = train.batch_size × train.grad_accum × processes
    gradient_clipping              = optim.max_grad_norm (0: off, DeepSpeed's convention, when it is null)
    bf16.enabled / fp16.enabled    = train.mixed_precision

and refuses a DeepSpeed value that is set and disagrees (e.g. ``gradient_accumulation_steps: 4`` against
``train.grad_accum: 1``), naming both. Training itself is refused for now (`refuse_training`): DeepSpeed needs CUDA,
the engine steps inside ``backward`` and partitions the optimizer state per rank, so the loop's accumulation,
clipping and checkpoints need their own path, and none of it may ship before it has run on a GPU (issue: scale and
speed). Sharded full fine-tunes run today under accelerate/fsdp2.
"""

from __future__ import annotations

import os


class DeepSpeedConfigError(ValueError):
    """A DeepSpeed launch whose settings disagree with the diffalign config, or that cannot train yet."""


def deepspeed_requested() -> bool:
    """Whether `accelerate launch` was given a DeepSpeed config (it exports ``ACCELERATE_USE_DEEPSPEED``)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true")


def resolve(plugin, cfg, num_processes: int) -> dict:
    """Fill `plugin`'s DeepSpeed config 'auto' values from `cfg` (in place) and return the config.

    Raises `DeepSpeedConfigError` when a value that is not 'auto' disagrees with the diffalign config."""
    values = {
        "train_micro_batch_size_per_gpu": cfg.train.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "train_batch_size": cfg.train.batch_size * cfg.train.grad_accum * num_processes,
        "gradient_clipping": 0.0 if cfg.optim.max_grad_norm is None else cfg.optim.max_grad_norm,
        "bf16.enabled": cfg.train.mixed_precision == "bf16",
        "fp16.enabled": cfg.train.mixed_precision == "fp16",
    }
    try:
        plugin.set_mixed_precision(cfg.train.mixed_precision)  # what accelerate does at start; refuses the other half-precision
        plugin.deepspeed_config_process(must_match=True, **values)
    except ValueError as e:
        raise DeepSpeedConfigError("the DeepSpeed config disagrees with the diffalign config (set those DeepSpeed values to 'auto' "
                                   f"and diffalign fills them): {e}") from None
    return plugin.deepspeed_config


def refuse_training(cfg, num_processes: int) -> None:
    """Resolve the launch's DeepSpeed settings against `cfg` (a mismatch is named first), then refuse to train."""
    from accelerate.utils import DeepSpeedPlugin

    config = resolve(DeepSpeedPlugin(), cfg, num_processes)
    stage = config.get("zero_optimization", {}).get("stage")
    raise DeepSpeedConfigError(
        f"DeepSpeed ZeRO-{stage} resolves against this config (micro-batch {config['train_micro_batch_size_per_gpu']}, accumulation "
        f"{config['gradient_accumulation_steps']}, clipping {config['gradient_clipping']}), but training under DeepSpeed has not "
        "been verified on a GPU yet, so diffalign does not run it: for a sharded full fine-tune use accelerate/fsdp2, for "
        "anything that fits one GPU accelerate/multi_gpu (docs/distributed.md)"
    )
