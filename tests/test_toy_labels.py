"""The toy checklist against a frozen, hand-labelled set of 120 real toy-model samples (tests/data/toy_labels).

A person answered every question by eye on enlarged contact sheets without the checklist's answers in
view (labels.json says how); answers the labeller could not tell are null and left out. Each question's
hard answer must agree with the labels on at least 90% of the labelled samples.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from diffalign.toy.checklist import TOY_CHECKLIST, ToyMeasurementBackend

LABELS = Path(__file__).parent / "data" / "toy_labels"
QUESTIONS = [q.key for q in TOY_CHECKLIST.questions]


@pytest.fixture(scope="module")
def labelled():
    doc = json.loads((LABELS / "labels.json").read_text())
    samples = doc["samples"]
    images = [Image.open(LABELS / s["file"]).convert("RGB") for s in samples]
    answers = ToyMeasurementBackend(graded=False).answer(images, [s["caption"] for s in samples], TOY_CHECKLIST.questions)
    return samples, answers


def test_the_set_is_real_samples_with_every_question_labelled(labelled):
    samples, _ = labelled
    drawn = [json.loads(line) for line in (LABELS / "samples.jsonl").read_text().splitlines()]
    assert [s["file"] for s in samples] == [d["file"] for d in drawn] and len(samples) >= 100
    assert all(d["caption"] == s["caption"] for d, s in zip(drawn, samples))
    for key in QUESTIONS:
        known = [s["answers"][key] for s in samples if s["answers"][key] is not None]
        assert len(known) >= 100, f"{key}: only {len(known)} labelled answers"
    assert sum(v is False for s in samples for v in s["answers"].values()) >= 30  # the set holds failures, not only clean samples


@pytest.mark.parametrize("key", QUESTIONS)
def test_checklist_agrees_with_hand_labels(labelled, key):
    samples, answers = labelled
    col = QUESTIONS.index(key)
    labelled_here = [(s["file"], bool(answers[i, col] > 0.5), s["answers"][key]) for i, s in enumerate(samples) if s["answers"][key] is not None]
    wrong = [file for file, got, label in labelled_here if got != label]
    agreement = 1 - len(wrong) / len(labelled_here)
    assert agreement >= 0.9, f"{key}: {agreement:.3f} agreement over {len(labelled_here)} labelled samples; disagreeing: {wrong}"
