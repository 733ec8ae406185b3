"""The method seam: one table of names on each side, the real preference signal in the batch (soft labels,
score ties), K images of an item in one batched forward, and a loop that builds only what a method needs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffalign.config import METHOD_CONFIGS, Config, validate_config
from diffalign.data import LatentPairDataset, prepare_cache
from diffalign.models.loading import load_components
from diffalign.objectives import dpo_loss
from diffalign.randomness import Draws
from diffalign.trainers.batch import BatchRules, build_batch
from diffalign.trainers.methods import METHODS, build_method
from diffalign.trainers.methods.denoising import denoising_errors
from diffalign.trainers.models import Schedule

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_two_method_tables_hold_the_same_names():
    assert set(METHODS) == set(METHOD_CONFIGS)
    for name, cls in METHODS.items():
        assert cls.name == name and METHOD_CONFIGS[name].model_fields["name"].default == name
        assert isinstance(build_method(METHOD_CONFIGS[name]()), cls)
    # the config's union and its help, the CLI's help and the recipe checks derive from the table
    assert set(Config.model_fields["method"].description.split("`name`: ")[1].rstrip(").").split(", ")) == set(METHOD_CONFIGS)
    from diffalign.cli import build_parser

    assert ", ".join(METHOD_CONFIGS) in build_parser()._subparsers._group_actions[0].choices["train"].description


@pytest.mark.parametrize("name", list(METHOD_CONFIGS))
def test_every_method_has_a_toy_recipe_the_bench_can_train(name):
    from diffalign.config import load_config

    assert load_config(f"toy/{name}").method.name == name


# ------------------------------------------------------------------------------ the preference signal in the data


@pytest.fixture(scope="module")
def folder_cache(tmp_path_factory):
    """A folder source with a soft label (0.7), a flipped soft label (0.3), a scored tie and a clear scored pair."""
    root = tmp_path_factory.mktemp("folder")
    for name, colour in (("r.png", (200, 30, 30)), ("g.png", (30, 200, 30)), ("b.png", (30, 30, 200))):
        Image.new("RGB", (32, 32), colour).save(root / name)
    lines = [
        {"caption": "a red circle on a white background", "images": ["r.png", "g.png"], "label": 0.7},
        {"caption": "a green circle on a white background", "images": ["r.png", "g.png"], "label": 0.3},
        {"caption": "a blue circle on a white background", "images": ["b.png", "g.png"], "scores": [1.5, 1.5]},
        {"caption": "a blue square on a white background", "images": ["b.png", "r.png"], "scores": [0.2, 2.0]},
    ]
    (root / "prefs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    raw = {"model": {"pretrained": "builtin:tiny-sdxl"},
           "data": {"source": {"kind": "folder", "root": str(root), "jsonl": "prefs.jsonl"}, "cache_dir": str(root / "cache"),
                    "resolution": 32, "latent_dtype": "float32", "random_flip": False}}
    components = load_components(validate_config(raw).model)
    prepare_cache(validate_config(raw), components, progress=False)
    return raw, components


def _dataset(raw, **data):
    cfg = validate_config({**raw, "data": {**raw["data"], **data}})
    return LatentPairDataset(cfg.data.cache_dir, cfg.data)


def test_soft_labels_are_kept_and_score_ties_follow_data_ties(folder_cache):
    raw, _ = folder_cache
    dropped = _dataset(raw)  # ties: drop (the default) drops the scored tie too, not only label 0.5
    assert len(dropped) == 3
    items = [dropped[i] for i in range(3)]
    assert [it["pair"].tolist() for it in items] == [[0, 1], [1, 0], [1, 0]]
    assert [round(float(it["pair_label"]), 6) for it in items] == [0.7, 0.7, 1.0]
    assert float(items[0]["label"]) == pytest.approx(0.7)  # the item's own label travels unchanged
    kept = _dataset(raw, ties="keep")
    assert len(kept) == 4
    tie = kept[2]
    assert tie["pair"].tolist() == [0, 1] and float(tie["pair_label"]) == 0.5 and torch.isnan(tie["label"])


class _ToyModels:
    """A stand-in `Models`: the policy scales x_t by a parameter, the reference by a constant; counts forwards."""

    def __init__(self, schedule):
        self.schedule, self.device, self.dtype = schedule, torch.device("cpu"), torch.float32
        self.w = torch.nn.Parameter(torch.tensor(0.8))
        self.rows = []

    def policy(self, x_t, t, cond):
        self.rows.append(len(x_t))
        return self.w * x_t + 0.01 * cond.prompt_embeds.mean()

    @torch.no_grad()
    def reference(self, x_t, t, cond):
        return 0.5 * x_t


def _batch(dataset, components, indices, step=3):
    raw = torch.utils.data.default_collate([dataset[i] for i in indices])
    rules = BatchRules(1000, components.vae.config.scaling_factor, dataset.empty_prompt_embeds, dataset.empty_pooled, 0.0)
    draws = Draws(0, step, range(len(indices)), raw["item_id"].tolist())
    return build_batch(raw, rules, draws), draws


def test_an_item_labelled_0_7_trains_with_exactly_the_soft_dpo_loss(folder_cache):
    raw, components = folder_cache
    dataset = _dataset(raw)
    batch, draws = _batch(dataset, components, [0, 1])
    schedule = Schedule(components.scheduler.alphas_cumprod.float(), "epsilon")
    models = _ToyModels(schedule)
    loss, metrics = build_method(METHOD_CONFIGS["dpo"](beta=5000.0)).loss(models, batch, draws)

    # by hand: x_t = √ᾱ x0 + √(1-ᾱ) ε for winner and loser with the item's shared t and ε, errors against ε
    a = schedule.alphas_cumprod[batch.t].view(-1, 1, 1, 1)
    rows = torch.arange(2)

    def errors(slot, fn):
        z = batch.mean[rows, slot] + torch.exp(0.5 * batch.logvar[rows, slot]) * batch.posterior_noise[rows, slot]
        x_t = a.sqrt() * z * batch.scaling_factor + (1 - a).sqrt() * batch.noise
        return ((fn(x_t, batch.prompt_embeds) - batch.noise) ** 2).mean(dim=(1, 2, 3))

    policy = lambda x, p: models.w * x + 0.01 * p.mean()  # noqa: E731
    w, lose = batch.pair().winner, batch.pair().loser
    assert w.tolist() == [0, 1]  # label 0.3 puts images[1] in the winner slot with P = 0.7
    m_w, m_l = errors(w, policy), errors(lose, policy)
    r_w, r_l = errors(w, lambda x, p: 0.5 * x), errors(lose, lambda x, p: 0.5 * x)
    z = -0.5 * 5000.0 * ((m_w - m_l) - (r_w - r_l))
    expected = -(0.7 * F.logsigmoid(z) + 0.3 * F.logsigmoid(-z)).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, dpo_loss(m_w, m_l, r_w, r_l, 5000.0, torch.tensor([0.7, 0.7])).loss, rtol=1e-5, atol=1e-6)
    assert models.rows == [4] and set(metrics) >= {"loss", "implicit_acc", "reward_margin"}


def test_a_k4_batch_gives_per_image_errors_in_one_forward(tmp_path):
    """All K images of each item through one batched forward: errors of shape (B, K), as RankDPO needs."""
    B, K = 3, 4
    g = torch.Generator().manual_seed(0)
    raw = {"item_id": torch.arange(B), "mean": torch.randn(B, K, 4, 8, 8, generator=g), "logvar": torch.full((B, K, 4, 8, 8), -3.0),
           "prompt_embeds": torch.randn(B, 7, 16, generator=g), "label": torch.full((B,), float("nan")),
           "ranks": torch.tensor([[0, 1, 2, 3]] * B), "scores": torch.rand(B, K, generator=g), "pair": torch.tensor([[0, 3]] * B),
           "pair_label": torch.ones(B), "time_ids": torch.zeros(B, K, 6)}
    rules = BatchRules(1000, 0.13, torch.zeros(7, 16), None, 0.0)
    draws = Draws(0, 0, range(B), list(range(B)))
    batch = build_batch(raw, rules, draws)
    models = _ToyModels(Schedule(torch.linspace(0.999, 0.01, 1000), "epsilon"))
    err = denoising_errors(models, batch, batch.all_images())
    assert err.policy.shape == err.reference.shape == (B, K) and models.rows == [B * K]
    # column k of item b is image k of item b: the same as asking for that image alone
    alone = denoising_errors(models, batch, torch.full((B, 1), 2)).policy[:, 0]
    torch.testing.assert_close(err.policy[:, 2], alone)
    assert err.policy.requires_grad and not err.reference.requires_grad


def test_phi_is_recomputed_from_raw_scores_with_either_tie_rule(tmp_path, monkeypatch):
    from diffalign.data.sources.synthetic import SyntheticGenerator
    from diffalign.rewards import phi

    real = SyntheticGenerator.score
    # coarse raw scores (one decimal), so images tie and the two tie rules differ
    monkeypatch.setattr(SyntheticGenerator, "score", lambda self, *a: {k: [round(v, 1) for v in vs] for k, vs in real(self, *a).items()})
    cfg = {"model": {"pretrained": "builtin:tiny-sdxl"},
           "data": {"source": {"kind": "synthetic", "prompts": "toy-train", "num_prompts": 6, "images_per_prompt": 3,
                               "num_inference_steps": 1},
                    "cache_dir": str(tmp_path / "cache"), "resolution": 32, "latent_dtype": "float32"}}
    prepare_cache(validate_config(cfg), progress=False)
    half = _dataset(cfg, ties="keep")
    strict = _dataset(cfg, ties="keep", phi_ties="strict")
    raw = np.stack([half.extra_scores["toy-checklist"].astype(np.float64)])
    np.testing.assert_array_equal(half._scores, phi(raw, ties="half").astype(np.float32))
    np.testing.assert_array_equal(strict._scores, phi(raw, ties="strict").astype(np.float32))
    assert np.allclose(half._scores.sum(1), 1.5)  # K/2 under half ties
    assert not np.array_equal(half._scores, strict._scores)  # these images tie, so the option acts
