"""A checkpoint save that fails surfaces as an error naming the path, commits nothing, and leaves the previous
checkpoint intact (reliability item 15).

The failures are injected where the operating system reports them: every file or directory created under the save
fails with EROFS (a read-only filesystem; these tests run as root, whom chmod does not stop), a write fails with
ENOSPC (a full disk), an fsync fails with EIO. Each hits the save of step 4 after step 2 was committed.
"""

from __future__ import annotations

import errno
import os

import pytest
from conftest import tiny_config

import diffalign.trainers.loop as loop
from diffalign.config import validate_config
from diffalign.data import prepare_cache
from diffalign.trainers import checkpoint as ckpt

STEP4 = "step-00000004"


def _read_only(monkeypatch):
    real_open, real_mkdir = os.open, os.mkdir

    def deny(path, *a, **kw):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(os, "open", lambda path, flags, *a, **kw: deny(path) if STEP4 in str(path) and flags & os.O_CREAT
                        else real_open(path, flags, *a, **kw))
    monkeypatch.setattr(os, "mkdir", lambda path, *a, **kw: deny(path) if STEP4 in str(path) else real_mkdir(path, *a, **kw))


def _disk_full(monkeypatch):
    real = loop.torch_save

    def save(path, obj):
        if STEP4 in str(path) and path.name == "optimizer.pt":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, obj)

    monkeypatch.setattr(loop, "torch_save", save)


def _fsync_fails(monkeypatch):
    real = os.fsync

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}") if not isinstance(fd, int) or fd >= 0 else ""
        if STEP4 in path:
            raise OSError(errno.EIO, os.strerror(errno.EIO), path)
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize("inject, reason", [(_read_only, "Read-only file system"), (_disk_full, "No space left on device"),
                                            (_fsync_fails, "Input/output error")])
def test_a_failed_save_commits_nothing_and_keeps_the_previous_checkpoint(tmp_path, demo_parquet, monkeypatch, inject, reason):
    cfg = validate_config(tiny_config(tmp_path, parquet=demo_parquet, train={"max_steps": 6, "checkpoint_every": 2, "keep_last": 1}))
    prepare_cache(cfg, progress=False)
    inject(monkeypatch)
    with pytest.raises(ckpt.CheckpointError, match=rf"checkpoint of step 4 not saved: rank 0 .*{STEP4}.*{reason}.*nothing was committed, "
                                                 rf".*step-00000002 is intact"):
        loop.train(cfg)
    monkeypatch.undo()
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in ckpt.list_committed(root)] == ["step-00000002"]  # keep_last = 1 pruned nothing: no new commit
    ckpt.verify(root / "step-00000002")
    assert not (tmp_path / "run" / "final").exists() and not (tmp_path / "run" / "summary.json").exists()  # no success reported
    resumed = validate_config(tiny_config(tmp_path, parquet=demo_parquet, train={"max_steps": 6, "checkpoint_every": 2, "keep_last": 1,
                                                                                 "resume": "latest"}))
    assert loop.train(resumed).steps == 6  # the next run starts from the intact checkpoint and saves over the debris


def test_one_dead_rank_of_two_commits_nothing(tmp_path, demo_parquet):
    """`accelerate launch` with 2 CPU processes (gloo); rank 1 is SIGKILLed inside its share of the step-4 save."""
    import subprocess
    import sys

    from conftest import write_config
    from test_distributed import _free_port

    cfg = tiny_config(tmp_path, parquet=demo_parquet)
    cfg["train"].update(max_steps=6, checkpoint_every=2, keep_last=1)
    path = write_config(tmp_path / "cfg.yaml", cfg)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "DIFFALIGN_FAULT": "checkpoint.write.rank1:2"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()), "-m", "diffalign", "train",
              str(path)]
    run = subprocess.run(launch, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode != 0
    assert "rank: 1" in run.stderr or "rank 1" in run.stderr, run.stderr[-3000:]  # the launcher names the dead rank
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in ckpt.list_committed(root)] == ["step-00000002"]
    ckpt.verify(root / "step-00000002")
    assert not (tmp_path / "run" / "final").exists()
