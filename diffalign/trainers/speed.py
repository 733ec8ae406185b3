"""The speed options of `model` (`sdpa_backend`, `channels_last`, `compile`) applied to the trained UNet and its reference.

Each is off (or 'auto') by default until a measurement says otherwise: `benchmarks/speed_options.py` times one DPO step
with each option toggled alone against the defaults, in one process (ratios; docs/benchmarks.md). On the CPU the
CUDA-only kernels ('efficient', 'cudnn') are a no-op, said once at setup.
"""

from __future__ import annotations

import contextlib

import torch

SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION", "math": "MATH"}
CUDA_ONLY = ("efficient", "cudnn")


def sdpa_context(backend: str, device: torch.device):
    """A context factory for the training forwards: `torch.nn.attention.sdpa_kernel` with the chosen kernel, or nothing
    ('auto', or a CUDA-only kernel on another device)."""
    if backend == "auto" or (backend in CUDA_ONLY and device.type != "cuda"):
        return contextlib.nullcontext
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernel = getattr(SDPBackend, SDPA_BACKENDS[backend])
    return lambda: sdpa_kernel(kernel)


def apply_speed_options(model_cfg, unet: torch.nn.Module, reference: torch.nn.Module | None, device: torch.device) -> list[str]:
    """Apply `channels_last` and `compile` to the UNet (and a full fine-tune's frozen reference); returns the messages
    to print (an option that does nothing on this device)."""
    notes = []
    if model_cfg.sdpa_backend in CUDA_ONLY and device.type != "cuda":
        notes.append(f"model.sdpa_backend = {model_cfg.sdpa_backend} is a CUDA kernel: on {device.type} PyTorch chooses (as 'auto')")
    for module in (unet, reference):
        if module is None:
            continue
        if model_cfg.channels_last:
            module.to(memory_format=torch.channels_last)
        if model_cfg.compile:
            module.compile()  # in place: parameters and state-dict keys stay the module's own
    return notes
