"""The model card written beside every export (``final/README.md``, Hugging Face's front-matter format).

It says what a person receiving the weights needs: the base model, the method and its paper, the data, the recipe
and its main settings, how to load the weights (and, for a negative model, that it belongs in the negative branch of
CFG), and the licence, which the weights inherit from their base model.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from diffalign.config import Config
from diffalign.config.methods import METHOD_CONFIGS, NEGATIVE_METHODS, uses_beta

# Licences of the base models the shipped recipes name (their model cards); any other base: read from a local copy's
# README front matter, else "inherited".
KNOWN_LICENCES = {
    "runwayml/stable-diffusion-v1-5": "creativeml-openrail-m",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "creativeml-openrail-m",
    "stabilityai/stable-diffusion-xl-base-1.0": "openrail++",
    "builtin:toy": "apache-2.0",
    "builtin:tiny-sd15": "apache-2.0",
    "builtin:tiny-sdxl": "apache-2.0",
}


def base_licence(pretrained: str) -> str | None:
    """The base model's licence id: known, or the ``license:`` of a local copy's README front matter; None if unknown."""
    if pretrained in KNOWN_LICENCES:
        return KNOWN_LICENCES[pretrained]
    readme = Path(pretrained) / "README.md"
    if readme.is_file():
        front = re.match(r"^---\n(.*?)\n---", readme.read_text(encoding="utf-8", errors="replace"), re.S)
        if front:
            meta = yaml.safe_load(front.group(1)) or {}
            if isinstance(meta, dict) and meta.get("license"):
                return str(meta["license"])
    return None


def model_card(cfg: Config, steps: int, weights_file: str) -> str:
    """The card's text for a run of `cfg` that trained `steps` steps and exported `weights_file` (relative to final/)."""
    method = cfg.method
    paper = METHOD_CONFIGS[method.name].model_fields["name"].description.removeprefix("Method tag: ")
    licence = base_licence(cfg.model.pretrained)
    source = cfg.data.source.model_dump(mode="json")
    data = ", ".join(f"{k}: {v}" for k, v in source.items() if v is not None and k != "kind")
    front = {"base_model": cfg.model.pretrained, "library_name": "diffusers", "license": licence or "other",
             "tags": ["diffalign", method.name, "text-to-image", cfg.model.finetune]}
    settings = [f"{k} = {v}" for k, v in method.model_dump(mode="json").items() if k != "name"]
    lora = cfg.model.finetune == "lora"
    precision = "fp32" if cfg.train.mixed_precision == "no" else cfg.train.mixed_precision
    load = (f"pipe.load_lora_weights(\"final\", weight_name=\"{weights_file}\")" if lora
            else "UNet2DConditionModel.from_pretrained(\"final/unet\")")
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        f"# {method.name} on {cfg.model.pretrained}", "",
        f"- **Method:** {paper}",
        f"- **Base model:** `{cfg.model.pretrained}`" + (f" (started from `{cfg.model.init_from}`)" if cfg.model.init_from else ""),
        f"- **Weights:** {'LoRA rank ' + str(cfg.model.lora.rank) + ', alpha ' + str(cfg.model.lora.alpha) if lora else 'full UNet'}"
        f" (`{weights_file}`), {steps} optimizer steps",
        f"- **Data:** {source['kind']} ({data})",
        f"- **Method settings:** {', '.join(settings) or 'none'}",
        f"- **Training:** lr {cfg.optim.lr:g} ({cfg.optim.optimizer}, {cfg.optim.schedule}), batch {cfg.train.batch_size} x "
        f"{cfg.train.grad_accum} accumulation per process, {precision} precision, seed {cfg.train.seed}",
        "- **Recipe:** `config.yaml` beside this card is the full resolved configuration "
        f"(`diffalign train final/config.yaml` retrains it){'; β convention: −β/2 as Diffusion-DPO' if uses_beta(method) else ''}",
        "",
        "## Use", "",
    ]
    if method.name in NEGATIVE_METHODS:
        lines += ["A **negative** model: put it in the negative branch of classifier-free guidance, not in the positive one:", "",
                  f"    diffalign generate --model {cfg.model.pretrained} --npo final --prompts \"...\" --out samples", ""]
    else:
        lines += [f"    {load}", "", f"    diffalign generate --model {cfg.model.pretrained} "
                  f"--{'lora' if lora else 'unet'} final --prompts \"...\" --out samples", ""]
    lines += ["## Licence", "",
              (f"These weights are derived from `{cfg.model.pretrained}` and inherit its licence ({licence}); its use restrictions "
               "apply to them." if licence else f"These weights are derived from `{cfg.model.pretrained}` and inherit its licence: "
               "see the base model's card."), ""]
    return "\n".join(lines)
