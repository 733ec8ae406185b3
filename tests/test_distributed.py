"""`accelerate launch` with 2 CPU processes (gloo): one step equals the single-process step on the same global batch."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli, tiny_config, write_config

from diffalign.cli import main
from diffalign.config.loading import shipped_accelerate_configs
from diffalign.io import load_safetensors


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(config_name: str, *args: str) -> subprocess.CompletedProcess:
    """`accelerate launch` of a shipped config with 2 processes on the CPU (ACCELERATE_USE_CPU: gloo) training `args`."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(shipped_accelerate_configs()[config_name]),
              "--num_processes", "2", "--main_process_port", str(_free_port()), "-m", "diffalign", "train", *args]
    return subprocess.run(launch, capture_output=True, text=True, env=env, timeout=300)


def test_two_machines_of_one_process_each_match_one_process(tmp_path, demo_parquet):
    """DDP over the shipped multi-node config, as two machines on localhost (machine ranks 0 and 1, one process each,
    both a local main process): the cache is built once on the shared storage while both machines start, the step
    (with caption dropout, drawn per rank) equals one process's step on the same global batch, and the checkpoint is
    committed once with both ranks' RNG states."""
    cfg = tiny_config(tmp_path, parquet=demo_parquet, data={"caption_dropout": 0.3}, optim={"lr": 1e-3, "warmup_steps": 0, "eps": 1e-4})
    cfg["train"].update(max_steps=1, checkpoint_every=1, batch_size=2, output_dir=str(tmp_path / "two"))
    config = write_config(tmp_path / "run.yaml", cfg)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    port = str(_free_port())
    machines = [subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(shipped_accelerate_configs()["accelerate/multi_node"]),
         "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
         "--main_process_port", port, "-m", "diffalign", "train", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for rank in (0, 1)]
    outputs = [m.communicate(timeout=300) for m in machines]
    for m, (_, err) in zip(machines, outputs):
        assert m.returncode == 0, err[-3000:]
    assert "global batch 2 × 1 accum × 2 proc = 4" in outputs[0][0]

    assert main(["train", str(config), "train.batch_size=4", f"train.output_dir={tmp_path / 'one'}"]) == 0
    a = load_safetensors(tmp_path / "one" / "checkpoints" / "step-00000001" / "trainable.safetensors")
    b = load_safetensors(tmp_path / "two" / "checkpoints" / "step-00000001" / "trainable.safetensors")
    assert a.keys() == b.keys()
    # all-reduce order changes rounding only. Adam's first step is lr·g/(|g| + eps), so a rounding error δ in a
    # gradient moves a parameter by at most lr·δ/eps: 1e-5 (1% of one step at lr 1e-3) allows δ up to 1e-6
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)
    # Adam is nearly scale-invariant: also compare the all-reduced gradient (its norm) and the loss
    rows = [json.loads((tmp_path / run / "metrics.jsonl").read_text().splitlines()[0]) for run in ("one", "two")]
    assert rows[0]["grad_norm"] > 0
    for key in ("loss", "grad_norm"):
        assert rows[1][key] == pytest.approx(rows[0][key], rel=1e-5)
    names = {p.name for p in (tmp_path / "two" / "checkpoints" / "step-00000001").iterdir()}
    assert {"rng-rank0.pt", "rng-rank1.pt"} <= names


def test_an_online_group_split_over_two_processes_is_judged_as_one_group(tmp_path):
    """Pref-GRPO with one group of 4 images per round: 2 processes sample 2 images each; the group is gathered and judged
    whole, so the rewards, the advantages and the step equal the single process's (the public code judges each share).
    Launched with the shipped DDP config, as README's "several GPUs" command."""
    common = ["method.group_size=4", "method.groups_per_round=1", "method.sampling_steps=4", "train.grad_accum=1",
              "train.max_steps=1", "log.tracker=none", "log.progress=false", "optim.lr=1e-3", "optim.eps=1e-4"]
    one = run_cli("train", "toy/pref_grpo", *common, "train.batch_size=4", f"train.output_dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr
    two = _launch("accelerate/multi_gpu", "toy/pref_grpo", *common, "train.batch_size=2", f"train.output_dir={tmp_path / 'two'}")
    assert two.returncode == 0, two.stderr[-3000:]
    row_one = json.loads((tmp_path / "one" / "metrics.jsonl").read_text().splitlines()[0])
    row_two = json.loads((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()[0])
    assert row_two["win_rate_std"] == row_one["win_rate_std"] and row_two["reward"] == pytest.approx(row_one["reward"], abs=1e-6)
    assert row_two["grad_norm"] == pytest.approx(row_one["grad_norm"], rel=1e-4)
    a = load_safetensors(tmp_path / "one" / "checkpoints" / "step-00000001" / "trainable.safetensors")
    b = load_safetensors(tmp_path / "two" / "checkpoints" / "step-00000001" / "trainable.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)


def test_fsdp2_shards_the_parameters_matches_one_process_and_resumes_exactly(tmp_path, demo_parquet):
    """The shipped FSDP2 config on 2 gloo processes (where accelerate alone would fall back to whole parameters): every
    trained parameter is a DTensor split over the 2 ranks, each rank's checkpoint file holds about half the weights, the
    first step equals one process's step on the same global batch, and a resume from the sharded checkpoint of step 1
    ends bit for bit where the uninterrupted run does."""
    cfg = tiny_config(tmp_path, parquet=demo_parquet, finetune="full", optim={"lr": 1e-3, "warmup_steps": 0, "eps": 1e-4})
    single = write_config(tmp_path / "single.yaml", {**cfg, "train": {**cfg["train"], "max_steps": 1, "checkpoint_every": 0,
                                                                      "batch_size": 4, "output_dir": str(tmp_path / "one")}})
    sharded = write_config(tmp_path / "sharded.yaml", {**cfg, "train": {**cfg["train"], "max_steps": 2, "checkpoint_every": 1,
                                                                        "batch_size": 2, "output_dir": str(tmp_path / "two")}})
    one = run_cli("train", str(single))
    assert one.returncode == 0, one.stderr
    two = _launch("accelerate/fsdp2", str(sharded))
    assert two.returncode == 0, two.stderr[-3000:]
    assert "global batch 2 × 1 accum × 2 proc = 4" in two.stdout
    held = re.search(r"FSDP2: (\d+)/(\d+) parameters sharded, this process holds ([\d,]+) of ([\d,]+) values", two.stdout)
    assert held, two.stdout
    assert held[1] == held[2] and int(held[2]) > 0  # every trained parameter is a DTensor
    local, total = (int(held[i].replace(",", "")) for i in (3, 4))
    assert 0.45 * total <= local <= 0.55 * total  # dim-0 shards: about half each (odd sizes round)

    # each rank wrote its own shard file of the step-1 checkpoint; neither holds the whole model
    step1 = tmp_path / "two" / "checkpoints" / "step-00000001"
    assert not (step1 / "trainable.safetensors").exists()
    files = sorted((step1 / "sharded").glob("*.distcp"))
    full_weights = (tmp_path / "one" / "final" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert len(files) == 2 and all(f.stat().st_size < 0.75 * 3 * full_weights for f in files)  # weights + 2 Adam moments, halved

    # step 1 equals the single process's step (all-reduce order changes rounding only; see the DDP test for the bound)
    _assert_sharded_step_equals_single(tmp_path / "two", tmp_path / "one")

    # resume from step 1's sharded checkpoint (model, Adam moments, schedule, RNG, data position): the same final weights
    shutil.copytree(tmp_path / "two", tmp_path / "three")
    for gone in ("checkpoints/step-00000002", "final", "summary.json", "metrics.jsonl"):
        path = tmp_path / "three" / gone
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    three = _launch("accelerate/fsdp2", str(sharded), f"train.output_dir={tmp_path / 'three'}", "train.resume=latest")
    assert three.returncode == 0, three.stderr[-3000:]
    assert "resumed from" in three.stdout
    a = load_safetensors(tmp_path / "two" / "final" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_safetensors(tmp_path / "three" / "final" / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("method", "precision", "atol"), [({"name": "inpo", "inversion_steps": 2}, "no", 1e-5),
                                                      ({"name": "sft"}, "bf16", 2e-3)], ids=["inpo", "sft-bf16"])
def test_fsdp2_step_of_other_methods_matches_one_process(tmp_path, demo_parquet, method, precision, atol):
    """Beside DPO: DDIM-InPO (it inverts with the sharded policy, reference calls on the sharded frozen copy) and SFT (no
    reference at all) in bf16 autocast, under the shipped FSDP2 config on 2 gloo processes: the parameters are sharded,
    and the first step's weights and loss equal one process's step on the same global batch (bf16: Adam's first step
    is about lr·sign(g), so an element whose tiny gradient rounds to the other sign moves by 2·lr; lr is 1e-3)."""
    cfg = {**tiny_config(tmp_path, parquet=demo_parquet, finetune="full", optim={"lr": 1e-3, "warmup_steps": 0, "eps": 1e-4}),
           "method": method}
    train = {**cfg["train"], "max_steps": 1, "checkpoint_every": 1, "mixed_precision": precision}
    one = run_cli("train", str(write_config(tmp_path / "one.yaml", {**cfg, "train": {**train, "batch_size": 4,
                                                                                      "output_dir": str(tmp_path / "one")}})))
    assert one.returncode == 0, one.stderr
    two = _launch("accelerate/fsdp2", str(write_config(tmp_path / "two.yaml", {**cfg, "train": {**train, "batch_size": 2,
                                                                                                  "output_dir": str(tmp_path / "two")}})))
    assert two.returncode == 0, two.stderr[-3000:]
    held = re.search(r"FSDP2: (\d+)/(\d+) parameters sharded", two.stdout)
    assert held and held[1] == held[2] and int(held[2]) > 0, two.stdout
    _assert_sharded_step_equals_single(tmp_path / "two", tmp_path / "one", atol=atol)


@pytest.mark.parametrize("name", ["smpo", "rankdpo"])
def test_fsdp2_step_of_the_pairwise_methods_matches_one_process(tmp_path, tmp_path_factory, name):
    """SmPO (inversion, scores normalised over the cache) and RankDPO (all K = 4 images of an item in one batched
    forward), full fine-tunes from their toy recipes on the tiny SDXL UNet, under the shipped FSDP2 config on 2 gloo
    processes: every parameter sharded, and the first step's weights, loss and gradient norm equal one process's step on
    the same global batch. (Dense discounting and Diffusion-NPO are DPO's forwards with a per-timestep weight or flipped
    labels: a launch of each adds nothing the DPO test does not show.)"""
    cache = tmp_path_factory.getbasetemp() / "toy-recipes" / "cache"  # the synthetic cache the toy-recipe tests share
    common = [f"toy/{name}", "model.pretrained=builtin:tiny-sdxl", "model.finetune=full", "data.source.num_prompts=4",
              "data.source.num_inference_steps=2", f"data.cache_dir={cache}", "train.max_steps=1", "train.checkpoint_every=1",
              "optim.lr=1e-3", "optim.warmup_steps=0", "optim.eps=1e-4", *(["method.inversion_steps=2"] if name == "smpo" else [])]
    assert main(["train", *common, "train.batch_size=4", f"train.output_dir={tmp_path / 'one'}"]) == 0  # in-process: no start-up
    two = _launch("accelerate/fsdp2", *common, "train.batch_size=2", f"train.output_dir={tmp_path / 'two'}")
    assert two.returncode == 0, two.stderr[-3000:]
    assert "global batch 2 × 1 accum × 2 proc = 4" in two.stdout
    assert re.search(r"FSDP2: (\d+)/\1 parameters sharded", two.stdout), two.stdout
    _assert_sharded_step_equals_single(tmp_path / "two", tmp_path / "one")


def test_fsdp2_online_step_matches_one_process(tmp_path):
    """Pref-GRPO, full fine-tune, under the shipped FSDP2 config on 2 gloo processes: each process samples its share of the
    group with the sharded policy (every denoising step gathers the shards), the group is judged whole, and the step's
    weights, rewards and loss equal one process's."""
    common = ["toy/pref_grpo", "model.finetune=full", "method.group_size=4", "method.groups_per_round=1", "method.sampling_steps=4",
              "train.grad_accum=1", "train.max_steps=1", "train.checkpoint_every=1", "log.tracker=none", "log.progress=false",
              "optim.lr=1e-3", "optim.eps=1e-4"]
    one = run_cli("train", *common, "train.batch_size=4", f"train.output_dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr
    two = _launch("accelerate/fsdp2", *common, "train.batch_size=2", f"train.output_dir={tmp_path / 'two'}")
    assert two.returncode == 0, two.stderr[-3000:]
    assert re.search(r"FSDP2: (\d+)/\1 parameters sharded", two.stdout), two.stdout
    _assert_sharded_step_equals_single(tmp_path / "two", tmp_path / "one")
    rows = [json.loads((tmp_path / run / "metrics.jsonl").read_text().splitlines()[0]) for run in ("one", "two")]
    assert rows[1]["win_rate_std"] == pytest.approx(rows[0]["win_rate_std"]) and rows[1]["reward"] == pytest.approx(rows[0]["reward"])


def _assert_sharded_step_equals_single(sharded: Path, single: Path, atol: float = 1e-5) -> None:
    """The weights in the sharded run's step-1 checkpoint equal the single process's final weights after its one step
    (float tolerance), and so do the first step's loss and gradient norm (not zero)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(sharded / "checkpoints" / "step-00000001" / "sharded", sharded / "step1.pt")
    step1_model = torch.load(sharded / "step1.pt", weights_only=True)["model"]
    one_model = load_safetensors(single / "final" / "unet" / "diffusion_pytorch_model.safetensors")
    assert step1_model.keys() == one_model.keys()
    for k in one_model:
        torch.testing.assert_close(step1_model[k], one_model[k], rtol=0, atol=atol)
    rows = [json.loads((run / "metrics.jsonl").read_text().splitlines()[0]) for run in (single, sharded)]
    assert rows[0]["grad_norm"] > 0  # the step moved the weights
    for key in ("loss", "grad_norm"):
        assert rows[1][key] == pytest.approx(rows[0][key], rel=1e-5)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_step_matches_one_process_and_resumes_exactly(tmp_path, demo_parquet, stage):
    """The shipped DeepSpeed ZeRO-2 / ZeRO-3 configs on 2 gloo processes, a full fine-tune of DPO with gradient accumulation
    2, clipping and a warmup: the engine is built with the stage asked for, the first step equals one process's step on
    the same global batch, and a resume from the partitioned checkpoint of step 1 ends bit for bit where the
    uninterrupted run does."""
    cfg = tiny_config(tmp_path, parquet=demo_parquet, finetune="full",
                      optim={"lr": 1e-3, "warmup_steps": 2, "eps": 1e-4, "max_grad_norm": 0.5})
    cfg["train"].update(batch_size=1, grad_accum=2, nonfinite="stop", keep_last=3)
    single = write_config(tmp_path / "single.yaml", {**cfg, "train": {**cfg["train"], "max_steps": 1, "checkpoint_every": 0,
                                                                      "batch_size": 2, "output_dir": str(tmp_path / "one")}})
    zero = write_config(tmp_path / "zero.yaml", {**cfg, "train": {**cfg["train"], "max_steps": 3, "checkpoint_every": 1,
                                                                    "output_dir": str(tmp_path / "two")}})
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}  # accelerate turns DeepSpeed off under it

    def launch(*args):
        return subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                               str(shipped_accelerate_configs()[f"accelerate/deepspeed_zero{stage}"]), "--num_processes", "2",
                               "--main_process_port", str(_free_port()), "-m", "diffalign", "train", str(zero), *args],
                              capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1"}, timeout=600)

    two = launch()  # builds the cache too: the text encoders must be whole under ZeRO-3
    assert two.returncode == 0, two.stderr[-3000:]
    assert main(["train", str(single)]) == 0
    assert "global batch 1 × 2 accum × 2 proc = 4" in two.stdout and f"DeepSpeed ZeRO-{stage}" in two.stdout, two.stdout
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints" / "step-00000002" / "deepspeed" / "state").glob("*optim*")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]  # Adam's state, one part per rank

    # step 1 (two micro-batches per process, clipped, the warmup's first lr) equals one process's step on the same 4 items:
    # the weights (DeepSpeed's own tool gathers them from the partitions), the loss, the gradient norm and the lr
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    step1 = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "two" / "checkpoints" / "step-00000001" / "deepspeed"), tag="state")
    one_model = load_safetensors(tmp_path / "one" / "final" / "unet" / "diffusion_pytorch_model.safetensors")
    assert step1.keys() == one_model.keys()
    for k in one_model:  # the bound of the DDP test
        torch.testing.assert_close(step1[k], one_model[k], rtol=0, atol=1e-5)
    rows = [json.loads((tmp_path / run / "metrics.jsonl").read_text().splitlines()[0]) for run in ("one", "two")]
    assert rows[0]["grad_norm"] > 0.5  # clipping acted
    for key in ("loss", "grad_norm", "lr"):
        assert rows[1][key] == pytest.approx(rows[0][key], rel=1e-5)

    # resume from step 1's partitioned checkpoint: the same final weights
    shutil.copytree(tmp_path / "two", tmp_path / "three")
    for gone in ("checkpoints/step-00000002", "final", "summary.json", "metrics.jsonl"):
        path = tmp_path / "three" / gone
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    three = launch(f"train.output_dir={tmp_path / 'three'}", "train.resume=latest")
    assert three.returncode == 0, three.stderr[-3000:]
    assert "resumed from" in three.stdout
    a = load_safetensors(tmp_path / "two" / "final" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_safetensors(tmp_path / "three" / "final" / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
