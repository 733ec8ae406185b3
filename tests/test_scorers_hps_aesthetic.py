"""HPSv2/v2.1 (open_clip) and the LAION aesthetic predictor: tiny random checkpoints in the official formats,
scored through diffalign and by the official formulas; the letterbox and centre-crop transforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_scorers import PROMPTS, TINY_OPEN_CLIP, images, openai_clip_transform, write_aesthetic_mlp, write_clip_folder, write_hps_checkpoint

MEAN = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(3, 1, 1)
STD = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(3, 1, 1)


def official_letterbox(image: Image.Image, size: int = 224) -> torch.Tensor:
    """hpsv2's eval transform: ToTensor, ResizeMaxSize (tensor bicubic resize of the longest side, then
    zero padding centred), Normalize; RGB forced first as a loader must."""
    from torchvision.transforms import functional as TF

    x = TF.to_tensor(image.convert("RGB"))
    h, w = x.shape[1:]
    scale = size / max(h, w)
    if scale != 1.0:
        x = TF.resize(x, [round(h * scale), round(w * scale)], TF.InterpolationMode.BICUBIC, antialias=False)
    pad_h, pad_w = size - x.shape[1], size - x.shape[2]
    x = TF.pad(x, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
    return TF.normalize(x, MEAN.flatten().tolist(), STD.flatten().tolist())


def test_letterbox_pads_the_short_side_after_resizing_the_long_one():
    from diffalign.scorers.preprocess import letterbox

    image = Image.fromarray(np.full((112, 448, 3), 255, np.uint8))  # 448 wide, 112 high -> 224 x 56, 84 rows of padding each side
    x = letterbox([image])[0]
    assert x.shape == (3, 224, 224)
    padding = (0 - MEAN) / STD
    torch.testing.assert_close(x[:, :84], padding.expand(3, 84, 224))
    torch.testing.assert_close(x[:, -84:], padding.expand(3, 84, 224))
    torch.testing.assert_close(x[:, 84:140], ((1 - MEAN) / STD).expand(3, 56, 224), atol=1e-5, rtol=0)
    for im in images():
        torch.testing.assert_close(letterbox([im])[0], official_letterbox(im))
    # longest side already 224: not resized, but padded so a batch stacks
    small = Image.fromarray(np.full((100, 224, 3), 0, np.uint8))
    assert letterbox([small]).shape == (1, 3, 224, 224)


def test_center_crop_matches_transformers_and_torchvision():
    from transformers import CLIPImageProcessorPil

    from diffalign.scorers.preprocess import clip_center_crop

    odd = images(sizes=((301, 225), (225, 301), (97, 150), (224, 227)))
    hf = CLIPImageProcessorPil()(images=odd, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(clip_center_crop(odd, crop="hf"), hf, atol=1e-5, rtol=0)
    tv = openai_clip_transform()
    ours = clip_center_crop(odd, crop="torchvision")
    for i, im in enumerate(odd):  # RGBA and palette images included: converted after the resize, as the Compose does
        torch.testing.assert_close(ours[i], tv(im), atol=1e-5, rtol=0)
    # the two conventions differ by a row when the excess rounds up: 227 high, 3 rows to crop: top 1 (hf) vs round(1.5) = 2
    assert not torch.equal(clip_center_crop(odd[3:], crop="hf"), clip_center_crop(odd[3:], crop="torchvision"))


@pytest.fixture(scope="module")
def hps_file(tmp_path_factory):
    return write_hps_checkpoint(tmp_path_factory.mktemp("hps") / "HPS_v2.1_compressed.pt")


def official_hps(path, pil_images, prompts):
    """hpsv2/img_score.py: the open_clip model with the checkpoint's state_dict, diag(img @ txt.T)."""
    import open_clip

    model = open_clip.CLIP(**TINY_OPEN_CLIP, output_dict=True)
    model.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
    model.eval()
    with torch.no_grad():
        out = model(torch.stack([official_letterbox(im) for im in pil_images]), open_clip.tokenize(prompts))
    return torch.diag(out["image_features"] @ out["text_features"].T), out["logit_scale"]


def test_hps_matches_the_official_formula(hps_file, tmp_path):
    from diffalign.scorers.hps import HPSv2

    ims = images()
    expected, logit_scale = official_hps(hps_file, ims, PROMPTS)
    scorer = HPSv2(hps_file, architecture=TINY_OPEN_CLIP, batch_size=3)
    got = scorer.score(ims, PROMPTS)["overall"]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert got.std() > 0
    # DiffSynth's flat safetensors conversion of the same weights scores the same
    flat = write_hps_checkpoint(tmp_path / "HPS_v2.1_compressed.safetensors", safetensors=True)
    torch.testing.assert_close(HPSv2(flat, architecture=TINY_OPEN_CLIP).score(ims, PROMPTS)["overall"], got)
    # the calibration is the softmax of the training loss over logit-scaled scores
    b = images(seed=5)
    sb = scorer.score(b, PROMPTS)["overall"]
    pref = scorer.prefer(ims, b, PROMPTS)
    assert pref.calibrated
    torch.testing.assert_close(pref.prob, torch.softmax(logit_scale * torch.stack([got, sb], -1), -1)[:, 0])


def test_hps_refuses_a_checkpoint_for_another_architecture(hps_file):
    from diffalign.scorers.hps import HPSv2
    from diffalign.scorers.weights import ScorerWeightsError

    bigger = {**TINY_OPEN_CLIP, "embed_dim": 24}
    with pytest.raises(ScorerWeightsError, match="wrong shape: .*text_projection"):
        HPSv2(hps_file, architecture=bigger)
    with pytest.raises(ScorerWeightsError, match="not found"):
        HPSv2(hps_file.with_name("nope.pt"), architecture=TINY_OPEN_CLIP)


def test_aesthetic_matches_the_official_formula(tmp_path):
    from transformers import CLIPModel

    from diffalign.scorers.aesthetic import AestheticScorer

    clip_dir = write_clip_folder(tmp_path / "clip-l14")
    mlp_file = write_aesthetic_mlp(tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    ims = images()
    # simple_inference.py: CLIP image features, L2-normalised, through the MLP (official torchvision transform)
    tv = openai_clip_transform()
    clip = CLIPModel.from_pretrained(clip_dir).eval()
    sd = torch.load(mlp_file, weights_only=True)
    with torch.no_grad():
        e = clip.get_image_features(pixel_values=torch.stack([tv(im) for im in ims])).pooler_output
        h = e / e.norm(dim=-1, keepdim=True)
        for index in (0, 2, 4, 6, 7):
            h = h @ sd[f"layers.{index}.weight"].T + sd[f"layers.{index}.bias"]
    got = AestheticScorer(mlp_file, clip=clip_dir).score(ims, PROMPTS)
    torch.testing.assert_close(got["overall"], h.squeeze(-1), atol=1e-5, rtol=1e-4)
    pref = AestheticScorer(mlp_file, clip=clip_dir).prefer(ims, images(seed=3), PROMPTS)
    assert not pref.calibrated
    # DiffSynth's safetensors conversion keeps the official keys
    from safetensors.torch import save_file

    save_file(sd, str(tmp_path / "aesthetic.safetensors"))
    torch.testing.assert_close(AestheticScorer(tmp_path / "aesthetic.safetensors", clip=clip_dir).score(ims, PROMPTS)["overall"], got["overall"])


def test_aesthetic_refuses_features_of_the_wrong_width(tmp_path):
    from diffalign.scorers.aesthetic import AestheticScorer
    from diffalign.scorers.weights import ScorerWeightsError

    clip_dir = write_clip_folder(tmp_path / "clip", projection_dim=24)
    with pytest.raises(ScorerWeightsError, match="24 dimensions"):
        AestheticScorer(write_aesthetic_mlp(tmp_path / "mlp.pth", input_dim=16), clip=clip_dir)
