"""SFT on the preferred image (the Diffusion-DPO paper's baseline): the winner's denoising error, no reference."""

from __future__ import annotations

from typing import ClassVar

from diffalign.config import SFTMethod
from diffalign.objectives import sft_loss
from diffalign.trainers.methods.base import Needs
from diffalign.trainers.methods.denoising import denoising_errors


class SFT:
    name: ClassVar[str] = "sft"
    needs: ClassVar[Needs] = Needs(reference=False)
    progress_keys: ClassVar[tuple[str, ...]] = ("loss", "model_mse")

    def __init__(self, cfg: SFTMethod):
        pass

    def loss(self, models, batch, draws):
        winners = batch.pair().winner[:, None]  # (B, 1)
        err = denoising_errors(models, batch, winners, reference=False).policy[:, 0]
        loss = sft_loss(err)
        return loss, {"loss": loss.detach(), "model_mse": err.detach().mean()}
