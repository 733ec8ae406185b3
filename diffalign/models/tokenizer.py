"""The real CLIP BPE tokenizer, built offline from the vocabulary file that open_clip_torch ships.

OpenAI CLIP's vocabulary is: the 256 byte-level unicode symbols, the same with the end-of-word marker
``</w>``, one token per BPE merge (the first 48,894 merges of ``bpe_simple_vocab_16e6.txt.gz``), then
``<|startoftext|>`` and ``<|endoftext|>``: 49,408 tokens. Writing ``vocab.json``/``merges.txt`` from that
file gives a `transformers.CLIPTokenizer` identical to ``openai/clip-vit-large-patch14``'s.
"""

from __future__ import annotations

import gzip
import json
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
def _clip_vocab_files() -> tuple[str, str]:
    """The text of vocab.json and merges.txt, built once per process from open_clip's BPE file."""
    lines = gzip.decompress(_open_clip_bpe_path().read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    symbols = _bytes_to_unicode()
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return json.dumps({tok: i for i, tok in enumerate(vocab)}), "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"


def build_clip_tokenizer(pad_token: str = "<|endoftext|>", model_max_length: int = 77) -> CLIPTokenizer:
    """A CLIP tokenizer with the real 49,408-token vocabulary (SD1.5 and SDXL's first encoder pad with
    ``<|endoftext|>``; SDXL's second encoder pads with ``!``)."""
    vocab, merges = _clip_vocab_files()
    with tempfile.TemporaryDirectory(prefix="diffalign-clip-bpe-") as folder:  # read at construction, then removed
        (Path(folder) / "vocab.json").write_text(vocab, encoding="utf-8")
        (Path(folder) / "merges.txt").write_text(merges, encoding="utf-8")
        return CLIPTokenizer.from_pretrained(folder, pad_token=pad_token, model_max_length=model_max_length)
