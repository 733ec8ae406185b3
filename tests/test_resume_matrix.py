"""The resume matrix (reliability item 4): data workers 0/2 × gradient accumulation 1/4, each run split in three
(a mid-epoch stop, then a stop after the epoch boundary, resumed twice) ends bit-identical to the straight run, with
the same shuffled order across the boundary (the logged losses of every step match).

Runs are forked from this process (libraries imported) on one thread; the cache is prepared once.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import tiny_config, write_config
from test_random_kills import _assert_same

from diffalign.cli import main

PAIRS = 24  # the demo parquet: 12 optimizer steps per epoch at 2 pairs × accumulation 1, 3 at accumulation 4


def _train(path) -> None:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            torch.set_num_threads(1)
            code = main(["train", str(path)])
        finally:
            os._exit(code)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


@pytest.fixture(scope="module")
def cache(tmp_path_factory, demo_parquet):
    tmp = tmp_path_factory.mktemp("matrix")
    path = write_config(tmp / "prepare.yaml", tiny_config(tmp, parquet=demo_parquet, pretrained="builtin:tiny-sd15"))
    assert main(["prepare", str(path)]) == 0
    return tmp / "cache"


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("accum, stops", [(1, (5, 14, 16)), (4, (2, 4, 5))])
def test_split_runs_equal_the_straight_run(tmp_path, demo_parquet, cache, workers, accum, stops):
    def config(name: str, steps: int):
        cfg = tiny_config(tmp_path, parquet=demo_parquet, pretrained="builtin:tiny-sd15", data={"caption_dropout": 0.2})
        cfg["data"]["cache_dir"] = str(cache)
        cfg["train"].update(max_steps=steps, grad_accum=accum, dataloader_workers=workers, checkpoint_every=0, resume="latest",
                            output_dir=str(tmp_path / name))
        return write_config(tmp_path / f"{name}-{steps}.yaml", cfg)

    assert stops[0] < PAIRS // (2 * accum) < stops[1]  # the first stop is mid-epoch, the second after the boundary
    _train(config("straight", stops[-1]))
    for steps in stops:
        _train(config("split", steps))
    _assert_same(tmp_path / "straight", tmp_path / "split")
