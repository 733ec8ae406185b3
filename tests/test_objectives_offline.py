"""Offline objectives (issue 11): the shared pairwise loss (flip, cDPO, rDPO), SmPO, RankDPO, dense reward.

Every objective is checked against a value written out by hand here (math on fixed numbers), plus its reductions.
"""

import math

import pytest
import torch
from torch.testing import assert_close

from diffalign.objectives import (
    PICKSCORE_HIGH,
    PICKSCORE_LOW,
    PICKSCORE_RAW_HIGH,
    PICKSCORE_RAW_LOW,
    dense_dpo_loss,
    dense_logit_weight,
    discounted_timestep_probs,
    dpo_logits,
    dpo_loss,
    effective_label,
    pairwise_loss,
    rank_positions,
    rankdpo_loss,
    rankdpo_pair_weights,
    smpo_loss,
    smpo_probability,
    step_index,
)

f64 = dict(dtype=torch.float64)


def t64(*xs):
    return torch.tensor(xs, **f64)


def lw(z):  # ℓ(w,l) = -log σ(z) = log(1 + e^-z)
    return math.log1p(math.exp(-z))


def ll(z):  # ℓ(l,w) = -log σ(-z) = log(1 + e^z)
    return math.log1p(math.exp(z))


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


Z = (0.1, -1.0, 2.5)
NOISES = ("none", "conservative", "unbiased")


def errs():
    """β = 2: (e_θw, e_θl, e_rw, e_rl) = (.10, .20, .15, .15) -> z = .1; (.5, .3, .2, .9) -> z = -(.2 - (-.7)) = -.9."""
    return t64(0.10, 0.5), t64(0.20, 0.3), t64(0.15, 0.2), t64(0.15, 0.9)


# ---------------------------------------------------------------- shared pairwise objective


def test_dpo_logits_by_hand_and_dpo_loss_uses_them():
    z = dpo_logits(*errs(), beta=2.0)
    assert_close(z, t64(0.1, -0.9))
    out = dpo_loss(*errs(), beta=2.0)
    assert_close(out.logits, z)
    assert_close(out.loss, torch.tensor((lw(0.1) + lw(-0.9)) / 2, **f64))
    assert torch.equal(pairwise_loss(z), -torch.nn.functional.logsigmoid(z))


def test_conservative_hard_label_by_hand_eps_0_1():
    """cDPO: (1-ε)ℓ(w,l) + εℓ(l,w). At z = .1: .9·0.644396660 + .1·0.744396660 = 0.654396660073571."""
    got = pairwise_loss(t64(*Z), label_noise="conservative", noise_rate=0.1)
    assert_close(got, t64(*[0.9 * lw(z) + 0.1 * ll(z) for z in Z]))
    assert_close(got[0], torch.tensor(0.654396660073571, **f64))


def test_unbiased_hard_label_by_hand_eps_0_1():
    """rDPO: [(1-ε)ℓ(w,l) - εℓ(l,w)]/(1-2ε). At z = .1: (.9·0.644396660 - .1·0.744396660)/.8 = 0.631896660073571."""
    got = pairwise_loss(t64(*Z), label_noise="unbiased", noise_rate=0.1)
    assert_close(got, t64(*[(0.9 * lw(z) - 0.1 * ll(z)) / 0.8 for z in Z]))
    assert_close(got[0], torch.tensor(0.631896660073571, **f64))


def test_noise_models_through_dpo_loss():
    out = dpo_loss(*errs(), beta=2.0, label_noise="unbiased", noise_rate=0.2)
    want = [(0.8 * lw(z) - 0.2 * ll(z)) / 0.6 for z in (0.1, -0.9)]
    assert_close(out.loss, torch.tensor(sum(want) / 2, **f64))
    assert_close(out.logits, t64(0.1, -0.9))  # the reported margin is never clamped


@pytest.mark.parametrize("noise", ["conservative", "unbiased"])
@pytest.mark.parametrize("label", [None, t64(1.0, 0.7, 0.5)])
def test_zero_noise_rate_is_dpo_exactly(noise, label):
    z = t64(*Z)
    assert torch.equal(pairwise_loss(z, label, label_noise=noise, noise_rate=0.0), pairwise_loss(z, label))
    m = dpo_loss(t64(0.1, 0.2, 0.3), t64(0.3, 0.1, 0.3), t64(0.2, 0.2, 0.1), t64(0.2, 0.2, 0.2), 50.0, label, label_noise=noise, noise_rate=0.0)
    assert torch.equal(m.loss, dpo_loss(t64(0.1, 0.2, 0.3), t64(0.3, 0.1, 0.3), t64(0.2, 0.2, 0.1), t64(0.2, 0.2, 0.2), 50.0, label).loss)


@pytest.mark.parametrize("noise,eps", [("none", 0.0), ("conservative", 0.1), ("unbiased", 0.1), ("unbiased", 0.3)])
def test_flip_equals_swapping_the_label(noise, eps):
    z, p = t64(*Z), t64(1.0, 0.7, 0.2)
    assert_close(pairwise_loss(z, p, flip=True, label_noise=noise, noise_rate=eps), pairwise_loss(z, 1 - p, label_noise=noise, noise_rate=eps))
    # hard label: flipping = label 0 = the images swapped (z -> -z)
    flipped = pairwise_loss(z, flip=True, label_noise=noise, noise_rate=eps)
    assert_close(flipped, pairwise_loss(z, torch.zeros(3, **f64), label_noise=noise, noise_rate=eps))
    assert_close(flipped, pairwise_loss(-z, label_noise=noise, noise_rate=eps))


def test_flip_through_dpo_loss_swaps_the_images():
    mw, ml, rw, rl = errs()
    assert_close(dpo_loss(mw, ml, rw, rl, 2.0, flip=True).loss, dpo_loss(ml, mw, rl, rw, 2.0).loss)
    assert_close(dpo_loss(mw, ml, rw, rl, 2.0, flip=True).loss, torch.tensor((ll(0.1) + ll(-0.9)) / 2, **f64))


def test_soft_label_definitions_by_hand():
    """p = .7, ε = .1: cDPO p' = .9·.7 + .1·.3 = .66; rDPO p'' = (.7 - .1)/.8 = .75. p = .95: p'' = .85/.8 = 1.0625 > 1."""
    p = t64(0.7, 0.95)
    assert_close(effective_label(p, label_noise="conservative", noise_rate=0.1), t64(0.66, 0.9 * 0.95 + 0.1 * 0.05))
    assert_close(effective_label(p, label_noise="unbiased", noise_rate=0.1), t64(0.75, 1.0625))
    z = t64(0.4, 0.4)
    got_c = pairwise_loss(z, p, label_noise="conservative", noise_rate=0.1)
    got_u = pairwise_loss(z, p, label_noise="unbiased", noise_rate=0.1)
    assert_close(got_c[0], torch.tensor(0.66 * lw(0.4) + 0.34 * ll(0.4), **f64))
    assert_close(got_u[0], torch.tensor(0.75 * lw(0.4) + 0.25 * ll(0.4), **f64))
    assert_close(got_u[1], torch.tensor(1.0625 * lw(0.4) - 0.0625 * ll(0.4), **f64))


@pytest.mark.parametrize("noise", ["conservative", "unbiased"])
def test_soft_label_is_the_mixture_of_the_hard_label_losses(noise):
    """The derivation: the soft-label loss is p·loss(hard w≻l) + (1-p)·loss(hard l≻w) under the same noise model."""
    z, p = t64(*Z), t64(0.7, 0.3, 0.9)
    hard_w = pairwise_loss(z, label_noise=noise, noise_rate=0.2)
    hard_l = pairwise_loss(z, flip=True, label_noise=noise, noise_rate=0.2)
    assert_close(pairwise_loss(z, p, label_noise=noise, noise_rate=0.2, logit_limit=None), p * hard_w + (1 - p) * hard_l)


@pytest.mark.parametrize("noise,eps", [("conservative", 0.1), ("unbiased", 0.1), ("unbiased", 0.4)])
def test_tie_is_unchanged_by_the_noise_model(noise, eps):
    """p = ½ is a fixed point of both maps: ½[ℓ(w,l) + ℓ(l,w)] whatever ε (no clamp: ½ stays inside [0, 1])."""
    z = t64(0.1, -3.0, 15.0)
    got = pairwise_loss(z, torch.full((3,), 0.5, **f64), label_noise=noise, noise_rate=eps)
    assert_close(got, t64(*[0.5 * (lw(x) + ll(x)) for x in (0.1, -3.0, 15.0)]))


def test_unbiased_clamp_zero_gradient_beyond_limit_only_on_the_unbounded_side():
    """Hard label, ε = .1: p'' = .9/.8 = 1.125, dL/dz = σ(z) - 1.125 (< 0 everywhere: unbounded below)."""
    z = t64(5.0, 12.0, -12.0).requires_grad_(True)
    loss = pairwise_loss(z, label_noise="unbiased", noise_rate=0.1, logit_limit=10.0)
    loss.sum().backward()
    assert_close(z.grad, t64(sigmoid(5.0) - 1.125, 0.0, sigmoid(-12.0) - 1.125))
    assert_close(loss[1], torch.tensor(1.125 * lw(10.0) - 0.125 * ll(10.0), **f64))  # the value at the limit
    # without the clamp the loss keeps falling (slope -ε/(1-2ε) = -.125): the runaway the clamp stops
    free = pairwise_loss(t64(10.0, 50.0), label_noise="unbiased", noise_rate=0.1, logit_limit=None)
    assert_close(free[1] - free[0], torch.tensor(-0.125 * 40, **f64), atol=1e-4, rtol=0)
    # a flipped hard label has p'' = -.125 < 0: clamped from below instead
    z2 = t64(-12.0, 12.0).requires_grad_(True)
    pairwise_loss(z2, flip=True, label_noise="unbiased", noise_rate=0.1).sum().backward()
    assert_close(z2.grad, t64(0.0, sigmoid(12.0) + 0.125))


def test_clamp_leaves_labels_inside_unit_interval_and_other_noise_models_alone():
    z = t64(20.0).requires_grad_(True)
    pairwise_loss(z, t64(0.7), label_noise="unbiased", noise_rate=0.1).sum().backward()  # p'' = .75
    assert_close(z.grad, t64(sigmoid(20.0) - 0.75))
    z = t64(20.0).requires_grad_(True)
    pairwise_loss(z, label_noise="conservative", noise_rate=0.1).sum().backward()  # p' = .9
    assert_close(z.grad, t64(sigmoid(20.0) - 0.9))


@pytest.mark.parametrize(
    "kw",
    [
        dict(label_noise="unbiased", noise_rate=0.5),
        dict(label_noise="conservative", noise_rate=0.6),
        dict(noise_rate=0.1),
        dict(label_noise="robust", noise_rate=0.1),
    ],
)
def test_bad_noise_settings_are_refused(kw):
    with pytest.raises(ValueError):
        pairwise_loss(t64(0.1), **kw)


# ---------------------------------------------------------------- SmPO


def _official_p(s0, s1, lo=0.11543526500463486, hi=0.28201571106910706):
    n0, n1 = (s0 - lo) / (hi - lo), (s1 - lo) / (hi - lo)
    return math.exp(n0) / (math.exp(n0) + math.exp(n1))


def test_smpo_probability_official_formula_on_raw_cosines():
    """Raw cosines .25 / .20: r'_w = .134564735/.166580446 = 0.807806307, r'_l = 0.507651030; p = 0.574480475."""
    p = smpo_probability(t64(0.25), t64(0.20), PICKSCORE_RAW_LOW, PICKSCORE_RAW_HIGH)
    assert_close(p, t64(_official_p(0.25, 0.20)))
    assert_close(p, t64(0.5744804752269456))
    # diffalign's PickScore (×100) with the ×100 bounds gives the same p
    assert_close(smpo_probability(t64(25.0), t64(20.0), PICKSCORE_LOW, PICKSCORE_HIGH), p)
    assert_close(smpo_probability(t64(0.2, 0.28), t64(0.2, 0.12), PICKSCORE_RAW_LOW, PICKSCORE_RAW_HIGH), t64(0.5, _official_p(0.28, 0.12)))


def test_smpo_loss_unequal_scores_by_hand():
    """β = 2, z = (.1, -.9); p = (0.574480475, .7), γ = 10: m = 10(2p-1) = (1.489609505, 4); loss = mean log(1 + e^{-m z})."""
    p = t64(_official_p(0.25, 0.20), 0.7)
    out = smpo_loss(*errs(), beta=2.0, p=p, gamma=10.0)
    m0 = 10 * (2 * _official_p(0.25, 0.20) - 1)
    assert_close(out.logits, t64(m0 * 0.1, 4.0 * -0.9))
    assert_close(out.loss, torch.tensor((lw(m0 * 0.1) + lw(-3.6)) / 2, **f64))
    assert_close(torch.tensor(lw(m0 * 0.1), **f64), torch.tensor(0.6214378152989666, **f64))


def test_smpo_equal_scores_log2_and_zero_gradient():
    mw, ml, rw, rl = (x.clone().requires_grad_(True) for x in errs())
    p = smpo_probability(t64(21.3, 19.0), t64(21.3, 19.0), PICKSCORE_LOW, PICKSCORE_HIGH)
    assert_close(p, t64(0.5, 0.5))
    out = smpo_loss(mw, ml, rw, rl, beta=5000.0, p=p)
    assert_close(out.loss, torch.tensor(math.log(2), **f64))
    out.loss.backward()
    for x in (mw, ml):
        assert torch.equal(x.grad, torch.zeros(2, **f64))


def test_smpo_unit_multiplier_is_dpo():
    """γ(2p - 1) = 1 at γ = 10 <=> p = .55 (and at γ = 4 <=> p = .625)."""
    assert_close(smpo_loss(*errs(), beta=2.0, p=0.55, gamma=10.0).loss, dpo_loss(*errs(), beta=2.0).loss)
    assert_close(smpo_loss(*errs(), beta=2.0, p=t64(0.625, 0.625), gamma=4.0).loss, dpo_loss(*errs(), beta=2.0).loss)


def test_smpo_misordered_pair_trains_towards_the_higher_reward():
    """Swapping the images together with their scores leaves the loss unchanged."""
    mw, ml, rw, rl = errs()
    sw, sl = t64(23.0, 20.5), t64(21.0, 22.0)
    a = smpo_loss(mw, ml, rw, rl, 2.0, smpo_probability(sw, sl, PICKSCORE_LOW, PICKSCORE_HIGH))
    b = smpo_loss(ml, mw, rl, rw, 2.0, smpo_probability(sl, sw, PICKSCORE_LOW, PICKSCORE_HIGH))
    assert_close(a.loss, b.loss)
    with pytest.raises(ValueError):
        smpo_probability(sw, sl, 0.3, 0.1)


# ---------------------------------------------------------------- RankDPO

INV_D = {1: 1.0, 2: 1 / math.log2(3), 3: 0.5, 4: 1 / math.log2(5)}  # 1 / log2(1 + r)


def test_rankdpo_k4_by_hand():
    """φ = (2/3, 1/3, 1, 0) (Syn-Pic win-rates, n = 1), ranks by φ = (2, 3, 1, 4), s = (.010, -.004, .002, .005),
    β = 100. Pairs i ≻ j: (2,0) (2,1) (2,3) (0,1) (0,3) (1,3); term = |2^φi - 2^φj|·|1/D(τi) - 1/D(τj)|·log(1 + e^{β(si-sj)}):
    .152278·.371101 + .370039·1.037488 + .569323·.554355 + .042877·1.620417 + .117629·.974077 + .018019·.341154 = 0.946234598."""
    phi = t64(2 / 3, 1 / 3, 1.0, 0.0)[None]
    s = t64(0.010, -0.004, 0.002, 0.005)[None]
    ranks = rank_positions(phi)
    assert ranks.tolist() == [[2, 3, 1, 4]]
    G, r, sv = [2 ** (2 / 3), 2 ** (1 / 3), 2.0, 1.0], [2, 3, 1, 4], s[0].tolist()
    terms = [
        abs(G[i] - G[j]) * abs(INV_D[r[i]] - INV_D[r[j]]) * math.log1p(math.exp(100 * (sv[i] - sv[j])))
        for i, j in [(2, 0), (2, 1), (2, 3), (0, 1), (0, 3), (1, 3)]
    ]
    out = rankdpo_loss(s, phi, ranks, beta=100.0)
    assert_close(out.loss, torch.tensor(sum(terms), **f64))
    assert_close(out.loss, torch.tensor(0.9462345977502, **f64))
    assert_close(rankdpo_loss(s, phi, ranks, beta=100.0, reduction="mean").loss, torch.tensor(sum(terms) / 6, **f64))
    # the log base only rescales: 1/log_10(1+r) = ln 10 / ln(1+r)
    assert_close(rankdpo_loss(s, phi, ranks, beta=100.0, log_base=10.0).loss, torch.tensor(sum(terms) * math.log(10) / math.log(2), **f64))


def test_rankdpo_ranks_1_4_weigh_more_than_2_3():
    """Same two images, same φ: placed at ranks (1,4) vs (2,3). |G| = 2^.9 - 2^.1; (1 - 1/log2 5) > (1/log2 3 - 1/2)."""
    phi = t64(0.9, 0.1, 0.6, 0.4)[None]
    a = rankdpo_pair_weights(phi, torch.tensor([[1, 4, 2, 3]]))[0, 0, 1]
    b = rankdpo_pair_weights(phi, torch.tensor([[2, 3, 1, 4]]))[0, 0, 1]
    g = 2**0.9 - 2**0.1
    assert_close(a, torch.tensor(g * (1 - INV_D[4]), **f64))
    assert_close(b, torch.tensor(g * (INV_D[2] - INV_D[3]), **f64))
    assert a > 4 * b


def test_rankdpo_weights_symmetric_nonnegative_and_zero_on_ties():
    g = torch.Generator().manual_seed(0)
    phi = torch.rand(3, 5, generator=g, **f64)
    phi[0, 1] = phi[0, 3]  # a tie
    ranks = rank_positions(-torch.rand(3, 5, generator=g, **f64))  # e.g. the model's own ranking
    w = rankdpo_pair_weights(phi, ranks)
    assert_close(w, w.transpose(1, 2))
    assert (w >= 0).all() and torch.equal(torch.diagonal(w, dim1=1, dim2=2), torch.zeros(3, 5, **f64))
    assert w[0, 1, 3] == 0
    # a tied pair adds nothing, whatever its scores
    only_tie = t64(0.5, 0.5)[None]
    for s in (t64(0.3, -0.2), t64(-0.3, 0.2)):
        assert rankdpo_loss(s[None], only_tie, torch.tensor([[1, 2]]), beta=10.0).loss == 0


def test_rankdpo_k2_is_delta_times_dpo_with_half_beta():
    """K = 2, β_rank = β/2: Σ = Δ_12 · -log σ(-β/2 (s_w - s_l)) = Δ_12 · DPO per-pair loss (winner by φ, either slot)."""
    mw, ml, rw, rl = t64(0.10, 0.5, 0.31), t64(0.20, 0.3, 0.30), t64(0.15, 0.2, 0.33), t64(0.15, 0.9, 0.29)
    beta = 40.0
    scores = torch.stack([mw - rw, ml - rl], dim=1)
    phi = t64(0.8, 0.2, 0.75, 0.25, 0.6, 0.4).view(3, 2)
    delta = t64(*[abs(2**a - 2**b) * (1 - INV_D[2]) for a, b in [(0.8, 0.2), (0.75, 0.25), (0.6, 0.4)]])
    dpo_per_pair = pairwise_loss(dpo_logits(mw, ml, rw, rl, beta))
    out = rankdpo_loss(scores, phi, rank_positions(phi), beta=beta / 2)
    assert_close(out.list_losses, delta * dpo_per_pair)
    assert_close(out.loss, (delta * dpo_per_pair).mean())
    # winner stored in the second slot: the pair is oriented by φ
    swapped = rankdpo_loss(scores.flip(1), phi.flip(1), rank_positions(phi.flip(1)), beta=beta / 2)
    assert_close(swapped.list_losses, delta * dpo_per_pair)


def test_rank_positions_stable_ties():
    assert rank_positions(t64(0.2, 0.9, 0.2, 0.5)).tolist() == [3, 1, 4, 2]


# ---------------------------------------------------------------- dense reward


def test_dense_step_index_and_weight_by_hand():
    """k(t) = 49 - floor(t/20): 999, 981, 980 -> 0; 979, 960 -> 1; 959 -> 2; 500 -> 24; 19, 0 -> 49. γ = .9 -> .9^k."""
    t = torch.tensor([999, 981, 980, 979, 960, 959, 500, 19, 0])
    k = step_index(t)
    assert k.tolist() == [0, 0, 0, 1, 1, 2, 24, 49, 49]
    assert_close(dense_logit_weight(k, 0.9), t64(1.0, 1.0, 1.0, 0.9, 0.9, 0.81, 0.9**24, 0.9**49, 0.9**49))
    grid = 981 - 20 * torch.arange(50)  # diffusers' leading spacing, steps_offset 1
    assert torch.equal(step_index(grid), torch.arange(50))
    with pytest.raises(ValueError):
        step_index(torch.tensor([1000]))


def test_dense_dpo_loss_by_hand():
    """β = 2, z = (.1, -.9) at t = (979, 500), k = (1, 24): logits = (.9·.1, .9^24·-.9); loss = mean log(1 + e^{-logit})."""
    out = dense_dpo_loss(*errs(), beta=2.0, timesteps=torch.tensor([979, 500]), gamma=0.9)
    assert_close(out.logits, t64(0.09, -0.9 * 0.9**24))
    assert_close(out.loss, torch.tensor((lw(0.09) + lw(-0.9 * 0.9**24)) / 2, **f64))


def test_dense_gamma_one_is_dpo_exactly():
    out = dense_dpo_loss(*errs(), beta=2.0, timesteps=torch.tensor([959, 3]), gamma=1.0)
    ref = dpo_loss(*errs(), beta=2.0)
    assert torch.equal(out.loss, ref.loss) and torch.equal(out.logits, ref.logits)


def test_discounted_timestep_probs_mass_per_step():
    """Step mass γ^k·(1-γ)/(1-γ^50), uniform over its 20 timesteps; P(t=0) = .9^49·.1/(1-.9^50)/20."""
    p = discounted_timestep_probs(0.9)
    assert p.shape == (1000,) and p.dtype == torch.float64
    assert_close(p.sum(), torch.tensor(1.0, **f64))
    norm = 0.1 / (1 - 0.9**50)
    assert_close(p[999], torch.tensor(norm / 20, **f64))
    assert_close(p[0], torch.tensor(0.9**49 * norm / 20, **f64))
    mass = p.view(50, 20).flip(0).sum(1)  # bins in step order k = 0..49
    assert_close(mass, t64(*[0.9**k * norm for k in range(50)]))
    assert torch.equal(discounted_timestep_probs(1.0), torch.full((1000,), 1e-3, **f64))


def test_discounted_timestep_probs_uneven_bins_by_hand():
    """T = 10, N = 4, γ = .5: bins floor(4t/10) -> k = 3 - bin: k0 = {8,9}, k1 = {5,6,7}, k2 = {3,4}, k3 = {0,1,2};
    Σγ^k = 1.875; P = (1, .5, .25, .125)/1.875 spread over 2, 3, 2, 3 timesteps."""
    p = discounted_timestep_probs(0.5, num_steps=4, num_train_timesteps=10)
    c = 1 / 1.875
    assert_close(p, t64(*[0.125 * c / 3] * 3, *[0.25 * c / 2] * 2, *[0.5 * c / 3] * 3, *[c / 2] * 2))
    with pytest.raises(ValueError):
        discounted_timestep_probs(0.0)
