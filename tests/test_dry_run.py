"""`diffalign config show` (each value with its source) and `diffalign train --dry-run` (estimates, nothing trained)."""

from __future__ import annotations

import re

import pytest

from diffalign.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def _line(text: str, key: str) -> str:
    found = re.search(rf"^{re.escape(key)}: .*$", text, re.M)
    assert found, f"{key} not shown"
    return found.group(0)


def test_config_show_says_where_each_value_came_from(capsys):
    assert main(["config", "show", "sdxl_dpo", "optim.lr=2e-8"]) == 0
    out = capsys.readouterr().out
    assert _line(out, "optim.lr").endswith("# override") and "2.0e-08" in _line(out, "optim.lr")
    assert _line(out, "optim.warmup_steps").endswith("# yaml") and " 200 " in _line(out, "optim.warmup_steps")
    assert _line(out, "data.seed").endswith("# default")
    assert _line(out, "data.source.path").endswith("# yaml")
    assert out.startswith("# resolved config · yaml: ") and "sdxl_dpo.yaml" in out.splitlines()[0]


def test_dry_run_on_the_official_sdxl_recipe_estimates_and_trains_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the recipe's output and cache dirs are relative: nothing may appear here
    args = ["train", "sdxl_dpo", "model.pretrained=builtin:tiny-sdxl", "model.vae=null", "data.resolution=64", "--dry-run",
            "--dry-run-batches", "2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert _line(out, "model.pretrained").endswith("# override") and _line(out, "model.finetune").endswith("# yaml")
    assert "effective batch  1 per micro-batch x 128 accumulation" in out
    assert re.search(r"learning rate    1\.28e-06 on one process", out)  # 1e-8 x 1 x 128 (scale_lr), one process
    assert "cache            not ready: data.cache_dir: the latent cache at outputs/cache/sdxl_dpo does not exist" in out
    assert "timed on         3 built-in demo pairs at 64 px" in out and "fp16 needs a GPU: timed in fp32" in out
    micro = float(re.search(r"per micro-batch  ([0-9.]+) s", out).group(1))
    update = float(re.search(r"optimizer update ([0-9.]+) s", out).group(1))
    step = float(re.search(r"per step         ([0-9.]+) s", out).group(1))
    assert micro > 0 and step == pytest.approx(128 * micro + update, abs=0.07)  # printed to 3 decimals
    assert re.search(r"peak memory      [0-9.]+ GiB", out) and "nothing was trained or written" in out
    assert list(tmp_path.iterdir()) == []
