"""HPSv3 on a tiny random Qwen2-VL: both checkpoint key layouts, the reward computed independently with
transformers' own processor and model as the official forward does, strict key checks, smart_resize, and the
uncertainty preference against Monte Carlo."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch
from PIL import Image
from tiny_scorers import PROMPTS, check_tensor_path, images, write_tiny_hpsv3, write_tiny_qwen2vl

REWARD = "<|Reward|>"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_tiny_qwen2vl(tmp_path_factory.mktemp("qwen2vl"))


@pytest.fixture(scope="module")
def checkpoints(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("hpsv3")
    return {layout: write_tiny_hpsv3(root / layout / "HPSv3.safetensors", base, layout=layout) for layout in ("old", "new")}


def scorer(checkpoints, base, layout="old", **options):
    from diffalign.scorers.hpsv3 import HPSv3

    return HPSv3(checkpoints[layout], base=base, dtype=torch.float32, **options)


@pytest.mark.parametrize("hw, expected", [
    ((224, 224), (448, 448)),  # 224·224 < 256·28² → β = 2, ⌈448/28⌉·28 = 448
    ((1024, 1024), (448, 448)),  # 1036² > 256·28² → β = 1024/448, ⌊16⌋·28
    ((320, 256), (504, 420)),  # 308·252 < min → β = √(200704/81920) = 1.565; ⌈17.9⌉·28, ⌈14.3⌉·28
    ((97, 150), (364, 560)),  # 84·140 < min → β = 3.714; ⌈12.9⌉·28, ⌈19.9⌉·28
    ((100, 1000), (168, 1428)),  # 112·1008 < min → β = 1.4167; ⌈5.06⌉·28, ⌈50.6⌉·28
    ((2000, 3000), (364, 532)),  # 1988·2996 > max → β = 5.4676; ⌊13.06⌋·28, ⌊19.6⌋·28
])
def test_smart_resize_against_a_hand_computation(hw, expected):
    from diffalign.scorers.hpsv3 import resize_image, smart_resize

    assert smart_resize(*hw) == expected
    im = resize_image(Image.new("RGBA", (hw[1], hw[0])))
    assert (im.height, im.width) == expected and im.mode == "RGB"


def test_smart_resize_rejects_extreme_aspect_ratios():
    from diffalign.scorers.hpsv3 import smart_resize

    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2100)


def test_instruction_is_the_official_text():
    from diffalign.scorers.hpsv3 import INSTRUCTION, RATING_SUFFIX

    # sha256 of INSTRUCTION in hpsv3==1.0.0 hpsv3/dataset/data_collator_qwen.py (trailing double spaces included)
    assert hashlib.sha256(INSTRUCTION.encode()).hexdigest() == "0393599dad45a971903d1d62a3acf9bad3ccccdafa7f40f680523419e1f68b7a"
    assert "**Visual Quality:**  \n" in INSTRUCTION and "**Text Alignment:**  \n" in INSTRUCTION
    assert INSTRUCTION.endswith("Textual prompt - {text_prompt}\n\n\n")
    assert RATING_SUFFIX == "\nPlease provide the overall ratings of this image: <|Reward|>\n\nEND\n"


def official_rewards(base, checkpoint, pil_images, prompts):
    """HPSv3RewardInferencer, re-done with transformers' own pieces: AutoProcessor (``<|Reward|>`` added, right
    padding) on the official message, PIL bicubic to the smart_resize size, the file loaded into a plain
    Qwen2VLForConditionalGeneration, Qwen2VLRewardModelBT.forward (image embeddings scattered into the token
    embeddings, the decoder run with position_ids=None), and the head applied by hand."""
    from safetensors.torch import load_file
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    from diffalign.scorers.hpsv3 import INSTRUCTION, RATING_SUFFIX, smart_resize

    processor = AutoProcessor.from_pretrained(base, padding_side="right")
    processor.tokenizer.add_special_tokens({"additional_special_tokens": [REWARD]})
    reward_id = processor.tokenizer.convert_tokens_to_ids(REWARD)
    messages = [[{"role": "user", "content": [
        {"type": "image", "image": im, "min_pixels": 200704, "max_pixels": 200704},
        {"type": "text", "text": INSTRUCTION.format(text_prompt=p) + RATING_SUFFIX}]}] for im, p in zip(pil_images, prompts)]
    resized = []
    for im in pil_images:
        h, w = smart_resize(im.height, im.width)
        resized.append(im.convert("RGB").resize((w, h), Image.BICUBIC))
    texts = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    batch = processor(text=texts, images=resized, padding=True, return_tensors="pt")

    sd = load_file(str(checkpoint))
    new = {}
    for k, v in sd.items():  # the released file's pre-4.52 names -> the installed transformers'
        if k.startswith("visual."):
            k = "model." + k
        elif k.startswith("model.") and not k.startswith(("model.language_model.", "model.visual.")):
            k = "model.language_model." + k[6:]
        new[k] = v
    head = {k[len("rm_head."):]: v for k, v in new.items() if k.startswith("rm_head.")}
    model = Qwen2VLForConditionalGeneration.from_pretrained(base)
    model.resize_token_embeddings(len(processor.tokenizer), mean_resizing=False)
    model.load_state_dict({k: v for k, v in new.items() if not k.startswith("rm_head.")}, strict=True)
    model.eval()
    with torch.no_grad():
        ids = batch["input_ids"]
        embeds = model.model.language_model.embed_tokens(ids)
        image_embeds = model.model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"]).pooler_output
        mask = (ids == model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(mask, image_embeds)
        hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).last_hidden_state
        standard = model(**batch, output_hidden_states=True).hidden_states[-1]  # Qwen2-VL's own 3-D M-RoPE positions
    at = ids == reward_id
    assert (at.sum(-1) == 1).all()

    def apply_head(h):
        h = torch.relu(h @ head["0.weight"].T + head["0.bias"])
        h = torch.relu(h @ head["3.weight"].T + head["3.bias"])
        return h @ head["5.weight"].T + head["5.bias"]

    return apply_head(hidden[at]), apply_head(model.model.language_model.norm(standard[at]))


@pytest.mark.parametrize("layout", ["old", "new"])
def test_reward_matches_the_official_forward(checkpoints, base, layout):
    ims = images()
    expected, with_mrope = official_rewards(base, checkpoints["old"], ims, PROMPTS)
    got = scorer(checkpoints, base, layout, batch_size=3).score(ims, PROMPTS)
    assert set(got) == {"overall", "log_sigma"}
    torch.testing.assert_close(got["overall"], expected[:, 0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got["log_sigma"], expected[:, 1], atol=1e-4, rtol=1e-4)
    assert got["overall"].std() > 0.1  # images and prompts are told apart
    # the official forward's sequential positions are not the ones Qwen2-VL itself would use
    assert (with_mrope[:, 0] - expected[:, 0]).abs().max() > 1e-3


def test_both_layouts_load_the_same_weights(checkpoints, base):
    a, b = scorer(checkpoints, base, "old"), scorer(checkpoints, base, "new")
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.model.rm_head[0].weight.dtype == torch.float32


def test_the_default_dtype_is_bfloat16_with_an_fp32_head(checkpoints, base):
    from diffalign.scorers.hpsv3 import HPSv3

    s = HPSv3(checkpoints["old"], base=base)
    assert s.model.lm_head.weight.dtype == torch.bfloat16 and s.model.rm_head[5].weight.dtype == torch.float32
    out = s.score(images()[:2], PROMPTS[:2])
    assert out["overall"].dtype == torch.float32 and torch.isfinite(out["overall"]).all()


def test_a_wrong_or_missing_key_fails_loudly(tmp_path, checkpoints, base):
    from safetensors.torch import load_file, save_file

    from diffalign.scorers.hpsv3 import HPSv3
    from diffalign.scorers.weights import ScorerWeightsError

    sd = load_file(str(checkpoints["old"]))
    vocab = sd["model.embed_tokens.weight"].shape[0]
    broken = {
        "missing": ({k: v for k, v in sd.items() if k != "rm_head.3.weight"}, "missing: rm_head.3.weight"),
        "unexpected": ({**sd, "rm_head.7.weight": torch.zeros(2, 2)}, "unexpected: rm_head.7.weight"),
        "shape": ({**sd, "rm_head.5.weight": torch.zeros(4, 16)}, "rm_head.5.weight"),
        # a base-size embedding: the file was not made with <|Reward|> added
        "no_reward_token": ({**sd, "model.embed_tokens.weight": sd["model.embed_tokens.weight"][: vocab - 1]},
                            "model.language_model.embed_tokens.weight"),
        "both_layouts": ({**sd, "model.visual.merger.ln_q.weight": sd["visual.merger.ln_q.weight"].clone()}, "given twice"),
    }
    for name, (weights, message) in broken.items():
        file = tmp_path / name / "HPSv3.safetensors"
        file.parent.mkdir()
        save_file(weights, str(file))
        with pytest.raises(ScorerWeightsError, match=message):
            HPSv3(file, base=base)
    with pytest.raises(ScorerWeightsError, match="no config.json"):
        HPSv3(checkpoints["old"])  # base defaults to the file's folder, which holds no Qwen2-VL config
    with pytest.raises(ScorerWeightsError, match="not found"):
        HPSv3(tmp_path / "absent.safetensors", base=base)


def test_the_checkpoint_folder_may_be_the_base(tmp_path, checkpoints, base):
    import shutil

    folder = shutil.copytree(base, tmp_path / "both")
    shutil.copy(checkpoints["old"], folder / "HPSv3.safetensors")
    from diffalign.scorers.hpsv3 import HPSv3

    got = HPSv3(folder / "HPSv3.safetensors", dtype=torch.float32).score(images()[:1], PROMPTS[:1])["overall"]
    torch.testing.assert_close(got, scorer(checkpoints, base).score(images()[:1], PROMPTS[:1])["overall"])


def test_a_prompt_holding_the_reward_token_is_refused(checkpoints, base):
    with pytest.raises(ValueError, match="exactly one"):
        scorer(checkpoints, base).score(images()[:1], [f"a cat {REWARD}"])


def test_uncertainty_preference_against_monte_carlo():
    from diffalign.scorers.hpsv3 import uncertainty_preference

    mu_a = torch.tensor([0.0, 1.5, -2.0, 3.0, 0.2])
    ls_a = torch.tensor([0.0, -1.0, 0.5, 1.2, -3.0])
    mu_b = torch.tensor([0.0, 0.5, 1.0, -1.0, 0.0])
    ls_b = torch.tensor([0.3, -0.5, 0.0, 1.0, -3.0])
    p = uncertainty_preference(mu_a, ls_a, mu_b, ls_b)
    g = torch.Generator().manual_seed(0)
    m, s = (mu_a - mu_b).double(), torch.sqrt(torch.exp(2 * ls_a.double()) + torch.exp(2 * ls_b.double()))
    z = m[:, None] + s[:, None] * torch.randn(len(m), 2_000_000, generator=g, dtype=torch.float64)
    monte_carlo = torch.sigmoid(z).mean(-1).float()
    torch.testing.assert_close(p, monte_carlo, atol=2e-3, rtol=0)
    assert p[0] == pytest.approx(0.5, abs=1e-6)  # equal means
    torch.testing.assert_close(p[4], torch.sigmoid(torch.tensor(0.2)), atol=1e-3, rtol=0)  # σ → 0: Bradley–Terry
    torch.testing.assert_close(p + uncertainty_preference(mu_b, ls_b, mu_a, ls_a), torch.ones(5))
    # larger uncertainty pulls the probability towards 1/2
    wide = uncertainty_preference(mu_a[1:2], ls_a[1:2] + 2, mu_b[1:2], ls_b[1:2] + 2)
    assert 0.5 < wide.item() < p[1].item()


def test_prefer_is_the_calibrated_uncertainty_probability(checkpoints, base):
    from diffalign.scorers.hpsv3 import uncertainty_preference

    s = scorer(checkpoints, base)
    a, b = images(seed=1)[:2], images(seed=2)[:2]
    sa, sb = s.score(a, PROMPTS[:2]), s.score(b, PROMPTS[:2])
    pref = s.prefer(a, b, PROMPTS[:2])
    assert pref.calibrated
    torch.testing.assert_close(pref.prob, uncertainty_preference(sa["overall"], sa["log_sigma"], sb["overall"], sb["log_sigma"]))
    assert not s.preference(sa["overall"], sb["overall"]).calibrated  # μ alone: the Bradley–Terry fallback


def smooth_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 6, 6, generator=g)
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=True)


def test_tensor_path_is_differentiable_and_close(checkpoints, base):
    s = scorer(checkpoints, base)
    for size in (448, 224):  # no resize (only uint8 rounding differs), and a 2x bicubic upsampling
        check_tensor_path(s, smooth_images(2, size), PROMPTS[:2], dims=("overall", "log_sigma"),
                          tolerance=0.01 if size == 448 else 0.05, floor=1.0)


def test_preprocess_matches_the_transformers_processor(checkpoints, base):
    from transformers import AutoProcessor

    from diffalign.scorers.hpsv3 import resize_image

    s = scorer(checkpoints, base)
    ims = images()
    mine = s.preprocess(ims)
    theirs = AutoProcessor.from_pretrained(base).image_processor(images=[resize_image(im) for im in ims], return_tensors="pt")
    torch.testing.assert_close(mine.grid_thw, theirs["image_grid_thw"])
    torch.testing.assert_close(mine.pixel_values, theirs["pixel_values"], atol=1e-5, rtol=1e-5)
    assert math.prod(mine.grid_thw[2].tolist()) == 32 * 32  # the 224² image: 448² pixels, 1024 patches, 256 tokens
