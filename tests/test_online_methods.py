"""Online methods (`pref_grpo`, `grpo`): the policy loss and KL by hand, advantages of whole groups, `diffalign train`
from every recipe on the tiny models, and exact resume inside and across rollout rounds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from diffalign.cli import main
from diffalign.config import load_config
from diffalign.io import load_safetensors
from diffalign.objectives.grpo import clipped_policy_loss, gaussian_mean_kl
from diffalign.scorers.checklist import Checklist, ChecklistScorer, Question
from diffalign.trainers.methods import build_method

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------ the objective


def test_clipped_policy_loss_by_hand():
    logp, old = torch.tensor([0.0, 0.1, -0.1]), torch.zeros(3)
    adv, eps = torch.tensor([1.0, 1.0, -2.0]), 0.05
    loss, metrics = clipped_policy_loss(logp, old, adv, eps)
    # r = 1: −A; r = e^0.1 > 1.05 with A > 0: the clipped −1.05 is larger; r = e^−0.1 < 0.95 with A < 0: 2·0.95 > 2·e^−0.1
    assert loss.tolist() == pytest.approx([-1.0, -1.05, 1.9])
    assert metrics["clipfrac"].item() == pytest.approx(2 / 3)
    assert metrics["ratio"].item() == pytest.approx((1 + math.exp(0.1) + math.exp(-0.1)) / 3)
    assert metrics["approx_kl"].item() == pytest.approx(0.5 * (0.01 + 0.01) / 3)
    logp = torch.tensor([0.1], requires_grad=True)  # the gradient stops where the clip binds
    clipped_policy_loss(logp, torch.zeros(1), torch.ones(1), eps)[0].sum().backward()
    assert logp.grad.item() == 0.0


def test_gaussian_mean_kl_by_hand():
    mean, ref = torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2)
    assert gaussian_mean_kl(mean, ref, torch.tensor([0.5])).item() == pytest.approx((1 + 4) / 2 / (2 * 0.25))


def test_listmle_by_hand():
    from diffalign.objectives.dense import dense_online_logits, listmle_loss

    pair = torch.tensor([[0.7, -0.2]])
    assert listmle_loss(pair).item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.9))))  # −log σ(ℓ_w − ℓ_l)
    a, b, c = 1.0, 0.5, -1.0  # Plackett–Luce: P(a, b, c) = e^a/(e^a+e^b+e^c) · e^b/(e^b+e^c)
    p = math.exp(a) / (math.exp(a) + math.exp(b) + math.exp(c)) * math.exp(b) / (math.exp(b) + math.exp(c))
    assert listmle_loss(torch.tensor([[a, b, c]])).item() == pytest.approx(-math.log(p))
    ratios = torch.tensor([[3e-4, -1e-5, 5e-5]])  # clamped to ±1e-4, averaged over K = 3, times τ = 10
    assert dense_online_logits(ratios, 1e-4, 10.0).item() == pytest.approx(10 * (1e-4 - 1e-5 + 5e-5) / 3)


# ------------------------------------------------------------------------------------------------ advantages


class _Answers:
    def __init__(self, table):
        self.table = torch.tensor(table)

    def answer(self, images, prompts, questions):
        return self.table[images.long().flatten()]


def test_pref_grpo_advantages_from_question_votes_by_hand():
    """Two groups of 3: the win-rates (votes), the group advantages (unbiased std) and the judge's mean score."""
    checklist = Checklist("three", (Question("big", "?", "alignment", 0.6), Question("a", "?", "quality", 0.2),
                                    Question("b", "?", "quality", 0.2)))
    answers = [[0.9, 0.1, 0.1], [0.1, 0.9, 0.9], [0.1, 0.1, 0.1]] * 2
    scorers = {"three": ChecklistScorer("three", checklist, _Answers(answers))}
    cfg = load_config("toy/pref_grpo", ["method.judge=three", "method.judge_mode=votes"]).method
    images = torch.arange(6).float().reshape(6, 1, 1, 1)  # stand-ins: the backend looks answers up by index
    adv, metrics = build_method(cfg).advantages(scorers, images, ["p"] * 6, torch.tensor([0, 0, 0, 1, 1, 1]))
    # votes: image 1 beats 0 (2 questions to 1) and 2; image 0 beats 2 -> WR = [½, 1, 0]: (WR − ½)/(½ + 1e-8)
    assert adv.tolist() == pytest.approx([0.0, 1.0, -1.0, 0.0, 1.0, -1.0], abs=1e-6)
    assert metrics["reward"].item() == pytest.approx((0.16 - 0.16 - 0.8) / 3, abs=1e-6)  # the checklist's own mean score
    assert metrics["win_rate_std"].item() == pytest.approx(0.5)
    # method.std_normalize false: WR − ½
    plain = build_method(load_config("toy/pref_grpo", ["method.judge=three", "method.judge_mode=votes", "method.std_normalize=false"]).method)
    adv, _ = plain.advantages(scorers, images, ["p"] * 6, torch.tensor([0, 0, 0, 1, 1, 1]))
    assert adv.tolist() == pytest.approx([0.0, 0.5, -0.5, 0.0, 0.5, -0.5], abs=1e-6)


def test_grpo_advantages_are_group_normalised_scores():
    checklist = Checklist("one", (Question("q", "?", "alignment", 1.0),))
    # a = 2p − 1: scores [0, ½, 1] (mean ½, std ½) and [−1, 0, 1] (mean 0, std 1)
    scorers = {"one": ChecklistScorer("one", checklist, _Answers([[0.5], [0.75], [1.0], [0.0], [0.5], [1.0]]))}
    method = build_method(load_config("toy/grpo", ["method.rewards={one: 1.0}"]).method)
    images = torch.arange(6).float().reshape(6, 1, 1, 1)
    adv, metrics = method.advantages(scorers, images, ["p"] * 6, torch.tensor([0, 0, 0, 1, 1, 1]))
    assert adv.tolist() == pytest.approx([-1.0, 0.0, 1.0, -1.0, 0.0, 1.0], abs=1e-6)
    assert metrics["reward"].item() == pytest.approx(0.25)
    with pytest.raises(ValueError, match="group 1 has 1 image"):
        method.advantages(scorers, images[:4], ["p"] * 4, torch.tensor([0, 0, 0, 1]))
    # method.std_normalize false (Dr. GRPO): the centred scores themselves
    plain = build_method(load_config("toy/grpo", ["method.rewards={one: 1.0}", "method.std_normalize=false"]).method)
    adv, _ = plain.advantages(scorers, images, ["p"] * 6, torch.tensor([0, 0, 0, 1, 1, 1]))
    assert adv.tolist() == pytest.approx([-0.5, 0.0, 0.5, -1.0, 0.0, 1.0], abs=1e-6)


# ------------------------------------------------------------------------------------------------ training

SMALL = ["method.group_size=4", "method.groups_per_round=2", "method.sampling_steps=4", "train.batch_size=4",
         "train.grad_accum=1", "log.tracker=none", "log.progress=false", "train.mixed_precision=no", "train.checkpoint_every=0"]
TINY = {"sd15": "builtin:tiny-sd15", "sdxl": "builtin:tiny-sdxl"}


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", ["sd15_pref_grpo", "sdxl_pref_grpo", "sd15_grpo", "sdxl_grpo", "sd15_dense_online", "sd15_tailorpo",
                                  "sdxl_dense_online", "sdxl_tailorpo", "toy/pref_grpo", "toy/grpo", "toy/dense_online", "toy/tailorpo"])
def test_online_recipe_trains_on_the_tiny_model(name, tmp_path):
    recipe = load_config(name)
    args = [*SMALL, "train.max_steps=2", f"train.output_dir={tmp_path / 'run'}", "data.source.prompts=toy-train",
            "data.resolution=32", "model.gradient_checkpointing=false"]
    if not name.startswith("toy/"):  # the tiny model of the family; the toy checklist stands in for the reward models
        args += [f"model.pretrained={TINY[name[:4]]}", "model.vae=null", "model.vae_fp16_safe=false"]
        args += {"pref_grpo": ["method.judge=toy-checklist"], "tailorpo": ["method.reward=toy-checklist"]}.get(
            recipe.method.name, ["method.rewards={toy-checklist: 1.0}"])
    if recipe.method.name == "dense_online":  # 2 prompts x 4 rollouts, 2 kept; 2 updates per collection
        args += ["method.keep=2", "method.groups_per_round=2", "method.updates_per_round=2", "train.batch_size=2", "model.lora.rank=4"]
    if recipe.method.name == "tailorpo":  # no groups: 8 trajectories per round = 2 steps of 4
        args += ["method.group_size=1", "method.groups_per_round=8"]
    cfg = load_config(name, args)
    assert main(["train", name, *args]) == 0
    rows = _rows(Path(cfg.train.output_dir))
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in rows)
    if recipe.method.name in ("dense_online", "tailorpo"):  # at the start the policy is the initial model: log-ratios 0
        assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    else:
        assert rows[0]["ratio"] == pytest.approx(1.0, abs=1e-5)  # on-policy at a round's first step; later steps drift
    assert "reward" in rows[0] and "reward" not in rows[1]  # a round of 2 groups × 4 trajectories = 2 steps of 4
    assert (Path(cfg.train.output_dir) / "final" / ("unet" if cfg.model.finetune == "full" else "pytorch_lora_weights.safetensors")).exists()


def _train(out: Path, steps: int, *extra: str) -> Path:
    assert main(["train", "toy/pref_grpo", *SMALL, f"train.max_steps={steps}", f"train.output_dir={out}", *extra]) == 0
    return out


def test_resume_inside_and_across_rounds_is_exact(tmp_path):
    """2 steps per round: stop inside round 0 (step 1), then inside round 1 (step 3), then finish at step 4."""
    straight = _train(tmp_path / "straight", 4)
    split = tmp_path / "split"
    for steps in (1, 3, 4):
        _train(split, steps, "train.resume=latest")
    assert (split / "checkpoints" / "step-00000003" / "rollout-rank0.safetensors").is_file()  # a round in progress
    assert not (split / "checkpoints" / "step-00000004" / "rollout-rank0.safetensors").exists()  # a round boundary: nothing
    a = load_safetensors(straight / "checkpoints" / "step-00000004" / "trainable.safetensors")
    b = load_safetensors(split / "checkpoints" / "step-00000004" / "trainable.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in _rows(straight)] == [r["loss"] for r in _rows(split)]


def test_dry_run_times_a_rollout_round(capsys):
    assert main(["train", "toy/pref_grpo", *SMALL, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "cache            none: an online method" in out
    assert "rollout round    " in out and "for 8 trajectories (4 steps, G = 4), over 2 optimizer steps" in out


def test_online_settings_that_cannot_work_are_refused(tmp_path, capsys):
    base = ["train", "toy/pref_grpo", f"train.output_dir={tmp_path / 'r'}"]
    assert main([*base, "method.groups_per_round=3", "train.batch_size=5"]) == 2
    assert "must divide" in capsys.readouterr().err
    assert main([*base, "model.lora.dropout=0.1"]) == 2
    assert "model.lora.dropout = 0" in capsys.readouterr().err
    assert main(["train", "toy/dpo", f"train.output_dir={tmp_path / 'd'}", "data.source={kind: prompts, prompts: toy-train}"]) == 2
    assert "'prompts' is for online methods" in capsys.readouterr().err
    assert main([*base, "data.source.prompts=toy-held-out"]) == 2
    assert "held-out" in capsys.readouterr().err


def test_dense_online_keeps_trajectories_evenly_spread_in_reward_rank():
    method = build_method(load_config("toy/dense_online", ["method.keep=4"]).method)  # G = 8, keep 4
    values = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.7, 0.2, 0.8, 0.4] + [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    kept = method.plan(_Rows(16), values, 0, 0)["kept"]  # two groups of 8 trajectories
    # sorted best first: group 0 -> rows 1, 6, 4, 2, 7, 3, 5, 0; ranks linspace(0, 7, 4).round() = 0, 2, 5, 7
    assert kept.tolist() == [[1, 4, 3, 0], [15, 13, 10, 8]]
    # the toy recipe's keep 2: the best and the worst of each group
    best_worst = build_method(load_config("toy/dense_online").method).plan(_Rows(16), values, 0, 0)["kept"]
    assert best_worst.tolist() == [[1, 0], [15, 8]]


class _Rows:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


# ------------------------------------------------------------------------------------------------ TailorPO


def _tailorpo(*overrides):
    """The toy recipe's TailorPO at D3PO's β 0.1 and the paper's one-step x̂0 reward, unless overridden."""
    return build_method(load_config("toy/tailorpo", ["method.beta=0.1", "method.lookahead_steps=0", *overrides]).method)


def test_tailorpo_pair_loss_by_hand():
    from diffalign.trainers.methods.tailorpo import ChildPairs

    logp = torch.tensor([[-1.0, -1.2], [-0.5, -0.4]])  # (pairs, [winner, loser])
    ref = torch.tensor([[-1.1, -1.1], [-0.5, -0.5]])
    batch = ChildPairs(None, torch.arange(2), torch.zeros(2, dtype=torch.long), None, None, torch.tensor([True, False]))
    for method, ratio in ((_tailorpo(), lambda d: d), (_tailorpo("method.ratio_clamp=0.05"),
                                                       lambda d: torch.log(torch.exp(d).clamp(0.95, 1.05)))):
        method._log_probs = lambda models, b, reference: ref if reference else logp
        loss, metrics = method.loss(None, batch, None)
        d = ratio(logp - ref)
        z = 0.1 * (d[0, 0] - d[0, 1])  # only the kept pair counts
        assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-z.item()))), rel=1e-6)
        assert metrics["kept"].item() == 0.5
    smoothed = _tailorpo("method.label_noise=conservative", "method.noise_rate=0.1")  # the shared pairwise objective
    smoothed._log_probs = lambda models, b, reference: ref if reference else logp
    z = 0.1 * 0.2
    want = -(0.9 * math.log(1 / (1 + math.exp(-z))) + 0.1 * math.log(1 / (1 + math.exp(z))))
    assert smoothed.loss(None, batch, None)[0].item() == pytest.approx(want, rel=1e-6)


class _Brightness:
    """A differentiable reward: the mean pixel value of a tensor image."""

    order_symmetric = True

    def score(self, images, prompts):
        return {"overall": images.mean(dim=(1, 2, 3))}


def _tiny_sd15_feed(steps: int, n: int):
    """A tiny SD1.5 as policy and reference, a DDIM grid of `steps`, n copies of one caption encoded: (models, feed,
    cond, uncond, prompts); the feed scores with `_Brightness` ('bright') and the toy checklist."""
    from types import SimpleNamespace

    from accelerate import Accelerator

    from diffalign.config import ModelConfig
    from diffalign.models.loading import encode_prompts, load_components
    from diffalign.toy.checklist import toy_checklist_scorer
    from diffalign.trainers.batch import Cond
    from diffalign.trainers.models import Models, Schedule
    from diffalign.trainers.rollout import SamplingGrid

    c = load_components(ModelConfig(pretrained="builtin:tiny-sd15"))
    models = Models(c.unet, Accelerator(cpu=True), Schedule(c.scheduler.alphas_cumprod.float(), c.prediction_type), torch.float32,
                    lora=False, frozen_reference=c.unet)
    prompts = ["a red circle on a white background"] * n
    cond, uncond = Cond(encode_prompts(c, prompts)[0]), Cond(encode_prompts(c, [""] * n)[0])
    feed = SimpleNamespace(grid=SamplingGrid.from_scheduler(c.scheduler, steps), components=c,
                           scorers={"bright": _Brightness(), "toy-checklist": toy_checklist_scorer()})
    return models, feed, cond, uncond, prompts


def test_tailorpo_g_pushes_the_winner_up_a_differentiable_reward(fresh_accelerate_state):
    models, feed, cond, uncond, prompts = _tiny_sd15_feed(20, 4)
    grid = feed.grid
    method = _tailorpo("method.guidance=true", "method.reward=bright")
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t_prev = grid.prev_timesteps[4]
    reward = method._reward(feed, models, x, t_prev, cond, uncond, prompts)
    pushed, new, moved = method._push(feed, models, x, t_prev, cond, uncond, prompts, 4, reward)
    assert moved.all() and (new > reward).all()  # a step up the gradient of a smooth reward raises it
    assert torch.equal(new, method._reward(feed, models, pushed, t_prev, cond, uncond, prompts))
    checklist = _tailorpo("method.guidance=true", "method.reward=toy-checklist")  # measured on uint8 pixels: no gradient
    with pytest.raises(ValueError, match="differentiable reward"):
        checklist._push(feed, models, x, t_prev, cond, uncond, prompts, 4, reward)


def test_tailorpo_lookahead_reward_is_the_deterministic_ddim_continuation(fresh_accelerate_state):
    """lookahead_steps over every remaining level = the child's plain DDIM (η = 0) continuation on the rollout grid,
    computed here step by step; lookahead_steps 1 = the one-step x̂0 of the paper (Eq. 12; ᾱ = 1 after the last step)."""
    from diffalign.diffusion import ddim_step
    from diffalign.trainers.rollout import guided_prediction

    models, feed, cond, uncond, prompts = _tiny_sd15_feed(10, 2)
    grid = feed.grid
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    k = 5  # the child sits at level prev_timesteps[5]; the chain's steps 6..9 remain
    with torch.no_grad():
        want = x.clone()
        for j in range(k + 1, grid.steps):
            eps = guided_prediction(models.policy, want, grid.timesteps[j].reshape(1), cond, uncond, 3.0)
            want = ddim_step(eps, want, grid.timesteps[j], grid.prev_timesteps[j], grid.alphas_cumprod, grid.prediction_type,
                             grid.final_alpha_cumprod)
        full = _tailorpo("method.lookahead_steps=4", "method.cfg_scale=3.0")._lookahead(feed, models, x, grid.prev_timesteps[k], cond, uncond)
        torch.testing.assert_close(full, want)
        assert not torch.allclose(_tailorpo("method.lookahead_steps=2", "method.cfg_scale=3.0")._lookahead(
            feed, models, x, grid.prev_timesteps[k], cond, uncond), want)  # a coarser sub-grid is another path
        one, paper = (_tailorpo(*o, "method.reward=bright", "method.cfg_scale=3.0") for o in (["method.lookahead_steps=1"], []))
        t_prev = grid.prev_timesteps[k]
        torch.testing.assert_close(one._reward(feed, models, x, t_prev, cond, uncond, prompts),
                                   paper._reward(feed, models, x, t_prev, cond, uncond, prompts))


def test_grpo_lsc_combines_rewards_as_a_logical_and():
    """Two scorers, references (0, 0): image 0 is good on both (0.5, 0.5), image 1 excellent on one and bad on the other
    (3.5, −2): the plain sum prefers image 1 (1.5 > 1), the LSC sum image 0."""
    class Fixed:
        order_symmetric = True

        def __init__(self, values):
            self.values = torch.tensor(values)

        def score(self, images, prompts):
            return {"overall": self.values[images.long().flatten()]}

    scorers = {"a": Fixed([0.5, 3.5]), "b": Fixed([0.5, -2.0])}
    images, groups = torch.arange(2).float().reshape(2, 1, 1, 1), torch.zeros(2, dtype=torch.long)
    plain = build_method(load_config("toy/grpo", ["method.rewards={a: 1.0, b: 1.0}", "method.combine=sum"]).method)
    assert plain.advantages(scorers, images, ["p"] * 2, groups)[0][1] > 0
    lsc = build_method(load_config("toy/grpo", ["method.rewards={a: 1.0, b: 1.0}", "method.combine=lsc"]).method)
    assert lsc.needs.reference and lsc.needs_reference_rewards
    ref = {"a": torch.zeros(2, dtype=torch.float64), "b": torch.zeros(2, dtype=torch.float64)}
    adv, _ = lsc.advantages(scorers, images, ["p"] * 2, groups, reference=ref)
    u = [2 * math.log(1 / (1 + math.exp(-0.5))), math.log(1 / (1 + math.exp(-3.5))) + math.log(1 / (1 + math.exp(2)))]
    assert u[0] > u[1] and adv[0] > 0  # by hand: image 0's transformed sum is the larger
    assert adv.tolist() == pytest.approx([1 / math.sqrt(2), -1 / math.sqrt(2)], abs=1e-6)  # two values: ±(d/2)/(|d|/√2)


def test_grpo_lsc_trains_with_base_model_references(tmp_path):
    args = [*SMALL, "train.max_steps=2", f"train.output_dir={tmp_path / 'lsc'}", "method.combine=lsc", "method.lsc_samples=3"]
    assert main(["train", "toy/grpo", *args]) == 0
    assert all(math.isfinite(r["loss"]) for r in _rows(tmp_path / "lsc"))
