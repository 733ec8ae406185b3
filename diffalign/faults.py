"""Fault injection for the kill tests: named points where a write can be interrupted by SIGKILL.

Set ``DIFFALIGN_FAULT="checkpoint.after_files:2"`` (comma-separate several) and the 2nd hit of that point in this
process SIGKILLs it. Points: the checkpoint protocol's (`diffalign.trainers.checkpoint`; ``checkpoint.write.rank<r>``
in rank r's share of a save); the cache build's ``cache.shard_tensors``, ``cache.shard``, ``cache.before_manifest`` and
``scores.shard``; ``generate.image`` and ``generate.batch``; ``score.mid_line`` and ``score.batch`` in the resumable
scoring journal (`diffalign.eval.folderscore`). Without the variable a point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

_fault_hits: Counter[str] = Counter()


def fault_point(name: str) -> None:
    """SIGKILL this process on the n-th hit of ``name`` if ``DIFFALIGN_FAULT`` contains ``name:n``."""
    spec = os.environ.get("DIFFALIGN_FAULT", "").strip()
    if not spec:
        return
    _fault_hits[name] += 1
    for item in spec.split(","):
        point, sep, n = item.strip().rpartition(":")
        if not sep or not n.isdigit():
            raise ValueError(f"DIFFALIGN_FAULT: bad entry {item!r}; expected '<point>:<n>'")
        if point == name and _fault_hits[name] == int(n):
            os.kill(os.getpid(), signal.SIGKILL)
