"""LoRA adapters on the UNet through peft, and their export in the diffusers format.

The LoRA reference of preference training is the same UNet with its adapters disabled, so no second copy
is held. Saved weights are ``pytorch_lora_weights.safetensors`` with peft-config metadata, which
``pipe.load_lora_weights(dir)`` accepts (alpha survives the round trip).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig as PeftLoraConfig
from peft.utils import get_peft_model_state_dict

from diffalign.config import LoraConfig

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def attach_lora(unet: UNet2DConditionModel, cfg: LoraConfig) -> None:
    """Freeze the UNet and add trainable LoRA adapters to `cfg.target_modules`."""
    unet.requires_grad_(False)
    unet.add_adapter(
        PeftLoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            init_lora_weights="gaussian" if cfg.init == "gaussian" else True,
            target_modules=list(cfg.target_modules),
        )
    )
    if not any(p.requires_grad for p in unet.parameters()):
        raise ValueError(f"model.lora.target_modules {cfg.target_modules} matched no UNet module")


@contextlib.contextmanager
def adapters_disabled(unet: UNet2DConditionModel):
    """Run the base model: the LoRA reference ε_ref of preference objectives.

    What diffusers' ``disable_adapters`` / ``enable_adapters`` do (each peft tuner layer's ``enable_adapters``), without
    their per-call peft version check: a third of the time on the toy UNet (0.8 ms instead of 2.4 ms per use), which
    InPO's reference inversion pays once per sequential UNet call."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
    if not layers:
        raise ValueError("adapters_disabled: the UNet has no LoRA adapters")
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield unet
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def save_lora(unet: UNet2DConditionModel, directory: str | Path, family: str) -> Path:
    """Write the UNet's adapters as diffusers-format safetensors (with the peft config as metadata)."""
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    layers = {k: v.detach().float().cpu().contiguous() for k, v in layers.items()}
    pipeline_cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    pipeline_cls.save_lora_weights(
        str(directory),
        unet_lora_layers=layers,
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
        weight_name=LORA_WEIGHT_NAME,
    )
    return Path(directory) / LORA_WEIGHT_NAME


KOHYA_WEIGHT_NAME = "lora_kohya.safetensors"


def save_lora_kohya(unet: UNet2DConditionModel, directory: str | Path) -> Path:
    """The UNet's adapter in kohya's key layout, which ComfyUI and AUTOMATIC1111 read: ``lora_unet_<module path, dots as
    underscores>.lora_down.weight`` / ``.lora_up.weight`` and ``.alpha`` (the adapter's lora_alpha; the loaders scale by
    alpha / rank). Module paths are diffusers', which both loaders map for SD1.5 and SDXL."""
    from safetensors.torch import save_file

    config = unet.peft_config["default"]
    tensors = {}
    for key, value in get_peft_model_state_dict(unet).items():
        module, _, kind = key.rpartition(".lora_")
        stem = "lora_unet_" + module.replace(".", "_")
        tensors[f"{stem}.{'lora_down' if kind.startswith('A') else 'lora_up'}.weight"] = value.detach().float().cpu().contiguous()
        tensors[f"{stem}.alpha"] = torch.tensor(float(config.lora_alpha))
    path = Path(directory) / KOHYA_WEIGHT_NAME
    save_file(tensors, str(path), metadata={"ss_network_dim": str(config.r), "ss_network_alpha": str(config.lora_alpha)})
    return path


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters that require grad, by name (LoRA weights, or the whole UNet for full fine-tuning)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
