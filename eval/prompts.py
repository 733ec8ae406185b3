"""Evaluation prompt sets, and the HPSv2 benchmark protocol.

- **PartiPrompts** ships with diffalign (``eval/data/parti/``: google-research/parti @ 5a65797, Apache-2.0):
  1,632 prompts, each with its ``category`` (12) and ``challenge`` (11) and the authors' note.
- **HPDv2 benchmark** (800 prompts in each of the styles ``anime``, ``concept-art``, ``paintings``, ``photo``)
  and **DrawBench** are published only on the model hub (``zhwang/HPDv2``): `hpdv2_benchmark` and
  `drawbench` read a local copy (``<root>/benchmark/<style>.json`` or ``<root>/<style>.json``, JSON lists of
  strings).
- `hpsv2_benchmark` scores generated images laid out as the HPSv2 benchmark expects
  (``<images>/<style>/<index:05d>.jpg``, index into that style's prompt list) with the HPSv2 protocol
  (``hpsv2/evaluation.py:evaluate_benchmark_all``): per style, 100·score averaged in consecutive chunks of
  80 images; the style's score is the mean of the chunk means and its spread their std. DrawBench
  (``evaluate_benchmark_DB``) is the plain mean of 100·score. "Average" is the mean over all images of the
  HPDv2 styles (the README tables' last column; equal to the mean of the style means at 800 each). A
  missing image is an error here; the official loader silently scores the next one in its place.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from diffalign.data.errors import DataError
from diffalign.eval.imagefolder import read_prompt_list

HPDV2_STYLES = ("anime", "concept-art", "paintings", "photo")
HPSV2_CHUNK = 80


@dataclass(frozen=True)
class PartiPrompt:
    prompt: str
    category: str
    challenge: str
    note: str


def parti_prompts(category: str | None = None, challenge: str | None = None) -> list[PartiPrompt]:
    """The PartiPrompts set, optionally one category and/or one challenge."""
    text = resources.files("diffalign.eval").joinpath("data/parti/PartiPrompts.tsv").read_text(encoding="utf-8")
    rows = [PartiPrompt(r["Prompt"], r["Category"], r["Challenge"], r["Note"]) for r in csv.DictReader(text.splitlines(), delimiter="\t")]
    for field, plural, wanted in (("category", "categories", category), ("challenge", "challenges", challenge)):
        if wanted is not None:
            known = sorted({getattr(r, field) for r in rows})
            if wanted not in known:
                raise DataError(f"PartiPrompts has no {field} {wanted!r}; {plural}: {', '.join(known)}")
            rows = [r for r in rows if getattr(r, field) == wanted]
    return rows


def _prompt_file(root: str | Path, name: str) -> list[str]:
    root = Path(root)
    for path in (root / "benchmark" / f"{name}.json", root / f"{name}.json"):
        if path.is_file():
            return read_prompt_list(path)
    raise DataError(f"no {name}.json under {root} or {root / 'benchmark'} (a local copy of the hub's zhwang/HPDv2 benchmark folder)")


def hpdv2_benchmark(root: str | Path, styles=HPDV2_STYLES) -> dict[str, list[str]]:
    """{style: prompts} from a local copy of the HPDv2 benchmark prompts."""
    unknown = [s for s in styles if s not in HPDV2_STYLES]
    if unknown:
        raise DataError(f"unknown HPDv2 style(s) {unknown}; styles: {', '.join(HPDV2_STYLES)}")
    return {style: _prompt_file(root, style) for style in styles}


def drawbench(root: str | Path) -> list[str]:
    """DrawBench's prompts from a local copy (``drawbench.json`` in the HPDv2 benchmark folder)."""
    return _prompt_file(root, "drawbench")


def hpsv2_benchmark(images: str | Path, prompts: dict[str, list[str]], scorer, batch_size: int = 32) -> dict:
    """The HPSv2 benchmark table for generated images (module docstring): per style the mean and std of the
    80-image chunk means of 100·score, and the average over all images."""
    from diffalign.data.images import open_image

    images = Path(images)
    table, everything = {}, []
    for style, texts in prompts.items():
        files = [images / style / f"{i:05d}.jpg" for i in range(len(texts))]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise DataError(f"{len(missing)} of {len(files)} {style} images missing (first: {missing[0]}); the HPSv2 layout is "
                            f"<images>/<style>/<index:05d>.jpg")
        scores = []
        for i in range(0, len(files), batch_size):
            batch = [open_image(f, where=str(f)) for f in files[i : i + batch_size]]
            scores.append(100.0 * scorer.score(batch, texts[i : i + batch_size])["overall"].double().numpy())
        s = np.concatenate(scores)
        if style == "drawbench":
            table[style] = {"mean": float(s.mean()), "images": len(s)}
            continue
        chunks = [s[i : i + HPSV2_CHUNK].mean() for i in range(0, len(s), HPSV2_CHUNK)]
        table[style] = {"mean": float(np.mean(chunks)), "std": float(np.std(chunks)), "images": len(s)}
        everything.append(s)
    if everything:
        table["Average"] = {"mean": float(np.concatenate(everything).mean()), "images": int(sum(len(s) for s in everything))}
    return table
