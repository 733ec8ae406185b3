"""Schedule math below the training loop: posterior sampling, forward noising, targets, x0/ε/v conversions
and DDIM steps (deterministic, inversion direction, and stochastic with a log-prob).

Notation (code -> DDPM): ``alphas_cumprod[t]`` = ᾱ_t; x_t = √ᾱ_t·x_0 + √(1-ᾱ_t)·ε; the ε-target is ε,
the v-target (Salimans & Ho, 2022) is v = √ᾱ_t·ε - √(1-ᾱ_t)·x_0.
"""

from __future__ import annotations

import math

import torch


def sample_posterior(mean: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """A fresh VAE latent z = μ + σ·n from a cached diagonal Gaussian posterior (σ = exp(½·logvar))."""
    return mean + torch.exp(0.5 * logvar) * noise


def _per_sample(values: torch.Tensor, timesteps: torch.Tensor, ndim: int) -> torch.Tensor:
    out = values.to(timesteps.device)[timesteps].float()
    return out.view(-1, *([1] * (ndim - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Forward process q(x_t | x_0): √ᾱ_t·x_0 + √(1-ᾱ_t)·ε, per sample (timesteps: (B,) long)."""
    a = _per_sample(alphas_cumprod, timesteps, x0.ndim)
    return (a.sqrt() * x0.float() + (1 - a).sqrt() * noise.float()).to(x0.dtype)


def training_target(
    x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """What the UNet is trained to predict: ε ('epsilon') or v ('v_prediction')."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        a = _per_sample(alphas_cumprod, timesteps, x0.ndim)
        return (a.sqrt() * noise.float() - (1 - a).sqrt() * x0.float()).to(noise.dtype)
    raise ValueError(f"prediction_type {prediction_type!r} is not supported; expected 'epsilon' or 'v_prediction'")


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B,): squared error mean over C, H, W, in fp32 (the official reduction)."""
    return (pred.float() - target.float()).pow(2).mean(dim=tuple(range(1, pred.ndim)))


# ---------------------------------------------------------------------------------------------------------------
# x0 / ε / v conversions and DDIM steps (own code, from the DDIM paper, Song et al. 2021, eq. 12).
#
# Shared conventions: timesteps are per sample, a (B,) long tensor (a Python int is broadcast to the batch);
# ``alphas_cumprod`` is the 1-D ᾱ table of the training schedule. Math runs in float32 (float64 stays float64);
# tensors come back in x_t's dtype, log-probs in the working dtype.
# ---------------------------------------------------------------------------------------------------------------

_PREDICTION_TYPES = ("epsilon", "v_prediction")


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs (the schedule math needs it); float64 stays float64."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _timesteps(t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
    """t as a (B,) long tensor on like's device; an int or 0-d tensor is broadcast to the batch."""
    t = torch.as_tensor(t, device=like.device).long()
    return t.expand(like.shape[0]) if t.ndim == 0 else t


def _alpha_bar(
    alphas_cumprod: torch.Tensor, t: torch.Tensor | int, like: torch.Tensor, final_alpha_cumprod: float | None = None
) -> torch.Tensor:
    """ᾱ_t per sample, shaped (B, 1, ..., 1) to broadcast against ``like``.

    With ``final_alpha_cumprod`` set, a negative t means "past the last step" and reads that value instead of
    the table (DDIM's ᾱ_prev at the final step); without it, t must index the table (0 <= t < T)."""
    t = _timesteps(t, like)
    table = alphas_cumprod.to(device=like.device, dtype=_work_dtype(like))
    a = table[t.clamp(min=0)]
    if final_alpha_cumprod is not None:
        a = torch.where(t < 0, torch.full_like(a, final_alpha_cumprod), a)
    return a.view(-1, *([1] * (like.ndim - 1)))


def _x0_eps(model_output: torch.Tensor, x_t: torch.Tensor, a: torch.Tensor, prediction_type: str):
    """(x̂0, ε̂) in the working dtype from a network output, given ᾱ_t already broadcast (see `to_x0_eps`)."""
    dt = a.dtype
    out, x = model_output.to(dt), x_t.to(dt)
    if prediction_type == "epsilon":
        return (x - (1 - a).sqrt() * out) / a.sqrt(), out
    if prediction_type == "v_prediction":
        return a.sqrt() * x - (1 - a).sqrt() * out, a.sqrt() * out + (1 - a).sqrt() * x
    raise ValueError(f"prediction_type {prediction_type!r} is not supported; expected one of {_PREDICTION_TYPES}")


def pred_x0_from_eps(eps: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Tweedie's x̂0 from a noise prediction: x̂0 = (x_t − √(1−ᾱ_t)·ε̂) / √ᾱ_t (x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε solved for x0)."""
    a = _alpha_bar(alphas_cumprod, t, x_t)
    return _x0_eps(eps, x_t, a, "epsilon")[0].to(x_t.dtype)


def pred_eps_from_x0(x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The noise implied by an x0 estimate: ε̂ = (x_t − √ᾱ_t·x̂0) / √(1−ᾱ_t) (undefined where ᾱ_t = 1)."""
    a = _alpha_bar(alphas_cumprod, t, x_t)
    dt = a.dtype
    return ((x_t.to(dt) - a.sqrt() * x0.to(dt)) / (1 - a).sqrt()).to(x_t.dtype)


def x0_from_v(v: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x̂0 from a v prediction: x̂0 = √ᾱ_t·x_t − √(1−ᾱ_t)·v, with v = √ᾱ_t·ε − √(1−ᾱ_t)·x0 (Salimans & Ho, 2022)."""
    a = _alpha_bar(alphas_cumprod, t, x_t)
    return _x0_eps(v, x_t, a, "v_prediction")[0].to(x_t.dtype)


def eps_from_v(v: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """ε̂ from a v prediction: ε̂ = √ᾱ_t·v + √(1−ᾱ_t)·x_t (same v as in `x0_from_v`)."""
    a = _alpha_bar(alphas_cumprod, t, x_t)
    return _x0_eps(v, x_t, a, "v_prediction")[1].to(x_t.dtype)


def to_x0_eps(
    model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int, alphas_cumprod: torch.Tensor, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂0, ε̂) from the network output, whatever it predicts, so samplers need not branch on the parametrisation.

    'epsilon':      ε̂ = output,                     x̂0 = (x_t − √(1−ᾱ_t)·ε̂) / √ᾱ_t
    'v_prediction': x̂0 = √ᾱ_t·x_t − √(1−ᾱ_t)·v,   ε̂ = √ᾱ_t·v + √(1−ᾱ_t)·x_t
    """
    a = _alpha_bar(alphas_cumprod, t, x_t)
    x0, eps = _x0_eps(model_output, x_t, a, prediction_type)
    return x0.to(x_t.dtype), eps.to(x_t.dtype)


def _sigma(a_t: torch.Tensor, a_prev: torch.Tensor, eta: float) -> torch.Tensor:
    """σ_t = η·√((1−ᾱ_prev)/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_prev), on broadcast ᾱs; the variance is floored at 0 so that a
    step that adds no noise (t_prev >= t, inversion) gives σ = 0 instead of NaN."""
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    return eta * variance.clamp(min=0).sqrt()


def ddim_sigma(
    t: torch.Tensor | int,
    t_prev: torch.Tensor | int,
    alphas_cumprod: torch.Tensor,
    eta: float,
    final_alpha_cumprod: float = 1.0,
) -> torch.Tensor:
    """DDIM's per-step noise scale σ_t(η) = η·√((1−ᾱ_prev)/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_prev) (DDIM eq. 16), shape (B,).

    η = 0 is the deterministic DDIM sampler, η = 1 the DDPM posterior variance. A negative t_prev reads
    ``final_alpha_cumprod`` (see `ddim_step`). σ is 0 when t_prev >= t (nothing to add when not denoising)."""
    t = torch.as_tensor(t).long().reshape(-1)
    t_prev = torch.as_tensor(t_prev, device=t.device).long().reshape(-1)
    t, t_prev = torch.broadcast_tensors(t, t_prev)
    like = torch.empty(t.shape[0], device=t.device, dtype=_work_dtype(alphas_cumprod))
    a_t = _alpha_bar(alphas_cumprod, t, like)
    a_prev = _alpha_bar(alphas_cumprod, t_prev, like, final_alpha_cumprod)
    return _sigma(a_t, a_prev, eta)


def ddim_step(
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor | int,
    t_prev: torch.Tensor | int,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
    final_alpha_cumprod: float = 1.0,
) -> torch.Tensor:
    """One deterministic DDIM step (η = 0): x_{t_prev} = √ᾱ_prev·x̂0 + √(1−ᾱ_prev)·ε̂, per sample.

    (x̂0, ε̂) come from `to_x0_eps`. A negative t_prev means "the step past the last timestep", where ᾱ_prev is
    ``final_alpha_cumprod``: 1.0 (the default, diffusers' ``set_alpha_to_one=True``, so the last step returns
    x̂0 itself) or pass ``alphas_cumprod[0]`` for ``set_alpha_to_one=False``.

    Nothing requires t_prev < t: with t_prev > t the same formula is the DDIM *inversion* step (re-noise x_t
    along the model's own ε̂ toward a later, noisier timestep), which is how inversion methods use it.
    """
    a_t = _alpha_bar(alphas_cumprod, t, x_t)
    a_prev = _alpha_bar(alphas_cumprod, t_prev, x_t, final_alpha_cumprod)
    x0, eps = _x0_eps(model_output, x_t, a_t, prediction_type)
    return (a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps).to(x_t.dtype)


def _draw_noise(
    shape: torch.Size, like: torch.Tensor, dtype: torch.dtype, generator: torch.Generator | list[torch.Generator] | None
) -> torch.Tensor:
    """Standard normal z of ``shape``: from one generator, one generator per sample (row i from generator[i],
    so a sample's noise does not depend on its batch-mates), or the global RNG when None. Drawn on the
    generator's device, then moved to like's device."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        rows = [torch.randn(shape[1:], generator=g, device=g.device, dtype=dtype) for g in generator]
        return torch.stack(rows).to(like.device)
    if generator is not None:
        return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(like.device)
    return torch.randn(shape, device=like.device, dtype=dtype)


def ddim_step_with_logprob(
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor | int,
    t_prev: torch.Tensor | int,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
    eta: float,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    final_alpha_cumprod: float = 1.0,
    clip_x0: float | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One stochastic DDIM step as a Gaussian policy: sample (or score) x_{t_prev} ~ N(μ, σ_t²·I); returns
    (x_prev, log_prob) with log_prob of shape (B,). This is the per-step policy of DDPO / GRPO rollouts.

    Notation (code -> paper, DDIM eq. 12/16):
        alphas_cumprod[t]   ᾱ_t          a_t, a_prev: ᾱ at t and at t_prev (``final_alpha_cumprod`` if t_prev < 0)
        x0, eps             x̂0, ε̂        from `to_x0_eps`; x̂0 clamped to [-clip_x0, clip_x0] if clip_x0 is set
                                         (ε̂ is kept unclipped, as diffusers does by default)
        eta                 η            noise level: 0 = deterministic DDIM, 1 = DDPM-like
        sigma               σ_t          η·√((1−ᾱ_prev)/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_prev)   (`ddim_sigma`)
        mean                μ            √ᾱ_prev·x̂0 + √(1−ᾱ_prev−σ_t²)·ε̂
        z                   z ~ N(0, I)  x_prev = μ + σ_t·z when sampling
        log_prob            log π        mean over all non-batch dims of
                                         −(x_prev−μ)²/(2σ_t²) − log σ_t − ½·log 2π

    The log-prob is a MEAN over dimensions, not a sum: the convention of every public implementation
    (ddpo-pytorch, DanceGRPO, Pref-GRPO); policy ratios exp(logp − logp_old) therefore use the per-dimension
    average. It is a density only for σ_t > 0, i.e. η > 0 and t_prev < t; otherwise a ValueError is raised
    (use `ddim_step` for η = 0). The inner √(1−ᾱ_prev−σ²) is floored at 0 against rounding (and η > 1).

    Sampling: with ``prev_sample`` None, z is ``noise`` if given (e.g. counter-based draws), else drawn from
    ``generator`` (one, a list with one per sample, or None for the global RNG). Scoring: with ``prev_sample``
    given, it is scored as is (no draw). The returned x_prev is in x_t's dtype and log_prob is computed on
    that returned tensor, so re-scoring it later gives the same value.
    """
    a_t = _alpha_bar(alphas_cumprod, t, x_t)
    a_prev = _alpha_bar(alphas_cumprod, t_prev, x_t, final_alpha_cumprod)
    sigma = _sigma(a_t, a_prev, eta)  # (B, 1, ..., 1)
    if not bool((sigma > 0).all()):
        raise ValueError(
            f"ddim_step_with_logprob needs σ_t > 0 for a log-prob (η > 0 and t_prev < t); got η={eta}, "
            f"t={_timesteps(t, x_t).tolist()}, t_prev={_timesteps(t_prev, x_t).tolist()}; use ddim_step for η = 0"
        )
    x0, eps = _x0_eps(model_output, x_t, a_t, prediction_type)
    if clip_x0 is not None:
        x0 = x0.clamp(-clip_x0, clip_x0)
    mean = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
    if prev_sample is None:
        z = noise.to(device=mean.device, dtype=mean.dtype) if noise is not None else _draw_noise(mean.shape, x_t, mean.dtype, generator)
        prev_sample = (mean + sigma * z).to(x_t.dtype)
    x = prev_sample.to(mean.dtype)
    log_prob = -((x - mean) ** 2) / (2 * sigma**2) - torch.log(sigma) - 0.5 * math.log(2 * math.pi)
    return prev_sample, log_prob.mean(dim=tuple(range(1, x.ndim)))
