"""Preference sources: Pick-a-Pic parquet, folder + jsonl, the built-in demo set (no model needed)."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from diffalign.data import DataError
from diffalign.data.sources import DemoPairs, FolderJsonl, PickapicParquet, SourceItem, validate_item, write_demo_parquet
from diffalign.toy.scenes import COLOURS, parse_caption


def test_demo_is_deterministic_and_the_winner_matches_the_caption():
    a = list(DemoPairs(12, 32, seed=3).items())
    b = list(DemoPairs(12, 32, seed=3).items())
    assert [(x.caption, x.images, x.label) for x in a] == [(x.caption, x.images, x.label) for x in b]
    assert {x.label for x in a} == {0.0, 1.0}  # the winner's slot is randomised
    for item in a:
        colour = np.array(COLOURS[parse_caption(item.caption).colour], dtype=float)
        near = [
            (np.abs(np.asarray(Image.open(io.BytesIO(img)).convert("RGB"), dtype=float) - colour).max(-1) < 40).sum()
            for img in item.images
        ]
        winner = 0 if item.label == 1.0 else 1
        assert near[winner] > 10 and near[1 - winner] == 0, item.caption
    assert list(DemoPairs(12, 32, seed=3).items(5))[0].source_id == "demo:5"


def test_demo_parquet_reads_back_as_the_same_pairs(tmp_path):
    path = write_demo_parquet(tmp_path / "d.parquet", num_pairs=10, image_size=32, seed=1, row_group_size=3)
    src = PickapicParquet(path)
    items = list(src.items())
    demo = list(DemoPairs(10, 32, seed=1).items())
    assert src.count() == 10 and [i.source_id for i in items] == [f"d.parquet:{n}" for n in range(10)]
    assert [(i.caption, i.images, i.label) for i in items] == [(d.caption, d.images, d.label) for d in demo]


def test_pickapic_directory_and_skipping_ahead(tmp_path):
    write_demo_parquet(tmp_path / "data" / "a.parquet", 7, 16, seed=0, row_group_size=2)
    write_demo_parquet(tmp_path / "data" / "sub" / "b.parquet", 5, 16, seed=1, row_group_size=2)
    src = PickapicParquet(tmp_path / "data")
    every = list(src.items())
    assert len(every) == src.count() == 12
    assert every[7].source_id == "sub/b.parquet:0"
    for start in (0, 3, 7, 8, 11, 12):
        assert [i.source_id for i in src.items(start)] == [i.source_id for i in every[start:]]
    assert len(src.digest()) == 64


def test_pickapic_missing_path_and_column(tmp_path):
    with pytest.raises(DataError, match=r"nope\.parquet.*does not exist"):
        PickapicParquet(tmp_path / "nope.parquet")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .parquet files"):
        PickapicParquet(tmp_path / "empty")
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"caption": ["x"], "jpg_0": [b"a"], "label_0": [1.0]}), bad)
    with pytest.raises(DataError, match=r"bad\.parquet.*missing column.*'jpg_1'"):
        PickapicParquet(bad)
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"junk\.parquet.*not a readable parquet"):
        PickapicParquet(junk)


def _write_jsonl(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_folder_items_with_label_ranks_and_scores(tmp_path):
    jsonl = _write_jsonl(
        tmp_path / "prefs.jsonl",
        [
            {"caption": "a", "images": ["x.png", "y.png"], "label": 0.5},
            "",
            {"caption": "b", "images": ["x.png", "y.png", "z.png"], "ranks": [2, 0, 1]},
            {"caption": "c", "images": ["x.png", "y.png", "z.png"], "scores": [0.1, 3, -2]},
        ],
    )
    src = FolderJsonl(tmp_path, "prefs.jsonl")  # found relative to root
    items = list(src.items())
    assert [i.source_id for i in items] == ["prefs.jsonl:1", "prefs.jsonl:3", "prefs.jsonl:4"]
    assert items[0].is_tie and items[1].ranks == [2, 0, 1] and items[2].scores == [0.1, 3.0, -2.0]
    assert items[0].images[0] == tmp_path / "x.png"
    assert src.count() == 3 and [i.caption for i in src.items(2)] == ["c"]
    assert src.digest() == FolderJsonl(tmp_path, jsonl).digest()


@pytest.mark.parametrize(
    "line, match",
    [
        ("{not json", "not valid JSON"),
        ('["a"]', "must be a JSON object"),
        ({"caption": "a", "images": ["x.png", "y.png"]}, "no preference signal"),
        ({"caption": "a", "images": ["x.png"], "label": 1}, "at least 2 images"),
        ({"caption": "a", "images": ["x", "y", "z"], "label": 1}, "exactly 2 images"),
        ({"caption": "a", "images": ["x", "y"], "label": 1.5}, r"in \[0, 1\]"),
        ({"caption": "a", "images": ["x", "y", "z"], "ranks": [0, 1]}, "list of 3 integers"),
        ({"caption": "a", "images": ["x", "y"], "scores": [1, float("nan")]}, "finite"),
        ({"caption": "a", "images": ["../x", "y"], "label": 1}, "without '..'"),
        ({"caption": "a", "images": ["/etc/passwd", "y"], "label": 1}, "relative"),
        ({"caption": "a", "images": ["x", "y"], "label": 1, "colour": 3}, "unknown key"),
        ({"images": ["x", "y"], "label": 1}, "needs 'caption'"),
    ],
)
def test_folder_bad_lines_name_file_and_line(tmp_path, line, match):
    good = {"caption": "ok", "images": ["x.png", "y.png"], "label": 1}
    jsonl = _write_jsonl(tmp_path / "p.jsonl", [good, line])
    src = FolderJsonl(tmp_path, jsonl)
    with pytest.raises(DataError, match=match) as e:
        list(src.items())
    assert f"{jsonl}:2" in str(e.value)
    with pytest.raises(DataError, match=match):
        src.digest()  # the digest pass validates too: errors surface before any encoding


def test_folder_missing_paths(tmp_path):
    with pytest.raises(DataError, match="image folder"):
        FolderJsonl(tmp_path / "nope", "p.jsonl")
    with pytest.raises(DataError, match=r"p\.jsonl.*does not exist"):
        FolderJsonl(tmp_path, "p.jsonl")


def test_validate_item_accepts_ints_and_rejects_bools():
    assert validate_item(SourceItem("s", "c", [b"a", b"b"], label=1)).label == 1.0
    with pytest.raises(DataError, match="label"):
        validate_item(SourceItem("s", "c", [b"a", b"b"], label=True))
