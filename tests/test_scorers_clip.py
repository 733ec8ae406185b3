"""PickScore and CLIPScore: tiny random transformers CLIP folders, scored through diffalign and by the
official formula with transformers' own processor and tokenizer."""

from __future__ import annotations

import pytest
import torch
from tiny_scorers import PROMPTS, check_tensor_path, images, openai_clip_transform, write_clip_folder


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return write_clip_folder(tmp_path_factory.mktemp("clip"))


def official_clip_cosine(folder, pil_images, prompts, transform: str = "hf"):
    """PickScore's README ``calc_probs``: CLIPImageProcessor (the PIL one) and the folder's tokenizer; with
    ``transform="openai"`` OpenAI CLIP's torchvision transform instead (CLIPScore)."""
    from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

    model = CLIPModel.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        if transform == "hf":
            pixels = CLIPImageProcessorPil()(images=pil_images, return_tensors="pt")["pixel_values"]
        else:
            pixels = torch.stack([openai_clip_transform()(im) for im in pil_images])
        text = tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        img = model.get_image_features(pixel_values=pixels).pooler_output
        txt = model.get_text_features(**text).pooler_output
    img = img / img.norm(dim=-1, keepdim=True)
    txt = txt / txt.norm(dim=-1, keepdim=True)
    return model.logit_scale.exp(), (img * txt).sum(-1)


def test_pickscore_matches_the_official_formula(clip_dir):
    from diffalign.scorers.pickscore import PickScore

    ims = images()
    scale, cos = official_clip_cosine(clip_dir, ims, PROMPTS)
    scores = PickScore(clip_dir, batch_size=3).score(ims, PROMPTS)
    assert set(scores) == {"overall"}
    torch.testing.assert_close(scores["overall"], scale * cos, atol=1e-4, rtol=1e-4)
    assert scores["overall"].std() > 0  # the images and prompts are told apart


def test_pickscore_preference_is_its_softmax(clip_dir):
    from diffalign.scorers.pickscore import PickScore

    scorer = PickScore(clip_dir)
    a, b = images(seed=1), images(seed=2)
    sa, sb = scorer.score(a, PROMPTS)["overall"], scorer.score(b, PROMPTS)["overall"]
    pref = scorer.prefer(a, b, PROMPTS)
    assert pref.calibrated
    torch.testing.assert_close(pref.prob, torch.softmax(torch.stack([sa, sb], -1), -1)[:, 0])


@pytest.mark.parametrize("convention", ["hessel", "torchmetrics", "raw"])
def test_clipscore_conventions(clip_dir, convention):
    from diffalign.scorers.clipscore import CLIPScore

    ims = images()
    prefix = "A photo depicts " if convention == "hessel" else ""
    _, cos = official_clip_cosine(clip_dir, ims, [prefix + p for p in PROMPTS], transform="openai")
    expected = {"hessel": 2.5 * cos.clamp(min=0), "torchmetrics": (100 * cos).clamp(min=0), "raw": cos}[convention]
    got = CLIPScore(clip_dir, convention=convention).score(ims, PROMPTS)["overall"]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_tensor_path_is_differentiable_and_close(clip_dir):
    from diffalign.scorers.pickscore import PickScore

    check_tensor_path(PickScore(clip_dir), torch.rand(2, 3, 256, 256), PROMPTS[:2])


def test_a_wrong_or_missing_key_fails_loudly(tmp_path, clip_dir):
    from safetensors.torch import load_file, save_file

    from diffalign.scorers.pickscore import PickScore
    from diffalign.scorers.weights import ScorerWeightsError

    sd = load_file(clip_dir / "model.safetensors")
    for name, broken in {
        "missing": {k: v for k, v in sd.items() if k != "visual_projection.weight"},
        "unexpected": {**sd, "extra.weight": torch.zeros(1)},
        "shape": {**sd, "text_projection.weight": torch.zeros(3, 3)},
    }.items():
        folder = write_clip_folder(tmp_path / name)
        save_file(broken, folder / "model.safetensors")
        with pytest.raises(ScorerWeightsError, match={"missing": "missing: visual_projection.weight", "unexpected": "extra.weight",
                                                      "shape": "text_projection.weight"}[name]):
            PickScore(folder)
    with pytest.raises(ScorerWeightsError, match="no tokenizer files"):
        PickScore(write_clip_folder(tmp_path / "notok", tokenizer=False))


def test_repeated_prompts_are_encoded_once_and_score_as_alone(clip_dir):
    from diffalign.scorers.pickscore import PickScore

    scorer = PickScore(clip_dir)
    ims = images()
    prompts = [PROMPTS[0], PROMPTS[3], PROMPTS[0], PROMPTS[3]]  # the long one padded beside the short one
    together = scorer.score(ims, prompts)["overall"]
    alone = torch.cat([scorer.score([im], [p])["overall"] for im, p in zip(ims, prompts)])
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-4)


def test_dtype_may_be_named(clip_dir):
    from diffalign.scorers.base import ScorerConfigError
    from diffalign.scorers.pickscore import PickScore

    assert PickScore(clip_dir, dtype="bfloat16").model.dtype == torch.bfloat16
    with pytest.raises(ScorerConfigError, match="unknown dtype 'half-ish'"):
        PickScore(clip_dir, dtype="half-ish")
