"""MPS: a tiny random MPS written as the release does (a pickled whole module) and as plain state dicts,
scored through diffalign and by the official formula with the official-structure classes, transformers'
image processor and the folder's tokenizer."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from tiny_scorers import (
    MPS_TINY_CROSS,
    PROMPTS,
    check_tensor_path,
    images,
    official_mps,
    official_mps_importable,
    write_mps_clip_folder,
    write_mps_pickle,
    write_mps_state_dict,
)

THRESHOLDS = (0.3, 0.01, 0.8)  # the eval scripts', training's, and one that masks most tokens


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mps_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("mps")
    clip_dir = write_mps_clip_folder(root / "clip")
    module = official_mps(clip_dir)
    return {
        "clip": clip_dir,
        "module": module,
        "pickle": write_mps_pickle(root / "MPS_overall_checkpoint.pth", module),
        "state_dict": write_mps_state_dict(root / "mps.pt", module),
        "diffsynth": write_mps_state_dict(root / "mps_diffsynth.safetensors", module),
        "imscore": write_mps_state_dict(root / "mps_imscore.safetensors", module, prefix="mps."),
    }


def load(files, fmt, **kwargs):
    from diffalign.scorers.mps import MPS

    if fmt == "pickle":
        return MPS(files["pickle"], tokenizer=files["clip"], **kwargs)
    return MPS(files[fmt], clip_config=files["clip"], cross_config=MPS_TINY_CROSS, **kwargs)


def official_scores(files, pil_images, prompts, thresholds):
    """eval_overall_mps_on_hpdv2.py ``infer_one_sample`` (one image and prompt at a time, in float32) for
    every condition and threshold: {(dimension, threshold): (B,)}."""
    from transformers import AutoTokenizer, CLIPImageProcessorPil

    from diffalign.scorers.mps import CONDITIONS

    module, processor = files["module"], CLIPImageProcessorPil()
    tokenizer = AutoTokenizer.from_pretrained(files["clip"])

    def tokenize(text):
        return tokenizer(text, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                         return_tensors="pt").input_ids

    def infer_one_sample(image, prompt, condition, threshold):
        image_input = processor(image.convert("RGB"), return_tensors="pt")["pixel_values"]
        text_input = tokenize(prompt)
        condition_batch = tokenize(condition).repeat(text_input.shape[0], 1)
        text_f, text_features = module.model.get_text_features(text_input)
        image_f = module.model.get_image_features(image_input)
        condition_f, _ = module.model.get_text_features(condition_batch)
        sim = torch.einsum("b i d, b j d -> b j i", text_f, condition_f)
        sim = torch.max(sim, dim=1, keepdim=True)[0]
        sim = sim / sim.max()
        mask = torch.where(sim > threshold, 0, float("-inf")).repeat(1, image_f.shape[1], 1)
        image_features = module.cross_model(image_f, text_f, mask)[:, 0, :]
        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
        text_features = text_features / text_features.norm(dim=-1, keepdim=True)
        return (module.logit_scale.exp() * text_features @ image_features.T)[0, 0]

    with torch.no_grad():
        return {(dimension, threshold): torch.stack([infer_one_sample(im, p, condition, threshold)
                                                     for im, p in zip(pil_images, prompts)])
                for dimension, condition in CONDITIONS.items() for threshold in thresholds}


@pytest.fixture(scope="module")
def official(mps_files):
    return official_scores(mps_files, images(), PROMPTS, THRESHOLDS)


@pytest.mark.parametrize("fmt", ["pickle", "state_dict", "diffsynth", "imscore"])
def test_every_format_matches_the_official_formula(mps_files, official, fmt):
    from diffalign.scorers.mps import CONDITIONS

    ims = images()
    got = {}
    for threshold in THRESHOLDS:
        scorer = load(mps_files, fmt, mask_threshold=threshold, batch_size=3)
        assert scorer.dimensions == ("overall", "aesthetics", "quality", "semantic")
        got[threshold] = scores = scorer.score(ims, PROMPTS)
        assert set(scores) == set(CONDITIONS)
        for dimension in CONDITIONS:
            torch.testing.assert_close(scores[dimension], official[dimension, threshold], atol=2e-3, rtol=1e-4,
                                       msg=lambda m: f"{fmt} {dimension} τ={threshold}: {m}")
        assert scores["overall"].std() > 0
    # the mask matters (random tiny features are alike, so at τ = 0.3 most prompt tokens pass; 0.8 bites)
    assert not torch.allclose(got[0.8]["overall"], got[0.01]["overall"], atol=1e-3)
    assert any(not torch.allclose(got[0.8]["overall"], got[0.8][d], atol=1e-3) for d in ("aesthetics", "quality", "semantic"))


def test_condition_mask_is_the_official_formula():
    from diffalign.scorers.mps import condition_mask

    prompt = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]], [[2.0, 0.0], [0.0, 0.2], [-1.0, 0.0]]])
    condition = torch.tensor([[1.0, 0.0], [0.0, 0.4]])
    # best similarities: [1, .4, .5] / 1 and [2, .08, 0] / 2 (-1 vs both conditions: max(-1, 0) = 0)
    inf = float("-inf")
    torch.testing.assert_close(condition_mask(prompt, condition, 0.45), torch.tensor([[0.0, inf, 0.0], [0.0, inf, inf]]))
    torch.testing.assert_close(condition_mask(prompt, condition, 0.03), torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, inf]]))
    # per prompt: the second prompt's larger scale does not change the first's mask
    torch.testing.assert_close(condition_mask(prompt[:1], condition, 0.45), condition_mask(prompt, condition, 0.45)[:1])


def test_the_pickle_loads_without_the_official_code(mps_files):
    from diffalign.scorers.mps import MPS

    assert "trainer.models.clip_model" not in sys.modules and importlib.util.find_spec("trainer") is None
    with pytest.raises(ModuleNotFoundError):  # a plain torch.load needs the official classes importable
        torch.load(mps_files["pickle"], weights_only=False)
    scorer = MPS(mps_files["pickle"], tokenizer=mps_files["clip"])
    from diffalign.scorers.restricted_pickle import PickledObject

    allowlisted = [g[0] if isinstance(g, tuple) else g for g in torch.serialization.get_safe_globals()]
    assert not [g for g in allowlisted if isinstance(g, type) and issubclass(g, PickledObject)]  # only while loading
    assert scorer.network.model.text_model.eos_token_id == 2  # legacy argmax EOS pooling (MPS#2)
    sizes = scorer.network.cross_model.layers[0][1].fn
    assert (len(scorer.network.cross_model.layers), sizes.heads, sizes.dim_head) == (2, 2, 16)
    official = mps_files["module"].cross_model.state_dict()
    torch.testing.assert_close(scorer.network.cross_model.layers[1][1].fn.rotary_emb.inv_freq,
                               official["layers.1.1.fn.rotary_emb.inv_freq"])  # read from the file, not recomputed


class _Exec:
    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return exec, (self.code,)


class _System:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        import os

        return os.system, (self.command,)


@pytest.mark.parametrize("payload,refused", [(_Exec, "builtins.exec"), (_System, r"(posix|nt)\.system")])
def test_a_pickle_with_a_forbidden_global_is_refused_and_nothing_runs(tmp_path, mps_files, payload, refused):
    from diffalign.scorers.mps import MPS
    from diffalign.scorers.weights import ScorerWeightsError

    marker = tmp_path / "ran"
    code = f"open({str(marker)!r}, 'w').close()" if payload is _Exec else f"touch {marker}"
    evil = tmp_path / "evil.pth"
    torch.save({"model.logit_scale": torch.zeros(()), "hook": payload(code)}, evil)
    with pytest.raises(ScorerWeightsError, match=f"refused to unpickle: it names the global {refused}"):
        MPS(evil, tokenizer=mps_files["clip"])
    assert not marker.exists()
    # a raw protocol-0 pickle calling builtins.eval, not even a torch file
    raw = tmp_path / "raw.pth"
    raw.write_bytes(b"cbuiltins\neval\n(V__import__('pathlib').Path(" + repr(str(marker)).encode() + b").touch()\ntR.")
    with pytest.raises(ScorerWeightsError, match="refused to unpickle: it names the global builtins.eval"):
        MPS(raw, tokenizer=mps_files["clip"])
    assert not marker.exists()


def test_a_wrong_missing_or_unexpected_key_fails_loudly(tmp_path, mps_files):
    from diffalign.scorers.mps import MPS
    from diffalign.scorers.weights import ScorerWeightsError

    sd = torch.load(mps_files["state_dict"], weights_only=True)
    cases = {
        "missing: cross_model.layers.1.0.fn.norm.bias": {
            k: v for k, v in sd.items() if k != "cross_model.layers.1.0.fn.norm.bias"},
        "unexpected: cross_model.layers.2.0.fn.to_q.weight": {**sd, "cross_model.layers.2.0.fn.to_q.weight": torch.zeros(32, 32)},
        "wrong shape: cross_model.layers.0.1.fn.fused_attn_ff_proj.weight": {
            **sd, "cross_model.layers.0.1.fn.fused_attn_ff_proj.weight": torch.zeros(3, 32)},
    }
    for message, broken in cases.items():
        path = tmp_path / "broken.pt"
        torch.save(broken, path)
        with pytest.raises(ScorerWeightsError, match=message):
            MPS(path, clip_config=mps_files["clip"], cross_config=MPS_TINY_CROSS)
    with pytest.raises(ScorerWeightsError, match="wrong shape"):  # the official sizes do not fit the tiny file
        MPS(mps_files["state_dict"], clip_config=mps_files["clip"])
    with pytest.raises(ScorerWeightsError, match="tokenizer=DIR"):
        MPS(mps_files["pickle"])
    not_mps = tmp_path / "not_mps.pth"
    with official_mps_importable():
        torch.save(mps_files["module"].cross_model, not_mps)
    with pytest.raises(ScorerWeightsError, match="not MPS"):
        MPS(not_mps, tokenizer=mps_files["clip"])


def test_prefer_is_the_softmax_and_the_tensor_path_is_differentiable(mps_files):
    scorer = load(mps_files, "pickle")
    a, b = images(seed=1), images(seed=2)
    sa, sb = scorer.score(a, PROMPTS)["overall"], scorer.score(b, PROMPTS)["overall"]
    pref = scorer.prefer(a, b, PROMPTS)
    assert pref.calibrated
    torch.testing.assert_close(pref.prob, torch.softmax(torch.stack([sa, sb], -1), -1)[:, 0])

    check_tensor_path(scorer, torch.rand(2, 3, 256, 256), PROMPTS[:2], dims=("overall", "semantic"))
