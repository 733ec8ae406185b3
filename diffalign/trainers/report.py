"""What a person looks at after training: metrics.jsonl, a curves plot and a summary table."""

from __future__ import annotations

import json
from pathlib import Path

NOT_PLOTTED = ("lr", "samples_per_s")  # in metrics.jsonl, but not curves a person reads for progress
VALIDATION_PREFIX, BASE_SUFFIX = "val/", "_base"  # validation scores (rows of their own) and their base-model reference


class MetricsLog:
    """One JSON line per logged step (main process only); summarised and plotted at the end.

    Validation scores (`val/<scorer>`, `val/<scorer>_base`) come in rows of their own at the validation steps;
    a base score is drawn as a dashed reference line on its scorer's plot.
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
        """Each metric's mean over the last `last` training rows; validation scores over the last `last` validations."""
        out = {}
        for rows in (self._training_rows(), self._validation_rows()):
            out.update(_tail_means(rows[-last:]))
        return dict(sorted(out.items()))

    def _validation_rows(self) -> list[dict]:
        return [r for r in self.rows if _is_validation(r)]

    def _training_rows(self) -> list[dict]:
        return [r for r in self.rows if not _is_validation(r)]

    def plot(self, out: Path) -> Path | None:
        present = list(dict.fromkeys(k for r in self.rows for k in r if k != "step" and k not in NOT_PLOTTED))  # the method's, in order
        if not self.enabled or not present:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        references = {key + BASE_SUFFIX for key in present if key.startswith(VALIDATION_PREFIX)} & set(present)
        present = [key for key in present if key not in references]  # drawn on their scorer's plot
        fig, axes = plt.subplots(1, len(present), figsize=(3.2 * len(present), 2.6), squeeze=False)
        for ax, key in zip(axes[0], present):
            self._draw(ax, key, label="trained" if key + BASE_SUFFIX in references else None)
            if key + BASE_SUFFIX in references:
                self._draw(ax, key + BASE_SUFFIX, label="base", linestyle="--", color="gray")
                ax.legend(fontsize="small")
            ax.set_title(key)
            ax.set_xlabel("step")
        fig.tight_layout()
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return out

    def _draw(self, ax, key: str, **style) -> None:
        """One metric's curve; validation scores (few points, a single one at first) with markers."""
        pts = [(r["step"], r[key]) for r in self.rows if key in r]
        if key.startswith(VALIDATION_PREFIX):
            style = {"marker": "o", "markersize": 3, **style}
        ax.plot([p[0] for p in pts], [p[1] for p in pts], **style)


def _is_validation(row: dict) -> bool:
    """A row of validation scores (`val/...` only), written at a validation step beside that step's training row."""
    keys = [k for k in row if k != "step"]
    return bool(keys) and all(k.startswith(VALIDATION_PREFIX) for k in keys)


def _tail_means(tail: list[dict]) -> dict[str, float]:
    """`<metric>_last<N>`: each metric's mean over the rows of `tail` that hold it."""
    keys = {k for r in tail for k in r if k != "step"}
    return {f"{k}_last{len(tail)}": sum(r[k] for r in tail if k in r) / max(1, sum(k in r for r in tail)) for k in keys}


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
