"""ImageReward: a tiny random checkpoint in the official ImageReward.pt layout, scored through diffalign and
by a reference built from the libraries the official code uses (torchvision's transform, transformers'
BertTokenizer with BLIP's special tokens, transformers' BLIP vision and text models for the forward)."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
import torch.nn.functional as F
from tiny_scorers import BERT_SPLIT_WORDS, PROMPTS, check_tensor_path, images, write_imagereward_checkpoint

MEAN, STD = 0.16717362830052426, 1.0333394966054072  # ImageReward.py
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
HEADS = 2  # the tiny ViT's heads (not recorded in a checkpoint's shapes)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_imagereward_checkpoint(tmp_path_factory.mktemp("imagereward"))


@pytest.fixture(scope="module")
def scorer(checkpoint):
    from diffalign.scorers.imagereward import ImageReward

    return ImageReward(checkpoint, vision_heads=HEADS, batch_size=3)


def official_transform(size=224):
    """``ImageReward.py:_transform``."""
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

    return Compose([Resize(size, interpolation=InterpolationMode.BICUBIC), CenterCrop(size), lambda im: im.convert("RGB"),
                    ToTensor(), Normalize(CLIP_MEAN, CLIP_STD)])


def official_tokenizer(folder):
    """``models/BLIP/blip.py:init_tokenizer`` on a local bert-base-uncased folder."""
    from transformers import BertTokenizer

    tok = BertTokenizer.from_pretrained(str(folder))
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


def reference_models(sd, med):
    """transformers' BLIP vision and text models loaded strictly from the official keys through a key map."""
    from transformers import BlipTextConfig, BlipVisionConfig, BlipVisionModel
    from transformers.models.blip.modeling_blip_text import BlipTextModel

    v = "blip.visual_encoder."
    width = sd[v + "cls_token"].shape[-1]
    depth = len({k.split(".")[3] for k in sd if k.startswith(v + "blocks.")})
    vision = BlipVisionModel(BlipVisionConfig(
        hidden_size=width, intermediate_size=sd[v + "blocks.0.mlp.fc1.weight"].shape[0], num_hidden_layers=depth,
        num_attention_heads=HEADS, image_size=224, patch_size=sd[v + "patch_embed.proj.weight"].shape[-1],
        layer_norm_eps=1e-6, hidden_act="gelu", attn_implementation="eager"))
    names = {"patch_embed.proj.": "embeddings.patch_embedding.", "cls_token": "embeddings.class_embedding",
             "pos_embed": "embeddings.position_embedding", "norm.": "post_layernorm."}
    block = {"norm1.": "layer_norm1.", "attn.qkv.": "self_attn.qkv.", "attn.proj.": "self_attn.projection.",
             "norm2.": "layer_norm2.", "mlp.fc1.": "mlp.fc1.", "mlp.fc2.": "mlp.fc2."}
    mapped = {}
    for key, value in sd.items():
        if not key.startswith(v):
            continue
        rest = key[len(v):]
        if rest.startswith("blocks."):
            _, i, sub = rest.split(".", 2)
            new = next(f"encoder.layers.{i}.{b}{sub[len(a):]}" for a, b in block.items() if sub.startswith(a))
        else:
            new = next(b + rest[len(a):] for a, b in names.items() if rest.startswith(a))
        mapped[new] = value
    vision.load_state_dict(mapped, strict=True)

    text = BlipTextModel(BlipTextConfig(
        vocab_size=med["vocab_size"], hidden_size=med["hidden_size"], encoder_hidden_size=width,
        intermediate_size=med["intermediate_size"], num_hidden_layers=med["num_hidden_layers"],
        num_attention_heads=med["num_attention_heads"], max_position_embeddings=med["max_position_embeddings"],
        layer_norm_eps=med["layer_norm_eps"], hidden_act="gelu", is_decoder=True,  # is_decoder: build crossattention
        attn_implementation="eager"), add_pooling_layer=False)
    t = "blip.text_encoder."
    text.load_state_dict({k[len(t):]: x for k, x in sd.items() if k.startswith(t) and not k.endswith("position_ids")},
                         strict=True)
    return vision.eval(), text.eval()


def official_rewards(checkpoint, pil_images, prompts):
    """``ImageReward.score`` for each (prompt, image), one image at a time, from the raw files."""
    folder = checkpoint.parent
    sd = torch.load(checkpoint, map_location="cpu", weights_only=True)
    vision, text = reference_models(sd, json.loads((folder / "med_config.json").read_text()))
    tokenizer, transform = official_tokenizer(folder), official_transform()
    rewards = []
    with torch.no_grad():
        for image, prompt in zip(pil_images, prompts):
            tokens = tokenizer(prompt, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
            image_embeds = vision(pixel_values=transform(image).unsqueeze(0)).last_hidden_state
            hidden = text(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                          encoder_hidden_states=image_embeds,
                          encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long)).last_hidden_state
            x = hidden[:, 0, :].float()
            for i in (0, 2, 4, 6, 7):  # the MLP: linear layers, dropouts in between, no activations
                x = F.linear(x, sd[f"mlp.layers.{i}.weight"], sd[f"mlp.layers.{i}.bias"])
            rewards.append(((x - MEAN) / STD).item())
    return torch.tensor(rewards)


def test_the_fabricated_vocab_gives_real_pieces(checkpoint):
    tok = official_tokenizer(checkpoint.parent)
    assert len(tok) == 30524 and tok.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [30522, 30523]
    pieces = [tok.convert_ids_to_tokens(ids) for ids in tok(PROMPTS)["input_ids"]]
    assert pieces[0][:7] == ["[CLS]", "a", "cat", "&", "amp", ";", "a"]
    assert "\u201c" in pieces[1] and BERT_SPLIT_WORDS["bakery"] == tuple(pieces[1][5:7])
    assert "[UNK]" in pieces[2] and "##et" in pieces[2]  # the emoji are unknown; "rocket" is split
    assert len(pieces[3]) > 35 and "##tail" in pieces[3]  # the long prompt gets truncated at 35


def test_rewards_match_the_official_pipeline(checkpoint, scorer):
    ims = images()
    expected = official_rewards(checkpoint, ims, PROMPTS)
    scores = scorer.score(ims, PROMPTS)
    assert set(scores) == {"overall"}
    # fp32 agreement is about 3e-7; the tanh GELU instead of the exact one is off by about 2e-4
    torch.testing.assert_close(scores["overall"], expected, atol=1e-5, rtol=1e-5)
    assert expected.std() > 0.05  # images and prompts are told apart


def test_diffsynth_safetensors_layout_loads_to_the_same_scores(tmp_path, checkpoint, scorer):
    """DiffSynth-Studio: ``ImageReward/ImageReward.safetensors`` (same keys; here without the ``position_ids``
    buffer that newer conversions drop) + ``ImageReward/med_config.json`` + ``bert-base-uncased/vocab.txt``."""
    from safetensors.torch import save_file

    from diffalign.scorers.imagereward import ImageReward

    sd = torch.load(checkpoint, weights_only=True)
    (tmp_path / "ImageReward").mkdir()
    (tmp_path / "bert-base-uncased").mkdir()
    save_file({k: v.contiguous() for k, v in sd.items() if not k.endswith("position_ids")},
              tmp_path / "ImageReward" / "ImageReward.safetensors")
    shutil.copy(checkpoint.parent / "med_config.json", tmp_path / "ImageReward")
    shutil.copy(checkpoint.parent / "vocab.txt", tmp_path / "bert-base-uncased")
    ims = images()
    got = ImageReward(tmp_path / "ImageReward" / "ImageReward.safetensors", vision_heads=HEADS).score(ims, PROMPTS)
    torch.testing.assert_close(got["overall"], scorer.score(ims, PROMPTS)["overall"])


def test_broken_checkpoints_fail_naming_the_key(tmp_path, checkpoint):
    from diffalign.scorers.imagereward import ImageReward
    from diffalign.scorers.weights import ScorerWeightsError

    sd = torch.load(checkpoint, weights_only=True)
    cross_key = "blip.text_encoder.encoder.layer.1.crossattention.self.key.weight"
    broken = {
        "missing: blip.vision_proj.weight": {k: v for k, v in sd.items() if k != "blip.vision_proj.weight"},
        "unexpected: blip.itm_head.weight": {**sd, "blip.itm_head.weight": torch.zeros(2, 32)},
        "wrong shape: " + cross_key: {**sd, cross_key: torch.zeros(32, 768)},  # encoder_width not overridden
        "position_ids is not arange": {**sd, "blip.text_encoder.embeddings.position_ids": torch.zeros(1, 512, dtype=torch.long)},
    }
    for i, (message, state) in enumerate(broken.items()):
        folder = tmp_path / str(i)
        shutil.copytree(checkpoint.parent, folder)
        torch.save(state, folder / "ImageReward.pt")
        with pytest.raises(ScorerWeightsError, match=re.escape(message)):
            ImageReward(folder / "ImageReward.pt", vision_heads=HEADS)


def test_missing_files_name_the_path(tmp_path, checkpoint):
    from diffalign.scorers.imagereward import ImageReward
    from diffalign.scorers.weights import ScorerWeightsError

    with pytest.raises(ScorerWeightsError, match="nowhere.json: med_config.json not found"):
        ImageReward(checkpoint, med_config=tmp_path / "nowhere.json", vision_heads=HEADS)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ScorerWeightsError, match="empty: no vocab.txt"):
        ImageReward(checkpoint, tokenizer=tmp_path / "empty", vision_heads=HEADS)
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(checkpoint, alone)
    shutil.copy(checkpoint.parent / "med_config.json", alone)
    with pytest.raises(ScorerWeightsError, match="no bert-base-uncased vocab.txt in .*alone"):
        ImageReward(alone / "ImageReward.pt", vision_heads=HEADS)
    with pytest.raises(ScorerWeightsError, match="weight file not found"):
        ImageReward(tmp_path / "ImageReward.pt")


def test_preference_is_the_training_softmax(scorer):
    a, b = images(seed=1), images(seed=2)
    ra, rb = scorer.score(a, PROMPTS)["overall"], scorer.score(b, PROMPTS)["overall"]
    pref = scorer.prefer(a, b, PROMPTS)
    assert pref.calibrated
    torch.testing.assert_close(pref.prob, torch.sigmoid(1.0333394966054072 * (ra - rb)))
    # the same as the softmax over the raw MLP outputs the loss was trained on
    raw = torch.stack([ra, rb], -1) * STD + MEAN
    torch.testing.assert_close(pref.prob, torch.softmax(raw, -1)[:, 0])


def test_tensor_path_is_differentiable_and_close(scorer):
    check_tensor_path(scorer, torch.rand(2, 3, 256, 288), PROMPTS[:2])


def test_preprocess_is_the_blip_transform(scorer):
    """Odd sizes (225×301, 97×150 upscaled), an RGBA image with varying alpha and palette images: the
    torchvision transform resizes before converting to RGB, so Pillow resizes palette images with nearest
    neighbour and RGBA with premultiplied alpha."""
    import numpy as np
    from PIL import Image

    ims = images(sizes=((225, 301), (301, 225), (224, 224), (97, 150))) + images(sizes=((150, 97),), seed=3)
    ims[-1] = ims[-1].convert("P")
    rgba = np.asarray(images(sizes=((240, 260),), seed=4)[0].convert("RGBA")).copy()
    rgba[..., 3] = np.linspace(0, 255, 240, dtype=np.uint8)[None, :]
    ims.append(Image.fromarray(rgba, "RGBA"))
    transform = official_transform()
    expected = torch.stack([transform(im) for im in ims])
    torch.testing.assert_close(scorer.preprocess(ims), expected, atol=1e-6, rtol=0)
