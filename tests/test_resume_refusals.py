"""Resume continues the same run or refuses loudly (reliability items 6, 7, 8), on a real checkpoint bundle.

- every file of the bundle (weights, optimizer, schedule, RNG state, run state, config, marker) truncated to 0, half
  and size − 1 bytes, its first and last byte flipped, or deleted: refused naming the file; a resume from it too;
- a change of what decides the run (base model, LoRA rank/alpha/targets, method, β, accumulation, precision, seed,
  resolution, the data's fingerprint): refused naming the field and both values.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from conftest import tiny_config, write_config
from test_checkpoint import _damage

from diffalign.config import load_config
from diffalign.data import DataError
from diffalign.data.sources import write_demo_parquet
from diffalign.trainers import checkpoint as ckpt
from diffalign.trainers.loop import PreferenceTrainer, TrainingError, train

DAMAGE = ["trunc0", "half", "minus1", "flip_first", "flip_last", "delete"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, demo_parquet) -> tuple[Path, Path]:
    """(config path, committed step-2 checkpoint) of a 2-step tiny LoRA DPO run."""
    tmp = tmp_path_factory.mktemp("run")
    path = write_config(tmp / "cfg.yaml", tiny_config(tmp, parquet=demo_parquet, train={"max_steps": 2, "checkpoint_every": 2}))
    train(load_config(path))
    return path, ckpt.latest(tmp / "run" / "checkpoints")


def _bundle(step: Path) -> list[str]:
    return sorted(p.relative_to(step).as_posix() for p in step.rglob("*") if p.is_file())


def test_every_damaged_file_of_a_real_bundle_is_refused_by_name(run, tmp_path):
    _, step = run
    files = _bundle(step)
    assert {"trainable.safetensors", "optimizer.pt", "lr_schedule.pt", "rng-rank0.pt", "state.json", ckpt.MARKER} <= set(files)
    for name in files:
        for how in DAMAGE:
            copy = tmp_path / "checkpoints" / step.name
            shutil.rmtree(copy.parent, ignore_errors=True)
            shutil.copytree(step, copy)
            _damage(copy / name, how)
            with pytest.raises(ckpt.CheckpointError, match=re.escape(name)):
                ckpt.verify(copy)


@pytest.mark.parametrize("name", ["rng-rank0.pt", "optimizer.pt"])
def test_resuming_from_a_damaged_bundle_refuses_naming_the_file(run, tmp_path, name):
    config, step = run
    out = tmp_path / "out"
    shutil.copytree(step.parent, out / "checkpoints")
    _damage(out / "checkpoints" / step.name / name, "delete")
    cfg = load_config(config, ["train.resume=latest", "train.max_steps=3", f"train.output_dir={out}"])
    with pytest.raises(ckpt.CheckpointError, match=re.escape(name)):
        train(cfg)


CHANGES = [
    ("model.lora.rank=8", "model.lora.rank", "4", "8"),
    ("model.lora.alpha=2.0", "model.lora.alpha", "4.0", "2.0"),
    ("model.lora.target_modules=[to_q]", "model.lora.target_modules", "to_k", "to_q"),
    ("method.beta=1000", "method.beta", "5000.0", "1000.0"),
    ("method.name=rankdpo", "method.name", "dpo", "rankdpo"),
    ("train.grad_accum=2", "train.grad_accum", "1", "2"),
    ("train.mixed_precision=bf16", "train.mixed_precision", "no", "bf16"),
    ("train.seed=7", "train.seed", "0", "7"),  # every counter-based stream (noise, timesteps, dropout, order) derives from it
    ("model.pretrained=builtin:tiny-sd15", "model.pretrained", "builtin:tiny-sdxl", "builtin:tiny-sd15"),
    ("data.resolution=16", "data.resolution", "32", "16"),
]


@pytest.mark.parametrize("change, field, old, new", CHANGES, ids=[c[1] for c in CHANGES])
def test_an_identity_change_is_refused_naming_the_field_and_both_values(run, change, field, old, new, fresh_accelerate_state):
    config, _ = run
    trainer = PreferenceTrainer(load_config(config, ["train.resume=latest", "train.max_steps=3", change]))
    with pytest.raises((TrainingError, DataError)) as e:
        trainer.setup()
    message = str(e.value)
    assert field in message and old in message and new in message, message


def test_other_data_is_refused_by_its_fingerprint(run, tmp_path):
    config, _ = run
    other = write_demo_parquet(tmp_path / "other.parquet", num_pairs=24, image_size=40, seed=1, row_group_size=5)
    cfg = load_config(config, ["train.resume=latest", "train.max_steps=3", f"data.source.path={other}",
                               f"data.cache_dir={tmp_path / 'other_cache'}"])
    with pytest.raises(TrainingError, match=r"cannot resume .* cache \(checkpoint '\w+', config '\w+'\)"):
        PreferenceTrainer(cfg).setup()
