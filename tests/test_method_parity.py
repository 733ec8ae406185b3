"""DPO and SFT through the method seam give bit-identical parameters to the code before it (commit 7f68979).

The hashes were recorded by running `python tests/parity_runs.py` on that commit; the runs are described in
`parity_runs.py`: the built-in demo pairs (K = 2, hard labels) and a K = 4 synthetic cache, each with caption
dropout and accumulation, so the shared draws, the pairing and the objective are all covered.
"""

from __future__ import annotations

import pytest
from parity_runs import trained_hash

BEFORE_THE_SEAM = {
    ("demo", "dpo"): "e662f9d27354838a",
    ("demo", "sft"): "ab7346351755b15e",
    ("k4", "dpo"): "d287709dd66e1652",
    ("k4", "sft"): "5d45446311cae487",
}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("run,method", list(BEFORE_THE_SEAM))
def test_trained_parameters_are_unchanged_by_the_seam(tmp_path_factory, run, method):
    tmp = tmp_path_factory.getbasetemp() / "parity"  # the two methods of a run share its cache
    tmp.mkdir(exist_ok=True)
    assert trained_hash(tmp, run, method) == BEFORE_THE_SEAM[(run, method)]
