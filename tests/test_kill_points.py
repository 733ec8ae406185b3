"""SIGKILL at every named commit point of `prepare` (cache shards, manifest, scores) and `generate`, then the same
command again: the result equals an uninterrupted run's, byte for byte (reliability item 2; the checkpoint points
are in tests/test_checkpoint.py, the score journal's in tests/test_hostile_images.py).

The killed commands run in a child forked from this process (libraries already imported) with ``DIFFALIGN_FAULT``.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from conftest import fork_cli, tiny_config, wait_exit, write_config

from diffalign.cli import main


def _in_child(argv: list[str], fault: str) -> int:
    return wait_exit(fork_cli(argv, fault))


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, demo_parquet):
    """A config (a cache of 3 shards, scored by the toy checklist) and the files of its uninterrupted build."""
    tmp = tmp_path_factory.mktemp("prepare")
    cfg = tiny_config(tmp, parquet=demo_parquet, pretrained="builtin:tiny-sd15", data={"scores": ["toy-checklist"]})
    cfg["data"]["cache_dir"] = str(tmp / "reference")
    write_config(tmp / "reference.yaml", cfg)
    pid = os.fork()  # the reference on one thread too
    if pid == 0:
        code = 1
        try:
            torch.set_num_threads(1)
            code = main(["prepare", str(tmp / "reference.yaml")])
        finally:
            os._exit(code)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    return cfg, _files(tmp / "reference")


@pytest.mark.parametrize("fault", ["cache.shard_tensors:2", "cache.shard:1", "cache.shard:2", "cache.before_manifest:1", "scores.shard:2"])
def test_prepare_killed_at_a_commit_point_resumes_to_the_same_cache(prepared, tmp_path, fault):
    cfg, reference = prepared
    cfg = {**cfg, "data": {**cfg["data"], "cache_dir": str(tmp_path / "cache")}}
    path = str(write_config(tmp_path / "cfg.yaml", cfg))
    assert _in_child(["prepare", path], fault) == -signal.SIGKILL
    assert not (tmp_path / "cache" / "scores" / "toy-checklist" / "summary.json").exists()
    assert _in_child(["prepare", path], "") == 0
    assert _files(tmp_path / "cache") == reference


GENERATE = ["generate", "--model", "builtin:toy", "--prompts", "a red circle on a white background", "a small blue square",
            "--seeds", "0-2", "--steps", "3", "--guidance-scale", "3", "--batch-size", "2", "--no-progress"]


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("generate") / "reference"
    assert _in_child([*GENERATE, "--out", str(out)], "") == 0
    return _files(out)


@pytest.mark.parametrize("fault", ["generate.image:3", "generate.batch:2"])
def test_generate_killed_at_a_commit_point_resumes_to_the_same_folder(generated, tmp_path, fault):
    assert _in_child([*GENERATE, "--out", str(tmp_path / "killed")], fault) == -signal.SIGKILL
    assert _in_child([*GENERATE, "--out", str(tmp_path / "killed")], "") == 0
    assert _files(tmp_path / "killed") == generated
