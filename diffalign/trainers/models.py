"""`Models`: the view of the networks the loop lends a method, and `Schedule`, the noise schedule it trains on.

A method calls `models.policy(x_t, t, cond)` (with gradients) and `models.reference(x_t, t, cond)` (without:
the same UNet with its LoRA adapters disabled, or the frozen copy made before training for a full fine-tune).
Both take inputs on any device and in any dtype and run under the run's autocast, so a method's forwards never
see LoRA vs full fine-tuning, mixed precision or devices (the batch's preference signals stay on the CPU: a method
moves what it combines with the errors, e.g. `pair.label.to(errors.device)`). `teacher` is filled only when the method's
`Needs` ask for it (an EMA teacher for Self-NPO); asking for one the loop did not build is an error that names the
missing declaration. Online methods get their scorers through the rollout feed (`diffalign.trainers.online`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from diffalign.diffusion import add_noise, training_target
from diffalign.models.lora import adapters_disabled
from diffalign.trainers.batch import Cond


@dataclass(frozen=True)
class Schedule:
    """The training noise schedule: ᾱ_t for t = 0 .. T-1 and what the UNet predicts."""

    alphas_cumprod: torch.Tensor  # (T,) float32, on the CPU
    prediction_type: str  # 'epsilon' or 'v_prediction'

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t·x_0 + √(1-ᾱ_t)·ε."""
        return add_noise(x0, noise, t, self.alphas_cumprod)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the UNet is trained to predict at x_t: ε, or v = √ᾱ_t·ε - √(1-ᾱ_t)·x_0."""
        return training_target(x0, noise, t, self.alphas_cumprod, self.prediction_type)


class Models:
    """What a method may run: the policy, the reference, an optional teacher, and the schedule."""

    def __init__(self, unet, accelerator, schedule: Schedule, dtype: torch.dtype, *, lora: bool, frozen_reference=None,
                 teacher: torch.nn.Module | None = None, attention=contextlib.nullcontext):
        self._unet, self._acc, self._lora, self._frozen = unet, accelerator, lora, frozen_reference
        self.schedule, self.dtype, self._teacher = schedule, dtype, teacher
        self._attention = attention  # a context factory: the SDPA kernel of `model.sdpa_backend` (`diffalign.trainers.speed`)
        self._held = False  # inside `reference_session`: LoRA adapters already off

    @property
    def device(self) -> torch.device:
        return self._acc.device

    def _run(self, unet, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        kw = cond.to(self.device, self.dtype).unet_kwargs()
        with self._acc.autocast(), self._attention():
            return unet(sample=x_t.to(self.device, self.dtype), timestep=t.to(self.device), **kw).sample

    def policy(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The trained UNet's prediction (ε or v), with gradients."""
        if self._held:
            raise RuntimeError("models.policy inside models.reference_session(): the LoRA adapters are off there")
        return self._run(self._unet, x_t, t, cond)

    @contextlib.contextmanager
    def reference_session(self):
        """Hold the reference for many calls (an inversion's sequential UNet calls): with LoRA the adapters go off once for
        all of them instead of off and on around each call; `policy` is refused inside. A no-op for a full fine-tune."""
        if not self._lora or self._held:
            yield
            return
        with adapters_disabled(self._acc.unwrap_model(self._unet)):
            self._held = True
            try:
                yield
            finally:
                self._held = False

    @torch.no_grad()
    def reference(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The reference UNet's prediction, without gradients: adapters disabled (LoRA) or the frozen copy (full)."""
        if self._lora:
            if self._held:  # adapters already off
                return self._run(self._acc.unwrap_model(self._unet), x_t, t, cond)
            with adapters_disabled(self._acc.unwrap_model(self._unet)) as base:
                return self._run(base, x_t, t, cond)
        if self._frozen is None:
            raise RuntimeError("this method declared Needs(reference=False), so the loop built no reference model")
        return self._run(self._frozen, x_t, t, cond)

    @torch.no_grad()
    def teacher(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The EMA teacher's prediction, without gradients (methods with `Needs.teacher_decay`)."""
        if self._teacher is None:
            raise RuntimeError("this method declared no teacher (Needs.teacher_decay), so the loop built none")
        return self._run(self._teacher, x_t, t, cond)
