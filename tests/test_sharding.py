"""FSDP2's refusals, each naming the setting and what to do instead (the 2-process runs are in test_distributed.py)."""

from __future__ import annotations

import pytest
import torch
from accelerate.utils import FullyShardedDataParallelPlugin
from torch.distributed.fsdp import CPUOffloadPolicy

from diffalign.config import load_config
from diffalign.trainers.sharding import ShardingError, fsdp_plugin, refuse_unsupported


@pytest.mark.parametrize(("overrides", "named"), [
    (["model.finetune=lora"], "accelerate/multi_gpu"),
    (["model.finetune=full", "train.ema.enabled=true"], "train.ema.enabled"),
    (["model.finetune=full", "method.name=self_npo"], "EMA teacher"),
    (["model.finetune=full", "eval.validation_every=100"], "diffalign generate"),
    (["model.finetune=full", "model.reference_offload=true"], "fsdp_offload_params: true"),
    (["model.finetune=full", "train.mixed_precision=fp16"], "use bf16"),
])
def test_a_config_fsdp2_cannot_train_is_refused_with_what_to_do(overrides, named):
    with pytest.raises(ShardingError, match="cannot train this config") as e:
        refuse_unsupported(load_config(None, ["eval.validation_every=0", *overrides]))
    assert named in str(e.value)


def test_a_full_fine_tune_fsdp2_can_train_passes():
    refuse_unsupported(load_config(None, ["model.finetune=full", "eval.validation_every=0"]))


def test_cpu_offload_without_a_gpu_is_refused_before_torch_asks_for_a_driver():
    from types import SimpleNamespace

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, cpu_offload=CPUOffloadPolicy())
    on_cpu = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), device=torch.device("cpu"))
    with pytest.raises(ShardingError, match="fsdp_offload_params: false"):
        fsdp_plugin(on_cpu)
    assert fsdp_plugin(SimpleNamespace(state=on_cpu.state, device=torch.device("cuda", 0))) is plugin  # with a GPU: offloaded
