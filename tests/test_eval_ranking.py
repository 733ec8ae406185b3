"""Ranking diagnostics (`diffalign eval ranking`) and the evaluation-only preference cache of held-out captions."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from conftest import tiny_config, write_config

from diffalign.cli import main
from diffalign.config import ConfigError, load_config, validate_config
from diffalign.data import DataError, LatentPairDataset, check_cache
from diffalign.data.sources import open_source
from diffalign.data.sources.synthetic import resolve_prompts
from diffalign.diffusion import add_noise, sample_posterior
from diffalign.eval.ranking import (
    DRAW_KEY,
    bootstrap_resamples,
    evaluate_ranking,
    evaluation_models,
    pair_bootstrap,
    ranking_errors,
    ranking_outcomes,
    reward_outcomes,
    summarize,
    timestep_buckets,
)
from diffalign.models.loading import load_components
from diffalign.randomness import item_generator, seed63
from diffalign.toy.scenes import HELD_OUT, TRAIN

pytestmark = pytest.mark.usefixtures("one_thread")

# ------------------------------------------------------------------------------------ the statistics, by hand

# 3 pairs x 4 draws of fixed errors (e_theta, e_ref of winner and loser) and timesteps in [0, 10)
E_W = np.array([[1.0, 2.0, 3.0, 0.5], [0.2, 0.2, 0.9, 0.4], [5.0, 1.0, 1.0, 2.0]])
E_L = np.array([[2.0, 2.0, 1.0, 0.6], [0.1, 0.3, 0.9, 0.8], [4.0, 3.0, 0.5, 2.5]])
R_W = np.array([[1.5, 1.0, 3.0, 0.5], [0.1, 0.2, 1.0, 0.4], [5.0, 1.0, 1.0, 1.0]])
R_L = np.array([[2.0, 2.5, 1.0, 0.7], [0.1, 0.1, 0.8, 0.8], [3.0, 3.0, 0.5, 2.5]])
T = np.array([[0, 3, 4, 9], [6, 7, 3, 2], [9, 9, 0, 5]])


def test_accuracies_and_ties_by_hand():
    # ranking: 1[e_w < e_l], ½ on a tie
    assert ranking_outcomes(E_W, E_L).tolist() == [[1, 0.5, 0, 1], [0, 1, 0.5, 1], [0, 1, 0, 1]]
    # reward: d = e - r;  pair 0: d_w = [-.5, 1, 0, 0], d_l = [0, -.5, 0, -.1]
    #                     pair 1: d_w = [.1, 0, -.1, 0], d_l = [0, .2, .1, 0]
    #                     pair 2: d_w = [0, 0, 0, 1],    d_l = [1, 0, 0, 0]
    assert reward_outcomes(E_W, E_L, R_W, R_L).tolist() == [[1, 0, 0.5, 0], [0, 1, 1, 0.5], [1, 0.5, 0.5, 0]]
    # theta = ref: every difference is 0, every draw a tie
    assert (reward_outcomes(E_W, E_L, E_W, E_L) == 0.5).all()


def test_timestep_buckets_by_hand():
    # 3 equal buckets of [0, 10): [0, 3.33) [3.33, 6.67) [6.67, 10)
    assert timestep_buckets(np.arange(10), 10, 3).tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        timestep_buckets(np.array([10]), 10, 3)


def test_pair_bootstrap_by_hand():
    outcomes = np.array([[1.0, 0.0], [1.0, 1.0], [0.5, 0.0]])  # pair sums 1, 2, 0.5 over 2 draws each
    resamples = np.array([[0, 0, 0], [1, 2, 2], [0, 1, 2]])  # ratios 3/6, 3/6, 3.5/6
    est = pair_bootstrap(outcomes, resamples=resamples)
    assert est.value == pytest.approx(3.5 / 6) and (est.draws, est.pairs) == (6, 3)
    # percentiles of [0.5, 0.5, 3.5/6] with linear interpolation: 2.5% -> 0.5, 97.5% -> 0.5 + 0.95 * (3.5/6 - 0.5)
    assert est.ci_low == pytest.approx(0.5) and est.ci_high == pytest.approx(0.5 + 0.95 * (3.5 / 6 - 0.5))
    # masked: only draws (0,0), (1,1), (2,0) count; pair 0 sum 1 / 1, pair 1 sum 1 / 1, pair 2 sum 0.5 / 1
    mask = np.array([[True, False], [False, True], [True, False]])
    est = pair_bootstrap(outcomes, mask, resamples=resamples)
    assert est.value == pytest.approx(2.5 / 3) and (est.draws, est.pairs) == (3, 3)
    # resample ratios 3/3, 2/3, 2.5/3
    assert est.ci_low == pytest.approx(2 / 3 + 0.05 * (2.5 / 3 - 2 / 3))
    assert est.ci_high == pytest.approx(2.5 / 3 + 0.95 * (1 - 2.5 / 3))
    empty = pair_bootstrap(outcomes, np.zeros_like(mask), resamples=resamples)
    assert empty.value is None and empty.draws == 0


def test_summarize_overall_and_buckets_by_hand():
    errors = {"e_w": E_W, "e_l": E_L, "r_w": R_W, "r_l": R_L, "t": T}
    ranking, reward, buckets = summarize(errors, 10, buckets=3, n_boot=50, seed=0)
    assert ranking.value == pytest.approx((2.5 + 2.5 + 2) / 12) and reward.value == pytest.approx((1.5 + 2.5 + 2) / 12)
    assert [(b.t_low, b.t_high) for b in buckets] == [(0, 4), (4, 7), (7, 10)]
    # bucket 0 (t < 3.33): draws (0,0) (0,1) (1,2) (1,3) (2,2); ranking 1, .5, .5, 1, 0; reward 1, 0, 1, .5, .5
    assert buckets[0].ranking.draws == 5 and buckets[0].ranking.value == pytest.approx(3 / 5)
    assert buckets[0].reward.value == pytest.approx(3 / 5)
    # bucket 2 (t >= 6.67): draws (0,3) (1,1) (2,0) (2,1); ranking 1, 1, 0, 1; reward 0, 1, 1, .5
    assert buckets[2].ranking.value == pytest.approx(3 / 4) and buckets[2].reward.value == pytest.approx(2.5 / 4)
    assert buckets[2].ranking.pairs == 3
    resamples = bootstrap_resamples(3, 50, 0)
    assert resamples.shape == (50, 3) and (bootstrap_resamples(3, 50, 0) == resamples).all()


# ------------------------------------------------------------------------------------ held-out evaluation cache

HELD = [spec.caption for spec in HELD_OUT[:4]]


def _heldout_raw(tmp, evaluation_only=True, prompts=None) -> dict:
    source = {"kind": "synthetic", "evaluation_only": evaluation_only, "prompts": prompts or HELD, "images_per_prompt": 3,
              "num_inference_steps": 2, "scorers": ["toy-checklist"]}
    return {"model": {"pretrained": "builtin:tiny-sdxl"},
            "data": {"source": source, "cache_dir": str(tmp / "heldout_cache"), "resolution": 32, "latent_dtype": "float32"},
            "train": {"output_dir": str(tmp / "heldout_run"), "max_steps": 1, "batch_size": 2},
            "log": {"tracker": "none", "progress": False}}


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    """An evaluation-only cache of 4 held-out captions x K = 3 on the tiny SDXL, built through the CLI."""
    tmp = tmp_path_factory.mktemp("heldout")
    path = write_config(tmp / "heldout.yaml", _heldout_raw(tmp))
    assert main(["prepare", str(path)]) == 0
    return path


def test_held_out_prompts_need_the_opt_in():
    with pytest.raises(ConfigError, match="evaluation_only"):
        validate_config({"data": {"source": {"kind": "synthetic", "prompts": "toy-held-out"}}})
    cfg = validate_config({"data": {"source": {"kind": "synthetic", "prompts": "toy-held-out", "evaluation_only": True}}})
    assert resolve_prompts(cfg.data.source) == [spec.caption for spec in HELD_OUT]
    listed = validate_config({"data": {"source": {"kind": "synthetic", "prompts": HELD}}})
    with pytest.raises(ConfigError, match="held-out"):
        open_source(listed.data.source, listed)
    listed.data.source.evaluation_only = True
    assert open_source(listed.data.source, listed).count() == len(HELD)


def test_evaluation_only_changes_the_source_digest_and_only_then_is_described():
    train = [spec.caption for spec in TRAIN[:2]]
    plain = validate_config({"data": {"source": {"kind": "synthetic", "prompts": train}}})
    marked = validate_config({"data": {"source": {"kind": "synthetic", "prompts": train, "evaluation_only": True}}})
    a, b = open_source(plain.data.source, plain), open_source(marked.data.source, marked)
    assert "evaluation_only" not in a.describe() and b.describe()["evaluation_only"] is True
    assert a.digest() != b.digest()


def test_the_held_out_cache_is_marked(heldout):
    cfg = load_config(heldout)
    manifest = check_cache(cfg)
    assert manifest["evaluation_only"] is True and manifest["identity"]["data.source.evaluation_only"] is True
    assert manifest["counts"]["items"] == len(HELD)
    # the same cache asked for by a config that is not evaluation-only (same captions): refused by name
    plain = validate_config({**_heldout_raw(heldout.parent, evaluation_only=False)})
    with pytest.raises(DataError, match=re.escape(f"the cache at {heldout.parent / 'heldout_cache'} is evaluation-only")):
        check_cache(plain)


def test_training_refuses_the_evaluation_only_cache(heldout, capsys):
    assert main(["train", str(heldout)]) == 2
    err = capsys.readouterr().err
    assert "is evaluation-only" in err and str(heldout.parent / "heldout_cache") in err and "may never become training data" in err
    assert not (heldout.parent / "heldout_run" / "final").exists()


# ------------------------------------------------------------------------------------ on the tiny model


def test_reward_accuracy_is_exactly_half_at_theta_equal_ref(heldout):
    result = evaluate_ranking(load_config(heldout), None, draws=4, buckets=5, n_boot=200, batch_size=3)
    assert result.reward.value == 0.5 and (result.reward.ci_low, result.reward.ci_high) == (0.5, 0.5)
    assert all(b.reward.value == 0.5 for b in result.buckets if b.reward.draws)
    assert result.pairs == len(HELD) and result.ranking.draws == 4 * len(HELD) and sum(b.ranking.draws for b in result.buckets) == 16
    assert 0.0 <= result.ranking.value <= 1.0 and result.policy == "base"


def test_draws_are_keyed_by_item_and_draw_and_errors_match_a_hand_forward(heldout):
    cfg = load_config(heldout)
    components = load_components(cfg.model)
    dataset = LatentPairDataset(cfg.data.cache_dir, cfg.data)
    m = evaluation_models(components)
    one, _ = ranking_errors(m.models, components, dataset, draws=2, seed=3, batch_size=1, theta_is_reference=True)
    four, _ = ranking_errors(m.models, components, dataset, draws=2, seed=3, batch_size=4, theta_is_reference=True)
    for k in one:
        np.testing.assert_allclose(one[k], four[k], rtol=1e-5, atol=1e-7)
    # item 2, draw 1, by hand: generators keyed (seed63('diffalign-ranking\0<seed>'), draw, slot 0, item id, stream)
    item = dataset[2]
    key, iid, d = seed63(f"{DRAW_KEY}\0{3}"), int(item["item_id"]), 1
    post = torch.randn(item["mean"].shape, generator=item_generator(key, d, 0, iid, "latent"))
    t = torch.randint(0, 1000, (1,), generator=item_generator(key, d, 0, iid, "timestep"))
    noise = torch.randn(item["mean"].shape[1:], generator=item_generator(key, d, 0, iid, "noise"))
    assert one["t"][2, d] == int(t) and components.prediction_type == "epsilon"  # the target is ε
    scale = components.vae.config.scaling_factor
    for slot, name in zip(item["pair"].tolist(), ("e_w", "e_l")):
        x0 = sample_posterior(item["mean"][slot], item["logvar"][slot], post[slot])[None] * scale
        x_t = add_noise(x0, noise[None], t, components.scheduler.alphas_cumprod.float())
        kw = {"text_embeds": item["pooled"][None], "time_ids": item["time_ids"][slot][None]}
        with torch.no_grad():
            pred = components.unet(x_t, t, encoder_hidden_states=item["prompt_embeds"][None], added_cond_kwargs=kw).sample
        assert one[name][2, d] == pytest.approx(float(((pred - noise[None]) ** 2).mean()), rel=1e-4)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_parquet):
    """Two tiny SDXL runs on the demo pairs: LoRA and full UNet, 2 steps each."""
    tmp = tmp_path_factory.mktemp("ranking_runs")
    finals = {}
    for finetune in ("lora", "full"):
        cfg = tiny_config(tmp / finetune, parquet=demo_parquet, finetune=finetune, optim={"lr": 1e-2 if finetune == "lora" else 1e-3},
                          data={"cache_dir": str(tmp / "cache")},
                          train={"output_dir": str(tmp / finetune / "run"), "max_steps": 2, "batch_size": 2, "checkpoint_every": 0})
        assert main(["train", str(write_config(tmp / f"{finetune}.yaml", cfg))]) == 0
        finals[finetune] = tmp / finetune / "run" / "final"
    return finals


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_the_reference_of_a_trained_output_is_the_base_model(heldout, trained, finetune):
    cfg = load_config(heldout)
    dataset = LatentPairDataset(cfg.data.cache_dir, cfg.data)
    base_components = load_components(cfg.model)
    b = evaluation_models(base_components)
    base, _ = ranking_errors(b.models, base_components, dataset, draws=2, theta_is_reference=True)
    components = load_components(cfg.model)
    m = evaluation_models(components, trained[finetune])
    assert m.reference == ("the same UNet, adapters disabled" if finetune == "lora" else "the base UNet")
    got, _ = ranking_errors(m.models, components, dataset, draws=2)
    np.testing.assert_allclose(got["r_w"], base["e_w"], rtol=1e-5)
    np.testing.assert_allclose(got["r_l"], base["e_l"], rtol=1e-5)
    assert not np.allclose(got["e_w"], base["e_w"], rtol=1e-6, atol=0)  # θ moved


def test_cli_runs_end_to_end_and_writes_json(heldout, trained, tmp_path, capsys):
    out = tmp_path / "ranking.json"
    args = ["eval", "ranking", str(heldout), "--weights", str(trained["lora"]), "--draws", "3", "--buckets", "4", "--bootstrap", "100",
            "--batch-size", "2", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| all | 12 |" in printed and "[750, 1000)" in printed and f"wrote {out}" in printed
    report = json.loads(out.read_text())
    assert report["pairs"] == len(HELD) and report["draws_per_pair"] == 3 and len(report["buckets"]) == 4
    assert report["evaluation_only_cache"] is True and report["weights"] == str(trained["lora"]) and report["config"] == str(heldout)
    for name in ("ranking_accuracy", "reward_accuracy"):
        est = report[name]
        assert 0 <= est["ci_low"] <= est["value"] <= est["ci_high"] <= 1 and est["draws"] == 12
    assert main(["eval", "ranking", str(heldout), "--draws", "0"]) == 2
    assert "--draws must be at least 1" in capsys.readouterr().err
