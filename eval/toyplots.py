"""The toy bench's two plots: one bar per method (win-rate against the base, its interval, a dot per training seed), and
ranking / reward accuracy against that win-rate across methods (drawn from `toybench.method_points`)."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_win_rates(points: dict[str, dict], out: Path, title: str) -> None:
    """Bars: each method's win-rate against the base (its seeds' mean), whiskers: the 95% interval, dots: each seed."""
    plt = _pyplot()
    names = sorted(points, key=lambda m: points[m]["win_rate"], reverse=True)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(names) + 2), 4.0))
    for i, m in enumerate(names):
        p = points[m]
        low, high = p["ci"]
        ax.bar(i, p["win_rate"], color="#8fb3d9", edgecolor="#2b5d8a")
        ax.errorbar(i, p["win_rate"], yerr=[[p["win_rate"] - low], [high - p["win_rate"]]], color="black", capsize=4, lw=1)
        seeds = p["per_seed"]
        offsets = [(j - (len(seeds) - 1) / 2) * 0.12 for j in range(len(seeds))]
        ax.scatter([i + o for o in offsets], seeds, color="#c0392b", s=14, zorder=3, label="a training seed" if i == 0 else None)
    ax.axhline(0.5, color="grey", ls="--", lw=1)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_ylabel("win-rate vs base")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=10)
    if any(len(points[m]["per_seed"]) > 1 for m in names):
        ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_ranking_relation(points: dict[str, dict], relation: dict, out: Path) -> None:
    """Two panels: ranking accuracy and reward accuracy (x) against the win-rate over the base (y), one labelled point per
    method, Spearman's ρ in each title (over all methods, and without the negative models, which are trained to lose)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10.0, 4.2), sharey=True)
    for ax, key, label in zip(axes, ("ranking_accuracy", "reward_accuracy"), ("ranking accuracy", "reward accuracy")):
        for m, p in points.items():
            ax.scatter(p[key], p["win_rate"], color="#2b5d8a", s=20)
            ax.annotate(m, (p[key], p["win_rate"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        def rho(r: dict) -> str:
            v = r.get(f"spearman_{key}")
            return "n/a" if v is None else f"{v:+.2f}"

        aligned = relation.get("without_negative_models", relation)
        ax.set_title(f"{label} (held-out pairs)\nSpearman ρ {rho(relation)}; without the negative models {rho(aligned)}", fontsize=9)
        ax.set_xlabel(label)
        ax.axhline(0.5, color="grey", ls="--", lw=1)
        ax.axvline(0.5, color="grey", ls=":", lw=1)
    axes[0].set_ylabel("win-rate vs base")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
