"""Diffusion-NPO (Wang et al., ICLR 2025, arXiv:2505.11245): the negative model for classifier-free guidance.

Diffusion-DPO with every pair read the other way round, so the model learns what people *dis*prefer
(G-U-N/Diffusion-NPO, ``DPO-DPO-NPO/train_sd15.py`` L687-689: the official script flips when ``label_0 == 1``
where Diffusion-DPO flips when it is 0). In diffalign's label form the flip is p -> 1 - p
(`diffalign.objectives.pairwise_loss(flip=True)`)::

    L_NPO(θ) = -E log σ( +β/2 · [(e_θ(w) - e_ref(w)) - (e_θ(l) - e_ref(l))] )      (hard pair, w the preferred image)

Ties (label ½) are dropped by `data.ties: drop` (the default); with ``keep`` they train at p = ½, which the flip does
not change. The official script passes Pick-a-Pic ties through as hard pairs in their stored order: not reproduced.
The trained weights are δ, the NPO offset that `diffalign generate --npo` puts into the negative branch of CFG; the
exported `config.yaml` names this method, which marks the weights as a negative model.
"""

from __future__ import annotations

from typing import ClassVar

from diffalign.trainers.methods.dpo import DPO


class NPO(DPO):
    name: ClassVar[str] = "npo"
