"""Recipe parity: every shipped config headed "official" equals the official run's values, except the deviations its
header lists; each deviation is printed (`pytest -s tests/test_recipe_parity.py`).

Every shipped config says what it is on a `# Recipe:` line: `official` (checked here against `OFFICIAL`),
`reconstructed` (a method without official values: nothing to compare, skipped by name below) or `toy` (a
configuration of the toy world or the tiny models, tuned or chosen here, not a published run).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import config_header

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# The official values, each with its source (research/dpo_anchors.md, read from the official code and launchers).
_DIFFUSION_DPO = {  # SalesforceAIResearch/DiffusionDPO train.py defaults + launchers
    "model.finetune": "full",  # train.py trains the whole UNet beside a frozen ref_unet
    "model.attention": "xformers",  # train.py raises without xformers
    "data.crop": "center",  # CenterCrop unless --random_crop
    "data.random_flip": True,  # RandomHorizontalFlip unless --no_hflip
    "data.flip_at": "train",  # the torchvision transform flips on every access
    "data.pairing": "per_image",  # the transform runs on each image of the pair
    "data.resize": "official",  # transforms.Resize(resolution, BILINEAR): truncates the long side
    "data.ties": "drop",  # "Eliminated ... split decisions"
    "data.caption_dropout": 0.2,  # --proportion_empty_prompts default 0.2 (since 8d3ee5c; the launchers pass no flag)
    "method.name": "dpo",
    "method.beta": 5000.0,  # launchers: --beta_dpo 5000
    "optim.lr": 1e-8,  # launchers: --learning_rate=1e-8
    "optim.scale_lr": True,  # launchers: --scale_lr
    "optim.weight_decay": 1e-2,  # --adam_weight_decay default
    "optim.schedule": "constant_with_warmup",  # launchers: --lr_scheduler
    "optim.max_grad_norm": 1.0,  # --max_grad_norm default (skipped only with an explicit --use_adafactor)
    "train.seed": None,  # no --seed: random
    "train.max_steps": 2000,  # launchers: --max_train_steps=2000
    "train.batch_size": 1,  # launchers: --train_batch_size=1
    "train.grad_accum": 128,  # launchers: 16 GPUs x 1 x 128 = 2048
    "train.mixed_precision": "fp16",  # --mixed_precision default
    "train.allow_tf32": False,  # --allow_tf32 not passed
    "train.resume": "latest",  # --resume_from_checkpoint default
    "train.ema.enabled": False,  # no EMA
    "log.tracker": "tensorboard",  # --report_to default
    "log.every": 1,
    "eval.validation_every": 0,  # no validation images
}
OFFICIAL = {
    "sd15_dpo": {
        **_DIFFUSION_DPO,
        "model.pretrained": "runwayml/stable-diffusion-v1-5",  # launchers/sd15.sh MODEL_NAME
        "model.vae": None,
        "model.vae_fp16_safe": True,  # the VAE is cast to fp16 and encodes every step
        "model.reference_offload": False,  # ref_unet on the GPU for SD1.5
        "model.gradient_checkpointing": False,  # only forced for SDXL
        "data.resolution": 512,
        "optim.optimizer": "adamw",
        "optim.betas": [0.9, 0.999],
        "optim.eps": 1e-8,
        "optim.warmup_steps": 500,  # launchers/sd15.sh --lr_warmup_steps=500
        "train.checkpoint_every": 500,  # launchers/sd15.sh --checkpointing_steps 500
    },
    "sdxl_dpo": {
        **_DIFFUSION_DPO,
        "model.pretrained": "stabilityai/stable-diffusion-xl-base-1.0",  # launchers/sdxl.sh MODEL_NAME
        "model.vae": "madebyollin/sdxl-vae-fp16-fix",  # launchers/sdxl.sh VAE
        "model.vae_fp16_safe": True,
        "model.reference_offload": True,  # train.py wraps ref_unet in accelerate.cpu_offload for SDXL
        "model.gradient_checkpointing": True,  # forced with --sdxl
        "data.resolution": 1024,
        "data.time_ids": "fixed",  # [res, res, 0, 0, res, res]
        "optim.optimizer": "adafactor",  # forced with --sdxl
        "optim.warmup_steps": 200,  # launchers/sdxl.sh --lr_warmup_steps=200
        "train.checkpoint_every": 200,  # launchers/sdxl.sh --checkpointing_steps 200
    },
    "sdxl_dpo_lora": {  # huggingface/diffusers examples/research_projects/diffusion_dpo: README SDXL command + script defaults
        "model.pretrained": "stabilityai/stable-diffusion-xl-base-1.0",
        "model.vae": "madebyollin/sdxl-vae-fp16-fix",
        "model.vae_fp16_safe": False,  # the script keeps every VAE in fp32
        "model.finetune": "lora",
        "model.lora.rank": 8,  # README --rank=8
        "model.lora.alpha": 8.0,  # lora_alpha = rank
        "model.lora.dropout": 0.0,
        "model.lora.target_modules": ["to_k", "to_q", "to_v", "to_out.0"],
        "model.lora.init": "gaussian",
        "model.gradient_checkpointing": True,  # README --gradient_checkpointing
        "model.attention": "sdpa",  # xformers optional and not in the README: diffusers' default SDPA processor
        "data.resolution": 1024,
        "data.crop": "center",
        "data.random_flip": True,
        "data.flip_at": "train",  # flipped per access in the dataset transform
        "data.pairing": "shared",  # crop and flip run on the concatenated pair
        "data.time_ids": "original",  # real original sizes and crop coordinates
        "data.resize": "official",  # transforms.Resize(resolution, BILINEAR)
        "data.ties": "keep",  # no tie filtering (a tie trains as "jpg_0 wins")
        "data.caption_dropout": 0.0,
        "method.name": "dpo",
        "method.beta": 5000.0,  # --beta_dpo default, -0.5 * beta form
        "optim.optimizer": "adamw8bit",  # README --use_8bit_adam
        "optim.lr": 1e-5,  # README --learning_rate=1e-5
        "optim.scale_lr": False,
        "optim.weight_decay": 1e-2,
        "optim.betas": [0.9, 0.999],
        "optim.eps": 1e-8,
        "optim.schedule": "constant",  # README --lr_scheduler="constant"
        "optim.warmup_steps": 0,  # README --lr_warmup_steps=0
        "optim.max_grad_norm": 1.0,
        "train.seed": 0,  # README --seed="0"
        "train.max_steps": 2000,  # README --max_train_steps=2000
        "train.batch_size": 8,  # README --train_batch_size=8
        "train.grad_accum": 2,  # README --gradient_accumulation_steps=2
        "train.mixed_precision": "fp16",  # README --mixed_precision="fp16"
        "train.allow_tf32": False,  # not passed in the README
        "train.checkpoint_every": 500,  # README --checkpointing_steps=500
        "train.resume": None,  # not passed in the README
        "train.ema.enabled": False,
        "log.tracker": "wandb",  # README --report_to="wandb"
        "eval.validation_every": 50,  # README --run_validation --validation_steps=50
        "eval.num_inference_steps": 25,
        "eval.guidance_scale": 5.0,
    },
}

# JaydenLyh/InPO (commit a9cfc4d) and JaydenLyh/SmPO (commit 8922d54, train.py as of 61105a1): forks of Diffusion-DPO's train.py with its
# defaults (research/step_methods.md §2(d), §3(d)), launched by examples/sd15.sh and examples/sdxl.sh on 8 GPUs.
_DPO_FORK = {
    **_DIFFUSION_DPO,
    "model.reference_offload": False,  # ref_unet on the GPU for SDXL too ("All models are kept on the GPU")
    "train.grad_accum": 128,  # examples/*.sh: 8 GPUs x 1 x 128 = 1024
    "train.checkpoint_every": 50,  # examples/*.sh --checkpointing_steps 50
    "method.inversion_model": "policy",  # the trained `unet` inverts (no grad, no CFG)
    "method.grid_semantics": "official",  # diffusers 0.20's DDIMInverseScheduler (requirements.txt pins 0.20.0)
}
_FORK_SD15 = {
    "model.pretrained": "runwayml/stable-diffusion-v1-5",  # examples/sd15.sh MODEL_NAME: a local copy of SD1.5, checkpoints/stable-diffusion-v1-5
    "model.vae": None,
    "model.vae_fp16_safe": True,  # the VAE is cast to fp16 and encodes every step
    "model.init_from": "checkpoints/sd15-sft",  # examples/sd15.sh --unet_init: an SFT'd SD1.5 UNet (not released)
    "model.gradient_checkpointing": False,  # only forced for SDXL
    "data.resolution": 512,
    "optim.optimizer": "adamw",
    "optim.betas": [0.9, 0.999],
    "optim.eps": 1e-8,
}
_FORK_SDXL = {
    "model.pretrained": "stabilityai/stable-diffusion-xl-base-1.0",  # examples/sdxl.sh MODEL_NAME (a local copy of this repo)
    "model.vae": "madebyollin/sdxl-vae-fp16-fix",  # examples/sdxl.sh VAE (local copy checkpoints/sdxl-vae-fp16-fix)
    "model.vae_fp16_safe": True,
    "model.init_from": None,  # examples/sdxl.sh passes no --unet_init
    "model.gradient_checkpointing": True,  # forced with --sdxl
    "data.resolution": 1024,
    "data.time_ids": "fixed",  # [res, res, 0, 0, res, res]
    "optim.optimizer": "adafactor",  # forced with --sdxl
}
_INPO = {
    **_DPO_FORK,
    "method.name": "inpo",
    "method.inversion_steps": 10,  # inverse_scheduler.set_timesteps(10), SD1.5 and SDXL
    "method.inversion_eta": 0.1,  # inversion_eta = 0.1 (hard-coded)
    "method.label_noise": "none",
    "train.max_steps": 400,  # examples/*.sh --max_train_steps=400
    "optim.warmup_steps": 200,  # examples/*.sh --lr_warmup_steps=200
}
_SMPO = {
    **_DPO_FORK,
    "method.name": "smpo",
    "method.gamma": 10.0,  # scale_term `* 10` (hard-coded)
    "method.reward": "pickscore",  # ps_score_0/1 and ps_label_0 from preprocessing.py (PickScore_v1)
    "method.score_bounds": [11.543526500463486, 28.201571106910706],  # min_val / max_val on raw cosines, x100 = diffalign's PickScore
    "method.label_source": "reward",  # the pair is ordered by ps_label_0; the human label_0 only drops ties
    "data.scores": ["pickscore"],  # preprocessing.py scores both images of every pair once
    "train.max_steps": 200,  # examples/*.sh --max_train_steps=200
    "optim.warmup_steps": 100,  # examples/*.sh --lr_warmup_steps=100
}
OFFICIAL.update({
    "sd15_inpo": {**_INPO, **_FORK_SD15, "method.beta": 2000.0},  # examples/sd15.sh --beta_dpo 2000
    "sdxl_inpo": {**_INPO, **_FORK_SDXL, "method.beta": 5000.0},  # examples/sdxl.sh --beta_dpo 5000
    "sd15_smpo": {**_SMPO, **_FORK_SD15, "method.beta": 2000.0, "method.inversion_steps": 5},  # --beta_dpo 2000; set_timesteps(5) for SD1.5
    "sdxl_smpo": {**_SMPO, **_FORK_SDXL, "method.beta": 5000.0, "method.inversion_steps": 10},  # --beta_dpo 5000; set_timesteps(10) for SDXL
})
# G-U-N/Diffusion-NPO (commit 5b5fc9c): DPO-DPO-NPO/run_sd15.sh, run_sdxl.sh and the diffusers-derived train_sd15.py /
# train_sdxl.py they launch (research/npo_grpo.md §1(b), §1(d)).
_NPO = {
    "model.finetune": "lora",
    "model.lora.rank": 8,  # --rank=8
    "model.lora.alpha": 8.0,  # lora_alpha = rank
    "model.lora.dropout": 0.0,
    "model.lora.target_modules": ["to_k", "to_q", "to_v", "to_out.0"],
    "model.lora.init": "gaussian",
    "model.gradient_checkpointing": True,  # --gradient_checkpointing
    "model.attention": "xformers",  # run_sd15.sh passes --enable_xformers_memory_efficient_attention (run_sdxl.sh: the default)
    "data.crop": "center",
    "data.random_flip": True,
    "data.flip_at": "train",  # flipped per access in the dataset transform
    "data.resize": "official",  # transforms.Resize(resolution, BILINEAR)
    "data.ties": "keep",  # ties pass through unflipped, trained as hard pairs
    "data.caption_dropout": 0.0,
    "method.name": "npo",
    "method.flip": True,  # `if label_0 == 1: flip` (Diffusion-DPO flips on 0)
    "optim.optimizer": "adamw8bit",  # --use_8bit_adam
    "optim.lr": 5e-6,  # --learning_rate=5e-6
    "optim.scale_lr": False,
    "optim.weight_decay": 1e-2,
    "optim.betas": [0.9, 0.999],
    "optim.eps": 1e-8,
    "optim.schedule": "constant",  # --lr_scheduler="constant"
    "optim.warmup_steps": 0,
    "optim.max_grad_norm": 1.0,
    "train.seed": 0,  # --seed=0
    "train.max_steps": 5000,  # --max_train_steps=5000 (released: the step-2000 checkpoint)
    "train.mixed_precision": "fp16",
    "train.allow_tf32": False,
    "train.ema.enabled": False,
    "eval.validation_every": 500,  # --run_validation --validation_steps=500
    "eval.num_inference_steps": 25,
}
OFFICIAL.update({
    "sd15_npo": {
        **_NPO,
        "model.pretrained": "runwayml/stable-diffusion-v1-5",  # run_sd15.sh: a local copy of SD1.5
        "model.vae": None,
        "model.vae_fp16_safe": True,  # train_sd15.py L554 casts the VAE to fp16
        "data.resolution": 512,  # --resolution=512
        "data.pairing": "per_image",  # the transform runs on each image of the pair
        "method.beta": 1000.0,  # --beta_dpo=500 in -logsigmoid(beta * Delta'), no 1/2 (train_sd15.py L880-883)
        "train.batch_size": 64,  # --train_batch_size=64
        "train.grad_accum": 1,
        "train.checkpoint_every": 1000,  # --checkpointing_steps=1000
        "train.resume": None,
        "log.tracker": "tensorboard",  # --report_to="tensorboard"
        "eval.guidance_scale": 7.5,  # the pipeline default
    },
    "sdxl_npo": {
        **_NPO,
        "model.pretrained": "stabilityai/stable-diffusion-xl-base-1.0",  # run_sdxl.sh: a local copy
        "model.vae": "madebyollin/sdxl-vae-fp16-fix",  # run_sdxl.sh: sdxl-vae-fp16-fix
        "model.vae_fp16_safe": False,  # train_sdxl.py L658 keeps the VAE in fp32
        "model.attention": "sdpa",  # run_sdxl.sh does not enable xformers
        "data.resolution": 1024,  # --resolution default
        "data.pairing": "shared",  # resize, flip and crop run on the concatenated pair
        "data.time_ids": "original",  # compute_time_ids(original_size, crop_top_left)
        "method.beta": 2000.0,  # --beta_dpo=2000, -0.5 * beta form (train_sdxl.py L1040-1043)
        "train.batch_size": 30,  # --train_batch_size=30
        "train.grad_accum": 2,  # --gradient_accumulation_steps=2
        "train.checkpoint_every": 500,  # --checkpointing_steps=500
        "train.resume": "latest",  # --resume_from_checkpoint="latest"
        "log.tracker": "wandb",  # --report_to="wandb"
        "eval.guidance_scale": 5.0,  # train_sdxl.py L121
    },
})
# G-U-N/Diffusion-NPO Self-NPO/train.sh, train_xl.sh and the train.py / train_xl.py defaults they launch (commit 70061e3;
# research/npo_grpo.md §2).
_SELF_NPO = {
    "model.finetune": "full",  # every UNet parameter trains
    "model.attention": "xformers",  # --enable_xformers_memory_efficient_attention
    "data.source.kind": "captions",  # CustomImageDataset: images with a .txt caption each
    "data.crop": "center",  # Resize then CenterCrop
    "data.random_flip": False,
    "data.resize": "lanczos",  # transforms.Resize(..., LANCZOS)
    "data.caption_dropout": 0.0,  # --proportion_empty_prompts default 0
    "method.name": "self_npo",
    "method.teacher_steps": 5,
    "method.grid_points": 25,  # --num_ddim_timesteps default 25
    "method.teacher_decay": 0.999,
    "method.loss": "huber",  # --loss_type="huber"
    "method.huber_c": 1e-3,
    "optim.optimizer": "adamw8bit",  # --use_8bit_adam
    "optim.scale_lr": False,
    "optim.schedule": "constant",
    "optim.max_grad_norm": 1.0,
    "train.seed": 453645634,
    "train.max_steps": 1000,
    "train.grad_accum": 1,
    "train.mixed_precision": "fp16",
    "train.resume": "latest",
    "log.tracker": "wandb",
}
OFFICIAL.update({
    "sd15_self_npo": {
        **_SELF_NPO,
        "model.pretrained": "runwayml/stable-diffusion-v1-5",  # train.sh: a local copy of SD1.5
        "model.gradient_checkpointing": False,
        "data.resolution": 512,
        "method.guidance": -1.0,  # train.py: w = -1
        "method.uncond": "caption",  # the encoded "" caption
        "optim.lr": 1e-6,
        "optim.weight_decay": 1e-3,
        "train.batch_size": 20,
        "train.checkpoint_every": 500,
        "train.keep_last": 10,
        "eval.validation_every": 200,
    },
    "sdxl_self_npo": {
        **_SELF_NPO,
        "model.pretrained": "stabilityai/stable-diffusion-xl-base-1.0",
        "model.vae": "madebyollin/sdxl-vae-fp16-fix",
        "model.gradient_checkpointing": True,
        "data.resolution": 1024,
        "method.guidance": -5.0,  # train_xl.py: w = -5
        "method.uncond": "zeros",  # train_xl.py L1034-1037
        "optim.lr": 1e-7,
        "optim.weight_decay": 0.0,
        "train.batch_size": 10,
        "train.checkpoint_every": 50,
        "train.keep_last": 20,
        "eval.validation_every": 20,
    },
})
# Shipped configs that are not official recipes, by name, with what their header must say.
NOT_OFFICIAL = {
    "sdxl_rankdpo": "reconstructed",  # RankDPO: no official code (snap-research/RankDPO unavailable); paper values where known
    "sd15_dense": "reconstructed",  # dense reward: the official code is online; the offline form is ours
    "tiny_sdxl_dpo": "toy",
    "toy/dpo": "toy",
    "toy/sft": "toy",
    "toy/inpo": "toy",
    "toy/smpo": "toy",
    "toy/rankdpo": "toy",
    "toy/dense": "toy",
    "toy/npo": "toy",
    "toy/self_npo": "toy",
    "sd15_pref_grpo": "reconstructed",  # Pref-GRPO's runs are FLUX: values transferred from its script and DanceGRPO SD
    "sdxl_pref_grpo": "reconstructed",
    "sd15_grpo": "reconstructed",  # DanceGRPO SD's values; its 8-GPU batch layout reconstructed
    "sdxl_grpo": "reconstructed",
    "toy/pref_grpo": "toy",
    "toy/grpo": "toy",
    "sd15_dense_online": "reconstructed",  # the official multi-prompt values; the batch split is ours
    "toy/dense_online": "toy",
    "sd15_tailorpo": "reconstructed",  # no public TailorPO code: the paper's values and D3PO's
    "sdxl_tailorpo": "reconstructed",  # the SD1.5 values transferred to SDXL
    "sdxl_dense_online": "reconstructed",  # the official SD1.5 multi-prompt values transferred to SDXL
    "toy/tailorpo": "toy",
    "toy_eval_heldout": "toy",
}
_RECIPE = re.compile(r"^# Recipe: (official|reconstructed|toy)\b", re.M)
_DEVIATION = re.compile(r"^#\s{3,}([a-z_]+(?:\.[a-z_0-9]+)+):", re.M)


def _shipped() -> dict[str, Path]:
    """The recipes (the accelerate launcher configs under configs/accelerate/ are not recipes)."""
    return {n: p for p in sorted(CONFIGS.rglob("*.yaml")) if not (n := p.relative_to(CONFIGS).with_suffix("").as_posix()).startswith("accelerate/")}


def _declared_deviations(header: str) -> list[str]:
    """The dotted keys listed under the header's "# Deviations" line (one per line, indented)."""
    if "# Deviations" not in header:
        return []
    block = header.split("# Deviations", 1)[1].split("\n#\n", 1)[0]
    return _DEVIATION.findall(block)


def _value(cfg: dict, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return list(node) if isinstance(node, tuple) else node


def test_every_shipped_config_says_what_recipe_it_is():
    kinds = {}
    for name, path in _shipped().items():
        found = _RECIPE.search(config_header(path))
        assert found, f"{path}: the header needs a '# Recipe: official|reconstructed|toy' line"
        kinds[name] = found.group(1)
    assert {n for n, k in kinds.items() if k == "official"} == set(OFFICIAL)
    assert {n: k for n, k in kinds.items() if k != "official"} == NOT_OFFICIAL


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_recipe_equals_the_official_values_but_for_its_listed_deviations(name):
    from diffalign.config import load_config

    path = _shipped()[name]
    cfg = load_config(path).model_dump(mode="json")
    differ = {k: (v, _value(cfg, k)) for k, v in OFFICIAL[name].items() if _value(cfg, k) != v}
    declared = _declared_deviations(config_header(path))
    print(f"\n{name}: {len(differ)} deliberate deviations from the official recipe")
    for key, (official, ours) in differ.items():
        print(f"  {key}: {ours!r} (official {official!r})")
    assert len(declared) == len(set(declared)), f"{path}: a deviation is listed twice"
    assert sorted(differ) == sorted(declared), (
        f"{path}: undeclared deviations {sorted(set(differ) - set(declared))}; "
        f"listed but not deviating {sorted(set(declared) - set(differ))}"
    )


def test_the_parity_check_catches_an_undeclared_change():
    """The check itself can fail: the SDXL recipe with the old caption dropout (0.0) deviates without saying so."""
    from diffalign.config import load_config

    cfg = load_config(_shipped()["sdxl_dpo"], ["data.caption_dropout=0.0"]).model_dump(mode="json")
    differ = {k for k, v in OFFICIAL["sdxl_dpo"].items() if _value(cfg, k) != v}
    assert "data.caption_dropout" in differ and "data.caption_dropout" not in _declared_deviations(config_header(_shipped()["sdxl_dpo"]))
