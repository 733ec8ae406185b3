"""Validation scores during training: `eval.scorers` score the validation images, logged as `val/<scorer>`."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import tiny_config, write_config
from PIL import Image

from diffalign.config import ConfigError, load_config
from diffalign.models.loading import build_pipeline
from diffalign.scorers import load_scorer
from diffalign.trainers import loop
from diffalign.trainers import validation as validation_module
from diffalign.trainers.loop import PreferenceTrainer
from diffalign.trainers.report import MetricsLog
from diffalign.trainers.validation import check_validation_scorers

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a red circle on a white background", "a small blue square on a black background"]
SIDE = 32  # data.resolution of tiny_config: validation images and grid cells are SIDE px


def _trainer(tmp_path, demo_parquet, *overrides, finetune="lora"):
    cfg = tiny_config(tmp_path, parquet=demo_parquet, finetune=finetune,
                      eval={"validation_every": 2, "num_inference_steps": 2, "prompts": PROMPTS, "scorers": ["toy-checklist"]})
    cfg["train"].update(checkpoint_every=0)
    return PreferenceTrainer(load_config(write_config(tmp_path / "cfg.yaml", cfg), list(overrides)))


def _rows(trainer) -> list[dict]:
    return [json.loads(line) for line in (trainer.output_dir / "metrics.jsonl").read_text().splitlines()]


def _cell(grid: Image.Image, row: int, column: int) -> Image.Image:
    return grid.crop((column * SIDE, row * SIDE, (column + 1) * SIDE, (row + 1) * SIDE))


def _max_difference(a: Image.Image, b: Image.Image) -> int:
    return int((torch.tensor(list(a.getdata())) - torch.tensor(list(b.convert("RGB").getdata()))).abs().max())


def _mean_score(images, prompts) -> float:
    values = load_scorer("toy-checklist").score(images, prompts)["overall"].tolist()
    return sum(values) / len(values)


def _counting(monkeypatch, name: str, calls: list):
    """Replace `validation.<name>` by a wrapper that records its positional and keyword arguments."""
    original = getattr(validation_module, name)

    def wrapper(*args, **kwargs):
        calls.append((args, kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(validation_module, name, wrapper)


def test_lora_scores_match_the_saved_images_and_the_base_is_scored_once(tmp_path, demo_parquet, monkeypatch):
    loads, renders, scorings = [], [], []
    _counting(monkeypatch, "load_scorers", loads)
    _counting(monkeypatch, "render", renders)
    _counting(monkeypatch, "mean_scores", scorings)
    trainer = _trainer(tmp_path, demo_parquet)
    trainer.setup()
    assert loads == []  # lazily, at the first validation
    trainer.train()

    rows = _rows(trainer)
    validations = [r for r in rows if "val/toy-checklist" in r]
    assert [r["step"] for r in validations] == [2, 4]
    assert all(set(r) == {"step", "val/toy-checklist", "val/toy-checklist_base"} for r in validations)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]  # training rows unchanged
    for r in validations:
        grid = Image.open(trainer.output_dir / "validation" / f"step-{r['step']:08d}.png").convert("RGB")
        assert grid.size == (len(PROMPTS) * SIDE, 2 * SIDE)
        trained = [_cell(grid, 0, c) for c in range(len(PROMPTS))]
        base = [_cell(grid, 1, c) for c in range(len(PROMPTS))]
        assert r["val/toy-checklist"] == pytest.approx(_mean_score(trained, PROMPTS), rel=1e-6, abs=1e-7)
        assert r["val/toy-checklist_base"] == pytest.approx(_mean_score(base, PROMPTS), rel=1e-6, abs=1e-7)

    assert len(loads) == 1 and loads[0][1]["device"] == str(trainer.accelerator.device)
    assert len(renders) == 3  # the trained row at each validation, the base row once
    suffixes = [kwargs.get("suffix", args[3] if len(args) > 3 else "") for args, kwargs in scorings]
    assert sorted(suffixes) == ["", "", "_base"]

    summary = json.loads((trainer.output_dir / "summary.json").read_text())
    assert summary["val/toy-checklist_last2"] == pytest.approx((validations[0]["val/toy-checklist"] + validations[1]["val/toy-checklist"]) / 2)
    assert "loss_last4" in summary and (trainer.output_dir / "curves.png").is_file()


def test_several_seeds_per_prompt_full_finetune(tmp_path, demo_parquet, monkeypatch):
    """Scores average every seed's image; the grid shows the first seed; a full fine-tune has no base row."""
    scorings = []
    _counting(monkeypatch, "mean_scores", scorings)
    trainer = _trainer(tmp_path, demo_parquet, "eval.seeds_per_prompt=2", "train.max_steps=2", "optim.lr=1e-4", finetune="full")
    trainer.setup()
    trainer.train()
    (row,) = [r for r in _rows(trainer) if "val/toy-checklist" in r]
    assert row["step"] == 2 and "val/toy-checklist_base" not in row
    ((_, scored, prompts), _kwargs), = scorings  # the trained row only; `scored`: per prompt, its images
    assert [len(images) for images in scored] == [2] * len(PROMPTS) and prompts == PROMPTS

    # they are the images of seeds 0 and 1 (eval.seed = 0) of the trained model, here one pipeline call each;
    # batched and single calls may differ by one level in a pixel
    unet = trainer.accelerator.unwrap_model(trainer.unet).eval()  # as it was at the step-2 validation (the last step)
    pipe = build_pipeline(trainer.components, unet)
    pipe.set_progress_bar_config(disable=True)
    for prompt, images in zip(PROMPTS, scored):
        for seed, image in enumerate(images):
            alone = pipe(prompt, num_inference_steps=2, guidance_scale=5.0, height=SIDE, width=SIDE,
                         generator=torch.Generator().manual_seed(seed)).images[0]
            assert _max_difference(image, alone) <= 1
    flat = [image for images in scored for image in images]
    assert row["val/toy-checklist"] == pytest.approx(_mean_score(flat, [p for p in PROMPTS for _ in (0, 1)]), rel=1e-6, abs=1e-7)
    assert row["val/toy-checklist"] != pytest.approx(_mean_score(flat[::2], PROMPTS), abs=1e-6)  # not the first seed only

    grid = Image.open(trainer.output_dir / "validation" / "step-00000002.png").convert("RGB")
    assert grid.size == (len(PROMPTS) * SIDE, SIDE)
    assert all(_max_difference(_cell(grid, 0, c), images[0]) == 0 for c, images in enumerate(scored))


def test_unknown_scorer_is_refused_at_setup_with_the_names(tmp_path, demo_parquet):
    trainer = _trainer(tmp_path, demo_parquet, "eval.scorers=[toy-checklist, no-such-scorer]")
    with pytest.raises(ConfigError, match=r"eval.scorers: unknown scorer\(s\) 'no-such-scorer'; available: .*toy-checklist"):
        trainer.setup()
    assert not (tmp_path / "cache").exists()  # refused before anything was built


def test_scorer_options_must_name_a_listed_scorer():
    with pytest.raises(ConfigError, match="scorer_options for 'pickscore'"):
        load_config(None, ["eval.scorers=[toy-checklist]", "eval.scorer_options={pickscore: {}}"])


def test_overlap_with_the_preference_scorers_warns_once_at_setup(tmp_path, monkeypatch):
    """toy/dpo builds its preferences with toy-checklist and validates with it: one warning, training goes on."""

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(loop, "load_components", stop)  # setup stops right after the check
    cfg = load_config("toy/dpo", ["eval.validation_every=100", f"train.output_dir={tmp_path / 'run'}"])
    assert cfg.eval.scorers == ["toy-checklist"] == cfg.data.source.scorers
    with pytest.warns(UserWarning) as record, pytest.raises(Stop):
        PreferenceTrainer(cfg).setup()
    messages = [str(w.message) for w in record if str(w.message).startswith("eval.scorers")]
    assert len(messages) == 1
    assert "'toy-checklist' also built the training preferences" in messages[0] and "reward hacking" in messages[0]


@pytest.mark.parametrize("overrides", [[], ["eval.validation_every=100", "eval.scorers=[]"]], ids=["validation-off", "no-scorers"])
def test_no_overlap_warning_when_nothing_is_scored(overrides):
    cfg = load_config("toy/dpo", overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_validation_scorers(cfg)


def test_no_overlap_warning_for_a_scorer_the_data_never_saw(tmp_path, demo_parquet):
    cfg = load_config(write_config(tmp_path / "cfg.yaml", tiny_config(tmp_path, parquet=demo_parquet)),
                      ["eval.validation_every=2", "eval.scorers=[toy-checklist]"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_validation_scorers(cfg)


def test_summary_keeps_training_and_validation_rows_apart(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl", enabled=True, resume_step=None)
    for step in (1, 2, 3, 4):
        log.write(step, {"loss": float(step)})
        if step % 2 == 0:
            log.write(step, {"val/s": 10.0 * step, "val/s_base": 5.0})
    assert log.summary(last=2) == {"loss_last2": 3.5, "val/s_base_last2": 5.0, "val/s_last2": 30.0}
    assert log.plot(tmp_path / "curves.png").is_file()
