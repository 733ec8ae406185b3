"""What a person looks at after training: metrics.jsonl, a curves plot and a summary table."""

from __future__ import annotations

import json
from pathlib import Path

NOT_PLOTTED = ("lr", "samples_per_s")  # in metrics.jsonl, but not curves a person reads for progress


class MetricsLog:
    """One JSON line per logged step (main process only); summarised and plotted at the end.

    On resume from step s, lines after s (written by the interrupted run) are dropped once, then appended to.
    """

    def __init__(self, path: Path, enabled: bool, resume_step: int | None):
        self.path, self.enabled = path, enabled
        self.rows: list[dict] = []
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is not None and path.is_file():
                rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
                self.rows = [r for r in rows if r["step"] <= resume_step]
            path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **metrics}
        self.rows.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def summary(self, last: int = 10) -> dict[str, float]:
        tail = self.rows[-last:]
        keys = {k for r in tail for k in r if k != "step"}
        return {f"{k}_last{len(tail)}": sum(r[k] for r in tail if k in r) / max(1, sum(k in r for r in tail)) for k in sorted(keys)}

    def plot(self, out: Path) -> Path | None:
        present = list(dict.fromkeys(k for r in self.rows for k in r if k != "step" and k not in NOT_PLOTTED))  # the method's, in order
        if not self.enabled or not present:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(present), figsize=(3.2 * len(present), 2.6), squeeze=False)
        for ax, key in zip(axes[0], present):
            pts = [(r["step"], r[key]) for r in self.rows if key in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts])
            ax.set_title(key)
            ax.set_xlabel("step")
        fig.tight_layout()
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return out


def print_summary(trainer, seconds: float, summary: dict[str, float], final_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"diffalign · {trainer.method.name} · {trainer.step} steps in {seconds:.1f}s")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        table.add_row(key, f"{value:.5g}")
    table.add_row("weights", str(final_dir))
    table.add_row("curves", str(trainer.output_dir / "curves.png"))
    Console().print(table)
