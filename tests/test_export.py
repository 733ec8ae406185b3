"""What a run exports besides its weights: the kohya-layout LoRA (train.export_kohya) and the model card (final/README.md)."""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import tiny_config, write_config
from safetensors.torch import load_file

from diffalign.config import load_config
from diffalign.models.loading import build_pipeline, load_components
from diffalign.trainers.loop import train
from diffalign.trainers.model_card import base_licence

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def npo_run(tmp_path_factory, demo_parquet):
    """Two steps of NPO (LoRA rank 4, alpha 2: scale ½, so a wrong alpha shows) with the kohya export."""
    tmp = tmp_path_factory.mktemp("export")
    raw = tiny_config(tmp, parquet=demo_parquet)
    raw["model"]["lora"] = {"rank": 4, "alpha": 2.0}
    raw["method"] = {"name": "npo"}
    raw["train"].update(max_steps=2, export_kohya=True)
    cfg = load_config(write_config(tmp / "cfg.yaml", raw))
    return cfg, train(cfg).final_dir


def test_the_kohya_lora_has_kohya_keys_and_loads_to_the_same_model(npo_run):
    cfg, final = npo_run
    kohya = load_file(str(final / "lora_kohya.safetensors"))
    assert all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in kohya)
    assert "." not in next(iter(kohya)).split(".")[0][len("lora_unet_"):]  # module path with underscores
    assert {float(v) for k, v in kohya.items() if k.endswith(".alpha")} == {2.0}
    x, t = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0)), 500
    outputs = []
    for name in ("pytorch_lora_weights.safetensors", "lora_kohya.safetensors"):
        components = load_components(cfg.model)
        pipe = build_pipeline(components)
        pipe.load_lora_weights(str(final), weight_name=name)
        cond = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
        added = {"text_embeds": torch.zeros(1, pipe.text_encoder_2.config.projection_dim), "time_ids": torch.zeros(1, 6)}
        outputs.append(pipe.unet(x, t, encoder_hidden_states=cond, added_cond_kwargs=added).sample)
        base = load_components(cfg.model).unet(x, t, encoder_hidden_states=cond, added_cond_kwargs=added).sample
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(outputs[0], base, rtol=1e-5, atol=1e-6)  # the LoRA is not empty


def test_the_model_card_names_base_method_data_and_licence(npo_run):
    cfg, final = npo_run
    text = (final / "README.md").read_text()
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["base_model"] == "builtin:tiny-sdxl" and front["license"] == "apache-2.0" and "npo" in front["tags"]
    assert "Diffusion-NPO" in text and "**negative** model" in text and "--npo final" in text
    assert "pickapic (path: " in text and "rank 4, alpha 2.0" in text and "2 optimizer steps" in text


def test_the_licence_is_inherited_from_the_base(tmp_path):
    assert base_licence("stabilityai/stable-diffusion-xl-base-1.0") == "openrail++"
    assert base_licence("stable-diffusion-v1-5/stable-diffusion-v1-5") == "creativeml-openrail-m"
    (tmp_path / "README.md").write_text("---\nlicense: mit\ntags: [x]\n---\n# a model\n")
    assert base_licence(str(tmp_path)) == "mit"
    assert base_licence(str(tmp_path / "missing")) is None


def test_a_kohya_export_needs_a_lora_run():
    from diffalign.config import ConfigError

    with pytest.raises(ConfigError, match="export_kohya"):
        load_config(None, ["model.finetune=full", "train.export_kohya=true"])
