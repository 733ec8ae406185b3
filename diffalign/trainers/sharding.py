"""FSDP2 full-shard training of a full fine-tune: the UNet's parameters, gradients and optimizer state split over processes.

Chosen by the accelerate config (`configs/accelerate/fsdp2.yaml`: ``distributed_type: FSDP``, ``fsdp_version: 2``), not
by a diffalign key: `accelerate launch` exports it as ``ACCELERATE_USE_FSDP=true`` with the plugin's ``FSDP_*`` settings.
The trainer shards the model itself, with torch's `fully_shard` (the FSDP2 API): on GPUs this is what accelerate's own
FSDP2 preparation does (accelerate then finds an FSDP module and leaves it as it is), and on the CPU, where
``ACCELERATE_USE_CPU=1`` makes accelerate fall back to plain multi-process data parallel with whole parameters, it
still shards (gloo), which is how the test proves the parameters really are split.

What is sharded:

- each module whose class is named in ``fsdp_transformer_layer_cls_to_wrap`` (the shipped config: diffusers'
  ``BasicTransformerBlock`` and ``ResnetBlock2D``), then the whole UNet (the rest: embeddings, conv_in/out, up/down
  samplers), each one FSDP unit: its parameters become DTensors sharded on dim 0 over the processes, gathered for its
  forward and backward and freed after (``fsdp_reshard_after_forward``);
- the frozen reference of a full fine-tune the same way (forward only), or kept whole on the CPU
  (``fsdp_offload_params``, torch's `CPUOffloadPolicy`, which offloads the policy too);
- the optimizer state follows the parameters (Adam's moments are DTensors of the same shards).

Checkpoints: every process writes its shards of the model and the optimizer with `torch.distributed.checkpoint` into
``sharded/`` of the staging directory (a filesystem every process sees), committed with the run's marker like any
other file. The final export gathers the full state dict and writes ``final/unet`` as an unsharded diffusers model.

LoRA stays data-parallel (an adapter's few parameters gain nothing from sharding): the trainer refuses LoRA under this
config, and also the EMA and the Self-NPO teacher (copies not sharded yet), validation during training (one process
cannot run a sharded model alone) and fp16 (use bf16: no sharded grad scaler).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

SHARDED_DIR = "sharded"  # the checkpoint's subdirectory of torch.distributed.checkpoint files


class ShardingError(ValueError):
    """A configuration FSDP2 cannot train."""


def fsdp_requested(accelerator) -> bool:
    """Whether the launch asked for FSDP: accelerate's state says so (GPUs), or `accelerate launch` exported
    ``ACCELERATE_USE_FSDP`` and accelerate fell back to plain multi-process on the CPU."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    return accelerator.num_processes > 1 and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")


def fsdp_plugin(accelerator):
    """The launch's FSDP settings: accelerate's plugin, or one built from the ``FSDP_*`` variables on the CPU fallback.
    Refuses FSDP1 (this trainer shards with FSDP2's `fully_shard` only), and CPU offload on a run without a GPU (where
    torch would fail at the first step, asking for an NVIDIA driver)."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import CPUOffloadPolicy

    plugin = getattr(accelerator.state, "fsdp_plugin", None) or FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise ShardingError(f"the accelerate config asks for FSDP version {plugin.fsdp_version}; diffalign shards with FSDP2 only: "
                            "set fsdp_version: 2 (configs/accelerate/fsdp2.yaml)")
    if isinstance(plugin.cpu_offload, CPUOffloadPolicy) and accelerator.device.type == "cpu":
        raise ShardingError("fsdp_offload_params: true moves the weights between the GPUs and the CPU; this run has no GPU, so "
                            "they are in CPU memory already: set fsdp_offload_params: false in the accelerate config")
    return plugin


def split_model_problems(cfg, scheme: str) -> list[str]:
    """What a model split over the processes (FSDP2's shards, ZeRO's partitions; `scheme` names it) cannot train yet,
    each with what to do instead: the refusals FSDP2 and DeepSpeed share."""
    problems = []
    if cfg.model.finetune == "lora":
        problems.append(f"model.finetune = lora: LoRA trains data-parallel (accelerate/multi_gpu); {scheme} is for full fine-tunes")
    if cfg.train.ema.enabled:
        problems.append("train.ema.enabled: the EMA copy is not split over the processes yet; turn it off")
    if cfg.method.name == "self_npo":
        problems.append("method self_npo: its EMA teacher is not split over the processes yet; use accelerate/multi_gpu")
    if cfg.eval.validation_every:
        problems.append("eval.validation_every: validation runs on one process, which cannot run a split model; set it to 0 "
                        "and evaluate the export with `diffalign generate`")
    return problems


def refuse_unsupported(cfg) -> None:
    """The settings this trainer cannot run sharded, each with what to do instead."""
    problems = split_model_problems(cfg, "FSDP2")
    if cfg.model.reference_offload:
        problems.append("model.reference_offload: the reference is sharded like the policy; to offload both to the CPU set "
                        "fsdp_offload_params: true in the accelerate config")
    if cfg.train.mixed_precision == "fp16":
        problems.append("train.mixed_precision = fp16: no sharded grad scaler; use bf16")
    if problems:
        raise ShardingError("FSDP2 (the accelerate config's distributed_type FSDP) cannot train this config: " + "; ".join(problems))


def shard(module: torch.nn.Module, plugin) -> torch.nn.Module:
    """`fully_shard` each block named in the plugin's ``transformer_cls_names_to_wrap``, then `module` itself (in place).

    The parameters must already be on the process's device (on the CPU with the plugin's CPU offload)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    names = set(plugin.transformer_cls_names_to_wrap or ())
    missing = names - {type(m).__name__ for m in module.modules()}
    if missing:
        raise ShardingError(f"fsdp_transformer_layer_cls_to_wrap names {sorted(missing)}, which {type(module).__name__} does not have")
    kw = {"reshard_after_forward": plugin.reshard_after_forward, "mp_policy": MixedPrecisionPolicy()}
    if isinstance(plugin.cpu_offload, CPUOffloadPolicy):
        kw["offload_policy"] = plugin.cpu_offload
    blocks = [m for m in module.modules() if type(m).__name__ in names and m is not module]
    for block in blocks:
        fully_shard(block, **kw)
    fully_shard(module, **kw)
    return module


def shard_summary(module: torch.nn.Module) -> str:
    """'N DTensor parameters, this process holds X of Y values (P%)': what the startup line prints, from the local shards."""
    from torch.distributed.tensor import DTensor

    params = [p for p in module.parameters() if p.requires_grad]
    sharded = [p for p in params if isinstance(p, DTensor)]
    total = sum(p.numel() for p in params)
    local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params)
    return f"{len(sharded)}/{len(params)} parameters sharded, this process holds {local:,} of {total:,} values ({100 * local / total:.1f}%)"


def full_value(value):
    """A DTensor (e.g. the gradient norm of sharded gradients) as an ordinary tensor; anything else as it is."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def save_sharded(path: Path, model: torch.nn.Module, optimizer) -> None:
    """Every process writes its shards of the model and the optimizer state into `path` (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(path))


def load_sharded(path: Path, model: torch.nn.Module, optimizer) -> None:
    """Read `save_sharded`'s files into the sharded model and optimizer (collective; the same number of processes)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on the CPU, gathered from every process (collective); empty on all but the main one."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_full_unet(model: torch.nn.Module, state: dict[str, torch.Tensor], directory: Path) -> None:
    """Write `state` (a `full_state_dict`) as an ordinary diffusers UNet in `directory`, as `save_pretrained` would."""
    from torch.distributed.fsdp import FSDPModule

    cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))  # fully_shard made an FSDP subclass of it
    unet = cls.from_config(model.config)
    unet.load_state_dict(state)
    unet.save_pretrained(directory)
