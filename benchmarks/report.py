"""Where a benchmark's numbers go: the JSON result and its markdown table side by side."""

from __future__ import annotations

import json
from pathlib import Path


def write_report(out: str | Path | None, result: dict, table: str) -> None:
    """Print ``table``; with ``out``, write ``result`` there as JSON and ``table`` beside it as ``.md``."""
    print(table)
    if out:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        out.with_suffix(".md").write_text(table)
