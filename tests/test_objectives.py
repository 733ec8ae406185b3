"""Objectives against values worked out by hand, plus their invariants."""

import copy
import math

import pytest
import torch
from torch.testing import assert_close

from diffalign.objectives import dpo_loss, sft_loss

f64 = dict(dtype=torch.float64)


def test_dpo_loss_hand_value_small_beta():
    """β = 2, e_θ(w) = .10, e_θ(l) = .20, e_ref(w) = e_ref(l) = .15:
    Δ = (.10 - .15) - (.20 - .15) = -.10;  z = -β/2 · Δ = -1 · -.10 = .10;
    loss = -log σ(.10) = log(1 + e^-.1) = log(1.904837418) = 0.644396660073571."""
    out = dpo_loss(torch.tensor([0.10], **f64), torch.tensor([0.20], **f64), torch.tensor([0.15], **f64), torch.tensor([0.15], **f64), beta=2.0)
    assert_close(out.logits, torch.tensor([0.10], **f64))
    assert_close(out.loss, torch.tensor(0.644396660073571, **f64))


def test_dpo_loss_hand_value_official_beta_batch_mean():
    """β = 5000 (official). Sample 1: Δ = (.5 - .5002) - (.5 - .5) = -.0002 -> z = 2500 · .0002 = .5,
    loss = log(1 + e^-.5) = 0.474076984180107. Sample 2: Δ = (.3004 - .3) - 0 = .0004 -> z = -1,
    loss = log(1 + e) = 1.313261687518223. Batch mean = 0.893669335849165."""
    out = dpo_loss(
        torch.tensor([0.5, 0.3004], **f64),
        torch.tensor([0.5, 0.3], **f64),
        torch.tensor([0.5002, 0.3], **f64),
        torch.tensor([0.5, 0.3], **f64),
        beta=5000.0,
    )
    assert_close(out.logits, torch.tensor([0.5, -1.0], **f64))
    assert_close(out.loss, torch.tensor(0.893669335849165, **f64))


def test_dpo_tie_label_is_symmetric_loss():
    """Tie (label ½) at z = .1: ½[log(1 + e^-.1) + log(1 + e^.1)] = ½[0.644396660 + 0.744396660] = 0.694396660."""
    args = [torch.tensor([x], **f64) for x in (0.10, 0.20, 0.15, 0.15)]
    out = dpo_loss(*args, beta=2.0, label=torch.tensor([0.5], **f64))
    assert_close(out.loss, torch.tensor(0.694396660073571, **f64))
    hard = dpo_loss(*args, beta=2.0, label=torch.tensor([1.0], **f64))
    assert_close(hard.loss, dpo_loss(*args, beta=2.0).loss)


def test_zero_margin_gives_log2():
    e = torch.rand(5, **f64)
    r = torch.rand(5, **f64)
    out = dpo_loss(e, e, r, r, beta=5000.0)
    assert_close(out.loss, torch.tensor(math.log(2), **f64))


def test_swapping_winner_and_loser_negates_logits():
    g = torch.Generator().manual_seed(0)
    mw, ml, rw, rl = (torch.rand(6, generator=g, **f64) for _ in range(4))
    a = dpo_loss(mw, ml, rw, rl, beta=300.0)
    b = dpo_loss(ml, mw, rl, rw, beta=300.0)
    assert_close(b.logits, -a.logits)
    assert not torch.allclose(a.loss, b.loss)


def test_sft_loss_is_mean_of_winner_errors():
    assert_close(sft_loss(torch.tensor([0.1, 0.3, 0.8], **f64)), torch.tensor(0.4, **f64))


def test_one_dpo_step_lowers_winner_error_relative_to_loser():
    """A gradient step on a tiny UNet moves e_θ(w) - e_θ(l) down (reference frozen at the start)."""
    from diffalign.diffusion import add_noise, per_sample_mse
    from diffalign.models.tiny import tiny_unet

    torch.manual_seed(0)
    unet = tiny_unet(sdxl=False)
    ref = copy.deepcopy(unet).requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    x_w, x_l = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    eps = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([300, 700])
    text = torch.randn(2, 77, 32, generator=g)
    alphas = torch.linspace(0.9999, 0.01, 1000)
    noisy = add_noise(torch.cat([x_w, x_l]), eps.repeat(2, 1, 1, 1), t.repeat(2), alphas)

    def errors(model):
        pred = model(noisy, t.repeat(2), encoder_hidden_states=text.repeat(2, 1, 1)).sample
        return per_sample_mse(pred, eps.repeat(2, 1, 1, 1)).chunk(2)

    with torch.no_grad():
        rw, rl = errors(ref)
        before = (rw - rl).mean().item()
    opt = torch.optim.SGD(unet.parameters(), lr=1e-3)
    mw, ml = errors(unet)
    dpo_loss(mw, ml, rw, rl, beta=1000.0).loss.backward()
    opt.step()
    with torch.no_grad():
        aw, al = errors(unet)
    assert (aw - al).mean().item() < before


@pytest.mark.parametrize("pred_type", ["epsilon", "v_prediction"])
def test_training_target_by_hand(pred_type):
    """ᾱ = .64 at t = 0: x_t = .8·x0 + .6·ε; v = .8·ε - .6·x0."""
    from diffalign.diffusion import add_noise, training_target

    alphas = torch.tensor([0.64])
    x0, eps, t = torch.full((1, 1, 1, 1), 2.0), torch.full((1, 1, 1, 1), -1.0), torch.tensor([0])
    assert_close(add_noise(x0, eps, t, alphas), torch.full((1, 1, 1, 1), 0.8 * 2 - 0.6))
    want = -1.0 if pred_type == "epsilon" else 0.8 * -1.0 - 0.6 * 2.0
    assert_close(training_target(x0, eps, t, alphas, pred_type), torch.full((1, 1, 1, 1), want))


def test_objectives_import_only_torch():
    """objectives/ are pure tensor functions: no model, data, trainer or I/O imports."""
    import ast
    from pathlib import Path

    import diffalign.objectives as pkg

    allowed = {"torch", "__future__", "typing", "math", "dataclasses", "diffalign"}
    for path in Path(pkg.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"
                if name.startswith("diffalign"):
                    assert name.startswith("diffalign.objectives"), f"{path.name} imports {name}"
