"""Model loading from local diffusers directories, family detection, offline hub ids, tokenizer, VAE dtype."""

from __future__ import annotations

import pytest
import torch

from diffalign.config import BUILTIN_TINY_SDXL, BUILTIN_TOY, ModelConfig
from diffalign.config.base import BUILTIN_MODELS
from diffalign.models.loading import ModelLoadError, encode_prompts, load_components, vae_encode_dtype
from diffalign.models.tiny import tiny_sd15_pipeline, tiny_sdxl_pipeline


@pytest.mark.parametrize("family,builder,pred", [("sdxl", tiny_sdxl_pipeline, "epsilon"), ("sd15", tiny_sd15_pipeline, "v_prediction")])
def test_local_directory_loads_with_family_and_prediction_type(tmp_path, family, builder, pred):
    pipe = builder(prediction_type=pred)
    pipe.save_pretrained(tmp_path / "model")
    c = load_components(ModelConfig(pretrained=str(tmp_path / "model")))
    assert c.family == family and c.prediction_type == pred
    assert len(c.text_encoders) == (2 if family == "sdxl" else 1)
    for a, b in zip(c.unet.state_dict().values(), pipe.unet.state_dict().values()):
        assert torch.equal(a, b)
    embeds, pooled = encode_prompts(c, ["a red circle"])
    assert embeds.shape == (1, 77, 64 if family == "sdxl" else 32)
    assert (pooled is not None) == (family == "sdxl")
    # the configured prediction type overrides the scheduler's
    c2 = load_components(ModelConfig(pretrained=str(tmp_path / "model"), prediction_type="epsilon"))
    assert c2.prediction_type == "epsilon" and c2.scheduler.config.prediction_type == "epsilon"


def test_sdxl_conditioning_is_penultimate_hidden_states_and_projected_pool():
    c = load_components(ModelConfig())
    ids = [tok(["a cat"], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids for tok in c.tokenizers]
    out1 = c.text_encoders[0](ids[0], output_hidden_states=True)
    out2 = c.text_encoders[1](ids[1], output_hidden_states=True)
    embeds, pooled = encode_prompts(c, ["a cat"])
    torch.testing.assert_close(embeds, torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1))
    torch.testing.assert_close(pooled, out2.text_embeds)


@pytest.mark.parametrize("zeros", [True, False])
def test_guidance_uses_the_pipelines_empty_prompt_convention(tmp_path, zeros):
    from diffalign.models.loading import build_pipeline

    pipe = tiny_sdxl_pipeline()
    pipe.register_to_config(force_zeros_for_empty_prompt=zeros)
    pipe.save_pretrained(tmp_path / "model")
    c = load_components(ModelConfig(pretrained=str(tmp_path / "model")))
    assert c.zero_empty_prompt is zeros
    with torch.no_grad():
        _, negative, _, negative_pooled = build_pipeline(c).encode_prompt("a cat", do_classifier_free_guidance=True)
        empty, empty_pooled = encode_prompts(c, [""])
    if zeros:
        assert not negative.any() and not negative_pooled.any()
    else:
        torch.testing.assert_close(negative, empty)
        torch.testing.assert_close(negative_pooled, empty_pooled)


def test_separate_vae_is_loaded_from_its_own_directory(tmp_path):
    tiny_sdxl_pipeline().save_pretrained(tmp_path / "model")
    vae = tiny_sdxl_pipeline(seed=5).vae
    vae.save_pretrained(tmp_path / "vae")
    c = load_components(ModelConfig(pretrained=str(tmp_path / "model"), vae=str(tmp_path / "vae")))
    assert all(torch.equal(a, b) for a, b in zip(c.vae.state_dict().values(), vae.state_dict().values()))


def test_offline_hub_id_not_in_cache_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelLoadError, match=r"model.pretrained: could not load .* 'no-such-org/no-such-model"):
        load_components(ModelConfig(pretrained="no-such-org/no-such-model"))


def test_vae_encodes_fp32_unless_a_configured_fp16_safe_vae_is_given():
    assert vae_encode_dtype(ModelConfig(), "fp16") == torch.float32
    assert vae_encode_dtype(ModelConfig(vae_fp16_safe=True), "fp16") == torch.float32  # no separate VAE named
    fixed = ModelConfig(pretrained="stabilityai/stable-diffusion-xl-base-1.0", vae="madebyollin/sdxl-vae-fp16-fix", vae_fp16_safe=True)
    assert vae_encode_dtype(fixed, "fp16") == torch.float16
    assert vae_encode_dtype(fixed, "no") == torch.float32


def test_tokenizer_has_the_real_clip_vocabulary():
    import open_clip

    from diffalign.models.tokenizer import build_clip_tokenizer

    tok = build_clip_tokenizer()
    assert len(tok) == 49408
    text = ["a photograph of an astronaut riding a horse", "two red circles on a white background"]
    ours = tok(text, padding="max_length", max_length=77, truncation=True).input_ids
    theirs = open_clip.get_tokenizer("ViT-L-14")(text)
    for a, b in zip(ours, theirs.tolist()):
        n = a.index(49407) + 1
        assert a[:n] == b[:n]
    assert tok.decode(ours[0], skip_special_tokens=True).strip() == text[0]


def test_the_loader_refuses_what_the_config_would_have_refused(tmp_path):
    """A config changed after validation (assignment validates only the assigned field) still gets the builtin checks."""
    cfg = ModelConfig(pretrained=str(tmp_path / "model"), vae=str(tmp_path / "vae"))
    cfg.pretrained = BUILTIN_TINY_SDXL
    with pytest.raises(ModelLoadError, match=rf"model.vae: {BUILTIN_TINY_SDXL} uses its own VAE.*{tmp_path / 'vae'}"):
        load_components(cfg)
    typo = ModelConfig.model_construct(pretrained=BUILTIN_TINY_SDXL + "x")
    with pytest.raises(ModelLoadError, match=rf"model.pretrained: unknown builtin model; the builtin models are {', '.join(BUILTIN_MODELS)}"):
        load_components(typo)


def test_loading_a_builtin_model_writes_no_library_noise(capfd):
    """transformers draws a "Loading weights" bar per text encoder of the toy model; none reaches the console."""
    capfd.readouterr()
    load_components(ModelConfig(pretrained=BUILTIN_TOY))
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "it/s" not in err, err


def test_quiet_loading_drops_only_the_noise_and_restores_the_libraries_state():
    import logging
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from diffalign.models.quiet import CAST_LOGGER, quiet_loading
    from diffalign.models.tiny import tiny_vae

    bars = (transformers_logging.is_progress_bar_enabled(), diffusers_logging.is_progress_bar_enabled())
    logger, seen = logging.getLogger(CAST_LOGGER), []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())
    filters = list(logger.filters)
    real = "There are modules in X that should be kept in float32: ['norm']. Casting directly with `to()` ..."
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with quiet_loading():
                assert not transformers_logging.is_progress_bar_enabled() and not diffusers_logging.is_progress_bar_enabled()
                tiny_vae().to(dtype=torch.float32)  # diffusers warns "...kept in float32: []" on any dtype cast
                logger.warning(real)
                logger.error("a genuine error")
                warnings.warn("a genuine warning")
    finally:
        logger.removeHandler(handler)
    assert seen == [real, "a genuine error"]
    assert [str(w.message) for w in caught] == ["a genuine warning"]
    assert (transformers_logging.is_progress_bar_enabled(), diffusers_logging.is_progress_bar_enabled()) == bars
    assert logger.filters == filters
