"""Tiny random-weight scorer checkpoints written in each official format, and awkward test inputs.

Every builder uses the library the official code uses (transformers CLIP for PickScore/CLIPScore/the
aesthetic features, open_clip for HPS) and writes the files as the official checkpoints are laid out.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

# prompts the tokenizers must survive: HTML entities, curly quotes, emoji, and more than 77 tokens
PROMPTS = [
    "a cat &amp; a dog on a sofa",
    "the \u201cbest\u201d bakery\u2019s bread",
    "a rocket \U0001F680 over the moon \U0001F315",
    "a very long prompt " + " ".join(f"with detail number {i}" for i in range(40)),
]


def images(sizes=((256, 320), (300, 224), (224, 224), (97, 150)), seed: int = 0) -> list[Image.Image]:
    """PIL images of the given (width, height): smooth gradients plus noise, one RGBA and one palette image."""
    rng = np.random.default_rng(seed)
    out = []
    for i, (w, h) in enumerate(sizes):
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx / w, yy / h, (xx + yy) / (w + h)], -1) * 200
        arr = np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
        im = Image.fromarray(arr)
        if i == 1:
            im = im.convert("RGBA")
        if i == 3:
            im = im.convert("P")
        out.append(im)
    return out


def tiny_clip_config(projection_dim: int = 16, image_size: int = 224, patch_size: int = 32):
    from transformers import CLIPConfig

    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                vocab_size=49408, bos_token_id=49406, eos_token_id=2, pad_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=image_size,
                  patch_size=patch_size)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


def write_clip_folder(path: Path, seed: int = 0, tokenizer: bool = True, **config) -> Path:
    """A transformers CLIP folder (config.json, model.safetensors, tokenizer files) with random weights.
    ``eos_token_id=2`` as in the released CLIP-H configs (legacy argmax pooling)."""
    from transformers import CLIPModel

    from diffalign.models.tokenizer import build_clip_tokenizer

    torch.manual_seed(seed)
    model = CLIPModel(tiny_clip_config(**config))
    with torch.no_grad():
        model.logit_scale.fill_(np.log(100.0))
    model.save_pretrained(path)
    if tokenizer:
        build_clip_tokenizer().save_pretrained(path)
    return path


TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 16, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def write_hps_checkpoint(path: Path, seed: int = 0, safetensors: bool = False) -> Path:
    """A tiny open_clip CLIP saved as HPSv2's ``HPS_v2*_compressed.pt`` (``{'state_dict': fp16}``), or as
    DiffSynth's flat safetensors conversion."""
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_OPEN_CLIP)
    sd = {k: v.half().contiguous() for k, v in model.state_dict().items()}
    if safetensors:
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save({"state_dict": sd}, path)
    return path


def write_aesthetic_mlp(path: Path, input_dim: int = 16, seed: int = 0) -> Path:
    """The LAION aesthetic MLP's state dict as the official ``.pth`` lays it out (``layers.{0,2,4,6,7}``)."""
    torch.manual_seed(seed)
    dims = [input_dim, 1024, 128, 64, 16, 1]
    sd = {}
    for index, (i, o) in zip((0, 2, 4, 6, 7), zip(dims, dims[1:])):
        sd[f"layers.{index}.weight"] = torch.randn(o, i) / i**0.5
        sd[f"layers.{index}.bias"] = torch.randn(o) * 0.1
    torch.save(sd, path)
    return path


# ImageReward: the official ImageReward.pt key layout (BLIP ViT + med.py BERT + MLP), med_config.json, BERT vocab

# words of PROMPTS the fabricated vocab holds only as pieces, so the tokenizer must split them
BERT_SPLIT_WORDS = {"bakery": ("baker", "##y"), "detail": ("de", "##tail"), "rocket": ("rock", "##et")}
BERT_VOCAB_SIZE = 30522


def bert_vocab(prompts=PROMPTS) -> list[str]:
    """A bert-base-uncased-shaped vocab.txt: [PAD], [unused0-98], [UNK], [CLS], [SEP], [MASK] at ids 0-103 as in
    the real file, then single characters (and their ``##`` continuations), curly quotes, the words of ``prompts``
    (``BERT_SPLIT_WORDS`` as pieces only; numbers as digits only), padded with [unusedN] to 30522 entries."""
    import re
    import string

    head = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = [c for c in string.ascii_lowercase + string.digits + string.punctuation] + ["\u201c", "\u201d", "\u2018", "\u2019"]
    pieces = chars + ["##" + c for c in string.ascii_lowercase + string.digits]
    for word in re.findall(r"[a-z]+", " ".join(prompts).lower()):
        pieces += list(BERT_SPLIT_WORDS.get(word, (word,)))
    vocab = list(dict.fromkeys(head + pieces))
    vocab += [f"[unused{i}]" for i in range(99, 99 + BERT_VOCAB_SIZE - len(vocab))]
    assert len(vocab) == BERT_VOCAB_SIZE and len(set(vocab)) == BERT_VOCAB_SIZE
    return vocab


def write_imagereward_checkpoint(path: Path, seed: int = 0, vision_width: int = 32, vision_depth: int = 2, vision_mlp: int = 128,
                                 patch_size: int = 16, image_size: int = 224, text_hidden: int = 32, text_layers: int = 2,
                                 text_heads: int = 2, text_intermediate: int = 64) -> Path:
    """``path/ImageReward.pt`` (a plain OrderedDict of random fp32 tensors under the official keys: BLIP's
    ``visual_encoder``, the med.py ``text_encoder`` with its int64 ``position_ids`` buffer, the unused
    ``vision_proj``/``text_proj`` (256 wide), the reward ``mlp``), the official ``med_config.json`` with tiny sizes
    (``encoder_width`` left at 768: BLIP overrides it with the ViT width) and a fabricated ``vocab.txt``. The
    keys are written out here from the official modules, not taken from diffalign's. Returns the .pt path."""
    import json
    from collections import OrderedDict

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    sd: OrderedDict[str, torch.Tensor] = OrderedDict()

    def randn(*shape, std=1.0):
        return torch.randn(*shape, generator=gen) * std

    def linear(name, out_f, in_f):
        sd[name + ".weight"] = randn(out_f, in_f, std=in_f ** -0.5)
        sd[name + ".bias"] = randn(out_f, std=0.02)

    def layer_norm(name, width):
        sd[name + ".weight"] = 1 + randn(width, std=0.1)
        sd[name + ".bias"] = randn(width, std=0.1)

    v, t = "blip.visual_encoder.", "blip.text_encoder."
    sd[v + "cls_token"] = randn(1, 1, vision_width, std=0.5)
    sd[v + "pos_embed"] = randn(1, 1 + (image_size // patch_size) ** 2, vision_width, std=0.5)
    sd[v + "patch_embed.proj.weight"] = randn(vision_width, 3, patch_size, patch_size, std=(3 * patch_size ** 2) ** -0.5)
    sd[v + "patch_embed.proj.bias"] = randn(vision_width, std=0.02)
    for i in range(vision_depth):
        b = f"{v}blocks.{i}."
        layer_norm(b + "norm1", vision_width)
        linear(b + "attn.qkv", 3 * vision_width, vision_width)
        linear(b + "attn.proj", vision_width, vision_width)
        layer_norm(b + "norm2", vision_width)
        linear(b + "mlp.fc1", vision_mlp, vision_width)
        linear(b + "mlp.fc2", vision_width, vision_mlp)
    layer_norm(v + "norm", vision_width)

    vocab_size, max_positions = BERT_VOCAB_SIZE + 2, 512  # + [DEC] and [ENC]
    sd[t + "embeddings.position_ids"] = torch.arange(max_positions).expand((1, -1)).clone()
    sd[t + "embeddings.word_embeddings.weight"] = randn(vocab_size, text_hidden)
    sd[t + "embeddings.position_embeddings.weight"] = randn(max_positions, text_hidden, std=0.5)
    layer_norm(t + "embeddings.LayerNorm", text_hidden)
    for i in range(text_layers):
        b = f"{t}encoder.layer.{i}."
        for attention, context in (("attention", text_hidden), ("crossattention", vision_width)):
            linear(f"{b}{attention}.self.query", text_hidden, text_hidden)
            linear(f"{b}{attention}.self.key", text_hidden, context)
            linear(f"{b}{attention}.self.value", text_hidden, context)
            linear(f"{b}{attention}.output.dense", text_hidden, text_hidden)
            layer_norm(f"{b}{attention}.output.LayerNorm", text_hidden)
        linear(b + "intermediate.dense", text_intermediate, text_hidden)
        linear(b + "output.dense", text_hidden, text_intermediate)
        layer_norm(b + "output.LayerNorm", text_hidden)
    linear("blip.vision_proj", 256, vision_width)
    linear("blip.text_proj", 256, text_hidden)
    for index, (out_f, in_f) in zip((0, 2, 4, 6, 7), ((1024, text_hidden), (128, 1024), (64, 128), (16, 64), (1, 16))):
        linear(f"mlp.layers.{index}", out_f, in_f)
    torch.save(sd, path / "ImageReward.pt")

    med_config = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
                  "hidden_dropout_prob": 0.1, "hidden_size": text_hidden, "initializer_range": 0.02,
                  "intermediate_size": text_intermediate, "layer_norm_eps": 1e-12, "max_position_embeddings": max_positions,
                  "model_type": "bert", "num_attention_heads": text_heads, "num_hidden_layers": text_layers, "pad_token_id": 0,
                  "type_vocab_size": 2, "vocab_size": vocab_size, "encoder_width": 768, "add_cross_attention": True}
    (path / "med_config.json").write_text(json.dumps(med_config, indent=2))
    (path / "vocab.txt").write_text("\n".join(bert_vocab()) + "\n", encoding="utf-8")
    return path / "ImageReward.pt"


# ---- Qwen2-VL (HPSv3, the VisionReward-style VLM backend) ---------------------------------------------------------

QWEN2VL_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                          "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                          "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]

# Qwen2-VL-7B-Instruct's chat template (chat_template.json)
QWEN2VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

QWEN2VL_PREPROCESSOR = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
                        "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                        "image_std": [0.26862954, 0.26130258, 0.27577711], "image_processor_type": "Qwen2VLImageProcessor",
                        "processor_class": "Qwen2VLProcessor"}

TOKENIZER_CORPUS = PROMPTS + [
    "You are a helpful assistant.", "yes no Yes No yes. no. Yes. No.",
    "Is the image clear? Does the image avoid being blurry? Are the colors bright? Is there a human body in the image?",
    "You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a overall "
    "score to estimate the human preference. Please provide a rating from 0 to 10.",
    "Does this figure show the prompt? Please answer yes or no. Please provide the overall ratings of this image.",
]


def build_tiny_qwen2_tokenizer(vocab_size: int = 800, corpus=TOKENIZER_CORPUS):
    """A small byte-level BPE trained with Qwen2's own pre-tokenizer (split regex + byte level), as a transformers
    ``Qwen2Tokenizer`` with Qwen2-VL's special tokens (eos ``<|im_end|>``, pad ``<|endoftext|>``); "yes", "no",
    "Yes", "No" are single tokens."""
    import json

    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(list(corpus) * 20 + ["yes", "no", "Yes", "No"] * 100, trainer)  # answers start a line
    spec = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in spec["merges"]]
    tok = Qwen2Tokenizer(vocab=spec["vocab"], merges=merges, unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                         additional_special_tokens=QWEN2VL_SPECIAL_TOKENS[1:])
    for word in ("yes", "no", "Yes", "No"):
        assert len(tok.encode(word, add_special_tokens=False)) == 1, word
    return tok


def write_tiny_qwen2vl(path: Path, seed: int = 0, hidden: int = 32, layers: int = 2, vision_depth: int = 2,
                       vision_dim: int = 32) -> Path:
    """A Qwen2-VL-7B-Instruct-like folder with a tiny random ``Qwen2VLForConditionalGeneration``: config.json and
    model.safetensors (``save_pretrained``), the fabricated tokenizer, chat_template.json and
    preprocessor_config.json (7B-Instruct's values: patch 14, temporal patch 2, merge 2), loadable offline with
    ``AutoProcessor``/``from_pretrained``."""
    import json

    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tiny_qwen2_tokenizer()
    ids = dict(zip(QWEN2VL_SPECIAL_TOKENS, tok.convert_tokens_to_ids(QWEN2VL_SPECIAL_TOKENS)))
    heads = 4
    half_rotary = hidden // heads // 2
    mrope = [half_rotary - 2 * (half_rotary // 4), half_rotary // 4, half_rotary // 4]  # 7B: [16, 24, 24] of 64
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=8192, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], initializer_range=0.2),
        vision_config=dict(depth=vision_depth, embed_dim=vision_dim, hidden_size=hidden, num_heads=2, mlp_ratio=2,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, initializer_range=0.2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    torch.manual_seed(seed)
    Qwen2VLForConditionalGeneration(config).save_pretrained(path)
    tok.save_pretrained(path)
    (path / "chat_template.json").write_text(json.dumps({"chat_template": QWEN2VL_CHAT_TEMPLATE}, indent=2))
    (path / "preprocessor_config.json").write_text(json.dumps(QWEN2VL_PREPROCESSOR, indent=2))
    return path


def write_tiny_hpsv3(path: Path, base: Path, layout: str = "old", seed: int = 0) -> Path:
    """``HPSv3.safetensors`` for the tiny Qwen2-VL in ``base``: ``<|Reward|>`` added and the embeddings resized as
    ``create_model_and_processor`` does, a random fp32 ``rm_head`` (keys rm_head.0/3/5), every key written in the
    pre-4.52 layout (``model.layers.*``, ``visual.*``: the released file's) or the new one."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(base)
    tok.add_special_tokens({"additional_special_tokens": ["<|Reward|>"]})
    model = Qwen2VLForConditionalGeneration.from_pretrained(base)
    torch.manual_seed(seed + 1)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[-1].normal_()
        model.get_output_embeddings().weight[-1].normal_(0, 0.02)
    hidden = model.config.text_config.hidden_size
    head = torch.nn.Sequential(torch.nn.Linear(hidden, 1024), torch.nn.ReLU(), torch.nn.Dropout(0.05),
                               torch.nn.Linear(1024, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    with torch.no_grad():  # wider than the default init, so that images and prompts move the reward visibly
        for layer, std in ((head[0], 0.5), (head[3], 0.2), (head[5], 0.3)):
            layer.weight.normal_(0, std)
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    sd.update({f"rm_head.{k}": v.detach().clone() for k, v in head.state_dict().items()})
    if layout == "old":
        renamed = {}
        for k, v in sd.items():
            if k.startswith("model.visual."):
                k = k[len("model."):]
            elif k.startswith("model.language_model."):
                k = "model." + k[len("model.language_model."):]
            renamed[k] = v
        sd = renamed
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return Path(path)


# ---------------------------------------------------------------------------------------------------------
# MPS (Kwai-Kolors/MPS): classes with the official module names and structure (trainer/models/clip_model.py,
# trainer/models/cross_modeling.py), used to compute reference scores and to write the checkpoint the way
# the release does (torch.save of the whole module). They are put in sys.modules only while saving.

import sys  # noqa: E402
import types  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from functools import lru_cache  # noqa: E402

import torch.nn.functional as _F  # noqa: E402
from torch import einsum as _einsum  # noqa: E402
from torch import nn as _nn  # noqa: E402

MPS_TINY_CROSS = dict(layer_num=2, heads=2, dim_head=16)  # Cross_model sizes for tiny_clip_config(projection_dim=32)
MPS_MODULES = ("trainer", "trainer.models", "trainer.models.clip_model", "trainer.models.cross_modeling")
_mps_modules = {name: types.ModuleType(name) for name in MPS_MODULES}


def _official(module: str, name: str):
    """Give a class the official module and name, and put it in that (unregistered) module."""
    def mark(cls):
        cls.__module__, cls.__name__, cls.__qualname__ = module, name, name
        setattr(_mps_modules[module], name, cls)
        return cls
    return mark


@_official("trainer.models.cross_modeling", "LayerNorm")
class _MPSLayerNorm(_nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = _nn.Parameter(torch.ones(dim))
        self.register_buffer("bias", torch.zeros(dim))

    def forward(self, x):
        return _F.layer_norm(x, x.shape[-1:], self.weight, self.bias)


@_official("trainer.models.cross_modeling", "Residual")
class _MPSResidual(_nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x, *args, **kwargs):
        return self.fn(x, *args, **kwargs) + x


@_official("trainer.models.cross_modeling", "RotaryEmbedding")
class _MPSRotaryEmbedding(_nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim)))

    def forward(self, max_seq_len, *, device):
        seq = torch.arange(max_seq_len, device=device, dtype=self.inv_freq.dtype)
        freqs = _einsum("i , j -> i j", seq, self.inv_freq)
        return torch.cat((freqs, freqs), dim=-1)


def _mps_rotate_half(x):
    x = x.reshape(*x.shape[:-1], 2, x.shape[-1] // 2)
    x1, x2 = x.unbind(dim=-2)
    return torch.cat((-x2, x1), dim=-1)


def _mps_apply_rotary(pos, t):
    return t * pos.cos() + _mps_rotate_half(t) * pos.sin()


@_official("trainer.models.cross_modeling", "SwiGLU")
class _MPSSwiGLU(_nn.Module):
    def forward(self, x):
        x, gate = x.chunk(2, dim=-1)
        return _F.silu(gate) * x


@_official("trainer.models.cross_modeling", "ParallelTransformerBlock")
class _MPSParallelTransformerBlock(_nn.Module):
    def __init__(self, dim, dim_head=64, heads=8, ff_mult=4):
        super().__init__()
        self.norm = _MPSLayerNorm(dim)
        attn_inner_dim, ff_inner_dim = dim_head * heads, dim * ff_mult
        self.fused_dims = (attn_inner_dim, dim_head, dim_head, ff_inner_dim * 2)
        self.heads, self.scale = heads, dim_head ** -0.5
        self.rotary_emb = _MPSRotaryEmbedding(dim_head)
        self.fused_attn_ff_proj = _nn.Linear(dim, sum(self.fused_dims), bias=False)
        self.attn_out = _nn.Linear(attn_inner_dim, dim, bias=False)
        self.ff_out = _nn.Sequential(_MPSSwiGLU(), _nn.Linear(ff_inner_dim, dim, bias=False))
        self.register_buffer("pos_emb", None, persistent=False)

    def get_rotary_embedding(self, n, device):
        if self.pos_emb is not None and self.pos_emb.shape[-2] >= n:
            return self.pos_emb[:n]
        pos_emb = self.rotary_emb(n, device=device)
        self.register_buffer("pos_emb", pos_emb, persistent=False)
        return pos_emb

    def forward(self, x, attn_mask=None):
        n, h = x.shape[1], self.heads
        x = self.norm(x)
        q, k, v, ff = self.fused_attn_ff_proj(x).split(self.fused_dims, dim=-1)
        q = q.reshape(q.shape[0], n, h, -1).permute(0, 2, 1, 3)
        positions = self.get_rotary_embedding(n, x.device)
        q, k = _mps_apply_rotary(positions, q), _mps_apply_rotary(positions, k)
        q = q * self.scale
        sim = _einsum("b h i d, b j d -> b h i j", q, k)
        sim = sim - sim.amax(dim=-1, keepdim=True).detach()
        attn = sim.softmax(dim=-1)
        out = _einsum("b h i j, b j d -> b h i d", attn, v)
        out = out.permute(0, 2, 1, 3).reshape(out.shape[0], n, -1)
        return self.attn_out(out) + self.ff_out(ff)


@_official("trainer.models.cross_modeling", "CrossAttention")
class _MPSCrossAttention(_nn.Module):
    def __init__(self, dim, *, context_dim=None, dim_head=64, heads=12, parallel_ff=False, ff_mult=4, norm_context=False):
        super().__init__()
        self.heads, self.scale = heads, dim_head ** -0.5
        inner_dim, context_dim = heads * dim_head, context_dim or dim
        self.norm = _MPSLayerNorm(dim)
        self.context_norm = _MPSLayerNorm(context_dim) if norm_context else _nn.Identity()
        self.to_q = _nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = _nn.Linear(context_dim, dim_head * 2, bias=False)
        self.to_out = _nn.Linear(inner_dim, dim, bias=False)
        ff_inner_dim = ff_mult * dim
        self.ff = _nn.Sequential(_nn.Linear(dim, ff_inner_dim * 2, bias=False), _MPSSwiGLU(),
                                 _nn.Linear(ff_inner_dim, dim, bias=False)) if parallel_ff else None

    def forward(self, x, context, mask):
        x = self.norm(x)
        context = self.context_norm(context)
        q = self.to_q(x)
        q = q.reshape(q.shape[0], q.shape[1], self.heads, -1).permute(0, 2, 1, 3) * self.scale
        k, v = self.to_kv(context).chunk(2, dim=-1)
        sim = _einsum("b h i d, b j d -> b h i j", q, k)
        sim = sim + mask.unsqueeze(1).repeat(1, self.heads, 1, 1)
        sim = sim - sim.amax(dim=-1, keepdim=True)
        attn = sim.softmax(dim=-1)
        out = _einsum("b h i j, b j d -> b h i d", attn, v)
        out = self.to_out(out.permute(0, 2, 1, 3).reshape(out.shape[0], out.shape[2], -1))
        if self.ff is not None:
            out = out + self.ff(x)
        return out


@_official("trainer.models.cross_modeling", "Cross_model")
class _MPSCrossModel(_nn.Module):
    def __init__(self, dim=512, layer_num=4, dim_head=64, heads=8, ff_mult=4):
        super().__init__()
        self.layers = _nn.ModuleList([])
        for _ in range(layer_num):
            self.layers.append(_nn.ModuleList([
                _MPSResidual(_MPSCrossAttention(dim=dim, dim_head=dim_head, heads=heads, parallel_ff=True, ff_mult=ff_mult)),
                _MPSResidual(_MPSParallelTransformerBlock(dim=dim, dim_head=dim_head, heads=heads, ff_mult=ff_mult)),
            ]))

    def forward(self, query_tokens, context_tokens, mask):
        for cross_attn, self_attn_ff in self.layers:
            query_tokens = cross_attn(query_tokens, context_tokens, mask)
            query_tokens = self_attn_ff(query_tokens)
        return query_tokens


@lru_cache(maxsize=1)
def _mps_xclip_class():
    from transformers import CLIPModel as HFCLIPModel

    @_official("trainer.models.clip_model", "XCLIPModel")
    class _MPSXCLIPModel(HFCLIPModel):
        def get_text_features(self, input_ids=None, attention_mask=None, position_ids=None):
            out = self.text_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
            return self.text_projection(out.last_hidden_state), self.text_projection(out.pooler_output)

        def get_image_features(self, pixel_values=None):
            return self.visual_projection(self.vision_model(pixel_values=pixel_values).last_hidden_state)

    return _MPSXCLIPModel


@_official("trainer.models.clip_model", "CLIPModel")
class _MPSCLIPModel(_nn.Module):
    """The official wrapper: ``model`` (XCLIPModel.from_pretrained(ckpt)) and ``cross_model``."""

    def __init__(self, ckpt, **cross):
        super().__init__()
        self.model = _mps_xclip_class().from_pretrained(ckpt)
        self.cross_model = _MPSCrossModel(dim=self.model.config.projection_dim, **cross)

    @property
    def logit_scale(self):
        return self.model.logit_scale


@contextmanager
def official_mps_importable():
    """The ``trainer.models.*`` modules in sys.modules for the duration (as the official repo installed)."""
    sys.modules.update(_mps_modules)
    try:
        yield
    finally:
        for name in MPS_MODULES:
            sys.modules.pop(name, None)


def official_mps(clip_dir: Path, seed: int = 0):
    """The official ``trainer.models.clip_model.CLIPModel`` on a tiny CLIP folder (projection_dim 32), its
    cross model's weights, LayerNorm bias buffers and rotary frequencies all random, in eval mode."""
    module = _MPSCLIPModel(clip_dir, **MPS_TINY_CROSS).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.cross_model.state_dict().items():
            if name.endswith("inv_freq"):
                tensor.mul_(1 + 0.1 * torch.rand(tensor.shape, generator=gen))
            elif name.endswith(("norm.weight", "norm.bias")):
                tensor.add_(0.2 * torch.randn(tensor.shape, generator=gen))
    return module


def write_mps_clip_folder(path: Path, seed: int = 0) -> Path:
    """The tiny CLIP folder MPS's tiny cross model fits (projection_dim 32 = Cross_model dim)."""
    return write_clip_folder(path, seed=seed, projection_dim=32)


def write_mps_pickle(path: Path, module) -> Path:
    """``torch.save(module)``, the release's format; the module is run once first, so that its non-persistent
    ``pos_emb`` buffers are tensors in the pickle as they would be after use."""
    with torch.no_grad():
        dim = module.model.config.projection_dim
        module.cross_model(torch.zeros(1, 5, dim), torch.zeros(1, 7, dim), torch.zeros(1, 5, 7))
    with official_mps_importable():
        torch.save(module, path)
    return path


def write_mps_state_dict(path: Path, module, prefix: str = "") -> Path:
    """``module.state_dict()`` (keys ``model.*`` + ``cross_model.*``, optionally prefixed) as .pt or .safetensors."""
    sd = {prefix + k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, path)
    else:
        torch.save(sd, path)
    return path


def openai_clip_transform(size: int = 224):
    """OpenAI CLIP's eval transform (also BLIP's and the LAION aesthetic predictor's), built from torchvision."""
    from torchvision import transforms as T

    return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size), lambda im: im.convert("RGB"),
                      T.ToTensor(), T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])


def check_tensor_path(scorer, pixels: torch.Tensor, prompts, dims=("overall",), tolerance: float = 0.05, floor: float = 0.0):
    """The differentiable path: gradients reach the pixels (finite, not all zero) through ``dims``, and its
    overall score is within ``tolerance`` · max(``floor``, max |PIL score|) of the PIL path's on the same pixels."""
    from torchvision.transforms.functional import to_pil_image

    pixels = pixels.detach().requires_grad_(True)
    out = scorer.score(pixels, prompts)
    sum(out[d].sum() for d in dims).backward()
    assert pixels.grad is not None and torch.isfinite(pixels.grad).all() and pixels.grad.abs().sum() > 0
    pil = scorer.score([to_pil_image(p) for p in pixels.detach()], prompts)["overall"]
    assert (out["overall"].detach() - pil).abs().max() < tolerance * max(floor, pil.abs().max().item())
