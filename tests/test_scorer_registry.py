"""Every canonical scorer builds by name from one weights folder that holds the official files under their
release names (tiny random versions here), and scores like the class built from explicit paths."""

from __future__ import annotations

import pytest
import tiny_scorers as tiny
import torch

from diffalign.scorers import available, load_scorer
from diffalign.scorers.registry import REGISTRY

pytestmark = pytest.mark.usefixtures("one_thread")

# options a tiny model needs that the real files imply (architecture sizes not recorded in the weights)
TINY_OPTIONS = {
    "hpsv2": {"architecture": tiny.TINY_OPEN_CLIP},
    "hpsv21": {"architecture": tiny.TINY_OPEN_CLIP},
    "imagereward": {"vision_heads": 2},
    "visionreward": {"mode": "probability"},
}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    tiny.write_hps_checkpoint(root / "HPS_v2_compressed.pt", seed=1)
    tiny.write_hps_checkpoint(root / "HPS_v2.1_compressed.pt", seed=2)
    tiny.write_clip_folder(root / "PickScore_v1")
    tiny.write_clip_folder(root / "clip-vit-base-patch32", seed=3)
    tiny.write_clip_folder(root / "clip-vit-large-patch14", seed=4, tokenizer=False)
    tiny.write_aesthetic_mlp(root / "sac+logos+ava1-l14-linearMSE.pth")
    (root / "ImageReward").mkdir()
    tiny.write_imagereward_checkpoint(root / "ImageReward")
    clip_h = tiny.write_mps_clip_folder(root / "CLIP-ViT-H-14-laion2B-s32B-b79K")
    tiny.write_mps_pickle(root / "MPS_overall_checkpoint.pth", tiny.official_mps(clip_h))
    base = tiny.write_tiny_qwen2vl(root / "Qwen2-VL-7B-Instruct")
    tiny.write_tiny_hpsv3(root / "HPSv3.safetensors", base=base)
    tiny.write_tiny_qwen2vl(root / "visionreward-vlm", seed=5)
    return root


def test_every_canonical_name_builds_from_the_weights_folder(weights, monkeypatch):
    monkeypatch.setenv("DIFFALIGN_WEIGHTS", str(weights))
    assert available() == sorted(REGISTRY) and len(available()) == 10
    from diffalign.toy.scenes import TRAIN

    ims = tiny.images(sizes=((256, 256), (97, 97)))  # square: the toy checklist measures squares
    for name in available():
        prompts = [TRAIN[0].caption, TRAIN[1].caption] if name == "toy-checklist" else tiny.PROMPTS[:2]  # its own grammar
        scorer = load_scorer(name, **TINY_OPTIONS.get(name, {}))
        out = scorer.score(ims, prompts)
        assert "overall" in out and out["overall"].shape == (2,) and torch.isfinite(out["overall"]).all(), name
        assert set(out) <= set(scorer.dimensions), name
        pref = scorer.prefer(ims, ims[::-1], prompts)
        assert pref.prob.shape == (2,) and ((pref.prob >= 0) & (pref.prob <= 1)).all(), name
    with pytest.raises(ValueError, match="measures square images"):
        load_scorer("toy-checklist").score(tiny.images()[:1], [TRAIN[0].caption])


def test_the_weights_folder_gives_the_same_scorer_as_explicit_paths(weights):
    from diffalign.scorers.hps import HPSv2
    from diffalign.scorers.mps import MPS

    ims, prompts = tiny.images()[:2], tiny.PROMPTS[:2]
    by_name = load_scorer("hpsv2", weights_dir=weights, **TINY_OPTIONS["hpsv2"]).score(ims, prompts)["overall"]
    explicit = HPSv2(weights / "HPS_v2_compressed.pt", version="hpsv2", architecture=tiny.TINY_OPEN_CLIP).score(ims, prompts)["overall"]
    torch.testing.assert_close(by_name, explicit)
    other = load_scorer("hpsv21", weights_dir=weights, **TINY_OPTIONS["hpsv21"]).score(ims, prompts)["overall"]
    assert not torch.allclose(by_name, other)  # v2.0 and v2.1 are different files
    mps = load_scorer("mps", weights_dir=weights).score(ims, prompts)
    ref = MPS(weights / "MPS_overall_checkpoint.pth", tokenizer=weights / "CLIP-ViT-H-14-laion2B-s32B-b79K").score(ims, prompts)
    torch.testing.assert_close(mps["overall"], ref["overall"])


def test_every_model_scorer_runs_in_bfloat16_close_to_float32(weights):
    """dtype-aware: bfloat16 weights and activations give the float32 scores to bf16 precision, as float32 tensors
    on both paths."""
    ims, prompts = tiny.images(sizes=((256, 256), (300, 200))), tiny.PROMPTS[:2]
    for name in available():
        if not REGISTRY[name].weights:
            continue
        full = load_scorer(name, weights_dir=weights, dtype=torch.float32, **TINY_OPTIONS.get(name, {})).score(ims, prompts)["overall"]
        half = load_scorer(name, weights_dir=weights, dtype=torch.bfloat16, **TINY_OPTIONS.get(name, {}))
        got = half.score(ims, prompts)["overall"]
        assert got.dtype == torch.float32 and (got - full).abs().max() <= 0.05 * full.abs().max() + 1e-3, (name, full, got)
        assert half.score(torch.rand(2, 3, 64, 64), prompts)["overall"].dtype == torch.float32, name
