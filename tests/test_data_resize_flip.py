"""The official resize (`data.resize: official`) and per-access flips (`data.flip_at: train`): torchvision parity of
the resize, both orientations in the cache, the train-time orientation draw, and the cache identity of both."""

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
from torchvision import transforms

import diffalign.trainers.loop as loop_mod
from diffalign.config import ConfigError, ModelConfig, validate_config
from diffalign.data import CacheMismatchError, LatentPairDataset, check_cache, prepare_cache
from diffalign.data.images import Augment, place_image, prepare_images, resized_size
from diffalign.data.shards import read_index
from diffalign.data.sources import PickapicParquet
from diffalign.models.loading import encode_images, load_components
from diffalign.randomness import Draws, item_generator
from diffalign.trainers.batch import BatchRules, build_batch

RES = 32
NO_AUG = Augment(flip=False, u_top=0.0, u_left=0.0)


def _noise_image(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _uint8(pixels: torch.Tensor) -> np.ndarray:
    """(3, h, w) in [-1, 1] back to (h, w, 3) uint8 (exact: the pixels are x / 127.5 - 1 of uint8 x)."""
    return ((pixels + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()


# ------------------------------------------------------------------------------------------ resize


@pytest.mark.parametrize("h, w", [(37, 23), (23, 61)])
@pytest.mark.parametrize("res", [8, 16, 20, 23, 32, 50])
def test_official_resize_is_torchvision_resize_and_center_crop(h, w, res):
    im = _noise_image(h, w, seed=h * 100 + w)
    resized = transforms.Resize(res, interpolation=transforms.InterpolationMode.BILINEAR)(im)
    want = transforms.CenterCrop(res)(resized)
    assert resized_size(h, w, res, "official") == (resized.height, resized.width)
    placed = place_image(im, res, "center", NO_AUG, resize="official")
    assert np.array_equal(_uint8(placed.pixels), np.asarray(want))
    official = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])(want)
    torch.testing.assert_close(placed.pixels, official, atol=1e-6, rtol=0)


def test_bicubic_resize_is_unchanged_and_differs_from_official():
    im = _noise_image(23, 61, seed=3)
    # 61 · 32 / 23 = 84.87: bicubic rounds the long side to 85, torchvision truncates it to 84
    assert resized_size(23, 61, RES) == (32, 85) and resized_size(23, 61, RES, "official") == (32, 84)
    assert resized_size(61, 23, RES) == (85, 32) and resized_size(61, 23, RES, "official") == (84, 32)
    left = int(round((85 - RES) / 2.0))
    want = im.resize((85, 32), Image.Resampling.BICUBIC).crop((left, 0, left + RES, RES))
    assert np.array_equal(_uint8(place_image(im, RES, "center", NO_AUG).pixels), np.asarray(want))
    assert not torch.equal(place_image(im, RES, "center", NO_AUG).pixels, place_image(im, RES, "center", NO_AUG, resize="official").pixels)


# ------------------------------------------------------------------------------------------ the cache


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _ramp(h: int, w: int, colour: int) -> Image.Image:
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[..., colour] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    arr[: h // 3, :, (colour + 1) % 3] = 200  # a band on top: not symmetric in any axis
    return Image.fromarray(arr)


def _pairs_parquet(path: Path, n: int) -> Path:
    rows = [(f"scene {i}", _ramp(40 + 3 * i, 56, 0), _ramp(48, 44 + 5 * i, 2), float(i % 2)) for i in range(n)]
    pq.write_table(pa.table({"caption": [r[0] for r in rows], "jpg_0": pa.array([_png(r[1]) for r in rows], pa.binary()),
                             "jpg_1": pa.array([_png(r[2]) for r in rows], pa.binary()), "label_0": [r[3] for r in rows]}), path)
    return path


def _cfg(cache_dir: Path, parquet: Path, **data):
    return validate_config({"model": {"pretrained": "builtin:tiny-sdxl"}, "data": {
        "source": {"kind": "pickapic", "path": str(parquet)}, "cache_dir": str(cache_dir), "resolution": RES, "shard_size": 4,
        "latent_dtype": "float32", **data}})


@pytest.fixture(scope="module")
def sdxl():
    return load_components(ModelConfig(pretrained="builtin:tiny-sdxl"))


def test_train_time_flip_cache_holds_both_orientations(tmp_path, sdxl):
    src = _pairs_parquet(tmp_path / "p.parquet", 5)
    cfg = _cfg(tmp_path / "cache", src, flip_at="train", crop="random", pairing="per_image", seed=11)
    root = prepare_cache(cfg, sdxl, progress=False)
    shard = load_file(str(root / "shards" / "00000.safetensors"))
    assert shard["mean_mirrored"].shape == shard["mean"].shape == (8, 4, 8, 8)  # 4 items × K = 2, on the same rows
    assert not any(any(f) for f in read_index(root, 2, ["flips"]).column("flips").to_pylist())  # no cache-time flip
    ds = LatentPairDataset(root, cfg.data)
    for i, item in enumerate(PickapicParquet(src).items()):
        # the unflipped placement, computed by the cache-time path with flips off, then mirrored here
        placed = prepare_images(item.images, item.source_id, resolution=RES, crop="random", random_flip=False, pairing="per_image", seed=11)
        pixels = torch.stack([p.pixels for p in placed])
        mean, logvar = encode_images(sdxl.vae, pixels)
        mean_m, logvar_m = encode_images(sdxl.vae, pixels.flip(-1))
        got = ds[i]
        torch.testing.assert_close(got["mean"], mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["logvar"], logvar, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["mean_mirrored"], mean_m, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["logvar_mirrored"], logvar_m, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(got["mean_mirrored"], got["mean"].flip(-1), atol=1e-3)  # the VAE is not flip-equivariant
        assert got["time_ids"].tolist() == [[*p.original_size, *p.crop_top_left, RES, RES] for p in placed]
        assert got["flip_group"].tolist() == [0, 1]
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))  # the default collate
    assert batch["mean_mirrored"].shape == (3, 2, 4, 8, 8) and batch["flip_group"].shape == (3, 2)
    shared = LatentPairDataset(prepare_cache(_cfg(tmp_path / "shared", src, flip_at="train"), sdxl, progress=False),
                               _cfg(tmp_path / "shared", src, flip_at="train").data)
    assert shared[0]["flip_group"].tolist() == [0, 0]
    default = LatentPairDataset(prepare_cache(_cfg(tmp_path / "default", src), sdxl, progress=False), _cfg(tmp_path / "default", src).data)
    assert not {"mean_mirrored", "logvar_mirrored", "flip_group"} & set(default[0])


def test_resize_and_flip_at_are_part_of_the_cache_identity(tmp_path, sdxl):
    src = _pairs_parquet(tmp_path / "p.parquet", 3)
    cfg = _cfg(tmp_path / "cache", src)
    root = prepare_cache(cfg, sdxl, progress=False)
    cases = {"resize": ("official", "data.resize: cache has 'bicubic', config asks 'official'"),
             "flip_at": ("train", "data.flip_at: cache has 'cache', config asks 'train'")}
    for field, (value, message) in cases.items():
        other = _cfg(tmp_path / "cache", src, **{field: value})
        for call in (lambda: check_cache(other, sdxl), lambda: prepare_cache(other, sdxl, progress=False),
                     lambda: LatentPairDataset(root, other.data)):
            with pytest.raises(CacheMismatchError, match=message):
                call()
    # a cache written before these fields existed was built with the defaults: it serves them, and only them
    manifest = json.loads((root / "manifest.json").read_text())
    for key in ("data.resize", "data.flip_at"):
        del manifest["identity"][key]
    (root / "manifest.json").write_text(json.dumps(manifest))
    check_cache(cfg, sdxl)
    LatentPairDataset(root, cfg.data)
    with pytest.raises(CacheMismatchError, match="data.flip_at: cache has 'cache', config asks 'train'"):
        check_cache(_cfg(tmp_path / "cache", src, flip_at="train"), sdxl)


def test_train_time_flips_need_random_flip():
    with pytest.raises(ConfigError, match="flip_at = 'train' needs random_flip: true"):
        validate_config({"data": {"flip_at": "train", "random_flip": False}})


# ------------------------------------------------------------------------------------------ train-time draw

K = 3


def _raw(ids: list[int], flip_group: torch.Tensor | None) -> dict:
    g = torch.Generator().manual_seed(0)
    B = len(ids)
    raw = {
        "item_id": torch.tensor(ids), "mean": torch.randn(B, K, 4, 8, 8, generator=g), "logvar": torch.randn(B, K, 4, 8, 8, generator=g),
        "prompt_embeds": torch.randn(B, 77, 64, generator=g), "pooled": torch.randn(B, 32, generator=g),
        "time_ids": torch.arange(B * K * 6, dtype=torch.float32).view(B, K, 6), "label": torch.full((B,), float("nan")),
        "ranks": torch.arange(K).repeat(B, 1), "scores": torch.zeros(B, K), "pair": torch.tensor([[0, K - 1]] * B), "pair_label": torch.ones(B),
    }
    if flip_group is not None:
        raw["mean_mirrored"] = torch.randn(B, K, 4, 8, 8, generator=g)
        raw["logvar_mirrored"] = torch.randn(B, K, 4, 8, 8, generator=g)
        raw["flip_group"] = flip_group.repeat(B, 1)
    return raw


RULES = BatchRules(num_train_timesteps=1000, scaling_factor=0.13, empty_prompt_embeds=torch.zeros(77, 64), empty_pooled=torch.zeros(32),
                   caption_dropout=0.0)
SHARED, PER_IMAGE = torch.zeros(K, dtype=torch.int64), torch.arange(K)


def _expected_flips(seed: int, step: int, slot: int, item: int, groups: torch.Tensor) -> torch.Tensor:
    """The rule, written out: K uniforms from the item's "flip" stream, image j mirrored when u[group of j] < 1/2."""
    u = torch.rand(K, generator=item_generator(seed, step, slot, item, "flip"))
    return u[groups] < 0.5


@pytest.mark.parametrize("groups", [SHARED, PER_IMAGE], ids=["shared", "per_image"])
def test_each_access_draws_the_orientation_from_seed_step_and_slot(groups):
    raw = _raw([4, 9], groups)
    seen = []
    for step in range(40):
        b = build_batch(raw, RULES, Draws(7, step, [2, 3], [4, 9]))
        for i, (slot, item) in enumerate([(2, 4), (3, 9)]):
            assert torch.equal(b.flipped[i], _expected_flips(7, step, slot, item, groups))
        pick = b.flipped[:, :, None, None, None]
        assert torch.equal(b.mean, torch.where(pick, raw["mean_mirrored"], raw["mean"]))
        assert torch.equal(b.logvar, torch.where(pick, raw["logvar_mirrored"], raw["logvar"]))
        assert torch.equal(b.time_ids, raw["time_ids"])  # a flip keeps the crop's SDXL time ids
        seen.append(b.flipped)
    seen = torch.stack(seen)  # (steps, B, K)
    assert seen.any(0).all() and (~seen).any(0).all()  # every image is trained in both orientations
    alone = build_batch({k: v[1:] for k, v in raw.items()}, RULES, Draws(7, 5, [3], [9]))
    assert torch.equal(alone.flipped[0], seen[5, 1])  # the same item at the same (step, slot), batched differently
    shifted = torch.stack([build_batch(raw, RULES, Draws(7, s, [0, 1], [4, 9])).flipped for s in range(40)])
    assert not torch.equal(shifted, seen)  # the slot is part of the key
    if groups is SHARED:
        assert (seen == seen[..., :1]).all()  # all K images of an item share the orientation
    else:
        assert (seen != seen[..., :1]).any()  # images draw independently


def test_a_single_orientation_cache_draws_no_flips():
    raw = _raw([4, 9], None)
    b = build_batch(raw, RULES, Draws(7, 0, [0, 1], [4, 9]))
    assert b.flipped is None and torch.equal(b.mean, raw["mean"]) and torch.equal(b.logvar, raw["logvar"])


def test_training_with_train_time_flips(tmp_path, monkeypatch):
    """The loop's DataLoader collates the extra tensors and every batch draws orientations."""
    src = _pairs_parquet(tmp_path / "p.parquet", 6)
    cfg = validate_config({
        "model": {"pretrained": "builtin:tiny-sdxl", "finetune": "lora", "lora": {"rank": 4, "alpha": 4.0}},
        "data": {"source": {"kind": "pickapic", "path": str(src)}, "cache_dir": str(tmp_path / "cache"), "resolution": RES,
                 "latent_dtype": "float32", "flip_at": "train", "pairing": "per_image"},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 3, "batch_size": 2},
        "log": {"tracker": "none", "progress": False},
    })
    batches = []
    real = loop_mod.build_batch
    monkeypatch.setattr(loop_mod, "build_batch", lambda *a: batches.append(real(*a)) or batches[-1])
    trainer = loop_mod.PreferenceTrainer(cfg)
    trainer.setup()
    trainer.train()
    assert len(batches) == 3 and all(b.flipped is not None and b.flipped.shape == (2, 2) for b in batches)
