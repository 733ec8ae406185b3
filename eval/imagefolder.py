"""Image folders with their prompts: the format `diffalign generate` and the toy bench write, and what
`diffalign score` / `compare` read.

A folder holds images and ``metadata.jsonl``, one line per image: ``file`` (relative to the folder),
``prompt``, ``seed`` and any generation settings (``model``, ``steps``, ``guidance``, ...). Where a folder
has no metadata, prompts come from a prompts file (``--prompts``: a ``.jsonl`` of ``file``/``prompt``
[/``seed``] lines, or a ``.txt``/``.json`` list with one prompt per image in file-name order), or from a
sidecar ``<image stem>.txt`` beside each image.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from PIL import Image

from diffalign.data.errors import DataError
from diffalign.io import atomic_write_text

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA = "metadata.jsonl"


@dataclass(frozen=True)
class ImageRecord:
    file: str  # relative to the folder
    prompt: str
    seed: int | None = None
    extra: dict = field(default_factory=dict, compare=False)  # the other metadata fields

    def as_dict(self) -> dict:
        return {"file": self.file, "prompt": self.prompt, "seed": self.seed, **self.extra}


def image_files(folder: Path) -> list[str]:
    """Image files under ``folder`` (recursively), relative, in sorted order."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _record(obj: dict, where: str) -> ImageRecord:
    if not isinstance(obj, dict) or "file" not in obj or "prompt" not in obj:
        raise DataError(f"{where}: each line needs 'file' and 'prompt', got {str(obj)[:120]}")
    file, seed = obj["file"], obj.get("seed")
    if not isinstance(file, str) or not file or Path(file).is_absolute() or ".." in Path(file).parts:
        raise DataError(f"{where}: 'file' must be a path inside the folder, got {str(file)[:120]!r}")
    if seed is not None:
        try:
            if isinstance(seed, (bool, float)):
                raise ValueError
            seed = int(seed)  # an integer, or its digits
        except (TypeError, ValueError):
            raise DataError(f"{where}: 'seed' must be an integer or null, got {str(seed)[:40]!r}") from None
    extra = {k: v for k, v in obj.items() if k not in ("file", "prompt", "seed")}
    return ImageRecord(file, str(obj["prompt"]), seed, extra)


def read_text(path: Path) -> str:
    """A UTF-8 text file's content; a `DataError` naming it if it cannot be read or decoded."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read as UTF-8 text ({type(e).__name__}: {e})") from None


def _read_jsonl(path: Path) -> list[ImageRecord]:
    records = []
    for n, line in enumerate(read_text(path).splitlines(), 1):
        if line.strip():
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not JSON ({e.msg})") from e
            records.append(_record(obj, f"{path}:{n}"))
    return records


def read_prompt_list(path: Path) -> list[str]:
    """Prompts from a ``.json`` list of strings, or one per non-empty line of a text file."""
    if path.suffix == ".json":
        try:
            prompts = json.loads(read_text(path))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not JSON ({e.msg})") from None
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise DataError(f"{path}: expected a JSON list of prompt strings")
        return prompts
    return [line for line in read_text(path).splitlines() if line.strip()]


def read_folder(folder: str | Path, prompts: str | Path | None = None) -> list[ImageRecord]:
    """The folder's images with their prompts (module docstring for where they come from). Records whose
    file is missing are kept: scoring reports them as unreadable and skips them."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: image folder not found")
    files = image_files(folder)
    if prompts is not None:
        prompts = Path(prompts)
        if not prompts.is_file():
            raise DataError(f"{prompts}: prompts file not found")
        if prompts.suffix == ".jsonl":
            return _read_jsonl(prompts)
        texts = read_prompt_list(prompts)
        if len(texts) != len(files):
            raise DataError(f"{prompts}: {len(texts)} prompts for {len(files)} images in {folder} (one per image, in file-name order)")
        return [ImageRecord(f, p) for f, p in zip(files, texts)]
    if (folder / METADATA).is_file():
        return _read_jsonl(folder / METADATA)
    records, missing = [], []
    for f in files:
        sidecar = (folder / f).with_suffix(".txt")
        if sidecar.is_file():
            records.append(ImageRecord(f, read_text(sidecar).strip()))
        else:
            missing.append(f)
    if missing or not files:
        raise DataError(f"{folder}: no prompts for {len(missing) if files else 'any'} image(s)"
                        f"{' (' + ', '.join(missing[:3]) + ')' if missing else ''}: give --prompts FILE, a {METADATA}, "
                        "or a sidecar .txt per image")
    return records


def unlisted(folder: str | Path, records: Sequence[ImageRecord]) -> list[str]:
    """Images in ``folder`` that no record names (a metadata file that does not cover the folder)."""
    named = {r.file for r in records}
    return [f for f in image_files(Path(folder)) if f not in named]


def write_folder(folder: str | Path, images: Sequence[Image.Image], prompts: Sequence[str], seeds: Sequence[int | None],
                 **settings) -> list[ImageRecord]:
    """Save images as ``00000.png``, ... with ``metadata.jsonl`` (written last, atomically); ``settings``
    (model, steps, guidance, ...) go on every line."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not len(images) == len(prompts) == len(seeds):
        raise ValueError(f"{len(images)} images, {len(prompts)} prompts, {len(seeds)} seeds")
    records = []
    for i, (image, prompt, seed) in enumerate(zip(images, prompts, seeds)):
        name = f"{i:05d}.png"
        image.save(folder / name)
        records.append(ImageRecord(name, prompt, seed, dict(settings)))
    atomic_write_text(folder / METADATA, "".join(json.dumps(r.as_dict(), ensure_ascii=False) + "\n" for r in records))
    return records
