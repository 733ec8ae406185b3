"""Shared helpers for end-to-end tests: tiny configs written as YAML, run through the real CLI."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

# The reliability tests' size: "ci" (default) or "full" (outside CI: 20 random kills per method, 2,000 fuzz examples
# per reader, 40 killed scoring runs): DIFFALIGN_RELIABILITY=full pytest tests/test_random_kills.py tests/test_fuzz.py ...
FULL_RELIABILITY = os.environ.get("DIFFALIGN_RELIABILITY", "ci") == "full"


def fork_cli(argv: list[str], fault: str = "") -> int:
    """Start `diffalign <argv>` in a forked child of this process (which has imported the libraries already: a fresh
    command spends seconds importing) on one thread, so that runs compute bit for bit alike; return its pid. `fault`:
    a ``DIFFALIGN_FAULT`` spec for the child (`diffalign.faults`)."""
    import torch

    from diffalign.cli import main

    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        code = 1
        try:
            torch.set_num_threads(1)
            os.environ["DIFFALIGN_FAULT"] = fault
            code = main(argv)
        finally:
            os._exit(code)
    return pid


def wait_exit(pid: int) -> int:
    """The exit code of a forked child; minus the signal number if a signal ended it."""
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def tiny_config(tmp: Path, *, parquet: Path, pretrained: str = "builtin:tiny-sdxl", finetune: str = "lora", **sections) -> dict:
    """A small, fast config on the tiny pipelines; `sections` update the defaults per section."""
    cfg = {
        "model": {"pretrained": pretrained, "finetune": finetune, "lora": {"rank": 4, "alpha": 4.0}},
        "data": {
            "source": {"kind": "pickapic", "path": str(parquet)},
            "cache_dir": str(tmp / "cache"),
            "resolution": 32,
            "shard_size": 8,
            "latent_dtype": "float32",
        },
        "method": {"name": "dpo", "beta": 5000.0},
        "optim": {"lr": 1e-3, "schedule": "constant_with_warmup", "warmup_steps": 2},
        "train": {"output_dir": str(tmp / "run"), "max_steps": 4, "batch_size": 2, "checkpoint_every": 2, "keep_last": 2},
        "log": {"tracker": "none", "progress": False},
        "eval": {"validation_every": 0, "num_inference_steps": 2},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def config_header(path: Path) -> str:
    """The opening comment block of a YAML config (its lines up to the first that is not a comment)."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return "\n".join(lines)


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m diffalign ...` in a fresh process (same interpreter, single-threaded for determinism)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "diffalign", *args], capture_output=True, text=True, env=full_env, timeout=timeout)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models are fastest on one torch thread; several fight each other (and any other job) on a small CPU.
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``; the count is restored after the module."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def demo_parquet(tmp_path_factory) -> Path:
    """A Pick-a-Pic-v2-format parquet (caption, jpg_0, jpg_1, label_0) of 16 generated scene pairs."""
    from diffalign.data.sources.demo import write_demo_parquet

    return write_demo_parquet(tmp_path_factory.mktemp("pickapic") / "train.parquet", num_pairs=16, image_size=48, seed=0)


def shuffle_folder(folder, rng: random.Random):
    """Rename every image to a random name and rewrite metadata.jsonl to match (a copy of the original is kept
    beside it as orig_<name>)."""
    shutil.copytree(folder, folder.with_name("orig_" + folder.name))
    lines = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    rng.shuffle(lines)
    names = [f"shuffled_{rng.randrange(10**9):09d}.png" for _ in lines]
    for line, name in zip(lines, names):
        (folder / line["file"]).rename(folder / name)
        line["file"] = name
    (folder / "metadata.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide precision; a test that changes it resets around itself."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
