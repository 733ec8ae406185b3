"""Captioned images without preferences (`captions`, `toy_scenes` sources): read, cached as K = 1 items, trained by
Self-NPO, refused by the methods that need preferences."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from diffalign.cli import main
from diffalign.data.errors import DataError
from diffalign.data.sources import CaptionedFolder, SourceItem, ToyScenes, validate_item
from diffalign.toy.scenes import HELD_OUT, TRAIN

pytestmark = pytest.mark.usefixtures("one_thread")


def _folder(root, with_metadata=False):
    root.mkdir(parents=True, exist_ok=True)
    (root / "sub").mkdir(exist_ok=True)
    for i, name in enumerate(["a.png", "b.jpg", "sub/c.png", "d.png"]):
        Image.new("RGB", (40, 40), (60 * i, 100, 150)).save(root / name)
    if with_metadata:
        lines = [{"file": "a.png", "prompt": "a red circle"}, {"file": "sub/c.png", "prompt": "a blue square"}]
        (root / "metadata.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    else:
        for name, caption in [("a.png", "a red circle"), ("b.jpg", "a green star"), ("sub/c.png", "a blue square")]:
            (root / name).with_suffix(".txt").write_text(caption + "\n")
    return root


def test_a_folder_with_sidecar_captions(tmp_path):
    source = CaptionedFolder(_folder(tmp_path / "f"))
    items = list(source.items())
    assert [(i.source_id, i.caption) for i in items] == [("a.png", "a red circle"), ("b.jpg", "a green star"), ("sub/c.png", "a blue square")]
    assert all(i.k == 1 and validate_item(i) is i for i in items)
    assert source.describe()["uncaptioned"] == 1  # d.png has no caption: skipped, counted
    assert [i.source_id for i in source.items(start=2)] == ["sub/c.png"]


def test_a_folder_with_metadata_jsonl_as_generate_writes(tmp_path):
    source = CaptionedFolder(_folder(tmp_path / "m", with_metadata=True))
    assert [(i.source_id, i.caption) for i in source.items()] == [("a.png", "a red circle"), ("sub/c.png", "a blue square")]
    (tmp_path / "m" / "metadata.jsonl").write_text('{"file": "a.png"}\n')
    with pytest.raises(DataError, match="metadata.jsonl:1"):
        CaptionedFolder(tmp_path / "m")
    for bad in (tmp_path / "missing", tmp_path / "empty"):
        (tmp_path / "empty").mkdir(exist_ok=True)
        with pytest.raises(DataError, match="data.source.root"):
            CaptionedFolder(bad)


def test_a_single_image_cannot_carry_a_preference():
    with pytest.raises(DataError, match="single image"):
        validate_item(SourceItem("x", "c", [b"img"], scores=[1.0]))
    with pytest.raises(DataError, match="needs a list of images"):
        validate_item(SourceItem("x", "c", []))


def test_toy_scenes_are_training_captions_drawn_reproducibly():
    source = ToyScenes(images_per_caption=2, image_size=32, seed=0)
    assert source.count() == 2 * len(TRAIN)
    first = list(source.items())[:4]
    assert {i.caption for i in source.items()} == {s.caption for s in TRAIN}
    assert not {i.caption for i in source.items()} & {s.caption for s in HELD_OUT}
    assert first[0].caption == first[1].caption and first[0].images != first[1].images  # two scenes of one caption
    assert [i.images for i in ToyScenes(2, 32, 0).items(start=1)][:1] == [first[1].images]
    assert source.digest() != ToyScenes(2, 32, 1).digest()


def test_self_npo_trains_on_captioned_images_and_pairwise_methods_refuse_them(tmp_path, capsys):
    root = _folder(tmp_path / "images")
    common = [f"data.source={{kind: captions, root: {root}}}", "model.pretrained=builtin:tiny-sdxl", "data.resolution=32",
              f"data.cache_dir={tmp_path / 'cache'}", "train.max_steps=2", "train.batch_size=2", "log.progress=false",
              "model.lora.rank=2", "model.lora.alpha=2"]
    assert main(["train", "toy/self_npo", *common, f"train.output_dir={tmp_path / 'run'}"]) == 0
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["counts"]["k"] == 1 and manifest["counts"]["items"] == 3
    assert (tmp_path / "run" / "final" / "pytorch_lora_weights.safetensors").is_file()
    capsys.readouterr()
    assert main(["train", "toy/dpo", *common, f"train.output_dir={tmp_path / 'dpo'}"]) == 2
    assert "trains on preferences" in capsys.readouterr().err
