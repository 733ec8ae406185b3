"""NPO-CFG pipelines (`diffalign.pipelines`): the sampling loop against the formula written out by hand.

The hand version never uses adapters: the positive UNet θ_base + η and the negative UNet θ_base + α·η + β·δ are
separate UNets built by explicit state-dict arithmetic (W += up·down·alpha/r for every LoRA pair of the files, or
+ scale·(θ_full − θ_base)), and each step is ε = ε_neg + w·(ε_pos − ε_neg) then ``scheduler.step``, with
``scale_model_input`` applied as the pipelines do. The LoRA files are written by the calls the official Diffusion-NPO
scripts make (``convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))`` then ``save_lora_weights`` with
no adapter metadata: train_sd15.py L956-959, train_sdxl.py L1109-1116).
"""

from __future__ import annotations

import copy

import pytest
import torch
import yaml
from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

from diffalign.config import ModelConfig
from diffalign.models.errors import ModelLoadError
from diffalign.models.loading import build_pipeline, load_components
from diffalign.pipelines import StableDiffusionNPOPipeline, StableDiffusionXLNPOPipeline, find_weights, is_negative_model

pytestmark = pytest.mark.usefixtures("one_thread")

ALPHA, BETA, W = 0.3, 0.7, 4.0
PROMPTS = ["a red circle on a gray background", "a small blue square"]
FAMILIES = {"sd15": ("builtin:tiny-sd15", StableDiffusionNPOPipeline), "sdxl": ("builtin:tiny-sdxl", StableDiffusionXLNPOPipeline)}


def _base_pipe(family: str):
    return build_pipeline(load_components(ModelConfig(pretrained=FAMILIES[family][0])))


def _official_lora(pipe, folder, seed: int):
    """A rank-2 LoRA with random (non-zero) up and down matrices, saved as the official NPO scripts save."""
    unet = copy.deepcopy(pipe.unet)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if ".lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    type(pipe).save_lora_weights(str(folder), unet_lora_layers=layers)
    return folder / "pytorch_lora_weights.safetensors"


def _full_unet(pipe, folder, seed: int):
    """A full UNet (θ_base + noise) saved with save_pretrained, as Self-NPO's train.py saves its negative model."""
    unet = copy.deepcopy(pipe.unet)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    unet.save_pretrained(folder)
    return folder


def _lora_delta(file) -> dict[str, torch.Tensor]:
    """{UNet weight name: up @ down} read straight from the file (alpha = rank: scale 1, as the official LoRAs)."""
    tensors = load_file(str(file))
    delta = {}
    for key, down in tensors.items():
        if key.endswith(".lora.down.weight"):
            module = key[len("unet."): -len(".lora.down.weight")]
            delta[f"{module}.weight"] = tensors[key.replace(".lora.down.", ".lora.up.")] @ down
    return delta


def _unet_plus(pipe, *offsets):
    """A separate UNet: θ_base + Σ scale·offset, each offset a {name: tensor} dict."""
    unet = copy.deepcopy(pipe.unet)
    state = unet.state_dict()
    for scale, offset in offsets:
        for name, d in offset.items():
            state[name] = state[name] + scale * d
    unet.load_state_dict(state)
    return unet


def _full_delta(pipe, folder) -> dict[str, torch.Tensor]:
    from diffusers import UNet2DConditionModel

    full, base = UNet2DConditionModel.from_pretrained(folder).state_dict(), pipe.unet.state_dict()
    return {k: full[k] - base[k] for k in base}


@torch.no_grad()
def _hand_loop(pipe, pos_unet, neg_unet, latents, *, negative_prompt=None, steps=3):
    """The NPO-CFG sampling loop, step by step, with two plain UNets."""
    sched = pipe.scheduler
    sched.set_timesteps(steps)
    n = len(PROMPTS)
    if isinstance(pipe, StableDiffusionXLPipeline):
        c, c_neg, pooled, pooled_neg = pipe.encode_prompt(PROMPTS, negative_prompt=negative_prompt, device="cpu")
        ids = pipe._get_add_time_ids((32, 32), (0, 0), (32, 32), dtype=c.dtype,
                                     text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim).repeat(n, 1)
        pos_kw = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}}
        neg_kw = {"added_cond_kwargs": {"text_embeds": pooled_neg, "time_ids": ids}}
    else:
        c, c_neg = pipe.encode_prompt(PROMPTS, "cpu", 1, True, negative_prompt and [negative_prompt] * n)
        pos_kw, neg_kw = {}, {}
    x = latents * sched.init_noise_sigma
    for t in sched.timesteps:
        x_in = sched.scale_model_input(x, t)
        eps_pos = pos_unet(x_in, t, encoder_hidden_states=c, **pos_kw).sample
        eps_neg = neg_unet(x_in, t, encoder_hidden_states=c_neg, **neg_kw).sample
        x = sched.step(eps_neg + W * (eps_pos - eps_neg), t, x).prev_sample
    return x


def _npo_latents(npo, latents, *, negative_prompt=None, steps=3, guidance=W):
    return npo(PROMPTS, negative_prompt=negative_prompt and [negative_prompt] * len(PROMPTS), num_inference_steps=steps,
               guidance_scale=guidance, height=32, width=32, latents=latents.clone(), output_type="latent").images


def _start(pipe, seed=0):
    return torch.randn((len(PROMPTS), pipe.unet.config.in_channels, 4, 4), generator=torch.Generator().manual_seed(seed))


def test_the_official_lora_format_has_the_keys_the_npo_scripts_write(tmp_path):
    """convert_state_dict_to_diffusers + save_lora_weights give `unet.<module>.lora.down/up.weight`, no metadata."""
    from safetensors import safe_open

    file = _official_lora(_base_pipe("sd15"), tmp_path, seed=1)
    keys = list(load_file(str(file)))
    assert keys and all(k.startswith("unet.") and (k.endswith(".lora.down.weight") or k.endswith(".lora.up.weight")) for k in keys)
    assert any(".attn2.to_k.lora.down.weight" in k for k in keys)  # cross-attention too
    with safe_open(str(file), framework="pt") as f:
        assert "lora_adapter_metadata" not in (f.metadata() or {})


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
@pytest.mark.parametrize("negative_prompt", [None, "a green triangle"])
def test_npo_cfg_equals_the_hand_written_loop(tmp_path, family, scheduler, negative_prompt):
    base = _base_pipe(family)
    if scheduler == "euler":  # an Euler-type sampler: scale_model_input divides by sqrt(σ² + 1), init sigma > 1
        base.scheduler = EulerDiscreteScheduler.from_config(base.scheduler.config)
    eta_file = _official_lora(base, tmp_path / "eta", seed=1)
    delta_file = _official_lora(base, tmp_path / "delta", seed=2)
    eta, delta = _lora_delta(eta_file), _lora_delta(delta_file)
    pos_unet = _unet_plus(base, (1.0, eta))
    neg_unet = _unet_plus(base, (ALPHA, eta), (BETA, delta))
    expected = _hand_loop(base, pos_unet, neg_unet, _start(base), negative_prompt=negative_prompt)
    without_delta = _hand_loop(base, pos_unet, _unet_plus(base, (ALPHA, eta)), _start(base), negative_prompt=negative_prompt)

    npo = FAMILIES[family][1].from_pipe(base).load_npo(delta_file, positive=eta_file, alpha=ALPHA, beta=BETA)
    got = _npo_latents(npo, _start(base), negative_prompt=negative_prompt)
    assert npo.unet is base.unet  # ONE UNet, adapters switched per branch
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    # The formula is not met by accident: without δ in the negative branch the result differs.
    assert not torch.allclose(got, without_delta, rtol=1e-4, atol=1e-5)


def test_lora_alpha_and_the_positive_scale_enter_both_branches(tmp_path):
    """A diffalign LoRA export (alpha 1 for rank 2: ΔW = ½·up·down, read from its metadata) as η at positive_scale 0.5:
    positive θ + 0.5·η, negative θ + α·0.5·η + β·δ."""
    from diffalign.config import LoraConfig
    from diffalign.models.lora import attach_lora, save_lora

    base = _base_pipe("sd15")
    unet = copy.deepcopy(base.unet)
    attach_lora(unet, LoraConfig(rank=2, alpha=1.0, init="gaussian"))
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if ".lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    eta_file = save_lora(unet, tmp_path / "eta", "sd15")
    delta_file = _official_lora(base, tmp_path / "delta", seed=2)
    eta = {k: 0.5 * v for k, v in _lora_delta(eta_file).items()}  # alpha / rank = ½
    expected = _hand_loop(base, _unet_plus(base, (0.5, eta)), _unet_plus(base, (ALPHA * 0.5, eta), (BETA, _lora_delta(delta_file))), _start(base))
    npo = StableDiffusionNPOPipeline.from_pipe(base).load_npo(delta_file, positive=eta_file, alpha=ALPHA, beta=BETA, positive_scale=0.5)
    torch.testing.assert_close(_npo_latents(npo, _start(base)), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ModelLoadError, match="already called"):
        npo.load_npo(delta_file)


def test_without_load_npo_the_pipeline_is_diffusers_own(tmp_path):
    """A LoRA loaded the diffusers way stays active when load_npo was never called."""
    base = _base_pipe("sd15")
    expected_plain = _npo_latents(base, _start(base))
    npo = StableDiffusionNPOPipeline.from_pipe(_base_pipe("sd15"))
    npo.load_lora_weights(str(_official_lora(base, tmp_path, seed=1).parent))
    with_lora = _npo_latents(npo, _start(base))
    assert not torch.allclose(with_lora, expected_plain, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(_npo_latents(npo, _start(base)), with_lora)  # and it stays on after the call


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_the_positive_branch_never_sees_delta(tmp_path, family):
    """Guidance 1 (no CFG batch): only the positive branch runs, and it is θ_base + η whatever δ and β are."""
    base = _base_pipe(family)
    eta_file, delta_file = _official_lora(base, tmp_path / "eta", seed=1), _official_lora(base, tmp_path / "delta", seed=2)
    plain = copy.deepcopy(base)
    plain.unet = _unet_plus(base, (1.0, _lora_delta(eta_file)))
    npo = FAMILIES[family][1].from_pipe(base).load_npo(delta_file, positive=eta_file, alpha=ALPHA, beta=5.0)
    kw = dict(num_inference_steps=2, guidance_scale=1.0, height=32, width=32, output_type="latent")
    got = npo(PROMPTS, latents=_start(base), **kw).images
    torch.testing.assert_close(got, plain(PROMPTS, latents=_start(base), **kw).images, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_alpha_beta_zero_without_eta_is_the_plain_diffusers_pipeline(tmp_path, family):
    base = _base_pipe(family)
    delta_file = _official_lora(base, tmp_path, seed=2)
    expected = _npo_latents(base, _start(base))
    npo = FAMILIES[family][1].from_pipe(base).load_npo(delta_file, alpha=0.0, beta=0.0)
    torch.testing.assert_close(_npo_latents(npo, _start(base)), expected, rtol=1e-4, atol=1e-5)
    with_delta = FAMILIES[family][1].from_pipe(_base_pipe(family)).load_npo(delta_file, alpha=0.0, beta=1.0)
    assert not torch.allclose(_npo_latents(with_delta, _start(base)), expected, rtol=1e-4, atol=1e-5)


def test_full_weight_offsets_merge_into_a_second_unet(tmp_path):
    """η and δ as full UNets (Self-NPO's format): negative = θ_base + α(θ_pos − θ_base) + β(θ_npo − θ_base)."""
    base = _base_pipe("sd15")
    pos_dir, npo_dir = _full_unet(base, tmp_path / "pos", seed=3), _full_unet(base, tmp_path / "npo", seed=4)
    eta, delta = _full_delta(base, pos_dir), _full_delta(base, npo_dir)
    expected = _hand_loop(base, _unet_plus(base, (1.0, eta)), _unet_plus(base, (ALPHA, eta), (BETA, delta)), _start(base))
    npo = StableDiffusionNPOPipeline.from_pipe(base).load_npo(npo_dir, positive=pos_dir, alpha=ALPHA, beta=BETA)
    assert npo.branches.negative_unet is not npo.branches.positive_unet
    torch.testing.assert_close(_npo_latents(npo, _start(base)), expected, rtol=1e-4, atol=1e-5)


def test_a_full_npo_unet_with_a_lora_eta(tmp_path):
    """Mixed: η a LoRA (adapter on the positive UNet), δ a full UNet (merged into the negative one, with α·η)."""
    base = _base_pipe("sdxl")
    eta_file, npo_dir = _official_lora(base, tmp_path / "eta", seed=1), _full_unet(base, tmp_path / "npo", seed=4)
    eta, delta = _lora_delta(eta_file), _full_delta(base, npo_dir)
    expected = _hand_loop(base, _unet_plus(base, (1.0, eta)), _unet_plus(base, (ALPHA, eta), (BETA, delta)), _start(base))
    npo = StableDiffusionXLNPOPipeline.from_pipe(base).load_npo(npo_dir, positive=eta_file, alpha=ALPHA, beta=BETA)
    torch.testing.assert_close(_npo_latents(npo, _start(base)), expected, rtol=1e-4, atol=1e-5)


def test_weights_are_found_in_every_shipped_layout_and_bad_ones_refused(tmp_path):
    base = _base_pipe("sd15")
    lora = _official_lora(base, tmp_path / "lora", seed=1)
    assert find_weights(lora).kind == "lora" and find_weights(lora.parent).path == lora
    full = _full_unet(base, tmp_path / "run" / "final" / "unet", seed=3)
    assert find_weights(full).kind == "unet" and find_weights(full.parent).path == full  # diffalign's final/unet
    (tmp_path / "weights.bin").write_bytes(b"x")
    for bad, message in [(tmp_path / "missing", "no such file"), (tmp_path / "weights.bin", "safetensors"), (tmp_path / "run", "neither")]:
        with pytest.raises(ModelLoadError, match=message):
            find_weights(bad)
    sdxl_lora = _official_lora(_base_pipe("sdxl"), tmp_path / "sdxl", seed=1)
    with pytest.raises(ModelLoadError, match="does not fit"):
        StableDiffusionNPOPipeline.from_pipe(base).load_npo(sdxl_lora)
    with pytest.raises(ModelLoadError, match="differ from the pipeline"):
        StableDiffusionXLNPOPipeline.from_pipe(_base_pipe("sdxl")).load_npo(full)


def test_negative_models_are_recognised_by_the_method_that_trained_them(tmp_path):
    for method, negative in [("npo", True), ("dpo", False)]:
        final = tmp_path / method / "final"
        final.mkdir(parents=True)
        (final / "config.yaml").write_text(yaml.safe_dump({"model": {"pretrained": "builtin:toy"}, "method": {"name": method}}))
        (final / "pytorch_lora_weights.safetensors").write_bytes(b"")
        assert is_negative_model(final) is negative
        assert is_negative_model(final / "pytorch_lora_weights.safetensors") is negative
    assert is_negative_model(tmp_path) is False


def test_a_call_decodes_images_and_leaves_the_pipeline_as_it_was(tmp_path):
    base = _base_pipe("sd15")
    base.scheduler = DDIMScheduler.from_config(base.scheduler.config)
    npo = StableDiffusionNPOPipeline.from_pipe(base).load_npo(_official_lora(base, tmp_path, seed=2))
    unet, config = npo.unet, dict(npo.config)
    out = npo(PROMPTS[0], num_inference_steps=2, guidance_scale=3.0, height=32, width=32)
    assert out.images[0].size == (32, 32)
    assert npo.unet is unet and dict(npo.config) == config  # the branch switch is undone after the call
    assert isinstance(npo, StableDiffusionPipeline)
