"""The training reward of each online method's cells in a `diffalign bench toy` report, one line per training seed.

Each online run logs the mean reward of the rollouts it trained on (`metrics.jsonl`: ``reward``; one value per step,
dense online one per rollout round); the plot shows its moving average (`--window` values, at most a quarter of the
run's) per (method, seed), one panel per method, so a seed that learned less than its siblings can be seen beside them.
The numbers are printed too: the mean reward over the first and the last fifth of each run, and their difference.
With `--grid`, the samples beside them: the held-out samples of the bench grid's 8 captions (first evaluation seed)
for the base and every online cell, one column each, from the report's workdir (`samples/<row>/`).

    python benchmarks/online_reward_curves.py outputs/table/report.json --out docs/img/toy_table_online_curves.png \
        --grid docs/img/toy_table_online_samples.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ONLINE = ("dense_online", "tailorpo", "pref_grpo", "grpo")


def rewards(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [row["reward"] for row in rows if "reward" in row]


def cells(methods: dict, method: str) -> list[str]:
    """The report rows of `method`'s training seeds: "grpo", "grpo (seed 1)", ..."""
    return [name for name in methods if name == method or name.startswith(method + " (seed ")]


def seed_of(name: str) -> str:
    """ "grpo (seed 2)" -> "2"; a method's own name is seed 0."""
    return name.partition(" (seed ")[2].rstrip(")") or "0"


def moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("report", type=Path, help="a bench report.json (its methods' run_dir hold metrics.jsonl)")
    p.add_argument("--out", type=Path, required=True, help="the figure (.png)")
    p.add_argument("--window", type=int, default=20)
    p.add_argument("--grid", type=Path, default=None, help="also paint the online cells' held-out samples here (.png)")
    args = p.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = json.loads(args.report.read_text())
    methods = report["methods"]
    panels = [m for m in ONLINE if m in methods]
    if not panels:
        raise SystemExit(f"{args.report}: no online method ({', '.join(ONLINE)}) in this report")
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), sharey=True, squeeze=False)
    for ax, method in zip(axes[0], panels):
        for name in cells(methods, method):
            values = rewards(Path(methods[name]["run_dir"]))
            fifth = max(1, len(values) // 5)
            first, last = sum(values[:fifth]) / fifth, sum(values[-fifth:]) / fifth
            print(f"{name:24s} steps {len(values):4d}  reward first fifth {first:.4f}  last fifth {last:.4f}  "
                  f"change {last - first:+.4f}  held-out win-rate vs base {methods[name]['win_rate']:.3f}")
            ax.plot(moving_average(values, max(1, min(args.window, len(values) // 4))),
                    label=f"seed {seed_of(name)}: {methods[name]['win_rate']:.3f} vs base")
        ax.set_title(method)
        ax.set_xlabel("step (dense online: rollout round)")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("rollout reward (moving mean)")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    if args.grid:
        paint_samples(report, [name for method in panels for name in cells(methods, method)], args.grid)


def paint_samples(report: dict, names: list[str], out: Path, rows: int = 8) -> None:
    """The first evaluation seed of `rows` captions spread over the split (the bench grid's), base first."""
    from PIL import Image

    from diffalign.eval.toybench import folder_name
    from diffalign.imagegrid import paint_grid

    samples = Path(report["settings"]["workdir"]) / "samples"
    seeds = report["settings"]["eval_seeds"]
    captions = report["methods"][names[0]]["n"] // seeds
    shown = [i * captions // rows * seeds for i in range(rows)]
    columns = ["base", *names]
    grid = [[Image.open(samples / folder_name(name) / f"{j:05d}.png").convert("RGB") for name in columns] for j in shown]
    labels = ["base"] + [f"{name.partition(' (')[0]} s{seed_of(name)} {report['methods'][name]['win_rate']:.3f}".replace(" 0.", " .")
                         for name in names]  # "pref_grpo s2 .544": method, training seed, held-out win-rate vs base
    paint_grid(grid, scale=4, column_labels=labels).save(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
