"""`diffalign generate`: images for (prompt, seed) pairs into a folder that `score` and `compare` read.

1. `load_generation_pipeline` loads the positive model (a base pipeline plus an optional LoRA at a scale, or a full
   UNet: diffalign's own ``final/`` directories load as they are) and, optionally, NPO weights for the negative branch
   of CFG with α and β (`diffalign.pipelines.guidance`). Without NPO weights it is plain CFG on the positive model.
2. `generate_folder` samples every (prompt, seed) not already in the folder with the same settings, saves
   ``p<prompt index>_s<seed>.png`` (atomically), rewrites ``metadata.jsonl`` after every batch (atomically: the commit of
   the batch, so a killed run redoes at most one batch) and paints a contact
   sheet. Sampling goes through `diffalign.models.sampling.sample_with`, as the toy bench's does.
"""

from __future__ import annotations

import io
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image

from diffalign.config import ModelConfig
from diffalign.config.base import is_single_file
from diffalign.eval.imagefolder import METADATA, read_folder
from diffalign.faults import fault_point
from diffalign.imagegrid import paint_grid
from diffalign.io import atomic_write_bytes, atomic_write_text
from diffalign.models.errors import ModelLoadError
from diffalign.models.loading import build_pipeline, load_components
from diffalign.models.quiet import quiet_loading
from diffalign.models.sampling import sample_with
from diffalign.pipelines.weights import find_weights, is_negative_model

SCHEDULERS = {  # name -> diffusers class; every one is built from the model's own scheduler config
    "ddim": "DDIMScheduler",  # η = 0, diffalign's default (the toy bench and validation sample with it)
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",  # Diffusion-NPO's gen.sh: DPMSolverMultistep, 25 steps
    "pndm": "PNDMScheduler",
    "unipc": "UniPCMultistepScheduler",
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CONTACT_SHEET = "contact_sheet.png"


@dataclass(frozen=True)
class Settings:
    """Everything that decides an image besides its prompt and seed (written on every metadata line)."""

    model: str
    model_config: str | None = None  # configs and tokenizers of a single-file `model`
    adapter: str | None = None  # the positive LoRA or UNet
    adapter_scale: float = 1.0
    npo: str | None = None
    npo_alpha: float = 1.0
    npo_beta: float = 1.0
    steps: int = 20
    guidance: float = 5.0
    scheduler: str = "ddim"
    negative_prompt: str | None = None
    height: int | None = None
    width: int | None = None
    dtype: str = "fp32"


def load_generation_pipeline(settings: Settings, *, lora: bool = True, device: str = "cpu"):
    """The NPO-CFG pipeline for `settings` (positive model: `settings.adapter` as a LoRA when `lora`, else as a full UNet)."""
    if settings.adapter is not None:
        kind = find_weights(settings.adapter, "--lora" if lora else "--unet").kind
        if kind != ("lora" if lora else "unet"):
            flag = "--unet" if kind == "unet" else "--lora"
            raise ModelLoadError(f"{settings.adapter} holds a {'full UNet' if kind == 'unet' else 'LoRA'}: pass it as {flag}")
        if kind == "unet" and settings.adapter_scale != 1.0:
            raise ModelLoadError("--lora-scale applies to a LoRA; a full UNet (--unet) is used as it is")
    if settings.model_config is not None and not is_single_file(settings.model):
        raise ModelLoadError(f"--model-config applies to a single-file --model (a .safetensors checkpoint), not to {settings.model!r}")
    components = load_components(ModelConfig(pretrained=settings.model, single_file_config=settings.model_config))
    pipe = npo_cfg_pipeline(components, settings.npo, positive=settings.adapter, alpha=settings.npo_alpha, beta=settings.npo_beta,
                            positive_scale=settings.adapter_scale, scheduler=settings.scheduler, copy_unet=False)
    with quiet_loading():
        pipe.to(device=device, dtype=DTYPES[settings.dtype])
    return pipe


def npo_cfg_pipeline(components, npo: str | Path | None, *, positive: str | Path | None = None, alpha: float = 1.0, beta: float = 1.0,
                     positive_scale: float = 1.0, scheduler: str = "ddim", copy_unet: bool = True):
    """The NPO-CFG pipeline over loaded components (`load_npo`'s arguments), the scheduler built from the model's own
    config. With `copy_unet` the adapters go on a copy of the components' UNet, which stays the base model."""
    import copy

    import diffusers

    from diffalign.pipelines.pipeline_sd_npo import StableDiffusionNPOPipeline
    from diffalign.pipelines.pipeline_sdxl_npo import StableDiffusionXLNPOPipeline

    if scheduler not in SCHEDULERS:
        raise ModelLoadError(f"--scheduler {scheduler!r}: one of {', '.join(SCHEDULERS)}")
    base = build_pipeline(components, unet=copy.deepcopy(components.unet) if copy_unet else None)
    cls = StableDiffusionXLNPOPipeline if components.family == "sdxl" else StableDiffusionNPOPipeline
    with quiet_loading():
        pipe = cls.from_pipe(base)
    pipe.scheduler = getattr(diffusers, SCHEDULERS[scheduler]).from_config(components.scheduler.config)
    return pipe.load_npo(npo, positive=positive, alpha=alpha, beta=beta, positive_scale=positive_scale)


def warn_if_negative(ref: str | None, flag: str) -> None:
    if ref is not None and is_negative_model(ref):
        print(f"warning: {ref} was trained as a negative model (npo / self_npo); as {flag} it makes images people dislike. "
              "Pass it as --npo to put it in the negative branch of CFG.", file=sys.stderr)


def image_name(prompt_index: int, seed: int) -> str:
    return f"p{prompt_index:05d}_s{seed}.png"


def generate_folder(pipe, prompts: list[str], seeds: list[int], out: Path, settings: Settings, *, batch_size: int = 8,
                    progress: bool = True, rank: int = 0, world: int = 1, barrier=None) -> dict:
    """Every (prompt, seed) image into `out`, skipping those whose metadata line matches (file present, same settings).
    Returns counts: generated, skipped, total.

    Several processes (`rank` of `world`, e.g. under `accelerate launch`; `barrier()` waits for all of them): the images to
    make are cut into batches exactly as one process cuts them and batch k goes to rank k mod `world`, so every image is
    computed in the batch one process would compute it in (the same bits on the same hardware). Each rank commits its
    own metadata part (``metadata.part-<rank>.jsonl``) after each batch; at the end rank 0 merges the parts into
    ``metadata.jsonl`` (a killed run's parts are merged when the folder is next read) and paints the contact sheet."""
    out.mkdir(parents=True, exist_ok=True)
    meta = asdict(settings)
    lines = _read_metadata(out)
    jobs = [(i, p, s) for i, p in enumerate(prompts) for s in seeds]
    todo = [(i, p, s) for i, p, s in jobs if not _done(out, lines.get(image_name(i, s)), p, s, meta)]
    if world > 1:
        barrier()  # every rank has read the folder before any writes to it
    batches = [todo[start : start + batch_size] for start in range(0, len(todo), batch_size)][rank::world]
    mine: dict[str, dict] = {}
    bar = _progress(sum(map(len, batches)), progress and rank == 0)
    for chunk in batches:
        images = sample_with(pipe, [p for _, p, _ in chunk], [s for _, _, s in chunk], num_inference_steps=settings.steps,
                             guidance_scale=settings.guidance, height=settings.height, width=settings.width,
                             negative_prompt=settings.negative_prompt, batch_size=batch_size)
        for (i, p, s), image in zip(chunk, images):
            save_png(out / image_name(i, s), image)
            fault_point("generate.image")
            mine[image_name(i, s)] = {"file": image_name(i, s), "prompt": p, "seed": s, **meta}
        if world > 1:
            _write_lines(out / _part_name(rank), mine)
        else:
            _write_metadata(out, lines | mine)
        fault_point("generate.batch")
        bar.update(len(chunk))
    bar.close()
    if world > 1:
        barrier()  # every part is written
    if rank == 0:
        lines = _read_metadata(out) if world > 1 else lines | mine  # the parts merged
        _write_metadata(out, lines)
        save_png(out / CONTACT_SHEET, contact_sheet(out, [lines[image_name(i, s)] for i, _, s in jobs]))
    if world > 1:
        barrier()  # the folder is complete when any rank returns
    return {"generated": len(todo), "skipped": len(jobs) - len(todo), "total": len(jobs)}


def save_png(path: Path, image: Image.Image) -> None:
    """An image written atomically: a kill leaves the old file or none, never a torn one."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def _done(out: Path, line: dict | None, prompt: str, seed: int, meta: dict) -> bool:
    if line is None or not (out / line["file"]).is_file():
        return False
    return line.get("prompt") == prompt and line.get("seed") == seed and all(line.get(k) == v for k, v in meta.items())


def _part_name(rank: int) -> str:
    return f"metadata.part-{rank}.jsonl"


def _read_metadata(out: Path) -> dict[str, dict]:
    """The folder's metadata lines by file name (none for a new folder), with the lines of any rank's part merged in."""
    lines = {r.file: r.as_dict() for r in read_folder(out)} if (out / METADATA).is_file() else {}
    for part in sorted(out.glob(_part_name("*"))):
        lines |= {line["file"]: line for line in map(json.loads, part.read_text(encoding="utf-8").splitlines()) if line}
    return lines


def _write_metadata(out: Path, lines: dict[str, dict]) -> None:
    """``metadata.jsonl`` (atomically), then the parts it now holds are removed."""
    _write_lines(out / METADATA, lines)
    for part in out.glob(_part_name("*")):
        part.unlink()


def _write_lines(path: Path, lines: dict[str, dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(lines[k], ensure_ascii=False) + "\n" for k in sorted(lines)))


def contact_sheet(out: Path, lines: list[dict], max_rows: int = 16, max_cols: int = 8) -> Image.Image:
    """The first prompts' images, one row per prompt (its seeds across), the prompt above each row."""
    rows: dict[str, list[dict]] = {}
    for line in lines:
        rows.setdefault(line["prompt"], []).append(line)
    shown = list(rows.items())[:max_rows]
    images = [[Image.open(out / line["file"]).convert("RGB") for line in row[:max_cols]] for _, row in shown]
    cell = min(256, max(64, images[0][0].width)) if images else 64
    return paint_grid(images, cell=cell, captions=[[prompt[:100]] for prompt, _ in shown])


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="generating", unit="img", disable=not enabled or total == 0)
