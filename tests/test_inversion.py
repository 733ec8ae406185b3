"""DDIM / ReNoise inversion in diffalign.diffusion: `invert`, `inversion_grid`, `inversion_levels`, `implied_noise`.

Expected values are written out here from the formulas. The official grid is the one diffusers 0.20's
DDIMInverseScheduler builds with set_timesteps(10) and the SD configs' steps_offset=1, listed by hand:
sources −99, 1, 101, ..., 801, each step going +100; a sample runs the sources below its t. A DDIM step between
levels s and d is x_d = √ᾱ_d·(x_s − √(1−ᾱ_s)·ε̂)/√ᾱ_s + √(1−ᾱ_d)·ε̂ (DDIM eq. 12), written out in float64.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler
from torch.testing import assert_close

from diffalign.diffusion import ddim_step, implied_noise, inversion_grid, inversion_levels, invert

SHAPE = (4, 3, 3)  # latent shape per sample
SCHEDULER = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, set_alpha_to_one=False, steps_offset=1)
ALPHAS = SCHEDULER.alphas_cumprod.double()  # SD1.5 / SDXL training schedule
OFFICIAL_SOURCES = [-99, 1, 101, 201, 301, 401, 501, 601, 701, 801]
OFFICIAL_DESTINATIONS = [1, 101, 201, 301, 401, 501, 601, 701, 801, 901]
LEVELS = [0, 1, 2, 50, 100, 101, 102, 250, 500, 801, 802, 850, 901, 902, 950, 999]


def _official_level(t: int) -> int:
    """The smallest destination >= t, capped at the top one (901)."""
    return min([d for d in OFFICIAL_DESTINATIONS if d >= t], default=901)


def _num_steps(t: int) -> int:
    return sum(s < t for s in OFFICIAL_SOURCES)


def _randn(seed: int, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _move(eps, x, a_s, a_d):
    """DDIM eq. 12 from level s to level d, by hand."""
    return a_d**0.5 * (x - (1 - a_s) ** 0.5 * eps) / a_s**0.5 + (1 - a_d) ** 0.5 * eps


def _net(seed: int = 3):
    """A nonlinear, timestep- and row-dependent stand-in UNet: ε = tanh(W·x + cond[row] + 0.003·τ)."""
    w = _randn(seed, 4, 4) * 0.5
    cond = _randn(seed + 1, 8, 4, 1, 1)

    def f(x, t, rows):
        return torch.tanh(torch.einsum("ij,bjhw->bihw", w, x) + cond[rows] + 0.003 * t.double().view(-1, 1, 1, 1))

    return f


# ------------------------------------------------------------------------------------------------- the grid


@pytest.mark.parametrize("semantics", ["official", "exact"])
def test_levels_and_calls_follow_the_hand_grid(semantics):
    t = torch.tensor(LEVELS)
    level, calls = inversion_levels(t, 10, 1000, semantics)
    expected = [_official_level(x) if semantics == "official" else x for x in LEVELS]
    assert level.tolist() == expected
    assert calls.tolist() == [_num_steps(x) for x in LEVELS]
    assert inversion_levels(t, 10, 1000, semantics, renoise=True)[1].tolist() == [2 * _num_steps(x) for x in LEVELS]


def test_five_step_grid_of_smpo_sd15():
    # set_timesteps(5): (0, 200, ..., 800) + 1, rolled -> sources −199, 1, 201, 401, 601; destinations 1, ..., 801
    source, destination, unet_t, _ = inversion_grid(torch.tensor([999]), 5, 1000, "official")
    assert source[:, 0].tolist() == [-199, 1, 201, 401, 601] == unet_t[:, 0].tolist()
    assert destination[:, 0].tolist() == [1, 201, 401, 601, 801]
    assert inversion_levels(torch.tensor([0, 1, 2, 201, 202, 801, 999]), 5, 1000, "official")[0].tolist() == [1, 1, 201, 201, 401, 801, 801]


def test_exact_grid_replaces_only_the_last_destination_and_clamps_the_first_unet_timestep():
    t = torch.tensor([0, 150, 999])
    source, destination, unet_t, active = inversion_grid(t, 10, 1000, "exact")
    assert source[:, 1].tolist() == OFFICIAL_SOURCES
    assert destination[:3, 1].tolist() == [1, 101, 150]  # 101 -> 150 is the partial last step of t = 150
    assert destination[:, 2].tolist() == OFFICIAL_DESTINATIONS[:9] + [999]  # 801 -> 999 for t above the top level
    assert destination[0, 0].item() == 0 and active[:, 0].tolist() == [True] + [False] * 9
    assert unet_t[:, 2].tolist() == [0] + OFFICIAL_SOURCES[1:]


# ---------------------------------------------------------------------------- constant-ε stand-in (off-by-one)


@pytest.mark.parametrize("renoise", [False, True])
@pytest.mark.parametrize("semantics", ["official", "exact"])
def test_constant_eps_inverts_to_the_forward_process_at_the_reached_level(semantics, renoise):
    # with ε̂ ≡ c every DDIM step maps √ᾱ_s·x0 + √(1−ᾱ_s)·c to √ᾱ_d·x0 + √(1−ᾱ_d)·c, so from a clean start
    # (ᾱ_init = 1) the result is the forward process at the reached level L, whatever the path
    x0, c = _randn(0, len(LEVELS), *SHAPE), _randn(1, *SHAPE)
    t = torch.tensor(LEVELS)
    x = invert(x0, t, lambda x, t, rows: c.expand_as(x), ALPHAS, semantics=semantics, renoise=renoise, initial_alpha_cumprod=1.0)
    level = torch.tensor([_official_level(v) if semantics == "official" else v for v in LEVELS])
    a = ALPHAS[level].view(-1, 1, 1, 1)
    assert_close(x, a.sqrt() * x0 + (1 - a).sqrt() * c, rtol=0, atol=1e-12)
    assert_close(implied_noise(x, x0, level, ALPHAS), c.expand_as(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("semantics", ["official", "exact"])
def test_constant_eps_from_the_sd_config_start_level(semantics):
    # default ᾱ_init = ᾱ_0 (set_alpha_to_one=False): the first step reads x0 as a level-0 latent, x̂0 = (x0 − √(1−ᾱ_0)·c)/√ᾱ_0
    x0, c = _randn(0, len(LEVELS), *SHAPE), _randn(1, *SHAPE)
    x = invert(x0, torch.tensor(LEVELS), lambda x, t, rows: c.expand_as(x), ALPHAS, semantics=semantics)
    level = torch.tensor([_official_level(v) if semantics == "official" else v for v in LEVELS])
    a = ALPHAS[level].view(-1, 1, 1, 1)
    x0_hat = (x0 - (1 - ALPHAS[0]).sqrt() * c) / ALPHAS[0].sqrt()
    assert_close(x, a.sqrt() * x0_hat + (1 - a).sqrt() * c, rtol=0, atol=1e-12)


def test_renoise_equals_plain_ddim_for_a_constant_predictor():
    x0, c = _randn(0, 5, *SHAPE), _randn(1, *SHAPE)
    t = torch.tensor([0, 120, 500, 901, 999])
    for semantics in ("official", "exact"):
        plain = invert(x0, t, lambda x, t, rows: c.expand_as(x), ALPHAS, semantics=semantics)
        renoised = invert(x0, t, lambda x, t, rows: c.expand_as(x), ALPHAS, semantics=semantics, renoise=True)
        assert_close(renoised, plain, rtol=0, atol=1e-12)


def test_constant_eps_round_trip_through_ddim_sampling_is_exact():
    # the reverse of the exact path with ddim_step (UNet at the upper level, last step to ᾱ_init) returns x0
    x0, c = _randn(0, 4, *SHAPE), _randn(1, *SHAPE)
    t = torch.tensor([3, 250, 500, 999])
    x = invert(x0, t, lambda x, t, rows: c.expand_as(x), ALPHAS, semantics="exact")
    source, destination, _, active = inversion_grid(t, 10, 1000, "exact")
    for k in reversed(range(10)):
        rows = active[k].nonzero().view(-1)
        if rows.numel():
            x[rows] = ddim_step(c.expand_as(x[rows]), x[rows], destination[k, rows], source[k, rows], ALPHAS, "epsilon",
                                final_alpha_cumprod=float(ALPHAS[0]))
    assert_close(x, x0, rtol=0, atol=1e-10)


# ------------------------------------------------------------------------------------ rows passed to eps_fn


@pytest.mark.parametrize("renoise", [False, True])
@pytest.mark.parametrize("semantics", ["official", "exact"])
def test_eps_fn_sees_only_the_active_rows_at_their_source_timestep(semantics, renoise):
    t_list = [950, 0, 250, 101, 500, 102]
    calls = []
    net = _net()

    def eps_fn(x, t, rows):
        calls.append((rows.tolist(), t.tolist(), x.shape[0]))
        return net(x, t, rows)

    invert(_randn(0, 6, *SHAPE), torch.tensor(t_list), eps_fn, ALPHAS, semantics=semantics, renoise=renoise)
    expected = []
    for s in OFFICIAL_SOURCES:
        rows = [b for b, t in enumerate(t_list) if s < t]
        if rows:
            timestep = s if semantics == "official" else max(s, 0)
            expected += [(rows, [timestep] * len(rows), len(rows))] * (2 if renoise else 1)
    assert calls == expected


@pytest.mark.parametrize("renoise", [False, True])
@pytest.mark.parametrize("semantics", ["official", "exact"])
def test_batched_inversion_equals_per_sample_inversion(semantics, renoise):
    t = torch.tensor([950, 0, 250, 101, 500, 102])
    x0, noise = _randn(0, 6, *SHAPE), _randn(1, 10, 6, *SHAPE)
    net = _net()
    kw = dict(semantics=semantics, renoise=renoise, eta=0.1)
    batched = invert(x0, t, net, ALPHAS, noise=noise, **kw)
    for i in range(6):
        def eps_fn(x, t, rows, i=i):  # rows of a one-sample batch are [0]: map them back to the sample's own row
            assert rows.tolist() == [0]
            return net(x, t, torch.tensor([i]))

        single = invert(x0[i : i + 1], t[i : i + 1], eps_fn, ALPHAS, noise=noise[:, i : i + 1], **kw)
        assert_close(single, batched[i : i + 1], rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------------- η noise


def test_eta_noise_two_official_steps_by_hand():
    # t = 101: steps −99 -> 1 (ᾱ_s = ᾱ_0, SD config) and 1 -> 101; after each x += η·√var·z_k, with var from
    # diffusers' own DDIMScheduler._get_variance(timestep=destination, prev_timestep=source), as the official code
    x0, net = _randn(0, 2, *SHAPE), _net()
    noise = _randn(1, 10, 2, *SHAPE)
    noise[2:] = float("nan")  # rows for steps that t = 101 never runs must not be read
    rows = torch.arange(2)
    got = invert(x0, torch.tensor([101, 101]), net, ALPHAS, eta=0.1, noise=noise, semantics="official")
    a = ALPHAS
    var0 = SCHEDULER._get_variance(torch.tensor(1), torch.tensor(-99)).double()
    var1 = SCHEDULER._get_variance(torch.tensor(101), torch.tensor(1)).double()
    assert_close(var0, (1 - a[0]) / (1 - a[1]) * (1 - a[1] / a[0]), rtol=1e-4, atol=0)  # float32 diffusers; ᾱ_{−99} = final_alpha_cumprod = ᾱ_0
    x = _move(net(x0, torch.full((2,), -99), rows), x0, a[0], a[1]) + 0.1 * var0.sqrt() * noise[0]
    x = _move(net(x, torch.full((2,), 1), rows), x, a[1], a[101]) + 0.1 * var1.sqrt() * noise[1]
    assert_close(got, x, rtol=0, atol=1e-6)  # diffusers' variance is float32
    no_eta = invert(x0, torch.tensor([101, 101]), net, ALPHAS, semantics="official")
    assert (got - no_eta).abs().max() > 1e-3  # the noise really was added


def test_eta_noise_on_the_exact_partial_step():
    # exact t = 60: step 0 from the clean latent (ᾱ_0, UNet at 0) to level 1, then the partial step 1 -> 60;
    # each adds η·√var·z_k with var = (1−ᾱ_s)/(1−ᾱ_d)·(1−ᾱ_d/ᾱ_s) of its own (s, d)
    x0, net, noise = _randn(0, 1, *SHAPE), _net(), _randn(1, 10, 1, *SHAPE)
    got = invert(x0, torch.tensor([60]), net, ALPHAS, eta=0.3, noise=noise, semantics="exact")
    a, row = ALPHAS, torch.tensor([0])
    x = x0
    for k, (s, d, tau) in enumerate([(0, 1, 0), (1, 60, 1)]):
        var = (1 - a[s]) / (1 - a[d]) * (1 - a[d] / a[s])
        x = _move(net(x, torch.tensor([tau]), row), x, a[s], a[d]) + 0.3 * var.sqrt() * noise[k]
    assert_close(got, x, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------- v-prediction


@pytest.mark.parametrize("renoise", [False, True])
def test_v_prediction_output_is_converted_to_eps(renoise):
    # a v-net built from an ε-net, v = (ε − √(1−ᾱ_τ)·x)/√ᾱ_τ at the timestep τ it is given, inverts identically
    # (exact semantics with the default ᾱ_init = ᾱ_0, so ᾱ at every source is the table entry at τ)
    x0, t, eps_net = _randn(0, 3, *SHAPE), torch.tensor([40, 333, 999]), _net()

    def v_net(x, tau, rows):
        a = ALPHAS[tau].view(-1, 1, 1, 1)
        return (eps_net(x, tau, rows) - (1 - a).sqrt() * x) / a.sqrt()

    want = invert(x0, t, eps_net, ALPHAS, semantics="exact", renoise=renoise)
    got = invert(x0, t, v_net, ALPHAS, semantics="exact", renoise=renoise, prediction_type="v_prediction")
    assert_close(got, want, rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------------------- implied noise, errors


def test_implied_noise_is_the_forward_identity_solved_for_eps():
    x0, eps = _randn(0, 3, *SHAPE), _randn(1, 3, *SHAPE)
    t = torch.tensor([0, 400, 999])
    a = ALPHAS[t].view(-1, 1, 1, 1)
    assert_close(implied_noise(a.sqrt() * x0 + (1 - a).sqrt() * eps, x0, t, ALPHAS), eps, rtol=0, atol=1e-10)


def test_bad_arguments_are_refused():
    x0, net = _randn(0, 2, *SHAPE), _net()
    t = torch.tensor([10, 20])
    with pytest.raises(ValueError, match="noise"):
        invert(x0, t, net, ALPHAS, eta=0.1, semantics="exact")
    with pytest.raises(ValueError, match="shape"):
        invert(x0, t, net, ALPHAS, eta=0.1, noise=_randn(1, 9, 2, *SHAPE), semantics="exact")
    with pytest.raises(ValueError, match="semantics"):
        invert(x0, t, net, ALPHAS, semantics="newer")
    with pytest.raises(ValueError, match="training levels"):
        invert(x0, torch.tensor([10, 1000]), net, ALPHAS, semantics="exact")
    with pytest.raises(ValueError, match="prediction_type"):
        invert(x0, t, net, ALPHAS, prediction_type="sample", semantics="exact")


# ------------------------------------------------------------------------------------ toy model round trip


def _toy_latents_and_unet(n: int):
    """n rendered toy training scenes -> (x_0 latents, eps_fn over the rows' own captions, ᾱ table)."""
    import numpy as np

    from diffalign.config import ModelConfig
    from diffalign.models.loading import encode_prompts, load_components
    from diffalign.toy.scenes import TRAIN, render, sample_scene

    c = load_components(ModelConfig(pretrained="builtin:toy"))
    specs = TRAIN[:: len(TRAIN) // n][:n]
    pixels = np.stack([np.asarray(render(sample_scene(s, i), 32)) for i, s in enumerate(specs)])
    with torch.no_grad():
        x0 = c.vae.encode(torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1).latent_dist.mean * c.vae.config.scaling_factor
        embeds, pooled = encode_prompts(c, [s.caption for s in specs])
    time_ids = torch.tensor([[32, 32, 0, 0, 32, 32]], dtype=torch.float32).expand(n, -1)

    @torch.no_grad()
    def eps_fn(x, t, rows):
        return c.unet(x, t, encoder_hidden_states=embeds[rows], added_cond_kwargs={"text_embeds": pooled[rows], "time_ids": time_ids[rows]}).sample

    return x0, eps_fn, c.scheduler.alphas_cumprod.float()


def test_toy_unet_inversion_round_trips_through_ddim_sampling():
    """Invert real toy latents to t with the toy UNet (exact semantics), then DDIM-sample back down the same path
    (ddim_step from each step's destination to its source, UNet at the destination). Measured with
    benchmarks/inversion_reconstruction.py (64 latents): rel. MSE 7.7e-4 / 9.9e-4 / 0.105 at t = 250 / 500 / 900
    for DDIM, similar for ReNoise (docs/toy_world.md); the bounds below are loose."""
    torch.set_num_threads(1)
    x0, eps_fn, alphas = _toy_latents_and_unet(4)
    for t, bound in ((250, 5e-3), (500, 5e-3), (900, 0.25)):
        tt = torch.full((4,), t, dtype=torch.long)
        source, destination, _, active = inversion_grid(tt, 10, 1000, "exact")
        for renoise in (False, True):
            x = invert(x0, tt, eps_fn, alphas, semantics="exact", renoise=renoise)
            assert ((x - x0) ** 2).mean() / x0.var() > 0.01  # the latent really moved away from x0
            for k in reversed(range(10)):
                if active[k, 0]:
                    x = ddim_step(eps_fn(x, destination[k], torch.arange(4)), x, destination[k], source[k], alphas, "epsilon",
                                  final_alpha_cumprod=float(alphas[0]))
            rel = (((x - x0) ** 2).mean() / x0.var()).item()
            assert rel < bound, (t, renoise, rel)
