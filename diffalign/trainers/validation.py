"""Validation during training: the same prompts and seeds each time, trained vs. base, as a grid and as scores.

Row 1 of the grid is the model being trained; row 2 (LoRA only) the same UNet with adapters disabled, i.e. the
base, which never changes: it is rendered and scored once per run. Each prompt gets `eval.seeds_per_prompt`
images (seeds `seed`, `seed` + 1, ...); the grid shows the first seed's. With `eval.scorers`, each scorer's mean
'overall' score over every prompt and seed is a metric `val/<scorer>` (`val/<scorer>_base` for the base row).
The scorers load once, at the first validation, on the training device.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from PIL import Image

from diffalign.config import Config, ConfigError, EvalConfig
from diffalign.imagegrid import paint_grid
from diffalign.models.devices import on_device
from diffalign.models.loading import Components, build_pipeline
from diffalign.models.lora import adapters_disabled
from diffalign.scorers.base import Scorer
from diffalign.scorers.registry import available, load_scorers
from diffalign.trainers.report import BASE_SUFFIX, VALIDATION_PREFIX

PromptImages = list[list[Image.Image]]  # per prompt, its images (one per seed)


def check_validation_scorers(cfg: Config, warn: bool = True) -> None:
    """`eval.scorers` are registered names, else a `ConfigError` listing them; with validation on, warns (when `warn`)
    about any that also built the training preferences (`data.source.scorers`)."""
    known = available()
    unknown = [name for name in cfg.eval.scorers if name not in known]
    if unknown:
        raise ConfigError(f"eval.scorers: unknown scorer(s) {', '.join(map(repr, unknown))}; available: {', '.join(known)}")
    shared = [name for name in cfg.eval.scorers if name in getattr(cfg.data.source, "scorers", ())]
    if shared and warn and cfg.eval.validation_every:
        warnings.warn(
            f"eval.scorers: {', '.join(map(repr, shared))} also built the training preferences (data.source.scorers), so its "
            "validation curve measures reward hacking rather than preference; a scorer the data never saw is the better check",
            stacklevel=2,
        )


def seeds(cfg: EvalConfig) -> list[int]:
    return [cfg.seed + j for j in range(cfg.seeds_per_prompt)]


@torch.no_grad()
def render(components: Components, unet, cfg: EvalConfig, resolution: int) -> PromptImages:
    """Per prompt, one image per seed of `seeds(cfg)` (a CPU generator each, in one pipeline call per prompt)."""
    pipe = build_pipeline(components, unet)
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for prompt in cfg.prompts:
        generators = [torch.Generator().manual_seed(seed) for seed in seeds(cfg)]
        out = pipe(prompt, num_images_per_prompt=len(generators), num_inference_steps=cfg.num_inference_steps,
                   guidance_scale=cfg.guidance_scale, height=resolution, width=resolution, generator=generators)
        rows.append(out.images)
    return rows


@torch.no_grad()
def mean_scores(scorers: dict[str, Scorer], per_prompt: PromptImages, prompts: list[str], suffix: str = "") -> dict[str, float]:
    """`val/<scorer><suffix>`: each scorer's mean 'overall' score over all images, each scored for its prompt."""
    images = [image for images in per_prompt for image in images]
    texts = [prompt for prompt, images in zip(prompts, per_prompt) for _ in images]
    return {f"{VALIDATION_PREFIX}{name}{suffix}": float(torch.as_tensor(scorer.score(images, texts)["overall"]).float().mean())
            for name, scorer in scorers.items()}


def first_seed(per_prompt: PromptImages) -> list[Image.Image]:
    """A grid row: each prompt's first image."""
    return [images[0] for images in per_prompt]


class Validation:
    """A run's validations (see the module docstring): keeps the scorers and the base row's images and scores."""

    def __init__(self, cfg: EvalConfig, resolution: int, lora: bool):
        self.cfg, self.resolution, self.lora = cfg, resolution, lora
        self._scorers: dict[str, Scorer] | None = None
        self._base_rows: PromptImages | None = None
        self._base_scores: dict[str, float] | None = None

    def scorers(self, device) -> dict[str, Scorer]:
        """The validation scorers, loaded on `device` at the first call."""
        if self._scorers is None:
            self._scorers = load_scorers(self.cfg.scorers, self.cfg.scorer_options, device=str(device)) if self.cfg.scorers else {}
        return self._scorers

    def render_rows(self, components: Components, unet, device) -> list[PromptImages]:
        """The trained model's images and, for LoRA, the base's (rendered at the first call only).

        The VAE and text encoders are lent to `device` for the sampling and go back where they were."""
        was_training = unet.training
        unet.eval()
        try:
            with on_device([components.vae, *components.text_encoders], device):
                rows = [render(components, unet, self.cfg, self.resolution)]
                if self.lora and self._base_rows is None:
                    with adapters_disabled(unet):
                        self._base_rows = render(components, unet, self.cfg, self.resolution)
        finally:
            unet.train(was_training)
        return rows + ([self._base_rows] if self.lora else [])

    def score(self, rows: list[PromptImages], device) -> dict[str, float]:
        """`val/<scorer>` for the trained row and, for LoRA, `val/<scorer>_base` (scored at the first call only)."""
        scorers = self.scorers(device)
        scores = mean_scores(scorers, rows[0], self.cfg.prompts)
        if self.lora:
            if self._base_scores is None:
                self._base_scores = mean_scores(scorers, rows[1], self.cfg.prompts, BASE_SUFFIX)
            scores.update(self._base_scores)
        return scores

    def run(self, components: Components, unet, device, out_path: Path) -> tuple[Image.Image, dict[str, float]]:
        """Render, save the grid (first seed of each prompt) to `out_path`, score; the grid and the scores."""
        rows = self.render_rows(components, unet, device)
        grid = paint_grid([first_seed(r) for r in rows])
        out_path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(out_path)
        return grid, self.score(rows, device)
