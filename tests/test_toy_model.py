"""The shipped toy model loads from the package and draws what it is asked, well above chance."""

from __future__ import annotations

from pathlib import Path

import torch

from diffalign.config import ModelConfig
from diffalign.models.loading import load_components
from diffalign.models.sampling import sample_images
from diffalign.toy.checklist import toy_checklist_scorer
from diffalign.toy.model import WEIGHTS_DIR
from diffalign.toy.scenes import HELD_OUT


def test_shipped_weights_are_small_fp16_safetensors():
    files = [p for p in WEIGHTS_DIR.rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert len(weights) == 4 and all(p.name.endswith(".fp16.safetensors") for p in weights)
    assert sum(p.stat().st_size for p in files) < 50 * 2**20
    from safetensors import safe_open

    for p in weights:
        with safe_open(str(p), "pt") as f:
            assert all(f.get_slice(k).get_dtype() == "F16" for k in f.keys())


def test_toy_model_guides_with_the_empty_caption_it_was_trained_on():
    # pretraining drops captions to the encoded "" (not to zeros), so classifier-free guidance must use it
    assert load_components(ModelConfig(pretrained="builtin:toy")).zero_empty_prompt is False


def test_toy_model_draws_held_out_captions_the_checklist_recognises():
    torch.set_num_threads(1)
    c = load_components(ModelConfig(pretrained="builtin:toy"))
    assert c.family == "sdxl" and c.vae_scale_factor == 4
    specs = HELD_OUT[::3]  # 21 captions never seen in pretraining
    prompts = [s.caption for s in specs]
    images = sample_images(c, prompts, [10_000 + i for i in range(len(prompts))], num_inference_steps=10, guidance_scale=3.0)
    scores = toy_checklist_scorer().score(images, prompts)
    yes = {k: (scores[k] > 0).float().mean().item() for k in ("colour", "shape", "background", "size")}
    # chance: colour 1/6, shape 1/3, background 1/3, size 1/3
    assert yes["colour"] >= 0.6 and yes["shape"] >= 0.6 and yes["background"] >= 0.9 and yes["size"] >= 0.6, yes


def test_pretraining_is_reproducible_by_seed(tmp_path):
    from diffalign.toy.model import load_toy_pipeline
    from diffalign.toy.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(vae_steps=2, unet_steps=2, batch=4, warmup=1, threads=1)
    a = load_toy_pipeline(pretrain(tmp_path / "a", cfg, progress=False))
    b = load_toy_pipeline(pretrain(tmp_path / "b", cfg, progress=False))
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        for (k, x), (_, y) in zip(getattr(a, name).state_dict().items(), getattr(b, name).state_dict().items()):
            assert torch.equal(x, y), f"{name}.{k} differs between two runs with the same seed"
    assert (Path(tmp_path / "a") / "pretrain.json").is_file()
