"""Two fixed tiny training runs whose trained parameters are hashed (tests/test_method_parity.py).

Run A: the built-in demo pairs (K = 2, hard labels), tiny SDXL, LoRA, DPO or SFT.
Run B: a K = 4 synthetic cache (tiny SDXL sampled, ranked by the toy checklist), DPO or SFT.
The reference hashes were recorded with the code before the method seam (commit 7f68979) and must not change.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from diffalign.config import validate_config
from diffalign.toy.scenes import TRAIN


def parity_config(tmp: Path, run: str, method: str) -> dict:
    if run == "demo":
        source = {"kind": "demo", "num_pairs": 12, "image_size": 32, "seed": 0}
        data = {"ties": "drop"}
    else:
        source = {"kind": "synthetic", "prompts": [s.caption for s in TRAIN[:8]], "images_per_prompt": 4, "num_inference_steps": 2,
                  "scorers": ["toy-checklist"], "seed": 0}
        data = {"ties": "keep"}
    return {
        "model": {"pretrained": "builtin:tiny-sdxl", "finetune": "lora", "lora": {"rank": 4, "alpha": 4.0}},
        "data": {"source": source, "cache_dir": str(tmp / f"cache-{run}"), "resolution": 32, "shard_size": 4, "latent_dtype": "float32",
                 "caption_dropout": 0.25, **data},
        "method": {"name": method, **({"beta": 5000.0} if method == "dpo" else {})},
        "optim": {"lr": 1e-3, "warmup_steps": 1},
        "train": {"output_dir": str(tmp / f"run-{run}-{method}"), "max_steps": 3, "batch_size": 2, "grad_accum": 2, "seed": 3},
        "log": {"tracker": "none", "progress": False},
    }


def trained_hash(tmp: Path, run: str, method: str) -> str:
    """sha256 over the trained (LoRA) parameters' names and float32 bytes after the run."""
    from diffalign.trainers.loop import PreferenceTrainer

    trainer = PreferenceTrainer(validate_config(parity_config(tmp, run, method)))
    trainer.setup()
    trainer.train()
    unet = trainer.accelerator.unwrap_model(trainer.unet)
    h = hashlib.sha256()
    for name, p in sorted(unet.named_parameters()):
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


if __name__ == "__main__":
    import sys
    import tempfile

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        for run in ("demo", "k4"):
            for method in ("dpo", "sft"):
                print(run, method, trained_hash(Path(d), run, method), flush=True)
    sys.exit(0)
