"""`diffalign score` and `diffalign compare` on image folders: prompts from metadata, prompt files or
sidecars; unreadable images reported and skipped; results equal to scoring in memory; pairing by prompt
and seed whatever the file names."""

from __future__ import annotations

import csv
import json
import random

import numpy as np
import pytest
import torch
from conftest import run_cli, shuffle_folder
from PIL import Image
from tiny_scorers import PROMPTS, images, write_aesthetic_mlp, write_clip_folder

from diffalign.data.errors import DataError
from diffalign.eval.imagefolder import read_folder, write_folder
from diffalign.toy.scenes import HELD_OUT, render_caption


def toy_folder(path, n=6, seed=0):
    """Rendered toy scenes (clean, so the checklist scores them) with prompts and seeds."""
    captions = [HELD_OUT[i].caption for i in range(n // 2) for _ in range(2)]
    ims = [render_caption(c, 100 * seed + i) for i, c in enumerate(captions)]
    return write_folder(path, ims, captions, list(range(n)), model="test")


def test_prompts_come_from_metadata_a_prompts_file_or_sidecars(tmp_path):
    recs = toy_folder(tmp_path / "meta")
    assert read_folder(tmp_path / "meta") == recs and recs[0].extra == {"model": "test"}
    side = tmp_path / "side"
    side.mkdir()
    for i, im in enumerate(images()):
        im.save(side / f"img{i}.png")
        (side / f"img{i}.txt").write_text(PROMPTS[i] + "\n")
    assert [r.prompt for r in read_folder(side)] == PROMPTS
    listed = tmp_path / "prompts.txt"
    listed.write_text("\n".join(reversed(PROMPTS)))
    assert [r.prompt for r in read_folder(side, listed)] == list(reversed(PROMPTS))
    (side / "img0.txt").unlink()
    with pytest.raises(DataError, match="no prompts for 1 image.*img0.png"):
        read_folder(side)
    listed.write_text("only one")
    with pytest.raises(DataError, match="1 prompts for 4 images"):
        read_folder(side, listed)
    (tmp_path / "bad.jsonl").write_text('{"file": "a.png"}\n')
    with pytest.raises(DataError, match="bad.jsonl:1: each line needs 'file' and 'prompt'"):
        read_folder(side, tmp_path / "bad.jsonl")


def test_score_cli_writes_rows_equal_to_in_memory_scores_and_skips_unreadable_images(tmp_path):
    from diffalign.scorers import load_scorer
    from diffalign.scorers.pickscore import PickScore

    folder = tmp_path / "imgs"
    recs = toy_folder(folder)
    (folder / recs[1].file).write_bytes(b"not a png")  # corrupt
    (folder / recs[4].file).unlink()  # listed but missing
    Image.new("RGB", (8, 8)).save(folder / "extra.png")  # not in the metadata: said, not scored
    clip = write_clip_folder(tmp_path / "clip")
    result = run_cli("score", str(folder), "--scorers", "toy-checklist,pickscore", "--scorer-option", f"pickscore.path={clip}",
                     "--batch-size", "2", "--workers", "2", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "skipped 00001.png" in result.stderr and "skipped 00004.png: image file not found" in result.stderr
    assert "note: 1 image(s) in" in result.stderr and "extra.png" in result.stderr
    assert "toy-checklist" in result.stdout and "pickscore" in result.stdout and "mean" in result.stdout
    rows = list(csv.DictReader(open(folder / "scores.csv")))
    kept = [r for i, r in enumerate(recs) if i not in (1, 4)]
    assert [r["file"] for r in rows] == [r.file for r in kept]
    ims = [Image.open(folder / r.file) for r in kept]
    prompts = [r.prompt for r in kept]
    expected_toy = load_scorer("toy-checklist").score(ims, prompts)
    expected_pick = PickScore(clip).score(ims, prompts)["overall"]
    np.testing.assert_allclose([float(r["toy-checklist"]) for r in rows], expected_toy["overall"].numpy(), atol=1e-6)
    np.testing.assert_allclose([float(r["toy-checklist.alignment"]) for r in rows], expected_toy["alignment"].numpy(), atol=1e-6)
    np.testing.assert_allclose([float(r["pickscore"]) for r in rows], expected_pick.numpy(), atol=1e-4)
    summary = json.loads((folder / "scores_summary.json").read_text())
    assert summary["images"] == 4 and len(summary["skipped"]) == 2
    assert summary["columns"]["pickscore"]["mean"] == pytest.approx(float(expected_pick.mean()), abs=1e-4)
    assert len((folder / "scores.jsonl").read_text().splitlines()) == 4


def test_score_cli_errors_are_one_line(tmp_path, capsys, monkeypatch):
    from diffalign.cli import main

    folder = tmp_path / "imgs"
    toy_folder(folder)
    monkeypatch.delenv("DIFFALIGN_WEIGHTS", raising=False)
    for args, message in (
        (["--scorers", "pickscore"], "scorer 'pickscore' needs path=PATH"),
        (["--scorers", "hpsv9"], "unknown scorer 'hpsv9'"),
        (["--scorers", "toy-checklist", "--scorer-option", "pickscore.path=x"], "which --scorers does not list"),
        (["--scorers", "toy-checklist", "--scorer-option", "pickscore"], "expected NAME.KEY=VALUE"),
        (["--scorers", "pickscore", "--scorer-option", f"pickscore.path={tmp_path}"], "not a transformers CLIP folder"),
    ):
        assert main(["score", str(folder), *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("diffalign score: error: ") and message in err, err
    assert main(["score", str(tmp_path / "nope"), "--scorers", "toy-checklist"]) == 2
    assert "image folder not found" in capsys.readouterr().err


def test_weights_folder_supplies_the_official_file_names(tmp_path, monkeypatch):
    from diffalign.scorers.registry import ScorerConfigError, resolve_options, scorer_identity

    write_clip_folder(tmp_path / "PickScore_v1")
    monkeypatch.setenv("DIFFALIGN_WEIGHTS", str(tmp_path))
    assert resolve_options("pickscore") == {"path": str(tmp_path / "PickScore_v1")}  # the tokenizer is optional
    assert resolve_options("hpsv21", path="/x.pt") == {"path": "/x.pt", "version": "hpsv21"}
    with pytest.raises(ScorerConfigError, match="HPS_v2.1_compressed.pt"):
        resolve_options("hpsv21")
    first = scorer_identity("pickscore")
    (tmp_path / "PickScore_v1" / "model.safetensors").write_bytes(b"changed")
    assert scorer_identity("pickscore") != first  # a changed weight file is a changed scorer


def test_compare_pairs_by_prompt_and_seed_whatever_the_file_names(tmp_path):
    from diffalign.eval.winrate import win_rate
    from diffalign.scorers import load_scorer

    a, b = tmp_path / "a", tmp_path / "b"
    ra = toy_folder(a, n=8, seed=1)
    rb = toy_folder(b, n=8, seed=2)
    shuffle_folder(b, random.Random(0))
    r = run_cli("compare", str(a), str(b), "--scorers", "toy-checklist", "--out", str(tmp_path / "cmp"), "--no-progress", "--grid", "3")
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    scorer = load_scorer("toy-checklist")
    sa = scorer.score([Image.open(a / x.file) for x in ra], [x.prompt for x in ra])["overall"]
    sb = scorer.score([Image.open(tmp_path / "orig_b" / x.file) for x in rb], [x.prompt for x in rb])["overall"]
    expected = win_rate(sa.tolist(), sb.tolist(), [x.prompt for x in ra])
    got = report["scorers"]["toy-checklist"]
    assert report["paired_by"] == "prompt+seed" and report["pairs"] == 8
    assert (got["win_rate"], got["ci_low"], got["ci_high"]) == pytest.approx((expected.win_rate, expected.ci_low, expected.ci_high))
    assert Image.open(tmp_path / "cmp" / "disagreements.png").height > 0


def test_scoring_keeps_at_most_workers_plus_one_batches_in_memory(tmp_path, monkeypatch):
    """Decoding runs ahead of the models by at most `workers` batches, however many images the folder holds."""
    import diffalign.eval.folderscore as fs
    from diffalign.scorers import load_scorer

    folder = tmp_path / "imgs"
    recs = toy_folder(folder, n=40)
    loaded, seen_when_run = [], []
    real_load, real_run = fs._load_batch, fs._run
    monkeypatch.setattr(fs, "_load_batch", lambda *a: (loaded.append(1), real_load(*a))[1])
    monkeypatch.setattr(fs, "_run", lambda *a: (seen_when_run.append(len(loaded)), real_run(*a))[1])
    result = fs.score_records(folder, recs, {"toy-checklist": load_scorer("toy-checklist")}, batch_size=2, workers=3, progress=False)
    assert len(result.records) == 40 and len(seen_when_run) == 20
    for i, n in enumerate(seen_when_run):  # while batch i is scored, batches i+1 .. i+3 at most have been decoded
        assert n <= i + 1 + 3


def test_an_image_a_scorer_refuses_is_skipped_and_the_batch_kept(tmp_path):
    """A transform that refuses one image (HPSv3 refuses aspect ratios above 200) skips that image only."""
    from diffalign.eval.folderscore import score_records
    from diffalign.scorers.base import ModelScorer

    class WidthLimited(ModelScorer):
        name = "width-limited"

        def preprocess(self, images):
            for im in images:
                if im.width > 40:
                    raise ValueError(f"{im.width} px is too wide")
            return torch.stack([torch.tensor(float(im.width)) for im in images])

        def score_pixels(self, pixels, prompts):
            return {"overall": pixels}

    folder = tmp_path / "imgs"
    recs = toy_folder(folder, n=4)
    Image.new("RGB", (64, 32)).save(folder / recs[2].file)
    result = score_records(folder, recs, {"w": WidthLimited()}, batch_size=4, workers=1, progress=False)
    assert [r.file for r in result.records] == [recs[i].file for i in (0, 1, 3)]
    assert result.skipped == [(recs[2].file, "64 px is too wide")] and result.scores["w"].tolist() == [32.0, 32.0, 32.0]


def test_score_on_a_folder_without_images_says_so(tmp_path, capsys):
    from diffalign.cli import main

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image\n")
    assert main(["score", str(tmp_path / "empty"), "--scorers", "toy-checklist"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffalign score: error: ") and "no images" in err and "no prompts" not in err, err


def test_a_scorer_that_ignores_prompts_scores_a_folder_without_them(tmp_path, capsys):
    from diffalign.cli import main
    from diffalign.scorers.aesthetic import AestheticScorer

    folder = tmp_path / "imgs"
    folder.mkdir()
    ims = images()
    for i, im in enumerate(ims):
        im.save(folder / f"img{i}.png")
    (folder / "img1.txt").write_text("a sidecar prompt\n")  # used where there is one
    clip, mlp = write_clip_folder(tmp_path / "clip"), write_aesthetic_mlp(tmp_path / "mlp.pth")
    options = ["--scorer-option", f"aesthetic.path={mlp}", "--scorer-option", f"aesthetic.clip={clip}", "--no-progress", "--workers", "1"]
    assert main(["score", str(folder), "--scorers", "aesthetic", *options]) == 0, capsys.readouterr().err
    rows = list(csv.DictReader(open(folder / "scores.csv")))
    assert [r["file"] for r in rows] == [f"img{i}.png" for i in range(len(ims))]
    assert [r["prompt"] for r in rows] == ["", "a sidecar prompt"] + [""] * (len(ims) - 2)
    expected = AestheticScorer(mlp, clip=clip).score([Image.open(folder / r["file"]) for r in rows], [""] * len(rows))["overall"]
    np.testing.assert_allclose([float(r["aesthetic"]) for r in rows], expected.numpy(), atol=1e-5)
    capsys.readouterr()
    assert main(["score", str(folder), "--scorers", "aesthetic,toy-checklist", *options]) == 2  # one scorer reads prompts
    assert f"no prompts for {len(ims) - 1} image(s)" in capsys.readouterr().err


@pytest.mark.parametrize("problem,message", [("no shared prompt", "shares a prompt and seed"), ("duplicate pair", "pairs must be unique")])
def test_compare_checks_the_pairing_before_any_scorer_loads(tmp_path, capsys, monkeypatch, problem, message):
    import diffalign.scorers.registry as registry
    from diffalign.cli import main

    a, b = tmp_path / "a", tmp_path / "b"
    recs = toy_folder(a, n=4)
    blank = [Image.new("RGB", (8, 8))] * 2
    if problem == "no shared prompt":
        write_folder(b, blank, ["another prompt", "yet another"], [0, 1])
    else:
        write_folder(b, blank, [recs[0].prompt] * 2, [recs[0].seed] * 2)
    loaded = []
    monkeypatch.setattr(registry, "load_scorers", lambda *args, **kw: loaded.append(args) or {})
    code = main(["compare", str(a), str(b), "--scorers", "toy-checklist", "--out", str(tmp_path / "cmp"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert loaded == [] and not (tmp_path / "cmp").exists()


def test_the_scorers_listing_says_which_ignore_the_prompt_and_how_hps_resizes(capsys):
    from diffalign.cli import main
    from diffalign.scorers.registry import REGISTRY

    assert main(["scorers"]) == 0
    listing = " ".join(capsys.readouterr().out.split())  # unwrapped
    for name in ("hpsv2", "hpsv21"):
        assert f"--scorer-option {name}.antialias=true matches a fresh official install" in listing
    assert [n for n, e in REGISTRY.items() if not e.uses_prompt] == ["aesthetic"]
    assert listing.count("the prompt is not used") == 1
