"""Hostile image folders for `prepare`, `score` and `compare`, and scoring that survives SIGKILL (reliability items 12, 14).

One folder holds readable images in every awkward form (CMYK, palette, LA, 16-bit, 1×1, EXIF-rotated) beside
damaged or refused ones (truncated PNG and JPEG, 0 bytes, text named .png, FITS and PPM named .png, above 1× and
2× Pillow's pixel limit, a listed file that is missing). Every run finishes, reports exactly the bad files with a
reason, and never changes a user file; ``--strict`` stops at the first; too many failures in a row stop the run.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
import signal
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FULL_RELIABILITY, fork_cli, wait_exit
from PIL import Image

import diffalign.eval.folderscore as fs
from diffalign.cli import main
from diffalign.eval.folderscore import journal_path, score_records
from diffalign.eval.imagefolder import ImageRecord
from diffalign.scorers.base import Scorer
from diffalign.toy.scenes import HELD_OUT, render_caption

LIMIT = Image.MAX_IMAGE_PIXELS


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=95, **kw)
    return buf.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A valid 1×1 PNG whose header claims width × height pixels (a decompression bomb's header, CRC fixed)."""
    data = bytearray(_png(Image.new("RGB", (1, 1))))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(data)


def _scene(i: int) -> tuple[str, Image.Image]:
    caption = HELD_OUT[i % len(HELD_OUT)].caption
    return caption, render_caption(caption, i)


def _rotated(im: Image.Image) -> bytes:
    """`im` stored turned a quarter left, with the EXIF orientation (6: turn 90° clockwise) that shows it upright."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return _jpeg(im.transpose(Image.Transpose.ROTATE_90), exif=exif.tobytes())


def hostile_folder(folder: Path) -> tuple[list[ImageRecord], dict[str, str]]:
    """The folder, its records (metadata.jsonl) and {bad file: pattern its reason must match}."""
    folder.mkdir(parents=True)
    cap, im = _scene(0)
    good = {
        "plain.png": _png(im),
        "cmyk.jpg": _jpeg(im.convert("CMYK")),
        "palette.png": _png(im.convert("P")),
        "grey_alpha.png": _png(im.convert("LA")),
        "sixteen_bit.png": _png(Image.fromarray(np.asarray(im.convert("L")).astype(np.uint16) * 257)),
        "one_pixel.png": _png(Image.new("RGB", (1, 1), (200, 30, 30))),
        "rotated.jpg": _rotated(im),
    }
    bad = {
        "truncated.png": (_png(im)[: len(_png(im)) // 2], "cannot decode|truncated"),
        "truncated.jpg": (_jpeg(im)[:400], "cannot decode|truncated"),
        "empty.png": (b"", "cannot decode|empty|not a recognised image"),
        "text.png": (b"hello, I am not an image\n", "not a recognised image"),
        "fits.png": (b"SIMPLE  =                    T" + b" " * 2850, "not a recognised image"),
        "ppm.png": (b"P6\n1 1\n255\n\x00\x00\x00", "not a recognised image"),
        "above_limit.png": (_png_claiming(LIMIT // 8000 + 1, 8000), "too large"),
        "bomb.png": (_png_claiming(30000, 30000), "too large"),
        "missing.png": (None, "not found"),
    }
    for name, data in good.items():
        (folder / name).write_bytes(data)
    for name, (data, _) in bad.items():
        if data is not None:
            (folder / name).write_bytes(data)
    names = sorted([*good, *bad])
    records = [ImageRecord(n, _scene(i)[0], i) for i, n in enumerate(names)]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r.as_dict()) + "\n" for r in records))
    return records, {n: why for n, (_, why) in bad.items()}


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _skipped(summary: Path) -> dict[str, str]:
    return {s["file"]: s["reason"] for s in json.loads(summary.read_text())["skipped"]}


def _assert_reasons(skipped: dict[str, str], expected: dict[str, str]) -> None:
    assert sorted(skipped) == sorted(expected)
    for name, pattern in expected.items():
        assert re.search(pattern, skipped[name]), (name, skipped[name])


def test_score_and_compare_report_exactly_the_bad_files_and_touch_nothing(tmp_path, capsys):
    folder = tmp_path / "hostile"
    records, bad = hostile_folder(folder)
    before = _digests(folder)
    out = tmp_path / "scores"
    assert main(["score", str(folder), "--scorers", "toy-checklist", "--out", str(out), "--workers", "2", "--batch-size", "4",
                 "--no-progress"]) == 0
    _assert_reasons(_skipped(tmp_path / "scores_summary.json"), bad)
    rows = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert [r["file"] for r in rows] == [r.file for r in records if r.file not in bad]
    assert all(np.isfinite(r["toy-checklist"]) for r in rows)

    clean = tmp_path / "clean"  # the same prompts and seeds, every image readable
    clean.mkdir()
    for r in records:
        _scene(r.seed)[1].save(clean / f"{r.seed}.png")
    (clean / "metadata.jsonl").write_text("".join(json.dumps({**r.as_dict(), "file": f"{r.seed}.png"}) + "\n" for r in records))
    assert main(["compare", str(folder), str(clean), "--scorers", "toy-checklist", "--out", str(tmp_path / "cmp"), "--grid", "2",
                 "--no-progress"]) == 0
    report = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert report["skipped_a"] == len(bad) and report["skipped_b"] == 0
    _assert_reasons(_skipped(tmp_path / "cmp" / "a_scores_summary.json"), bad)
    assert _digests(folder) == before  # user files are never touched


def test_exif_orientation_is_applied_before_scoring(tmp_path):
    _, im = _scene(0)
    wide = Image.fromarray(np.concatenate([np.asarray(im), np.asarray(im)[:, :16]], axis=1))  # 48 wide, 32 high
    tmp_path.joinpath("rotated.jpg").write_bytes(_rotated(wide))  # stored 32 wide, 48 high
    seen = []

    class Sizes(Scorer):
        name = "sizes"

        def score(self, images, prompts):
            seen.extend(im.size for im in images)
            return {"overall": torch.tensor([float(im.width) for im in images])}

    result = score_records(tmp_path, [ImageRecord("rotated.jpg", "")], {"sizes": Sizes()}, batch_size=1, workers=1, progress=False)
    assert seen == [(48, 32)] and result.scores["sizes"].tolist() == [48.0]  # as a viewer shows it


def test_strict_stops_at_the_first_bad_file_naming_it(tmp_path, capsys):
    folder = tmp_path / "hostile"
    records, bad = hostile_folder(folder)
    first = next(r.file for r in records if r.file in bad)
    code = main(["score", str(folder), "--scorers", "toy-checklist", "--out", str(tmp_path / "s"), "--strict", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and f"{folder / first}:" in err and "--strict" in err
    assert not (tmp_path / "s.csv").exists()


def test_too_many_failures_in_a_row_stop_score_and_prepare(tmp_path, capsys):
    folder = tmp_path / "junk"
    folder.mkdir()
    for i in range(4):
        (folder / f"{i}.png").write_bytes(b"not an image")
        (folder / f"{i}.txt").write_text("a red circle")  # its prompt
    code = main(["score", str(folder), "--scorers", "toy-checklist", "--out", str(tmp_path / "s"), "--max-consecutive-failures", "2",
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "3 unreadable images in a row" in err and "--max-consecutive-failures 2" in err

    from diffalign.config import validate_config
    from diffalign.data import DataError, prepare_cache

    lines = [{"caption": "a red circle", "images": [f"{i}.png", f"{i + 1}.png"], "label": 1.0} for i in range(3)]
    (folder / "pairs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    cfg = validate_config({"model": {"pretrained": "builtin:tiny-sd15"},
                           "data": {"source": {"kind": "folder", "root": str(folder), "jsonl": "pairs.jsonl"}, "resolution": 32,
                                    "cache_dir": str(tmp_path / "cache"), "max_consecutive_corrupt": 1}})
    with pytest.raises(DataError, match=r"2 unreadable items in a row .*data.max_consecutive_corrupt = 1"):
        prepare_cache(cfg, progress=False)


def test_prepare_skips_exactly_the_bad_items_with_reasons(tmp_path):
    """Folder-source items pairing each image with a good one: the items holding a bad image are skipped, named."""
    from diffalign.config import validate_config
    from diffalign.data import prepare_cache

    folder = tmp_path / "hostile"
    records, bad = hostile_folder(folder)
    lines = [{"caption": r.prompt, "images": ["plain.png", r.file], "label": 1.0} for r in records]
    (folder / "pairs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    before = _digests(folder)
    cfg = validate_config({"model": {"pretrained": "builtin:tiny-sd15"},
                           "data": {"source": {"kind": "folder", "root": str(folder), "jsonl": "pairs.jsonl"}, "resolution": 32,
                                    "cache_dir": str(tmp_path / "cache")}})
    with pytest.warns(UserWarning):
        prepare_cache(cfg, progress=False)
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    line_of = {f"pairs.jsonl:{i + 1}": r.file for i, r in enumerate(records)}
    skipped = {line_of[s["source_id"]]: s["reason"] for s in manifest["skipped"]}
    _assert_reasons(skipped, bad)
    assert manifest["counts"]["items"] == len(records) - len(bad)
    assert _digests(folder) == before


# ------------------------------------------------------------------------------------------ SIGKILL during scoring

def test_scoring_killed_anywhere_resumes_to_the_uninterrupted_tables(tmp_path, monkeypatch):
    """SIGKILL at 10 seeded points (after a batch, or mid-line in the journal), each run resumed to the end: the tables
    equal the uninterrupted run's, the journal is gone, corrupt images are reported as in the uninterrupted run."""
    folder = tmp_path / "hostile"
    records, bad = hostile_folder(folder)
    args = ["score", str(folder), "--scorers", "toy-checklist", "--batch-size", "2", "--workers", "2", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "ref")]) == 0
    reference = {s: (tmp_path / f"ref{s}").read_bytes() for s in (".csv", ".jsonl")}
    batches = -(-len(records) // 2)
    real_load = fs._load_batch
    rng = random.Random(0)
    for trial in range(40 if FULL_RELIABILITY else 10):
        stem = tmp_path / f"t{trial}"
        done = 0
        for point in rng.sample(["score.batch", "score.mid_line"], 2)[: rng.randint(1, 2)]:  # one or two kills, then the end
            if batches - done < 2:
                break
            n = rng.randint(1, batches - done - 1)
            code = wait_exit(fork_cli([*args, "--out", str(stem)], f"{point}:{n}"))
            assert code == -signal.SIGKILL, (trial, point, n, code)
            assert journal_path(stem).is_file() and not Path(f"{stem}.csv").exists()
            done = journal_path(stem).read_bytes().count(b"\n") - 1  # complete batch lines
        loaded = []
        monkeypatch.setattr(fs, "_load_batch", lambda *a: (loaded.append(1), real_load(*a))[1])
        assert main([*args, "--out", str(stem)]) == 0
        assert len(loaded) == batches - done  # it went on from the journal, it did not start over
        monkeypatch.setattr(fs, "_load_batch", real_load)
        assert {s: Path(f"{stem}{s}").read_bytes() for s in (".csv", ".jsonl")} == reference, trial
        assert not journal_path(stem).exists()
        _assert_reasons(_skipped(Path(f"{stem}_summary.json")), bad)
