"""`diffalign compare DIR_A DIR_B`: per-scorer win-rate of A over B on images paired by prompt and seed.

Everything is re-derived from the files: each folder's images and metadata are read and scored, images
are paired on (prompt, seed) (file names do not matter; where a folder has no seeds, the n-th image of a
prompt in A is paired with the n-th of that prompt in B, and the report says so), and the win-rate has
the one implementation of `eval.winrate` (ties ½, 95% bootstrap interval clustered by prompt). The grid
shows the pairs the scorers disagree on most: by the spread of their standardised A−B differences when
there are several scorers, by |A−B| when there is one.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from diffalign.data.errors import DataError
from diffalign.data.images import decode_image
from diffalign.eval.folderscore import FolderScores
from diffalign.eval.imagefolder import ImageRecord
from diffalign.eval.winrate import win_rate
from diffalign.imagegrid import paint_grid


@dataclass
class Pairing:
    a: np.ndarray  # indices into A's records
    b: np.ndarray  # indices into B's records
    by: str  # "prompt+seed" or "prompt+order"
    unpaired_a: int
    unpaired_b: int


def _keys(records: Sequence[ImageRecord], use_seed: bool) -> dict[tuple, int]:
    keys, seen = {}, defaultdict(int)
    for i, r in enumerate(records):
        if use_seed:
            key = (r.prompt, r.seed)
        else:
            key = (r.prompt, seen[r.prompt])
            seen[r.prompt] += 1
        if key in keys:
            raise DataError(f"{r.file}: two images with prompt {r.prompt!r} and seed {r.seed} (pairs must be unique)")
        keys[key] = i
    return keys


def pair(records_a: Sequence[ImageRecord], records_b: Sequence[ImageRecord]) -> Pairing:
    use_seed = all(r.seed is not None for r in (*records_a, *records_b))
    ka, kb = _keys(records_a, use_seed), _keys(records_b, use_seed)
    common = [k for k in ka if k in kb]
    if not common:
        raise DataError("no image of A shares a prompt" + (" and seed" if use_seed else "") + " with an image of B")
    return Pairing(np.array([ka[k] for k in common]), np.array([kb[k] for k in common]),
                   "prompt+seed" if use_seed else "prompt+order", len(ka) - len(common), len(kb) - len(common))


def compare_scores(a: FolderScores, b: FolderScores, seed: int = 0) -> tuple[dict, Pairing]:
    """Win-rate per overall score column and mean difference per dimension, on the paired images."""
    p = pair(a.records, b.records)
    prompts = [a.records[i].prompt for i in p.a]
    columns = [c for c in a.scores if c in b.scores]
    report = {"pairs": len(p.a), "prompts": len(set(prompts)), "paired_by": p.by, "unpaired_a": p.unpaired_a,
              "unpaired_b": p.unpaired_b, "scorers": {}}
    for c in columns:
        sa, sb = a.scores[c][p.a], b.scores[c][p.b]
        entry = {"mean_a": float(sa.mean()), "mean_b": float(sb.mean()), "mean_diff": float((sa - sb).mean())}
        if "." not in c:  # an overall score: the win-rate
            entry.update(win_rate(sa.tolist(), sb.tolist(), prompts, seed=seed).as_dict())
        report["scorers"][c] = entry
    return report, p


def disagreements(a: FolderScores, b: FolderScores, p: Pairing, scorers: Sequence[str], k: int = 8) -> list[int]:
    """Positions (into the pairing) of the k pairs the scorers disagree on most (module docstring)."""
    diffs = np.stack([a.scores[s][p.a] - b.scores[s][p.b] for s in scorers])
    if len(scorers) > 1:
        z = diffs / (diffs.std(axis=1, keepdims=True) + 1e-12)
        spread = z.max(axis=0) - z.min(axis=0)
    else:
        spread = np.abs(diffs[0])
    return list(np.argsort(-spread, kind="stable")[:k])


def disagreement_grid(folder_a: Path, folder_b: Path, a: FolderScores, b: FolderScores, p: Pairing, scorers: Sequence[str],
                      k: int = 8, side: int = 256) -> Image.Image:
    """Rows of A | B (the folders' names on top) for the most disagreed pairs, with the prompt and each scorer's
    A and B scores above each pair; images fitted into `side`² cells (`diffalign.imagegrid.paint_grid`)."""
    shown = disagreements(a, b, p, scorers, k)
    rows = [[decode_image(folder_a / a.records[p.a[j]].file), decode_image(folder_b / b.records[p.b[j]].file)] for j in shown]
    captions = [[a.records[p.a[j]].prompt[:90], *(f"{s}: A {a.scores[s][p.a[j]]:.4f}  B {b.scores[s][p.b[j]]:.4f}" for s in scorers)]
                for j in shown]
    return paint_grid(rows, cell=side, column_labels=[f"A: {folder_a.name}", f"B: {folder_b.name}"], header_pad=1,
                      captions=captions, caption_lines=1 + len(scorers))


def markdown_table(report: dict, name_a: str, name_b: str) -> str:
    lines = [f"{report['pairs']} pairs over {report['prompts']} prompts (paired by {report['paired_by']}; "
             f"unpaired: {report['unpaired_a']} in A, {report['unpaired_b']} in B)", "",
             f"| scorer | win-rate {name_a} over {name_b} [95% CI] | mean A | mean B | mean A−B |", "|---|---|---:|---:|---:|"]
    for c, e in report["scorers"].items():
        wr = f"{e['win_rate']:.3f} [{e['ci_low']:.3f}, {e['ci_high']:.3f}]" if "win_rate" in e else ""
        lines.append(f"| {c} | {wr} | {e['mean_a']:.4f} | {e['mean_b']:.4f} | {e['mean_diff']:+.4f} |")
    return "\n".join(lines) + "\n"
