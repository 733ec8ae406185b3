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


def test_no_write_lands_outside_the_configured_directories(tmp_path, demo_parquet, monkeypatch):
    """prepare, train, generate, score and compare write only under the directories they are given: the working
    directory, HOME and the temporary directory stay empty, except matplotlib's own font cache (built once per user
    by matplotlib on first import, as for any program that plots)."""
    import json
    import tempfile

    from conftest import write_config

    from diffalign.cli import main

    outside = {name: tmp_path / name for name in ("cwd", "home", "tmp")}
    for folder in outside.values():
        folder.mkdir()
    monkeypatch.chdir(outside["cwd"])
    monkeypatch.setenv("HOME", str(outside["home"]))
    monkeypatch.setenv("TMPDIR", str(outside["tmp"]))
    monkeypatch.setattr(tempfile, "tempdir", str(outside["tmp"]))
    given = tmp_path / "given"
    given.mkdir()
    cfg = tiny_config(given, parquet=demo_parquet, pretrained="builtin:tiny-sd15")
    config = write_config(given / "run.yaml", cfg)
    before = {p for p in tmp_path.rglob("*") if p.is_file()}
    assert main(["prepare", str(config)]) == 0
    assert main(["train", str(config)]) == 0
    gen = ["generate", "--model", "builtin:toy", "--prompts", "a red circle on a white background", "--seeds", "0-1", "--steps", "2", "--no-progress"]
    assert main([*gen, "--out", str(given / "images")]) == 0
    assert main([*gen, "--out", str(given / "images2"), "--guidance-scale", "1"]) == 0
    assert main(["score", str(given / "images"), "--scorers", "toy-checklist", "--out", str(given / "scores"), "--no-progress"]) == 0
    assert main(["compare", str(given / "images"), str(given / "images2"), "--scorers", "toy-checklist",
                 "--out", str(given / "cmp"), "--no-progress"]) == 0
    written = {p for p in tmp_path.rglob("*") if p.is_file()} - before
    allowed = [Path(cfg["data"]["cache_dir"]), Path(cfg["train"]["output_dir"]), given / "images", given / "images2",
               given / "scores", given / "cmp"]
    allowed.append(outside["home"] / ".cache" / "matplotlib")
    # an --out of score/compare is a folder or a file stem (scores.csv, scores_summary.json beside it)
    stray = sorted(str(p) for p in written
                   if not any(p.is_relative_to(a) or (p.parent == a.parent and p.name.startswith((a.name + ".", a.name + "_")))
                              for a in allowed))
    assert not stray, json.dumps(stray, indent=1)
    assert not any(outside["cwd"].iterdir()) and not any(outside["tmp"].iterdir())
