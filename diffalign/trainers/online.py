"""The feed of an online method: rollout rounds sampled from the policy, rewarded per group, trained step by step.

A round is `groups_per_round` groups of G images (the global batch of the round: slot j is image j % G of group
j // G). Group q of the run (q = round · groups_per_round + g) takes prompt `order[q mod P]` of a counter-based
permutation of the P prompts, a new one every P groups (an epoch). Each process samples a contiguous share of the
round's slots (`rollout.sample_trajectories`), decodes its images, and the images of every process are gathered, so
each group is judged as one group wherever its images were sampled and every process computes the same advantages
(the public Pref-GRPO code judges each GPU's share alone). The method then says how the round
is trained: how many optimizer steps it lasts (`steps_per_round`), what it plans once per round (`plan`: e.g. the
steps each trajectory trains) and which transition batches each optimizer step backpropagates (`batches`: one
backward each, the loss divided by their number).

A checkpoint inside a round saves this process's share of it (``rollout-rank<p>.safetensors``: latents, old
log-probs, the method's per-trajectory values and plan), since the policy that sampled it is gone; a checkpoint at a
round boundary needs nothing, the next round being drawn from the saved weights with the same keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from diffalign.models.loading import encode_prompts
from diffalign.randomness import epoch_permutation
from diffalign.trainers.batch import Cond
from diffalign.trainers.rollout import SamplingGrid, Trajectories, decode, rollout_noise, sample_trajectories


class OnlineSetupError(ValueError):
    """An online run whose sizes do not fit together (the message names the settings)."""


def each_trajectory_once(round_size: int, per_step: int) -> int:
    """`steps_per_round` of a method that trains every trajectory of a round once, `per_step` per optimizer step."""
    if round_size % per_step:
        raise ValueError(f"a rollout round holds method.groups_per_round × group_size = {round_size} trajectories, which the "
                         f"{per_step} trajectories of an optimizer step (train.batch_size × grad_accum × processes) must divide")
    return round_size // per_step


@dataclass
class Round:
    """This process's share of one rollout round, ready to train."""

    index: int
    traj: Trajectories
    values: torch.Tensor  # (n,): what the method computed per trajectory from the rewards (GRPO: the advantage)
    plan: dict[str, torch.Tensor]  # what the method decided once per round (GRPO: each trajectory's trained steps)
    metrics: dict


class OnlineFeed:
    def __init__(self, cfg, method, prompts: list[str], components, accelerator, scorers: dict):
        m, t = cfg.method, cfg.train
        self.cfg, self.method, self.prompts, self.components, self.acc, self.scorers = cfg, method, prompts, components, accelerator, scorers
        self.group_size = m.group_size
        self.round_size = m.groups_per_round * m.group_size
        procs = accelerator.num_processes
        per_step = t.batch_size * t.grad_accum * procs
        self.local = self.round_size // procs
        if self.round_size % procs:
            raise OnlineSetupError(f"a rollout round of {self.round_size} trajectories does not split over {procs} processes")
        self.grid = SamplingGrid.from_scheduler(components.scheduler, m.sampling_steps)
        try:
            self.steps_per_round = method.steps_per_round(self.round_size, per_step, self.local)
        except ValueError as e:
            raise OnlineSetupError(str(e)) from None
        res = cfg.data.resolution
        factor = components.vae_scale_factor
        if res % factor:
            raise OnlineSetupError(f"data.resolution {res} is not divisible by the VAE's spatial factor {factor}")
        self.latent_shape = (components.unet.config.in_channels, res // factor, res // factor)
        self.round: Round | None = None
        self._reference_rewards: dict[int, dict[str, torch.Tensor]] = {}  # prompt id -> scorer -> r_ref (combine: lsc)

    # ------------------------------------------------------------------------------------------ rounds

    def round_of(self, step: int) -> int:
        return step // self.steps_per_round

    def prompt_ids(self, r: int) -> list[int]:
        """The prompt of every slot of round r (global), G slots per group."""
        m, n = self.cfg.method, len(self.prompts)
        ids, orders = [], {}
        for g in range(m.groups_per_round):
            q = r * m.groups_per_round + g
            if q // n not in orders:
                orders[q // n] = epoch_permutation(n, self.cfg.train.seed, q // n)
            ids += [int(orders[q // n][q % n])] * self.group_size
        return ids

    def _trajectories(self, prompt_ids, slots: torch.Tensor, latents: torch.Tensor, log_probs: torch.Tensor,
                      cond: Cond | None = None, uncond: Cond | None = None) -> Trajectories:
        """This process's trajectories of the prompts `prompt_ids` at `slots` (encoded here unless given)."""
        prompts = [self.prompts[int(i)] for i in prompt_ids]
        if cond is None:
            cond, uncond = self.encode(prompts)
        m = self.cfg.method
        return Trajectories(prompts, torch.as_tensor(prompt_ids), slots, cond, uncond, latents, log_probs, self.grid, m.cfg_scale, m.eta)

    def encode(self, prompts: list[str]) -> tuple[Cond, Cond]:
        """(conditional, unconditional) conditioning as the pipelines build it (SDXL: pooled and time ids; zeros for an
        empty prompt where the model says so)."""
        c, device = self.components, self.acc.device
        embeds, pooled = encode_prompts(c, prompts, device)
        if c.family == "sdxl" and c.zero_empty_prompt:
            e_u, p_u = torch.zeros_like(embeds), torch.zeros_like(pooled)
        else:
            e_u, p_u = encode_prompts(c, [""] * len(prompts), device)
        if c.family != "sdxl":
            return Cond(embeds.cpu()), Cond(e_u.cpu())
        res = self.cfg.data.resolution
        ids = torch.tensor([[res, res, 0, 0, res, res]], dtype=torch.float32).expand(len(prompts), 6)
        return Cond(embeds.cpu(), pooled.cpu(), ids), Cond(e_u.cpu(), p_u.cpu(), ids)

    def collect(self, models, r: int) -> Round:
        """Sample, decode, reward (all groups, gathered) and choose the trained steps of round r for this process."""
        m, seed = self.cfg.method, self.cfg.train.seed
        ids = self.prompt_ids(r)
        first = self.acc.process_index * self.local
        slots = list(range(first, first + self.local))
        mine = [ids[s] for s in slots]
        prompts = [self.prompts[i] for i in mine]
        cond, uncond = self.encode(prompts)
        init, noise = rollout_noise(seed, r, slots, mine, self.group_size, self.grid.steps, self.latent_shape, m.same_noise)
        slot_tensor = torch.tensor(slots)
        if hasattr(self.method, "sample"):  # a method with its own rollouts (TailorPO's child pairs): no group rewards
            latents, log_probs, plan, metrics = self.method.sample(models, self, r, slots, mine, prompts, cond, uncond, init, noise)
            traj = self._trajectories(mine, slot_tensor, latents, log_probs, cond, uncond)
            return Round(r, traj, torch.zeros(len(slots)), plan, {k: float(v) for k, v in metrics.items()})
        latents, log_probs = sample_trajectories(models, cond, uncond, init, noise, self.grid, m.cfg_scale, m.eta)
        images = decode(self.components.vae, latents[:, -1], self.components.vae.config.scaling_factor)
        everyone = self.acc.gather(images.to(self.acc.device)).cpu() if self.acc.num_processes > 1 else images
        groups = torch.arange(self.round_size) // self.group_size
        extra = {"reference": self.reference_rewards(models, ids)} if getattr(self.method, "needs_reference_rewards", False) else {}
        values, metrics = self.method.advantages(self.scorers, everyone, [self.prompts[i] for i in ids], groups, **extra)
        traj = self._trajectories(mine, slot_tensor, latents, log_probs, cond, uncond)
        values = values[slot_tensor].float()
        return Round(r, traj, values, self.method.plan(traj, values, r, self.cfg.train.seed), metrics)

    def reference_rewards(self, models, prompt_ids: list[int]) -> dict[str, torch.Tensor]:
        """Per scorer, each row's r_ref(prompt): the method's quantile of the BASE model's rewards over `lsc_samples` images
        of the prompt (counter-based seeds per prompt, so the same after a resume), memoised per prompt."""
        m, seed = self.cfg.method, self.cfg.train.seed
        todo = sorted(set(prompt_ids) - set(self._reference_rewards))
        for pid in todo:
            n = m.lsc_samples
            cond, uncond = self.encode([self.prompts[pid]] * n)
            init, noise = rollout_noise(seed, -1, list(range(n)), [pid] * n, 1, self.grid.steps, self.latent_shape, False)
            latents, _ = sample_trajectories(models, cond, uncond, init, noise, self.grid, m.cfg_scale, m.eta, reference=True)
            images = decode(self.components.vae, latents[:, -1], self.components.vae.config.scaling_factor)
            self._reference_rewards[pid] = {name: torch.quantile(self.scorers[name].score(images, [self.prompts[pid]] * n)["overall"]
                                                                 .double().cpu(), m.lsc_quantile) for name in self.method.scorer_names()}
        return {name: torch.stack([self._reference_rewards[pid][name] for pid in prompt_ids]) for name in self.method.scorer_names()}

    # ------------------------------------------------------------------------------------- one step

    def step_batches(self, models, step: int):
        """The method's transition batches for `step` (one backward each), sampling the round at its first step; and
        the round's metrics at that step."""
        r = self.round_of(step)
        fresh = self.round is None or self.round.index != r
        if fresh:
            self.round = self.collect(models, r)
        batches = self.method.batches(self.round, step % self.steps_per_round, step, self.cfg.train)
        return batches, (self.round.metrics if fresh else {})

    # ----------------------------------------------------------------------------------- checkpoints

    def state_file(self, directory: Path) -> Path:
        return directory / f"rollout-rank{self.acc.process_index}.safetensors"

    def save(self, directory: Path, step: int) -> None:
        """This process's share of the round in progress, when `step` is inside one (nothing at a round boundary)."""
        from diffalign.io import save_safetensors

        if step % self.steps_per_round == 0 or self.round is None:
            return
        rd = self.round
        save_safetensors(self.state_file(directory), {
            "round": torch.tensor([rd.index]), "latents": rd.traj.latents, "log_probs": rd.traj.log_probs, "values": rd.values,
            "prompt_ids": rd.traj.prompt_ids, "slots": rd.traj.slots, **{f"plan.{k}": v for k, v in rd.plan.items()}})

    def load(self, directory: Path, step: int) -> None:
        """Restore the round in progress at `step` (written by `save`); a round boundary needs nothing."""
        from diffalign.io import load_safetensors

        if step % self.steps_per_round == 0:
            return
        path = self.state_file(directory)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the checkpoint is inside a rollout round but holds no saved round for this process")
        s = load_safetensors(path)
        r = self.round_of(step)
        if int(s["round"][0]) != r:
            raise ValueError(f"{path}: holds round {int(s['round'][0])}, but step {step} is in round {r}")
        traj = self._trajectories(s["prompt_ids"], s["slots"], s["latents"], s["log_probs"])
        plan = {k.removeprefix("plan."): v for k, v in s.items() if k.startswith("plan.")}
        self.round = Round(r, traj, s["values"], plan, {})
