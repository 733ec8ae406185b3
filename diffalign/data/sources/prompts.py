"""The prompts source (`data.source.kind = prompts`): the prompt list an online method samples its images for.

`read_prompt_file` reads the prompt files `diffalign generate --prompts-file` takes (.txt one per line, .json list,
.jsonl with a "prompt" field as `diffalign prompts` writes); `training_prompts` resolves a `PromptsSource`: a list, a
built-in set ('toy-train', 'parti') or a file, capped at `num_prompts`. Held-out toy captions are refused, by set name
in the config and by content here.
"""

from __future__ import annotations

import json
from pathlib import Path

from diffalign.config.sections import PromptsSource
from diffalign.data.errors import DataError


def read_prompt_file(path: str | Path) -> list[str]:
    """The prompts of a .jsonl ({"prompt": ...} per line) or of a .txt / .json prompt list."""
    from diffalign.eval.imagefolder import read_prompt_list

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: prompt file not found")
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not all(isinstance(r, dict) and isinstance(r.get("prompt"), str) for r in rows):
            raise DataError(f"{path}: each line needs a \"prompt\" string")
        return [r["prompt"] for r in rows]
    return read_prompt_list(path)


def builtin_prompt_set(name: str) -> list[str] | None:
    """The prompts of a built-in set ('toy-train', 'toy-held-out', 'parti'), or None for another name."""
    if name == "parti":
        from diffalign.eval.prompts import parti_prompts

        return [p.prompt for p in parti_prompts()]
    if name in ("toy-train", "toy-held-out"):
        from diffalign.toy.scenes import HELD_OUT, TRAIN

        return [spec.caption for spec in (TRAIN if name == "toy-train" else HELD_OUT)]
    return None


def training_prompts(cfg: PromptsSource) -> list[str]:
    """The prompts of `cfg`: a list, a built-in set or a file, the first `num_prompts` of them."""
    from diffalign.toy.scenes import HELD_OUT

    if isinstance(cfg.prompts, list):
        prompts = list(cfg.prompts)
    else:
        prompts = builtin_prompt_set(cfg.prompts)
        if prompts is None:
            prompts = read_prompt_file(cfg.prompts)
    prompts = prompts[: cfg.num_prompts]
    held_out = sorted({s.caption for s in HELD_OUT} & set(prompts))
    if held_out:
        raise DataError(f"data.source.prompts: {len(held_out)} held-out toy captions (e.g. {held_out[0]!r}) are never trained on")
    if not prompts:
        raise DataError("data.source.prompts: no prompts")
    return prompts
