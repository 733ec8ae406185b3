"""One config class per training method, and the name -> class table every other part derives from.

Each class documents its paper in the `name` field's description and its hyperparameters field by field
(with the official value and a typical range). `METHOD_CONFIGS` is the one list of method names on the
config side: the `method` union of `Config`, the CLI's help and the recipe checks are built from it. The
trainers keep the matching name -> method-class table (`diffalign.trainers.methods.METHODS`); a test
checks that both tables hold the same names. Adding a method: a class here and one line in the table.

β convention (stated once, written into the saved config of every method with a `beta` field)::

    loss = -log σ(-β/2 · [(e_θ(w) - e_ref(w)) - (e_θ(l) - e_ref(l))]),   e = per-sample MSE mean over C,H,W

This is the official Diffusion-DPO convention (``scale_term = -0.5 * beta_dpo``), so β = 5000 here means
what β = 5000 means in SalesforceAIResearch/DiffusionDPO and β = 2500 in diffusers' SD1.5 DPO script.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from diffalign.config.base import Section

BETA_CONVENTION = (
    "beta convention: loss = -log sigmoid(-beta/2 * [(e_theta(w) - e_ref(w)) - (e_theta(l) - e_ref(l))]), "
    "e = per-sample MSE mean over C,H,W"
)


_BETA = (
    "β in loss = -log σ(-β/2·Δ), Δ = (e_θ(w)-e_ref(w)) - (e_θ(l)-e_ref(l)), e = per-sample MSE mean over C,H,W. "
)


class PairwiseLabel(Section):
    """How a pair's label enters the shared pairwise objective (`diffalign.objectives.pairwise_loss`): its orientation and
    label-noise-robust training. Every pairwise method (DPO, InPO, NPO, dense) has these fields."""

    flip: bool = Field(
        False,
        description="Read every pair the other way round (label p -> 1-p): the dispreferred image is trained as the winner. "
        "Diffusion-NPO trains its negative model this way (method.name: npo forces it on).",
    )

    label_noise: Literal["none", "conservative", "unbiased"] = Field(
        "none",
        description="Robustness to flipped preference labels: 'conservative' smoothing (cDPO, Mitchell 2023: (1-ε)·ℓ(w,l) + "
        "ε·ℓ(l,w)) or the 'unbiased' robust loss (rDPO, Chowdhury et al. 2024: [(1-ε)·ℓ(w,l) - ε·ℓ(l,w)] / (1-2ε), its logit "
        "clamped at `logit_limit`). Soft labels p become (1-ε)p + ε(1-p) and (p-ε)/(1-2ε).",
    )
    noise_rate: float = Field(0.0, ge=0, lt=0.5, description="ε: the assumed rate of flipped labels (typical 0.05-0.2; < ½).")
    logit_limit: float = Field(
        10.0,
        gt=0,
        description="label_noise = unbiased: the logit is clamped at this size on the side where the loss is unbounded below "
        "(beyond it that side's gradient is 0; σ(10) = 1 - 4.5e-5, where plain DPO's gradient is already negligible).",
    )

    @model_validator(mode="after")
    def _rate_needs_a_model(self):
        if self.noise_rate > 0 and self.label_noise == "none":
            raise ValueError("noise_rate > 0 needs label_noise: conservative or unbiased")
        return self

    def pairwise_options(self) -> dict:
        """The keyword arguments of `pairwise_loss` / `dpo_loss` these fields set."""
        return dict(flip=self.flip, label_noise=self.label_noise, noise_rate=self.noise_rate, logit_limit=self.logit_limit)


class Inversion(Section):
    """How a latent reaches the training level t by inverting the sampler instead of forward noising (InPO, SmPO)."""

    inversion_steps: int = Field(10, ge=1, description="DDIM inversion grid points over [0, T) (InPO 10; SmPO 10 for SDXL, 5 for SD1.5).")
    inversion_model: Literal["policy", "reference"] = Field(
        "policy", description="UNet that inverts (no gradient, no CFG): the trained 'policy' as the official code, or the 'reference'."
    )
    grid_semantics: Literal["official", "exact"] = Field(
        "exact",
        description="'official': diffusers 0.20's rolled grid as the official code (the UNet sees t = -99 first; the latent reaches "
        "the smallest grid level >= t, capped at 901, yet trains at t with τ back-solved at ᾱ_t); 'exact' (default): the same "
        "steps, the last one ending at t, so τ is the noise the latent really carries (under 'official' a forward-noised latent "
        "at t = 50 gives τ ≈ 1.5·ε). The official recipes use 'official'.",
    )


class DPOMethod(PairwiseLabel):
    name: Literal["dpo"] = Field("dpo", description="Method tag: Diffusion-DPO (Wallace et al., 2023, arXiv:2311.12908).")
    beta: float = Field(5000.0, gt=0, description=_BETA + "Official: 5000 (SD1.5 paper value 2000). Typical range 2000-5000.")


class NPOMethod(PairwiseLabel):
    name: Literal["npo"] = Field(
        "npo",
        description="Method tag: Diffusion-NPO (Wang et al., ICLR 2025, arXiv:2505.11245): Diffusion-DPO with every pair flipped, "
        "training a model of what people dislike for the negative branch of classifier-free guidance (`diffalign generate --npo`).",
    )
    beta: float = Field(
        2000.0,
        gt=0,
        description=_BETA + "Official: SDXL 2000 (train_sdxl.py, -β/2 as here); SD1.5 500 in a loss without the ½ "
        "(train_sd15.py L880-883), which is 1000 here.",
    )
    flip: bool = Field(True, description="Always true for NPO (the dispreferred image is trained as the winner); false is method.name: dpo.")

    @model_validator(mode="after")
    def _always_flipped(self):
        if not self.flip:
            raise ValueError("method.flip: false would train Diffusion-DPO, not the negative model; use method.name: dpo for that")
        return self


class SelfNPOMethod(Section):
    name: Literal["self_npo"] = Field(
        "self_npo",
        description="Method tag: Self-NPO (Wang et al., AAAI 2026, arXiv:2505.11777): truncated diffusion fine-tuning toward an EMA "
        "teacher's own (negatively guided) predictions, a negative model for NPO-CFG trained from images and captions alone.",
    )
    teacher_steps: int = Field(5, ge=1, description="K, the teacher's deterministic DDIM steps down the grid (official 5).")
    grid_points: int = Field(25, ge=2, description="N, the DDIM grid (1..N)·(T/N) - 1 the chain starts and steps on (official 25).")
    guidance: float = Field(
        -1.0,
        description="w in the official x0 convention x̂0_c + w·(x̂0_c - x̂0_u), on x̂0 and ε̂ (official -1 for SD1.5: the "
        "unconditional prediction; -5 for SDXL). diffusers' CFG scale g = w + 1 (0 and -4).",
    )
    uncond: Literal["caption", "zeros"] = Field(
        "caption",
        description="The teacher's unconditional input: the encoded empty caption ('caption', official SD1.5) or zero embeddings "
        "('zeros', official SDXL).",
    )
    teacher_decay: float = Field(
        0.999, ge=0, lt=1, description="EMA decay of the teacher per optimizer step (official 0.999, constant: not train.ema's warm-up)."
    )
    loss: Literal["huber", "l2"] = Field(
        "huber", description="'huber': mean(√((x̂0 - target)² + c²) - c) (the official launchers); 'l2': MSE (the script's default)."
    )
    huber_c: float = Field(1e-3, gt=0, description="c of the pseudo-Huber loss (official 1e-3).")


class SFTMethod(Section):
    name: Literal["sft"] = Field("sft", description="Method tag: supervised fine-tuning on the preferred image only (the official `--sft` baseline).")


class InPOMethod(PairwiseLabel, Inversion):
    name: Literal["inpo"] = Field(
        "inpo", description="Method tag: DDIM-InPO (Lu et al., CVPR 2025, arXiv:2503.18454): the DPO loss on DDIM-inverted latents."
    )
    beta: float = Field(2000.0, gt=0, description=_BETA + "Official: 2000 (SD1.5), 5000 (SDXL).")
    inversion_eta: float = Field(
        0.1,
        ge=0,
        description="Noise injected after each inversion step, times the DDIM σ of the whole jump (DDIMScheduler._get_variance, "
        "as the official code; official 0.1).",
    )


class SmPOMethod(Inversion):
    name: Literal["smpo"] = Field(
        "smpo",
        description="Method tag: SmPO-Diffusion (Lu et al., ICML 2025, arXiv:2506.02698): the DPO logit times γ(2p-1), p the "
        "smoothed reward preference, on ReNoise-inverted latents.",
    )
    beta: float = Field(2000.0, gt=0, description=_BETA + "Official: 2000 (SD1.5), 5000 (SDXL).")
    gamma: float = Field(10.0, gt=0, description="γ, the sensitivity: the logit multiplier is γ(2p-1) (official 10, hard-coded).")
    reward: str | None = Field(
        None,
        description="The per-scorer score (a scorer name in the cache's per-scorer scores) that orders the pair and sets p; null = "
        "the item's `scores`.",
    )
    score_bounds: tuple[float, float] | None = Field(
        None,
        description="(low, high) of the min-max normalisation r' = (s-low)/(high-low); official (0.11543526500463486, "
        "0.28201571106910706) on raw PickScore cosines = (11.54, 28.20) on our ×100 PickScore. null = the cache's score range.",
    )
    label_source: Literal["reward", "human"] = Field(
        "reward",
        description="'reward': the pair is ordered by the reward, the human label only drops ties (official); 'human': ordered by "
        "the data's label, p from the reward (p < ½ when they disagree).",
    )


class RankDPOMethod(Section):
    name: Literal["rankdpo"] = Field(
        "rankdpo",
        description="Method tag: RankDPO (Karthik et al., arXiv:2410.18013; reconstructed from the paper's algorithm box): "
        "DCG-weighted pairwise DPO terms over all K images of an item.",
    )
    beta: float = Field(
        5000.0, gt=0, description=_BETA + "The paper's loss has no ½ (β_paper = β/2 here), so K = 2 is Δ_12 × Diffusion-DPO at this β."
    )
    log_base: float = Field(2.0, gt=1, description="b in the discount D(r) = log_b(1 + r) (DCG convention; illegible in the source).")
    discount_ranks: Literal["label", "model"] = Field(
        "label",
        description="Ranks for the discount: from φ ('label', the algorithm box) or from the current model's implicit scores "
        "('model', the paper's figure 2).",
    )
    reduction: Literal["sum", "mean"] = Field("sum", description="Sum or mean of the weighted pair terms of an item (unknown in the paper).")
    noise: Literal["shared", "per_image"] = Field("shared", description="One ε shared by the K images (as Diffusion-DPO) or one per image.")


class DenseMethod(PairwiseLabel):
    name: Literal["dense"] = Field(
        "dense",
        description="Method tag: dense-reward temporal discounting (Yang et al., ICML 2024, arXiv:2402.08265) in an offline form "
        "(reconstructed: the official code is online): early (noisy) reverse-chain steps weigh more.",
    )
    beta: float = Field(5000.0, gt=0, description=_BETA + "No official value for the offline form.")
    gamma: float = Field(0.9, gt=0, le=1, description="γ, the discount per reverse-chain step (official 0.9).")
    num_steps: int = Field(50, ge=1, description="Reverse-chain grid: step k of a num_steps DDIM chain (official 50; k = 0 is the noisiest).")
    variant: Literal["weighted", "sampled"] = Field(
        "weighted",
        description="'weighted': the DPO logit times γ^k inside σ; 'sampled': t drawn with probability ∝ γ^k(t) and the plain DPO "
        "loss (the official code samples steps ∝ γ^k). Different objectives.",
    )


class Rollouts(Section):
    """How an online method samples: groups of images per prompt, rolled out from the policy with DDIM (η > 0) and
    classifier-free guidance, in rounds (`diffalign.trainers.online`)."""

    group_size: int = Field(16, ge=2, description="G, images sampled per prompt (DanceGRPO SD num_generations 16; Pref-GRPO FLUX 8).")
    groups_per_round: int = Field(
        4, ge=1,
        description="Prompts (groups) sampled per rollout round, over all processes; the round is then trained for the method's "
        "number of optimizer steps, so later steps of a round are off-policy.",
    )
    sampling_steps: int = Field(50, ge=2, description="DDIM steps of a rollout (DDPO and DanceGRPO SD: 50).")
    eta: float = Field(1.0, gt=0, description="DDIM η of the rollout policy (DDPO, DanceGRPO SD: 1.0, DDPM-like); > 0 for a log-prob.")
    cfg_scale: float = Field(5.0, ge=1, description="CFG scale of rollouts and training, both branches from the policy (DDPO, DanceGRPO SD: 5.0).")
    same_noise: bool = Field(True, description="The G images of a group start from one initial noise (DanceGRPO; Pref-GRPO --init_same_noise).")
    scorer_options: dict[str, dict] = Field(
        default_factory=dict,
        description="Options per reward scorer, e.g. {pickscore: {path: /models/PickScore_v1}}; weight files left out are looked "
        "up in $DIFFALIGN_WEIGHTS under their release names (docs/scorers.md).",
    )


class GroupRollouts(Rollouts):
    """Online sampling and the clipped-ratio policy loss shared by the GRPO family (`pref_grpo`, `grpo`). Defaults are the
    SD-side GRPO code's (DDPO `kvablack/ddpo-pytorch` config/base.py; DanceGRPO `fastvideo/train_grpo_sd.py` and
    config_sd), transferred to Pref-GRPO, whose own runs are on FLUX (research/npo_grpo.md §3-4). A round's trajectories
    are trained once each, in optimizer steps of train.batch_size × grad_accum × processes trajectories (which must
    divide the round)."""

    timestep_fraction: float = Field(
        1.0, gt=0, le=1,
        description="Share of each trajectory's trainable steps trained, a random subset per trajectory (DanceGRPO SD: all; "
        "DDPO 1.0; Pref-GRPO FLUX 0.6).",
    )
    ignore_last: bool = Field(True, description="Never train the last step, whose σ is tiny (Pref-GRPO --ignore_last; DanceGRPO SD trains 49 of 50).")
    clip_range: float = Field(1e-4, gt=0, description="ε of the ratio clip [1-ε, 1+ε] (DDPO, DanceGRPO, Pref-GRPO: 1e-4).")
    adv_clip: float = Field(5.0, gt=0, description="Advantages clipped to ±adv_clip (all three: 5).")
    std_normalize: bool = Field(
        True,
        description="Divide each group's centred rewards by their std (all three). false: A = r − mean, as Dr. GRPO (Liu et al. "
        "2025, arXiv:2503.20783), so a group whose rewards barely differ gets a near-zero advantage instead of ±1 (the "
        "illusory advantage's amplification); the advantage then has the reward's scale.",
    )
    kl_beta: float = Field(
        0.0, ge=0,
        description="Weight of the closed-form KL to the reference, mean((μ_θ - μ_ref)²)/(2σ²) per step (Pref-GRPO kl_beta, default 0; "
        "Flow-GRPO 0.01-0.04); > 0 builds the reference (LoRA: adapters off).",
    )
    detach_uncond: bool = Field(False, description="No gradient through the unconditional branch (Flow-GRPO); false as DDPO / DanceGRPO SD.")


class DenseOnlineMethod(Rollouts):
    name: Literal["dense_online"] = Field(
        "dense_online",
        description="Method tag: dense-reward temporal discounting in its official online form (Yang et al., ICML 2024, "
        "arXiv:2402.08265; yinan-yang/Dense-Reward-T2I): ListMLE over reward-ordered trajectories of the discounted, clipped "
        "per-step log-ratio to the initial model.",
    )
    group_size: int = Field(5, ge=2, description="Rollouts per prompt (official single-prompt 5; multi-prompt 12, keeping 5).")
    groups_per_round: int = Field(1000, ge=1, description="Prompts per collection = the replay buffer, refreshed whole (official 1000 / 2000).")
    cfg_scale: float = Field(7.5, ge=1, description="CFG scale of rollouts and of the trained log-probs (official 7.5).")
    same_noise: bool = Field(False, description="The official rollouts of a prompt start from independent noises.")
    keep: int = Field(5, ge=2, description="Trajectories kept per prompt, evenly spaced in reward rank (official num_traj_for_pref_comp 5).")
    tuple_size: int = Field(2, ge=2, description="M, trajectories per ListMLE tuple, ordered by reward (official pl_loss_num_traj 2).")
    steps_per_tuple: int = Field(3, ge=1, description="K, steps drawn ∝ γ^k per tuple, with replacement (official single 3, multi 1).")
    gamma: float = Field(0.9, gt=0, le=1, description="γ, the discount: step k of the chain (k = 0 the noisiest) is drawn ∝ γ^k (official 0.9).")
    temperature: float = Field(10.0, gt=0, description="τ_PL, the logit scale (official single 10, multi 12.5).")
    log_ratio_clip: float = Field(1e-4, gt=0, description="c: each per-step log-ratio clamped to ±c (official single 1e-4, multi 5e-4).")
    updates_per_round: int = Field(2500, ge=1, description="Optimizer steps per collection (official p_step: single 2500, multi 4000).")
    rewards: dict[str, float] = Field(
        default_factory=lambda: {"imagereward": 1.0}, description="Scorer -> weight; trajectories are ranked by the weighted sum "
        "(official single-prompt: ImageReward; multi-prompt: HPSv2)."
    )

    @model_validator(mode="after")
    def _sizes(self):
        if self.keep > self.group_size:
            raise ValueError(f"method.keep ({self.keep}) cannot exceed method.group_size ({self.group_size})")
        if self.tuple_size > self.keep:
            raise ValueError(f"method.tuple_size ({self.tuple_size}) cannot exceed method.keep ({self.keep})")
        return self


class PrefGRPOMethod(GroupRollouts):
    name: Literal["pref_grpo"] = Field(
        "pref_grpo",
        description="Method tag: Pref-GRPO (Wang et al., arXiv:2508.20751): GRPO with the win-rate of each image over its group "
        "under a pairwise judge as the reward, against the illusory advantage of pointwise rewards.",
    )
    judge: str = Field("pickscore", description="Scorer whose `prefer` judges the pairs (Pref-GRPO: UnifiedReward-Think, a VLM judge).")
    judge_mode: Literal["prefer", "votes", "graded_votes"] = Field(
        "prefer",
        description="'prefer': the scorer's own P(a ≻ b); 'votes': a checklist scorer's question-by-question vote (the image that "
        "wins more questions, each won by a better yes / no verdict; `diffalign.scorers.checklist.QuestionVoteJudge`); "
        "'graded_votes': the same vote, each question won by the higher yes-probability (by more than `vote_margin`).",
    )
    vote_margin: float = Field(
        0.0, ge=0, lt=2, description="graded_votes: a question is won only when the two answers (a = 2p − 1 ∈ [−1, 1]) differ "
        "by more than this; 0: any difference wins (ours, for the toy world: ignores trivial yes-probability differences).",
    )
    both_orders: Literal["auto", "always", "never"] = Field(
        "auto",
        description="Ask the judge with each image first and average ('auto': when the scorer is not order-symmetric). The official "
        "code asks once, lower index first: a position bias.",
    )
    win_rule: Literal["threshold", "expected"] = Field(
        "threshold",
        description="'threshold': a win when P > ½ + tie_band, a tie inside the band (official: the judge's verdict, unparsable = tie); "
        "'expected': P itself counts.",
    )
    tie_band: float = Field(0.0, ge=0, lt=0.5, description="Half-width of the tie band around ½ for win_rule threshold.")
    extra_rewards: dict[str, float] = Field(
        default_factory=dict,
        description="Pointwise scorers mixed in as weighted group advantages, e.g. {clipscore: 1.4} with win_rate_weight 0.7 (the "
        "paper-era script's 0.7·A_WR + 1.4·A_CLIP).",
    )
    win_rate_weight: float = Field(1.0, ge=0, description="Weight of the win-rate advantage in the mix.")
    renormalize: bool = Field(False, description="Renormalise the mixed advantage over the batch (the release's --apply_gdpo).")


class GRPOMethod(GroupRollouts):
    name: Literal["grpo"] = Field(
        "grpo",
        description="Method tag: GRPO with pointwise rewards (DanceGRPO's SD recipe): group-normalised scores, the baseline Pref-GRPO "
        "says over-optimises trivial differences (the illusory advantage).",
    )
    rewards: dict[str, float] = Field(
        default_factory=lambda: {"hpsv21": 1.0}, description="Scorer -> weight (DanceGRPO SD: HPSv2.1)."
    )
    combine: Literal["advantages", "sum", "lsc"] = Field(
        "advantages",
        description="'advantages': each reward normalised in its group, then weighted (Pref-GRPO's dispatcher); 'sum': the weighted "
        "sum of raw scores, then normalised; 'lsc': Σ w·log σ(r − r_ref(prompt)) (Wang et al. 2024's log-sigmoid-centred transform: "
        "the sum rewards being good on every scorer at once), then normalised.",
    )
    lsc_quantile: float = Field(
        0.85, ge=0, le=1,
        description="combine lsc: r_ref(prompt) is this quantile of the base model's rewards for the prompt ('good' = better than "
        "most base samples; Wang et al. centre on a per-prompt reference from the base policy's samples).",
    )
    lsc_samples: int = Field(8, ge=1, description="combine lsc: base-model images per prompt the reference quantile is taken over.")
    renormalize: bool = Field(False, description="Renormalise the mixed advantage over the batch (--apply_gdpo).")


class TailorPOMethod(Rollouts, PairwiseLabel):
    name: Literal["tailorpo"] = Field(
        "tailorpo",
        description="Method tag: TailorPO (Ren et al., arXiv:2502.01667; RECONSTRUCTED from the paper's text, no public code): at "
        "each trained step two children of one parent, ranked by the reward of their predicted x0, trained with the DPO loss on "
        "their step log-probs; the winner continues the chain. `guidance: true` is TailorPO-G (the winner pushed up the "
        "reward gradient).",
    )
    group_size: int = Field(1, ge=1, description="Trajectories per prompt (the paper compares children of one parent, not a group).")
    groups_per_round: int = Field(8, ge=1, description="Prompts per rollout round (ours).")
    sampling_steps: int = Field(20, ge=2, description="DDIM steps (paper: T = 20).")
    eta: float = Field(1.0, gt=0, description="DDIM η (paper: 1.0).")
    cfg_scale: float = Field(5.0, ge=1, description="CFG scale (D3PO's 5.0; the paper says it follows D3PO).")
    same_noise: bool = Field(False, description="Each trajectory its own initial noise (no groups).")
    trained_steps: int = Field(
        5, ge=1,
        description="Trained steps per trajectory, evenly spaced from the first (paper: 5 of 20, t index 20, 16, 12, 8, 4 = chain "
        "steps 0, 4, 8, 12, 16; 5 beat 3 and 10 in its ablation).",
    )
    children: int = Field(2, ge=2, description="Children sampled from each trained parent (paper 2; SPO 4 on SD1.5).")
    threshold: float = Field(
        0.0, ge=0, description="Train a pair only when its reward gap exceeds this (paper: none, 0; SPO filters on a preference gap).")
    continuation: Literal["winner", "random"] = Field(
        "winner", description="Which child continues the chain: the winner (paper, greedy) or a random one (SPO).")
    x0_from: Literal["policy", "reference"] = Field(
        "policy", description="The network whose x̂0 of each child is scored (paper: unstated; its notation suggests the policy).")
    lookahead_steps: int = Field(
        0, ge=0,
        description="0: a child's step-wise reward is the reward of its one-step x̂0 (paper, Eq. 12). N > 0 (ours): of the image "
        "the child reaches by N deterministic DDIM steps (η = 0, `x0_from`'s network, the rollout's CFG) on an evenly spaced "
        "sub-grid of the remaining levels, costing N guided forwards per child. On the toy world the one-step x̂0 orders "
        "the children at the noisy steps no better than chance (benchmarks/tailorpo_step_reward.py).",
    )
    untrained_steps: Literal["sample", "deterministic"] = Field(
        "sample", description="The other steps: one stochastic child (ours; the paper does not say) or deterministic DDIM.")
    reward: str = Field("aesthetic", description="Scorer of the children's x̂0 (paper: one model per reward: aesthetic, ImageReward, "
                        "HPSv2, PickScore).")
    beta: float = Field(0.1, gt=0, description="β of Eq. 10, −log σ(β·[log π_θ/π_ref (w) − log π_θ/π_ref (l)]) (unstated; D3PO's 0.1).")
    ratio_clamp: float | None = Field(
        None, gt=0, lt=1,
        description="Clamp each ratio π_θ/π_ref to [1−c, 1+c] before the log (SPO 0.1, D3PO 0.1); null: none (the paper has none).",
    )
    guidance: bool = Field(False, description="TailorPO-G (Algorithm 1, Eqs. 13-14): push the winner up the reward gradient.")
    guidance_delta: float = Field(0.5, gt=0, description="δ of r_high = r + δ (paper 0.5).")
    guidance_step: tuple[float, float] = Field(
        (0.1, 0.2), description="η_t range of the push, on a cosine schedule, larger at smaller t (paper [0.1, 0.2]).")


METHOD_CONFIGS: dict[str, type[Section]] = {
    "dpo": DPOMethod,
    "sft": SFTMethod,
    "inpo": InPOMethod,
    "smpo": SmPOMethod,
    "rankdpo": RankDPOMethod,
    "dense": DenseMethod,
    "npo": NPOMethod,
    "self_npo": SelfNPOMethod,
    "pref_grpo": PrefGRPOMethod,
    "grpo": GRPOMethod,
    "dense_online": DenseOnlineMethod,
    "tailorpo": TailorPOMethod,
}


NEGATIVE_METHODS = ("npo", "self_npo")
"""Methods whose weights are a negative model: they belong in the negative branch of CFG (`diffalign generate --npo`)."""


def uses_beta(method: Section) -> bool:
    """Whether a method config follows the β convention above (it has a `beta` field)."""
    return "beta" in type(method).model_fields
