"""The HPDv2 source (`data.source.kind = hpdv2`) on tiny files written in the official format, and through the cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from diffalign.config import ModelConfig, validate_config
from diffalign.data import DataError, LatentPairDataset, prepare_cache
from diffalign.data.sources import Hpdv2Json, open_source
from diffalign.models.loading import load_components

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN = [  # train.json: prompt, the two file names, human_preference with one 1 for the preferred image
    {"human_preference": [1, 0], "prompt": "a red circle on a white background", "image_path": ["00000.jpg", "00001.jpg"]},
    # 'file_path': the key the HPSv2 training code and the dataset card name
    {"human_preference": [0, 1], "prompt": "a blue square on a black background", "file_path": ["00002.jpg", "00003.jpg"]},
    {"human_preference": [1, 0], "prompt": "a green triangle on a gray background", "image_path": ["00004.jpg", "00005.jpg"]},
]
TEST = [  # test.json: prompt, K file names, rank (lower = better), raw_annotations
    {"prompt": "a cat", "image_path": ["00000.jpg", "00001.jpg", "00002.jpg"], "rank": [2, 1, 3],
     "raw_annotations": [{"rank": [2, 1, 3], "user_hash": "u1"}]},
    {"prompt": "a dog", "image_path": ["00003.jpg", "00004.jpg", "00005.jpg"], "rank": [1, 1, 2],
     "raw_annotations": [{"rank": [1, 2, 3], "user_hash": "u2"}]},
]


def _images(folder, n: int = 6, size: int = 40):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size + 8 * i, size + 8 * i, 3), dtype=np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)
    return folder


def _json(path, items):
    path.write_text(json.dumps(items))
    return path


def test_train_items_are_labelled_pairs_and_test_items_ranked_lists(tmp_path):
    root = _images(tmp_path / "train")
    src = Hpdv2Json(_json(tmp_path / "train.json", TRAIN), root)
    items = list(src.items())
    assert [i.source_id for i in items] == ["train.json:0", "train.json:1", "train.json:2"]
    assert [i.label for i in items] == [1.0, 0.0, 1.0] and all(i.ranks is None for i in items)
    assert items[1].images == [root / "00002.jpg", root / "00003.jpg"] and items[1].caption == "a blue square on a black background"
    assert src.count() == 3 and [i.source_id for i in src.items(2)] == ["train.json:2"]
    assert src.describe()["kind"] == "hpdv2"

    test = Hpdv2Json(_json(tmp_path / "test.json", TEST), _images(tmp_path / "test"))
    ranked = list(test.items())
    assert [i.ranks for i in ranked] == [[1, 0, 2], [0, 0, 1]]  # 0 = best, equal ranks tie (the folder source's convention)
    assert all(i.label is None and i.k == 3 for i in ranked)


def test_config_opens_the_source_and_the_digest_follows_the_images(tmp_path):
    root = _images(tmp_path)
    _json(tmp_path / "train.json", TRAIN)
    cfg = validate_config({"data": {"source": {"kind": "hpdv2", "path": "train.json", "root": str(root)}}})
    src = open_source(cfg.data.source, cfg)  # a relative path is found under the root too
    assert isinstance(src, Hpdv2Json) and src.path == tmp_path / "train.json"
    assert all(p.is_file() for i in src.items() for p in i.images)
    before = src.digest()
    Image.new("RGB", (7, 7)).save(root / "00001.jpg")
    assert Hpdv2Json(tmp_path / "train.json", root).digest() != before


@pytest.mark.parametrize(
    "item, match",
    [
        ("not an object", "must be a JSON object"),
        ({"human_preference": [1, 0], "image_path": ["a.jpg", "b.jpg"]}, "needs 'prompt'"),
        ({"prompt": "p", "human_preference": [1, 0]}, "exactly one of 'image_path' or 'file_path'"),
        ({"prompt": "p", "human_preference": [1, 0], "image_path": ["a", "b"], "file_path": ["a", "b"]}, "exactly one of 'image_path'"),
        ({"prompt": "p", "image_path": ["a.jpg", "b.jpg"]}, "exactly one of 'human_preference'"),
        ({"prompt": "p", "image_path": ["a.jpg", "b.jpg"], "human_preference": [1, 0], "rank": [1, 2]}, "exactly one of 'human_preference'"),
        ({"prompt": "p", "image_path": ["a.jpg", "b.jpg"], "human_preference": [1, 1]}, r"\[1, 0\] or \[0, 1\]"),
        ({"prompt": "p", "image_path": ["a.jpg", "b.jpg"], "human_preference": [True, False]}, r"\[1, 0\] or \[0, 1\]"),
        ({"prompt": "p", "image_path": ["a", "b", "c"], "human_preference": [1, 0, 0]}, "of 2 images"),
        ({"prompt": "p", "image_path": ["a", "b", "c"], "rank": [1, 2]}, "list of 3 numbers"),
        ({"prompt": "p", "image_path": ["a", "b"], "rank": [1, "x"]}, "list of 2 numbers"),
        ({"prompt": "p", "image_path": ["a.jpg"], "rank": [1]}, "at least 2 image file names"),
        ({"prompt": "p", "image_path": ["../a.jpg", "b.jpg"], "human_preference": [1, 0]}, "without '..'"),
        ({"prompt": "p", "image_path": ["/etc/a.jpg", "b.jpg"], "human_preference": [1, 0]}, "relative"),
        ({"prompt": "p", "image_path": ["a", "b"], "human_preference": [1, 0], "score": 3}, "unknown key"),
    ],
)
def test_malformed_item_names_file_and_item(tmp_path, item, match):
    path = _json(tmp_path / "train.json", [TRAIN[0], item])
    src = Hpdv2Json(path, _images(tmp_path / "imgs", n=2))
    with pytest.raises(DataError, match=match) as e:
        list(src.items())
    assert f"{path}: item 1" in str(e.value)
    with pytest.raises(DataError, match=match):
        src.digest()  # the digest pass validates every item: errors surface before any encoding


def test_unreadable_files(tmp_path):
    root = _images(tmp_path / "imgs", n=2)
    with pytest.raises(DataError, match="data.source.root"):
        Hpdv2Json(tmp_path / "train.json", tmp_path / "nope")
    with pytest.raises(DataError, match=r"data.source.path.*train\.json.*does not exist"):
        Hpdv2Json(tmp_path / "train.json", root)
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(DataError, match=r"bad\.json: not valid JSON"):
        Hpdv2Json(tmp_path / "bad.json", root).count()
    _json(tmp_path / "obj.json", {"prompt": "p"})
    with pytest.raises(DataError, match=r"obj\.json: expected a JSON list"):
        list(Hpdv2Json(tmp_path / "obj.json", root).items())


@pytest.fixture(scope="module")
def sdxl():
    return load_components(ModelConfig(pretrained="builtin:tiny-sdxl"))


def _cfg(tmp_path, path, root, **data):
    return validate_config({"model": {"pretrained": "builtin:tiny-sdxl"},
                            "data": {"source": {"kind": "hpdv2", "path": str(path), "root": str(root)}, "cache_dir": str(tmp_path / "cache"),
                                     "resolution": 32, "shard_size": 2, "latent_dtype": "float32", "decode_workers": 1, **data}})


def test_cache_from_train_json_skips_and_counts_a_missing_image(tmp_path, sdxl):
    root = _images(tmp_path / "train")
    (root / "00003.jpg").unlink()  # item 1's second image
    cfg = _cfg(tmp_path, _json(tmp_path / "train.json", TRAIN), root, scores=["toy-checklist"])  # scoring skips the same item
    with pytest.warns(UserWarning, match="train.json:1"):
        prepare_cache(cfg, sdxl, progress=False)
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["counts"]["items"] == 2 and manifest["counts"]["skipped"] == 1
    assert manifest["skipped"][0]["source_id"] == "train.json:1" and "not found" in manifest["skipped"][0]["reason"]
    ds = LatentPairDataset(cfg.data.cache_dir, cfg.data)
    assert [int(ds[i]["item_id"]) for i in range(len(ds))] == [0, 2]
    assert [ds[i]["pair"].tolist() for i in range(len(ds))] == [[0, 1], [0, 1]]  # both kept items prefer image 0
    assert ds.extra_scores["toy-checklist"].shape == (2, 2) and np.isfinite(ds.extra_scores["toy-checklist"]).all()


def test_cache_from_test_json_keeps_the_ranks(tmp_path, sdxl):
    cfg = _cfg(tmp_path, _json(tmp_path / "test.json", TEST), _images(tmp_path / "test"))
    prepare_cache(cfg, sdxl, progress=False)
    ds = LatentPairDataset(cfg.data.cache_dir, cfg.data)
    assert ds.k == 3 and [ds[i]["ranks"].tolist() for i in range(len(ds))] == [[1, 0, 2], [0, 0, 1]]
    assert [ds[i]["pair"].tolist() for i in range(len(ds))] == [[1, 2], [0, 2]]  # best against worst
