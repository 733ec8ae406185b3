"""Schedule math below the training loop: posterior sampling, forward noising, targets, x0/ε/v conversions,
DDIM steps (deterministic, inversion direction, and stochastic with a log-prob) and DDIM / ReNoise inversion
of data toward a training level (DDIM-InPO, SmPO).

Notation (code -> DDPM): ``alphas_cumprod[t]`` = ᾱ_t; x_t = √ᾱ_t·x_0 + √(1-ᾱ_t)·ε; the ε-target is ε,
the v-target (Salimans & Ho, 2022) is v = √ᾱ_t·ε - √(1-ᾱ_t)·x_0.
"""

from __future__ import annotations

import math
from collections.abc import Callable

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


def ddim_mean_std(
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor | int,
    t_prev: torch.Tensor | int,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
    eta: float,
    final_alpha_cumprod: float = 1.0,
    clip_x0: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(μ, σ_t) of the stochastic DDIM step x_{t_prev} ~ N(μ, σ_t²·I) (notation of `ddim_step_with_logprob`): μ in the
    work dtype, σ broadcast as (B, 1, ..., 1). The closed-form KL between two such steps of equal σ is
    ‖μ_θ − μ_ref‖² / (2σ²)."""
    a_t = _alpha_bar(alphas_cumprod, t, x_t)
    a_prev = _alpha_bar(alphas_cumprod, t_prev, x_t, final_alpha_cumprod)
    sigma = _sigma(a_t, a_prev, eta)
    x0, eps = _x0_eps(model_output, x_t, a_t, prediction_type)
    if clip_x0 is not None:
        x0 = x0.clamp(-clip_x0, clip_x0)
    return a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps, sigma


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
    mean, sigma = ddim_mean_std(model_output, x_t, t, t_prev, alphas_cumprod, prediction_type, eta, final_alpha_cumprod, clip_x0)
    if not bool((sigma > 0).all()):
        raise ValueError(
            f"ddim_step_with_logprob needs σ_t > 0 for a log-prob (η > 0 and t_prev < t); got η={eta}, "
            f"t={_timesteps(t, x_t).tolist()}, t_prev={_timesteps(t_prev, x_t).tolist()}; use ddim_step for η = 0"
        )
    if prev_sample is None:
        z = noise.to(device=mean.device, dtype=mean.dtype) if noise is not None else _draw_noise(mean.shape, x_t, mean.dtype, generator)
        prev_sample = (mean + sigma * z).to(x_t.dtype)
    x = prev_sample.to(mean.dtype)
    log_prob = -((x - mean) ** 2) / (2 * sigma**2) - torch.log(sigma) - 0.5 * math.log(2 * math.pi)
    return prev_sample, log_prob.mean(dim=tuple(range(1, x.ndim)))


# ---------------------------------------------------------------------------------------------------------------
# DDIM / ReNoise inversion of data toward a per-sample training level (DDIM-InPO, Lu et al. CVPR 2025; SmPO,
# Lu et al. ICML 2025). Own code; the "official" grid reproduces JaydenLyh/InPO (a9cfc4d) and JaydenLyh/SmPO
# (8922d54) train.py, which run diffusers 0.20.0's DDIMInverseScheduler (their requirements.txt pins it). The
# step is the DDIM update of `ddim_step` (DDIM eq. 12 run toward a noisier level) on explicit ᾱs, because the
# first official step starts from a negative timestep whose ᾱ is a config value, not a table entry.
# ---------------------------------------------------------------------------------------------------------------

INVERSION_SEMANTICS = ("official", "exact")

# eps_fn(x, t, rows) -> network output (ε or v, see `invert`) for the latents x of the batch rows `rows`.
EpsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def inversion_grid(
    t: torch.Tensor | int,
    num_steps: int,
    num_train_timesteps: int,
    semantics: str,
    steps_offset: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inversion steps toward per-sample training levels t: (source, destination, unet_timestep, active),
    each of shape (num_steps, B); row k describes grid step k for every sample.

    Notation:
        T          num_train_timesteps (1000 for SD1.5 / SDXL)
        n          num_steps (InPO: 10; SmPO: 10 for SDXL, 5 for SD1.5)
        r          T // n, the grid spacing (100 for n = 10)
        s_k        source level of step k   = steps_offset + (k − 1)·r     (−99, 1, 101, ..., 801 for n = 10)
        d_k        destination level        = s_k + r                        (1, 101, ..., 901)
        active     step k runs for sample b iff s_k < t_b (the grid points below t_b; rows of a sample are a
                   prefix k = 0..m_b−1, so a sample that has stopped never runs again)
        L_b        the level sample b's latent reaches: the destination of its last active step

    A negative source (s_0 = −99) stands for the clean latent x_0, whose ᾱ is ``initial_alpha_cumprod`` in
    `invert`.

    semantics="official" reproduces the papers' code under diffusers 0.20.0 (file paths inside the 0.20.0 wheel):
      * ``DDIMInverseScheduler.set_timesteps(n)`` ('leading' spacing, as in the SD1.5 / SDXL scheduler configs)
        builds (0, r, ..., (n−1)·r) + steps_offset, rolls it by one and sets the first entry to (second − r):
        [−99, 1, 101, ..., 801] for n = 10, steps_offset = 1 (schedulers/scheduling_ddim_inverse.py L274-294);
      * ``step(ε, s, x)`` moves x from level s to s + T//n (L338, L342-343, L374), reading ᾱ_s from
        ``initial_alpha_cumprod`` when s < 0 (L342; L228: ᾱ_0 for the SD configs' set_alpha_to_one=False);
      * the training loop runs the grid entries below t, ``timesteps[timesteps < t]`` (InPO train.py L995, SmPO
        L1002), and calls the UNet with that SOURCE entry, so the timestep −99 reaches the UNet on the first
        step (InPO L998-1006).
      Hence L = the smallest destination ≥ t (t = 0 gives 1), capped at the top destination d_{n−1} (901) for
      t > d_{n−1}; unet_timestep = s_k.
    semantics="exact": the same steps (same count, same sources), except that each sample's last active step
      goes to t itself (s_last → t, a partial step, or a longer one for t > 901), so L = t; the UNet is called
      with max(s_k, 0): the first step's source is the clean latent (level 0), not the timestep −99 that the
      UNet never saw in training.
    """
    if semantics not in INVERSION_SEMANTICS:
        raise ValueError(f"semantics {semantics!r} is not supported; expected one of {INVERSION_SEMANTICS}")
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
    t = torch.as_tensor(t).long().reshape(-1)
    if bool((t < 0).any()) or bool((t >= num_train_timesteps).any()):
        raise ValueError(f"training levels t must be in [0, {num_train_timesteps}), got {t.tolist()}")
    r = num_train_timesteps // num_steps
    if not 0 <= steps_offset < r:
        raise ValueError(f"steps_offset must be in [0, {r}) so that every t >= 0 runs the first step, got {steps_offset}")
    k = torch.arange(num_steps, device=t.device)
    source = (steps_offset + (k - 1) * r).view(-1, 1).expand(num_steps, t.shape[0]).clone()
    destination = source + r
    active = source < t.view(1, -1)
    if semantics == "official":
        return source, destination, source.clone(), active
    last = k.view(-1, 1) == active.sum(dim=0, keepdim=True) - 1
    destination = torch.where(last, t.view(1, -1).expand_as(destination), destination)
    return source, destination, source.clamp(min=0), active


def inversion_levels(
    t: torch.Tensor | int,
    num_steps: int,
    num_train_timesteps: int,
    semantics: str,
    renoise: bool = False,
    steps_offset: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, calls), each (B,): the level L the inverted latent reaches for each training level t, and how many
    eps_fn (UNet) evaluations `invert` spends on each sample: one per active grid step, two with ReNoise.

    Under semantics="official" L = min(smallest grid destination ≥ t, top destination) (901 for n = 10), under
    "exact" L = t (see `inversion_grid`). The step count m = #{k : s_k < t} is the same in both semantics:
    for n = 10, steps_offset = 1, m = 1 for t ≤ 1, then m = 1 + ceil((t − 1)/100), capped at 10 for t > 801.
    """
    _, destination, _, active = inversion_grid(t, num_steps, num_train_timesteps, semantics, steps_offset)
    steps = active.sum(dim=0)
    level = destination.gather(0, (steps - 1).clamp(min=0).view(1, -1)).view(-1)
    return level, steps * (2 if renoise else 1)


def _ddim_move(eps: torch.Tensor, x: torch.Tensor, a_src: torch.Tensor, a_dst: torch.Tensor) -> torch.Tensor:
    """DDIM eq. 12 with an ε prediction between two arbitrary levels: x̂0 = (x − √(1−ᾱ_src)·ε̂)/√ᾱ_src,
    x_dst = √ᾱ_dst·x̂0 + √(1−ᾱ_dst)·ε̂ (the update of `ddim_step`, on ᾱs given directly)."""
    x0 = (x - (1 - a_src).sqrt() * eps) / a_src.sqrt()
    return a_dst.sqrt() * x0 + (1 - a_dst).sqrt() * eps


def invert(
    x0: torch.Tensor,
    t: torch.Tensor | int,
    eps_fn: EpsFn,
    alphas_cumprod: torch.Tensor,
    *,
    semantics: str,
    num_steps: int = 10,
    prediction_type: str = "epsilon",
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
    renoise: bool = False,
    steps_offset: int = 1,
    initial_alpha_cumprod: float | None = None,
) -> torch.Tensor:
    """DDIM inversion of clean latents x0 toward per-sample training levels t (DDIM-InPO), optionally with one
    averaged ReNoise iteration per step (SmPO) and η-scaled noise after each step (InPO's η_inv = 0.1).
    Returns the inverted latents (B, ...) in x0's dtype, at the levels `inversion_levels` gives.

    Notation (code -> paper / official code):
        x0                  x_0          clean (VAE-scaled) latents, (B, ...)
        t                   t            per-sample training level, (B,) long in [0, T) (an int is broadcast)
        s_k, d_k, active    grid         source / destination level of step k and which samples run it
                                         (`inversion_grid`; semantics 'official' or 'exact' documented there)
        a_src, a_dst        ᾱ_s, ᾱ_d     ᾱ at s_k (``initial_alpha_cumprod`` when s_k < 0) and at d_k
        eps_fn(x, τ, rows)  ε_θ          the caller's network on the latents x of batch rows ``rows`` (a long
                                         tensor of indices into the batch, only the samples still inverting; it
                                         is never called with a row that has reached its level) at UNet
                                         timesteps τ = unet_timestep (the SOURCE level; −99 on the first official
                                         step); plain conditional, no CFG. x is passed in x0's dtype.
        ε̂                   ε̂            the eps_fn output as ε: itself for 'epsilon'; for 'v_prediction'
                                         ε̂ = √ᾱ_s·v + √(1−ᾱ_s)·x_in (`eps_from_v`, with x_in the latent given to
                                         eps_fn and ᾱ of the level it sits at per the grid, ᾱ_s)
        step(ε̂)             DDIM eq. 12  x_d = √ᾱ_d·x̂0 + √(1−ᾱ_d)·ε̂,  x̂0 = (x_s − √(1−ᾱ_s)·ε̂)/√ᾱ_s
                                         (= diffusers 0.20 DDIMInverseScheduler.step with clip_sample=False,
                                         as in the SD1.5 / SDXL scheduler configs)
        renoise             ReNoise      SmPO train.py L1003-1022: ε̂0 = ε(x_s, s); x' = step(ε̂0);
                                         ε̂1 = ε(x', s) (the second call uses the SOURCE timestep too, as the
                                         official code does, although x' sits at level d); x_d = step((ε̂0+ε̂1)/2)
                                         from x_s. Two eps_fn calls per step.
        eta, noise          η, z_k       after each step x_d += η·σ_k·z_k (InPO train.py L1008-1011), with
                                         σ_k² = (1−ᾱ_s)/(1−ᾱ_d)·(1−ᾱ_d/ᾱ_s): the official
                                         ``noise_scheduler._get_variance(prev_t, t)``, where noise_scheduler is
                                         a DDIMScheduler (InPO train.py L469, not DDPM's _get_variance), i.e.
                                         DDIMScheduler._get_variance(timestep=d_k, prev_timestep=s_k)
                                         (diffusers 0.20 schedulers/scheduling_ddim.py L256-264; a negative s_k
                                         reads final_alpha_cumprod, the same config value as
                                         ``initial_alpha_cumprod``) = `ddim_sigma`(d_k, s_k, η=1)², the DDPM
                                         posterior variance of the jump d_k → s_k. ``noise`` is pre-drawn
                                         (num_steps, B, ...) standard normal (row k for step k; drawing it, e.g.
                                         counter-based, is the caller's job), None when η = 0.
        initial_alpha_cumprod ᾱ_init     ᾱ of the clean latent (source of step 0). None: alphas_cumprod[0], the
                                         value of the SD1.5 / SDXL configs (set_alpha_to_one=False;
                                         scheduling_ddim_inverse.py L228);
                                         1.0 treats x0 as exactly noise-free (set_alpha_to_one=True).

    The math runs in float32 (float64 stays float64); the official code runs it in fp16 with an fp16 ᾱ table
    (InPO train.py L956), which is not reproduced. The official code shares one t per micro-batch; here each
    sample has its own t and only the samples with s_k < t run step k.

    Which semantics to use (no default here; the caller's config decides): 'exact' is the recommended default
    for diffalign's methods. Under 'official' the
    latent sits at level L ≠ t (up to r − 1 levels above t, or below it for t > 901) while the UNet is trained
    at timestep t and τ is back-solved at ᾱ_t (`implied_noise`); for an exact forward-noised latent
    τ = (√ᾱ_L − √ᾱ_t)/√(1−ᾱ_t)·x_0 + √((1−ᾱ_L)/(1−ᾱ_t))·ε, which for SD's schedule puts a ×6.5 noise scale and a
    −1.06·x_0 leak into the target at t = 2 (L = 101) and ×1.5 at t = 50 or 102; and its first UNet call uses the
    untrained timestep −99. 'exact' costs the same number of UNet calls. Use 'official' to reproduce the papers'
    code (parity runs, the published recipes).
    """
    if prediction_type not in _PREDICTION_TYPES:
        raise ValueError(f"prediction_type {prediction_type!r} is not supported; expected one of {_PREDICTION_TYPES}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if eta > 0 and noise is None:
        raise ValueError("eta > 0 needs pre-drawn noise of shape (num_steps, B, ...)")
    if noise is not None and tuple(noise.shape) != (num_steps, *x0.shape):
        raise ValueError(f"noise must have shape {(num_steps, *x0.shape)}, got {tuple(noise.shape)}")
    num_train_timesteps = alphas_cumprod.shape[0]
    t = _timesteps(t, x0)
    source, destination, unet_timestep, active = inversion_grid(t, num_steps, num_train_timesteps, semantics, steps_offset)
    a_init = float(alphas_cumprod[0]) if initial_alpha_cumprod is None else float(initial_alpha_cumprod)

    def eps_of(x_in: torch.Tensor, rows: torch.Tensor, timesteps: torch.Tensor, a_src: torch.Tensor) -> torch.Tensor:
        out = eps_fn(x_in.to(x0.dtype), timesteps, rows)
        return _x0_eps(out, x_in, a_src, prediction_type)[1]

    x = x0.to(_work_dtype(x0)).clone()
    for k in range(num_steps):
        rows = active[k].nonzero().view(-1)
        if rows.numel() == 0:
            break  # active rows are a prefix of the grid for every sample: nobody runs a later step
        x_src = x[rows]
        a_src = _alpha_bar(alphas_cumprod, source[k, rows], x_src, a_init)
        a_dst = _alpha_bar(alphas_cumprod, destination[k, rows], x_src)
        timesteps = unet_timestep[k, rows]
        eps = eps_of(x_src, rows, timesteps, a_src)
        x_dst = _ddim_move(eps, x_src, a_src, a_dst)
        if renoise:
            eps_renoised = eps_of(x_dst, rows, timesteps, a_src)
            x_dst = _ddim_move((eps + eps_renoised) / 2, x_src, a_src, a_dst)
        if eta > 0:
            sigma = _sigma(a_dst, a_src, 1.0)  # √((1−ᾱ_s)/(1−ᾱ_d)·(1−ᾱ_d/ᾱ_s))
            x_dst = x_dst + eta * sigma * noise[k, rows].to(device=x_dst.device, dtype=x_dst.dtype)
        x[rows] = x_dst
    return x.to(x0.dtype)


def implied_noise(x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor | int, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The noise target of inversion methods: τ = (x̃ − √ᾱ_t·x_0)/√(1−ᾱ_t), the ε that the forward identity
    x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε assigns to the inverted latent x̃ at the TRAINING level t (InPO train.py
    L1012-1014, SmPO L1025-1027). Computed at t even where x̃ sits at another level (semantics="official" of
    `invert`), as the official code does. Same formula as `pred_eps_from_x0`.
    """
    return pred_eps_from_x0(x0, x_t, t, alphas_cumprod)
