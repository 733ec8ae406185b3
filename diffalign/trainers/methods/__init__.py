"""Training methods, one module each, and the name -> method-class table the loop builds from.

`METHODS` holds the same names as `diffalign.config.METHOD_CONFIGS` (a test checks it); each class takes
its config section and declares its `Needs` (`base.py`). docs/adding_a_method.md says what to write.
"""

from __future__ import annotations

from diffalign.trainers.methods.base import Method, Metrics, Needs, OnlineMethod
from diffalign.trainers.methods.dense import Dense
from diffalign.trainers.methods.dense_online import DenseOnline
from diffalign.trainers.methods.dpo import DPO
from diffalign.trainers.methods.grpo import GRPO
from diffalign.trainers.methods.inpo import InPO
from diffalign.trainers.methods.npo import NPO
from diffalign.trainers.methods.pref_grpo import PrefGRPO
from diffalign.trainers.methods.rankdpo import RankDPO
from diffalign.trainers.methods.self_npo import SelfNPO
from diffalign.trainers.methods.sft import SFT
from diffalign.trainers.methods.smpo import SmPO
from diffalign.trainers.methods.tailorpo import TailorPO

METHODS: dict[str, type] = {
    "dpo": DPO,
    "sft": SFT,
    "inpo": InPO,
    "smpo": SmPO,
    "rankdpo": RankDPO,
    "dense": Dense,
    "npo": NPO,
    "self_npo": SelfNPO,
    "pref_grpo": PrefGRPO,
    "grpo": GRPO,
    "dense_online": DenseOnline,
    "tailorpo": TailorPO,
}


def build_method(cfg) -> Method:
    """The method object for a `method` config section."""
    try:
        cls = METHODS[cfg.name]
    except KeyError:
        raise ValueError(f"method {cfg.name!r} has a config class but no trainer (diffalign.trainers.methods.METHODS)") from None
    return cls(cfg)


__all__ = ["METHODS", "Method", "Metrics", "Needs", "OnlineMethod", "build_method"]
