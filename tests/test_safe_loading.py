"""A canary pickle in every input slot never runs (reliability item 9b).

The canary is a torch zip (or a bare pickle) whose ``__reduce__`` creates a file; the control shows that plain
unpickling runs it. Every slot is tried with ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``, which turns torch's default
loader unsafe for any caller that does not pass ``weights_only=True`` itself (our own loads do; the third-party
loaders are kept off pickles: networks load with ``use_safetensors=True``, LoRAs and checkpoints as safetensors).
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from tiny_scorers import write_aesthetic_mlp, write_clip_folder

from diffalign.config import ConfigError, ModelConfig, load_config, validate_config
from diffalign.errors import USER_ERRORS
from diffalign.models.loading import load_components
from diffalign.models.tiny import tiny_sd15_pipeline


class Canary:
    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def canary(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    return tmp_path / "CANARY"


def plant(path: Path, canary: Path, tensors: dict | None = None) -> Path:
    """A torch file at `path` holding `tensors` and the canary (what a poisoned .bin/.pt looks like)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**(tensors or {}), "payload": Canary(canary)}, path)
    return path


def test_control_the_canary_is_live(tmp_path):
    f = plant(tmp_path / "x.bin", tmp_path / "CANARY")
    torch.load(f, weights_only=False)
    assert (tmp_path / "CANARY").exists()


@pytest.fixture(scope="module")
def sd15_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sd15")
    tiny_sd15_pipeline().save_pretrained(folder)
    return folder


def _poisoned_model(tmp_path: Path, sd15_dir: Path, canary: Path, subfolder: str, weights: str) -> Path:
    model = tmp_path / "model"
    shutil.copytree(sd15_dir, model)
    (model / subfolder / weights).unlink()
    bin_name = "diffusion_pytorch_model.bin" if weights.startswith("diffusion") else "pytorch_model.bin"
    plant(model / subfolder / bin_name, canary, {"w": torch.zeros(2)})
    return model


@pytest.mark.parametrize("subfolder, weights", [("unet", "diffusion_pytorch_model.safetensors"), ("vae", "diffusion_pytorch_model.safetensors"),
                                                ("text_encoder", "model.safetensors")])
def test_model_folders_with_pickled_weights_are_refused(tmp_path, sd15_dir, canary, subfolder, weights):
    model = _poisoned_model(tmp_path, sd15_dir, canary, subfolder, weights)
    with pytest.raises(USER_ERRORS, match=rf"{subfolder}' holds pickled weights only \((diffusion_)?pytorch_model.bin\)"):
        load_components(ModelConfig(pretrained=str(model)))
    assert not canary.exists()


def test_trained_weights_slots_refuse_pickles(tmp_path, sd15_dir, canary):
    """init_from (a UNet folder, a .bin LoRA) and generate's adapters (a UNet folder, a .bin LoRA, a folder of one)."""
    from diffalign.models.init_from import start_from
    from diffalign.pipelines.weights import find_weights, load_unet

    components = load_components(ModelConfig(pretrained="builtin:tiny-sd15"))
    unet_dir = tmp_path / "unet"
    shutil.copytree(sd15_dir / "unet", unet_dir)
    (unet_dir / "diffusion_pytorch_model.safetensors").unlink()
    plant(unet_dir / "diffusion_pytorch_model.bin", canary, {"w": torch.zeros(2)})
    lora_bin = plant(tmp_path / "lora" / "pytorch_lora_weights.bin", canary, {"w": torch.zeros(2)})
    for attempt in (lambda: start_from(components, unet_dir), lambda: start_from(components, lora_bin),
                    lambda: load_unet(find_weights(unet_dir), components.unet), lambda: find_weights(lora_bin),
                    lambda: find_weights(lora_bin.parent)):
        with pytest.raises(USER_ERRORS):
            attempt()
    assert not canary.exists()


def test_scorer_weight_slots_refuse_pickles(tmp_path, canary):
    from diffalign.scorers import load_scorer

    clip = write_clip_folder(tmp_path / "clip")
    poisoned_clip = tmp_path / "clip_bin"
    shutil.copytree(clip, poisoned_clip)
    sd = {k: v for k, v in __import__("safetensors.torch", fromlist=["load_file"]).load_file(poisoned_clip / "model.safetensors").items()}
    (poisoned_clip / "model.safetensors").unlink()
    plant(poisoned_clip / "pytorch_model.bin", canary, sd)  # transformers would read this file
    mlp = plant(tmp_path / "sac+logos+ava1-l14-linearMSE.pth", canary, torch.load(write_aesthetic_mlp(tmp_path / "ok.pth"), weights_only=True))
    for name, options in [("pickscore", {"path": str(poisoned_clip)}), ("clipscore", {"path": str(poisoned_clip)}),
                          ("aesthetic", {"path": str(mlp), "clip": str(clip)})]:
        with pytest.raises(USER_ERRORS):
            load_scorer(name, **options)
    assert not canary.exists()


def test_checkpoint_and_cache_slots_refuse_pickles(tmp_path, demo_parquet, canary):
    """A resumed run's optimizer file and a cache shard, each replaced by a pickle (the checkpoint's manifest updated
    to match, so that the loader itself is what refuses)."""
    import hashlib

    from diffalign.data import LatentPairDataset
    from diffalign.trainers import checkpoint as ckpt
    from diffalign.trainers.loop import train

    cfg = validate_config(tiny_config(tmp_path, parquet=demo_parquet, train={"max_steps": 2, "checkpoint_every": 1}))
    train(cfg)
    step = ckpt.latest(tmp_path / "run" / "checkpoints")
    optimizer = plant(step / "optimizer.pt", canary, {"w": torch.zeros(2)})
    marker = json.loads((step / ckpt.MARKER).read_text())
    for entry in marker["files"]:
        if entry["path"] == "optimizer.pt":
            entry.update(size=optimizer.stat().st_size, sha256=hashlib.sha256(optimizer.read_bytes()).hexdigest())
    (step / ckpt.MARKER).write_text(json.dumps(marker))
    ckpt.verify(step)  # the manifest now vouches for the poisoned file
    resumed = validate_config(tiny_config(tmp_path, parquet=demo_parquet, train={"max_steps": 3, "resume": "latest"}))
    with pytest.raises(USER_ERRORS, match="optimizer.pt"):
        train(resumed)
    shard = Path(cfg.data.cache_dir) / "shards" / "00000.safetensors"
    shard.write_bytes(pickle.dumps(Canary(canary)))
    with pytest.raises(USER_ERRORS, match="00000.safetensors"):
        LatentPairDataset(cfg.data.cache_dir, cfg.data)[0]
    assert not canary.exists()


def test_a_deepspeed_checkpoint_with_a_canary_is_refused_before_deepspeed_opens_it(tmp_path, canary):
    """DeepSpeed unpickles its checkpoint files in full: diffalign reads each with weights_only first, allowing only
    DeepSpeed's inert records, so a planted file stops the resume (the engine is never asked to load)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from diffalign.trainers.checkpoint import CheckpointError
    from diffalign.trainers.deepspeed_zero import load_zero

    class Engine:  # records whether DeepSpeed's loader would have been called
        loaded = False

        def load_checkpoint(self, *args, **kwargs):
            Engine.loaded = True
            return "loaded", {}

    state = tmp_path / "deepspeed" / "state"
    state.mkdir(parents=True)
    torch.save({"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients, "w": torch.zeros(2)},
               state / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    load_zero(tmp_path / "deepspeed", Engine())  # DeepSpeed's own records pass
    assert Engine.loaded
    Engine.loaded = False
    plant(state / "zero_pp_rank_1_mp_rank_00_optim_states.pt", canary, {"w": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="zero_pp_rank_1_mp_rank_00_optim_states.pt: not a DeepSpeed checkpoint file"):
        load_zero(tmp_path / "deepspeed", Engine())
    assert not canary.exists() and not Engine.loaded
    with pytest.raises(CheckpointError, match="no DeepSpeed checkpoint files"):
        load_zero(tmp_path / "elsewhere", Engine())


def test_yaml_configs_never_build_objects(tmp_path, canary):
    path = tmp_path / "evil.yaml"
    path.write_text(f"model:\n  pretrained: !!python/object/apply:builtins.open ['{canary}', 'w']\n")
    with pytest.raises(ConfigError):
        load_config(path)
    assert not canary.exists()
