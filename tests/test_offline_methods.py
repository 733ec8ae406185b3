"""The offline methods of issue 11 on the seam (InPO, SmPO, RankDPO, dense): their reductions to Diffusion-DPO through
the real method classes, batches and models, and a few training steps of each toy recipe on the tiny SDXL."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from conftest import tiny_config, write_config

from diffalign.cli import main
from diffalign.config import DPOMethod, load_config
from diffalign.randomness import Draws
from diffalign.trainers.batch import build_batch
from diffalign.trainers.loop import PreferenceTrainer
from diffalign.trainers.methods import build_method
from diffalign.trainers.methods.dpo import DPO

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def demo_trainer(tmp_path_factory, demo_parquet):
    """A tiny SDXL LoRA trainer on the demo pairs (K = 2), its first batch and draws, with the adapters moved off zero."""
    tmp = tmp_path_factory.mktemp("methods")
    cfg = tiny_config(tmp, parquet=demo_parquet, data={"caption_dropout": 0.25})
    trainer = PreferenceTrainer(load_config(write_config(tmp / "cfg.yaml", cfg)))
    trainer.setup()
    with torch.no_grad():  # a policy that differs from the reference, so the margins are not all zero
        g = torch.Generator().manual_seed(0)
        for p in trainer.unet.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    raw = next(trainer.loader)
    ids = raw["item_id"].tolist()
    draws = Draws(0, 0, range(len(ids)), ids)
    return trainer, build_batch(raw, trainer.batch_rules, draws), draws


def _method(name: str, **fields):
    return build_method(load_config(None, [f"method.name={name}", *(f"method.{k}={v}" for k, v in fields.items())]).method)


def test_inpo_with_forward_noising_in_place_of_the_inversion_is_dpo(demo_trainer, monkeypatch):
    from diffalign.trainers.methods import inpo

    trainer, batch, draws = demo_trainer

    def forward_noised(models, batch, images, x0, t, draws, **kw):
        return models.schedule.add_noise(x0, batch.shared_noise(images.shape[1]), t).to(models.device)

    monkeypatch.setattr(inpo, "inverted_latents", forward_noised)
    loss, metrics = _method("inpo", beta=3000).loss(trainer.models, batch, draws)
    dpo_loss, dpo_metrics = DPO(DPOMethod(beta=3000)).loss(trainer.models, batch, draws)
    # τ back-solved from x_t is ε up to float32 rounding, amplified by 1/√(1−ᾱ_t) at small t: 1.7e-5 relative with torch
    # 2.14.1 here (1e-5 held under the library versions of earlier sessions); a wrong formula would differ by O(1)
    torch.testing.assert_close(loss, dpo_loss, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(metrics["reward_margin"], dpo_metrics["reward_margin"], rtol=1e-4, atol=1e-6)


def test_inpo_inverts_with_the_chosen_unet_and_trains(demo_trainer):
    trainer, batch, draws = demo_trainer
    loss, metrics = _method("inpo", inversion_steps=2).loss(trainer.models, batch, draws)
    assert torch.isfinite(loss) and loss.requires_grad
    again, _ = _method("inpo", inversion_steps=2).loss(trainer.models, batch, draws)
    assert torch.equal(loss.detach(), again.detach())  # the injected noise is counter-based
    other, _ = _method("inpo", inversion_steps=2, inversion_model="reference").loss(trainer.models, batch, draws)
    assert not torch.equal(loss.detach(), other.detach())


def test_a_reference_session_switches_the_adapters_off_once(demo_trainer, monkeypatch):
    """Inside `reference_session` (the inversion's many calls) the reference is the same prediction as a lone call's,
    the adapters go off and on once, and the policy is refused; the policy after it is the policy again."""
    from diffalign.trainers import models as models_module

    trainer, batch, _ = demo_trainer
    models, images = trainer.models, batch.all_images()
    x, t, cond = batch.x0(images), batch.timesteps(batch.k), batch.cond(images)
    alone, policy = models.reference(x, t, cond), models.policy(x, t, cond).detach()
    uses, real = [], models_module.adapters_disabled

    def counting(unet):
        uses.append(unet)
        return real(unet)

    monkeypatch.setattr(models_module, "adapters_disabled", counting)
    with models.reference_session():
        held = [models.reference(x, t, cond) for _ in range(3)]
        with pytest.raises(RuntimeError, match="reference_session"):
            models.policy(x, t, cond)
    assert len(uses) == 1 and all(torch.equal(h, alone) for h in held)
    assert not torch.equal(alone, policy) and torch.equal(models.policy(x, t, cond).detach(), policy)


def test_smpo_with_equal_rewards_has_loss_log2_and_no_gradient(demo_trainer):
    trainer, batch, draws = demo_trainer
    method = _method("smpo", inversion_steps=2, score_bounds="[0.0, 1.0]")
    loss, metrics = method.loss(trainer.models, replace(batch, scores=torch.full_like(batch.scores, 0.7)), draws)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7) and metrics["p"].item() == 0.5
    loss.backward()
    grads = [p.grad for p in trainer.unet.parameters() if p.requires_grad and p.grad is not None]
    assert all(torch.count_nonzero(g) == 0 for g in grads)
    trainer.optimizer.zero_grad(set_to_none=True)


def test_smpo_orders_the_pair_by_the_reward(demo_trainer):
    """label_source = reward: the higher-scored image is the winner whatever the data's pair says, so the loss is the
    same p with the reward on either image of the pair; with the human label p < ½ where the reward disagrees."""
    trainer, batch, draws = demo_trainer
    pair = batch.pair()
    rows = torch.arange(batch.size)
    first, second = batch.scores.clone(), batch.scores.clone()
    first[rows, pair.winner], first[rows, pair.loser] = 0.9, 0.1
    second[rows, pair.winner], second[rows, pair.loser] = 0.1, 0.9
    p = {}
    for source in ("reward", "human"):
        method = _method("smpo", inversion_steps=2, score_bounds="[0.0, 1.0]", label_source=source)
        for name, scores in (("first", first), ("second", second)):
            p[source, name] = method.loss(trainer.models, replace(batch, scores=scores), draws)[1]["p"].item()
    assert p["reward", "first"] == p["reward", "second"] > 0.5
    assert p["human", "first"] > 0.5 > p["human", "second"]


def test_rankdpo_on_pairs_is_the_dcg_weight_times_dpo(demo_trainer):
    """K = 2 with a hard pair: φ = (1, 0) from the ranks, Δ_12 = |2^1 - 2^0|·|1/log2(2) - 1/log2(3)|."""
    trainer, batch, draws = demo_trainer
    loss, _ = _method("rankdpo", beta=3000).loss(trainer.models, batch, draws)
    dpo, _ = DPO(DPOMethod(beta=3000)).loss(trainer.models, batch, draws)
    weight = 1.0 * (1 / math.log2(2) - 1 / math.log2(3))
    assert batch.pair_label.eq(1).all()
    torch.testing.assert_close(loss, weight * dpo, rtol=1e-5, atol=1e-7)


def test_dense_with_gamma_one_is_dpo(demo_trainer):
    trainer, batch, draws = demo_trainer
    loss, _ = _method("dense", beta=3000, gamma=1.0).loss(trainer.models, batch, draws)
    dpo, _ = DPO(DPOMethod(beta=3000)).loss(trainer.models, batch, draws)
    assert torch.equal(loss, dpo)
    weighted, _ = _method("dense", beta=3000, gamma=0.9).loss(trainer.models, batch, draws)
    assert not torch.equal(weighted, dpo)


def test_dense_sampled_redraws_t_from_its_own_stream(demo_trainer):
    trainer, batch, draws = demo_trainer
    a, _ = _method("dense", variant="sampled").loss(trainer.models, batch, draws)
    b, _ = _method("dense", variant="sampled").loss(trainer.models, batch, draws)
    plain, _ = _method("dense", variant="weighted", gamma=1.0, beta=5000).loss(trainer.models, batch, draws)
    assert torch.equal(a, b) and not torch.equal(a, plain)


def test_npo_is_the_dpo_loss_on_the_flipped_pair(demo_trainer):
    """Diffusion-NPO: -[p·log σ(-z) + (1-p)·log σ(z)] with z the DPO logit, written out from the per-image errors."""
    from diffalign.trainers.methods.denoising import denoising_errors

    trainer, batch, draws = demo_trainer
    loss, metrics = _method("npo", beta=3000).loss(trainer.models, batch, draws)
    pair = batch.pair()
    err = denoising_errors(trainer.models, batch, pair.images)
    (m_w, m_l), (r_w, r_l) = err.policy.unbind(1), err.reference.unbind(1)
    z = -1500.0 * ((m_w - r_w) - (m_l - r_l))
    p = pair.label.to(z)
    expected = -(p * torch.nn.functional.logsigmoid(-z) + (1 - p) * torch.nn.functional.logsigmoid(z)).mean()
    assert z.abs().min() > 1e-3  # the pairs are not ties under the model: flipping matters
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
    dpo_loss, _ = DPO(DPOMethod(beta=3000)).loss(trainer.models, batch, draws)
    assert not torch.isclose(loss, dpo_loss)
    torch.testing.assert_close(metrics["reward_margin"], z.mean(), rtol=1e-5, atol=1e-6)


def test_npo_refuses_to_be_unflipped():
    with pytest.raises(Exception, match="use method.name: dpo"):
        _method("npo", flip="false")


@pytest.mark.parametrize("name", ["inpo", "smpo", "rankdpo", "dense", "npo", "self_npo"])
def test_each_toy_recipe_trains_on_the_tiny_model(tmp_path_factory, name):
    tmp = tmp_path_factory.getbasetemp() / "toy-recipes"  # the pairwise ones share one small synthetic cache
    data = (["data.source.images_per_caption=1", "data.max_items=4", f"data.cache_dir={tmp / 'scenes'}"] if name == "self_npo"
            else ["data.source.num_prompts=4", "data.source.num_inference_steps=2", f"data.cache_dir={tmp / 'cache'}"])
    args = ["train", f"toy/{name}", "model.pretrained=builtin:tiny-sdxl", "model.lora.rank=2", "model.lora.alpha=2", *data,
            f"train.output_dir={tmp / name}", "train.max_steps=2", "train.batch_size=2", "train.checkpoint_every=1"]
    if name in ("inpo", "smpo"):
        args.append("method.inversion_steps=3")
    assert main(args) == 0
    assert (tmp / name / "final" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp / name / "checkpoints" / "step-00000002").is_dir()


def test_smpo_trains_on_pickapic_pairs_scored_by_pickscore_at_prepare(tmp_path, demo_parquet):
    """One config: Pick-a-Pic-format pairs, PickScore (tiny random weights in the official format) scores every image
    at prepare time beside the latents, SmPO orders each pair by it and normalises by the cache's range."""
    from tiny_scorers import write_clip_folder

    clip = write_clip_folder(tmp_path / "pickscore")
    cfg = tiny_config(tmp_path, parquet=demo_parquet, method={"name": "smpo", "beta": 2000.0, "inversion_steps": 2, "reward": "pickscore"},
                      data={"scores": ["pickscore"], "score_options": {"pickscore": {"path": str(clip)}}})
    cfg["train"].update(max_steps=2, checkpoint_every=0)
    assert main(["train", str(write_config(tmp_path / "smpo.yaml", cfg))]) == 0
    assert (tmp_path / "cache" / "scores" / "pickscore" / "summary.json").is_file()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["p"] > 0.5 for r in rows)  # ordered by the reward: p > ½
    assert (tmp_path / "run" / "final" / "pytorch_lora_weights.safetensors").is_file()
