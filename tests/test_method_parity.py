"""DPO and SFT train what they trained when the method seam landed, on two fixed runs.

The seam was first proven bit-identical to the code before it (commit 7f68979) with sha256 hashes of the trained
parameters; hashes also change with every torch or diffusers release, so the runs are now compared by a fingerprint of
the trained update (`parity_runs.trained_fingerprint`: its norm and 8 fixed projections, recorded at commit ed7c25e):
a change of what is trained moves the projections by O(1), float noise by far less than the tolerance. The runs
(`parity_runs.py`): the built-in demo pairs (K = 2, hard labels) and a K = 4 synthetic cache, each with caption dropout
and accumulation, so the shared draws, the pairing and the objective are all covered.
"""

from __future__ import annotations

import pytest
from parity_runs import trained_fingerprint

AT_THE_SEAM = {
    ("demo", "dpo"): [0.170958, -0.645329, -0.206477, -1.752384, -0.276658, -0.030433, -0.611983, -0.338004, -0.461312],
    ("demo", "sft"): [0.176476, -0.526733, -0.657549, -1.228186, -1.500493, 0.548743, 0.258622, -0.310336, -0.46317],
    ("k4", "dpo"): [0.169234, 1.422379, -0.149158, 3.030743, 0.189955, 1.058439, -0.808659, 1.06092, 0.221391],
    ("k4", "sft"): [0.16635, -0.734707, -1.029884, -0.1911, -1.237916, -2.281211, 0.177799, -1.036729, 0.923485],
}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("run,method", list(AT_THE_SEAM))
def test_trained_update_is_unchanged_since_the_seam(tmp_path_factory, run, method):
    tmp = tmp_path_factory.getbasetemp() / "parity"  # the two methods of a run share its cache
    tmp.mkdir(exist_ok=True)
    norm, *projections = trained_fingerprint(tmp, run, method)
    want_norm, *want = AT_THE_SEAM[(run, method)]
    assert norm == pytest.approx(want_norm, rel=1e-2)
    assert projections == pytest.approx(want, abs=2e-2)
