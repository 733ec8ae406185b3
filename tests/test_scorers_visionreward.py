"""The VisionReward checklist preset against its data files and the official scoring rule, and the
VisionReward-style VLM backend on a tiny random Qwen2-VL."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_scorers import PROMPTS, images, write_tiny_qwen2vl

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "visionreward"


def official_score(raw_yes: list[bool], alignment: float, coef: list[float], intercept: float) -> float:
    """inference-image.py cal_score, re-stated on 30 yes/no answers and the VQAScore value."""
    reward = [1 if yes else -1 for yes in raw_yes]
    for gate, gated in {0: [22, 23, 24, 28, 29], 1: [25, 26], 2: [27]}.items():
        for j in gated:
            reward[j] *= int(reward[gate] > 0)
    kept = [v for i, v in enumerate(reward) if i not in (0, 1, 2)]
    return sum(c * x for c, x in zip(coef, [alignment] + kept)) + intercept


def test_the_preset_matches_the_data_files():
    import json

    from diffalign.scorers.visionreward import DATA, read_questions, visionreward_checklist

    checklist = visionreward_checklist()
    packaged = (DATA / "VisionReward_image_qa_select.txt").read_text(encoding="utf-8").splitlines()
    weights = json.loads((DATA / "weight_select.json").read_text())
    assert len(packaged) == 30 and len(weights["coef"]) == 28 and weights["intercept"] == [0.0]
    if SHARED.is_dir():  # the package copy is the project's data copy, byte for byte
        for name in ("VisionReward_image_qa_select.txt", "weight_select.json", "LICENSE"):
            assert (DATA / name).read_bytes() == (SHARED / name).read_bytes(), name
    assert (DATA / "LICENSE").read_text().lstrip().startswith("Apache License")

    qs = checklist.questions
    assert len(qs) == 31 and checklist.intercept == 0.0
    alignment = qs[0]
    assert (alignment.key, alignment.dimension, alignment.signed) == ("vqascore", "alignment", False)
    assert alignment.weight == weights["coef"][0] == pytest.approx(2.3542882631150923)
    assert alignment.text == 'Does this figure show "{prompt}"? Please answer yes or no.'
    texts = [line.strip() for line in packaged]
    scored, gates = qs[1:28], qs[28:]
    assert [q.text for q in gates] == texts[:3] and all(q.weight == 0.0 for q in gates)
    assert [q.text for q in scored] == texts[3:] == read_questions()[3:]
    assert [q.weight for q in scored] == weights["coef"][1:]
    body, face, hands = (q.key for q in gates)
    gate_of = {q.text: q.gate for q in scored}
    for index, gate in [(22, body), (23, body), (24, body), (28, body), (29, body), (25, face), (26, face), (27, hands)]:
        assert gate_of[texts[index]] == gate, index
    assert sum(q.gate is not None for q in scored) == 8
    assert "Is the image not monotonous?" in texts  # the file's trailing space is stripped, as cal_score does


class FixedBackend:
    """Answers given in the official order: (B, 30) yes/no, (B,) alignment; mapped onto the checklist's order."""

    def __init__(self, raw_yes: torch.Tensor, alignment: torch.Tensor):
        self.raw_yes, self.alignment = raw_yes, alignment

    def answer(self, images, prompts, questions):
        from diffalign.scorers.visionreward import read_questions

        order = read_questions()
        cols = [self.alignment if q.key == "vqascore" else self.raw_yes[:, order.index(q.text)].float() for q in questions]
        return torch.stack(cols, dim=1)


def test_the_score_is_the_official_linear_rule_with_gates():
    from diffalign.scorers.visionreward import VisionRewardScorer, read_weights

    g = torch.Generator().manual_seed(0)
    raw = torch.rand(6, 30, generator=g) > 0.5
    raw[0, :3] = False  # no body, face or hands: 8 gated questions are off
    raw[1, :3] = True
    raw[2, 0], raw[2, 1], raw[2, 2] = True, False, True  # only the face questions are off
    raw[3] = True
    raw[4] = False
    alignment = torch.tensor([0.9, 0.1, 0.5, 1.0, 0.0, 0.33])
    scorer = VisionRewardScorer(FixedBackend(raw, alignment))
    coef, intercept = read_weights()
    out = scorer.score([None] * 6, ["p"] * 6)
    expected = torch.tensor([official_score(r.tolist(), a.item(), coef, intercept) for r, a in zip(raw, alignment)])
    torch.testing.assert_close(out["overall"], expected, atol=1e-6, rtol=0)
    assert out["vqascore"].tolist() == pytest.approx(alignment.tolist())  # used as is, not 2p - 1
    assert out["body_correct"][0] == 0 and out["no_serious_harm"][0] == 0 and out["hands_perfect"][0] == 0
    assert out["face_no_errors"][2] == 0 and out["body_correct"][2] != 0
    assert out["overall"][3] == pytest.approx(sum(coef))
    assert out["overall"][4] == pytest.approx(-sum(coef[1:]) + sum(coef[1:][i] for i in (19, 20, 21, 22, 23, 24, 25, 26)))
    dims = ("alignment", "composition", "quality", "emotion", "fidelity", "safety")
    torch.testing.assert_close(sum(out[d] for d in dims) + intercept, out["overall"])
    assert scorer.name == "visionreward" and not scorer.prefer([None] * 6, [None] * 6, ["p"] * 6).calibrated


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    return write_tiny_qwen2vl(tmp_path_factory.mktemp("vlm"))


def test_vlm_backend_shapes_and_ranges(vlm_dir):
    from diffalign.scorers.visionreward import VLMYesNoBackend, visionreward_checklist

    qs = visionreward_checklist().questions[:4]
    ims = images()[:3]
    greedy = VLMYesNoBackend(vlm_dir, mode="greedy", batch_size=2).answer(ims, PROMPTS[:3], qs)
    prob = VLMYesNoBackend(vlm_dir, mode="probability", batch_size=2).answer(ims, PROMPTS[:3], qs)
    assert greedy.shape == prob.shape == (3, 4)
    assert set(greedy[:, 1:].unique().tolist()) <= {0.0, 1.0}
    assert ((prob >= 0) & (prob <= 1)).all() and ((greedy[:, 0] >= 0) & (greedy[:, 0] <= 1)).all()
    torch.testing.assert_close(greedy[:, 0], prob[:, 0])  # the VQAScore term is a probability in both modes
    assert prob[:, 1:].std() > 0


def hand_first_token_probs(folder, image, text):
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(folder)
    model = Qwen2VLForConditionalGeneration.from_pretrained(folder).eval()
    chat = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}],
                                         tokenize=False, add_generation_prompt=True)
    with torch.no_grad():
        logits = model(**processor(text=[chat], images=[image], return_tensors="pt")).logits[0, -1]
    ids = {w: processor.tokenizer.convert_tokens_to_ids(w) for w in ("yes", "Yes", "no", "No")}
    return torch.softmax(logits, -1), ids


def test_vlm_probability_equals_a_hand_computation(vlm_dir):
    from diffalign.scorers.visionreward import VLMYesNoBackend, visionreward_checklist

    qs = visionreward_checklist().questions
    clear = next(q for q in qs if q.text == "Is the image clear?")
    ims, prompts = images()[:2], PROMPTS[:2]
    got = VLMYesNoBackend(vlm_dir, mode="probability", batch_size=2).answer(ims, prompts, [qs[0], clear])
    for i in range(2):
        probs, ids = hand_first_token_probs(vlm_dir, ims[i], "Is the image clear?")
        yes, no = probs[ids["yes"]] + probs[ids["Yes"]], probs[ids["no"]] + probs[ids["No"]]
        torch.testing.assert_close(got[i, 1], yes / (yes + no), atol=1e-5, rtol=1e-4)
        vqa, ids = hand_first_token_probs(vlm_dir, ims[i], f'Does this figure show "{prompts[i]}"? Please answer yes or no.')
        torch.testing.assert_close(got[i, 0], vqa[ids["Yes"]], atol=1e-5, rtol=1e-4)


def test_greedy_answers_follow_the_generated_reply(vlm_dir, monkeypatch):
    from diffalign.scorers.visionreward import VLMYesNoBackend, is_yes, visionreward_checklist

    assert is_yes("yes") and is_yes(" Yes.") and not is_yes("yes, it is") and not is_yes("no")
    backend = VLMYesNoBackend(vlm_dir, mode="greedy")
    yes_id = backend.yes_ids[0]
    end = backend.tokenizer.eos_token_id

    def scripted(self, **batch):  # replies "yes<|im_end|>" for the first row, "yes yes" (no end) for the second
        rows = [[yes_id, end, yes_id, yes_id], [yes_id, yes_id, yes_id, yes_id]]
        return torch.cat([batch["input_ids"], torch.tensor(rows[: len(batch["input_ids"])])], dim=1)

    monkeypatch.setattr(type(backend.model), "generate", scripted)
    got = backend.answer(images()[:2], PROMPTS[:2], visionreward_checklist().questions[1:2])
    assert got[:, 0].tolist() == [1.0, 0.0]


def test_visionreward_scorer_end_to_end(vlm_dir):
    from diffalign.scorers.visionreward import visionreward_scorer

    scorer = visionreward_scorer(vlm_dir, mode="probability", batch_size=4)
    out = scorer.score(images()[:2], PROMPTS[:2])
    assert scorer.name == "visionreward" and set(out) == set(scorer.dimensions)
    assert out["overall"].shape == (2,) and torch.isfinite(out["overall"]).all()
    assert "VisionReward-style" in scorer.description["variant"]
    assert "stand-in for VQAScore clip-flant5-xxl" in scorer.description["alignment"]
    with pytest.raises(ValueError, match="mode"):
        visionreward_scorer(vlm_dir, mode="sampling")
