"""Trainer options on the tiny SDXL model: accumulation, schedules, optimizers, precision, EMA, SFT."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config, write_config

from diffalign.config import ConfigError, load_config
from diffalign.io import load_safetensors
from diffalign.trainers.loop import PreferenceTrainer, TrainingError


def _trainer(tmp_path, demo_parquet, name, *overrides, method=None):
    cfg = tiny_config(tmp_path, parquet=demo_parquet)
    if method is not None:
        cfg["method"] = method
    cfg["train"].update(output_dir=str(tmp_path / name), checkpoint_every=0)
    trainer = PreferenceTrainer(load_config(write_config(tmp_path / f"{name}.yaml", cfg), list(overrides)))
    trainer.setup()
    return trainer


def _trainable(trainer):
    return {n: p.detach().clone() for n, p in trainer.unet.named_parameters() if p.requires_grad}


def _rows(trainer):
    return [json.loads(x) for x in (trainer.output_dir / "metrics.jsonl").read_text().splitlines()]


def test_accumulation_equals_the_larger_batch(tmp_path, demo_parquet):
    """batch 1 × accum 2 == batch 2 × accum 1 (same items, same draws, loss averaged the same way)."""
    common = ["train.max_steps=1", "optim.eps=1e-4", "optim.warmup_steps=0"]
    big = _trainer(tmp_path, demo_parquet, "big", "train.batch_size=2", "train.grad_accum=1", *common)
    big.train()
    acc = _trainer(tmp_path, demo_parquet, "acc", "train.batch_size=1", "train.grad_accum=2", *common)
    acc.train()
    a, b = _trainable(big), _trainable(acc)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    # Adam is nearly scale-invariant, so also compare the accumulated gradient itself (its norm) and the loss
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in _rows(big)] == pytest.approx([r[key] for r in _rows(acc)], rel=1e-5)


def test_warmup_schedule_is_logged_per_step(tmp_path, demo_parquet):
    t = _trainer(tmp_path, demo_parquet, "warm", "train.max_steps=4", "optim.schedule=constant_with_warmup", "optim.warmup_steps=2", "optim.lr=1e-3")
    t.train()
    assert [r["lr"] for r in _rows(t)] == pytest.approx([0.0, 5e-4, 1e-3, 1e-3])


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_decaying_schedules_reach_zero(tmp_path, demo_parquet, schedule):
    t = _trainer(tmp_path, demo_parquet, schedule, "train.max_steps=3", f"optim.schedule={schedule}", "optim.warmup_steps=1")
    t.train()
    lrs = [r["lr"] for r in _rows(t)]
    assert lrs[0] == 0.0 and lrs[1] > lrs[2] > 0 and t.lr_schedule.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)


def test_scale_lr_multiplies_by_the_global_batch(tmp_path, demo_parquet):
    t = _trainer(tmp_path, demo_parquet, "scaled", "optim.scale_lr=true", "optim.lr=1e-8", "train.batch_size=2", "train.grad_accum=3")
    assert t.lr == pytest.approx(6e-8)


def test_adafactor_trains(tmp_path, demo_parquet):
    t = _trainer(tmp_path, demo_parquet, "ada", "optim.optimizer=adafactor", "train.max_steps=2")
    before = _trainable(t)
    t.train()
    assert any(not torch.equal(v, before[k]) for k, v in _trainable(t).items())


@pytest.mark.parametrize(
    "package,override,error,extra",
    [
        ("bitsandbytes", "optim.optimizer=adamw8bit", ConfigError, "bnb"),
        ("xformers", "model.attention=xformers", TrainingError, "xformers"),
        ("wandb", "log.tracker=wandb", TrainingError, "wandb"),
    ],
)
def test_an_optional_feature_without_its_package_names_the_extra(tmp_path, demo_parquet, package, override, error, extra):
    import importlib.util

    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here, so its absence cannot be tested")
    with pytest.raises(error, match=rf"diffalign\[{extra}\]"):
        _trainer(tmp_path, demo_parquet, package, override)


def test_bf16_keeps_lora_parameters_fp32(tmp_path, demo_parquet, fresh_accelerate_state):
    t = _trainer(tmp_path, demo_parquet, "bf16", "train.mixed_precision=bf16", "train.max_steps=1")
    t.train()
    unet = t.accelerator.unwrap_model(t.unet)
    assert all(p.dtype == torch.float32 for p in unet.parameters() if p.requires_grad)
    assert all(p.dtype == torch.bfloat16 for p in unet.parameters() if not p.requires_grad)
    assert torch.isfinite(torch.tensor(_rows(t)[0]["loss"]))


def test_gradient_checkpointing_gives_the_same_step(tmp_path, demo_parquet):
    plain = _trainer(tmp_path, demo_parquet, "plain", "train.max_steps=1")
    plain.train()
    ckpt = _trainer(tmp_path, demo_parquet, "gc", "train.max_steps=1", "model.gradient_checkpointing=true")
    ckpt.train()
    a, b = _trainable(plain), _trainable(ckpt)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_ema_is_checkpointed_and_exported(tmp_path, demo_parquet):
    from diffalign.io import torch_load

    t = _trainer(tmp_path, demo_parquet, "ema", "train.ema.enabled=true", "train.ema.decay=0.5", "train.max_steps=2")
    t.train()
    shadow = torch_load(t.checkpoint_root / "step-00000002" / "ema.pt")["shadow_params"]
    raw = list(_trainable(t).values())
    exported = load_safetensors(t.output_dir / "final" / "pytorch_lora_weights.safetensors").values()
    # the export carries the EMA weights, not the raw ones (the live model keeps its raw weights)
    for tensor in exported:
        assert any(e.shape == tensor.shape and torch.equal(e.float(), tensor) for e in shadow)
    moved = [r for r, e in zip(raw, shadow) if not torch.equal(r, e)]
    assert len(moved) == len(raw)


def test_sft_trains_on_winners_without_a_reference(tmp_path, demo_parquet, monkeypatch):
    t = _trainer(tmp_path, demo_parquet, "sft", "train.max_steps=2", method={"name": "sft"})
    assert t.reference is None  # a full fine-tune would copy the UNet; LoRA keeps one UNet either way
    monkeypatch.setattr(t.models, "reference", lambda *_: pytest.fail("SFT must not run the reference"))
    t.train()
    assert set(_rows(t)[0]) >= {"loss", "model_mse"} and "ref_mse" not in _rows(t)[0]


def test_v_prediction_trains_against_the_velocity_target(tmp_path, demo_parquet, monkeypatch):
    from diffalign.trainers.methods import denoising

    seen = []

    def spy(pred, target):
        seen.append(target)
        return real(pred, target)

    real = denoising.per_sample_mse
    monkeypatch.setattr(denoising, "per_sample_mse", spy)
    t = _trainer(tmp_path, demo_parquet, "vpred", "model.prediction_type=v_prediction", "train.max_steps=1")
    assert t.schedule.prediction_type == "v_prediction"
    t.train()
    target = seen[0]
    # v = √ᾱ·ε - √(1-ᾱ)·x0 differs from ε wherever x0 ≠ 0: winner and loser share ε, so their v-targets differ
    assert not torch.allclose(target[: len(target) // 2], target[len(target) // 2 :])
    assert torch.isfinite(torch.tensor(_rows(t)[0]["loss"]))


@pytest.mark.parametrize("finetune", ["lora", "full"])
@pytest.mark.parametrize("option", ["model.channels_last=true", "optim.fused=true", "model.sdpa_backend=flash", "model.sdpa_backend=math",
                                    "model.compile=true"])
def test_a_speed_option_gives_the_same_steps(tmp_path, demo_parquet, option, finetune, monkeypatch):
    """Each speed option trains the same two steps as the defaults (float rounding aside) and checkpoints the same keys;
    compile in place: no ``_orig_mod`` in any name. Compile runs with dynamo's 'eager' backend here (the graph capture
    and our plumbing, in seconds; inductor's kernels take minutes to build on 2 cores and are timed, with their
    rounding, in benchmarks/speed_options.py)."""
    compile_in_place = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_in_place(self, backend="eager"))
    common = ["train.max_steps=2", "optim.eps=1e-4", "optim.warmup_steps=0", f"model.finetune={finetune}"]
    plain = _trainer(tmp_path, demo_parquet, "plain", *common)
    plain.train()
    fast = _trainer(tmp_path, demo_parquet, "fast", *common, option)
    if option == "model.compile=true":
        assert fast.unet._compiled_call_impl is not None and (fast.reference is None or fast.reference._compiled_call_impl is not None)
    if option == "model.channels_last=true":
        conv = fast.unet.conv_in.weight
        assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    fast.train()
    a, b = _trainable(plain), _trainable(fast)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-4)  # Adam at lr 1e-3, eps 1e-4: rounding moves a weight < 1e-4
    for key in ("loss", "grad_norm"):  # step 1 to rounding; step 2 starts from weights that differ by it (β 5000 amplifies)
        (one, two), (one_fast, two_fast) = [r[key] for r in _rows(plain)], [r[key] for r in _rows(fast)]
        assert one_fast == pytest.approx(one, rel=1e-5) and two_fast == pytest.approx(two, rel=1e-3)
    saved = load_safetensors(tmp_path / "fast" / "checkpoints" / "step-00000002" / "trainable.safetensors")
    assert saved.keys() == load_safetensors(tmp_path / "plain" / "checkpoints" / "step-00000002" / "trainable.safetensors").keys()


def test_a_cuda_only_attention_kernel_says_it_does_nothing_on_the_cpu(tmp_path, demo_parquet, capsys):
    _trainer(tmp_path, demo_parquet, "eff", "model.sdpa_backend=efficient")
    assert "model.sdpa_backend = efficient is a CUDA kernel: on cpu PyTorch chooses" in capsys.readouterr().out
