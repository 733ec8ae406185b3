"""The train-step benchmark runs end to end (tiny preset): its numbers live in docs/benchmarks.md, not here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_train_step_benchmark_runs_all_three_variants(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "train_step.py"), "--preset", "tiny", "--steps", "2", "--warmup", "1",
           "--memory", "off", "--out", str(out), "--workdir", str(tmp_path / "work")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["variants"]) == {"ours", "reference", "floor"}
    for v in result["variants"].values():
        assert len(v["ms_all"]) == 2 and all(t > 0 for t in v["ms_all"])
    assert (tmp_path / "bench.md").is_file()
