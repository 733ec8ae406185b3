"""Toy scenes are deterministic; every checklist question is right on constructed images with known answers."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from diffalign.scorers import Checklist, ChecklistScorer, Question, available, load_scorer
from diffalign.toy.checklist import TOY_CHECKLIST, measure, toy_checklist_scorer
from diffalign.toy.scenes import BACKGROUNDS, COLOURS, HELD_OUT, TRAIN, Scene, SceneSpec, all_specs, parse_caption, render, sample_scene

KEYS = [q.key for q in TOY_CHECKLIST.questions]


def answers(image: Image.Image, caption: str) -> dict[str, bool]:
    out = toy_checklist_scorer().score([image], [caption])
    return {k: bool(out[k][0] > 0) for k in KEYS}


def centred(spec: SceneSpec, extent: float | None = None) -> Scene:
    lo, hi = {"small": (0.28, 0.36), "": (0.42, 0.52), "large": (0.60, 0.70)}[spec.size]
    return Scene(spec, extent or (lo + hi) / 2, (0.5, 0.5))


# ------------------------------------------------------------------------------------------------ scenes


def test_scenes_are_deterministic_and_seeded():
    spec = parse_caption("a small purple triangle on a gray background")
    a, b = np.asarray(render(sample_scene(spec, 3))), np.asarray(render(sample_scene(spec, 3)))
    assert np.array_equal(a, b)
    assert any(not np.array_equal(a, np.asarray(render(sample_scene(spec, s)))) for s in range(4, 10))


def test_held_out_split_is_fixed_disjoint_and_covers_every_attribute():
    assert not set(HELD_OUT) & set(TRAIN) and len(HELD_OUT) + len(TRAIN) == len(all_specs())
    assert len(HELD_OUT) >= 50
    for field in ("colour", "shape", "background", "size"):
        assert {getattr(s, field) for s in HELD_OUT} == {getattr(s, field) for s in TRAIN}
    assert len({s.caption for s in all_specs()}) == len(all_specs())


def test_caption_grammar_round_trips_and_rejects_others():
    for spec in all_specs():
        assert parse_caption(spec.caption) == spec
    for bad in ["a red circle", "a pink circle on a white background", "the red circle on a white background"]:
        with pytest.raises(ValueError, match="toy grammar"):
            parse_caption(bad)


# ---------------------------------------------------------------------------------------------- checklist


def test_every_question_is_yes_on_clean_centred_scenes():
    for spec in all_specs():
        got = answers(render(centred(spec)), spec.caption)
        assert all(got.values()), (spec.caption, got)


@pytest.mark.parametrize("field,other", [("colour", None), ("shape", None), ("background", None), ("size", None)])
def test_a_wrong_attribute_fails_exactly_its_question(field, other):
    options = {"colour": list(COLOURS), "shape": ["circle", "square", "triangle"], "background": list(BACKGROUNDS), "size": ["small", "", "large"]}
    for spec in all_specs()[::7]:
        for value in options[field]:
            if value == getattr(spec, field):
                continue
            drawn = dataclasses.replace(spec, **{field: value})
            got = answers(render(centred(drawn)), spec.caption)
            assert not got[field], (spec.caption, drawn.caption)
            assert all(v for k, v in got.items() if k != field), (spec.caption, drawn.caption, got)


def test_off_centre_is_not_centred():
    spec = parse_caption("a blue circle on a white background")
    got = answers(render(Scene(spec, 0.46, (0.3, 0.5))), spec.caption)
    assert not got["centred"] and got["inside"] and got["colour"]
    assert answers(render(Scene(spec, 0.46, (0.54, 0.47))), spec.caption)["centred"]


def test_cut_off_shape_is_not_inside():
    spec = parse_caption("a green square on a black background")
    got = answers(render(Scene(spec, 0.46, (0.15, 0.5))), spec.caption)
    assert not got["inside"]


def test_two_shapes_are_not_single():
    spec = parse_caption("a small red circle on a white background")
    im = render(Scene(spec, 0.32, (0.3, 0.3)))
    ImageDraw.Draw(im).rectangle((22, 22, 28, 28), fill=COLOURS["blue"])
    got = answers(im, spec.caption)
    assert not got["single"] and got["colour"] and got["shape"]


def test_noisy_or_speckled_background_is_not_clean():
    spec = parse_caption("a yellow triangle on a gray background")
    base = np.asarray(render(centred(spec))).astype(np.int16)
    noisy = np.clip(base + np.random.default_rng(0).integers(-40, 41, base.shape), 0, 255).astype(np.uint8)
    assert not answers(Image.fromarray(noisy), spec.caption)["clean_background"]
    specks = base.copy()
    for y, x in [(2, 3), (5, 28), (28, 4), (27, 27), (3, 15), (29, 15), (15, 2), (15, 29), (8, 8), (24, 24), (8, 24), (24, 8)]:
        specks[y, x] = (0, 0, 0)
    got = answers(Image.fromarray(specks.astype(np.uint8)), spec.caption)
    assert not got["clean_background"] and got["shape"] and got["colour"]


def test_patchy_fill_is_not_solid():
    spec = parse_caption("a large orange square on a white background")
    im = np.asarray(render(centred(spec))).copy()
    im[9:23:2, 9:23] = (200, 90, 0)  # stripes of another shade inside the square
    im[10:23:2, 9:23] = (255, 190, 80)
    got = answers(Image.fromarray(im), spec.caption)
    assert not got["solid_fill"] and got["colour"] and got["shape"]


def test_an_empty_image_answers_no_to_every_object_question():
    im = Image.new("RGB", (32, 32), BACKGROUNDS["white"])
    got = answers(im, "a red circle on a white background")
    assert got["background"] and not any(v for k, v in got.items() if k != "background")


def test_tensor_path_equals_pil_path():
    specs = all_specs()[:6]
    ims = [render(sample_scene(s, 1)) for s in specs]
    caps = [s.caption for s in specs]
    t = torch.stack([torch.from_numpy(np.asarray(im)).permute(2, 0, 1).float() / 255 for im in ims])
    sc = toy_checklist_scorer()
    a, b = sc.score(ims, caps), sc.score(t, caps)
    for k in a:
        assert torch.equal(a[k], b[k])


def test_scores_are_the_weighted_sum_by_dimension():
    spec = parse_caption("a red circle on a white background")
    wrong = render(centred(dataclasses.replace(spec, colour="blue")))
    out = toy_checklist_scorer(graded=False).score([wrong], [spec.caption])
    # colour (weight .2) is -1, every other answer +1: overall = 1 - 2·0.2 = 0.6; alignment = .6 - 2·.2 = .2
    assert out["overall"].item() == pytest.approx(0.6)
    assert out["alignment"].item() == pytest.approx(0.2)
    assert out["composition"].item() == pytest.approx(0.25) and out["quality"].item() == pytest.approx(0.15)
    assert sum(q.weight for q in TOY_CHECKLIST.questions) == pytest.approx(1.0)


def test_prefer_is_bradley_terry_and_marked_uncalibrated():
    spec = parse_caption("a red circle on a white background")
    good, bad = render(centred(spec)), render(centred(dataclasses.replace(spec, colour="blue")))
    p = toy_checklist_scorer(temperature=0.1, graded=False).prefer([good], [bad], [spec.caption])
    assert not p.calibrated
    assert p.prob.item() == pytest.approx(torch.sigmoid(torch.tensor(0.4 / 0.1)).item())


def test_checklist_gates_zero_a_question_whose_gate_is_no():
    class Fixed:
        def answer(self, images, prompts, questions):
            return torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 1.0]])

    questions = (
        Question("body", "Is there a body?", "content", 0.0),
        Question("hands", "Are the hands right?", "quality", 2.0, gate="body"),
        Question("sharp", "Is it sharp?", "quality", 1.0),
    )
    cl = Checklist("gated", questions, intercept=0.5)
    out = ChecklistScorer("gated", cl, Fixed()).score([None, None], ["x", "y"])
    # image 0: no body -> hands gated to 0; 1·(+1) + .5 = 1.5. Image 1: body -> hands answered no: 2·(-1) + 1 + .5 = -0.5
    assert out["overall"].tolist() == [1.5, -0.5]
    assert out["hands"].tolist() == [0.0, -1.0]
    with pytest.raises(ValueError, match="unknown question"):
        Checklist("bad", (Question("a", "?", "d", 1.0, gate="zzz"),))


def test_registry_lists_and_builds_the_toy_checklist():
    assert "toy-checklist" in available()
    assert load_scorer("toy-checklist").dimensions[:4] == ("overall", "alignment", "composition", "quality")
    with pytest.raises(ValueError, match="unknown scorer 'nope'; available: .*toy-checklist"):
        load_scorer("nope")


def test_measure_reports_geometry():
    spec = parse_caption("a large green triangle on a black background")
    m = measure(np.asarray(render(Scene(spec, 0.625, (0.5, 0.5)))))
    assert m.shape == "triangle" and m.colour == "green" and m.background == "black"
    assert m.extent == pytest.approx(0.625, abs=1 / 32) and m.centre == pytest.approx((0.5, 0.5), abs=1 / 32)


def test_graded_answers_agree_with_hard_answers_and_grade_by_distance():
    """Graded P(yes) = σ(margin/scale) is on the same side of ½ as the hard answer, and moves smoothly."""
    graded, hard = toy_checklist_scorer(), toy_checklist_scorer(graded=False)
    specs = all_specs()[::5]
    ims = [render(sample_scene(s, 2)) for s in specs]
    caps = [s.caption for s in specs]
    g, h = graded.answers(ims, caps), hard.answers(ims, caps)
    assert torch.equal(g > 0, h > 0)
    spec = parse_caption("a red circle on a white background")
    out = graded.score([render(Scene(spec, 0.46, (x, 0.5))) for x in (0.5, 0.54, 0.6)], [spec.caption] * 3)
    centred = out["centred"].tolist()
    assert centred[0] > centred[1] > 0 > centred[2]  # more centred scores higher, continuously
    assert len({round(v, 6) for v in out["overall"].tolist()}) == 3  # no ties between the three
