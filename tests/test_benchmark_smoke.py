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


def test_score_throughput_benchmark_runs(tmp_path):
    out = tmp_path / "score.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "score_throughput.py"), "--preset", "tiny", "--images", "8", "--size", "64",
           "--batch-size", "4", "--rounds", "1", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["median_seconds"]) == {"bare", "score"} and result["ratio_score_over_bare"] > 0


def test_scorer_parity_benchmark_finds_the_tensor_paths_close(tmp_path):
    out = tmp_path / "parity.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "scorer_parity.py"), "--per-size", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    families = json.loads(out.read_text())["families"]
    assert len(families) == 4
    for name, gap in families.items():  # resize kernels differ, the transforms must not (a wrong crop or pad is ~0.5)
        assert gap["relative_to_pixel_std"] < 0.1, (name, gap)


def test_method_step_cost_benchmark_runs_and_counts_the_inversion_forwards(tmp_path):
    out = tmp_path / "cost.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "method_step_cost.py"), "--models", "toy", "--batch", "2", "--rounds", "1",
           "--warmup", "0", "--prompts", "4", "--variants", "inpo, inversion_steps 5", "--out", str(out), "--workdir", str(tmp_path / "work")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert out.is_file() and out.with_suffix(".md").is_file()
    assert "inpo" in out.read_text()


def test_npo_cfg_cost_benchmark_runs_every_variant(tmp_path):
    out = tmp_path / "npo.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "npo_cfg_cost.py"), "--rounds", "1", "--warmup", "0", "--steps", "2", "--no-rss",
           "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"plain CFG", "plain CFG (copy)", "NPO-CFG, one UNet", "NPO-CFG, two UNets (official)"}
    one, two = rows["NPO-CFG, one UNet"]["weight_mib"], rows["NPO-CFG, two UNets (official)"]["weight_mib"]
    assert one < 1.1 * rows["plain CFG"]["weight_mib"] < two  # one UNet and two small LoRAs, against a second UNet
