"""Evaluation prompt sets (PartiPrompts shipped; HPDv2 and DrawBench from a local copy) and the HPSv2
benchmark protocol."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.data.errors import DataError
from diffalign.eval.prompts import drawbench, hpdv2_benchmark, hpsv2_benchmark, parti_prompts


def test_parti_prompts_ship_with_their_categories_and_challenges():
    rows = parti_prompts()
    assert len(rows) == 1632
    assert len({r.category for r in rows}) == 12 and len({r.challenge for r in rows}) == 11
    animals = parti_prompts(category="Animals")
    assert len(animals) == 314 and all(r.category == "Animals" for r in animals)
    assert 0 < len(parti_prompts(category="Animals", challenge="Quantity")) < 314
    with pytest.raises(DataError, match="no category 'Animal'; categories: Abstract, Animals"):
        parti_prompts(category="Animal")


def test_hpdv2_and_drawbench_load_from_a_local_copy(tmp_path):
    bench = tmp_path / "benchmark"
    bench.mkdir()
    for style in ("anime", "photo"):
        (bench / f"{style}.json").write_text(json.dumps([f"{style} prompt {i}" for i in range(3)]))
    (tmp_path / "drawbench.json").write_text(json.dumps(["a red cube"]))
    assert hpdv2_benchmark(tmp_path, ["anime", "photo"])["photo"][2] == "photo prompt 2"
    assert drawbench(tmp_path) == ["a red cube"]
    with pytest.raises(DataError, match="no concept-art.json under"):
        hpdv2_benchmark(tmp_path)
    with pytest.raises(DataError, match="unknown HPDv2 style"):
        hpdv2_benchmark(tmp_path, ["cartoon"])


class MeanPixel:
    """A stand-in scorer: the image's mean pixel value / 255 (the protocol does not depend on the model)."""

    def score(self, images, prompts):
        return {"overall": torch.tensor([np.asarray(im.convert("L"), dtype=np.float64).mean() / 255 for im in images])}


def test_hpsv2_protocol_averages_chunks_of_80(tmp_path):
    rng = np.random.default_rng(0)
    prompts = {"anime": [f"p{i}" for i in range(200)], "drawbench": ["d0", "d1", "d2"]}
    values = {}
    for style, texts in prompts.items():
        (tmp_path / style).mkdir()
        values[style] = rng.integers(0, 256, len(texts))
        for i, v in enumerate(values[style]):
            Image.fromarray(np.full((8, 8), v, np.uint8)).save(tmp_path / style / f"{i:05d}.png")
            (tmp_path / style / f"{i:05d}.png").rename(tmp_path / style / f"{i:05d}.jpg")  # lossless pixels, the official name
    table = hpsv2_benchmark(tmp_path, prompts, MeanPixel(), batch_size=64)
    s = 100 * values["anime"] / 255
    chunks = [s[:80].mean(), s[80:160].mean(), s[160:].mean()]
    assert table["anime"]["mean"] == pytest.approx(np.mean(chunks)) and table["anime"]["std"] == pytest.approx(np.std(chunks))
    assert table["drawbench"] == {"mean": pytest.approx(100 * values["drawbench"].mean() / 255), "images": 3}
    assert table["Average"]["mean"] == pytest.approx(s.mean()) and table["Average"]["images"] == 200
    (tmp_path / "anime" / "00007.jpg").unlink()
    with pytest.raises(DataError, match="1 of 200 anime images missing"):
        hpsv2_benchmark(tmp_path, prompts, MeanPixel())


def test_prompts_cli_writes_parti_with_labels(tmp_path, capsys):
    from diffalign.cli import main

    assert main(["prompts", "parti", "--category", "Vehicles", "--out", str(tmp_path / "p.jsonl")]) == 0
    lines = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(lines) == 104 and set(lines[0]) == {"prompt", "category", "challenge"}
    assert main(["prompts", "hpdv2"]) == 2 and "needs --root DIR" in capsys.readouterr().err
