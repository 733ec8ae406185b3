"""The EMA teacher of methods that declare `Needs.teacher_decay` (Self-NPO).

A frozen copy of the trained UNet, made before training (so it starts at the policy's initial weights, as the
official ``target_unet``), whose trained parameters follow the policy's after every optimizer update:

    θ_teacher ← d·θ_teacher + (1 − d)·θ            (official Self-NPO ``update_ema(target_unet, unet, 0.999)``)

with a constant decay d, unlike `train.ema`'s warm-up schedule. With LoRA the teacher is a copy of the whole
adapted UNet whose adapter weights follow the policy's (the frozen base is shared in value, not in memory: budget
one more UNet). Checkpoints hold the teacher's trained parameters, so a resumed run continues with the same teacher.
"""

from __future__ import annotations

import copy

import torch

from diffalign.models.quiet import quiet_loading


class EMATeacher:
    def __init__(self, unet: torch.nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"teacher decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.names = [n for n, p in unet.named_parameters() if p.requires_grad]
        with quiet_loading():
            self.unet = copy.deepcopy(unet).requires_grad_(False).eval()

    @torch.no_grad()
    def update(self, unet: torch.nn.Module) -> None:
        """One EMA step toward `unet`'s current trained parameters."""
        policy, own = dict(unet.named_parameters()), dict(self.unet.named_parameters())
        for name in self.names:
            own[name].mul_(self.decay).add_(policy[name].detach().to(own[name].dtype), alpha=1 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        own = dict(self.unet.named_parameters())
        return {name: own[name].detach() for name in self.names}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = dict(self.unet.named_parameters())
        if set(state) != set(self.names):
            raise ValueError(f"teacher parameters differ: missing {sorted(set(self.names) - set(state))[:3]}, "
                             f"unexpected {sorted(set(state) - set(self.names))[:3]}")
        for name, tensor in state.items():
            own[name].copy_(tensor)
