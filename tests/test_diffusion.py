"""Schedule math in diffalign.diffusion: x0/ε/v conversions and DDIM steps, against hand formulas and diffusers.

Hand formulas (x_t = √ᾱ·x0 + √(1−ᾱ)·ε, v = √ᾱ·ε − √(1−ᾱ)·x0) are written out in float64; the diffusers
comparisons use its own float32 ᾱ table and a 10-step SD-style grid (t = 900, 800, ..., 0; t_prev = t − 100).
"""

import math

import pytest
import torch
from diffusers import DDIMScheduler
from torch.testing import assert_close

from diffalign.diffusion import (
    add_noise,
    ddim_sigma,
    ddim_step,
    ddim_step_with_logprob,
    eps_from_v,
    pred_eps_from_x0,
    pred_x0_from_eps,
    to_x0_eps,
    training_target,
    x0_from_v,
)

PRED_TYPES = ["epsilon", "v_prediction"]
SHAPE = (2, 3, 4, 4)


def _scheduler(prediction_type="epsilon", set_alpha_to_one=True, clip_sample=False) -> DDIMScheduler:
    """SD1.5/SDXL's training schedule (scaled_linear, 0.00085..0.012) with a 10-step leading grid."""
    s = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction_type,
        set_alpha_to_one=set_alpha_to_one,
        clip_sample=clip_sample,
    )
    s.set_timesteps(10)
    return s


ALPHAS = _scheduler().alphas_cumprod  # float32, (1000,)
ALPHAS64 = ALPHAS.double()


def _tensors(seed: int, n: int, dtype=torch.float64, shape=SHAPE):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=dtype) for _ in range(n)]


def _col(a: torch.Tensor) -> torch.Tensor:
    return a.view(-1, 1, 1, 1)


def _forward(x0, eps, t, prediction_type=None):
    """x_t = √ᾱ·x0 + √(1−ᾱ)·ε in float64 (add_noise computes in float32); with a prediction_type, also the
    exact network target: ε, or v = √ᾱ·ε − √(1−ᾱ)·x0."""
    a = _col(ALPHAS64[t])
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    if prediction_type is None:
        return x_t
    return x_t, eps if prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0


# ---------------------------------------------------------------------------------------------------- conversions


def test_conversions_equal_hand_formulas():
    """Per-sample t = (10, 700): each conversion is its closed form with that sample's ᾱ."""
    out, x_t = _tensors(0, 2)
    t = torch.tensor([10, 700])
    a = _col(ALPHAS64[t])
    assert_close(pred_x0_from_eps(out, x_t, t, ALPHAS64), (x_t - (1 - a).sqrt() * out) / a.sqrt())
    assert_close(pred_eps_from_x0(out, x_t, t, ALPHAS64), (x_t - a.sqrt() * out) / (1 - a).sqrt())
    assert_close(x0_from_v(out, x_t, t, ALPHAS64), a.sqrt() * x_t - (1 - a).sqrt() * out)
    assert_close(eps_from_v(out, x_t, t, ALPHAS64), a.sqrt() * out + (1 - a).sqrt() * x_t)
    assert_close(to_x0_eps(out, x_t, t, ALPHAS64, "epsilon"), (pred_x0_from_eps(out, x_t, t, ALPHAS64), out))
    assert_close(
        to_x0_eps(out, x_t, t, ALPHAS64, "v_prediction"), (x0_from_v(out, x_t, t, ALPHAS64), eps_from_v(out, x_t, t, ALPHAS64))
    )


@pytest.mark.parametrize("prediction_type", PRED_TYPES)
def test_conversions_round_trip_through_the_forward_process(prediction_type):
    """Noise x0 with ε to x_t; the exact target (ε or v) maps back to (x0, ε). The float64 forward process
    agrees with the library's add_noise / training_target to their float32 precision."""
    x0, eps = _tensors(1, 2)
    t = torch.tensor([0, 999])
    x_t, target = _forward(x0, eps, t, prediction_type)
    assert_close(target, training_target(x0, eps, t, ALPHAS64, prediction_type).double(), rtol=1e-5, atol=1e-6)
    assert_close(x_t, add_noise(x0, eps, t, ALPHAS64), rtol=1e-5, atol=1e-6)
    assert_close(to_x0_eps(target, x_t, t, ALPHAS64, prediction_type), (x0, eps))
    assert_close(pred_eps_from_x0(x0, x_t, t, ALPHAS64), eps)
    assert_close(pred_x0_from_eps(eps, x_t, t, ALPHAS64), x0)


def test_conversions_compute_in_float32_and_return_input_dtype():
    out, x_t = _tensors(2, 2, dtype=torch.bfloat16)
    t = torch.tensor([100, 500])
    x0, eps = to_x0_eps(out, x_t, t, ALPHAS, "v_prediction")
    assert x0.dtype == eps.dtype == torch.bfloat16
    ref_x0, ref_eps = to_x0_eps(out.float(), x_t.float(), t, ALPHAS, "v_prediction")
    assert_close(x0, ref_x0.bfloat16())
    assert_close(eps, ref_eps.bfloat16())


def test_unknown_prediction_type_is_refused():
    out, x_t = _tensors(3, 2)
    with pytest.raises(ValueError, match="sample"):
        to_x0_eps(out, x_t, 5, ALPHAS64, "sample")


# ---------------------------------------------------------------------------------------------------- ddim_step


@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("prediction_type", PRED_TYPES)
def test_ddim_step_matches_diffusers_eta0(prediction_type, set_alpha_to_one):
    """Every step of a 10-step grid, including the last (t = 0 -> t_prev = −100 -> final ᾱ)."""
    s = _scheduler(prediction_type, set_alpha_to_one)
    final = 1.0 if set_alpha_to_one else float(s.alphas_cumprod[0])
    out, x = _tensors(4, 2, dtype=torch.float32)
    for t in s.timesteps.tolist():
        expected = s.step(out, t, x, eta=0.0).prev_sample
        tb = torch.full((SHAPE[0],), t)
        got = ddim_step(out, x, tb, tb - 100, s.alphas_cumprod, prediction_type, final_alpha_cumprod=final)
        assert_close(got, expected)


def test_ddim_step_equals_hand_formula_and_per_sample_t():
    """x_prev = √ᾱ_prev·x̂0 + √(1−ᾱ_prev)·ε̂; samples at different (t, t_prev) equal separate calls."""
    out, x_t = _tensors(5, 2)
    t, t_prev = torch.tensor([900, 250]), torch.tensor([800, -1])
    a_t, a_prev = _col(ALPHAS64[t]), _col(torch.tensor([float(ALPHAS64[800]), 1.0], dtype=torch.float64))
    x0 = (x_t - (1 - a_t).sqrt() * out) / a_t.sqrt()
    got = ddim_step(out, x_t, t, t_prev, ALPHAS64, "epsilon")
    assert_close(got, a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * out)
    assert_close(got[1], x0[1])  # final step with ᾱ_prev = 1 returns x̂0
    for i in range(2):
        alone = ddim_step(out[i : i + 1], x_t[i : i + 1], int(t[i]), int(t_prev[i]), ALPHAS64, "epsilon")
        assert_close(got[i : i + 1], alone)


@pytest.mark.parametrize("prediction_type", PRED_TYPES)
def test_ddim_step_with_exact_prediction_lands_on_forward_process_both_directions(prediction_type):
    """With the true ε (or v) of x_t, DDIM moves along q(x_s | x0, ε): to an earlier t (sampling) and to a later
    t (inversion, t_prev > t, nothing asserts the direction) it returns add_noise(x0, ε, t_prev)."""
    x0, eps = _tensors(6, 2)
    t = torch.tensor([400, 400])
    x_t, target = _forward(x0, eps, t, prediction_type)
    for t_prev in (torch.tensor([100, 300]), torch.tensor([700, 999])):
        assert_close(ddim_step(target, x_t, t, t_prev, ALPHAS64, prediction_type), _forward(x0, eps, t_prev))


def test_ddim_step_keeps_input_dtype():
    out, x_t = _tensors(7, 2, dtype=torch.float16)
    got = ddim_step(out, x_t, 500, 400, ALPHAS, "epsilon")
    assert got.dtype == torch.float16
    assert_close(got, ddim_step(out.float(), x_t.float(), 500, 400, ALPHAS, "epsilon").half())


# ---------------------------------------------------------------------------------------------------- σ and log-prob


def test_ddim_sigma_eta1_is_the_ddpm_posterior_std():
    """For t_prev = t − 1 and η = 1: σ² = (1−ᾱ_{t−1})/(1−ᾱ_t)·β_t (DDPM's β̃_t); η scales σ linearly."""
    t = torch.tensor([1, 500, 999])
    a_t, a_prev = ALPHAS64[t], ALPHAS64[t - 1]
    beta = 1 - a_t / a_prev
    assert_close(ddim_sigma(t, t - 1, ALPHAS64, 1.0), ((1 - a_prev) / (1 - a_t) * beta).sqrt())
    assert_close(ddim_sigma(t, t - 1, ALPHAS64, 0.3), 0.3 * ddim_sigma(t, t - 1, ALPHAS64, 1.0))
    assert_close(ddim_sigma(0, -1, ALPHAS64, 1.0), torch.zeros(1, dtype=torch.float64))  # ᾱ_prev = 1: no noise
    assert_close(ddim_sigma(300, 600, ALPHAS64, 1.0), torch.zeros(1, dtype=torch.float64))  # inversion: 0, not NaN


def _hand_mean_sigma(out, x_t, t, t_prev, eta, prediction_type="epsilon"):
    a_t, a_prev = _col(ALPHAS64[t]), _col(ALPHAS64[t_prev])
    sigma = eta * ((1 - a_prev) / (1 - a_t)).sqrt() * (1 - a_t / a_prev).sqrt()
    x0, eps = to_x0_eps(out, x_t, t, ALPHAS64, prediction_type)
    return a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).sqrt() * eps, sigma


@pytest.mark.parametrize("prediction_type", PRED_TYPES)
def test_logprob_of_given_sample_is_mean_gaussian_density(prediction_type):
    """log_prob = mean over (C, H, W) of Normal(μ, σ).log_prob(x_prev), per sample at its own t."""
    out, x_t, prev = _tensors(8, 3)
    t, t_prev = torch.tensor([900, 300]), torch.tensor([800, 200])
    mean, sigma = _hand_mean_sigma(out, x_t, t, t_prev, 0.7, prediction_type)
    got_x, got_lp = ddim_step_with_logprob(out, x_t, t, t_prev, ALPHAS64, prediction_type, eta=0.7, prev_sample=prev)
    assert got_x is prev
    expected = torch.distributions.Normal(mean, sigma.expand_as(mean)).log_prob(prev).mean(dim=(1, 2, 3))
    assert got_lp.shape == (2,)
    assert_close(got_lp, expected)
    written_out = (-((prev - mean) ** 2) / (2 * sigma**2) - sigma.log() - 0.5 * math.log(2 * math.pi)).mean(dim=(1, 2, 3))
    assert_close(got_lp, written_out)


def test_sampling_with_generator_is_mean_plus_sigma_z():
    out, x_t = _tensors(9, 2)
    t, t_prev = torch.tensor([600, 600]), torch.tensor([500, 500])
    mean, sigma = _hand_mean_sigma(out, x_t, t, t_prev, 1.0)
    x, lp = ddim_step_with_logprob(out, x_t, t, t_prev, ALPHAS64, "epsilon", 1.0, generator=torch.Generator().manual_seed(42))
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(42), dtype=torch.float64)
    assert_close(x, mean + sigma * z)
    assert_close(lp, (-0.5 * z**2 - sigma.log() - 0.5 * math.log(2 * math.pi)).mean(dim=(1, 2, 3)))
    # explicit noise is the same draw
    assert_close(ddim_step_with_logprob(out, x_t, t, t_prev, ALPHAS64, "epsilon", 1.0, noise=z)[0], x)


def test_per_sample_generators_make_each_row_independent_of_the_batch():
    out, x_t = _tensors(10, 2)
    t, t_prev = torch.tensor([700, 300]), torch.tensor([600, 200])
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    batch, batch_lp = ddim_step_with_logprob(out, x_t, t, t_prev, ALPHAS64, "epsilon", 1.0, generator=gens)
    for i, seed in enumerate((1, 2)):
        row, row_lp = ddim_step_with_logprob(
            out[i : i + 1], x_t[i : i + 1], t[i : i + 1], t_prev[i : i + 1], ALPHAS64, "epsilon", 1.0,
            generator=[torch.Generator().manual_seed(seed)],
        )  # fmt: skip
        assert_close(batch[i : i + 1], row)
        assert_close(batch_lp[i : i + 1], row_lp)


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("prediction_type", PRED_TYPES)
def test_stochastic_step_matches_diffusers(prediction_type, clip):
    """Mean: diffusers with variance_noise = 0; sample: the same z passed to both. clip_x0 = diffusers' clip_sample."""
    s = _scheduler(prediction_type, clip_sample=clip)
    out, x, z = _tensors(11, 3, dtype=torch.float32)
    out = 3 * out  # so that clipping x̂0 to [-1, 1] bites
    for t in s.timesteps.tolist()[:-1]:  # the last step has σ = 0 (ᾱ_prev = 1)
        tb = torch.full((SHAPE[0],), t)
        kw = dict(prediction_type=prediction_type, eta=0.6, clip_x0=1.0 if clip else None)
        mean = s.step(out, t, x, eta=0.6, variance_noise=torch.zeros_like(x)).prev_sample
        sample = s.step(out, t, x, eta=0.6, variance_noise=z).prev_sample
        sigma = _col(ddim_sigma(tb, tb - 100, s.alphas_cumprod, 0.6))
        got, lp = ddim_step_with_logprob(out, x, tb, tb - 100, s.alphas_cumprod, noise=z, **kw)
        assert_close(got, sample)
        _, lp_mean = ddim_step_with_logprob(out, x, tb, tb - 100, s.alphas_cumprod, prev_sample=mean, **kw)
        assert_close(lp_mean, (-sigma.log() - 0.5 * math.log(2 * math.pi)).view(-1))  # x_prev = μ: only the normaliser


def test_rescoring_the_returned_low_precision_sample_gives_the_same_logprob():
    out, x_t = _tensors(12, 2, dtype=torch.bfloat16)
    x, lp = ddim_step_with_logprob(out, x_t, 500, 480, ALPHAS, "epsilon", 1.0, generator=torch.Generator().manual_seed(0))
    assert x.dtype == torch.bfloat16 and lp.dtype == torch.float32
    assert torch.equal(ddim_step_with_logprob(out, x_t, 500, 480, ALPHAS, "epsilon", 1.0, prev_sample=x)[1], lp)


@pytest.mark.parametrize(
    "eta, t, t_prev",
    [(0.0, 500, 400), (1.0, 400, 400), (1.0, 400, 600), (1.0, 0, -1)],
    ids=["eta0", "same-t", "inversion", "final-step-alpha-one"],
)
def test_zero_sigma_raises(eta, t, t_prev):
    out, x_t = _tensors(13, 2)
    with pytest.raises(ValueError, match="σ_t > 0"):
        ddim_step_with_logprob(out, x_t, t, t_prev, ALPHAS64, "epsilon", eta)
