"""`load_trained_unet`: a run's exported weights on the base components reproduce the trained model exactly."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from diffalign.config import validate_config
from diffalign.models.loading import ModelLoadError, load_components
from diffalign.models.sampling import load_trained_unet, sample_images
from diffalign.trainers.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")


def _forward(unet, seed: int = 0) -> torch.Tensor:
    """One UNet prediction on fixed random SDXL inputs (latent, timesteps, text and pooled embeddings, time ids)."""
    g = torch.Generator().manual_seed(seed)
    c = unet.config
    pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    added = {"text_embeds": torch.randn(2, pooled, generator=g), "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)}
    with torch.no_grad():
        return unet(torch.randn(2, c.in_channels, 4, 4, generator=g), torch.tensor([900, 20]),
                    torch.randn(2, 77, c.cross_attention_dim, generator=g), added_cond_kwargs=added).sample


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_exported_weights_reproduce_the_trained_unet_and_leave_the_base_alone(tmp_path, demo_parquet, finetune):
    cfg = validate_config(tiny_config(tmp_path, parquet=demo_parquet, finetune=finetune, train={"max_steps": 2, "checkpoint_every": 0}))
    training = load_components(cfg.model)  # train() trains these in place: afterwards .unet is the in-memory trained model
    result = train(cfg, training)
    base = load_components(cfg.model)
    before = _forward(base.unet)

    loaded = load_trained_unet(base, result.final_dir)
    assert torch.equal(_forward(loaded), _forward(training.unet.eval()))  # bit for bit, not merely close
    assert not torch.equal(_forward(loaded), before) and not loaded.training
    trainable = {n for n, p in training.unet.named_parameters() if p.requires_grad}  # CPU kernels depend on it (3-D Linear)
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == trainable
    assert torch.equal(_forward(base.unet), before) and not getattr(base.unet, "peft_config", None)  # the base is untouched

    prompts, seeds = ["a red circle on a white background"] * 2, [1, 2]
    ours = sample_images(base, prompts, seeds, unet=loaded, num_inference_steps=2)
    theirs = sample_images(training, prompts, seeds, unet=training.unet, num_inference_steps=2)
    assert [im.tobytes() for im in ours] == [im.tobytes() for im in theirs]


def test_refuses_a_directory_without_weights_or_from_another_base(tmp_path):
    base = load_components(validate_config({"model": {"pretrained": "builtin:tiny-sdxl"}}).model)
    (tmp_path / "config.yaml").write_text("model:\n  pretrained: builtin:tiny-sdxl\n")
    with pytest.raises(ModelLoadError, match="no trained weights"):
        load_trained_unet(base, tmp_path)
    (tmp_path / "config.yaml").write_text("model:\n  pretrained: builtin:tiny-sd15\n")
    with pytest.raises(ModelLoadError, match="trained from model.pretrained='builtin:tiny-sd15'"):
        load_trained_unet(base, tmp_path)
