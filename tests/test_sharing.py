"""Sharing a machine: one writer per cache and per output directory (`diffalign.locks`), files readable as the umask says.

Reliability issue, "Sharing and paths". The other process is a real one (a subprocess holding the lock), and the
kernel's release of a SIGKILLed holder's lock is checked too.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import tiny_config

from diffalign.config import validate_config
from diffalign.data import prepare_cache
from diffalign.locks import LOCK_NAME, DirectoryInUseError, directory_lock

HOLD = textwrap.dedent("""
    import sys
    from diffalign.locks import directory_lock
    with directory_lock(sys.argv[1], "test"):
        print("held", flush=True)
        sys.stdin.read()  # until the test closes our stdin (or kills us)
""")


class Holder:
    """A separate process holding the lock of `folder` until `release` (or `kill`)."""

    def __init__(self, folder: Path):
        self.proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "held"

    def release(self) -> None:
        self.proc.stdin.close()
        assert self.proc.wait(timeout=30) == 0

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.proc.stdin.close()


def test_a_held_directory_is_refused_naming_the_holder_and_freed_when_it_exits(tmp_path):
    holder = Holder(tmp_path / "out")
    with pytest.raises(DirectoryInUseError, match=rf"train.output_dir: .*out is in use by pid {holder.proc.pid} on "):
        with directory_lock(tmp_path / "out", "train.output_dir"):
            pass
    holder.release()
    assert (tmp_path / "out" / LOCK_NAME).read_bytes() == b""  # a clean release leaves no holder described
    with directory_lock(tmp_path / "out", "train.output_dir"):
        pass


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    Holder(tmp_path / "cache").kill()
    with directory_lock(tmp_path / "cache", "data.cache_dir"):
        with directory_lock(tmp_path / "cache", "data.cache_dir"):  # this process again: nested, not refused
            pass


def test_a_second_cache_builder_is_locked_out(tmp_path, demo_parquet):
    cfg = validate_config(tiny_config(tmp_path, parquet=demo_parquet))
    holder = Holder(Path(cfg.data.cache_dir))
    with pytest.raises(DirectoryInUseError, match=rf"data.cache_dir: .* is in use by pid {holder.proc.pid}"):
        prepare_cache(cfg, progress=False)
    assert sorted(p.name for p in Path(cfg.data.cache_dir).iterdir()) == [LOCK_NAME]  # nothing written meanwhile
    holder.release()
    prepare_cache(cfg, progress=False)


def test_a_second_run_into_the_same_output_dir_is_locked_out(tmp_path, demo_parquet):
    from diffalign.trainers.loop import train

    cfg = validate_config(tiny_config(tmp_path, parquet=demo_parquet, train={"max_steps": 1}))
    prepare_cache(cfg, progress=False)
    holder = Holder(Path(cfg.train.output_dir))
    with pytest.raises(DirectoryInUseError, match="train.output_dir: .* is in use by pid"):
        train(cfg)
    assert not (Path(cfg.train.output_dir) / "checkpoints").exists()
    holder.release()


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_get_the_mode_the_umask_gives(tmp_path, umask, mode):
    """Atomic writes go through a 0600 temporary file; the result is what a plain open() would have created."""
    code = textwrap.dedent(f"""
        import os, sys
        os.umask({umask})
        import torch
        from diffalign.io import atomic_write_text, save_safetensors
        atomic_write_text(sys.argv[1] + "/a.json", "{{}}")
        save_safetensors(sys.argv[1] + "/b.safetensors", {{"w": torch.zeros(2)}})
    """)
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True)
    for name in ("a.json", "b.safetensors"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == mode, name
