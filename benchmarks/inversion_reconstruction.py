"""How well DDIM / ReNoise inversion (`diffalign.diffusion.invert`) round-trips on the toy model.

For each training level t: invert real toy latents x_0 (VAE posterior mean × scaling factor of rendered
training scenes) to level t with the toy UNet (conditional, no CFG), then run deterministic DDIM sampling
back down the same grid with the same UNet (`ddim_step`, UNet at the step's upper level, the last step to
the clean latent with ᾱ = ᾱ_init) and compare:

    rel. MSE = mean((x̂_0 − x_0)²) / var(x_0)          (var over all latent entries of the batch)

Also reported: the standard deviation of the implied noise τ = (x̃ − √ᾱ_t·x_0)/√(1−ᾱ_t) at the TRAINING
level t (`implied_noise`), which is ≈ 1 for a latent that looks forward-noised to level t.

Run (2-core CPU, ~1 min):
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/inversion_reconstruction.py --n 64 --out out/inversion.json
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import write_report  # noqa: E402

from diffalign.config import ModelConfig  # noqa: E402
from diffalign.diffusion import ddim_step, implied_noise, inversion_grid, inversion_levels, invert  # noqa: E402
from diffalign.models.loading import encode_prompts, load_components  # noqa: E402
from diffalign.toy.scenes import TRAIN, render, sample_scene  # noqa: E402


def toy_batch(n: int, seed: int):
    """n rendered training scenes -> (components, x_0 latents, eps_fn over the batch rows' captions)."""
    c = load_components(ModelConfig(pretrained="builtin:toy"))
    rng = random.Random(seed)
    specs = [rng.choice(TRAIN) for _ in range(n)]
    pixels = np.stack([np.asarray(render(sample_scene(s, rng.randrange(1 << 30)), 32)) for s in specs])
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        x0 = c.vae.encode(x).latent_dist.mean * c.vae.config.scaling_factor
        embeds, pooled = encode_prompts(c, [s.caption for s in specs])
    time_ids = torch.tensor([[32, 32, 0, 0, 32, 32]], dtype=torch.float32).expand(n, -1)

    @torch.no_grad()
    def eps_fn(x_in: torch.Tensor, t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        kw = {"text_embeds": pooled[rows], "time_ids": time_ids[rows]}
        return c.unet(x_in, t, encoder_hidden_states=embeds[rows], added_cond_kwargs=kw).sample

    return c, x0, eps_fn


def sample_back(x_t, t, eps_fn, alphas_cumprod, num_steps: int, semantics: str) -> torch.Tensor:
    """Deterministic DDIM down the inversion path in reverse: step k from its destination d_k to its source s_k
    (UNet at timestep d_k; s_0 < 0 reads ᾱ_init = alphas_cumprod[0], as `invert`'s default)."""
    source, destination, _, active = inversion_grid(t, num_steps, alphas_cumprod.shape[0], semantics)
    x = x_t.clone()
    for k in reversed(range(num_steps)):
        rows = active[k].nonzero().view(-1)
        if rows.numel() == 0:
            continue
        out = eps_fn(x[rows], destination[k, rows], rows)
        x[rows] = ddim_step(out, x[rows], destination[k, rows], source[k, rows], alphas_cumprod, "epsilon",
                            final_alpha_cumprod=float(alphas_cumprod[0]))
    return x


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=64, help="toy latents per level")
    p.add_argument("--steps", type=int, default=10, help="inversion grid steps (InPO: 10)")
    p.add_argument("--levels", type=int, nargs="+", default=[250, 500, 900])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    c, x0, eps_fn = toy_batch(args.n, args.seed)
    alphas = c.scheduler.alphas_cumprod.float()
    var = x0.var().item()
    rows, result = [], {"n": args.n, "steps": args.steps, "latent_var": var, "runs": []}
    for t in args.levels:
        tt = torch.full((args.n,), t, dtype=torch.long)
        for semantics in ("exact", "official"):
            level = int(inversion_levels(tt, args.steps, alphas.shape[0], semantics)[0][0])
            for renoise in (False, True):
                x_t = invert(x0, tt, eps_fn, alphas, num_steps=args.steps, semantics=semantics, renoise=renoise)
                rec = sample_back(x_t, tt, eps_fn, alphas, args.steps, semantics)
                rel = ((rec - x0) ** 2).mean().item() / var
                tau_std = implied_noise(x_t, x0, tt, alphas).std().item()
                name = "ReNoise" if renoise else "DDIM"
                result["runs"].append(dict(t=t, semantics=semantics, level=level, method=name, rel_mse=rel, tau_std=tau_std))
                rows.append(f"| {t} | {semantics} | {level} | {name} | {rel:.2e} | {tau_std:.3f} |")
    table = "\n".join(
        [f"toy model, {args.n} training-scene latents (var {var:.3f}), {args.steps}-step grid, conditional UNet, no CFG", "",
         "| t | semantics | latent level | inversion | rel. MSE of x̂_0 | std of τ at t |", "|---|---|---|---|---|---|", *rows, ""]
    )
    write_report(args.out, result, table)


if __name__ == "__main__":
    main()
