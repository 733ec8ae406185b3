"""The loop under a long GPU run: EMA after resume, skipped fp16 steps, non-finite losses, what resume checks and
applies, counter-based LoRA dropout, and starting from a previous output (`model.init_from`)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config, write_config

from diffalign.config import load_config
from diffalign.trainers.loop import PreferenceTrainer, TrainingError, load_ema

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(tmp_path, demo_parquet, name, *overrides, **sections):
    cfg = tiny_config(tmp_path, parquet=demo_parquet, **sections)
    cfg["train"].update(output_dir=str(tmp_path / name), checkpoint_every=0)
    return load_config(write_config(tmp_path / f"{name}.yaml", cfg), list(overrides))


def _trainer(tmp_path, demo_parquet, name, *overrides, **sections):
    trainer = PreferenceTrainer(_config(tmp_path, demo_parquet, name, *overrides, **sections))
    trainer.setup()
    return trainer


def _trainable(trainer):
    return {n: p.detach().clone() for n, p in trainer.unet.named_parameters() if p.requires_grad}


def _rows(trainer):
    return [json.loads(x) for x in (trainer.output_dir / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------ EMA, fp16


def test_a_resumed_ema_moves_to_the_parameters_device():
    """The EMA state is read onto the CPU; on a GPU its next step would mix devices. `meta` stands in for the GPU."""
    from diffusers.training_utils import EMAModel

    saved = EMAModel([torch.nn.Parameter(torch.ones(3))], decay=0.9).state_dict()
    params = [torch.nn.Parameter(torch.ones(3, device="meta"))]
    unmoved = EMAModel(params, decay=0.9)
    unmoved.load_state_dict(saved)
    with pytest.raises(RuntimeError):
        unmoved.step(params)  # what the loop did before: mixed devices
    ema = EMAModel(params, decay=0.9)
    load_ema(ema, saved, torch.device("meta"))
    ema.step(params)
    assert {p.device.type for p in ema.shadow_params} == {"meta"}


def test_a_step_the_grad_scaler_skips_does_not_advance_the_schedule_or_the_ema(tmp_path, demo_parquet, monkeypatch):
    trainer = _trainer(tmp_path, demo_parquet, "scaler", "train.ema.enabled=true", "optim.warmup_steps=4")
    trainer.optimizer_step()
    lr_after_one, ema_steps = trainer.lr_schedule.get_last_lr()[0], trainer.ema.optimization_step
    monkeypatch.setattr(type(trainer.optimizer), "step_was_skipped", property(lambda self: True))
    trainer.optimizer_step()
    assert trainer.lr_schedule.get_last_lr()[0] == lr_after_one  # warmup is not shortened by skipped steps
    assert trainer.ema.optimization_step == ema_steps
    assert trainer.step == 2  # the data position still advances


# --------------------------------------------------------------------------------------------- non-finite


def _nan_at(trainer, steps: set[int], micro: int = 0):
    """Make the method's loss NaN at the given optimizer steps (micro-batch `micro`)."""
    loss_fn, calls = trainer.method.loss, {"micro": 0}

    def loss(models, batch, draws):
        value, metrics = loss_fn(models, batch, draws)
        here = calls["micro"] % trainer.cfg.train.grad_accum
        calls["micro"] += 1
        return (value * float("nan"), metrics) if trainer.step in steps and here == micro else (value, metrics)

    trainer.method.loss = loss


def test_a_non_finite_step_is_skipped_and_training_goes_on(tmp_path, demo_parquet):
    trainer = _trainer(tmp_path, demo_parquet, "skip", "train.grad_accum=2", "train.max_steps=3")
    _nan_at(trainer, {1})
    trainer.optimizer_step()
    before = _trainable(trainer)
    out = trainer.optimizer_step()  # NaN in its first micro-batch: no update, schedule and data still in step
    assert out["skipped"] == 1.0 and trainer.skipped_steps == 1
    assert all(torch.equal(before[k], v) for k, v in _trainable(trainer).items())
    assert trainer.lr_schedule.last_epoch == 1 and trainer.micro_batch == 4
    after = trainer.optimizer_step()
    assert "skipped" not in after and trainer.skips_in_a_row == 0
    assert any(not torch.equal(before[k], v) for k, v in _trainable(trainer).items())


def test_non_finite_stop_policy_names_step_and_items(tmp_path, demo_parquet):
    trainer = _trainer(tmp_path, demo_parquet, "stop", "train.nonfinite=stop")
    with torch.no_grad():
        next(p for p in trainer.unet.parameters() if p.requires_grad).fill_(float("nan"))
    with pytest.raises(TrainingError, match=r"non-finite loss .* at step 0, micro-batch 0, items \[.*train.nonfinite = stop"):
        trainer.optimizer_step()


def test_skips_in_a_row_stop_the_run(tmp_path, demo_parquet):
    trainer = _trainer(tmp_path, demo_parquet, "nan", "train.max_skips_in_a_row=2")
    with torch.no_grad():
        next(p for p in trainer.unet.parameters() if p.requires_grad).fill_(float("nan"))
    trainer.optimizer_step()
    with pytest.raises(TrainingError, match=r"non-finite loss .* at step 1, .*items \[.*2 steps in a row skipped"):
        trainer.optimizer_step()


# ------------------------------------------------------------------------------------------------- resume


def _train_to_checkpoint(tmp_path, demo_parquet, name, *overrides, **sections):
    trainer = _trainer(tmp_path, demo_parquet, name, "train.max_steps=2", *overrides, **sections)
    trainer.train()
    return trainer.output_dir


@pytest.mark.parametrize("change", ["data.time_ids=fixed", "model.prediction_type=v_prediction", "optim.optimizer=adafactor"])
def test_resume_refuses_a_change_of_what_is_trained(tmp_path, demo_parquet, change):
    _train_to_checkpoint(tmp_path, demo_parquet, "run")
    key = change.split("=")[0]
    with pytest.raises(TrainingError, match=rf"cannot resume .*{key} \(checkpoint"):
        _trainer(tmp_path, demo_parquet, "run", "train.resume=latest", "train.max_steps=4", change)


def test_resume_applies_and_prints_a_changed_lr(tmp_path, demo_parquet, capsys):
    _train_to_checkpoint(tmp_path, demo_parquet, "run", "optim.warmup_steps=4")
    capsys.readouterr()
    trainer = _trainer(tmp_path, demo_parquet, "run", "train.resume=latest", "train.max_steps=4", "optim.warmup_steps=4",
                       "optim.lr=0.004", "optim.weight_decay=0.5")
    printed = capsys.readouterr().out
    assert "optim.lr: 0.001 -> 0.004" in printed and "train.max_steps: 2 -> 4" in printed and "weight_decay" in printed
    group = trainer.optimizer.param_groups[0]
    # step 2 of a 4-step linear warmup, at the new lr
    assert group["lr"] == pytest.approx(0.004 * 2 / 4) and group["weight_decay"] == 0.5
    trainer.optimizer_step()
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.004 * 3 / 4)


def test_resume_from_a_path_that_does_not_exist_says_so(tmp_path, demo_parquet):
    missing = tmp_path / "run" / "checkpoints" / "step-00000099"
    with pytest.raises(TrainingError, match=rf"train.resume: no checkpoint directory {missing}"):
        _trainer(tmp_path, demo_parquet, "run", f"train.resume={missing}")


def test_lora_dropout_resumes_bit_exactly(tmp_path, demo_parquet):
    """Dropout masks are drawn per (step, place in the batch), not from the global generator's running state."""
    dropout = ["model.lora.dropout=0.3", "train.max_steps=4"]
    straight = _trainer(tmp_path, demo_parquet, "straight", *dropout)
    straight.train()
    half = _trainer(tmp_path, demo_parquet, "halves", *dropout, "train.max_steps=2")
    half.train()
    resumed = _trainer(tmp_path, demo_parquet, "halves", *dropout, "train.resume=latest")
    resumed.train()
    a, b = _trainable(straight), _trainable(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in _rows(straight)] == [r["loss"] for r in _rows(resumed)]
    # and the masks are real: the same run without dropout ends elsewhere
    plain = _trainer(tmp_path, demo_parquet, "plain", "train.max_steps=4")
    plain.train()
    assert any(not torch.equal(a[k], v) for k, v in _trainable(plain).items())


# ---------------------------------------------------------------------------------------------- init_from


def _unet_out(unet, seed=0):
    """One fixed forward of a tiny SDXL UNet (no gradients)."""
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    x = torch.randn(2, cfg.in_channels, 8, 8, generator=g)
    text = torch.randn(2, 4, cfg.cross_attention_dim, generator=g)
    added = {}
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        added = {"text_embeds": torch.randn(2, pooled, generator=g), "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)}
    with torch.no_grad():
        return unet(x, torch.tensor([10, 500]), encoder_hidden_states=text, added_cond_kwargs=added).sample


@pytest.mark.parametrize(
    "pretrained,finetune,start",
    [
        ("builtin:tiny-sdxl", "lora", "final"),
        ("builtin:tiny-sdxl", "lora", "final/pytorch_lora_weights.safetensors"),
        ("builtin:tiny-sd15", "full", "final"),
        ("builtin:tiny-sd15", "full", "final/unet"),
    ],
)
def test_init_from_starts_at_the_previous_output_and_uses_it_as_reference(tmp_path, demo_parquet, pretrained, finetune, start):
    from diffalign.models.loading import load_components
    from diffalign.models.sampling import load_trained_unet

    first = _trainer(tmp_path, demo_parquet, "first", "train.max_steps=3", "optim.lr=0.01", pretrained=pretrained, finetune=finetune)
    first.train()
    previous = _unet_out(load_trained_unet(load_components(first.cfg.model), first.output_dir / "final"))
    base = _unet_out(load_components(first.cfg.model).unet)
    assert not torch.allclose(previous, base, atol=1e-4)  # the first run moved the model

    second = _trainer(tmp_path, demo_parquet, "second", f"model.init_from={first.output_dir / start}", "train.max_steps=1",
                      pretrained=pretrained, finetune=finetune)
    policy = second.accelerator.unwrap_model(second.unet)
    was = policy.training
    policy.eval()
    torch.testing.assert_close(_unet_out(policy), previous, rtol=0, atol=1e-5)  # starts at its weights
    policy.train(was)
    second.train()
    first_step = _rows(second)[0]
    assert first_step["reward_margin"] == 0.0 and first_step["implicit_acc"] == 0.5  # policy == reference at step 0


def test_init_from_refuses_what_it_cannot_start_from(tmp_path, demo_parquet):
    from diffalign.models.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match=r"model.init_from: .*nowhere does not exist"):
        _trainer(tmp_path, demo_parquet, "a", f"model.init_from={tmp_path / 'nowhere'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"model.init_from: .*empty holds no weights"):
        _trainer(tmp_path, demo_parquet, "b", f"model.init_from={tmp_path / 'empty'}")
    other = _trainer(tmp_path, demo_parquet, "sd15", "train.max_steps=1", f"data.cache_dir={tmp_path / 'cache15'}",
                     pretrained="builtin:tiny-sd15", finetune="full")
    other.train()
    with pytest.raises(ModelLoadError, match=r"model.init_from: .*unet is not a UNet of model.pretrained's architecture"):
        _trainer(tmp_path, demo_parquet, "c", f"model.init_from={other.output_dir / 'final' / 'unet'}")
