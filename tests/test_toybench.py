"""`diffalign bench toy` end to end: plumbing on a tiny random model, and the direction on the real toy world.

The toy world's numbers (win-rates on all held-out captions) are a benchmark and live in docs/toy_world.md;
here the CI-size configuration (`QUICK`) shows that Diffusion-DPO moves the toy model toward the preference.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from conftest import shuffle_folder

from diffalign.eval.toybench import QUICK, BenchSettings, markdown_table, run_toy_bench


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


def test_dpo_moves_the_toy_model_toward_the_preference(tmp_path):
    """Aligned mean checklist score above the base model's, on the fixed held-out captions and seeds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        settings = BenchSettings(model="builtin:toy", workdir=tmp_path / "work", **QUICK)
        report = run_toy_bench(settings, tmp_path / "report.json", progress=False)
    finally:
        torch.set_num_threads(threads)  # later tests compare runs bit for bit on one thread
    dpo = report["methods"]["dpo"]
    assert dpo["n"] == 2 * 62 and dpo["prompts"] == 62
    assert dpo["dims"]["overall"] > 0 and dpo["win_rate"] > 0.5, markdown_table(report)

    # `diffalign compare` re-derives the win-rate from the saved folders alone, whatever the file names
    from diffalign.cli import main

    samples = tmp_path / "samples"
    shuffle_folder(samples / "dpo", random.Random(1))
    assert main(["compare", str(samples / "dpo"), str(samples / "base"), "--scorers", "toy-checklist", "--out", str(tmp_path / "cmp"),
                 "--no-progress"]) == 0
    derived = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert derived["pairs"] == dpo["n"] and derived["prompts"] == dpo["prompts"]
    got = derived["scorers"]["toy-checklist"]
    assert [got[k] for k in ("win_rate", "ci_low", "ci_high")] == pytest.approx([dpo[k] for k in ("win_rate", "ci_low", "ci_high")], abs=1e-12)


def test_overrides_can_be_scoped_to_one_method():
    from diffalign.eval.toybench import method_overrides

    given = ("optim.lr=1e-4", "dpo:method.beta=2000", "sft:train.max_steps=5", "data.source.model=a:b")
    assert method_overrides("dpo", given) == ["optim.lr=1e-4", "method.beta=2000", "data.source.model=a:b"]
    assert method_overrides("sft", given) == ["optim.lr=1e-4", "train.max_steps=5", "data.source.model=a:b"]
