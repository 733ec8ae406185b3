"""The synthetic preference source: sample K images per prompt, score them, rank by average win-rate φ."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import diffalign.data.cache as cache_mod
import diffalign.scorers.registry as registry
from diffalign.config import ConfigError, ModelConfig, validate_config
from diffalign.data import CacheMismatchError, DataError, LatentPairDataset, check_cache, prepare_cache
from diffalign.data.pairing import dense_ranks
from diffalign.data.shards import read_index, tensors_path
from diffalign.data.sources import SyntheticGenerator, open_source, win_rate_phi
from diffalign.data.sources.synthetic import resolve_prompts
from diffalign.models.loading import load_components
from diffalign.scorers import load_scorer
from diffalign.toy.scenes import HELD_OUT, TRAIN

RES, K = 32, 3
PROMPTS = [spec.caption for spec in TRAIN[:4]]


def _source(**over) -> dict:
    return {"kind": "synthetic", "prompts": PROMPTS, "images_per_prompt": K, "num_inference_steps": 2, "scorers": ["toy-checklist"], **over}


def _cfg(cache_dir, model: str = "builtin:tiny-sdxl", **source):
    return validate_config(
        {"model": {"pretrained": model}, "data": {"source": _source(**source), "cache_dir": str(cache_dir), "resolution": RES, "shard_size": 2}}
    )


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sdxl():
    return load_components(ModelConfig(pretrained="builtin:tiny-sdxl"))


@pytest.fixture(scope="module")
def built(tmp_path_factory, sdxl):
    cfg = _cfg(tmp_path_factory.mktemp("synthetic") / "cache")
    prepare_cache(cfg, sdxl, progress=False)
    return cfg


def _shards(root, n):
    return [load_file(str(tensors_path(root, s))) for s in range(n)]


# ------------------------------------------------------------------------------------------------ φ


def test_win_rate_phi_by_hand():
    assert win_rate_phi({"a": [3.0, 1.0, 2.0]}) == [1.0, 0.0, 0.5]
    # a tie counts ½ for both: image 0 ties image 1 and beats image 2 -> (0.5 + 1) / 2
    assert win_rate_phi({"a": [1.0, 1.0, 0.0]}) == [0.75, 0.75, 0.0]
    # two scorers, K = 4, denominator n·(K−1) = 6
    #   a: wins [3, 0, 1.5, 1.5] (images 2 and 3 tie);  b: wins [0, 1.5, 1.5, 3] (images 1 and 2 tie)
    phi = win_rate_phi({"a": [3.0, 1.0, 2.0, 2.0], "b": [0.0, 1.0, 1.0, 5.0]})
    assert phi == pytest.approx([3 / 6, 1.5 / 6, 3 / 6, 4.5 / 6])
    assert sum(phi) == pytest.approx(4 / 2)
    assert win_rate_phi({"a": [7.0, 7.0, 7.0, 7.0]}) == [0.5] * 4  # all tied


def test_win_rate_phi_sums_to_half_k():
    rng = np.random.default_rng(0)
    for k in (2, 3, 4, 7):
        for n in (1, 2, 5):
            scores = {f"s{r}": rng.integers(0, 3, size=k).astype(float).tolist() for r in range(n)}  # many ties
            phi = win_rate_phi(scores)
            assert sum(phi) == pytest.approx(k / 2)
            assert all(0.0 <= p <= 1.0 for p in phi)


def test_win_rate_phi_rejects_bad_input():
    for bad in ({}, {"a": [1.0]}, {"a": [1.0, 2.0], "b": [1.0, 2.0, 3.0]}, {"a": [1.0, float("nan")]}):
        with pytest.raises(ValueError):
            win_rate_phi(bad)


# -------------------------------------------------------------------------------------- the cache


def test_prepare_writes_a_valid_cache(built, sdxl):
    root = built.data.cache_dir
    ds = LatentPairDataset(root, built.data)
    assert len(ds) == len(PROMPTS)
    raw = ds.extra_scores["toy-checklist"]
    assert set(ds.extra_scores) == {"toy-checklist"} and raw.shape == (len(PROMPTS), K)
    index = read_index(Path(root), 2, ["source_id", "caption", "scores", "extra_scores"])
    assert index.column("source_id").to_pylist() == [f"synthetic:{i}" for i in range(len(PROMPTS))]
    assert index.column("caption").to_pylist() == PROMPTS
    for i in range(len(ds)):
        item = ds[i]
        assert item["mean"].shape[0] == K and item["logvar"].shape == item["mean"].shape
        stored = dict(index.column("extra_scores")[i].as_py())
        assert list(stored) == ["toy-checklist"] and np.allclose(stored["toy-checklist"], raw[i])
        phi = win_rate_phi(stored)
        assert item["scores"].tolist() == pytest.approx(phi)
        assert sum(phi) == pytest.approx(K / 2)
        assert item["ranks"].tolist() == dense_ranks(np.array(phi)).tolist()
        for a in range(K):  # ranks order the images by φ, ties share a rank
            for b in range(K):
                assert (phi[a] > phi[b]) == (item["ranks"][a] < item["ranks"][b])
        assert np.isnan(item["label"].item())

    # the raw scores are the scorer's scores of the images the source generates
    source = open_source(built.data.source, built)
    images = source.generate(1)
    assert len(images) == K and images[0].size == (RES, RES)
    rescored = load_scorer("toy-checklist").score(images, [PROMPTS[1]] * K)["overall"]
    assert np.allclose(rescored.numpy(), raw[1])

    manifest = json.loads((Path(root) / "manifest.json").read_text())
    desc = manifest["source"]["description"]
    assert desc["kind"] == "synthetic" and desc["scorers"] == ["toy-checklist"]
    assert (desc["images_per_prompt"], desc["num_inference_steps"], desc["guidance_scale"], desc["seed"], desc["resolution"]) == (K, 2, 5.0, 0, RES)
    assert desc["model"]["pretrained"] == "builtin:tiny-sdxl" and desc["model"]["on_policy"] is True
    assert manifest["extra_scores"] == ["toy-checklist"]
    assert manifest["format_version"] == 2
    counts = manifest["counts"]
    assert (counts["items"], counts["images"], counts["k"], counts["source_items"], counts["captions"], counts["shards"]) == (4, 12, K, 4, 4, 2)
    check_cache(built, sdxl)  # the finished cache serves its own config


def test_min_score_gap_drops_items_whose_pair_barely_differs(built):
    everything = LatentPairDataset(built.data.cache_dir, built.data)
    raw = everything.extra_scores["toy-checklist"]
    gaps = []
    for i in range(len(everything)):  # the trained pair: best and worst by rank (first of equals, as the trainer takes them)
        ranks = everything[i]["ranks"].numpy()
        best, worst = int(np.argmin(ranks)), int(len(ranks) - 1 - np.argmax(ranks[::-1]))
        gaps.append(float(raw[i, best] - raw[i, worst]))
    assert np.allclose(everything.score_gaps(), gaps) and min(gaps) >= 0
    cut = float(np.median(gaps))
    data = built.data.model_copy(update={"min_score_gap": cut})
    kept = LatentPairDataset(built.data.cache_dir, data)
    expect = [int(everything[i]["item_id"]) for i in range(len(everything)) if gaps[i] >= cut]
    assert 0 < len(kept) < len(everything) and [int(kept[i]["item_id"]) for i in range(len(kept))] == expect
    assert kept.extra_scores["toy-checklist"].shape == (len(kept), K) and (kept.score_gaps() >= cut).all()


def test_min_score_gap_needs_scores(tmp_path):
    from diffalign.data.errors import DataError

    data = {"source": {"kind": "demo"}, "cache_dir": str(tmp_path / "cache"), "resolution": RES}
    cfg = validate_config({"data": data, "model": {"pretrained": "builtin:tiny-sdxl"}})
    prepare_cache(cfg, progress=False)
    with pytest.raises(DataError, match="min_score_gap: item 0 .* no scores"):
        LatentPairDataset(cfg.data.cache_dir, cfg.data.model_copy(update={"min_score_gap": 0.1}))


def test_builds_are_deterministic_and_resume_without_regenerating(built, sdxl, tmp_path, monkeypatch):
    again = _cfg(tmp_path / "again")
    prepare_cache(again, sdxl, progress=False)

    calls: list[int] = []
    windows: list[range] = []
    real_generate, real_sample = SyntheticGenerator.generate, SyntheticGenerator._sample
    monkeypatch.setattr(SyntheticGenerator, "generate", lambda self, i: (calls.append(i), real_generate(self, i))[1])
    monkeypatch.setattr(SyntheticGenerator, "_sample", lambda self, w: (windows.append(w), real_sample(self, w))[1])
    resumed = _cfg(tmp_path / "resumed")
    real_write = cache_mod.write_shard

    def die_after_first(root, shard, *a):
        if shard == 1:
            raise KeyboardInterrupt("simulated kill")
        return real_write(root, shard, *a)

    with monkeypatch.context() as m:
        m.setattr(cache_mod, "write_shard", die_after_first)
        with pytest.raises(KeyboardInterrupt):
            prepare_cache(resumed, sdxl, progress=False)
    calls.clear(), windows.clear()
    prepare_cache(resumed, sdxl, progress=False)
    # shard 0 (prompts 0, 1) was kept and only prompts 2, 3 are yielded again; with shards of 2 inside a window of 16
    # prompts, the resumed build samples the window once more (one pipeline call), so its images have the same bits
    assert calls == [2, 3] and windows == [range(0, 4)]

    reference = _shards(built.data.cache_dir, 2)
    for other in (again, resumed):
        for a, b in zip(reference, _shards(other.data.cache_dir, 2)):
            assert a.keys() == b.keys()
            for key in a:
                assert torch.equal(a[key], b[key]), key
        ds_a, ds_b = LatentPairDataset(built.data.cache_dir, built.data), LatentPairDataset(other.data.cache_dir, other.data)
        assert np.array_equal(ds_a.extra_scores["toy-checklist"], ds_b.extra_scores["toy-checklist"])
        assert [ds_a[i]["scores"].tolist() for i in range(4)] == [ds_b[i]["scores"].tolist() for i in range(4)]


def test_images_do_not_depend_on_batching(built):
    source = open_source(built.data.source, built)
    together = source.generate(2)
    source.k = 1  # one image per call: image 0 of prompt 2 alone
    alone = source.generate(2)
    assert np.array_equal(np.asarray(together[0]), np.asarray(alone[0]))
    assert not np.array_equal(np.asarray(together[0]), np.asarray(together[1]))


def test_digest_follows_every_generation_setting(monkeypatch):
    monkeypatch.setitem(registry.REGISTRY, "test-other", registry.REGISTRY["toy-checklist"])

    def digest(training: str = "builtin:tiny-sdxl", data_resolution: int = RES, **source) -> str:
        cfg = validate_config({"model": {"pretrained": training}, "data": {"source": _source(**source), "resolution": data_resolution}})
        return open_source(cfg.data.source, cfg).digest()

    base = digest()
    assert digest() == base
    assert digest(resolution=RES) == base  # an explicit resolution equal to data.resolution is the same setting
    changed = [
        digest(num_inference_steps=3),
        digest(guidance_scale=7.5),
        digest(seed=1),
        digest(images_per_prompt=4),
        digest(resolution=64),
        digest(scorers=["toy-checklist", "test-other"]),
        digest(prompts=PROMPTS[:3]),
        digest(prompts=list(reversed(PROMPTS))),
        digest(num_prompts=2),
        digest(training="builtin:tiny-sd15"),  # on-policy: the training model is the generating model
        digest(model="builtin:tiny-sd15"),
    ]
    assert len({base, *changed}) == len(changed) + 1
    assert digest(data_resolution=64) == digest(resolution=64)  # the default resolution follows data.resolution
    # a scorer whose configuration changed (same name) invalidates the scored cache
    toy = registry.REGISTRY["toy-checklist"]
    monkeypatch.setitem(registry.REGISTRY, "toy-checklist", registry.Entry(toy.target, identity=lambda **_: {"changed": True}))
    assert digest() != base


class _Brightness:
    """A second scorer for the tests: mean pixel value."""

    name, dimensions = "test-brightness", ("overall",)

    def score(self, images, prompts):
        return {"overall": torch.tensor([float(np.asarray(im, dtype=np.float64).mean()) for im in images])}


def test_two_scorers_end_to_end(tmp_path, sdxl, monkeypatch):
    monkeypatch.setitem(registry.REGISTRY, "test-brightness", registry.Entry(lambda **_: _Brightness(), identity=lambda **_: {"mean pixel": 1}))
    import diffalign.models.loading as loading

    loads: list[str] = []
    real_load = loading.load_components
    monkeypatch.setattr(loading, "load_components", lambda m: (loads.append(m.pretrained), real_load(m))[1])
    cfg = _cfg(tmp_path / "two", scorers=["toy-checklist", "test-brightness"], num_prompts=2)
    prepare_cache(cfg, sdxl, progress=False)
    assert loads == []  # on-policy: the builder's components are lent, no second copy
    ds = LatentPairDataset(cfg.data.cache_dir, cfg.data)
    assert sorted(ds.extra_scores) == ["test-brightness", "toy-checklist"]
    for i in range(len(ds)):
        raw = {name: ds.extra_scores[name][i].astype(np.float64).tolist() for name in ("toy-checklist", "test-brightness")}
        assert ds[i]["scores"].tolist() == pytest.approx(win_rate_phi(raw), abs=1e-6)
    manifest = json.loads((Path(cfg.data.cache_dir) / "manifest.json").read_text())
    assert manifest["source"]["description"]["scorers"] == ["toy-checklist", "test-brightness"]
    assert manifest["extra_scores"] == ["test-brightness", "toy-checklist"]


def test_off_policy_model_loads_its_own_once(tmp_path, sdxl, monkeypatch):
    import diffalign.models.loading as loading

    loads: list[str] = []
    real_load = loading.load_components
    monkeypatch.setattr(loading, "load_components", lambda m: (loads.append(m.pretrained), real_load(m))[1])
    cfg = validate_config(
        {
            "model": {"pretrained": "builtin:tiny-sdxl"},
            "data": {"source": _source(model="builtin:tiny-sd15", num_prompts=2), "cache_dir": str(tmp_path / "c"), "resolution": RES},
        }
    )
    source = open_source(cfg.data.source, cfg)
    assert not source.on_policy and source.describe()["model"]["pretrained"] == "builtin:tiny-sd15"
    assert source.share_components(sdxl, cfg.model) is False  # another model: it loads its own
    prepare_cache(cfg, sdxl, progress=False)
    assert len(LatentPairDataset(cfg.data.cache_dir, cfg.data)) == 2
    assert loads == ["builtin:tiny-sd15"]  # once per source object, not per item


def test_old_format_cache_is_refused(built, tmp_path):
    root = tmp_path / "old"
    shutil.copytree(built.data.cache_dir, root)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["format_version"] = manifest["identity"]["format_version"] = 1
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheMismatchError, match="format version 1.*reads version 2.*prepare"):
        LatentPairDataset(root, built.data)
    cfg = built.model_copy(deep=True)
    cfg.data.cache_dir = str(root)
    with pytest.raises(CacheMismatchError, match="format version 1"):
        check_cache(cfg)


# ---------------------------------------------------------------------------------- config errors


def _invalid(**source) -> str:
    with pytest.raises(ConfigError) as e:
        validate_config({"data": {"source": {"kind": "synthetic", **source}}})
    return str(e.value)


def _refused_on_open(**source) -> str:
    """Checks that need the toy world or the scorer registry run where the source is opened, not in the config."""
    cfg = validate_config({"data": {"source": {"kind": "synthetic", **source}}})
    with pytest.raises(ConfigError) as e:
        open_source(cfg.data.source, cfg)
    return str(e.value)


def test_config_errors():
    msg = _invalid(prompts="toy-held-out")
    assert "data.source.prompts" in msg and "evaluation only" in msg
    msg = _refused_on_open(prompts=[PROMPTS[0], HELD_OUT[0].caption])
    assert "data.source.prompts" in msg and "held-out" in msg and HELD_OUT[0].caption in msg
    msg = _invalid(prompts="my-prompts")
    assert "unknown prompt set" in msg and "toy-train" in msg
    msg = _invalid(prompts=[])
    assert "at least one prompt" in msg
    msg = _refused_on_open(prompts="toy-train", scorers=["hpsv9"])
    assert "data.source.scorers" in msg and "'hpsv9'" in msg and "available: aesthetic, " in msg and "toy-checklist" in msg
    msg = _invalid(prompts="toy-train", scorers=["toy-checklist", "toy-checklist"])
    assert "once" in msg
    msg = _invalid(prompts="toy-train", images_per_prompt=1)
    assert "data.source.images_per_prompt" in msg and "greater than or equal to 2" in msg
    assert "data.source.prompts: required" in _invalid()
    cfg = validate_config({"data": {"source": {"kind": "synthetic", "prompts": "toy-train", "num_prompts": 5}}})
    assert resolve_prompts(cfg.data.source) == [s.caption for s in TRAIN[:5]]
    assert (cfg.data.source.images_per_prompt, cfg.data.source.scorers) == (4, ["toy-checklist"])


def test_held_out_captions_never_become_training_data_through_the_cli(tmp_path):
    from diffalign.cli import main

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"data:\n  source:\n    kind: synthetic\n    prompts: ['{HELD_OUT[0].caption}']\n  cache_dir: {tmp_path / 'c'}\n")
    assert main(["prepare", str(cfg)]) == 2
    assert not (tmp_path / "c").exists()


def test_every_field_is_documented():
    from diffalign.config import SyntheticSource

    for name, field in SyntheticSource.model_fields.items():
        assert field.description, name


def test_unsupported_resolution_is_reported():
    cfg = validate_config({"data": {"source": _source(resolution=30), "resolution": RES}})
    with pytest.raises(DataError, match="not divisible by the VAE's spatial factor"):
        next(open_source(cfg.data.source, cfg).items())


def test_a_reward_model_ranks_synthetic_data_through_its_options(tmp_path, sdxl):
    """A weight-loading scorer (PickScore on a tiny random CLIP folder) scores the synthetic images; its options,
    and the fingerprint of its weight files, are part of the cache's identity."""
    from tiny_scorers import write_clip_folder

    clip = write_clip_folder(tmp_path / "PickScore_v1")
    options = {"pickscore": {"path": str(clip)}}
    cfg = _cfg(tmp_path / "cache", scorers=["toy-checklist", "pickscore"], scorer_options=options, num_prompts=2)
    prepare_cache(cfg, sdxl, progress=False)
    ds = LatentPairDataset(cfg.data.cache_dir, cfg.data)
    picks = ds.extra_scores["pickscore"]
    assert picks.shape == (2, K) and np.isfinite(picks).all() and np.ptp(picks) > 0
    digest = open_source(cfg.data.source, cfg).digest()
    other = write_clip_folder(tmp_path / "other", seed=1)
    assert open_source(_cfg(tmp_path / "c2", scorers=["toy-checklist", "pickscore"], scorer_options={"pickscore": {"path": str(other)}},
                            num_prompts=2).data.source, cfg).digest() != digest
    with pytest.raises(ConfigError, match="scorer_options for 'hpsv21', which `scorers` does not list"):
        _cfg(tmp_path / "c3", scorer_options={"hpsv21": {"path": "x"}})
