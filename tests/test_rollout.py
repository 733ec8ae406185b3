"""Rollouts (`diffalign.trainers.rollout`): the DDIM-with-log-prob trajectory equals diffusers' DDIMScheduler with
the same noises, the draws are counter-based (groups share their initial noise), and the on-policy ratio is 1: a
stored step's log-prob recomputed in another batch size and order, in train mode, under the training autocast."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from diffusers import DDIMScheduler

from diffalign.config import ModelConfig
from diffalign.config.sections import LoraConfig
from diffalign.models.loading import encode_prompts, load_components
from diffalign.models.lora import attach_lora
from diffalign.trainers.batch import Cond
from diffalign.trainers.models import Models, Schedule
from diffalign.trainers.rollout import SamplingGrid, Trajectories, rollout_noise, sample_trajectories, step_log_prob

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")  # each test picks its precision
PROMPTS = ["a red circle on a white background", "a small blue square on a black background"]


def _setup(mixed_precision="no", lora=True):
    c = load_components(ModelConfig(pretrained="builtin:tiny-sd15"))
    if lora:
        attach_lora(c.unet, LoraConfig(rank=4, alpha=4.0))
        with torch.no_grad():  # a non-zero adapter, so the LoRA path matters
            for name, p in c.unet.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name)))
    c.unet.train()
    acc = Accelerator(mixed_precision=mixed_precision, cpu=True)
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float32
    models = Models(c.unet, acc, Schedule(c.scheduler.alphas_cumprod.float(), c.prediction_type), dtype, lora=lora)
    return c, models


def _conds(c, prompts):
    embeds, _ = encode_prompts(c, prompts)
    empty, _ = encode_prompts(c, [""] * len(prompts))
    return Cond(embeds), Cond(empty)


def test_the_grid_and_the_step_are_diffusers_ddim():
    c, models = _setup(lora=False)
    grid = SamplingGrid.from_scheduler(c.scheduler, 6)
    ddim = DDIMScheduler.from_config(c.scheduler.config)
    ddim.set_timesteps(6)
    assert grid.timesteps.tolist() == ddim.timesteps.tolist()
    cond, uncond = _conds(c, PROMPTS)
    init, noise = rollout_noise(0, 3, [0, 1], [5, 9], 1, 6, (4, 8, 8), same_noise=False)
    latents, logp = sample_trajectories(models, cond, uncond, init, noise, grid, guidance=3.0, eta=1.0)
    assert latents.shape == (2, 7, 4, 8, 8) and logp.shape == (2, 6) and torch.isfinite(logp).all()
    x = init.clone()  # the same trajectory through diffusers' scheduler, given the same variance noise
    with torch.no_grad():
        for k, t in enumerate(ddim.timesteps):
            out = c.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond.prompt_embeds, cond.prompt_embeds])).sample
            eps = out[:2] + 3.0 * (out[2:] - out[:2])
            x = ddim.step(eps, t, x, eta=1.0, variance_noise=noise[:, k]).prev_sample
    assert torch.allclose(latents[:, -1], x, atol=1e-5)


def test_draws_are_counter_based_and_groups_share_their_initial_noise():
    a_init, a_steps = rollout_noise(7, 2, [0, 1, 2, 3], [4, 4, 8, 8], 2, 5, (4, 8, 8), same_noise=True)
    assert torch.equal(a_init[0], a_init[1]) and torch.equal(a_init[2], a_init[3]) and not torch.equal(a_init[0], a_init[2])
    assert not torch.equal(a_steps[0], a_steps[1])  # diversity comes from the step noise
    b_init, b_steps = rollout_noise(7, 2, [3], [8], 2, 5, (4, 8, 8), same_noise=True)  # slot 3 alone, another process
    assert torch.equal(b_init[0], a_init[3]) and torch.equal(b_steps[0], a_steps[3])
    c_init, _ = rollout_noise(7, 3, [3], [8], 2, 5, (4, 8, 8), same_noise=True)  # the next step draws anew
    assert not torch.equal(c_init[0], a_init[3])
    d_init, _ = rollout_noise(7, 2, [0, 1], [4, 4], 2, 5, (4, 8, 8), same_noise=False)
    assert not torch.equal(d_init[0], d_init[1])


@pytest.mark.parametrize("mixed_precision, atol", [("no", 1e-5), ("bf16", 2e-3)])
def test_the_on_policy_ratio_is_one(mixed_precision, atol):
    c, models = _setup(mixed_precision)
    grid = SamplingGrid.from_scheduler(c.scheduler, 4)
    prompts = [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    cond, uncond = _conds(c, prompts)
    slots = [0, 1, 2, 3]
    init, noise = rollout_noise(0, 0, slots, [0, 0, 1, 1], 2, 4, (4, 8, 8), same_noise=True)
    latents, logp = sample_trajectories(models, cond, uncond, init, noise, grid, guidance=4.0, eta=1.0)
    traj = Trajectories(prompts, torch.tensor([0, 0, 1, 1]), torch.tensor(slots), cond, uncond, latents, logp, grid, 4.0, 1.0)
    assert models._unet.training
    stochastic = grid.stochastic(1.0)
    assert stochastic.tolist() == [True] * (grid.steps - 1) + [False]  # set_alpha_to_one: the last step is plain DDIM
    for k in range(grid.steps - 1):  # other batch sizes and another order than the rollout's
        for rows in (torch.tensor([3, 0, 2]), torch.tensor([1])):
            recomputed = step_log_prob(models, traj, rows, k)
            assert recomputed.requires_grad
            ratio = torch.exp(recomputed.detach().cpu() - logp[rows, k])
            assert torch.allclose(ratio, torch.ones_like(ratio), atol=atol), (k, rows, ratio)
