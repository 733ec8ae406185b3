"""Does TailorPO's step-wise reward rank its two children the way their final images do? (the toy world)

TailorPO (arXiv:2502.01667, Eq. 12) ranks the two children x_{k+1} of one parent by the reward of their predicted x̂0
and trains the DPO loss on that order. The order is only a signal if it agrees with where each child leads. This script
samples rollout rounds exactly as `toy/tailorpo` does (the base model: a fresh LoRA), and for every stored child pair
(winner, loser) at each trained step k:

- Δstep  = r(x̂0(winner)) − r(x̂0(loser)), the step-wise reward gap TailorPO sees (> 0 by construction, or a tie);
  x̂0 is the one-step prediction of Eq. 12 with `--set method.lookahead_steps=0`, else where that many deterministic
  DDIM steps lead (the recipe's 4),
- Δfinal = R(winner) − R(loser), the reward of the final image each child reaches by deterministic DDIM (η = 0) over
  every remaining level of the grid, with the same network and guidance (the mean path of where the child leads),

and reports per trained step: the agreement P(Δfinal > 0 | Δstep > 0) over pairs whose final rewards differ, the share
of pairs whose final images tie, and the same for pairs above TailorPO's `threshold`. Agreement near ½ means the
step-wise reward orders the children at random at that step: the DPO loss there trains noise.

    OMP_NUM_THREADS=1 python benchmarks/tailorpo_step_reward.py --rounds 12 --set method.lookahead_steps=0 \
        --out benchmarks/results/tailorpo-step-reward-cpu.json
    OMP_NUM_THREADS=1 python benchmarks/tailorpo_step_reward.py --rounds 6     # the recipe's lookahead
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


@torch.no_grad()
def child_rewards(method, feed, models, children: torch.Tensor, k: int, traj, rows: torch.Tensor) -> torch.Tensor:
    """`method`'s step-wise reward of each child at chain position k + 1 (`TailorPO._reward`: its x̂0, or where its
    `lookahead_steps` deterministic DDIM steps lead)."""
    cond, uncond = traj.cond.select(rows).to(models.device, torch.float32), traj.uncond.select(rows).to(models.device, torch.float32)
    prompts = [traj.prompts[int(i)] for i in rows]
    return method._reward(feed, models, children.to(models.device).float(), feed.grid.prev_timesteps[k], cond, uncond, prompts).cpu()


def measure(rounds: int, overrides: list[str]) -> dict:
    from diffalign.config import load_config
    from diffalign.trainers.loop import PreferenceTrainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config("toy/tailorpo", [*overrides, f"train.output_dir={tmp}", "log.progress=false"])
        trainer = PreferenceTrainer(cfg)
        trainer.setup()
        feed, models = trainer.feed, trainer.models
        # the final image a child reaches: deterministic DDIM over every remaining level of the grid
        to_the_end = type(feed.method)(cfg.method.model_copy(update={"lookahead_steps": feed.grid.steps}))
        per_step: dict[int, dict[str, list]] = {}
        for r in range(rounds):
            rd = feed.collect(models, r)
            traj, plan = rd.traj, rd.plan
            rows = torch.arange(len(traj))
            for j in range(plan["trained"].shape[1]):
                k = int(plan["trained"][0, j])
                w, l_ = plan["winners"][:, j], plan["losers"][:, j]
                entry = per_step.setdefault(k, {"d_step": [], "d_final": []})
                for key, method in (("d_step", feed.method), ("d_final", to_the_end)):
                    entry[key] += (child_rewards(method, feed, models, w, k, traj, rows)
                                   - child_rewards(method, feed, models, l_, k, traj, rows)).tolist()
        threshold = max(cfg.method.threshold, 0.1)
    out = []
    for k in sorted(per_step):
        d_step, d_final = torch.tensor(per_step[k]["d_step"]), torch.tensor(per_step[k]["d_final"])
        decided = (d_step > 0) & (d_final != 0)
        above = decided & (d_step > threshold)
        out.append({
            "chain_step": k, "level_t": int(feed.grid.prev_timesteps[k]), "pairs": len(d_step),
            "step_tie": float((d_step == 0).float().mean()), "final_tie": float((d_final == 0).float().mean()),
            "agreement": float((d_final[decided] > 0).float().mean()) if decided.any() else None,
            "threshold": threshold, "pairs_above_threshold": int(above.sum()),
            "agreement_above_threshold": float((d_final[above] > 0).float().mean()) if above.any() else None,
            "mean_step_gap": float(d_step.mean()), "mean_final_gap": float(d_final.mean()),
            "correlation": float(torch.corrcoef(torch.stack([d_step, d_final]))[0, 1]) if d_step.std() > 0 and d_final.std() > 0 else None,
        })
    return {"rounds": rounds, "overrides": overrides, "threads": torch.get_num_threads(), "steps": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8, help="rollout rounds of toy/tailorpo (16 trajectories each)")
    parser.add_argument("--set", action="append", default=[], help="override of toy/tailorpo, e.g. method.x0_from=reference")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    result = measure(args.rounds, args.set)
    print("| chain step (level t) | pairs | step-reward ties | final ties | agreement | above threshold: pairs, agreement | corr(Δstep, Δfinal) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    fmt = lambda v: "—" if v is None else f"{v:.2f}"  # noqa: E731
    for s in result["steps"]:
        print(f"| {s['chain_step']} ({s['level_t']}) | {s['pairs']} | {s['step_tie']:.2f} | {s['final_tie']:.2f} | {fmt(s['agreement'])} | "
              f"{s['pairs_above_threshold']}, {fmt(s['agreement_above_threshold'])} | {fmt(s['correlation'])} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
