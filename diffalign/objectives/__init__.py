"""Preference objectives as pure tensor functions (torch only: no model, data or trainer imports).

Each module documents its paper's equation and the official code's convention.
"""

from diffalign.objectives.dpo import DPOLoss, dpo_loss
from diffalign.objectives.sft import sft_loss

__all__ = ["DPOLoss", "dpo_loss", "sft_loss"]
