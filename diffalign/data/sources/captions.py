"""Captioned images without preferences: one image per item (K = 1), for methods that need no labels (Self-NPO).

`CaptionedFolder` (``data.source.kind = captions``) reads an image folder, subfolders included: each image's caption is
its line in ``metadata.jsonl`` (``{"file", "prompt"}``, as `diffalign generate` writes) when the folder has one, else
its sidecar ``<stem>.txt`` (the layout the official Self-NPO code reads); an image without a caption is skipped and
counted. source_id = the image's path relative to the folder. Digest: the sorted (path, size) of every image and
the caption text.

`ToyScenes` (``data.source.kind = toy_scenes``) draws the toy world's procedural scenes for each training caption
(`diffalign.toy.scenes`), ``images_per_caption`` of them with seeds derived from ``seed``: real images of the toy
world, as PNG bytes. source_id = "toy_scenes:<caption index>:<j>".
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Iterator

from diffalign.data.digest import json_digest
from diffalign.data.errors import DataError
from diffalign.data.sources.base import SourceItem
from diffalign.randomness import hash_int

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA = "metadata.jsonl"


class CaptionedFolder:
    digest_method = "sha256 of (relative path, size, caption) of every captioned image"

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(f"data.source.root: image folder '{self.root}' does not exist")
        self.pairs, self.uncaptioned = self._captioned()
        if not self.pairs:
            raise DataError(f"data.source.root: no captioned images in {self.root} (a sidecar <stem>.txt per image, or a {METADATA})")

    def _captioned(self) -> tuple[list[tuple[str, str]], int]:
        files = sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        metadata = self.root / METADATA
        if metadata.is_file():
            captions = {}
            for n, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        obj = json.loads(line)
                        captions[str(obj["file"])] = str(obj["prompt"])
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise DataError(f"{metadata}:{n}: expected a JSON object with 'file' and 'prompt'") from None
        else:
            captions = {f: (self.root / f).with_suffix(".txt").read_text(encoding="utf-8").strip()
                        for f in files if (self.root / f).with_suffix(".txt").is_file()}
        pairs = [(f, captions[f]) for f in files if f in captions]
        return pairs, len(files) - len(pairs)

    def items(self, start: int = 0) -> Iterator[SourceItem]:
        for name, caption in self.pairs[start:]:
            yield SourceItem(name, caption, [self.root / name])

    def count(self) -> int:
        return len(self.pairs)

    def describe(self) -> dict:
        return {"kind": "captions", "root": str(self.root.resolve()), "images": len(self.pairs), "uncaptioned": self.uncaptioned}

    def digest(self) -> str:
        return json_digest([(name, (self.root / name).stat().st_size, caption) for name, caption in self.pairs])


class ToyScenes:
    digest_method = "sha256 of the generator parameters and the training captions"

    def __init__(self, images_per_caption: int = 4, image_size: int = 32, seed: int = 0):
        from diffalign.toy.scenes import TRAIN

        self.captions = [spec.caption for spec in TRAIN]
        self.per_caption, self.size, self.seed = images_per_caption, image_size, seed

    def items(self, start: int = 0) -> Iterator[SourceItem]:
        from diffalign.toy.scenes import render_caption

        for index in range(start, self.count()):
            c, j = divmod(index, self.per_caption)
            image = render_caption(self.captions[c], hash_int(f"toy_scenes\0{self.seed}\0{c}\0{j}", bits=32), self.size)
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            yield SourceItem(f"toy_scenes:{c}:{j}", self.captions[c], [buf.getvalue()])

    def count(self) -> int:
        return len(self.captions) * self.per_caption

    def describe(self) -> dict:
        return {"kind": "toy_scenes", "images_per_caption": self.per_caption, "image_size": self.size, "seed": self.seed}

    def digest(self) -> str:
        return json_digest({**self.describe(), "captions": self.captions})
