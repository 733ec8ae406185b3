"""VisionReward-style checklist scoring: yes/no questions, gates and linear weights, as data.

Official VisionReward (THUDM/VisionReward ``inference-image.py``): each question is answered yes/no and
mapped to a = +1 / -1; a gated question becomes 0 when its gate is answered "no" (e.g. body-correctness
questions when there is no body); the score is ``dot(a, coef) + intercept``. Here an answer may also be a
probability p of "yes" (a = 2p - 1); an unsigned question (``signed=False``, e.g. VisionReward's VQAScore
alignment term, a probability in [0, 1]) enters as a = p; a gate question may have weight 0; and each question
belongs to a dimension, so

    dimension_d = Σ_{q ∈ d} w_q · a_q,      overall = Σ_q w_q · a_q + intercept.

The answers come from a pluggable `YesNoBackend`: a VLM for real images, or the toy world's measurements.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from diffalign.scorers.base import Images, Preference, bradley_terry, check_batch


@dataclass(frozen=True)
class Question:
    key: str  # short identifier, used as the result key
    text: str  # the question as a person (or a VLM) would be asked it
    dimension: str  # e.g. alignment, composition, quality
    weight: float  # linear coefficient w_q
    gate: str | None = None  # key of a question whose "no" makes this one not apply (a = 0)
    signed: bool = True  # True: a = 2p - 1 ∈ [-1, 1]; False: the probability itself, a = p ∈ [0, 1]


@dataclass(frozen=True)
class Checklist:
    name: str
    questions: tuple[Question, ...]
    intercept: float = 0.0

    def __post_init__(self):
        keys = [q.key for q in self.questions]
        if len(set(keys)) != len(keys):
            raise ValueError(f"checklist {self.name}: duplicate question keys")
        for q in self.questions:
            if q.gate is not None and q.gate not in keys:
                raise ValueError(f"checklist {self.name}: question {q.key!r} is gated by unknown question {q.gate!r}")
        clash = set(keys) & (set(self.dimensions) | {"overall"})
        if clash:
            raise ValueError(f"checklist {self.name}: question keys {sorted(clash)} clash with dimension names")

    @property
    def dimensions(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(q.dimension for q in self.questions))


class YesNoBackend(Protocol):
    def answer(self, images: Images, prompts: Sequence[str], questions: Sequence[Question]) -> torch.Tensor:
        """(B, Q) probability of "yes" per image and question (hard answers are 0 or 1)."""
        ...


class ChecklistScorer:
    """Scores images with a `Checklist` answered by a `YesNoBackend`; results per question, dimension and overall."""

    order_symmetric = True  # `prefer` compares two overall scores

    def __init__(self, name: str, checklist: Checklist, backend: YesNoBackend, temperature: float = 1.0):
        self.name, self.checklist, self.backend, self.temperature = name, checklist, backend, temperature
        self.dimensions = ("overall", *checklist.dimensions, *(q.key for q in checklist.questions))

    def answers(self, images: Images, prompts: Sequence[str]) -> torch.Tensor:
        """(B, Q) answers after gating: a = 2p - 1 ∈ [-1, 1] (or a = p for unsigned questions)."""
        check_batch(images, prompts)
        qs = self.checklist.questions
        p_yes = self.backend.answer(images, prompts, qs).float()
        if p_yes.shape != (len(prompts), len(qs)):
            raise ValueError(f"backend returned shape {tuple(p_yes.shape)}, expected {(len(prompts), len(qs))}")
        signed = torch.tensor([q.signed for q in qs], dtype=torch.bool, device=p_yes.device)
        a = torch.where(signed, 2 * p_yes - 1, p_yes)
        index = {q.key: i for i, q in enumerate(qs)}
        for i, q in enumerate(qs):
            if q.gate is not None:
                a[:, i] = torch.where(p_yes[:, index[q.gate]] >= 0.5, a[:, i], torch.zeros_like(a[:, i]))
        return a

    def score(self, images: Images, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        a = self.answers(images, prompts)
        qs = self.checklist.questions
        w = torch.tensor([q.weight for q in qs], dtype=a.dtype)
        out = {"overall": a @ w + self.checklist.intercept}
        for dim in self.checklist.dimensions:
            mask = torch.tensor([q.dimension == dim for q in qs], dtype=a.dtype)
            out[dim] = a @ (w * mask)
        for i, q in enumerate(qs):
            out[q.key] = a[:, i]
        return out

    def prefer(self, a: Images, b: Images, prompts: Sequence[str]) -> Preference:
        sa, sb = self.score(a, prompts)["overall"], self.score(b, prompts)["overall"]
        return Preference(bradley_terry(sa, sb, self.temperature), calibrated=False)


class QuestionVoteJudge:
    """A pairwise judge over a checklist that is not a function of the score difference: it asks both images every
    question and prefers the one that wins more questions, ignoring the weights (a tie when they win as many).

    A question is won by the image whose gated answer is better: with ``hard`` (default) the yes / no / does-not-apply
    verdict, sign(a) ∈ {−1, 0, 1}, as a person ticking boxes would compare; otherwise the graded answer itself, and
    then only a difference above ``margin`` (in answer units, a = 2p − 1) wins: a person sees a visible difference, not
    a yes-probability of 0.94 against 0.93. So an
    image that fixes two minor questions beats one that fixes a single heavily weighted one, where the checklist's
    score says the opposite: win-rates from this judge differ from ranks of the score. P ∈ {0, ½, 1}, uncalibrated.
    """

    order_symmetric = True  # the questions are answered per image; the count comparison is antisymmetric

    def __init__(self, checklist_scorer: ChecklistScorer, hard: bool = True, margin: float = 0.0):
        self.checklist_scorer, self.hard, self.margin = checklist_scorer, hard, margin
        self.name = f"{checklist_scorer.name}-votes"

    def question_wins(self, a: Images, b: Images, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(questions a wins, questions b wins), each (B,)."""
        va, vb = self.checklist_scorer.answers(a, prompts), self.checklist_scorer.answers(b, prompts)
        if self.hard:
            va, vb = torch.sign(va), torch.sign(vb)
        return (va > vb + self.margin).sum(-1), (vb > va + self.margin).sum(-1)

    def prefer(self, a: Images, b: Images, prompts: Sequence[str]) -> Preference:
        wins_a, wins_b = self.question_wins(a, b, prompts)
        return Preference(torch.where(wins_a > wins_b, 1.0, torch.where(wins_a < wins_b, 0.0, 0.5)), calibrated=False)
