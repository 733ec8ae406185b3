"""Pairwise judges for group rewards: the checklist's question-vote judge (not a function of the score difference),
its win-rates against the score's ranks, and order symmetry as the scorers declare it."""

from __future__ import annotations

import torch

from diffalign.rewards import preference_matrix, win_rate
from diffalign.scorers.checklist import Checklist, ChecklistScorer, Question, QuestionVoteJudge
from diffalign.toy.checklist import toy_checklist_scorer
from diffalign.toy.scenes import render_caption

CHECKLIST = Checklist("three", (Question("big", "the main thing right?", "alignment", 0.6),
                                Question("minor_a", "a detail right?", "quality", 0.2),
                                Question("minor_b", "another detail right?", "quality", 0.2)))


class FixedAnswers:
    """P(yes) per image, looked up by the image's index (images are plain ints here)."""

    def __init__(self, table):
        self.table = torch.tensor(table)

    def answer(self, images, prompts, questions):
        return self.table[list(images)]


# image 0: only the heavy question right; image 1: both minor ones right; image 2: nothing right
ANSWERS = [[0.9, 0.1, 0.1], [0.1, 0.9, 0.9], [0.1, 0.1, 0.1]]


def test_votes_disagree_with_the_score_where_weights_matter():
    scorer = ChecklistScorer("three", CHECKLIST, FixedAnswers(ANSWERS))
    score = scorer.score([0, 1, 2], ["p"] * 3)["overall"]
    # a = 2p − 1 = ±0.8: image 0 = 0.6·0.8 − 0.4·0.8 = 0.16 > image 1 = −0.48 + 0.32 = −0.16
    assert torch.allclose(score, torch.tensor([0.16, -0.16, -0.8]))
    judge = QuestionVoteJudge(scorer)
    wins_a, wins_b = judge.question_wins([0], [1], ["p"])
    assert (wins_a.item(), wins_b.item()) == (1, 2)
    assert judge.prefer([0], [1], ["p"]).prob.item() == 0.0  # two questions beat one, whatever their weights
    assert scorer.prefer([0], [1], ["p"]).prob.item() > 0.5  # the score says the opposite
    # group win-rates: votes rank 1 > 0 > 2, the score ranks 0 > 1 > 2
    by_votes = win_rate(preference_matrix(lambda a, b, p: judge.prefer(a, b, p).prob, [0, 1, 2], "p"))
    assert by_votes.tolist() == [0.5, 1.0, 0.0]


def test_hard_votes_tie_where_graded_answers_differ():
    scorer = ChecklistScorer("three", CHECKLIST, FixedAnswers([[0.9, 0.9, 0.9], [0.7, 0.9, 0.9]]))
    assert QuestionVoteJudge(scorer).prefer([0], [1], ["p"]).prob.item() == 0.5  # both "yes" everywhere
    assert QuestionVoteJudge(scorer, hard=False).prefer([0], [1], ["p"]).prob.item() == 1.0  # 0.9 beats 0.7 on one


def test_a_vote_margin_ignores_small_graded_differences():
    # answers a = 2p − 1: question 1 differs by 0.8 − 0.4 = 0.4, question 2 by 0.82 − 0.8 = 0.02
    scorer = ChecklistScorer("three", CHECKLIST, FixedAnswers([[0.9, 0.9, 0.9], [0.7, 0.91, 0.9]]))
    assert QuestionVoteJudge(scorer, hard=False).prefer([0], [1], ["p"]).prob.item() == 0.5  # one question each
    with_margin = QuestionVoteJudge(scorer, hard=False, margin=0.1)
    assert [w.item() for w in with_margin.question_wins([0], [1], ["p"])] == [1, 0]
    assert with_margin.prefer([0], [1], ["p"]).prob.item() == 1.0
    assert QuestionVoteJudge(scorer, hard=False, margin=0.5).prefer([0], [1], ["p"]).prob.item() == 0.5  # both below


def test_the_toy_judges_are_antisymmetric_as_declared():
    scorer = toy_checklist_scorer()
    captions = ["a red circle on a white background", "a small blue square on a black background"]
    a = [render_caption(c, seed=1) for c in captions]
    b = [render_caption(captions[1], seed=2), render_caption(captions[0], seed=3)]
    for judge in (scorer, QuestionVoteJudge(scorer)):
        assert judge.order_symmetric
        forward, backward = judge.prefer(a, b, captions).prob, judge.prefer(b, a, captions).prob
        assert torch.allclose(forward + backward, torch.ones(2))
        assert (forward > 0.5).all()  # each caption's own scene beats the other caption's scene
