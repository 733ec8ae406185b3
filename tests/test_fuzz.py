"""The reader and config fuzzing of `tests/fuzz_readers.py` at CI size (200 examples per reader), in a subprocess of
its own so that its peak memory is measured from a clean start. The full size (2,000) is DIFFALIGN_RELIABILITY=full,
or `python -m tests.fuzz_readers --examples 2000` (docs/reliability.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import FULL_RELIABILITY

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = 2000 if FULL_RELIABILITY else 200
MAX_GROWTH_MIB = 200  # reliability.md item 10: memory bounded whatever the header claims


def test_every_reader_raises_only_diffalign_errors_with_bounded_memory():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "tests.fuzz_readers", "--examples", str(EXAMPLES)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=6000 if FULL_RELIABILITY else 600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-6000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(report["examples"]) >= 12 and min(report["examples"].values()) >= EXAMPLES, report
    assert max(report["peak_rss_growth_mib"].values()) < MAX_GROWTH_MIB, report
