"""End to end on the tiny SD1.5 and SDXL pipelines: parquet -> prepare -> train -> checkpoints -> export."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config, write_config
from diffusers import DDIMScheduler, UNet2DConditionModel
from torch.testing import assert_close

from diffalign.cli import main
from diffalign.config import load_config
from diffalign.io import load_safetensors
from diffalign.models.loading import build_pipeline
from diffalign.models.tiny import tiny_sd15_pipeline, tiny_sdxl_pipeline
from diffalign.trainers import checkpoint as ckpt
from diffalign.trainers.loop import PreferenceTrainer

LOGGED = {"loss", "implicit_acc", "reward_margin", "model_mse", "ref_mse", "lr", "grad_norm", "samples_per_s"}


def _images(pipe, prompt="a red circle on a white background"):
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # deterministic sampler on both sides
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=3, height=32, width=32, generator=g, output_type="np").images


FAMILIES = [("builtin:tiny-sdxl", tiny_sdxl_pipeline), ("builtin:tiny-sd15", tiny_sd15_pipeline)]


@pytest.mark.parametrize("pretrained,builder", FAMILIES, ids=["sdxl", "sd15"])
def test_lora_prepare_train_checkpoint_export_reload(tmp_path, demo_parquet, pretrained, builder):
    cfg = tiny_config(tmp_path, parquet=demo_parquet, pretrained=pretrained, eval={"validation_every": 2, "num_inference_steps": 2})
    cfg_path = write_config(tmp_path / "cfg.yaml", cfg)
    assert main(["prepare", str(cfg_path)]) == 0
    trainer = PreferenceTrainer(load_config(cfg_path))
    trainer.setup()
    initial = {n: p.detach().clone() for n, p in trainer.unet.named_parameters() if p.requires_grad}
    result = trainer.train()

    # committed checkpoints, pruned to keep_last = 2, each with its resolved config
    committed = ckpt.list_committed(tmp_path / "run" / "checkpoints")
    assert [p.name for p in committed] == ["step-00000002", "step-00000004"]
    for path in committed:
        ckpt.verify(path)
        assert (path / "config.yaml").read_text().startswith("# Resolved diffalign config")
    # every trained parameter moved
    for name, p in trainer.unet.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p.detach(), initial[name]), f"{name} did not change"
    # logs, curves, validation grids (trained row + adapters-disabled row)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and LOGGED <= set(rows[0])
    assert (tmp_path / "run" / "curves.png").is_file()
    from PIL import Image

    grid = Image.open(tmp_path / "run" / "validation" / "step-00000004.png")
    assert grid.size == (2 * 32, 2 * 32)

    # the exported LoRA, loaded into a plain diffusers pipeline, reproduces the in-memory model
    in_memory = _images(build_pipeline(trainer.components, trainer.accelerator.unwrap_model(trainer.unet)))
    plain = builder()
    plain.load_lora_weights(str(result.final_dir))
    assert_close(_images(plain), in_memory, atol=1e-5, rtol=0)
    assert not torch.allclose(torch.from_numpy(_images(builder())), torch.from_numpy(in_memory), atol=1e-4)


@pytest.mark.parametrize("pretrained,builder", FAMILIES, ids=["sdxl", "sd15"])
def test_full_finetune_keeps_reference_and_saves_unet(tmp_path, demo_parquet, pretrained, builder):
    cfg = tiny_config(tmp_path, parquet=demo_parquet, pretrained=pretrained, finetune="full", optim={"lr": 1e-4})
    cfg_path = write_config(tmp_path / "cfg.yaml", cfg)
    assert main(["train", str(cfg_path), "train.max_steps=2"]) == 0
    base = builder().unet.state_dict()
    saved = UNet2DConditionModel.from_pretrained(tmp_path / "run" / "final" / "unet").state_dict()
    assert any(not torch.equal(saved[k], base[k]) for k in base)

    # resume: the policy gets the checkpoint's weights, the reference stays the base model
    trainer = PreferenceTrainer(load_config(cfg_path, ["train.resume=latest", "train.max_steps=3"]))
    trainer.setup()
    assert trainer.step == 2 and trainer.resumed_from.name == "step-00000002"
    for k, v in trainer.reference.state_dict().items():
        assert torch.equal(v, base[k]), f"reference {k} changed"
    for k, v in trainer.accelerator.unwrap_model(trainer.unet).state_dict().items():
        assert torch.equal(v, saved[k]), f"policy {k} not restored"


@pytest.mark.parametrize(
    "pretrained,finetune",
    [("builtin:tiny-sdxl", "lora"), ("builtin:tiny-sd15", "full")],
)
def test_sigkill_while_writing_a_checkpoint_then_resume_matches_uninterrupted(tmp_path, demo_parquet, pretrained, finetune):
    from conftest import run_cli

    base = tiny_config(tmp_path, parquet=demo_parquet, pretrained=pretrained, finetune=finetune, optim={"lr": 1e-4}, data={"caption_dropout": 0.2})
    base["train"].update(max_steps=6, checkpoint_every=2, keep_last=1)
    straight = write_config(tmp_path / "straight.yaml", {**base, "train": {**base["train"], "output_dir": str(tmp_path / "straight")}})
    killed = write_config(tmp_path / "killed.yaml", {**base, "train": {**base["train"], "output_dir": str(tmp_path / "killed"), "resume": "latest"}})

    done = run_cli("train", str(straight))
    assert done.returncode == 0, done.stderr
    # the 3rd hit of `checkpoint.write` is inside the step-4 checkpoint: SIGKILL mid-write
    crash = run_cli("train", str(killed), env={"DIFFALIGN_FAULT": "checkpoint.write:3"})
    assert crash.returncode == -9, crash.stderr
    root = tmp_path / "killed" / "checkpoints"
    assert ckpt.latest(root).name == "step-00000002"
    assert (root / ".staging-step-00000004").is_dir()  # the half-written one, never committed
    resumed = run_cli("train", str(killed))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout

    a, b = tmp_path / "straight" / "checkpoints" / "step-00000006", root / "step-00000006"
    wa, wb = load_safetensors(a / "trainable.safetensors"), load_safetensors(b / "trainable.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs after resume"
    from diffalign.io import torch_load

    oa, ob = torch_load(a / "optimizer.pt"), torch_load(b / "optimizer.pt")
    for (ka, sa), (kb, sb) in zip(sorted(oa["state"].items()), sorted(ob["state"].items())):
        for name in sa:
            assert torch.equal(torch.as_tensor(sa[name]), torch.as_tensor(sb[name])), f"optimizer state {ka}.{name} differs"
    la = [json.loads(x)["loss"] for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert la == lb


def test_resume_refuses_a_changed_run(tmp_path, demo_parquet):
    cfg_path = write_config(tmp_path / "cfg.yaml", tiny_config(tmp_path, parquet=demo_parquet))
    assert main(["train", str(cfg_path), "train.max_steps=2"]) == 0
    trainer = PreferenceTrainer(load_config(cfg_path, ["train.resume=latest", "method.beta=1000"]))
    from diffalign.trainers.loop import TrainingError

    with pytest.raises(TrainingError, match=r"method\.beta \(checkpoint 5000\.0, config 1000\.0\)"):
        trainer.setup()


def test_resume_refuses_a_checkpoint_of_other_pairing_rules(tmp_path, demo_parquet, monkeypatch):
    """A checkpoint written before `ties: drop` also dropped score ties would resume on another item set: refused, with why."""
    from diffalign.trainers import loop

    cfg_path = write_config(tmp_path / "cfg.yaml", tiny_config(tmp_path, parquet=demo_parquet))
    assert main(["train", str(cfg_path), "train.max_steps=2"]) == 0
    monkeypatch.setattr(loop, "PAIRING_RULES", loop.PAIRING_RULES + 1)
    trainer = PreferenceTrainer(load_config(cfg_path, ["train.resume=latest"]))
    with pytest.raises(loop.TrainingError, match=r"pairing rules 2 \(this diffalign: 3\).*tie by rank or score.*start a new run"):
        trainer.setup()
