"""The configuration sections other than the method: model, data (with its sources), optim, train, log, eval.

Every field's ``description`` is its documentation. Checks here are data only: they never import the toy
world, the scorer registry or the trainers (the synthetic source's prompts and scorers are checked where the
source is opened, `diffalign.data.sources.synthetic`).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Union

from pydantic import Field, field_validator, model_validator

from diffalign.config.base import BUILTIN_TINY_SD15, BUILTIN_TINY_SDXL, BUILTIN_TOY, Section, check_builtin, check_separate_vae, is_single_file


class LoraConfig(Section):
    rank: int = Field(8, ge=1, description="LoRA rank r (diffusers DPO recipe: 8).")
    alpha: float = Field(8.0, gt=0, description="LoRA alpha; the update is scaled by alpha / rank (diffusers recipe: alpha = rank).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA branch.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["to_k", "to_q", "to_v", "to_out.0"],
        description="UNet module names that get adapters (diffusers DPO recipe: attention projections).",
    )
    init: Literal["gaussian", "default"] = Field(
        "gaussian", description="peft `init_lora_weights`: 'gaussian' as diffusers' DPO scripts, 'default' = Kaiming A, zero B."
    )


class ModelConfig(Section):
    pretrained: str = Field(
        BUILTIN_TOY,
        description="Base pipeline: a local diffusers directory, a hub id (offline: must be in the local cache), "
        "a single-file .safetensors checkpoint as community models ship (configs from `single_file_config`), "
        f"'{BUILTIN_TINY_SDXL}' / '{BUILTIN_TINY_SD15}' for a tiny random pipeline built from config, or '{BUILTIN_TOY}' "
        "for the pretrained toy-world pipeline shipped in the package.",
    )
    single_file_config: str | None = Field(
        None,
        description="For a single-file `pretrained`: the diffusers pipeline directory or hub id whose component configs, tokenizers "
        "and scheduler it uses (default: diffusers' reference repository of its family, stable-diffusion-v1-5/stable-diffusion-v1-5 "
        "or stabilityai/stable-diffusion-xl-base-1.0; offline, a local directory or the hub cache).",
    )
    revision: str | None = Field(None, description="Hub revision of `pretrained` (ignored for local directories).")
    variant: str | None = Field(None, description="Weight variant to load, e.g. 'fp16'.")
    vae: str | None = Field(
        None,
        description="Optional separate VAE (directory or hub id), e.g. madebyollin/sdxl-vae-fp16-fix. "
        "The VAE encodes in fp32 unless `vae_fp16_safe` is true. Refused with a builtin model, which uses its own VAE.",
    )
    vae_fp16_safe: bool = Field(False, description="The configured VAE does not overflow in fp16, so it may encode in half precision.")
    init_from: str | None = Field(
        None,
        description="Start from a previous output instead of the plain `pretrained` UNet: a run's `final/` directory (a LoRA "
        "`pytorch_lora_weights.safetensors`, merged into the base, or a full `unet/`), a diffusers UNet directory, or a LoRA "
        "safetensors file. It becomes both the policy's start and the reference (the official InPO and SmPO SD1.5 recipes "
        "start from an SFT'd UNet; Diffusion-NPO from a preference-tuned one).",
    )
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = Field(
        "auto", description="UNet target; 'auto' reads the scheduler config of `pretrained`."
    )
    finetune: Literal["lora", "full"] = Field(
        "lora", description="Train LoRA adapters (reference = adapters disabled) or the full UNet (reference = frozen copy)."
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA settings (used when finetune = lora).")
    reference_offload: bool = Field(
        False, description="Full fine-tune only: keep the frozen reference UNet on the CPU and stream it to the device per forward."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute UNet activations in the backward pass to save memory.")
    attention: Literal["sdpa", "xformers"] = Field("sdpa", description="Attention kernel: PyTorch SDPA, or xformers when installed.")
    sdpa_backend: Literal["auto", "flash", "efficient", "cudnn", "math"] = Field(
        "auto", description="SDPA kernel of the training forwards: 'auto' lets PyTorch choose; 'flash' (CUDA, and CPU), 'efficient' and "
        "'cudnn' (CUDA only: on the CPU a no-op with a message) or 'math' force one. Measured: benchmarks/speed_options.py.",
    )
    channels_last: bool = Field(
        False, description="Keep the UNet's conv weights in channels-last memory format (faster convolutions on recent GPUs; "
        "measured on the CPU in benchmarks/speed_options.py).",
    )
    compile: bool = Field(
        False, description="torch.compile the trained UNet (in place: checkpoint keys unchanged; full fine-tune also the reference). "
        "The first steps pay the compile time; with LoRA, the reference forward (adapters off) compiles a second graph.",
    )

    @field_validator("pretrained")
    @classmethod
    def _known_builtin(cls, v: str) -> str:
        return check_builtin(v)

    @field_validator("single_file_config")
    @classmethod
    def _only_for_single_files(cls, v: str | None, info) -> str | None:
        if v is not None and not is_single_file(info.data.get("pretrained", "")):
            raise ValueError("applies to a single-file checkpoint in model.pretrained (a .safetensors file)")
        return v

    @field_validator("vae")
    @classmethod
    def _no_vae_for_builtins(cls, v: str | None, info) -> str | None:
        return check_separate_vae(info.data.get("pretrained", ""), v)


# ---------------------------------------------------------------------------------------------- data


class PickapicSource(Section):
    kind: Literal["pickapic"] = Field("pickapic", description="Source type tag: Pick-a-Pic-v2-format parquet.")
    path: str = Field(..., description="A Pick-a-Pic-v2-format parquet file, or a directory of them (columns caption, jpg_0, jpg_1, label_0).")


class FolderSource(Section):
    kind: Literal["folder"] = Field("folder", description="Source type tag: an image folder with a jsonl of preferences.")
    root: str = Field(..., description="Image folder; image paths in the jsonl are relative to it.")
    jsonl: str = Field(
        ...,
        description="One item per line: {'caption', 'images': [K paths]} and one of 'label' (K = 2: P(images[0] preferred), "
        "0.5 = tie), 'ranks' (0 = best) or 'scores' (higher = better).",
    )


class CaptionsSource(Section):
    kind: Literal["captions"] = Field(
        "captions",
        description="Source type tag: captioned images without preferences (one image per item), for methods that need none "
        "(self_npo): the Self-NPO code's LAION layout.",
    )
    root: str = Field(
        ...,
        description="Image folder (subfolders included): each image's caption is its sidecar <stem>.txt (official Self-NPO layout), "
        "or its line of a metadata.jsonl in the folder ({'file', 'prompt'}, what `diffalign generate` writes).",
    )


class ToyScenesSource(Section):
    kind: Literal["toy_scenes"] = Field(
        "toy_scenes", description="Source type tag: the toy world's procedural scenes with their captions (real images of the toy world)."
    )
    images_per_caption: int = Field(4, ge=1, description="Scenes drawn per training caption (each its own seed).")
    image_size: int = Field(32, ge=8, description="Rendered size in pixels (the toy model's native 32).")
    seed: int = Field(0, description="Scene seeds derive from it.")


class Hpdv2Source(Section):
    kind: Literal["hpdv2"] = Field(
        "hpdv2", description="Source type tag: Human Preference Dataset v2 (HPSv2, Wu et al. 2023) annotation json + image folder."
    )
    path: str = Field(
        ...,
        description="The official annotation file (train.json or test.json): a JSON list of items with 'prompt' and the image file "
        "names ('image_path', or 'file_path' as the HPSv2 training code reads train.json); train items carry 'human_preference' "
        "(one 1 for the preferred image) and become pairs, test items carry 'rank' (lower = better) and become ranked lists.",
    )
    root: str = Field(..., description="The image folder the file names are relative to (the extracted train/ or test/ folder).")


class DemoSource(Section):
    kind: Literal["demo"] = Field("demo", description="Source type tag: the built-in synthetic preference set.")
    num_pairs: int = Field(64, ge=1, description="Pairs in the built-in synthetic preference set (caption-matching colour preferred).")
    image_size: int = Field(64, ge=8, description="Side of the generated images.")
    seed: int = Field(0, description="Seed of the synthetic set.")


PROMPT_SETS = {"toy-train": "the training captions of the toy world (diffalign.toy.scenes.TRAIN)"}
EVAL_ONLY_PROMPT_SETS = {"toy-held-out": "the toy world's held-out captions (diffalign.toy.scenes.HELD_OUT)"}


def check_scorer_list(names: list[str], options: dict, names_key: str, options_key: str) -> None:
    """A list of scorers with per-scorer options: each scorer listed once, options only for listed scorers."""
    if len(set(names)) != len(names):
        raise ValueError(f"{names_key}: each scorer may be listed once ({', '.join(names)})")
    stray = sorted(set(options) - set(names))
    if stray:
        raise ValueError(f"{options_key} for {', '.join(map(repr, stray))}, which `{names_key}` does not list ({', '.join(names) or 'none'})")


class _ScorerList(Section):
    """A section with `scorers` and `scorer_options` (`check_scorer_list`)."""

    @model_validator(mode="after")
    def _check_scorer_list(self):
        check_scorer_list(self.scorers, self.scorer_options, "scorers", "scorer_options")
        return self


class SyntheticSource(_ScorerList):
    kind: Literal["synthetic"] = Field(
        "synthetic",
        description="Source type tag: sample K images per prompt from a model, score them with reward models and use the "
        "average pairwise win-rate φ over all scorers as the per-image preference score (RankDPO's Syn-Pic recipe).",
    )
    evaluation_only: bool = Field(
        False,
        description="Build an evaluation-only cache (e.g. for `diffalign eval ranking`): held-out prompt sets and captions "
        "('toy-held-out') are allowed, the cache's manifest says \"evaluation_only\": true (part of its identity), and "
        "training refuses the cache. Default false: held-out captions are refused.",
    )
    prompts: Union[list[str], str] = Field(
        ...,
        description="The prompts: a list of captions, or the name of a built-in prompt set ('toy-train': the toy world's "
        "training captions). Evaluation-only prompt sets and captions ('toy-held-out') are refused (captions when the "
        "source is opened) unless `evaluation_only` is true.",
    )
    num_prompts: int | None = Field(None, ge=1, description="Use only the first N prompts (null = all).")
    images_per_prompt: int = Field(4, ge=2, description="K: images generated per prompt (Syn-Pic: 4).")
    scorers: list[str] = Field(
        default_factory=lambda: ["toy-checklist"],
        min_length=1,
        description="Reward models by registry name (`diffalign.scorers.available()`); each scores every image, and "
        "φ(x^i) = Σ_scorers Σ_{j≠i} ([s_i > s_j] + ½[s_i = s_j]) / (n·(K−1)). Raw per-scorer scores are stored too.",
    )
    scorer_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Options per scorer, e.g. {pickscore: {path: /models/PickScore_v1, device: cuda}}; weight files left out "
        "are looked up in $DIFFALIGN_WEIGHTS under their release names (docs/scorers.md).",
    )
    num_inference_steps: int = Field(20, ge=1, description="DDIM sampling steps per image.")
    guidance_scale: float = Field(5.0, ge=0, description="Classifier-free guidance scale while sampling.")
    seed: int = Field(
        0, description="Sampling seed: image k of prompt i starts from its own generator seeded by a hash of (seed, i, k), "
        "so the images do not depend on batching or on where a build resumed."
    )
    resolution: int | None = Field(
        None, ge=8, description="Side of the generated (square) images; null = data.resolution. Must be divisible by the VAE's spatial factor."
    )
    model: str | None = Field(
        None,
        description="The generating model (a diffusers directory, a hub id or a 'builtin:' name); null = the training model "
        "`model.pretrained` with its revision, variant and VAE (the on-policy case).",
    )

    @field_validator("model")
    @classmethod
    def _known_builtin(cls, v: str | None) -> str | None:
        return v if v is None else check_builtin(v)

    @field_validator("prompts")
    @classmethod
    def _check_prompts(cls, v: list[str] | str, info) -> list[str] | str:
        if isinstance(v, str):
            if v in EVAL_ONLY_PROMPT_SETS and not info.data.get("evaluation_only"):
                raise ValueError(
                    f"prompt set {v!r} is {EVAL_ONLY_PROMPT_SETS[v]}: held-out captions are for evaluation only and may never "
                    f"become preference data; use one of: {', '.join(PROMPT_SETS)} (or set data.source.evaluation_only = true "
                    "for a cache that only evaluation may read)"
                )
            if v not in PROMPT_SETS and v not in EVAL_ONLY_PROMPT_SETS:
                raise ValueError(f"unknown prompt set {v!r}; built-in sets: {', '.join(PROMPT_SETS)} (or give a list of captions)")
        elif not v:
            raise ValueError("needs at least one prompt")
        return v


class PromptsSource(Section):
    kind: Literal["prompts"] = Field(
        "prompts", description="Source type tag: prompts only, for online methods that sample their own images (pref_grpo, grpo)."
    )
    prompts: Union[list[str], str] = Field(
        ...,
        description="A list of prompts, a built-in set ('toy-train': the toy world's training captions; 'parti': PartiPrompts), or a "
        "file: .txt (one per line) or .jsonl with a \"prompt\" field (what `diffalign prompts` writes). Held-out toy captions are refused.",
    )
    num_prompts: int | None = Field(None, ge=1, description="Use only the first N prompts (null = all).")

    @field_validator("prompts")
    @classmethod
    def _no_held_out(cls, v: list[str] | str) -> list[str] | str:
        if isinstance(v, str) and v in EVAL_ONLY_PROMPT_SETS:
            raise ValueError(f"prompt set {v!r} is {EVAL_ONLY_PROMPT_SETS[v]}: held-out captions are never trained on")
        if isinstance(v, list) and not v:
            raise ValueError("needs at least one prompt")
        return v


SOURCE_CONFIGS = (PickapicSource, FolderSource, Hpdv2Source, DemoSource, SyntheticSource, CaptionsSource, ToyScenesSource, PromptsSource)
SourceConfig = Annotated[Union[SOURCE_CONFIGS], Field(discriminator="kind")]


class DataConfig(Section):
    source: SourceConfig = Field(
        default_factory=DemoSource, description="Where the data comes from (`kind`: pickapic, folder, hpdv2, demo, synthetic; captions and "
        "toy_scenes hold captioned images without preferences)."
    )
    cache_dir: str = Field("outputs/cache", description="Latent-pair cache directory written by `diffalign prepare` and read by training.")
    resolution: int = Field(64, ge=8, description="Training resolution (square): images are resized so the short side matches, then cropped.")
    crop: Literal["center", "random"] = Field("center", description="Crop policy at cache time (official: center).")
    resize: Literal["bicubic", "official"] = Field(
        "bicubic",
        description="How images are scaled so the short side equals `resolution`: 'bicubic' = PIL bicubic (antialiased), long side "
        "rounded (diffalign default); 'official' = torchvision `Resize(resolution, interpolation=BILINEAR)` on the PIL image as the "
        "official Diffusion-DPO and diffusers scripts do: PIL bilinear (antialiased), long side truncated (int(long · resolution / "
        "short)). Part of the cache identity.",
    )
    random_flip: bool = Field(
        True, description="Horizontal flip with probability 1/2 (official: on); when it is decided is `flip_at`."
    )
    flip_at: Literal["cache", "train"] = Field(
        "cache",
        description="When a random flip is decided. 'cache' (default): once per image at cache time, so each image is trained in one "
        "fixed orientation for the whole run (over several epochs, half the flip augmentation of the official per-access flip). "
        "'train': per access, as the official code: the cache holds the VAE posterior of both orientations of every image (the "
        "mirror of the cropped image; 2x VAE encoding time and 2x latent storage when preparing) and each training step draws "
        "the orientation (shared by an item's images under pairing 'shared', per image under 'per_image'); SDXL time ids stay "
        "those of the crop. Needs random_flip: true. Part of the cache identity.",
    )
    pairing: Literal["shared", "per_image"] = Field(
        "shared",
        description="'shared': all images of an item get the same crop and flip (diffalign default). "
        "'per_image': independent per image, as the official Diffusion-DPO script does.",
    )
    seed: int = Field(
        0, description="Seed of the cache-time crop and flip draws (hashed with each item's source_id); part of the cache identity."
    )
    time_ids: Literal["original", "fixed"] = Field(
        "original",
        description="SDXL add_time_ids: 'original' = each image's real original size and crop (diffalign default); "
        "'fixed' = [res, res, 0, 0, res, res] as the official script.",
    )
    ties: Literal["drop", "keep"] = Field(
        "drop",
        description="Items whose trained pair is tied (label 0.5, or equal best and worst rank/score): dropped (official) or kept and "
        "trained with their label (0.5).",
    )
    phi_ties: Literal["half", "strict"] = Field(
        "half",
        description="How a tie counts in the Syn-Pic score φ computed from per-scorer scores when the data is read: 'half' (diffalign: "
        "½, φ sums to K/2) or 'strict' (the Syn-Pic paper's C_i counts strict wins only). Not part of the cache identity.",
    )
    min_score_gap: float = Field(
        0.0,
        ge=0,
        description="Drop items whose best and worst image (the pair a pairwise method trains on) differ by less than this in raw "
        "score: the mean over the item's scorers (synthetic source) or its `scores`. 0 keeps every item; items without scores are "
        "an error when > 0.",
    )
    caption_dropout: float = Field(
        0.0, ge=0, le=1, description="Probability an item's caption is replaced by the empty caption (shared by all its images)."
    )
    corrupt_images: Literal["skip", "error"] = Field("skip", description="An undecodable image: skip its item (counted in the manifest) or fail.")
    max_consecutive_corrupt: int | None = Field(
        100, ge=0, description="Stop preparing after more than this many skipped items in a row (a wrong folder or a dead disk, "
        "not a few bad files; Megatron-Energon's failure_tolerance is 100); null: never stop.")
    latent_dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16", description="Storage dtype of cached posterior mean/log-variance and text embeddings."
    )
    shard_size: int = Field(256, ge=1, description="Items per cache shard (the unit of atomic, resumable writing).")
    encode_batch_size: int = Field(8, ge=1, description="Images per VAE forward while preparing.")
    decode_workers: int = Field(2, ge=1, description="Threads decoding images while preparing.")
    max_items: int | None = Field(None, ge=1, description="Use only the first N source items (quick experiments).")
    scores: list[str] = Field(
        default_factory=list,
        description="Reward models by registry name (`diffalign.scorers.available()`) that `diffalign prepare` runs on every source "
        "image of the cache (decoded as stored, at its original resolution; no crop or flip) once the latents are complete. Each "
        "scorer's per-image scores go to their own files beside the latents (<cache_dir>/scores/<scorer>/, one per shard, "
        "resumable; docs/score_files.md), so adding a scorer never re-encodes or touches the latents or another scorer's files. "
        "Training reads them as `extra_scores[<scorer>]`. Not part of the cache identity: each scorer's files carry their own "
        "(scorer_identity: options and weight fingerprints), and files that do not match the config are refused.",
    )
    score_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Options per scorer of `scores`, e.g. {pickscore: {path: /models/PickScore_v1, device: cuda}}; weight files left "
        "out are looked up in $DIFFALIGN_WEIGHTS under their release names (docs/scorers.md). Model scorers run on the GPU when "
        "there is one unless a `device` is given.",
    )
    score_batch_size: int = Field(
        32, ge=1, description="Images per scorer call while scoring the cache (whole items; a shard's batches are the same on a resume)."
    )
    reward_scorer: str | None = Field(
        None,
        description="A scorer of `scores` (or of a synthetic source's `scorers`) whose 'overall' scores become each item's `scores`, "
        "the reward of methods that need one (and what `min_score_gap` measures when the source has no per-scorer scores). The "
        "trained pair still follows the source's own label, ranks or scores. null: `scores` are the source's.",
    )

    @model_validator(mode="after")
    def _check_flip_at(self):
        if self.flip_at == "train" and not self.random_flip:
            raise ValueError("flip_at = 'train' needs random_flip: true (without random flips there is no orientation to draw)")
        return self

    @model_validator(mode="after")
    def _check_scores(self):
        check_scorer_list(self.scores, self.score_options, "scores", "score_options")
        if self.reward_scorer is not None:
            known = [*self.scores, *getattr(self.source, "scorers", [])]
            if self.reward_scorer not in known:
                raise ValueError(f"reward_scorer {self.reward_scorer!r} is not a scorer of data.scores or of the synthetic source's "
                                 f"scorers ({', '.join(known) or 'none'})")
        return self


# -------------------------------------------------------------------------------------------- method

# --------------------------------------------------------------------------------------------- optim


class OptimConfig(Section):
    optimizer: Literal["adamw", "adamw8bit", "adafactor"] = Field("adamw", description="AdamW, 8-bit AdamW (needs bitsandbytes) or Adafactor.")
    lr: float = Field(1e-5, gt=0, description="Learning rate (before `scale_lr`).")
    scale_lr: bool = Field(
        False, description="Multiply lr by batch_size × grad_accum × num_processes (official `--scale_lr`: 1e-8 × 2048 ≈ 2e-5)."
    )
    weight_decay: float = Field(1e-2, ge=0, description="Decoupled weight decay (official: 1e-2).")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam betas.")
    eps: float = Field(1e-8, gt=0, description="Adam epsilon.")
    schedule: Literal["constant", "constant_with_warmup", "linear", "cosine"] = Field(
        "constant_with_warmup", description="LR schedule (official: constant_with_warmup)."
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warmup optimizer steps.")
    max_grad_norm: float | None = Field(1.0, description="Gradient clipping norm; null disables (official: 1.0).")
    fused: bool = Field(
        False, description="AdamW's fused kernel (CUDA, and CPU) instead of its multi-tensor one: the same update in fewer kernel "
        "launches. Measured: benchmarks/speed_options.py.",
    )

    @field_validator("max_grad_norm")
    @classmethod
    def _positive_norm(cls, v: float | None) -> float | None:
        if v is not None and not (v > 0 and math.isfinite(v)):
            raise ValueError("must be a positive finite number or null")
        return v


# --------------------------------------------------------------------------------------------- train


class EMAConfig(Section):
    enabled: bool = Field(False, description="Keep an exponential moving average of the trained parameters (saved beside them).")
    decay: float = Field(
        0.9999, gt=0, lt=1,
        description="Maximum EMA decay per optimizer step (diffusers EMAModel: the decay used at step s is min(decay, (1 + s) / (10 + s))).",
    )


class TrainConfig(Section):
    output_dir: str = Field("outputs/run", description="Where checkpoints, logs, validation grids and the final weights go.")
    seed: int = Field(0, description="Seed of every random draw (noise, timesteps, dropout and data order derive from it).")
    max_steps: int = Field(20, ge=1, description="Optimizer steps to train.")
    batch_size: int = Field(2, ge=1, description="Items (pairs) per device per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", description="Autocast precision; trained LoRA parameters stay fp32.")

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, v: Any) -> Any:
        return "no" if v is False else v  # an unquoted YAML `no` reads as false
    allow_tf32: bool = Field(True, description="Allow TF32 matmuls on Ampere+ GPUs.")
    checkpoint_every: int = Field(0, ge=0, description="Write a checkpoint every N optimizer steps (0 = only at the end).")
    keep_last: int = Field(2, ge=1, description="Committed checkpoints to keep; older ones are pruned only after a new one is committed.")
    resume: str | None = Field(None, description="'latest' = newest committed checkpoint in output_dir (fresh start if none), or a checkpoint path.")
    ema: EMAConfig = Field(default_factory=EMAConfig, description="Exponential moving average of the trained weights.")
    dataloader_workers: int = Field(0, ge=0, description="DataLoader worker processes.")
    export_kohya: bool = Field(
        False,
        description="LoRA runs: also write final/lora_kohya.safetensors with kohya key names (lora_unet_<module>.lora_down/up, "
        ".alpha), the layout ComfyUI and AUTOMATIC1111 load.",
    )
    nonfinite: Literal["skip", "stop"] = Field(
        "skip",
        description="A non-finite loss or gradient norm: 'skip' the whole optimizer step (no update, the LR schedule and EMA do "
        "not advance, the step's data is still consumed; logged as `skipped` and counted) and stop only after "
        "`max_skips_in_a_row` skipped steps in a row; or 'stop' at once. Either way the stop message names the step and items.",
    )
    max_skips_in_a_row: int = Field(5, ge=1, description="With nonfinite = skip: stop after this many consecutive skipped steps.")


class LogConfig(Section):
    tracker: Literal["tensorboard", "wandb", "none"] = Field("tensorboard", description="Where step metrics go.")
    every: int = Field(1, ge=1, description="Log metrics every N optimizer steps.")
    project: str = Field("diffalign", description="Tracker project name.")
    progress: bool = Field(True, description="Show a progress bar with ETA.")


class EvalConfig(_ScorerList):
    validation_every: int = Field(
        0, ge=0, description="Render a validation grid (and score it with `scorers`) every N optimizer steps (0 = off); with and "
        "without the adapter for LoRA."
    )
    prompts: list[str] = Field(
        default_factory=lambda: ["a red circle on a white background", "a blue square on a black background"],
        description="Validation prompts.",
    )
    num_inference_steps: int = Field(10, ge=1, description="Sampling steps for validation images.")
    guidance_scale: float = Field(5.0, ge=0, description="Classifier-free guidance scale for validation images.")
    seed: int = Field(0, description="Sampling seed for validation images (the same for every grid).")
    seeds_per_prompt: int = Field(
        1, ge=1, description="Validation images per prompt, from seeds `seed`, `seed` + 1, ...: scores average over all of them; "
        "the grid shows the first seed's."
    )
    scorers: list[str] = Field(
        default_factory=list,
        description="Reward models by registry name (`diffalign.scorers.available()`; unknown names are refused at setup) that "
        "score the validation images: the mean 'overall' score over prompts and seeds is logged as `val/<scorer>` beside the "
        "training curves, and for LoRA `val/<scorer>_base` for the base model (scored once: it never changes). Best: a scorer "
        "not used to build the training preferences (data.source.scorers): one that was measures reward hacking, not "
        "preference (setup warns). Loaded once, at the first validation, on the training device.",
    )
    scorer_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Options per validation scorer, e.g. {pickscore: {path: /models/PickScore_v1}}; weight files left out are "
        "looked up in $DIFFALIGN_WEIGHTS under their release names (docs/scorers.md).",
    )


# ---------------------------------------------------------------------------------------------- root
