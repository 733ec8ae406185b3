"""HPSv3 (Ma et al., ICCV 2025; MizzenAI/HPSv3): a Qwen2-VL-7B-Instruct reward model with an uncertainty head.

Sources: ``hpsv3/inference.py`` (HPSv3RewardInferencer), ``hpsv3/model/qwen2vl_trainer.py``
(Qwen2VLRewardModelBT, the ``uncertainty`` loss), ``hpsv3/train.py`` (create_model_and_processor),
``hpsv3/dataset/data_collator_qwen.py`` (INSTRUCTION), ``hpsv3/dataset/utils.py`` (smart_resize, fetch_image),
``hpsv3/config/HPSv3_7B.yaml``; checked against the ``hpsv3==1.0.0`` release (which pins transformers 4.45.2).

Model. A ``<|Reward|>`` special token is added to the Qwen2-VL tokenizer and the token embeddings (and the untied
``lm_head``) are resized to the new tokenizer length. The reward head, kept in fp32, is

    rm_head = Linear(H, 1024) → ReLU → Dropout(0.05) → Linear(1024, 16) → ReLU → Linear(16, 2)   (keys rm_head.0/3/5)

Forward (the official one, re-stated): the token embeddings get the vision tower's merged patch embeddings
scattered into the ``<|image_pad|>`` positions, and the text decoder runs on them with ``position_ids=None``, i.e.
positions 0…L−1 in all three M-RoPE sections (not Qwen2-VL's 3-D image positions). With h the final (normed)
hidden state at the ``<|Reward|>`` token,

    [μ, log σ] = rm_head(h)        score = μ (unbounded; MizzenAI/HPSv3#9)

Input. Each image is converted to RGB and resized with PIL bicubic to ``smart_resize(H, W)`` with
min = max = 256·28·28 pixels (448×448 for a square), then normalised with the processor's OpenAI-CLIP mean/std and
cut into 14×14 patches (temporal patch 2, the frame repeated; 2×2 merge). The user message is the image followed
by ``INSTRUCTION.format(text_prompt=prompt) + RATING_SUFFIX``, rendered with the chat template and
``add_generation_prompt=True``; the batch is padded on the right.

Pairwise. The training loss (``loss_type: uncertainty``) samples z ~ N(μa − μb, σa² + σb²) (1000 fp16 draws) and
minimises −mean log σ(z); so P(a ≻ b) = E[σ(z)], which `uncertainty_preference` computes deterministically by
Gauss–Hermite quadrature.

Weights: ``HPSv3.safetensors``, the full state dict (``visual.*``, ``model.*``, ``lm_head.*``, ``rm_head.*``, in the
pre-4.52 transformers layout) plus a local Qwen2-VL-7B-Instruct folder for config, tokenizer, chat template and
processor. Both key layouts (``model.layers.*``/``visual.*`` and ``model.language_model.*``/``model.visual.*``)
are accepted and mapped to the installed transformers' own, then checked strictly.

The tensor path is differentiable: the official ``differentiable=True`` route resizes a tensor with torchvision's
bicubic, antialiased resize (``fetch_image``) before normalising and patching, and so does `preprocess_tensor`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image

from diffalign.scorers.base import ModelScorer, Preference
from diffalign.scorers.weights import ScorerWeightsError, load_exact, read_state_dict

REWARD_TOKEN = "<|Reward|>"
IMAGE_TOKEN = "<|image_pad|>"
PIXELS = 256 * 28 * 28  # min_pixels = max_pixels (HPSv3_7B.yaml, inference.py prepare_batch)
FACTOR = 28  # patch 14 × merge 2
MAX_RATIO = 200

# hpsv3/dataset/data_collator_qwen.py, verbatim (trailing spaces included): the model was trained on this text
INSTRUCTION = (
    '\n'
    'You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst and 10 being the best. \n'  # noqa: E501
    '\n'
    '**Visual Quality:**  \n'
    'Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:\n'
    '- **Reasonableness:** The image should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.\n'  # noqa: E501
    '- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to interpret, with no blurring or indistinct areas.\n'  # noqa: E501
    '- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).\n'  # noqa: E501
    '- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.\n'  # noqa: E501
    '- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible. \n'  # noqa: E501
    '\n'
    '**Text Alignment:**  \n'
    'Assess how well the image matches the textual prompt across the following sub-dimensions:\n'
    '- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.\n'  # noqa: E501
    '- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the image adheres to this style.\n'  # noqa: E501
    '- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image logically fit the scenario described in the prompt. The environment should support and enhance the subject without contradictions.\n'  # noqa: E501
    '- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be acceptable, but critical attributes should be preserved.\n'  # noqa: E501
    '- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the image. The generated content should not introduce elements that conflict with or distort the original description.\n'  # noqa: E501
    'Textual prompt - {text_prompt}\n'
    '\n'
    '\n'
)
RATING_SUFFIX = "\nPlease provide the overall ratings of this image: <|Reward|>\n\nEND\n"  # prompt_with_special_token


def smart_resize(height: int, width: int, factor: int = FACTOR, min_pixels: int = PIXELS, max_pixels: int = PIXELS) -> tuple[int, int]:
    """(height, width) in multiples of ``factor`` with about the same aspect ratio and a pixel count in
    [min_pixels, max_pixels] (qwen-vl-utils' version, as in ``hpsv3/dataset/utils.py``):

        h̄, w̄ = max(f, round(H/f)·f), max(f, round(W/f)·f)
        if h̄·w̄ > max:  β = √(H·W/max);  h̄, w̄ = ⌊H/β/f⌋·f, ⌊W/β/f⌋·f
        elif h̄·w̄ < min: β = √(min/(H·W)); h̄, w̄ = ⌈H·β/f⌉·f, ⌈W·β/f⌉·f
    """
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ValueError(f"absolute aspect ratio must be at most {MAX_RATIO}, got {max(height, width) / min(height, width):.1f}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar, w_bar = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def resize_image(image: Image.Image, pixels: int = PIXELS) -> Image.Image:
    """``fetch_image`` for a PIL image: RGB, then PIL bicubic to ``smart_resize`` with min = max = ``pixels``."""
    image = image.convert("RGB")
    height, width = smart_resize(image.height, image.width, min_pixels=pixels, max_pixels=pixels)
    return image.resize((width, height), Image.BICUBIC)


def patchify(pixels: torch.Tensor, patch: int, temporal: int, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2-VL's flat patches of normalised B×C×h×w images: the frame repeated ``temporal`` times, patches ordered
    by merge window, each flattened as (C, T, patch, patch). Returns (B·gh·gw, C·T·patch²) and grid_thw (B, 3)."""
    b, c, h, w = pixels.shape
    gh, gw = h // patch, w // patch
    x = pixels.reshape(b, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)  # b, gh/m, gw/m, m, m, c, p, p
    x = x.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, temporal, -1, -1)
    flat = x.reshape(b * gh * gw, c * temporal * patch * patch)
    grid = torch.tensor([[1, gh, gw]] * b, dtype=torch.long, device=pixels.device)
    return flat, grid


class QwenPixels(NamedTuple):
    """A batch of Qwen2-VL vision inputs: flat patches of every image, and each image's (t, h, w) patch grid."""

    pixel_values: torch.Tensor
    grid_thw: torch.Tensor

    def to(self, *args, **kwargs) -> "QwenPixels":
        values = self.pixel_values.to(*args, **kwargs)
        return QwenPixels(values, self.grid_thw.to(values.device))


def canonical_layout(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys in the transformers ≥ 4.52 layout: ``visual.*`` → ``model.visual.*``, ``model.*`` (the text decoder) →
    ``model.language_model.*``; ``lm_head.*`` and ``rm_head.*`` unchanged. A key given in both layouts is an error."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key.startswith("visual."):
            new = "model." + key
        elif key.startswith("model.") and not key.startswith(("model.language_model.", "model.visual.")):
            new = "model.language_model." + key[len("model."):]
        else:
            new = key
        if new in out:
            raise ScorerWeightsError(f"weight {new!r} given twice (in the old and the new transformers key layout)")
        out[new] = value
    return out


def installed_layout(sd: dict[str, torch.Tensor], own_keys) -> dict[str, torch.Tensor]:
    """``sd`` (either layout) in the layout the installed transformers' Qwen2-VL uses (its own keys ``own_keys``)."""
    sd = canonical_layout(sd)
    if any(k.startswith("model.language_model.") for k in own_keys):
        return sd
    old = {}
    for key, value in sd.items():  # transformers < 4.52: visual.* and model.* (the decoder) at the top
        if key.startswith("model.visual."):
            key = key[len("model."):]
        elif key.startswith("model.language_model."):
            key = "model." + key[len("model.language_model."):]
        old[key] = value
    return old


def uncertainty_preference(mu_a: torch.Tensor, log_sigma_a: torch.Tensor, mu_b: torch.Tensor, log_sigma_b: torch.Tensor,
                           nodes: int = 64) -> torch.Tensor:
    """P(a ≻ b) = E[σ(z)], z ~ N(μa − μb, σa² + σb²), σ = exp(log σ): HPSv3's ``uncertainty`` loss, whose training
    code estimates it from 1000 random draws, here by ``nodes``-point Gauss–Hermite quadrature,

        E[f(z)] = π^(-1/2) Σ_i w_i f(m + √2 s x_i),

    in float64 (differentiable in the four inputs)."""
    x, w = np.polynomial.hermite.hermgauss(nodes)
    x = torch.as_tensor(x, dtype=torch.float64, device=mu_a.device)
    w = torch.as_tensor(w, dtype=torch.float64, device=mu_a.device)
    m = (mu_a - mu_b).double()
    s = torch.sqrt(torch.exp(2 * log_sigma_a.double()) + torch.exp(2 * log_sigma_b.double()))
    z = m.unsqueeze(-1) + math.sqrt(2.0) * s.unsqueeze(-1) * x
    return ((torch.sigmoid(z) * w).sum(-1) / math.sqrt(math.pi)).to(mu_a.dtype)


def reward_head(hidden_size: int) -> torch.nn.Sequential:
    """Qwen2VLRewardModelBT's ``ranknet`` head with ``rm_head_kwargs=None`` (the released 7B), in fp32."""
    nn = torch.nn
    return nn.Sequential(nn.Linear(hidden_size, 1024), nn.ReLU(), nn.Dropout(0.05), nn.Linear(1024, 16), nn.ReLU(),
                         nn.Linear(16, 2)).float()


def _no_init_weights():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def build_reward_model(config, tokenizer_length: int, dtype: torch.dtype):
    """Qwen2VLForConditionalGeneration from ``config`` (weights left uninitialised: the checkpoint holds them all),
    token embeddings resized to ``tokenizer_length`` as ``create_model_and_processor`` does, and ``rm_head``."""
    from transformers import Qwen2VLForConditionalGeneration

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with _no_init_weights():
            model = Qwen2VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    model.resize_token_embeddings(tokenizer_length, mean_resizing=False)
    model.to(dtype)
    hidden = config.text_config.hidden_size if hasattr(config, "text_config") else config.hidden_size
    model.rm_head = reward_head(hidden)
    return model


class HPSv3(ModelScorer):
    """HPSv3 behind the `Scorer` interface: ``overall`` = μ, ``log_sigma`` = log σ.

    ``path``: ``HPSv3.safetensors`` (or a torch file; a dict holding it under ``"model"`` is unwrapped). ``base``: a
    local Qwen2-VL-7B-Instruct folder (config.json, tokenizer, chat template, preprocessor_config.json); by default
    the folder holding ``path``. ``dtype`` defaults to bfloat16, as the official config; ``rm_head`` stays fp32.
    """

    name = "hpsv3"
    dimensions = ("overall", "log_sigma")

    def __init__(self, path: str | Path, base: str | Path | None = None, **options):
        from transformers import AutoConfig, AutoProcessor

        options.setdefault("dtype", torch.bfloat16)
        super().__init__(**options)
        path = Path(path)
        base = Path(base) if base is not None else path.parent
        if not (base / "config.json").is_file():
            raise ScorerWeightsError(f"{base}: not a Qwen2-VL-7B-Instruct folder (no config.json); pass base=DIR")
        self.processor = AutoProcessor.from_pretrained(str(base), padding_side="right", local_files_only=True)
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "right"
        self.tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
        self.reward_token_id = self.tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
        config = AutoConfig.from_pretrained(str(base), local_files_only=True)
        self.image_token_id = config.image_token_id
        model = build_reward_model(config, len(self.tokenizer), self.dtype)
        sd = read_state_dict(path, unwrap=("model",), lazy=True)  # 7B: read tensor by tensor into the model
        load_exact(model, installed_layout(sd, model.state_dict().keys()), str(path))
        model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model = model.to(self.device).eval().requires_grad_(False)
        ip = self.processor.image_processor
        self.patch, self.temporal, self.merge = ip.patch_size, ip.temporal_patch_size, ip.merge_size
        self.mean = torch.tensor(ip.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(ip.image_std, dtype=torch.float32).view(1, 3, 1, 1)

    # -- images ------------------------------------------------------------------------------------------------
    def normalise_and_patch(self, pixels: torch.Tensor) -> QwenPixels:
        """B×3×h×w in [0, 1] (h, w multiples of 28) → normalised flat patches."""
        x = (pixels - self.mean.to(pixels.device)) / self.std.to(pixels.device)
        return QwenPixels(*patchify(x, self.patch, self.temporal, self.merge))

    def preprocess(self, images: Sequence[Image.Image]) -> QwenPixels:
        parts = []
        for im in images:
            arr = np.asarray(resize_image(im), dtype=np.float32) / 255.0
            parts.append(self.normalise_and_patch(torch.from_numpy(arr).permute(2, 0, 1)[None]))
        return QwenPixels(torch.cat([p.pixel_values for p in parts]), torch.cat([p.grid_thw for p in parts]))

    def preprocess_tensor(self, pixels: torch.Tensor) -> QwenPixels:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.functional import resize

        height, width = smart_resize(pixels.shape[-2], pixels.shape[-1])
        resized = resize(pixels, [height, width], interpolation=InterpolationMode.BICUBIC, antialias=True)
        return self.normalise_and_patch(resized)

    # -- text --------------------------------------------------------------------------------------------------
    def conversation(self, prompt: str) -> list[dict]:
        """The official message (``prepare_batch``)."""
        return [{"role": "user", "content": [
            {"type": "image", "min_pixels": PIXELS, "max_pixels": PIXELS},
            {"type": "text", "text": INSTRUCTION.format(text_prompt=prompt) + RATING_SUFFIX},
        ]}]

    def tokens(self, prompts: Sequence[str], grid_thw: torch.Tensor) -> dict[str, torch.Tensor]:
        """Chat-template text with each image's ``<|image_pad|>`` repeated once per merged patch (as the processor
        does), tokenised and padded on the right."""
        texts = []
        for prompt, grid in zip(prompts, grid_thw.tolist()):
            text = self.processor.apply_chat_template(self.conversation(prompt), tokenize=False, add_generation_prompt=True)
            text = text[0] if isinstance(text, list) else text
            if text.count(IMAGE_TOKEN) != 1:
                raise ValueError(f"prompt {prompt!r} contains the image token {IMAGE_TOKEN}")
            texts.append(text.replace(IMAGE_TOKEN, IMAGE_TOKEN * (math.prod(grid) // self.merge**2)))
        return self.tokenizer(texts, padding=True, return_tensors="pt")

    # -- model -------------------------------------------------------------------------------------------------
    def parts(self):
        """(vision tower, text decoder, token embeddings) in either transformers layout."""
        inner = self.model.model
        if hasattr(inner, "language_model"):
            return inner.visual, inner.language_model, inner.language_model.embed_tokens
        return self.model.visual, inner, inner.embed_tokens

    def score_pixels(self, pixels: QwenPixels, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        batch = self.tokens(prompts, pixels.grid_thw)
        input_ids = batch["input_ids"].to(self.device)
        attention_mask = batch["attention_mask"].to(self.device)
        visual, decoder, embed = self.parts()
        embeds = embed(input_ids)
        image = visual(pixels.pixel_values.to(self.device, self.dtype), grid_thw=pixels.grid_thw.to(self.device))
        image = getattr(image, "pooler_output", image)  # transformers 5 returns an output, 4.x the merged tensor
        mask = (input_ids == self.image_token_id).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(mask, image.to(embeds.dtype))
        b, length = input_ids.shape
        positions = torch.arange(length, device=self.device).view(1, 1, length).expand(3, b, length)
        hidden = decoder(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions)[0]
        at_reward = input_ids == self.reward_token_id
        if not bool((at_reward.sum(-1) == 1).all()):
            raise ValueError(f"each prompt must give exactly one {REWARD_TOKEN} token (a prompt contains it)")
        out = self.model.rm_head(hidden[at_reward].float())  # (B, 2): [μ, log σ]
        return {"overall": out[:, 0], "log_sigma": out[:, 1]}

    # -- preference --------------------------------------------------------------------------------------------
    def preference(self, score_a, score_b) -> Preference:
        """From two `score` results: the calibrated E[σ(z)] of `uncertainty_preference`; from two μ tensors alone,
        the uncalibrated Bradley–Terry fallback of the base class."""
        if isinstance(score_a, dict) and isinstance(score_b, dict):
            prob = uncertainty_preference(score_a["overall"], score_a["log_sigma"], score_b["overall"], score_b["log_sigma"])
            return Preference(prob, calibrated=True)
        return super().preference(score_a, score_b)

    def prefer(self, a, b, prompts: Sequence[str]) -> Preference:
        return self.preference(self.score(a, prompts), self.score(b, prompts))
