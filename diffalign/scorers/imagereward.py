"""ImageReward v1.0 (Xu et al. 2023; THUDM/ImageReward): BLIP ViT-L/16 + a BERT text encoder that
cross-attends to the image, and a linear MLP on the [CLS] state.

    h = BERT(ids, mask, cross-attending to ViT(x))[:, 0]                 (``ImageReward.py:score``)
    r(x, c) = (MLP(h) − 0.16717362830052426) / 1.0333394966054072         (mean/std of MLP(h))
    P(a ≻ b) = softmax([MLP(h_a), MLP(h_b)])_0 = σ(1.0333394966054072 · (r_a − r_b))
                                                  (cross-entropy on raw MLP outputs, ``train/src/train.py``)

MLP = Linear(768, 1024) → Dropout → Linear(1024, 128) → Dropout → Linear(128, 64) → Dropout →
Linear(64, 16) → Linear(16, 1), with no activations (``mlp.layers.{0,2,4,6,7}``).

Vision (BLIP ``models/vit.py``): patch conv, [CLS] token, learned positions, pre-norm blocks
x += Attn(LN(x)); x += MLP(LN(x)) with fused ``qkv``, scale 1/√d_head, exact-erf GELU, LayerNorm eps 1e-6,
and a final LayerNorm; ViT-L/16 at 224 has width 1024, 24 blocks and 16 heads. Text (BLIP ``models/med.py``
``BertModel(add_pooling_layer=False)``): word + absolute position embeddings (no token types) → LayerNorm;
each layer is post-norm self-attention, cross-attention (keys and values from the ViT tokens, width
``encoder_width`` = the ViT width), then a GELU feed-forward; padding is masked additively with −10000.
The image tokens get an all-ones mask (no masking).

Files: ``ImageReward.pt`` (a plain fp32 state dict of the whole model: ``blip.visual_encoder.*``,
``blip.text_encoder.*`` including the ``embeddings.position_ids`` buffer, ``blip.vision_proj.*``,
``blip.text_proj.*``, ``mlp.*``) or DiffSynth-Studio's ``ImageReward.safetensors`` (the same keys; DiffSynth
loads it into the same module layout), ``med_config.json`` (read beside the weights by default) and the
``bert-base-uncased`` ``vocab.txt``. Every key is checked: ``vision_proj``/``text_proj`` (BLIP's contrastive
heads, unused for the reward) are loaded as the official model holds them, and ``position_ids`` may be
absent but must be ``arange`` when present. Preprocessing is the official torchvision transform: bicubic
resize of the shortest edge to 224, centre crop (offset rounded), then RGB, ToTensor and OpenAI CLIP's
mean/std. The resize runs in the image's own mode, as the official order does, so palette images are
resized with nearest neighbour (Pillow's rule) and RGBA with premultiplied alpha. The tokenizer is BLIP's
``init_tokenizer``: ``BertTokenizer`` plus ``[DEC]`` as bos and ``[ENC]`` (30524 ids); prompts are padded to
35 tokens and truncated, and ``[CLS]`` is kept (the official ``score`` does not swap in ``[ENC]``).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from diffalign.scorers.base import ModelScorer, Preference
from diffalign.scorers.preprocess import clip_center_crop, clip_center_crop_tensor
from diffalign.scorers.weights import ScorerWeightsError, load_exact, read_state_dict

REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MAX_LENGTH = 35
PROJECTION_DIM = 256  # BLIP_Pretrain(embed_dim=256): the shape of the unused vision_proj / text_proj
POSITION_IDS = "blip.text_encoder.embeddings.position_ids"
VISION = "blip.visual_encoder."


@dataclass(frozen=True)
class VisionShape:
    width: int = 1024
    depth: int = 24
    heads: int = 16
    patch_size: int = 16
    image_size: int = 224
    mlp_width: int = 4096


@dataclass(frozen=True)
class TextConfig:
    """The fields of ``med_config.json`` the text encoder uses (defaults are transformers' BertConfig's)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    encoder_width: int = 768


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head softmax(q kᵀ / √d_head + mask) v; q is B×Lq×D, k and v B×Lk×D, mask additive (B×1×1×Lk)."""
    b, lq, d = q.shape
    q, k, v = split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d // heads)
    if mask is not None:
        scores = scores + mask
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, lq, d)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """B×L×D -> B×heads×L×(D/heads)."""
    b, length, d = x.shape
    return x.view(b, length, heads, d // heads).transpose(1, 2)


# ---------------------------------------------------------------- BLIP ViT (models/vit.py)

class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(pixels).flatten(2).transpose(1, 2)


class VitAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(attend(q, k, v, self.heads))


class VitMlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VitBlock(nn.Module):
    def __init__(self, shape: VisionShape):
        super().__init__()
        self.norm1 = nn.LayerNorm(shape.width, eps=1e-6)
        self.attn = VitAttention(shape.width, shape.heads)
        self.norm2 = nn.LayerNorm(shape.width, eps=1e-6)
        self.mlp = VitMlp(shape.width, shape.mlp_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """BLIP's ViT: B×3×S×S normalised pixels -> B×(1 + (S/p)²)×width tokens, [CLS] first."""

    def __init__(self, shape: VisionShape):
        super().__init__()
        tokens = 1 + (shape.image_size // shape.patch_size) ** 2
        self.patch_embed = PatchEmbed(shape.patch_size, shape.width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, shape.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, shape.width))
        self.blocks = nn.ModuleList(VitBlock(shape) for _ in range(shape.depth))
        self.norm = nn.LayerNorm(shape.width, eps=1e-6)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed[:, : x.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


# ---------------------------------------------------------------- BLIP BERT with cross-attention (models/med.py)

class BertEmbeddings(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.LayerNorm(self.word_embeddings(input_ids) + self.position_embeddings(positions))


class BertSelfAttention(nn.Module):
    """Queries from the text; keys and values from the text (self) or the image tokens (cross)."""

    def __init__(self, config: TextConfig, context_width: int):
        super().__init__()
        self.heads = config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(context_width, config.hidden_size)
        self.value = nn.Linear(context_width, config.hidden_size)

    def forward(self, hidden: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return attend(self.query(hidden), self.key(context), self.value(context), self.heads, mask)


class BertResidualOutput(nn.Module):
    """LayerNorm(dense(x) + residual): BERT's post-norm sublayer output."""

    def __init__(self, config: TextConfig, in_width: int):
        super().__init__()
        self.dense = nn.Linear(in_width, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: TextConfig, context_width: int):
        super().__init__()
        self.self = BertSelfAttention(config, context_width)
        self.output = BertResidualOutput(config, config.hidden_size)

    def forward(self, hidden: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(hidden, context, mask), hidden)


class BertIntermediate(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.attention = BertAttention(config, config.hidden_size)
        self.crossattention = BertAttention(config, config.encoder_width)
        self.intermediate = BertIntermediate(config)
        self.output = BertResidualOutput(config, config.intermediate_size)

    def forward(self, hidden: torch.Tensor, text_mask: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.attention(hidden, hidden, text_mask)
        hidden = self.crossattention(hidden, image_tokens, None)  # all-ones image mask: nothing masked
        return self.output(self.intermediate(hidden), hidden)


class BertEncoder(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))


class TextEncoder(nn.Module):
    """med.py's ``BertModel(add_pooling_layer=False)`` in 'multimodal' mode: the last hidden states."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.embeddings(input_ids)
        text_mask = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * -10000.0
        for layer in self.encoder.layer:
            hidden = layer(hidden, text_mask, image_tokens)
        return hidden


# ---------------------------------------------------------------- the whole model, in the official key layout

class Blip(nn.Module):
    """``BLIP_Pretrain`` as ImageReward builds it; ``vision_proj``/``text_proj`` are in the checkpoint but
    not used for the reward."""

    def __init__(self, vision: VisionShape, text: TextConfig):
        super().__init__()
        self.visual_encoder = VisionTransformer(vision)
        self.text_encoder = TextEncoder(text)
        self.vision_proj = nn.Linear(vision.width, PROJECTION_DIM)
        self.text_proj = nn.Linear(text.hidden_size, PROJECTION_DIM)


class RewardMLP(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(width, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ImageRewardModel(nn.Module):
    def __init__(self, vision: VisionShape, text: TextConfig):
        super().__init__()
        self.blip = Blip(vision, text)
        self.mlp = RewardMLP(text.hidden_size)

    def raw_reward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B,) MLP(h): the un-normalised reward the training loss sees."""
        image_tokens = self.blip.visual_encoder(pixels)
        hidden = self.blip.text_encoder(input_ids, attention_mask, image_tokens)
        return self.mlp(hidden[:, 0].float()).squeeze(-1)  # the MLP stays float32, as the official .float()


# ---------------------------------------------------------------- files

def vision_shape(sd: Mapping[str, torch.Tensor], heads: int | None = None) -> VisionShape:
    """The ViT's shape from the checkpoint: width from ``cls_token``, patch from the patch conv, image size from
    ``pos_embed``, depth from the block indices, MLP width from ``fc1``. Heads are not in the shapes: ``heads``
    or width/64 (ViT-B and ViT-L both use 64-wide heads). ViT-L/16 at 224 when the file lacks these keys (the
    strict load then names what is missing)."""
    needed = [VISION + k for k in ("cls_token", "patch_embed.proj.weight", "pos_embed")]
    if not all(k in sd for k in needed):
        return VisionShape() if heads is None else VisionShape(heads=heads)
    width = sd[VISION + "cls_token"].shape[-1]
    patch = sd[VISION + "patch_embed.proj.weight"].shape[-1]
    grid = math.isqrt(sd[VISION + "pos_embed"].shape[1] - 1)
    if grid * grid != sd[VISION + "pos_embed"].shape[1] - 1:
        raise ScorerWeightsError(f"{VISION}pos_embed: {sd[VISION + 'pos_embed'].shape[1]} tokens is not 1 + a square grid")
    blocks = {int(m.group(1)) for k in sd if (m := re.match(re.escape(VISION) + r"blocks\.(\d+)\.", k))}
    depth = max(blocks) + 1 if blocks else 0
    fc1 = sd.get(VISION + "blocks.0.mlp.fc1.weight")
    heads = heads if heads is not None else max(1, width // 64)
    if width % heads:
        raise ScorerWeightsError(f"ViT width {width} is not divisible by {heads} heads (pass vision_heads=)")
    return VisionShape(width=width, depth=depth, heads=heads, patch_size=patch, image_size=grid * patch,
                       mlp_width=fc1.shape[0] if fc1 is not None else 4 * width)


def read_med_config(path: Path, encoder_width: int) -> TextConfig:
    """``med_config.json`` as BLIP reads it (``BertConfig.from_json_file``), ``encoder_width`` overridden by the
    ViT width as ``BLIP_Pretrain`` does."""
    if not path.is_file():
        raise ScorerWeightsError(f"{path}: med_config.json not found (the official file sits beside ImageReward.pt; "
                                 "pass med_config=PATH)")
    raw = json.loads(path.read_text())
    if raw.get("hidden_act", "gelu") != "gelu":
        raise ScorerWeightsError(f"{path}: hidden_act {raw['hidden_act']!r}; only BLIP's 'gelu' is implemented")
    if raw.get("position_embedding_type", "absolute") != "absolute":
        raise ScorerWeightsError(f"{path}: position_embedding_type {raw['position_embedding_type']!r}; only 'absolute'")
    if str(raw.get("add_cross_attention", False)).lower() != "true":
        raise ScorerWeightsError(f"{path}: add_cross_attention is not true; ImageReward's text encoder cross-attends")
    fields = {k: raw[k] for k in TextConfig.__dataclass_fields__ if k in raw and k != "encoder_width"}
    config = TextConfig(**fields, encoder_width=encoder_width)
    if config.hidden_size % config.num_attention_heads:
        raise ScorerWeightsError(f"{path}: hidden_size {config.hidden_size} not divisible by {config.num_attention_heads} heads")
    return config


def check_position_ids(sd: Mapping[str, torch.Tensor], where: str) -> None:
    """The checkpoint's ``position_ids`` buffer (med.py saves it; newer conversions drop it) must be ``arange``."""
    if POSITION_IDS in sd:
        ids = sd[POSITION_IDS]
        if ids.ndim != 2 or ids.shape[0] != 1 or not torch.equal(ids[0].long(), torch.arange(ids.shape[1])):
            raise ScorerWeightsError(f"{where}: {POSITION_IDS} is not arange(0, n) (shape {tuple(ids.shape)})")


def tokenizer_folder(weights: Path, tokenizer: str | Path | None) -> Path:
    """The folder holding BERT's ``vocab.txt``: ``tokenizer``, else beside the weights, a ``bert-base-uncased``
    folder there, or one beside the weights' folder (DiffSynth's layout)."""
    if tokenizer is not None:
        folder = Path(tokenizer)
        if not (folder / "vocab.txt").is_file():
            raise ScorerWeightsError(f"{folder}: no vocab.txt (pass tokenizer=DIR, a bert-base-uncased folder)")
        return folder
    here = weights.parent
    candidates = [here, here / "bert-base-uncased", here.parent / "bert-base-uncased"]
    for folder in candidates:
        if (folder / "vocab.txt").is_file():
            return folder
    raise ScorerWeightsError(f"no bert-base-uncased vocab.txt in {', '.join(map(str, candidates))}; "
                             "pass tokenizer=DIR, a bert-base-uncased folder")


def load_blip_tokenizer(folder: Path, vocab_size: int):
    """BLIP's ``init_tokenizer``: bert-base-uncased plus ``[DEC]`` (bos) and ``[ENC]``."""
    from transformers import BertTokenizer

    tok = BertTokenizer.from_pretrained(str(folder), local_files_only=True)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    if len(tok) != vocab_size:
        raise ScorerWeightsError(f"{folder}: the tokenizer has {len(tok)} ids with [DEC] and [ENC], the text encoder "
                                 f"{vocab_size}; use the bert-base-uncased vocab.txt")
    return tok


class ImageReward(ModelScorer):
    name = "imagereward"

    def __init__(self, path: str | Path, med_config: str | Path | None = None, tokenizer: str | Path | None = None,
                 *, vision_heads: int | None = None, **options):
        super().__init__(**options)
        path = Path(path)
        sd = read_state_dict(path)
        vision = vision_shape(sd, vision_heads)
        text = read_med_config(Path(med_config) if med_config is not None else path.parent / "med_config.json", vision.width)
        check_position_ids(sd, str(path))
        self.model = ImageRewardModel(vision, text)
        load_exact(self.model, sd, str(path), ignore=(POSITION_IDS,))
        self.model.eval().requires_grad_(False)
        self.model.blip.to(self.dtype)
        self.model.to(self.device)
        self.tokenizer = load_blip_tokenizer(tokenizer_folder(path, tokenizer), text.vocab_size)
        self.image_size = vision.image_size

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return clip_center_crop(images, self.image_size, crop="torchvision")

    def preprocess_tensor(self, pixels: torch.Tensor) -> torch.Tensor:
        return clip_center_crop_tensor(pixels, self.image_size, crop="torchvision")

    def score_pixels(self, pixels: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
        raw = self.model.raw_reward(pixels, tokens.input_ids.to(pixels.device), tokens.attention_mask.to(pixels.device))
        return {"overall": (raw - REWARD_MEAN) / REWARD_STD}

    def preference(self, score_a: torch.Tensor, score_b: torch.Tensor) -> Preference:
        return Preference(torch.sigmoid(REWARD_STD * (score_a - score_b)), calibrated=True)
