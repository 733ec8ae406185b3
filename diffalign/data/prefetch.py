"""Work a few items ahead in a thread pool, results in input order (image decoding while a model runs)."""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator


def ordered_map(fn: Callable, items: Iterable, workers: int, ahead: int) -> Iterator[tuple]:
    """(x, fn(x)) in input order, computing up to `ahead` results in a thread pool of `workers` threads."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        for x in items:
            pending.append((x, pool.submit(fn, x)))
            if len(pending) >= ahead:
                x0, fut = pending.popleft()
                yield x0, fut.result()
        while pending:
            x0, fut = pending.popleft()
            yield x0, fut.result()
