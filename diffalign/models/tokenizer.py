"""The real CLIP BPE tokenizer, built offline from the vocabulary file that open_clip_torch ships.

OpenAI CLIP's vocabulary is: the 256 byte-level unicode symbols, the same with the end-of-word marker
``</w>``, one token per BPE merge (the first 48,894 merges of ``bpe_simple_vocab_16e6.txt.gz``), then
``<|startoftext|>`` and ``<|endoftext|>``: 49,408 tokens. Writing ``vocab.json``/``merges.txt`` from that
file gives a `transformers.CLIPTokenizer` identical to ``openai/clip-vit-large-patch14``'s.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer

NUM_MERGES = 49152 - 256 - 2


def _bytes_to_unicode() -> list[str]:
    """The reversible byte -> printable unicode map of GPT-2/CLIP BPE (256 symbols, in vocabulary order)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def _open_clip_bpe_path() -> Path:
    import open_clip.tokenizer

    return Path(open_clip.tokenizer.default_bpe())


@lru_cache(maxsize=1)
def clip_vocab_dir() -> str:
    """vocab.json and merges.txt, written once per machine into the temp dir (keyed by the BPE file's hash)."""
    bpe = _open_clip_bpe_path().read_bytes()
    out = Path(tempfile.gettempdir()) / f"diffalign-clip-bpe-{hashlib.sha256(bpe).hexdigest()[:16]}"
    if (out / "merges.txt").is_file():
        return str(out)
    lines = gzip.decompress(bpe).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    symbols = _bytes_to_unicode()
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    staging = Path(tempfile.mkdtemp(prefix="diffalign-clip-bpe-staging-"))
    (staging / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (staging / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    try:
        os.replace(staging, out)  # atomic; another process may have won the race, which is fine
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return str(out)


def build_clip_tokenizer(pad_token: str = "<|endoftext|>", model_max_length: int = 77) -> CLIPTokenizer:
    """A CLIP tokenizer with the real 49,408-token vocabulary (SD1.5 and SDXL's first encoder pad with
    ``<|endoftext|>``; SDXL's second encoder pads with ``!``)."""
    return CLIPTokenizer.from_pretrained(clip_vocab_dir(), pad_token=pad_token, model_max_length=model_max_length)
