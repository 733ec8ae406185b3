"""Per-step cost of diffalign's Diffusion-DPO training, against the reference approach and the bare-UNet floor.

Three variants train the same model (same random weights) on the same number of pairs per step at the
same resolution, with the same optimizer (AdamW, grad-norm clip 1.0) and the same precision:

ours       `PreferenceTrainer.optimizer_step()` on a latent-pair cache prepared beforehand (not timed):
           data loading, posterior sampling, one batched policy forward over [winners; losers], the
           reference forward, backward, clip, optimizer step, metric read-back.
reference  the per-step work of the public scripts, re-written here from reading them:
           --finetune full: SalesforceAIResearch/DiffusionDPO train.py (commit 8d3ee5c, `--sdxl`, DPO):
             VAE encode of both images every step, both text encoders every step, a separate frozen
             reference UNet, shared t and ε, one [w; l] forward, -0.5·β loss, backward, clip, AdamW.
           --finetune lora: diffusers examples/research_projects/diffusion_dpo/train_diffusion_dpo_sdxl.py
             (read at commit 03ea18c): the same, with the VAE in fp32 and the reference = adapters disabled.
floor      only what Diffusion-DPO cannot avoid: policy forward + backward on 2B images and the
           reference forward on them, from precomputed noisy latents, timesteps and conditioning, then
           clip + optimizer step. Nothing else.

Timing: all three in ONE process. On CPU they run interleaved (each round steps every variant once, in
a rotating order) after the warm-up; on CUDA sequentially (build, warm up, time, tear down), so each
variant's peak memory can be read with `torch.cuda.max_memory_allocated` reset per variant. On CPU the
peak memory is the peak RSS of a fresh subprocess per variant (plus one that only imports, the
baseline); the times in the table always come from the parent run.

The FLOP model (meta device, nothing allocated) counts the same step's forward/backward work per
variant, so a ratio measured on a scaled-down model can be compared with the true-SDXL proportions.

Run (see docs/benchmarks.md):
    python benchmarks/train_step.py --preset small --finetune full --out results.json
    python benchmarks/train_step.py --preset tiny --steps 2 --warmup 1          # smoke check, < 60 s
    python benchmarks/train_step.py --preset sdxl --flops-only                   # FLOP model only, any machine
"""

from __future__ import annotations

import argparse
import copy
import gc
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

try:  # run as `python benchmarks/train_step.py` from a checkout that is not pip-installed
    import diffalign  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = ("ours", "reference", "floor")
DEFAULT_RESOLUTION = {"tiny": 32, "small": 128, "sdxl": 1024}
VAE_FACTOR = {"tiny": 4, "small": 8, "sdxl": 8}
WIDTH_DIVISOR = {"small": 8, "sdxl": 1}
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # diffusers' DPO scripts and diffalign's default
LR, BETA, MAX_GRAD_NORM = 1e-5, 5000.0, 1.0
MEMORY_WARMUP, MEMORY_STEPS = 1, 2  # steps run by each memory subprocess (optimizer state exists after step 1)
PRESET_NOTES = {
    "tiny": "diffalign.models.tiny SDXL-style pipeline (2 UNet levels, VAE factor 4); a smoke test, not a measurement",
    "small": "SDXL-base 1.0 layout with every width / 8 and every depth kept (UNet ~40M params, VAE factor 8, "
    "two CLIP encoders of 12 and 32 layers)",
    "sdxl": "SDXL-base 1.0 config sizes (UNet ~2.6B params), random weights: GPU only",
}


# ------------------------------------------------------------------------------------------ the model


def sdxl_unet_config(div: int, resolution: int) -> dict:
    """stabilityai/stable-diffusion-xl-base-1.0 unet/config.json sizes, every width divided by `div`.

    Norm groups shrink with the widths, so channels per group stay SDXL's (10).
    """
    w = lambda c: c // div  # noqa: E731
    return dict(
        sample_size=resolution // 8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(w(320), w(640), w(1280)),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 10),  # the first entry is unused (DownBlock2D has no attention)
        attention_head_dim=(5, 10, 20),  # diffusers' name for the number of heads (head size 64 / div)
        cross_attention_dim=w(768) + w(1280),  # both encoders' penultimate states, concatenated
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=w(256),
        projection_class_embeddings_input_dim=6 * w(256) + w(1280),  # six time ids + the pooled embedding
        norm_num_groups=32 // div,
    )


def sdxl_vae_config(div: int, resolution: int) -> dict:
    """The SDXL VAE (4 levels, spatial factor 8, scaling factor 0.13025), widths divided by `div`."""
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=tuple(c // div for c in (128, 256, 512, 512)),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32 // div,
        sample_size=resolution,
        scaling_factor=0.13025,
    )


def sdxl_text_configs(div: int):
    """CLIP ViT-L/14 text (12 layers) and OpenCLIP bigG text (32 layers, projection), widths divided by `div`."""
    from transformers import CLIPTextConfig

    ids = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    one = CLIPTextConfig(hidden_size=768 // div, intermediate_size=3072 // div, num_hidden_layers=12, num_attention_heads=12,
                         hidden_act="quick_gelu", projection_dim=768 // div, **ids)
    two = CLIPTextConfig(hidden_size=1280 // div, intermediate_size=5120 // div, num_hidden_layers=32, num_attention_heads=20,
                         hidden_act="gelu", projection_dim=1280 // div, **ids)
    return one, two


def build_components(preset: str, resolution: int, seed: int, need: frozenset = frozenset({"unet", "vae", "text"})):
    """A random-weight SDXL-family `Components`; parts not in `need` are None (each part has its own seed,
    so the UNet's weights do not depend on which other parts were built)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from diffalign.models.loading import Components
    from diffalign.models.tiny import SD_SCHEDULER
    from diffalign.models.tokenizer import build_clip_tokenizer

    scheduler = DDPMScheduler(**SD_SCHEDULER)  # SDXL-base trains with the same scaled-linear ε schedule
    if preset == "tiny":
        from diffalign.models.tiny import tiny_sdxl_pipeline

        p = tiny_sdxl_pipeline(seed=seed)
        unet, vae, encoders, tokenizers = p.unet, p.vae, [p.text_encoder, p.text_encoder_2], [p.tokenizer, p.tokenizer_2]
    else:
        div = WIDTH_DIVISOR[preset]
        unet = vae = None
        encoders, tokenizers = [], []
        if "unet" in need:
            torch.manual_seed(seed)
            unet = UNet2DConditionModel(**sdxl_unet_config(div, resolution))
        if "vae" in need:
            torch.manual_seed(seed + 1)
            vae = AutoencoderKL(**sdxl_vae_config(div, resolution))
        if "text" in need:
            torch.manual_seed(seed + 2)
            one, two = sdxl_text_configs(div)
            encoders = [CLIPTextModel(one), CLIPTextModelWithProjection(two)]
            tokenizers = [build_clip_tokenizer(), build_clip_tokenizer(pad_token="!")]
    return Components("sdxl", unet, vae, encoders, tokenizers, scheduler, "epsilon", f"benchmark:{preset}")


def n_params(module: torch.nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------------------- the data


def demo_source(args) -> dict:
    return {"kind": "demo", "num_pairs": args.pairs, "image_size": args.resolution, "seed": 0}


def ours_config(args, workdir: Path, tag: str):
    """The diffalign `Config` of the 'ours' variant (the cache lives in `workdir/cache`)."""
    from diffalign.config import apply_overrides, validate_config

    raw = apply_overrides(
        {
            "model": {
                "pretrained": f"benchmark:{args.preset}",  # components are passed to setup(), never loaded
                "finetune": args.finetune,
                "lora": {"rank": args.lora_rank, "alpha": float(args.lora_rank), "target_modules": LORA_TARGETS},
                "gradient_checkpointing": args.gradient_checkpointing,
            },
            "data": {
                "source": demo_source(args),
                "cache_dir": str(workdir / "cache"),
                "resolution": args.resolution,
                "time_ids": "fixed" if args.finetune == "full" else "original",  # as the script each mirrors
                "caption_dropout": 0.0,
                "encode_batch_size": 8,
            },
            "method": {"name": "dpo", "beta": BETA},
            "optim": {"optimizer": "adamw", "lr": LR, "schedule": "constant", "warmup_steps": 0, "max_grad_norm": MAX_GRAD_NORM},
            "train": {
                "output_dir": str(workdir / f"ours-{tag}"),
                "max_steps": 1_000_000,
                "batch_size": args.batch,
                "grad_accum": 1,
                "mixed_precision": args.mixed_precision,
                "allow_tf32": args.tf32,
                "checkpoint_every": 0,
                "dataloader_workers": args.workers,
            },
            "log": {"tracker": "none", "progress": False},
        },
        args.set,  # --set: the speed options, toggled for 'ours' only
    )
    return validate_config(raw, origin="benchmarks/train_step.py")


def prepare_ours_cache(args, components, device: torch.device, workdir: Path) -> Path:
    """Build the latent-pair cache once (untimed), with the VAE and text encoders on `device`."""
    from diffalign.data import prepare_cache

    cfg = ours_config(args, workdir, "prepare")
    parts = replace(components, unet=None, vae=copy.deepcopy(components.vae).to(device),
                    text_encoders=[copy.deepcopy(e).to(device) for e in components.text_encoders])
    return prepare_cache(cfg, parts, progress=False)


def reference_batches(args, tokenizers) -> list[dict]:
    """The same demo pairs as the cache, decoded and placed once (an ideal data loader); what the scripts'
    collate functions hand to the step: pixel_values (B, 6, H, W) = [winner | loser] on channels, captions,
    (LoRA) token ids, original sizes and crop corners."""
    from diffalign.data.images import prepare_images
    from diffalign.data.sources import DemoPairs

    items = []
    for item in DemoPairs(args.pairs, args.resolution, 0).items():
        placed = prepare_images(item.images, item.source_id, resolution=args.resolution, crop="center",
                                random_flip=True, pairing="shared", seed=0)
        if item.label < 0.5:  # winner first, as both scripts arrange it
            placed = placed[::-1]
        items.append((item.caption, placed))
    batches = []
    for i in range(0, len(items) - args.batch + 1, args.batch):
        chunk = items[i : i + args.batch]
        captions = [c for c, _ in chunk]
        batch = {
            "pixel_values": torch.stack([torch.cat([p[0].pixels, p[1].pixels]) for _, p in chunk]),  # (B, 6, H, W)
            "captions": captions,
            "original_sizes": [p[0].original_size for _, p in chunk],
            "crop_top_lefts": [p[0].crop_top_left for _, p in chunk],
        }
        if args.finetune == "lora":  # diffusers tokenizes in the dataset transform, not in the step
            batch["input_ids"] = [tokenize(tok, captions) for tok in tokenizers]
        batches.append(batch)
    if not batches:
        raise SystemExit(f"--pairs {args.pairs} is smaller than --batch {args.batch}")
    return batches


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids


# -------------------------------------------------------------------------------------- the variants


@dataclass
class Variant:
    name: str
    step: Callable[[], float | torch.Tensor]  # one optimizer step; returns its loss
    close: Callable[[], None]
    nonfinite: int = 0  # timed steps whose loss was NaN/inf (fp16 overflow in random weights: the step may be skipped)


def make_accelerator(args):
    from accelerate import Accelerator

    return Accelerator(mixed_precision=args.mixed_precision)


def trained_unet(args, unet, device, weight_dtype):
    """Policy and reference as the scripts set them up: full = trained fp32 UNet + a frozen copy in the
    weight dtype (official `ref_unet`); lora = frozen UNet in the weight dtype + fp32 LoRA (peft, as
    diffusers: rank = alpha, gaussian init, attention projections), reference = adapters disabled."""
    from peft import LoraConfig

    reference = None
    if args.finetune == "lora":
        unet.requires_grad_(False).to(device, weight_dtype)
        unet.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=args.lora_rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
        for p in unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    else:
        reference = copy.deepcopy(unet).requires_grad_(False).eval().to(device, weight_dtype)
        unet.requires_grad_(True).to(device)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    return unet, reference, [p for p in unet.parameters() if p.requires_grad]


def dpo_from_errors(model_err: torch.Tensor, ref_err: torch.Tensor) -> torch.Tensor:
    """-log σ(-β/2 · [(e_θ(w) - e_θ(l)) - (e_ref(w) - e_ref(l))]); errors (2B,), winners first."""
    model_w, model_l = model_err.chunk(2)  # (B,), (B,)
    ref_w, ref_l = ref_err.chunk(2)
    return -F.logsigmoid(-0.5 * BETA * ((model_w - model_l) - (ref_w - ref_l))).mean()


def make_ours(args, components, device, weight_dtype, workdir: Path, tag: str) -> Variant:
    from diffalign.trainers.loop import PreferenceTrainer

    trainer = PreferenceTrainer(ours_config(args, workdir, tag))
    trainer.setup(components)  # finds the prepared cache complete and only verifies it

    def close():
        trainer.accelerator.free_memory()

    return Variant("ours", lambda: trainer.optimizer_step()["loss"], close)  # a non-finite loss raises TrainingError


def make_reference(args, components, device, weight_dtype, batches: list[dict]) -> Variant:
    """The reference approach's step. Full: official train.py (SalesforceAIResearch/DiffusionDPO, commit
    8d3ee5c6cf312575fb33f2a20689fa0fc1b21955, main loop with `--sdxl`, train_method 'dpo'). LoRA: diffusers
    examples/research_projects/diffusion_dpo/train_diffusion_dpo_sdxl.py (commit 03ea18cc7e2c). Written
    from reading them; no code is copied. Both keep VAE, encoders and reference on the device (the official
    SDXL path would also `cpu_offload` them, which only adds transfers)."""
    from diffusers.optimization import get_scheduler

    acc = make_accelerator(args)
    lora = args.finetune == "lora"
    unet, reference, params = trained_unet(args, components.unet, device, weight_dtype)
    vae_dtype = torch.float32 if lora else weight_dtype  # diffusers: "VAE always in float32"; official: weight dtype
    vae = components.vae.requires_grad_(False).to(device, vae_dtype)
    encoders = [e.requires_grad_(False).to(device, weight_dtype) for e in components.text_encoders]
    tokenizers, scheduler = components.tokenizers, components.scheduler
    optimizer = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
    lr_schedule = get_scheduler("constant", optimizer)
    unet, optimizer = acc.prepare(unet, optimizer)  # the scripts prepare the trained UNet, not the reference
    res = args.resolution
    fixed_time_ids = torch.tensor([res, res, 0, 0, res, res], dtype=weight_dtype, device=device)  # official SDXL-base
    stream = itertools.cycle(batches)

    def encode_text(batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Both encoders every step: penultimate hidden states concatenated (B, 77, D1+D2); pooled from the last (B, D2)."""
        ids = batch["input_ids"] if lora else [tokenize(t, batch["captions"]) for t in tokenizers]  # official tokenizes in the step
        hidden = []
        for encoder, token_ids in zip(encoders, ids):
            out = encoder(token_ids.to(device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # CLIPTextModelWithProjection: the projected text embedding
        return torch.cat(hidden, dim=-1), pooled

    def step():
        batch = next(stream)
        pixels = batch["pixel_values"].to(device)  # (B, 6, H, W)
        pixels = torch.cat(pixels.chunk(2, dim=1)).to(vae_dtype)  # (2B, 3, H, W): winners then losers
        with torch.no_grad():
            chunk = 8 if lora else pixels.shape[0]  # diffusers: --vae_encode_batch_size 8
            latents = torch.cat([vae.encode(pixels[i : i + chunk]).latent_dist.sample() for i in range(0, pixels.shape[0], chunk)])
            latents = (latents * vae.config.scaling_factor).to(weight_dtype)  # (2B, 4, h, w)
        b = latents.shape[0] // 2
        noise = torch.randn_like(latents).chunk(2)[0].repeat(2, 1, 1, 1)  # one ε per pair
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (b,), device=device).long().repeat(2)  # one t per pair
        noisy = scheduler.add_noise(latents, noise, timesteps)
        with torch.no_grad():
            embeds, pooled = encode_text(batch)
        embeds, pooled = embeds.repeat(2, 1, 1), pooled.repeat(2, 1)  # (2B, 77, D), (2B, D2)
        if lora:  # diffusers: each item's original size and crop, computed in the step
            time_ids = torch.cat([torch.tensor([[*s, *c, res, res]]) for s, c in zip(batch["original_sizes"], batch["crop_top_lefts"])])
            time_ids = time_ids.to(device, weight_dtype).repeat(2, 1)
        else:
            time_ids = fixed_time_ids[None].repeat(2 * b, 1)
        cond = {"text_embeds": pooled, "time_ids": time_ids}
        pred = unet(noisy, timesteps, embeds, added_cond_kwargs=cond).sample
        # official: (pred - target).pow(2) in the prediction's dtype; diffusers LoRA: in fp32
        model_err = ((pred.float() - noise.float()) if lora else (pred - noise)).pow(2).mean(dim=[1, 2, 3])
        with torch.no_grad():
            if lora:
                acc.unwrap_model(unet).disable_adapters()
                ref_pred = unet(noisy, timesteps, embeds, added_cond_kwargs=cond).sample
                acc.unwrap_model(unet).enable_adapters()
            else:
                ref_pred = reference(noisy, timesteps, embeds, added_cond_kwargs=cond).sample
            ref_err = ((ref_pred.float() - noise.float()) if lora else (ref_pred - noise)).pow(2).mean(dim=[1, 2, 3])
        loss = dpo_from_errors(model_err, ref_err)
        # both scripts read a few scalars back every step for logging (loss, model/ref MSE, implicit accuracy)
        logged = torch.stack([loss.detach(), model_err.detach().mean(), ref_err.mean()]).float().tolist()
        acc.backward(loss)
        acc.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        lr_schedule.step()
        optimizer.zero_grad()
        return logged[0]

    def close():
        acc.free_memory()

    return Variant("reference", step, close)


def make_floor(args, components, device, weight_dtype) -> Variant:
    """Policy forward + backward on 2B precomputed inputs, reference forward on the same, clip, AdamW step."""
    acc = make_accelerator(args)
    unet, reference, params = trained_unet(args, components.unet, device, weight_dtype)
    optimizer = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
    unet, optimizer = acc.prepare(unet, optimizer)
    cfg = acc.unwrap_model(unet).config
    b, h = args.batch, args.resolution // VAE_FACTOR[args.preset]
    pooled_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(b, 4, h, h, generator=g).repeat(2, 1, 1, 1)  # (2B, 4, h, w), shared per pair
    inputs = dict(
        sample=torch.randn(2 * b, 4, h, h, generator=g).to(device, weight_dtype),
        timestep=torch.randint(0, 1000, (b,), generator=g).repeat(2).to(device),
        encoder_hidden_states=torch.randn(b, 77, cfg.cross_attention_dim, generator=g).repeat(2, 1, 1).to(device, weight_dtype),
        added_cond_kwargs={
            "text_embeds": torch.randn(b, pooled_dim, generator=g).repeat(2, 1).to(device, weight_dtype),
            "time_ids": torch.tensor([[args.resolution, args.resolution, 0, 0, args.resolution, args.resolution]] * 2 * b).to(device, weight_dtype),
        },
    )
    target = eps.to(device, weight_dtype)

    def step():
        pred = unet(**inputs).sample
        model_err = (pred.float() - target.float()).pow(2).mean(dim=[1, 2, 3])  # (2B,)
        with torch.no_grad():
            if reference is None:
                acc.unwrap_model(unet).disable_adapters()
                ref_pred = unet(**inputs).sample
                acc.unwrap_model(unet).enable_adapters()
            else:
                ref_pred = reference(**inputs).sample
            ref_err = (ref_pred.float() - target.float()).pow(2).mean(dim=[1, 2, 3])
        loss = dpo_from_errors(model_err, ref_err)
        acc.backward(loss)
        acc.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad()
        return loss.detach()

    def close():
        acc.free_memory()

    return Variant("floor", step, close)


NEEDS = {"ours": frozenset({"unet", "vae", "text"}), "reference": frozenset({"unet", "vae", "text"}), "floor": frozenset({"unet"})}


def make_variant(name: str, args, components, device, weight_dtype, workdir: Path, batches, tag: str) -> Variant:
    if name == "ours":
        return make_ours(args, components, device, weight_dtype, workdir, tag)
    if name == "reference":
        return make_reference(args, components, device, weight_dtype, batches)
    return make_floor(args, components, device, weight_dtype)


# ------------------------------------------------------------------------------------------ measuring


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(variant: Variant, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    loss = variant.step()
    sync(device)
    seconds = time.perf_counter() - t0
    if not torch.isfinite(torch.as_tensor(loss)).all():  # checked outside the timed region
        variant.nonfinite += 1
    return seconds


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_interleaved(args, master, device, weight_dtype, workdir, batches) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Build all three, warm each up, then `steps` rounds; each round steps every variant once, the order
    rotating by one per round so no variant always runs first."""
    variants = [make_variant(n, args, copy.deepcopy(master), device, weight_dtype, workdir, batches, "interleaved") for n in VARIANTS]
    for _ in range(args.warmup):
        for v in variants:
            v.step()
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    for i in range(args.steps):
        k = i % len(variants)
        for v in variants[k:] + variants[:k]:
            times[v.name].append(timed_step(v, device))
    nonfinite = {v.name: v.nonfinite for v in variants}
    for v in variants:
        v.close()
    del variants
    release(device)
    return times, nonfinite


def run_sequential(args, master, device, weight_dtype, workdir, batches) -> tuple[dict[str, list[float]], dict[str, int], dict[str, dict]]:
    """One variant at a time: build, warm up, time, read its peak device memory, tear down."""
    times, nonfinite, memory = {}, {}, {}
    for name in VARIANTS:
        release(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        v = make_variant(name, args, copy.deepcopy(master), device, weight_dtype, workdir, batches, "sequential")
        for _ in range(args.warmup):
            v.step()
        times[name] = [timed_step(v, device) for _ in range(args.steps)]
        nonfinite[name] = v.nonfinite
        if device.type == "cuda":
            memory[name] = {"peak_mib": torch.cuda.max_memory_allocated(device) / 2**20, "allocated_before_mib": before / 2**20,
                            "peak_reserved_mib": torch.cuda.max_memory_reserved(device) / 2**20}
        v.close()
        del v
        release(device)
    return times, nonfinite, memory


def memory_in_subprocesses(args, workdir: Path) -> dict[str, dict]:
    """Peak RSS (and CUDA peak, if any) of a fresh process per variant, plus a baseline that only imports.

    A process's peak RSS does not depend on what runs beside it, so on CPU they run concurrently, as many
    as there are cores, with cores / concurrent threads each (after all timing is done); on CUDA one at a
    time, so they cannot run each other out of memory."""
    common = ["--preset", args.preset, "--finetune", args.finetune, "--batch", str(args.batch), "--resolution", str(args.resolution),
              "--device", args.device, "--mixed-precision", args.mixed_precision, "--pairs", str(args.pairs),
              "--lora-rank", str(args.lora_rank), "--workers", str(args.workers), "--seed", str(args.seed),
              "--gradient-checkpointing", "on" if args.gradient_checkpointing else "off", "--workdir", str(workdir)]
    common += ["--tf32"] if args.tf32 else []
    common += [f"--set={o}" for o in args.set]
    names = ("baseline", *VARIANTS)
    cores = os.cpu_count() or 1
    parallel = 1 if args.device.startswith("cuda") else min(len(names), cores)
    threads = args.threads or max(1, cores // parallel)  # never more threads than cores: oversubscribed OpenMP crawls
    common += ["--threads", str(threads)]
    out, running = {}, []
    for i, name in enumerate(names):
        cmd = [sys.executable, str(Path(__file__).resolve()), *common, "--child", name, "--child-out", str(workdir / f"memory-{name}.json")]
        running.append((name, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
        if len(running) == parallel or i == len(names) - 1:
            for child, proc in running:
                stdout, stderr = proc.communicate()
                if proc.returncode != 0:
                    raise SystemExit(f"memory subprocess for {child} failed:\n{stdout[-2000:]}\n{stderr[-4000:]}")
                out[child] = json.loads((workdir / f"memory-{child}.json").read_text())
            running = []
    return out


def child_main(args) -> None:
    """Inside a memory subprocess: build one variant from scratch, run a few steps, report the peaks."""
    device = torch.device(args.device)
    out = {}
    import accelerate  # noqa: F401, E401  (the baseline imports what every variant imports)

    import diffalign.data  # noqa: F401, E401
    if args.child != "baseline":
        components = build_components(args.preset, args.resolution, args.seed, NEEDS[args.child])
        batches = reference_batches(args, components.tokenizers) if args.child == "reference" else None
        weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        v = make_variant(args.child, args, components, device, weight_dtype, Path(args.workdir), batches, f"memory-{os.getpid()}")
        for _ in range(MEMORY_WARMUP + MEMORY_STEPS):
            v.step()
        if device.type == "cuda":
            out["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    out["peak_rss_mib"] = peak_rss_mib()
    out["ru_maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # for the record, see peak_rss_mib
    Path(args.child_out).write_text(json.dumps(out))


def peak_rss_mib() -> float:
    """This process's peak resident set. Linux: VmHWM of /proc/self/status, because `ru_maxrss` keeps the
    high-water mark of the process image that exec replaced, i.e. of the forking parent (measured: a child
    of a 1.1 GiB parent reports 1.1 GiB there and 9 MiB in VmHWM). Elsewhere `ru_maxrss` (KiB on Linux,
    bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 2**20 if sys.platform == "darwin" else rss / 1024


# ------------------------------------------------------------------------------------------ FLOP model


def flop_model(args) -> dict:
    """Forward/backward FLOPs of one step's model work per variant, counted on the meta device.

    floor = policy forward+backward on 2B images + reference forward on 2B; reference = floor + VAE encode
    of 2B images + both text encoders on B captions; ours = floor (posterior sampling and noising are
    elementwise, far below 0.1 %). Counted by `torch.utils.flop_counter` (matmuls, convolutions, attention).
    """
    from peft import LoraConfig
    from torch.utils.flop_counter import FlopCounterMode

    def count(fn) -> float:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    b, res = args.batch, args.resolution
    with torch.device("meta"):
        c = build_components(args.preset, res, args.seed)
        unet, vae = c.unet, c.vae
        cfg = unet.config
        h = res // VAE_FACTOR[args.preset]
        pooled_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kw = dict(sample=torch.randn(2 * b, 4, h, h), timestep=torch.zeros(2 * b, dtype=torch.long),
                  encoder_hidden_states=torch.randn(2 * b, 77, cfg.cross_attention_dim),
                  added_cond_kwargs={"text_embeds": torch.randn(2 * b, pooled_dim), "time_ids": torch.randn(2 * b, 6)})
        pixels, ids = torch.randn(2 * b, 3, res, res), torch.zeros(b, 77, dtype=torch.long)
    with torch.no_grad():
        ref_fwd = count(lambda: unet(**kw))
        vae_enc = count(lambda: vae.encode(pixels))
        text = sum(count(lambda e=e: e(ids, output_hidden_states=True)) for e in c.text_encoders)
    if args.finetune == "lora":
        unet.requires_grad_(False)
        with torch.device("meta"):
            unet.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=args.lora_rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    policy = count(lambda: unet(**kw).sample.float().pow(2).mean().backward())
    floor = policy + ref_fwd
    g = lambda x: round(x / 1e9, 3)  # noqa: E731
    return {
        "gflops": {"policy_fwd_bwd_2B": g(policy), "reference_fwd_2B": g(ref_fwd), "vae_encode_2B": g(vae_enc), "text_encoders_B": g(text)},
        "per_step_gflops": {"ours": g(floor), "reference": g(floor + vae_enc + text), "floor": g(floor)},
        "reference_over_floor": round((floor + vae_enc + text) / floor, 4),
        "params_m": {"unet": round(n_params(unet) / 1e6, 2), "vae": round(n_params(vae) / 1e6, 2),
                     "text_encoders": round(sum(n_params(e) for e in c.text_encoders) / 1e6, 2)},
    }


# ----------------------------------------------------------------------------------------- reporting


# Dense tensor-core peaks in TFLOP/s (vendor datasheets, SXM parts, without sparsity): fp16/bf16, and tf32 for fp32 runs.
PEAK_TFLOPS = {"H200": {"half": 989.0, "tf32": 494.5}, "H100": {"half": 989.0, "tf32": 494.5}, "A100": {"half": 312.0, "tf32": 156.0},
               "L40S": {"half": 362.0, "tf32": 183.0}, "A10G": {"half": 125.0, "tf32": 62.5}}


def peak_tflops(gpu: str | None, mixed_precision: str) -> float | None:
    """The datasheet peak of a known GPU at the run's precision (None for an unknown one: pass --peak-tflops)."""
    for name, peaks in PEAK_TFLOPS.items():
        if gpu and name in gpu:
            return peaks["tf32" if mixed_precision == "no" else "half"]
    return None


def machine(device: torch.device) -> dict:
    import accelerate
    import diffusers
    import peft
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem_gib = None
    try:
        kib = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
        mem_gib = round(kib / 2**20, 1)
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "ram_gib": mem_gib,
            "python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "accelerate": accelerate.__version__, "peft": peft.__version__,
            "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def summarize(times: dict[str, list[float]], memory: dict[str, dict]) -> dict[str, dict]:
    rows = {}
    for name in VARIANTS:
        ms = [t * 1e3 for t in times[name]]
        rows[name] = {"ms_median": statistics.median(ms), "ms_mean": statistics.mean(ms),
                      "ms_stdev": statistics.stdev(ms) if len(ms) > 1 else 0.0, "ms_min": min(ms), "ms_all": [round(x, 2) for x in ms]}
    for name in VARIANTS:
        rows[name]["time_x_ours"] = rows[name]["ms_median"] / rows["ours"]["ms_median"]
        rows[name]["time_x_floor"] = rows[name]["ms_median"] / rows["floor"]["ms_median"]
    if memory:
        if "baseline" in memory:  # subprocess RSS: ratios on what the variant adds above a process that only imports
            base = memory["baseline"]["peak_rss_mib"]
            for name in VARIANTS:
                m = memory[name]
                rows[name]["peak_rss_mib"] = m["peak_rss_mib"]
                rows[name]["mem_mib"] = m.get("cuda_peak_mib", m["peak_rss_mib"] - base)
        else:
            for name in VARIANTS:
                rows[name]["mem_mib"] = memory[name]["peak_mib"]
        for name in VARIANTS:  # a tiny model can stay inside the baseline's RSS: no ratio then
            for ref in ("ours", "floor"):
                denom = rows[ref]["mem_mib"]
                rows[name][f"mem_x_{ref}"] = rows[name]["mem_mib"] / denom if denom > 0 else None
    return rows


WHAT = {
    "ours": "cached latents: load, posterior sample, [w;l] policy fwd+bwd, ref fwd, AdamW",
    "reference": "VAE encode 2B + 2 text encoders + [w;l] policy fwd+bwd + ref fwd + AdamW",
    "floor": "precomputed inputs: policy fwd+bwd (2B) + ref fwd (2B) + AdamW",
}


def markdown(result: dict) -> str:
    rows, a = result["variants"], result["settings"]
    mem_kind = result["memory"]["kind"]
    head = (f"preset `{a['preset']}`, finetune `{a['finetune']}`, {a['batch']} pairs × {a['resolution']} px, "
            f"{a['steps']} timed steps after {a['warmup']} warm-up, order {result['order']}, precision `{a['mixed_precision']}`")
    mem_col = {"cuda": "peak CUDA alloc (MiB)", "rss": "peak RSS above baseline (MiB)", "off": "peak memory"}[mem_kind]
    lines = [head, "", f"| variant | ms/step (median) | mean ± sd | × ours | × floor | {mem_col} | mem × ours | mem × floor |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in VARIANTS:
        r = rows[name]
        ratio = lambda x: "–" if x is None else f"{x:.2f}"  # noqa: E731
        mem = [f"{r['mem_mib']:,.0f}", ratio(r["mem_x_ours"]), ratio(r["mem_x_floor"])] if "mem_mib" in r else ["–"] * 3
        lines.append(f"| {name} | {r['ms_median']:,.1f} | {r['ms_mean']:,.1f} ± {r['ms_stdev']:,.1f} | {r['time_x_ours']:.2f} | "
                     f"{r['time_x_floor']:.2f} | " + " | ".join(mem) + " |")
    if mem_kind == "rss":
        base = result["memory"]["subprocesses"]["baseline"]["peak_rss_mib"]
        lines += ["", f"Peak RSS includes a {base:,.0f} MiB baseline (a process that only imports the same libraries); "
                  "absolute peaks: " + ", ".join(f"{n} {rows[n]['peak_rss_mib']:,.0f} MiB" for n in VARIANTS) + "."]
    fm = result.get("flops")
    peak = result.get("peak_tflops")
    if fm and peak:
        mfu = ", ".join(f"{n} {fm['per_step_gflops'][n] / rows[n]['ms_median'] / peak * 100:.1f}%" for n in VARIANTS)  # GFLOP/ms = TFLOP/s
        lines += ["", f"MFU (FLOP model ÷ median step time ÷ {peak:g} TFLOP/s peak): {mfu}."]
    if fm:
        p = fm["per_step_gflops"]
        lines += ["", f"FLOP model (per step): ours ≈ floor = {p['floor']:,.1f} GFLOP; reference = {p['reference']:,.1f} GFLOP "
                  f"(× {fm['reference_over_floor']:.3f} of floor; VAE encode {fm['gflops']['vae_encode_2B']:,.1f}, "
                  f"text encoders {fm['gflops']['text_encoders_B']:,.1f})."]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=("tiny", "small", "sdxl"), default="small", help="model size (sdxl: GPU only)")
    p.add_argument(
        "--finetune", choices=("full", "lora"), default="full", help="full: official method; lora: diffusers' LoRA script as the reference"
    )
    p.add_argument("--batch", type=int, default=2, help="pairs per step (each variant runs 2×batch images through the UNet)")
    p.add_argument("--resolution", type=int, default=None, help="pixels (default: tiny 32, small 128, sdxl 1024)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default=None, help="default: fp16 on CUDA, no on CPU")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here, and a markdown table beside it (.md)")
    p.add_argument("--order", choices=("auto", "interleaved", "sequential"), default="auto", help="auto: interleaved on CPU, sequential on CUDA")
    p.add_argument("--memory", choices=("auto", "subprocess", "inprocess", "off"), default="auto",
                   help="auto: in-process CUDA peaks when sequential on CUDA, else a fresh subprocess per variant")
    p.add_argument("--gradient-checkpointing", choices=("auto", "on", "off"), default="auto",
                   help="for all variants; auto: on for sdxl (the official script forces it), off otherwise")
    p.add_argument("--lora-rank", type=int, default=8, help="LoRA rank (= alpha) for --finetune lora (diffusers recipe: 8)")
    p.add_argument("--pairs", type=int, default=16, help="pairs in the demo data set")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers of 'ours' (diffalign default 0)")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls in every variant (official default: off)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads in every process (default: torch's choice)")
    p.add_argument("--workdir", type=Path, default=None, help="where the cache and trainer outputs go (default: a temporary directory)")
    p.add_argument("--flops-only", action="store_true", help="print the FLOP model (meta device) and exit")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override of the 'ours' config, e.g. model.channels_last=true (the speed options; benchmarks/gpu_profile.sh)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the GPU's dense peak at the run's precision, for MFU (default: a table of known GPUs; CPU: none)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device.startswith("cuda")
    if args.mixed_precision is None:
        args.mixed_precision = "fp16" if cuda else "no"
    if args.resolution is None:
        args.resolution = DEFAULT_RESOLUTION[args.preset]
    if args.gradient_checkpointing == "auto":
        args.gradient_checkpointing = args.preset == "sdxl"
    else:
        args.gradient_checkpointing = args.gradient_checkpointing == "on"
    if args.resolution % (VAE_FACTOR[args.preset] * 4):
        p.error(f"--resolution must be a multiple of {VAE_FACTOR[args.preset] * 4} for preset {args.preset}")
    if args.preset == "sdxl" and not cuda and not args.flops_only:
        p.error("--preset sdxl is for GPUs (a 2.6B-parameter UNet trained three ways); use --flops-only on a CPU")
    if not cuda and args.mixed_precision == "fp16":
        p.error("--mixed-precision fp16 needs CUDA; use no or bf16 on a CPU")
    if args.steps < 1 or args.warmup < 0 or args.batch < 1:
        p.error("--steps >= 1, --warmup >= 0 and --batch >= 1")
    return args


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"  # every Accelerator, including the trainer's, stays on the CPU
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cpu":
        # Random weights drive some activations subnormal within a few steps, and x86 CPUs then run
        # 5-10x slower (measured here: from step 3 on, the floor took 5 s per step without this and
        # 0.57 s with it). GPUs have no such penalty; flushing in every variant keeps the CPU comparison about work.
        torch.set_flush_denormal(True)
    if args.child:
        child_main(args)
        return None
    if args.flops_only:
        fm = flop_model(args)
        print(json.dumps({"preset": args.preset, "finetune": args.finetune, "batch": args.batch, "resolution": args.resolution,
                          "gradient_checkpointing": args.gradient_checkpointing, **fm}, indent=2))
        return fm
    started = time.perf_counter()
    device = torch.device(args.device)
    order = args.order if args.order != "auto" else ("sequential" if device.type == "cuda" else "interleaved")
    memory_mode = args.memory
    if memory_mode == "auto":
        memory_mode = "inprocess" if device.type == "cuda" and order == "sequential" else "subprocess"
    if memory_mode == "inprocess" and not (device.type == "cuda" and order == "sequential"):
        raise SystemExit("--memory inprocess needs CUDA and --order sequential (a per-variant peak needs the others torn down)")
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="diffalign-bench-")
        workdir = Path(tmp.name)
    else:
        workdir = args.workdir
        workdir.mkdir(parents=True, exist_ok=True)
    try:
        info = machine(device)
        print(f"train_step benchmark · {PRESET_NOTES[args.preset]}")
        print(f"  {args.finetune} fine-tune · {args.batch} pairs × {args.resolution} px · {args.mixed_precision} · order {order} · "
              f"memory {memory_mode} · {info['cpu']} ×{info['cpu_count']}" + (f" · {info.get('gpu')}" if device.type == "cuda" else ""))
        fm = flop_model(args)
        master = build_components(args.preset, args.resolution, args.seed)
        prepare_ours_cache(args, master, device, workdir)
        batches = reference_batches(args, master.tokenizers)
        phases = {"setup_s": time.perf_counter() - started}
        if order == "interleaved":
            (times, nonfinite), memory = run_interleaved(args, master, device, weight_dtype, workdir, batches), {}
        else:
            times, nonfinite, memory = run_sequential(args, master, device, weight_dtype, workdir, batches)
        del master
        release(device)
        phases["timing_s"] = time.perf_counter() - started - phases["setup_s"]
        kind = "off"
        if memory_mode == "subprocess":
            memory = memory_in_subprocesses(args, workdir)
            kind = "cuda" if device.type == "cuda" else "rss"
        elif memory_mode == "inprocess":
            kind = "cuda"
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if not k.startswith("child")}
        result = {
            "settings": settings,
            "preset": PRESET_NOTES[args.preset],
            "order": order,
            "machine": info,
            "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
            "variants": summarize(times, memory if kind != "off" else {}),
            "memory": {"kind": kind, "subprocesses": memory if memory_mode == "subprocess" else None,
                       "note": {"rss": "peak RSS (VmHWM) of a fresh process per variant, minus the baseline process's (imports only)",
                                "cuda": "torch.cuda.max_memory_allocated, reset per variant", "off": "not measured"}[kind]},
            "flops": fm,
            "peak_tflops": args.peak_tflops or (peak_tflops(info.get("gpu"), args.mixed_precision) if device.type == "cuda" else None),
            "what": WHAT,
            "seconds": round(time.perf_counter() - started, 1),
            "phases_s": {k: round(v, 1) for k, v in phases.items()},
            "flush_denormal": device.type == "cpu",
            "nonfinite_steps": nonfinite,
        }
        table = markdown(result)
        bad = {k: n for k, n in nonfinite.items() if n}
        if bad:
            table += (f"\n\nWARNING: non-finite losses in timed steps {bad}; the optimizer may have skipped those updates, so "
                      "the times are not comparable. Rerun with --mixed-precision bf16 (random weights can overflow fp16).")
        print()
        print(table)
        print(f"\n({result['seconds']:.0f} s in all)")
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2) + "\n")
            args.out.with_suffix(".md").write_text(table + "\n")
            print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
        return result
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
