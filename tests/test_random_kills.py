"""SIGKILL at a random time during a real `diffalign train`, then `train.resume=latest` until done: the run ends
bit-identical to an uninterrupted one (reliability item 1), for an offline method (DPO on a cache) and an online one
(Pref-GRPO: rollouts mid-round), and saving leaves no trace in the trained parameters (item 5).

Each run is forked from this process, which has already imported the libraries (a fresh `diffalign train` spends
seconds importing), and trains on one thread so that every run computes bit for bit the same. The kill times are
drawn from a seeded RNG over the uninterrupted run's duration. CI size: 2 kills per method; the full size (20 per
method) is ``DIFFALIGN_RELIABILITY=full`` (docs/reliability.md); ``DIFFALIGN_KILL_TRIALS=N`` sets any number.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import FULL_RELIABILITY, fork_cli, tiny_config, wait_exit, write_config

from diffalign.cli import main
from diffalign.io import load_safetensors, torch_load
from diffalign.trainers import checkpoint as ckpt

TRIALS = int(os.environ.get("DIFFALIGN_KILL_TRIALS", "20" if FULL_RELIABILITY else "2"))


def _run(argv: list[str]) -> float:
    started = time.perf_counter()
    assert wait_exit(fork_cli(["train", *argv])) == 0
    return time.perf_counter() - started


def _kill_after(argv: list[str], seconds: float) -> int:
    pid = fork_cli(["train", *argv])
    time.sleep(seconds)
    os.kill(pid, signal.SIGKILL)  # a child that has already finished is a zombie until waited on: no error
    return wait_exit(pid)


def _final_state(out: Path) -> dict[str, torch.Tensor]:
    last = ckpt.latest(out / "checkpoints")
    state = dict(load_safetensors(last / "trainable.safetensors"))
    optimizer = torch_load(last / "optimizer.pt")
    for index, entries in sorted(optimizer["state"].items()):
        state.update({f"optimizer.{index}.{k}": torch.as_tensor(v) for k, v in entries.items()})
    return state


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _assert_same(a: Path, b: Path) -> None:
    sa, sb = _final_state(a), _final_state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{k} differs from the uninterrupted run"
    assert _losses(a) == _losses(b)


def _offline(tmp_path: Path, demo_parquet: Path, out: str, **train) -> list[str]:
    cfg = tiny_config(tmp_path, parquet=demo_parquet, pretrained="builtin:tiny-sd15", data={"caption_dropout": 0.2},
                      optim={"lr": 1e-4, "warmup_steps": 2})
    cfg["train"].update({"max_steps": 10, "checkpoint_every": 2, "keep_last": 2, "resume": "latest", "output_dir": str(tmp_path / out), **train})
    return [str(write_config(tmp_path / f"{out}.yaml", cfg))]


def _online(tmp_path: Path, out: str, checkpoint_every: int = 1) -> list[str]:
    return ["toy/pref_grpo", "method.group_size=4", "method.groups_per_round=2", "method.sampling_steps=4",
            "train.batch_size=4", "train.grad_accum=1",
            "train.max_steps=6", f"train.checkpoint_every={checkpoint_every}", "train.keep_last=2", "train.resume=latest",
            "log.progress=false", f"train.output_dir={tmp_path / out}"]


@pytest.mark.parametrize("kind", ["offline", "online"])
def test_random_sigkills_resume_to_the_uninterrupted_run(tmp_path, demo_parquet, kind):
    argv = (lambda out: _offline(tmp_path, demo_parquet, out)) if kind == "offline" else (lambda out: _online(tmp_path, out))
    if kind == "offline":
        assert main(["prepare", *argv("prepare")]) == 0  # the cache once, outside the timed runs
    duration = _run(argv("straight"))
    rng = random.Random(1 if kind == "offline" else 2)
    for trial in range(TRIALS):
        run = argv(f"killed{trial}")
        code = _kill_after(run, rng.uniform(0.1, 0.9) * duration)
        assert code == -signal.SIGKILL, f"trial {trial}: the run ended ({code}) before the kill"
        while wait_exit(fork_cli(["train", *run])) != 0:  # resume until done (a crash would loop: fail instead)
            pytest.fail(f"trial {trial}: the resumed run failed")
        _assert_same(tmp_path / "straight", tmp_path / f"killed{trial}")


def test_checkpointing_every_step_leaves_no_trace(tmp_path, demo_parquet):
    """A run that checkpoints every step ends bit-identical to one that checkpoints only at the end."""
    _run(_offline(tmp_path, demo_parquet, "every", checkpoint_every=1))
    _run(_offline(tmp_path, demo_parquet, "never", checkpoint_every=0))
    _assert_same(tmp_path / "every", tmp_path / "never")
