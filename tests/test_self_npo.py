"""Self-NPO: the objective's pieces against formulas written out here, the re-noising law measured on many draws, the
teacher chain against a row-by-row loop with a stand-in teacher, the EMA teacher, and exact resume with the teacher."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_config, write_config

from diffalign.config import SelfNPOMethod, load_config
from diffalign.diffusion import add_noise
from diffalign.objectives.self_npo import ddim_grid, guided, pseudo_huber, renoise
from diffalign.trainers.batch import Cond
from diffalign.trainers.methods.self_npo import SelfNPO
from diffalign.trainers.models import Schedule

pytestmark = pytest.mark.usefixtures("one_thread")
A_BAR = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2, 0).float()  # SD's schedule


def test_the_official_grid_and_guidance_form():
    assert ddim_grid(25).tolist() == [40 * k - 1 for k in range(1, 26)]
    c, u = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0])
    assert torch.equal(guided(c, u, -1.0), u)  # w = -1: the unconditional prediction (official SD1.5)
    assert torch.allclose(guided(c, u, -5.0), 5 * u - 4 * c)  # w = -5: 5·uncond - 4·cond (official SDXL)


def test_pseudo_huber_against_its_formula():
    pred, target = torch.tensor([[0.5, -0.2], [0.0, 3.0]]), torch.tensor([[0.1, -0.2], [1.0, 2.0]])
    c = 1e-3
    by_hand = sum(math.sqrt(d * d + c * c) - c for d in (0.4, 0.0, -1.0, 1.0)) / 4
    assert pseudo_huber(pred, target, c).item() == pytest.approx(by_hand, rel=1e-6)


@pytest.mark.parametrize("t, s", [(0, 1), (159, 700), (599, 999)])
def test_renoising_keeps_the_marginal_given_x_t(t, s):
    """Given x_t, x_s has mean (α_s/α_t)·x_t and variance α_s²(ρ_s² - ρ_t²), measured on 200,000 draws; noising from
    x0 (or the teacher's x̂0) instead must fail the same check."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, generator=g)
    x_t = add_noise(x0[None], torch.randn(1, 4, generator=g), torch.tensor([t]), A_BAR)[0]
    n = 200_000
    draws = renoise(x_t.expand(n, 4), torch.full((n,), t), torch.full((n,), s), A_BAR, torch.randn(n, 4, generator=g))
    a = A_BAR.double()
    alpha, rho = a.sqrt(), ((1 - a) / a).sqrt()
    mean, var = (alpha[s] / alpha[t]) * x_t.double(), alpha[s] ** 2 * (rho[s] ** 2 - rho[t] ** 2)

    def passes(samples):
        tol = 5 * math.sqrt(var / n) + 1e-6
        return bool(((samples.double().mean(0) - mean).abs() < tol).all() and ((samples.double().var(0) / var - 1).abs() < 0.02).all())

    assert passes(draws)
    from_x0 = add_noise(x0.expand(n, 4), torch.randn(n, 4, generator=g), torch.full((n,), s), A_BAR)  # x_s ~ q(x_s | x0)
    assert not passes(from_x0)


class _Models:
    """A stand-in for `Models`: the teacher predicts ε = 0.3·x + 0.1·t/1000 + 0.5 (conditional) or - 0.5 (unconditional)."""

    def __init__(self):
        self.schedule, self.device = Schedule(A_BAR, "epsilon"), torch.device("cpu")

    @staticmethod
    def _eps(x, t, cond):
        shift = cond.prompt_embeds[:, 0, 0].view(-1, 1, 1, 1)
        return 0.3 * x + 0.1 * t.view(-1, 1, 1, 1) / 1000 + shift

    def teacher(self, x, t, cond):
        return self._eps(x, t, cond)

    def policy(self, x, t, cond):
        return 0.9 * self._eps(x, t, cond)


def _conds(n):
    return Cond(torch.full((n, 1, 1), 0.5)), Cond(torch.full((n, 1, 1), -0.5))


@pytest.mark.parametrize("w", [-1.0, -5.0])
def test_the_teacher_chain_equals_a_row_by_row_loop(w):
    cfg = SelfNPOMethod(guidance=w, teacher_steps=5, grid_points=25)
    method, models = SelfNPO(cfg), _Models()
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(4, 2, 3, 3, generator=g), torch.randn(4, 2, 3, 3, generator=g)
    start = torch.tensor([24, 7, 2, 0])  # two rows reach level 0 before K steps
    cond, uncond = _conds(4)
    x_t, t, target = method.teacher_chain(models, x0, start, noise, cond, uncond)

    a, grid = A_BAR.double(), [40 * k - 1 for k in range(1, 26)]

    def predict(x, level):  # the guided (x̂0, ε̂) of the stand-in teacher, in float64
        e_c, e_u = [0.3 * x + 0.1 * level / 1000 + shift for shift in (0.5, -0.5)]
        x0c, x0u = [(x - (1 - a[level]).sqrt() * e) / a[level].sqrt() for e in (e_c, e_u)]
        return x0c + w * (x0c - x0u), e_c + w * (e_c - e_u)

    for row in range(4):
        i = int(start[row])
        level = grid[i]
        x = a[level].sqrt() * x0[row].double() + (1 - a[level]).sqrt() * noise[row].double()
        for _ in range(5):  # K steps down the grid, none below level 0
            if i < 0:
                break
            x0_hat, eps = predict(x, level)
            below = grid[i - 1] if i > 0 else 0
            x = a[below].sqrt() * x0_hat + (1 - a[below]).sqrt() * eps
            level, i = below, i - 1
        x0_hat, _ = predict(x, level)  # the target: the teacher's x̂0 at the end state
        assert int(t[row]) == level
        torch.testing.assert_close(x_t[row].double(), x, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(target[row].double(), x0_hat, rtol=1e-4, atol=1e-4)
    assert t.tolist() == [grid[19], grid[2], 0, 0]


def test_the_loss_is_the_pseudo_huber_distance_to_the_target_at_a_renoised_level():
    from diffalign.randomness import Draws

    cfg = SelfNPOMethod(guidance=-1.0)
    method, models = SelfNPO(cfg), _Models()

    class Batch:  # two items of K = 2 images
        k, noise = 2, torch.zeros(2, 2, 3, 3)

        def all_images(self):
            return torch.arange(2).expand(2, 2)

        def x0(self, images):
            return torch.arange(4 * 18, dtype=torch.float32).view(4, 2, 3, 3) / 50

        def cond(self, images):
            return _conds(4)[0]

        def unconditional(self, images, zeros=False):
            return _conds(4)[1]

    draws = Draws(0, 3, range(2), [5, 6])
    loss, metrics = method.loss(models, Batch(), draws)
    start, noise, xi, u = method.draws(Batch(), draws, 1000)
    x_t, t, target = method.teacher_chain(models, Batch().x0(None), start, noise, *_conds(4))
    s = t + 1 + (u * (999 - t)).long()
    assert (s > t).all() and (s <= 999).all()
    x_s = renoise(x_t, t, s, A_BAR, xi)
    a_s = A_BAR[s].view(-1, 1, 1, 1)
    x0_pred = (x_s - (1 - a_s).sqrt() * models.policy(x_s, s, _conds(4)[0])) / a_s.sqrt()
    torch.testing.assert_close(loss, (torch.sqrt((x0_pred - target) ** 2 + 1e-6) - 1e-3).mean(), rtol=1e-5, atol=1e-6)
    assert metrics["loss"] == loss


def _self_npo_config(tmp, parquet, **train):
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config(tmp, parquet=parquet, finetune="full")
    cfg["method"] = {"name": "self_npo", "grid_points": 10, "teacher_steps": 2, "teacher_decay": 0.9}
    cfg["train"].update(train)
    cfg.setdefault("optim", {})["warmup_steps"] = 0  # the first step already moves the policy
    return load_config(write_config(tmp / "cfg.yaml", cfg))


def test_the_teacher_follows_the_policy_by_ema(tmp_path, demo_parquet):
    from diffalign.trainers.loop import PreferenceTrainer

    trainer = PreferenceTrainer(_self_npo_config(tmp_path, demo_parquet, max_steps=1))
    trainer.setup()
    unet = trainer.accelerator.unwrap_model(trainer.unet)
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    assert all(torch.equal(before[n], p) for n, p in trainer.teacher.unet.named_parameters())  # starts at the policy
    trainer.optimizer_step()
    after = dict(unet.named_parameters())
    moved = [n for n in before if not torch.equal(before[n], after[n])]
    assert moved
    teacher = dict(trainer.teacher.unet.named_parameters())
    for n in moved[:20]:
        torch.testing.assert_close(teacher[n], 0.9 * before[n] + 0.1 * after[n].detach())


def test_a_resumed_self_npo_run_equals_an_uninterrupted_one_teacher_included(tmp_path, demo_parquet):
    from diffalign.io import load_safetensors
    from diffalign.trainers.loop import train

    full = _self_npo_config(tmp_path / "a", demo_parquet, max_steps=4, checkpoint_every=2, output_dir=str(tmp_path / "a" / "run"))
    train(full)
    first = _self_npo_config(tmp_path / "b", demo_parquet, max_steps=2, checkpoint_every=2, output_dir=str(tmp_path / "b" / "run"))
    train(first)
    resumed = _self_npo_config(tmp_path / "b", demo_parquet, max_steps=4, checkpoint_every=2, output_dir=str(tmp_path / "b" / "run"),
                               resume="latest")
    train(resumed)
    for name in ("trainable.safetensors", "teacher.safetensors"):
        a = load_safetensors(tmp_path / "a" / "run" / "checkpoints" / "step-00000004" / name)
        b = load_safetensors(tmp_path / "b" / "run" / "checkpoints" / "step-00000004" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    rows = [json.loads(line) for line in (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
