"""`diffalign bench toy` end to end on a small configuration (plumbing; the toy-model numbers live in the docs)."""

from __future__ import annotations

import json

import torch

from diffalign.eval.toybench import BenchSettings, markdown_table, run_toy_bench


def test_bench_runs_end_to_end_and_writes_the_report(tmp_path):
    torch.set_num_threads(1)
    settings = BenchSettings(
        model="builtin:tiny-sdxl", workdir=tmp_path / "work", train_rounds=1, eval_prompts=3, eval_seeds=2,
        num_inference_steps=2, max_steps=2, overrides=("data.source.num_prompts=6", "train.batch_size=2"),
    )
    report = run_toy_bench(settings, tmp_path / "report.json", progress=False)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["methods"].keys() == {"sft", "dpo"}  # SFT is always there as the baseline
    for r in saved["methods"].values():
        assert r["n"] == 6 and r["prompts"] == 3 and 0 <= r["ci_low"] <= r["win_rate"] <= r["ci_high"] <= 1
        assert set(r["dims"]) == {"overall", "alignment", "composition", "quality"}
        assert r["train_seconds"] > 0 and r["eval_seconds"] > 0
    assert set(saved["hashes"]) == {"base_weights", "scorer_config", "held_out_split"}
    assert "| dpo |" in (tmp_path / "report.md").read_text() and markdown_table(report).count("\n") >= 4
    assert (tmp_path / "report.png").is_file()
