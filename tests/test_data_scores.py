"""Reward scores of an existing cache (`data.scores`): scored from the source images, stored beside the latents per
scorer and shard, resumable, refused when they do not match the configured scorer (tiny-sdxl, demo parquet)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny_scorers import write_aesthetic_mlp, write_clip_folder

import diffalign.data.scores as scores_mod
from diffalign.config import ConfigError, ModelConfig, validate_config
from diffalign.data import CacheIncompleteError, CacheMismatchError, LatentPairDataset, prepare_cache
from diffalign.data.images import open_image
from diffalign.data.scores import SUMMARY, score_path, scorer_dir
from diffalign.data.sources import PickapicParquet
from diffalign.models.loading import load_components
from diffalign.scorers.registry import REGISTRY, Entry, ScorerConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

SHARDS = 4  # 16 demo pairs, 4 per shard


@pytest.fixture(scope="module")
def sdxl():
    return load_components(ModelConfig(pretrained="builtin:tiny-sdxl"))


@pytest.fixture(scope="module")
def aesthetic(tmp_path_factory):
    """Tiny LAION-aesthetic weights in the official layout: a second, weighted scorer."""
    folder = tmp_path_factory.mktemp("aesthetic")
    write_clip_folder(folder / "clip", tokenizer=False)
    return {"path": str(write_aesthetic_mlp(folder / "mlp.pth", input_dim=16)), "clip": str(folder / "clip")}


@pytest.fixture(scope="module")
def latents(tmp_path_factory, demo_parquet, sdxl):
    """A complete cache without scores, copied by each test that scores it."""
    root = tmp_path_factory.mktemp("latents") / "cache"
    prepare_cache(_cfg(root, demo_parquet), sdxl, progress=False)
    return root


def _cfg(cache_dir, parquet, **data):
    return validate_config({"model": {"pretrained": "builtin:tiny-sdxl"},
                            "data": {"source": {"kind": "pickapic", "path": str(parquet)}, "cache_dir": str(cache_dir), "resolution": 32,
                                     "shard_size": 4, "latent_dtype": "float32", "decode_workers": 1, "score_batch_size": 6, **data}})


def _copy(latents, tmp_path) -> Path:
    return Path(shutil.copytree(latents, tmp_path / "cache"))


def _files(folder: Path) -> dict[str, tuple[str, int]]:
    """relative path -> (sha256, mtime_ns) of every file under `folder`."""
    return {p.relative_to(folder).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _direct(parquet, scorer) -> np.ndarray:
    """(items, 2) 'overall' scores of the source images scored directly, as stored (the reference)."""
    out = []
    for item in PickapicParquet(parquet).items():
        images = [open_image(b) for b in item.images]
        out.append(scorer.score(images, [item.caption] * 2)["overall"].float().numpy())
    return np.stack(out)


def test_scores_equal_scoring_the_source_images(tmp_path, latents, demo_parquet, sdxl):
    from diffalign.toy.checklist import toy_checklist_scorer

    root = _copy(latents, tmp_path)
    # one item per scorer call, as the direct reference below: batched matmuls round differently at other batch sizes
    cfg = _cfg(root, demo_parquet, scores=["toy-checklist"], reward_scorer="toy-checklist", score_batch_size=2)
    prepare_cache(cfg, sdxl, progress=False)
    folder = scorer_dir(root, "toy-checklist")
    assert sorted(p.name for p in folder.iterdir()) == ["00000.safetensors", "00001.safetensors", "00002.safetensors", "00003.safetensors",
                                                         "scorer.json", "summary.json"]
    ds = LatentPairDataset(root, cfg.data)
    expected = _direct(demo_parquet, toy_checklist_scorer())
    order = [int(ds[i]["item_id"]) for i in range(len(ds))]
    np.testing.assert_array_equal(ds.extra_scores["toy-checklist"], expected[order])
    np.testing.assert_array_equal(ds[3]["extra_scores"]["toy-checklist"].numpy(), expected[order[3]])
    np.testing.assert_array_equal(ds[3]["scores"].numpy(), expected[order[3]])  # data.reward_scorer: the item's scores
    assert ds[3]["pair"].tolist() == ([0, 1] if ds[3]["label"] == 1 else [1, 0])  # the pair stays the human label's
    stored = load_file(str(score_path(root, "toy-checklist", 0)))  # every dimension of the scorer, not only 'overall'
    assert {"overall", "alignment", "colour"} <= set(stored) and stored["overall"].shape == (4, 2)
    summary = json.loads((folder / SUMMARY).read_text())
    assert summary["refused"] == [] and summary["items"] == 16 and summary["shards"] == SHARDS


def test_second_scorer_leaves_latents_and_first_scorer_untouched(tmp_path, latents, demo_parquet, sdxl, aesthetic):
    root = _copy(latents, tmp_path)
    prepare_cache(_cfg(root, demo_parquet, scores=["toy-checklist"]), sdxl, progress=False)
    first = {name: _files(root / name) for name in ("shards", "scores/toy-checklist")}
    first_top = {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()}

    cfg = _cfg(root, demo_parquet, scores=["toy-checklist", "aesthetic"], score_options={"aesthetic": aesthetic})
    prepare_cache(cfg, sdxl, progress=False)
    assert {name: _files(root / name) for name in first} == first  # same bytes, never rewritten (same mtimes)
    assert {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()} == first_top  # manifest, build.json, text_empty
    ds = LatentPairDataset(root, cfg.data)
    assert sorted(ds.extra_scores) == ["aesthetic", "toy-checklist"] and np.isfinite(ds.extra_scores["aesthetic"]).all()

    from diffalign.scorers.aesthetic import AestheticScorer

    order = [int(ds[i]["item_id"]) for i in range(len(ds))]
    expected = _direct(demo_parquet, AestheticScorer(aesthetic["path"], clip=aesthetic["clip"]))
    np.testing.assert_allclose(ds.extra_scores["aesthetic"], expected[order], rtol=1e-5, atol=1e-5)


def test_killed_scoring_resumes_to_the_same_files(tmp_path, latents, demo_parquet, sdxl, monkeypatch):
    whole = _copy(latents, tmp_path / "a")
    prepare_cache(_cfg(whole, demo_parquet, scores=["toy-checklist"]), sdxl, progress=False)

    killed = _copy(latents, tmp_path / "b")
    cfg = _cfg(killed, demo_parquet, scores=["toy-checklist"])
    commit = scores_mod.commit_shard
    calls = []

    def die_after_first(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt("killed")
        calls.append(args)
        commit(*args, **kwargs)

    monkeypatch.setattr(scores_mod, "commit_shard", die_after_first)
    with pytest.raises(KeyboardInterrupt):
        prepare_cache(cfg, sdxl, progress=False)
    folder = scorer_dir(killed, "toy-checklist")
    assert sorted(p.name for p in folder.iterdir()) == ["00000.safetensors", "scorer.json"]
    with pytest.raises(CacheIncompleteError, match="toy-checklist.*unfinished"):
        LatentPairDataset(killed, cfg.data)

    monkeypatch.setattr(scores_mod, "commit_shard", commit)
    shard0 = _files(folder)["00000.safetensors"]
    prepare_cache(cfg, sdxl, progress=False)
    after = _files(folder)
    assert after["00000.safetensors"] == shard0  # the committed shard is kept, not scored again
    assert {k: v[0] for k, v in after.items()} == {k: v[0] for k, v in _files(scorer_dir(whole, "toy-checklist")).items()}


def test_mismatched_scorer_identity_is_refused(tmp_path, latents, demo_parquet, sdxl, aesthetic):
    root = _copy(latents, tmp_path)
    cfg = _cfg(root, demo_parquet, scores=["toy-checklist", "aesthetic"], score_options={"aesthetic": aesthetic})
    prepare_cache(cfg, sdxl, progress=False)

    other = _cfg(root, demo_parquet, scores=["toy-checklist"], score_options={"toy-checklist": {"graded": False}})
    with pytest.raises(CacheMismatchError, match=r"'toy-checklist'[\s\S]*data.scores\[toy-checklist\] graded"):
        prepare_cache(other, sdxl, progress=False)
    with pytest.raises(CacheMismatchError, match=r"data.scores\[toy-checklist\] graded: the scores have True, the config asks False"):
        LatentPairDataset(root, other.data)

    before = _files(scorer_dir(root, "aesthetic"))
    retrained = write_aesthetic_mlp(tmp_path / "mlp2.pth", input_dim=16, seed=1)  # other weights under another name
    changed = _cfg(root, demo_parquet, scores=["aesthetic"], score_options={"aesthetic": {**aesthetic, "path": str(retrained)}})
    with pytest.raises(CacheMismatchError, match=r"data.scores\[aesthetic\] weights.path"):
        LatentPairDataset(root, changed.data)
    with pytest.raises(CacheMismatchError, match=r"data.scores\[aesthetic\] weights.path"):
        prepare_cache(changed, sdxl, progress=False)
    assert _files(scorer_dir(root, "aesthetic")) == before  # refused: nothing rewritten

    missing = _cfg(root, demo_parquet, scores=["toy-checklist", "clipscore"])
    with pytest.raises(CacheIncompleteError, match="'clipscore'.*do not exist.*diffalign prepare"):
        LatentPairDataset(root, missing.data)


def test_scores_of_a_moved_weights_folder_are_checked_by_name(tmp_path, latents, demo_parquet, sdxl, aesthetic, monkeypatch):
    """A training machine without the scorer's weight files reads complete scores, checked by name and options only."""
    root = _copy(latents, tmp_path)
    prepare_cache(_cfg(root, demo_parquet, scores=["aesthetic"], score_options={"aesthetic": aesthetic}), sdxl, progress=False)
    monkeypatch.delenv("DIFFALIGN_WEIGHTS", raising=False)
    bare = _cfg(root, demo_parquet, scores=["aesthetic"])  # no weight paths, no weights folder
    with pytest.warns(UserWarning, match="checked by name and options only"):
        ds = LatentPairDataset(root, bare.data)
    assert "aesthetic" in ds.extra_scores


def _picky_scorer():
    """A registered test scorer: image mean brightness; it refuses prompts about circles (a ValueError, as a real scorer does)."""

    class Picky:
        name, dimensions = "test-picky", ("overall", "red")

        def score(self, images, prompts):
            if any("circle" in p for p in prompts):
                raise ValueError("no circles")
            arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) for im in images]
            return {"overall": torch.tensor([a.mean() for a in arrays]), "red": torch.tensor([a[..., 0].mean() for a in arrays])}

    return Picky()


def test_refused_images_are_nan_and_listed(tmp_path, latents, demo_parquet, sdxl, monkeypatch):
    monkeypatch.setitem(REGISTRY, "test-picky", Entry(_picky_scorer, identity=lambda: {"version": 1}, what="test"))
    root = _copy(latents, tmp_path)
    cfg = _cfg(root, demo_parquet, scores=["test-picky"])
    prepare_cache(cfg, sdxl, progress=False)
    ds = LatentPairDataset(root, cfg.data)
    captions = {i: item.caption for i, item in enumerate(PickapicParquet(demo_parquet).items())}
    circles = np.array(["circle" in captions[int(ds[i]["item_id"])] for i in range(len(ds))])
    assert circles.any() and not circles.all()
    table = ds.extra_scores["test-picky"]
    assert np.isnan(table[circles]).all() and np.isfinite(table[~circles]).all()
    summary = json.loads((scorer_dir(root, "test-picky") / SUMMARY).read_text())
    assert len(summary["refused"]) == circles.sum() and "no circles" in summary["refused"][0]["reason"]
    assert summary["dimensions"] == ["overall", "red"] and summary["items"] == len(ds)


def test_config_checks(tmp_path, demo_parquet):
    with pytest.raises(ConfigError, match="listed once"):
        _cfg(tmp_path, demo_parquet, scores=["aesthetic", "aesthetic"])
    with pytest.raises(ConfigError, match="score_options for 'pickscore'"):
        _cfg(tmp_path, demo_parquet, scores=["aesthetic"], score_options={"pickscore": {}})
    with pytest.raises(ConfigError, match="reward_scorer 'pickscore'"):
        _cfg(tmp_path, demo_parquet, scores=["aesthetic"], reward_scorer="pickscore")


def test_unknown_scorer_or_missing_weights_are_refused_before_anything_is_written(tmp_path, latents, demo_parquet, sdxl, monkeypatch):
    root = _copy(latents, tmp_path)
    with pytest.raises(ConfigError, match="data.scores: unknown scorer 'nope'"):
        prepare_cache(_cfg(root, demo_parquet, scores=["nope"]), sdxl, progress=False)
    monkeypatch.delenv("DIFFALIGN_WEIGHTS", raising=False)
    with pytest.raises(ScorerConfigError, match=r"data.scores: scorer 'aesthetic' needs path=PATH.*data.score_options.aesthetic"):
        prepare_cache(_cfg(root, demo_parquet, scores=["aesthetic"]), sdxl, progress=False)
    with pytest.raises(ScorerConfigError, match=r"'aesthetic': cannot read its weight files"):
        prepare_cache(_cfg(root, demo_parquet, scores=["aesthetic"], score_options={"aesthetic": {"path": str(tmp_path / "x.pth"),
                                                                                                  "clip": str(tmp_path)}}), sdxl, progress=False)
    assert not (root / "scores").exists()
