"""The floor's UNet: a trainer's trained UNet replayed alone, for the benchmarks that time a method against its floor
(`method_step_cost.py`, `online_step_cost.py`).

A copy of the trainer's UNet with its own AdamW (the trainer's weights and moments stay its own), and the inputs of one
of its calls captured once: `forward(unet, rows)` runs any number of rows (the captured ones repeated), under the
trainer's autocast; `reference()` is the reference as a context (LoRA: the copy with its adapters off, once; full: the
trainer's frozen copy); `step()` clips and takes an AdamW step.
"""

from __future__ import annotations

import contextlib
import copy

import torch


class UNetReplay:
    def __init__(self, trainer, sample: tuple):
        from diffalign.models.lora import adapters_disabled

        self.unet = copy.deepcopy(trainer.accelerator.unwrap_model(trainer.unet))
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-6)
        self.frozen, self.lora, self.disabled = trainer.reference, trainer.lora, adapters_disabled
        self.autocast = trainer.accelerator.autocast
        device, dtype = trainer.accelerator.device, trainer.weight_dtype
        x_t, t, cond = sample
        self.x, self.t, self.cond = x_t.to(device, dtype), t.to(device), cond.to(device, dtype)

    def forward(self, unet, rows: int) -> torch.Tensor:
        index = torch.arange(rows) % self.x.shape[0]
        with self.autocast():
            return unet(sample=self.x[index], timestep=self.t[index], **self.cond.select(index).unet_kwargs()).sample

    def train_forward(self, rows: int) -> None:
        """Forward + backward of the trained copy over `rows` rows (a stand-in loss)."""
        self.forward(self.unet, rows).float().pow(2).mean().backward()

    def reference(self):
        """The reference UNet, as a context: the copy with its adapters disabled (LoRA), or the trainer's frozen copy."""
        return self.disabled(self.unet) if self.lora else contextlib.nullcontext(self.frozen)

    def step(self, zero_grad: bool = True) -> None:
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        if zero_grad:
            self.optimizer.zero_grad(set_to_none=True)
