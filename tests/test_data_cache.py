"""The latent-pair cache end to end with the tiny SD1.5/SDXL models: prepare, verify, resume, read."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import diffalign.data.cache as cache_mod
from diffalign.config import ModelConfig, validate_config
from diffalign.data import (
    CacheIncompleteError,
    CacheMismatchError,
    CorruptImageError,
    DataError,
    LatentPairDataset,
    check_cache,
    prepare_cache,
)
from diffalign.data.images import prepare_images
from diffalign.data.shards import read_index
from diffalign.data.sources import PickapicParquet, write_demo_parquet
from diffalign.models.loading import encode_images, encode_prompts, load_components

RES = 32


@pytest.fixture(scope="module")
def sdxl():
    return load_components(ModelConfig(pretrained="builtin:tiny-sdxl"))


@pytest.fixture(scope="module")
def sd15():
    return load_components(ModelConfig(pretrained="builtin:tiny-sd15"))


@pytest.fixture(scope="module")
def demo_parquet(tmp_path_factory):
    return write_demo_parquet(tmp_path_factory.mktemp("demo") / "demo.parquet", num_pairs=24, image_size=40, seed=0, row_group_size=5)


def _cfg(cache_dir, source, model="builtin:tiny-sdxl", **data):
    return validate_config(
        {"model": {"pretrained": model}, "data": {"source": source, "cache_dir": str(cache_dir), "resolution": RES, "shard_size": 8, **data}}
    )


def _pickapic(path) -> dict:
    return {"kind": "pickapic", "path": str(path)}


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _ramp(h: int, w: int, colour: int = 0) -> Image.Image:
    """A horizontal ramp in one channel: a flip is visible after any crop."""
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[..., colour] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    return Image.fromarray(arr)


def _write_pairs(path: Path, rows: list[tuple]) -> Path:
    """rows: (caption, image_0, image_1, label_0) with PIL images or raw bytes -> Pick-a-Pic parquet."""
    enc = lambda x: _png(x) if isinstance(x, Image.Image) else x  # noqa: E731
    table = pa.table(
        {
            "caption": [r[0] for r in rows],
            "jpg_0": pa.array([enc(r[1]) for r in rows], pa.binary()),
            "jpg_1": pa.array([enc(r[2]) for r in rows], pa.binary()),
            "label_0": pa.array([r[3] for r in rows], pa.float64()),
        }
    )
    pq.write_table(table, path)
    return path


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------ shapes & text


@pytest.mark.parametrize("family", ["sdxl", "sd15"])
def test_demo_parquet_to_dataset_shapes(tmp_path, demo_parquet, sdxl, sd15, family):
    comps = sdxl if family == "sdxl" else sd15
    cfg = _cfg(tmp_path / "cache", _pickapic(demo_parquet), model=f"builtin:tiny-{family}")
    root = prepare_cache(cfg, comps, progress=False)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["counts"]["items"] == 24 and manifest["counts"]["k"] == 2 and manifest["counts"]["shards"] == 3
    assert manifest["model"]["family"] == family and manifest["latents"]["resolution"] == RES
    ds = LatentPairDataset(root, cfg.data)
    assert len(ds) == 24
    item = ds[0]
    D = 64 if family == "sdxl" else 32
    assert item["mean"].shape == item["logvar"].shape == (2, 4, 8, 8) and item["mean"].dtype == torch.float32
    assert item["prompt_embeds"].shape == (77, D) and item["time_ids"].shape == (2, 6)
    assert item["item_id"].dtype == torch.int64 and item["item_id"].ndim == 0
    assert item["ranks"].dtype == torch.int64 and item["label"].item() in (0.0, 1.0)
    assert torch.isnan(item["scores"]).all()
    assert ("pooled" in item) == (family == "sdxl")
    assert ds.empty_prompt_embeds.shape == (77, D) and ds.empty_prompt_embeds.dtype == torch.float32
    assert (ds.empty_pooled is not None) == (family == "sdxl")
    batch = torch.utils.data.default_collate([ds[i] for i in range(4)])
    assert batch["mean"].shape == (4, 2, 4, 8, 8) and batch["label"].shape == (4,)
    # label 1 -> [0, 1]; label 0 -> [1, 0]
    for i in range(6):
        it = ds[i]
        assert it["ranks"].tolist() == ([0, 1] if it["label"] == 1 else [1, 0])


def test_text_is_deduplicated_by_caption(tmp_path, demo_parquet, sdxl):
    cfg = _cfg(tmp_path / "cache", _pickapic(demo_parquet))
    root = prepare_cache(cfg, sdxl, progress=False)
    captions = [i.caption for i in PickapicParquet(demo_parquet).items()]
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["counts"]["captions"] == len(set(captions)) < len(captions)
    stored = sum(load_file(str(p)).get("prompt_embeds", torch.zeros(0)).shape[0] for p in (root / "shards").glob("*.safetensors"))
    assert stored == len(set(captions))
    ds = LatentPairDataset(root, cfg.data)
    embeds, pooled = encode_prompts(sdxl, captions)
    for i in range(len(ds)):
        item = ds[i]
        j = int(item["item_id"])
        torch.testing.assert_close(item["prompt_embeds"], embeds[j], atol=2e-3, rtol=2e-3)  # stored in fp16
        torch.testing.assert_close(item["pooled"], pooled[j], atol=2e-3, rtol=2e-3)
    empty, empty_pooled = encode_prompts(sdxl, [""])
    torch.testing.assert_close(ds.empty_prompt_embeds, empty[0], atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(ds.empty_pooled, empty_pooled[0], atol=2e-3, rtol=2e-3)


def test_latents_equal_vae_of_the_decoded_images(tmp_path, sdxl):
    rows = [(f"scene {i}", _ramp(40 + 4 * i, 56, 0), _ramp(64, 44, 1), float(i % 2)) for i in range(5)]
    src = _write_pairs(tmp_path / "p.parquet", rows)
    cfg = _cfg(tmp_path / "cache", _pickapic(src), crop="random", latent_dtype="float32", pairing="per_image", seed=11)
    root = prepare_cache(cfg, sdxl, progress=False)
    ds = LatentPairDataset(root, cfg.data)
    for i, item in enumerate(PickapicParquet(src).items()):
        placed = prepare_images(item.images, item.source_id, resolution=RES, crop="random", random_flip=True, pairing="per_image", seed=11)
        mean, logvar = encode_images(sdxl.vae, torch.stack([p.pixels for p in placed]))
        got = ds[i]
        torch.testing.assert_close(got["mean"], mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["logvar"], logvar, atol=1e-5, rtol=1e-5)
        assert got["time_ids"].tolist() == [[*p.original_size, *p.crop_top_left, RES, RES] for p in placed]


# ------------------------------------------------------------------------------------ pairing & time ids


def test_shared_vs_per_image_crop_and_flip(tmp_path, sdxl):
    rows = [(f"c{i}", _ramp(40, 60, 0), _ramp(40, 60, 2), 1.0) for i in range(16)]
    src = _write_pairs(tmp_path / "p.parquet", rows)
    out = {}
    for pairing in ("shared", "per_image"):
        cfg = _cfg(tmp_path / pairing, _pickapic(src), crop="random", pairing=pairing)
        index = read_index(prepare_cache(cfg, sdxl, progress=False), 2, ["flips", "time_ids"])
        out[pairing] = (index.column("flips").to_pylist(), index.column("time_ids").to_pylist())
    flips, tids = out["shared"]
    assert all(f[0] == f[1] for f in flips) and all(t[0] == t[1] for t in tids)
    assert any(f[0] for f in flips) and not all(f[0] for f in flips)
    flips, tids = out["per_image"]
    assert any(f[0] != f[1] for f in flips) and any(t[0][2:4] != t[1][2:4] for t in tids)


def test_sdxl_time_ids_carry_true_size_and_crop(tmp_path, sdxl):
    # (h, w) = (48, 64) -> resized (32, 43), centre crop left = round(5.5) = 6; (80, 40) -> (64, 32), top = 16
    src = _write_pairs(tmp_path / "p.parquet", [("a", _ramp(48, 64), _ramp(80, 40), 1.0)])
    cfg = _cfg(tmp_path / "cache", _pickapic(src), random_flip=False)
    root = prepare_cache(cfg, sdxl, progress=False)
    assert LatentPairDataset(root, cfg.data)[0]["time_ids"].tolist() == [[48, 64, 0, 6, 32, 32], [80, 40, 16, 0, 32, 32]]
    fixed = LatentPairDataset(root, cfg.data.model_copy(update={"time_ids": "fixed"}))
    assert fixed[0]["time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]] * 2


# ------------------------------------------------------------------------------------ signals & sources


def test_ties_kept_in_cache_dropped_or_kept_by_dataset(tmp_path, sdxl):
    img = _ramp(32, 32)
    src = _write_pairs(tmp_path / "p.parquet", [("a", img, img, 1.0), ("b", img, img, 0.5), ("c", img, img, 0.0), ("d", img, img, 0.5)])
    cfg = _cfg(tmp_path / "cache", _pickapic(src))
    root = prepare_cache(cfg, sdxl, progress=False)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["counts"]["items"] == 4 and manifest["counts"]["ties"] == 2
    dropped = LatentPairDataset(root, cfg.data)
    assert [dropped[i]["label"].item() for i in range(len(dropped))] == [1.0, 0.0]
    kept = LatentPairDataset(root, cfg.data.model_copy(update={"ties": "keep"}))
    assert [kept[i]["label"].item() for i in range(len(kept))] == [1.0, 0.5, 0.0, 0.5]
    assert kept[1]["ranks"].tolist() == [0, 0] and kept[2]["ranks"].tolist() == [1, 0]


def test_folder_source_with_ranks_and_scores(tmp_path, sd15):
    root = tmp_path / "imgs"
    root.mkdir()
    for n, c in enumerate("abc"):
        _ramp(36, 30 + 4 * n, n).save(root / f"{c}.png")
    lines = [
        {"caption": "three", "images": ["a.png", "b.png", "c.png"], "ranks": [2, 0, 1]},
        {"caption": "scored", "images": ["c.png", "a.png", "b.png"], "scores": [0.1, 0.9, 0.5]},
        {"caption": "flat", "images": ["a.png", "b.png", "c.png"], "scores": [1, 1, 0]},
    ]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    cfg = _cfg(tmp_path / "cache", {"kind": "folder", "root": str(root), "jsonl": str(tmp_path / "p.jsonl")}, model="builtin:tiny-sd15")
    ds = LatentPairDataset(prepare_cache(cfg, sd15, progress=False), cfg.data)
    assert len(ds) == 3 and ds.k == 3
    a, b, c = ds[0], ds[1], ds[2]
    assert a["mean"].shape == (3, 4, 8, 8) and a["time_ids"][0].tolist() == [36, 30, 3, 0, 32, 32]  # 36x30 -> 38x32, top = 3
    assert a["ranks"].tolist() == [2, 0, 1] and torch.isnan(a["label"]) and torch.isnan(a["scores"]).all()
    assert b["ranks"].tolist() == [2, 0, 1] and b["scores"].tolist() == pytest.approx([0.1, 0.9, 0.5])
    assert c["ranks"].tolist() == [0, 0, 1]


def test_folder_source_with_labels(tmp_path, sd15):
    root = tmp_path / "imgs"
    root.mkdir()
    _ramp(32, 32, 0).save(root / "w.png")
    _ramp(32, 32, 1).save(root / "l.png")
    (tmp_path / "p.jsonl").write_text(json.dumps({"caption": "x", "images": ["w.png", "l.png"], "label": 0}) + "\n")
    cfg = _cfg(tmp_path / "cache", {"kind": "folder", "root": str(root), "jsonl": str(tmp_path / "p.jsonl")}, model="builtin:tiny-sd15")
    item = LatentPairDataset(prepare_cache(cfg, sd15, progress=False), cfg.data)[0]
    assert item["label"].item() == 0.0 and item["ranks"].tolist() == [1, 0]


def test_k_must_be_constant(tmp_path, sd15):
    root = tmp_path / "imgs"
    root.mkdir()
    _ramp(32, 32).save(root / "a.png")
    lines = [{"caption": "x", "images": ["a.png", "a.png"], "label": 1}, {"caption": "y", "images": ["a.png"] * 3, "ranks": [0, 1, 2]}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    cfg = _cfg(tmp_path / "cache", {"kind": "folder", "root": str(root), "jsonl": str(tmp_path / "p.jsonl")}, model="builtin:tiny-sd15")
    with pytest.raises(DataError, match=r"p\.jsonl:2: has 3 images but earlier items have 2"):
        prepare_cache(cfg, sd15, progress=False)


# ------------------------------------------------------------------------------------ hostile data & errors


def _with_corrupt_row(tmp_path) -> Path:
    good = _ramp(32, 32)
    jpeg = io.BytesIO()
    good.save(jpeg, format="JPEG")
    rows = [(f"c{i}", good, good, 1.0) for i in range(4)]
    rows[2] = ("broken", good, jpeg.getvalue()[:200], 0.0)  # truncated JPEG
    return _write_pairs(tmp_path / "p.parquet", rows)


def test_corrupt_image_skipped_and_counted(tmp_path, sdxl):
    cfg = _cfg(tmp_path / "cache", _pickapic(_with_corrupt_row(tmp_path)))
    with pytest.warns(UserWarning, match=r"skipping p\.parquet:2"):
        root = prepare_cache(cfg, sdxl, progress=False)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["counts"]["items"] == 3 and manifest["counts"]["skipped"] == 1
    assert manifest["skipped"][0]["source_id"] == "p.parquet:2" and "cannot decode" in manifest["skipped"][0]["reason"]
    ds = LatentPairDataset(root, cfg.data)
    assert [int(ds[i]["item_id"]) for i in range(len(ds))] == [0, 1, 3]


def test_corrupt_image_fatal_under_error_policy(tmp_path, sdxl):
    cfg = _cfg(tmp_path / "cache", _pickapic(_with_corrupt_row(tmp_path)), corrupt_images="error")
    with pytest.raises(CorruptImageError, match=r"p\.parquet:2 image 1"):
        prepare_cache(cfg, sdxl, progress=False)


def test_missing_parquet_column_and_empty_dataset(tmp_path, sdxl):
    with pytest.raises(DataError, match=r"missing\.parquet.*does not exist"):
        prepare_cache(_cfg(tmp_path / "c1", _pickapic(tmp_path / "missing.parquet")), sdxl, progress=False)
    pq.write_table(pa.table({"caption": ["x"], "jpg_0": [b"x"], "jpg_1": [b"y"]}), tmp_path / "nolabel.parquet")
    with pytest.raises(DataError, match=r"nolabel\.parquet.*missing column.*'label_0'"):
        prepare_cache(_cfg(tmp_path / "c2", _pickapic(tmp_path / "nolabel.parquet")), sdxl, progress=False)
    empty = _write_pairs(tmp_path / "empty.parquet", [])
    with pytest.raises(DataError, match="no usable items.*0 read"):
        prepare_cache(_cfg(tmp_path / "c3", _pickapic(empty)), sdxl, progress=False)
    allbad = _write_pairs(tmp_path / "allbad.parquet", [("x", b"junk", b"junk", 1.0)])
    with pytest.warns(UserWarning), pytest.raises(DataError, match="no usable items.*1 skipped"):
        prepare_cache(_cfg(tmp_path / "c4", _pickapic(allbad)), sdxl, progress=False)


def test_mismatched_cache_is_refused_naming_the_field(tmp_path, demo_parquet, sdxl, monkeypatch):
    cfg = _cfg(tmp_path / "cache", _pickapic(demo_parquet), max_items=6)
    prepare_cache(cfg, sdxl, progress=False)
    assert check_cache(cfg, sdxl)["counts"]["items"] == 6
    # a complete matching cache: prepare is a no-op that loads no model
    monkeypatch.setattr(cache_mod, "load_components", lambda *_: pytest.fail("must not load a model"))
    before = _files(tmp_path / "cache")
    assert prepare_cache(cfg, progress=False) == tmp_path / "cache"
    assert _files(tmp_path / "cache") == before

    other = _cfg(tmp_path / "cache", _pickapic(demo_parquet), max_items=6, resolution=16, crop="random")
    for call in (lambda: check_cache(other), lambda: prepare_cache(other, sdxl, progress=False)):
        with pytest.raises(CacheMismatchError) as e:
            call()
        assert "data.resolution: cache has 32, config asks 16" in str(e.value)
        assert "data.crop: cache has 'center', config asks 'random'" in str(e.value)
    with pytest.raises(CacheMismatchError, match="model.family: cache has 'sdxl'"):
        check_cache(_cfg(tmp_path / "cache", _pickapic(demo_parquet), max_items=6, model="builtin:tiny-sd15"), load_sd15())
    with pytest.raises(CacheMismatchError, match="data.resolution: cache has 32, config asks 16"):
        LatentPairDataset(tmp_path / "cache", other.data)
    # another source (different bytes) is a different cache
    moved = write_demo_parquet(tmp_path / "other.parquet", num_pairs=6, image_size=40, seed=9)
    with pytest.raises(CacheMismatchError, match="data.source.digest"):
        check_cache(_cfg(tmp_path / "cache", _pickapic(moved), max_items=6))
    # ties / time_ids / caption dropout only change how the cache is read
    check_cache(_cfg(tmp_path / "cache", _pickapic(demo_parquet), max_items=6, ties="keep", time_ids="fixed", caption_dropout=0.1))


# every key input of the cache identity, changed alone: the change that makes it differ -> the field named in the refusal
_KEY_INPUT_CHANGES = {
    "model.pretrained": {"model": {"pretrained": "builtin:tiny-sd15"}},
    "model.revision": {"model": {"revision": "v2"}},
    "model.variant": {"model": {"variant": "fp16"}},
    "model.vae": {"model": {"vae": "org/another-vae"}},
    "model.weights": {"vae_bytes": b"another vae"},
    "data.resolution": {"resolution": 16},
    "data.resize": {"resize": "official"},
    "data.crop": {"crop": "random"},
    "data.random_flip": {"random_flip": True},
    "data.flip_at": {"random_flip": True, "flip_at": "train"},
    "data.pairing": {"pairing": "per_image"},
    "data.seed": {"seed": 7},
    "data.latent_dtype": {"latent_dtype": "float32"},
    "data.max_items": {"max_items": 5},
    "data.source.kind": {"source": "folder"},
    "data.source.digest": {"source": "other parquet"},
}


def test_every_key_input_of_the_cache_is_checked(tmp_path, demo_parquet, sdxl):
    """Our adaptation of per-entry cache invalidation: a cache is refused whole when any key input differs, and the
    refusal names that input. The table above must cover every field of the identity (format_version: see
    test_data_synthetic's old-format test). The model is a local folder, so its refs and files can change."""
    from diffalign.data.manifest import expected_identity

    model = tmp_path / "model"
    (model / "vae").mkdir(parents=True)
    (model / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"the vae")
    images = tmp_path / "imgs"
    images.mkdir()
    _ramp(32, 32).save(images / "a.png")
    _ramp(32, 32, 1).save(images / "b.png")
    (tmp_path / "p.jsonl").write_text(json.dumps({"caption": "x", "images": ["a.png", "b.png"], "label": 0}) + "\n")
    sources = {
        None: _pickapic(demo_parquet),
        "folder": {"kind": "folder", "root": str(images), "jsonl": str(tmp_path / "p.jsonl")},
        "other parquet": _pickapic(write_demo_parquet(tmp_path / "other.parquet", num_pairs=6, image_size=40, seed=9)),
    }

    def config(model_fields=None, source=None, **data):
        data = {"source": sources[source], "cache_dir": str(tmp_path / "cache"), "resolution": RES, "shard_size": 8,
                "max_items": 6, "random_flip": False, **data}
        return validate_config({"model": {"pretrained": str(model), **(model_fields or {})}, "data": data})

    prepare_cache(config(), sdxl, progress=False)  # the tiny SDXL's components, filed under the local folder's identity
    assert set(_KEY_INPUT_CHANGES) | {"format_version"} >= set(expected_identity(config(), None))
    for field, change in _KEY_INPUT_CHANGES.items():
        change = dict(change)
        vae_bytes = change.pop("vae_bytes", None)
        if vae_bytes is not None:
            (model / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(vae_bytes)
        with pytest.raises(CacheMismatchError, match=f"{field}: cache has"):
            check_cache(config(change.pop("model", None), **change))
        (model / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"the vae")
    check_cache(config())  # and the unchanged config still matches


def load_sd15():
    return load_components(ModelConfig(pretrained="builtin:tiny-sd15"))


def test_missing_or_unfinished_cache_is_refused(tmp_path, demo_parquet, sdxl, monkeypatch):
    cfg = _cfg(tmp_path / "cache", _pickapic(demo_parquet))
    with pytest.raises(CacheIncompleteError, match="does not exist"):
        check_cache(cfg)
    with pytest.raises(CacheIncompleteError):
        LatentPairDataset(tmp_path / "cache", cfg.data)
    _interrupt_after_first_shard(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        prepare_cache(cfg, sdxl, progress=False)
    with pytest.raises(CacheIncompleteError, match="unfinished"):
        check_cache(cfg)
    # resuming with other settings is refused, naming the field
    with pytest.raises(CacheMismatchError, match="data.shard_size: cache has 8, config asks 4"):
        prepare_cache(_cfg(tmp_path / "cache", _pickapic(demo_parquet), shard_size=4), sdxl, progress=False)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not a diffalign cache"):
        prepare_cache(_cfg(tmp_path / "foreign", _pickapic(demo_parquet)), sdxl, progress=False)


# ------------------------------------------------------------------------------------ resume


def _interrupt_after_first_shard(monkeypatch, leave_orphan: bool = True):
    """The second shard dies after writing its tensors but before its index (the commit marker)."""
    real = cache_mod.write_shard
    calls = []

    def flaky(root, shard, tensors, rows, meta):
        calls.append(shard)
        if len(calls) == 2:
            if leave_orphan:
                from diffalign.data.shards import tensors_path
                from diffalign.io import save_safetensors

                save_safetensors(tensors_path(root, shard), tensors)
            raise KeyboardInterrupt("simulated kill")
        return real(root, shard, tensors, rows, meta)

    monkeypatch.setattr(cache_mod, "write_shard", flaky)
    return calls


def test_interrupted_build_resumes_to_an_identical_cache(tmp_path, demo_parquet, sdxl, monkeypatch):
    full = prepare_cache(_cfg(tmp_path / "full", _pickapic(demo_parquet), crop="random"), sdxl, progress=False)
    cfg = _cfg(tmp_path / "resumed", _pickapic(demo_parquet), crop="random")
    with monkeypatch.context() as m:
        calls = _interrupt_after_first_shard(m)
        with pytest.raises(KeyboardInterrupt):
            prepare_cache(cfg, sdxl, progress=False)
        assert calls == [0, 1]
    root = Path(cfg.data.cache_dir)
    assert (root / "shards" / "00000.parquet").exists() and not (root / "manifest.json").exists()
    written = []
    real = cache_mod.write_shard
    monkeypatch.setattr(cache_mod, "write_shard", lambda r, s, *a: (written.append(s), real(r, s, *a)))
    prepare_cache(cfg, sdxl, progress=False)
    assert written == [1, 2]  # shard 0 was kept, not rebuilt
    assert _files(root) == _files(full)  # byte-identical: tensors, index, manifest
    a, b = LatentPairDataset(root, cfg.data), LatentPairDataset(full, cfg.data)
    for i in range(len(a)):
        x, y = a[i], b[i]
        x.update(x.pop("extra_scores")), y.update(y.pop("extra_scores"))  # per-scorer scores: one more tensor each
        assert x.keys() == y.keys()
        for key, value in x.items():
            assert torch.equal(value, y[key]) or (torch.isnan(value).all() and torch.isnan(y[key]).all()), key


def test_dataset_in_dataloader_workers(tmp_path, demo_parquet, sdxl):
    cfg = _cfg(tmp_path / "cache", _pickapic(demo_parquet), max_items=8)
    ds = LatentPairDataset(prepare_cache(cfg, sdxl, progress=False), cfg.data)
    ds[0]  # open a handle in the parent; workers must not inherit it
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    batches = list(loader)
    assert [b["item_id"].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert batches[0]["pooled"].shape == (4, 32)
    torch.testing.assert_close(batches[1]["mean"][0], ds[4]["mean"])


def test_shard_handles_are_bounded(tmp_path, demo_parquet, sdxl, monkeypatch):
    import diffalign.data.dataset as dataset_mod

    cfg = _cfg(tmp_path / "cache", _pickapic(demo_parquet))
    ds = LatentPairDataset(prepare_cache(cfg, sdxl, progress=False), cfg.data)
    first = [ds[i]["mean"] for i in range(len(ds))]
    monkeypatch.setattr(dataset_mod, "MAX_OPEN_SHARDS", 1)
    fresh = LatentPairDataset(tmp_path / "cache", cfg.data)
    for i in (0, 23, 8, 1, 16, 0):
        assert torch.equal(fresh[i]["mean"], first[i])
        assert len(fresh._handles) <= 1


def test_unreadable_source_is_checked_by_its_config(tmp_path, sdxl):
    src = write_demo_parquet(tmp_path / "d.parquet", num_pairs=3, image_size=32, seed=0)
    cfg = _cfg(tmp_path / "cache", _pickapic(src))
    prepare_cache(cfg, sdxl, progress=False)
    src.rename(tmp_path / "elsewhere.parquet")  # training machine without the raw data
    with pytest.warns(UserWarning, match="checked by description only"):
        assert check_cache(cfg)["counts"]["items"] == 3
    with pytest.warns(UserWarning), pytest.raises(CacheMismatchError, match="data.source.config"):
        check_cache(_cfg(tmp_path / "cache", _pickapic(tmp_path / "gone.parquet")))


def test_local_model_weights_are_part_of_the_identity(tmp_path):
    from diffalign.data.identity import weights_digest

    model = tmp_path / "model"
    for sub, name in [("vae", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors"), ("unet", "u.safetensors")]:
        (model / sub).mkdir(parents=True)
        (model / sub / name).write_bytes(b"weights of " + sub.encode())
    d0 = weights_digest(ModelConfig(pretrained=str(model)))
    (model / "unet" / "u.safetensors").write_bytes(b"new unet")  # the cache does not depend on the UNet
    assert weights_digest(ModelConfig(pretrained=str(model))) == d0
    (model / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"another vae")
    assert weights_digest(ModelConfig(pretrained=str(model))) != d0
    assert weights_digest(ModelConfig(pretrained="org/model", revision="abc")) == "hub:org/model@abc"
