"""DeepSpeed ZeRO-2 / ZeRO-3 training of a full fine-tune (`configs/accelerate/deepspeed_zero2.yaml`, `deepspeed_zero3.yaml`).

Chosen by the accelerate config, not by a diffalign key: `accelerate launch` exports ``ACCELERATE_USE_DEEPSPEED`` and the
plugin's settings, and accelerate's `prepare` turns the UNet and the optimizer into a DeepSpeed engine. ZeRO-2 splits
the gradients and Adam's state over the processes (the weights stay whole on each); ZeRO-3 splits the weights too.
This module holds what the trainer does differently under it:

- **One source of truth.** The shipped configs leave batch, accumulation, clipping and precision 'auto'; `resolve`
  fills them from the diffalign config with accelerate's own `deepspeed_config_process`:

      train_micro_batch_size_per_gpu = train.batch_size
      gradient_accumulation_steps    = train.grad_accum
      train_batch_size               = train.batch_size × train.grad_accum × processes
      gradient_clipping              = optim.max_grad_norm (0: off, DeepSpeed's convention, when it is null)
      bf16.enabled / fp16.enabled    = train.mixed_precision

  and refuses a DeepSpeed value that is set and disagrees (e.g. ``gradient_accumulation_steps: 4`` against
  ``train.grad_accum: 1``), naming both. (Left out, accelerate would set ``gradient_clipping`` to 1.0 on its own.)
- **The process group.** On a machine without CUDA accelerate picks no backend and counts one process; the trainer asks
  for gloo (`accelerator_kwargs`). ``ACCELERATE_USE_CPU=1`` makes accelerate turn DeepSpeed off altogether, so a launch
  with it is refused rather than silently trained unsharded.
- **The backward** (`zero_backward`): the engine's own, told whether this micro-batch is the step's last (its
  accumulation boundary) and not to divide the loss by the accumulation count (the loop has divided it already). At
  the boundary the engine steps: clipping, the optimizer, zeroing the gradients. The step has then been taken when the
  loop reads its gradient norm (``engine.get_global_grad_norm()``, before clipping), so a non-finite norm cannot skip it:
  ``train.nonfinite`` must be 'stop' (the run stops, and the last committed checkpoint is intact).
- **Checkpoints** (`save_zero`, `load_zero`): ``engine.save_checkpoint`` into ``deepspeed/`` of the staging directory,
  every process writing its partition, committed with the run's marker like every other file; resumed on the same
  number of processes. DeepSpeed reads them back with a full unpickler, so `load_zero` first reads every file with
  ``torch.load(weights_only=True)``, allowing only DeepSpeed's three inert records (`ZEROSAFE`): a file holding anything
  else is refused before DeepSpeed opens it.
- **The export** gathers the whole weights (accelerate's ``get_state_dict``; ZeRO-3 with ``zero3_save_16bit_model``).
- **Components load whole** (`whole_models`): under ZeRO-3, transformers would otherwise build the text encoders
  partitioned, and the cache could not be encoded.

The frozen reference of DPO-family methods is not an engine: each process holds it whole (in the weight dtype), or on
the host with ``model.reference_offload`` on GPUs. Refused (`refuse_unsupported`), each with what to do instead: LoRA,
the EMA, Self-NPO's teacher, validation during training, fp16, online methods and ``train.nonfinite: skip``.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

ZERO_DIR = "deepspeed"  # the checkpoint's subdirectory of DeepSpeed's files
_TAG = "state"  # DeepSpeed's name for the one checkpoint inside ZERO_DIR
ZEROSAFE = (  # the classes DeepSpeed pickles into its optimizer files: plain records, no code runs when they are read
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


class DeepSpeedConfigError(ValueError):
    """A DeepSpeed launch whose settings disagree with the diffalign config, or a config it cannot train."""


def deepspeed_requested() -> bool:
    """Whether `accelerate launch` was given a DeepSpeed config (it exports ``ACCELERATE_USE_DEEPSPEED``)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true")


def refuse_unsupported(cfg, online: bool) -> None:
    """The settings this trainer cannot run under DeepSpeed, each with what to do instead."""
    from diffalign.trainers.sharding import split_model_problems

    problems = split_model_problems(cfg, "ZeRO")
    if os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true"):
        problems.append("ACCELERATE_USE_CPU is set, which makes accelerate turn DeepSpeed off (the run would train unsharded); "
                        "unset it: without a GPU the processes talk over gloo anyway")
    if online:
        problems.append(f"method {cfg.method.name}: an online step's number of backwards varies with its round, and DeepSpeed "
                        "counts a fixed accumulation; use accelerate/fsdp2 or accelerate/multi_gpu")
    if cfg.train.mixed_precision == "fp16":
        problems.append("train.mixed_precision = fp16: DeepSpeed's own loss scaler would skip steps behind the loop; use bf16")
    if cfg.train.nonfinite == "skip":
        problems.append("train.nonfinite = skip: DeepSpeed takes the step inside the last backward, before its gradient norm "
                        "can be checked; set train.nonfinite=stop")
    if problems:
        raise DeepSpeedConfigError("DeepSpeed (the accelerate config's distributed_type DEEPSPEED) cannot train this config: "
                                   + "; ".join(problems))


def accelerator_kwargs() -> dict:
    """`Accelerator` arguments for a DeepSpeed launch: gloo where there is no CUDA (accelerate would pick no backend).

    Without CUDA, DeepSpeed's shared-memory collective is also turned off before accelerate starts DeepSpeed's
    communication: it serves only DeepSpeed's tensor-parallel inference all-reduce (ZeRO's collectives are the process
    group's), and would be compiled on first use (about 40 s on 2 cores)."""
    if torch.cuda.is_available():
        return {}
    import deepspeed.ops
    from accelerate.utils import InitProcessGroupKwargs

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # DeepSpeed keeps this dict for the process's life
    return {"kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}


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


@contextlib.contextmanager
def whole_models(accelerator):
    """Build models whole inside this context. Once accelerate has set up a ZeRO-3 plugin, transformers builds every model
    partitioned (``deepspeed.zero.Init``: each process keeps 1/N of each weight, the module's own tensors are empty),
    whatever ``zero3_init_flag`` says; the frozen text encoders and the VAE must be whole on every process, and the UNet
    is partitioned by the engine in `prepare`."""
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()


def zero_stage(accelerator) -> int:
    return accelerator.state.deepspeed_plugin.zero_stage


def zero_backward(engine, loss: torch.Tensor, boundary: bool) -> None:
    """Backward of `loss` (already divided by the accumulation count) through the DeepSpeed `engine`; at the step's last
    micro-batch (`boundary`) the engine reduces the gradients, clips, steps the optimizer and zeroes the gradients."""
    engine.set_gradient_accumulation_boundary(is_boundary=boundary)
    engine.backward(loss, scale_wrt_gas=False)
    if boundary:
        engine.step()


def save_zero(directory: Path, engine) -> None:
    """Every process writes its partition of the model and the optimizer state into `directory` (collective)."""
    engine.save_checkpoint(str(directory), tag=_TAG, save_latest=False)


def load_zero(directory: Path, engine) -> None:
    """Restore `engine`'s model and optimizer state from `save_zero`'s `directory` (collective), after checking that each of
    its files holds only tensors, containers and DeepSpeed's inert records (`ZEROSAFE`)."""
    import importlib

    from diffalign.trainers.checkpoint import CheckpointError

    allowed = []
    for dotted in ZEROSAFE:
        module, name = dotted.rsplit(".", 1)
        allowed.append(getattr(importlib.import_module(module), name))
    files = sorted((directory / _TAG).glob("*.pt"))
    if not files:
        raise CheckpointError(f"{directory / _TAG}: no DeepSpeed checkpoint files")
    with torch.serialization.safe_globals(allowed):
        for path in files:
            try:
                torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - whatever torch refuses, say which file
                raise CheckpointError(f"{path}: not a DeepSpeed checkpoint file diffalign reads safely ({str(e).splitlines()[0]})") from None
    loaded, _ = engine.load_checkpoint(str(directory), tag=_TAG, load_optimizer_states=True, load_lr_scheduler_states=False)
    if loaded is None:
        raise CheckpointError(f"{directory}: DeepSpeed could not load its checkpoint")
