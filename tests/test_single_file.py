"""Single-file checkpoints (`diffalign.models.single_file`): an SD1.5 and an SDXL pipeline written in the original
Stable Diffusion key layout (`tests/ldm_checkpoint.py`) load back tensor for tensor, generate the same images as the
diffusers directory they came from, key their caches by content, and pickle or foreign files are refused by name."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from ldm_checkpoint import write_single_file
from safetensors.torch import save_file

from diffalign.cli import main
from diffalign.config import ConfigError, ModelConfig, load_config
from diffalign.data.identity import weights_digest
from diffalign.models.errors import ModelLoadError
from diffalign.models.loading import load_components
from diffalign.models.tiny import tiny_sd15_pipeline, tiny_sdxl_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")


def _pipelines(family):
    # SDXL's two encoders differ in width (768 / 1280): diffusers' converter tells them apart by it
    return tiny_sdxl_pipeline(text_dim_2=48) if family == "sdxl" else tiny_sd15_pipeline()


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """family -> (family, pipeline, single file, its diffusers directory), each written once."""
    cache = {}

    def write(family):
        if family not in cache:
            root = tmp_path_factory.mktemp(family)
            pipe = _pipelines(family)
            pipe.save_pretrained(root / "diffusers")
            cache[family] = family, pipe, write_single_file(pipe, root / "model.safetensors"), root / "diffusers"
        return cache[family]

    return write


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_every_tensor_loads_back(written, family):
    family, pipe, path, config = written(family)
    c = load_components(ModelConfig(pretrained=str(path), single_file_config=str(config)))
    assert c.family == family and c.source == str(path) and c.prediction_type == "epsilon"
    assert type(c.scheduler).__name__ == "DDPMScheduler"  # the training noise scheduler, whatever the config ships
    originals = [pipe.unet, pipe.vae, pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    for original, loaded in zip(originals, [c.unet, c.vae, *c.text_encoders], strict=True):
        want, got = original.state_dict(), loaded.state_dict()
        assert set(want) == set(got), type(original).__name__
        assert all(torch.equal(want[k], got[k]) for k in want), type(original).__name__
    assert c.tokenizers[0]("a red circle").input_ids == pipe.tokenizer("a red circle").input_ids


def test_generate_from_the_single_file_matches_the_directory(written, tmp_path):
    _, _, path, config = written("sd15")
    common = ["--prompts", "a red circle", "--seeds", "0-1", "--steps", "3", "--height", "32", "--width", "32", "--no-progress"]
    assert main(["generate", "--model", str(config), "--out", str(tmp_path / "dir"), *common]) == 0
    assert main(["generate", "--model", str(path), "--model-config", str(config), "--out", str(tmp_path / "file"), *common]) == 0
    for name in ("p00000_s0.png", "p00000_s1.png"):
        assert (tmp_path / "dir" / name).read_bytes() == (tmp_path / "file" / name).read_bytes()
    line = json.loads((tmp_path / "file" / "metadata.jsonl").read_text().splitlines()[0])
    assert line["model"] == str(path) and line["model_config"] == str(config)


def test_the_cache_identity_follows_the_file_content(written, tmp_path):
    _, _, path, config = written("sd15")
    copy = tmp_path / path.name
    copy.write_bytes(path.read_bytes())
    before = weights_digest(ModelConfig(pretrained=str(copy), single_file_config=str(config)))
    assert before == weights_digest(ModelConfig(pretrained=str(path), single_file_config=str(config)))  # content, not place
    data = bytearray(copy.read_bytes())
    data[-1] ^= 1
    copy.write_bytes(bytes(data))
    assert weights_digest(ModelConfig(pretrained=str(copy), single_file_config=str(config))) != before


class Canary:
    def __reduce__(self):
        return (exec, ("raise SystemExit('the canary ran')",))


def test_pickle_and_foreign_files_are_refused_by_name(written, tmp_path):
    _, _, _, config = written("sd15")
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(pickle.dumps({"state_dict": Canary()}))  # never opened: the suffix is refused first
    with pytest.raises(ModelLoadError, match=r"model\.pretrained: .*model\.ckpt' is a pickle checkpoint"):
        load_components(ModelConfig(pretrained=str(ckpt), single_file_config=str(config)))
    lora = tmp_path / "lora.safetensors"
    save_file({"unet.down_blocks.0.lora_A.weight": torch.zeros(2, 2)}, str(lora))
    with pytest.raises(ModelLoadError, match="no 'model.diffusion_model.\\*' keys.*--lora"):
        load_components(ModelConfig(pretrained=str(lora)))
    unet_only = tmp_path / "unet_only.safetensors"
    save_file({"model.diffusion_model.out.2.bias": torch.zeros(4)}, str(unet_only))
    with pytest.raises(ModelLoadError, match="no text encoder keys"):
        load_components(ModelConfig(pretrained=str(unet_only)))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(ModelLoadError, match="not a readable safetensors file"):
        load_components(ModelConfig(pretrained=str(garbage)))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_components(ModelConfig(pretrained=str(tmp_path / "missing.safetensors")))


def test_single_file_config_needs_a_single_file(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  pretrained: builtin:tiny-sd15\n  single_file_config: some/dir\n")
    with pytest.raises(ConfigError, match="model.single_file_config"):
        load_config(cfg)
    assert main(["generate", "--model", "builtin:toy", "--model-config", "x", "--prompts", "a", "--out", str(tmp_path / "o")]) == 2
    assert "--model-config applies to a single-file --model" in capsys.readouterr().err
