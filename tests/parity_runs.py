"""Two fixed tiny training runs whose trained parameters are fingerprinted (tests/test_method_parity.py).

Run A: the built-in demo pairs (K = 2, hard labels), tiny SDXL, LoRA, DPO or SFT.
Run B: a K = 4 synthetic cache (tiny SDXL sampled, ranked by the toy checklist), DPO or SFT.
The seam (commit f4a3b3e) was shown bit-identical to the code before it (7f68979) by hashes; the fingerprints
recorded after it (commit ed7c25e, torch 2.14.1, diffusers 0.42.1) must not change beyond float noise.
"""

from __future__ import annotations

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


PROJECTIONS = 8


def trained_fingerprint(tmp: Path, run: str, method: str) -> list[float]:
    """The trained update Δ = trained − initial LoRA parameters, as ||Δ|| followed by PROJECTIONS fixed Gaussian
    projections g_i·Δ / ||Δ|| (g_i drawn from a fixed seed, one value per parameter element in name order).

    A change of what is trained (another draw, pairing or objective) moves Δ by about its own size, so every projection
    moves by O(1); float noise from another torch or diffusers release moves them by far less than the test's tolerance.
    Bit-exact hashes would instead fail on every dependency release.
    """
    from diffalign.trainers.loop import PreferenceTrainer

    trainer = PreferenceTrainer(validate_config(parity_config(tmp, run, method)))
    trainer.setup()
    unet = trainer.accelerator.unwrap_model(trainer.unet)
    start = {n: p.detach().clone() for n, p in unet.named_parameters() if p.requires_grad}
    trainer.train()
    delta = torch.cat([(p.detach() - start[n]).float().flatten() for n, p in sorted(unet.named_parameters()) if n in start])
    norm = delta.norm()
    g = torch.randn(PROJECTIONS, delta.numel(), generator=torch.Generator().manual_seed(0))
    return [float(norm), *(g @ delta / norm).tolist()]


if __name__ == "__main__":
    import sys
    import tempfile

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        for run in ("demo", "k4"):
            for method in ("dpo", "sft"):
                print(run, method, [round(v, 6) for v in trained_fingerprint(Path(d), run, method)], flush=True)
    sys.exit(0)
