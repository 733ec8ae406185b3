"""Preference objectives as pure tensor functions (torch only: no model, data or trainer imports).

Each module documents its paper's equation and the official code's convention.
"""

from diffalign.objectives.dense import (
    dense_dpo_loss,
    dense_logit_weight,
    dense_online_logits,
    discounted_timestep_probs,
    listmle_loss,
    step_index,
)
from diffalign.objectives.dpo import LOGIT_LIMIT, DPOLoss, dpo_logits, dpo_loss, effective_label, pairwise_loss
from diffalign.objectives.grpo import clipped_policy_loss, gaussian_mean_kl
from diffalign.objectives.rankdpo import RankDPOLoss, rank_positions, rankdpo_loss, rankdpo_pair_weights
from diffalign.objectives.sft import sft_loss
from diffalign.objectives.smpo import PICKSCORE_HIGH, PICKSCORE_LOW, PICKSCORE_RAW_HIGH, PICKSCORE_RAW_LOW, smpo_loss, smpo_probability

__all__ = [
    "DPOLoss",
    "LOGIT_LIMIT",
    "PICKSCORE_HIGH",
    "PICKSCORE_LOW",
    "PICKSCORE_RAW_HIGH",
    "PICKSCORE_RAW_LOW",
    "RankDPOLoss",
    "clipped_policy_loss",
    "gaussian_mean_kl",
    "dense_dpo_loss",
    "dense_logit_weight",
    "dense_online_logits",
    "listmle_loss",
    "step_index",
    "discounted_timestep_probs",
    "dpo_logits",
    "dpo_loss",
    "effective_label",
    "pairwise_loss",
    "rank_positions",
    "rankdpo_loss",
    "rankdpo_pair_weights",
    "sft_loss",
    "smpo_loss",
    "smpo_probability",
]
