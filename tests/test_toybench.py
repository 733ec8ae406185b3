"""`diffalign bench toy` end to end: plumbing on a tiny random model, and the direction on the real toy world.

The toy world's numbers (win-rates on all held-out captions) are a benchmark and live in docs/toy_world.md;
here the CI-size configuration (`QUICK`) shows that Diffusion-DPO moves the toy model toward the preference.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch
from conftest import shuffle_folder

from diffalign.eval import toybench
from diffalign.eval.imagefolder import read_folder
from diffalign.eval.toybench import QUICK, BenchSettings, markdown_table, method_config, run_toy_bench
from diffalign.eval.winrate import win_rate
from diffalign.scorers import load_scorer
from diffalign.toy.scenes import HELD_OUT, TRAIN
from diffalign.trainers import loop

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models are fastest on one thread; the count is restored after the module


def tiny(tmp_path, workdir: str, *overrides: str, **kw) -> BenchSettings:
    """A seconds-scale bench on the random tiny SDXL model; every call in a test shares one cache root. The guidance
    baseline is chosen from 2 scales on 4 training captions."""
    kw = {"guidance_grid": (2.0, 3.0), "guidance_prompts": 4, "guidance_seeds": 1, **kw}
    return BenchSettings(model="builtin:tiny-sdxl", workdir=tmp_path / workdir, train_rounds=1, eval_prompts=3, eval_seeds=2,
                         num_inference_steps=2, max_steps=2, overrides=("data.source.num_prompts=6", "train.batch_size=2", *overrides),
                         cache_root=tmp_path / "cache", **kw)


def folder_scores(folder: Path) -> dict[tuple[str, int], float]:
    """Overall checklist score of every saved sample, keyed by (prompt, seed), scored afresh from the folder's files."""
    from PIL import Image

    records = read_folder(folder)
    images = [Image.open(folder / r.file).convert("RGB") for r in records]
    overall = load_scorer("toy-checklist").score(images, [r.prompt for r in records])["overall"]
    return {(r.prompt, r.seed): float(v) for r, v in zip(records, overall)}


def paired_win_rate(samples: Path, a: str, b: str, seed: int = 0) -> dict:
    """Win-rate of the samples in samples/<a> over samples/<b>, paired on (prompt, seed) from the files alone."""
    sa, sb = folder_scores(samples / a), folder_scores(samples / b)
    assert sa.keys() == sb.keys()
    pairs = sorted(sa)
    return win_rate([sa[k] for k in pairs], [sb[k] for k in pairs], [p for p, _ in pairs], seed=seed).as_dict()


@pytest.fixture
def trained(monkeypatch) -> list[str]:
    """The methods `diffalign.trainers.loop.train` is called for, in order (training still runs)."""
    calls: list[str] = []
    real = loop.train

    def counting(cfg, *args, **kwargs):
        calls.append(cfg.method.name)
        return real(cfg, *args, **kwargs)

    monkeypatch.setattr(loop, "train", counting)
    return calls


def test_bench_runs_end_to_end_and_writes_the_report(tmp_path, monkeypatch):
    sampled: list[tuple[float, list[str]]] = []  # (guidance scale, prompts) of every sampling call
    real = toybench.sample_images

    def spy(components, prompts, seeds, **kw):
        if kw.get("unet") is None:  # the base model
            sampled.append((kw["guidance_scale"], list(prompts)))
        return real(components, prompts, seeds, **kw)

    monkeypatch.setattr(toybench, "sample_images", spy)
    settings = tiny(tmp_path, "work")
    report = run_toy_bench(settings, tmp_path / "report.json", progress=False)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["methods"].keys() == {"sft", "dpo"}  # SFT is always there as the baseline
    best = saved["best_guidance"]
    for r in [*saved["methods"].values(), best]:
        assert r["n"] == 6 and r["prompts"] == 3 and 0 <= r["ci_low"] <= r["win_rate"] <= r["ci_high"] <= 1
        assert set(r["dims"]) == {"overall", "alignment", "composition", "quality"}
        assert r["eval_seconds"] > 0
    assert all(r["train_seconds"] > 0 for r in saved["methods"].values())
    assert set(saved["hashes"]) == {"base_weights", "scorer_config", "held_out_split"}
    assert all(r["reused"] is False for r in saved["methods"].values())
    md = (tmp_path / "report.md").read_text()
    assert "| dpo |" in md and "vs DPO" in md and "| base, guidance " in md and markdown_table(report).count("\n") >= 5
    assert (tmp_path / "report.png").is_file()

    # against DPO and against the base at its best guidance: the same pairing as against the base, re-derived from the files
    samples = tmp_path / "samples"
    assert "vs_dpo" not in saved["methods"]["dpo"]
    for name, r in saved["methods"].items():
        if name != "dpo":
            assert r["vs_dpo"] == pytest.approx(paired_win_rate(samples, name, "dpo"), abs=1e-12)
        assert r["vs_best_guidance"] == pytest.approx(paired_win_rate(samples, name, "base-best-guidance"), abs=1e-12)
    assert best["vs_dpo"] == pytest.approx(paired_win_rate(samples, "base-best-guidance", "dpo"), abs=1e-12)
    assert {k: best[k] for k in ("win_rate", "ci_low", "ci_high")} == pytest.approx(
        {k: v for k, v in paired_win_rate(samples, "base-best-guidance", "base").items() if k in ("win_rate", "ci_low", "ci_high")}, abs=1e-12)

    # the scale is chosen on training captions only; held-out captions are sampled at the bench's scale and the chosen one
    choice, train, held = best["choice"], {s.caption for s in TRAIN}, {s.caption for s in HELD_OUT}
    assert [g["guidance_scale"] for g in choice["grid"]] == [2.0, 3.0] and choice["split"] == "train"
    assert best["guidance_scale"] == max(choice["grid"], key=lambda g: g["scores"]["overall"])["guidance_scale"]
    assert len(choice["prompts"]) == 4 and set(choice["prompts"]) <= train
    assert {line["guidance"] for line in map(json.loads, (samples / "base-best-guidance" / "metadata.jsonl").read_text().splitlines())} == {
        best["guidance_scale"]}
    choosing = [(g, ps) for g, ps in sampled if not set(ps) & held]
    assert sorted(g for g, _ in choosing) == [2.0, 3.0] and all(set(ps) <= train for _, ps in choosing)
    assert {g for g, ps in sampled if set(ps) & held} <= {settings.guidance_scale, best["guidance_scale"]}


class _ScaleSamples:
    """A fake base model: each image is filled with the guidance scale (as a grey level), so a fake scorer can tell scales apart."""

    def __init__(self):
        self.calls: list[tuple[list[str], list[int], float]] = []

    def __call__(self, prompts, seeds, scale):
        from PIL import Image

        self.calls.append((list(prompts), list(seeds), scale))
        return [Image.new("RGB", (4, 4), (int(scale * 10),) * 3) for _ in prompts], False


class _PeakScorer:
    """Overall score peaks at grey level `peak` (guidance scale × 10); the checklist's dimensions ride along."""

    def __init__(self, peak: int):
        self.peak = peak

    def score(self, images, prompts):
        level = torch.tensor([float(im.getpixel((0, 0))[0]) for im in images])
        overall = -((level - self.peak) ** 2)
        return {"overall": overall, "alignment": overall, "composition": overall, "quality": overall}


def test_guidance_is_chosen_on_training_captions_by_mean_score(tmp_path):
    from diffalign.eval.toybench import _eval_set, choose_guidance, guidance_set

    settings = BenchSettings(guidance_grid=(1.5, 2.0, 3.0, 5.0, 7.5), guidance_prompts=10, guidance_seeds=2, eval_split="train")
    sample = _ScaleSamples()
    choice = choose_guidance(settings, sample, _PeakScorer(peak=45))
    assert choice["guidance_scale"] == 5.0 and [g["guidance_scale"] for g in choice["grid"]] == [1.5, 2.0, 3.0, 5.0, 7.5]
    assert [g["scores"]["overall"] for g in choice["grid"]] == [-900.0, -625.0, -225.0, -25.0, -900.0]
    assert [scale for _, _, scale in sample.calls] == [1.5, 2.0, 3.0, 5.0, 7.5]
    train = {s.caption for s in TRAIN}
    prompts, seeds = guidance_set(settings)
    _, eval_prompts, eval_seeds = _eval_set(settings)  # the train split's evaluation set: the same captions, other seeds
    for ps, ss, _ in sample.calls:
        assert (ps, ss) == (prompts, seeds) and set(ps) <= train and len(ps) == 20 and len(set(ps)) == 10
        assert not set(zip(ps, ss)) & set(zip(eval_prompts, eval_seeds))
    assert choice["prompts"] == list(dict.fromkeys(prompts)) and choice["n"] == 20
    # all of the split when guidance_prompts is None; a tie goes to the first scale in grid order
    everything = choose_guidance(BenchSettings(guidance_grid=(2.0, 3.0, 4.0)), _ScaleSamples(), _PeakScorer(peak=30))
    assert everything["guidance_scale"] == 3.0 and everything["captions"] == len(TRAIN)
    assert choose_guidance(BenchSettings(guidance_grid=(4.0, 2.0)), _ScaleSamples(), _PeakScorer(peak=30))["guidance_scale"] == 4.0


def test_dpo_moves_the_toy_model_toward_the_preference(tmp_path, trained):
    """Aligned mean checklist score above the base model's, on the fixed held-out captions and seeds. The quick preset
    runs twice on one cache root: SFT alone, then with DPO added, and the second run trains DPO only."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        first = BenchSettings(model="builtin:toy", methods=("sft",), workdir=tmp_path / "first", cache_root=tmp_path / "cache", **QUICK)
        run_toy_bench(first, tmp_path / "first.json", progress=False)
        assert trained == ["sft"]
        trained.clear()
        settings = BenchSettings(model="builtin:toy", workdir=tmp_path / "work", cache_root=tmp_path / "cache", **QUICK)
        report = run_toy_bench(settings, tmp_path / "report.json", progress=False)
    finally:
        torch.set_num_threads(threads)  # later tests compare runs bit for bit on one thread
    assert trained == ["dpo"] and report["methods"]["sft"]["reused"] and not report["methods"]["dpo"]["reused"]
    assert all(d["reused"] for d in report["data"].values())  # the synthetic cache too
    dpo = report["methods"]["dpo"]
    assert dpo["n"] == 2 * 62 and dpo["prompts"] == 62
    assert dpo["dims"]["overall"] > 0 and dpo["win_rate"] > 0.5, markdown_table(report)
    # the guidance baseline: chosen on 50 training captions from QUICK's 3 scales, reused by the second run
    best = report["best_guidance"]
    assert best["choice"]["samples_reused"] and best["choice"]["captions"] == 50 and set(best["choice"]["prompts"]) <= {s.caption for s in TRAIN}
    assert best["guidance_scale"] in QUICK["guidance_grid"] and best["n"] == dpo["n"]
    assert "vs_dpo" in report["methods"]["sft"] and "vs_dpo" not in dpo and "vs_best_guidance" in dpo

    # `diffalign compare` re-derives the win-rate from the saved folders alone, whatever the file names
    from diffalign.cli import main

    samples = tmp_path / "samples"
    shuffle_folder(samples / "dpo", random.Random(1))
    assert main(["compare", str(samples / "dpo"), str(samples / "base"), "--scorers", "toy-checklist", "--out", str(tmp_path / "cmp"),
                 "--no-progress"]) == 0
    derived = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert derived["pairs"] == dpo["n"] and derived["prompts"] == dpo["prompts"]
    got = derived["scorers"]["toy-checklist"]
    assert [got[k] for k in ("win_rate", "ci_low", "ci_high")] == pytest.approx([dpo[k] for k in ("win_rate", "ci_low", "ci_high")], abs=1e-12)


def test_overrides_can_be_scoped_to_one_method():
    from diffalign.eval.toybench import method_overrides

    given = ("optim.lr=1e-4", "dpo:method.beta=2000", "sft:train.max_steps=5", "data.source.model=a:b")
    assert method_overrides("dpo", given) == ["optim.lr=1e-4", "method.beta=2000", "data.source.model=a:b"]
    assert method_overrides("sft", given) == ["optim.lr=1e-4", "train.max_steps=5", "data.source.model=a:b"]


def test_a_second_run_trains_only_what_changed_and_reuses_the_rest(tmp_path, trained):
    """Another work directory, one cache root: only DPO, whose config changed, is trained again; reuse gives the same numbers."""
    first = run_toy_bench(tiny(tmp_path, "work1"), tmp_path / "one" / "report.json", progress=False)
    assert trained == ["sft", "dpo"] and not any(r["reused"] for r in first["methods"].values())
    assert [d["reused"] for d in first["data"].values()] == [False]

    trained.clear()
    second = run_toy_bench(tiny(tmp_path, "work2", "dpo:method.beta=1000"), tmp_path / "two" / "report.json", progress=False)
    assert trained == ["dpo"]
    assert {n: r["reused"] for n, r in second["methods"].items()} == {"sft": True, "dpo": False}
    assert [d["reused"] for d in second["data"].values()] == [True] and second["data"].keys() == first["data"].keys()
    sft1, sft2 = first["methods"]["sft"], second["methods"]["sft"]
    assert sft2["run_key"] == sft1["run_key"] and second["methods"]["dpo"]["run_key"] != first["methods"]["dpo"]["run_key"]
    assert [sft2[k] for k in ("win_rate", "ci_low", "ci_high", "n", "dims")] == [sft1[k] for k in ("win_rate", "ci_low", "ci_high", "n", "dims")]
    assert sft2["train_seconds"] == sft1["train_seconds"]  # the recorded training time of the reused model
    assert second["base"]["samples_reused"] and sft2["samples_reused"] and not second["methods"]["dpo"]["samples_reused"]
    assert not first["base"]["samples_reused"] and second["base"]["scores"] == first["base"]["scores"]  # PNG round trip is exact
    runs = json.loads((tmp_path / "work2" / "runs.json").read_text())["methods"]
    assert runs["sft"]["run_dir"] == sft1["run_dir"] and (tmp_path / "cache" / "runs" / sft1["run_key"] / "done.json").is_file()

    trained.clear()
    fresh = run_toy_bench(tiny(tmp_path, "work3", fresh=True), tmp_path / "three" / "report.json", progress=False)
    assert trained == ["sft", "dpo"] and not any(r["reused"] for r in fresh["methods"].values())
    assert fresh["methods"]["dpo"]["win_rate"] == first["methods"]["dpo"]["win_rate"]  # retrained bit for bit


def test_an_unfinished_run_directory_is_trained_again(tmp_path, trained):
    """A run directory without its done.json marker (a crash mid-training) is never reused."""
    settings = tiny(tmp_path, "work", "sft:train.max_steps=1", "dpo:train.max_steps=1")
    run_dir = Path(method_config("sft", settings).train.output_dir)
    (run_dir / "final").mkdir(parents=True)
    (run_dir / "final" / "config.yaml").write_text("stale: true\n")
    (run_dir / "summary.json").write_text("{}")  # everything but the marker
    report = run_toy_bench(settings, tmp_path / "report.json", progress=False)
    assert trained == ["sft", "dpo"] and report["methods"]["sft"]["reused"] is False


def test_held_out_runs_append_to_the_ledger_and_train_split_runs_do_not(tmp_path):
    ledger = tmp_path / "looks.jsonl"
    report = run_toy_bench(tiny(tmp_path, "work", ledger=ledger), tmp_path / "held" / "report.json", progress=False)
    lines = ledger.read_text().splitlines()
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert set(entry) >= {"date", "commit", "methods", "settings"} and entry["date"].endswith("+00:00")
    assert entry["commit"] is None or len(entry["commit"].removesuffix("-dirty")) == 40
    keys = ("win_rate", "ci_low", "ci_high", "n")
    for name, r in report["methods"].items():
        versus = {vs: {k: r[vs][k] for k in keys} for vs in ("vs_dpo", "vs_best_guidance") if vs in r}
        diagnostics = {"ranking": {k: r["ranking"][k]["value"] for k in ("ranking_accuracy", "reward_accuracy")},
                       "forward_equivalents": r["compute"]["forward_equivalents"]}
        assert entry["methods"][name] == {"run_key": r["run_key"], "reused": False, **{k: r[k] for k in keys}, **versus, **diagnostics}
    assert set(entry["methods"]["sft"]) >= {"vs_dpo", "vs_best_guidance"} and "vs_dpo" not in entry["methods"]["dpo"]
    assert entry["best_guidance"]["guidance_scale"] == report["best_guidance"]["guidance_scale"]
    assert entry["settings"]["eval_split"] == "held_out" and entry["settings"]["ledger"] == str(ledger)

    run_toy_bench(tiny(tmp_path, "work", ledger=ledger, eval_split="train"), tmp_path / "train" / "report.json", progress=False)
    assert ledger.read_text().splitlines() == lines  # tuning on training captions leaves no trace among held-out looks
    assert not (tmp_path / "cache" / "ledger.jsonl").exists()


def test_keys_follow_content_not_paths(tmp_path):
    from diffalign.eval.toybench import data_key, run_key

    a = method_config("dpo", tiny(tmp_path, "a"), code="c1")
    b = method_config("dpo", dataclasses.replace(tiny(tmp_path, "b"), cache_root=tmp_path / "elsewhere"), code="c1")
    assert data_key(a) == data_key(b) and run_key(a, "c1") == run_key(b, "c1")
    assert run_key(a, "c2") != run_key(a, "c1")  # any source change retrains
    if not torch.cuda.is_available():  # CPU training differs bit-wise with the thread count
        one = run_key(a, "c1")
        torch.set_num_threads(2)
        try:
            assert run_key(a, "c1") != one
        finally:
            torch.set_num_threads(1)
    sft = method_config("sft", tiny(tmp_path, "a"), code="c1")
    assert data_key(sft) == data_key(a) and run_key(sft, "c1") != run_key(a, "c1")  # one cache, two models
    lora = method_config("dpo", tiny(tmp_path, "a", "model.lora.rank=2"), code="c1")
    assert data_key(lora) == data_key(a)  # LoRA settings do not touch the data
    for option in ("model.compile=true", "model.channels_last=true", "model.sdpa_backend=math", "model.gradient_checkpointing=true"):
        fast = method_config("dpo", tiny(tmp_path, "a", option), code="c1")
        assert data_key(fast) == data_key(a) and run_key(fast, "c1") != run_key(a, "c1")  # a training option: same data
    more = method_config("dpo", tiny(tmp_path, "a", "data.source.num_prompts=5"), code="c1")
    assert data_key(more) != data_key(a)


def test_negative_models_get_npo_cfg_rows_against_plain_cfg(tmp_path):
    """With npo among the methods: NPO-CFG on the base and on DPO, and the random-offset control, each paired with plain CFG
    of its positive model; the rows' numbers re-derive from the sample folders, and the control's offset has δ's norm."""
    from safetensors.torch import load_file

    settings = tiny(tmp_path, "work", methods=("dpo", "npo"), guidance_grid=(), train_seeds=2, ranking_rounds=0)
    report = run_toy_bench(settings, tmp_path / "report.json", progress=False)
    rows = json.loads((tmp_path / "report.json").read_text())["npo_cfg"]
    combinations = ["base + NPO-CFG (npo)", "dpo + NPO-CFG (npo)", "base + random offset (norm of npo)"]
    assert set(rows) == {*combinations, *(f"{c} (seed 1)" for c in combinations)}  # every training seed of the negative model
    assert rows["dpo + NPO-CFG (npo) (seed 1)"]["positive"] == "dpo (seed 1)"  # on DPO of its own seed
    samples = tmp_path / "samples"
    for label, r in rows.items():
        derived = paired_win_rate(samples, toybench.folder_name(label), toybench.folder_name(r["positive"]))
        assert {k: r[k] for k in ("win_rate", "ci_low", "ci_high")} == pytest.approx(
            {k: derived[k] for k in ("win_rate", "ci_low", "ci_high")}, abs=1e-12)
    for c in combinations:  # combined over the seeds as the methods' rows are
        assert report["npo_cfg_seeds"][c]["per_seed"] == [rows[c]["win_rate"], rows[f"{c} (seed 1)"]["win_rate"]]
    md = markdown_table(report)
    assert "Negative-preference CFG" in md and "Negative-preference CFG across training seeds" in md

    def dense_norm(file):
        t = load_file(str(file))
        downs = [k for k in t if "lora_A" in k or "lora.down" in k]
        ups = [k.replace("lora_A", "lora_B").replace("lora.down", "lora.up") for k in downs]
        return sum(float((t[u].flatten(1) @ t[d].flatten(1)).square().sum()) for d, u in zip(downs, ups)) ** 0.5

    npo_run = Path(report["methods"]["npo"]["run_dir"])
    control = npo_run / "random_offset" / "pytorch_lora_weights.safetensors"
    assert dense_norm(control) == pytest.approx(dense_norm(npo_run / "final" / "pytorch_lora_weights.safetensors"), rel=1e-4)


def test_training_seeds_are_cells_of_their_own_combined_in_the_report(tmp_path, trained):
    """--train-seeds 2: every method trains twice on the same data (train.seed 0 and 1, cached apart), is evaluated on the
    same samples' prompts and seeds, compared with DPO of the same seed, and combined per method; a third seed later
    trains only the new cells."""
    report = run_toy_bench(tiny(tmp_path, "work", train_seeds=2), tmp_path / "two" / "report.json", progress=False)
    assert trained == ["sft", "sft", "dpo", "dpo"]
    rows = report["methods"]
    assert list(rows) == ["sft", "sft (seed 1)", "dpo", "dpo (seed 1)"]
    assert len({r["run_key"] for r in rows.values()}) == 4 and len(report["data"]) == 1  # four models, one data cache
    assert method_config("dpo", tiny(tmp_path, "w"), train_seed=1).train.seed == method_config("dpo", tiny(tmp_path, "w")).train.seed + 1
    dpo = report["seeds"]["dpo"]["vs_base"]
    assert dpo["per_seed"] == [rows["dpo"]["win_rate"], rows["dpo (seed 1)"]["win_rate"]]
    assert dpo["win_rate"] == pytest.approx((rows["dpo"]["win_rate"] + rows["dpo (seed 1)"]["win_rate"]) / 2)
    samples = tmp_path / "two" / "samples"
    assert rows["sft (seed 1)"]["vs_dpo"] == paired_win_rate(samples, "sft_seed_1", "dpo_seed_1")  # DPO of its own seed
    assert rows["sft"]["vs_dpo"] == paired_win_rate(samples, "sft", "dpo")
    assert "vs_dpo" in report["seeds"]["sft"] and "Across 2 training seeds" in markdown_table(report)
    mean = (rows["dpo"]["dims"]["alignment"] + rows["dpo (seed 1)"]["dims"]["alignment"]) / 2
    assert report["seeds"]["dpo"]["dims"]["alignment"] == pytest.approx(mean)  # Δ per dimension: the seeds' mean

    trained.clear()
    again = run_toy_bench(tiny(tmp_path, "work", train_seeds=3), tmp_path / "three" / "report.json", progress=False)
    assert trained == ["sft", "dpo"]  # only the seed-2 cells
    assert [again["methods"][n]["reused"] for n in ("sft", "sft (seed 1)", "dpo", "dpo (seed 1)")] == [True] * 4
    assert len(again["seeds"]["dpo"]["vs_base"]["per_seed"]) == 3


def test_ranking_diagnostics_and_compute_sit_beside_each_row(tmp_path):
    """Every row's ranking and reward accuracy on an evaluation-only preference cache of the evaluation captions (what
    `evaluate_ranking` gives for that model), the base's (θ = ref: reward accuracy ½), and its training compute counted
    by the probe (a DPO step of B pairs: 2B rows with gradient, 2B reference rows; SFT: B rows with gradient)."""
    from diffalign.data.manifest import read_manifest
    from diffalign.data.sources.synthetic import resolve_prompts
    from diffalign.eval.ranking import evaluate_ranking
    from diffalign.eval.toybench import ranking_config

    settings = tiny(tmp_path, "work", guidance_grid=())
    report = run_toy_bench(settings, tmp_path / "report.json", progress=False)
    cfg = ranking_config(settings, [s.caption for s in HELD_OUT[:3]], tmp_path / "cache")
    assert report["ranking_data"]["dir"] == str(cfg.data.cache_dir)
    assert read_manifest(cfg.data.cache_dir)["evaluation_only"] is True  # no trainer may read it
    assert resolve_prompts(cfg.data.source) == [s.caption for s in HELD_OUT[:3]] * settings.ranking_rounds
    assert cfg.data.source.seed != method_config("dpo", settings).data.source.seed  # image seeds of its own

    base = report["base"]["ranking"]
    assert base["reward_accuracy"]["value"] == 0.5 and base["pairs"] == 3 * settings.ranking_rounds
    expected = evaluate_ranking(cfg, None, draws=settings.ranking_draws, seed=settings.seed)
    assert base["ranking_accuracy"]["value"] == expected.ranking.value
    for name, row in report["methods"].items():
        final = Path(row["run_dir"]) / "final"
        expected = evaluate_ranking(cfg, final, draws=settings.ranking_draws, seed=settings.seed)
        assert row["ranking"]["ranking_accuracy"]["value"] == expected.ranking.value
        assert row["ranking"]["reward_accuracy"]["value"] == expected.reward.value

    b = 2  # train.batch_size of `tiny`
    per_step = {"sft": 3 * b, "dpo": 3 * 2 * b + 2 * b}
    for name, row in report["methods"].items():
        c = row["compute"]
        assert c["per_step"]["forward_equivalents_per_step"] == per_step[name] and c["images_sampled"] == 0
        assert c["forward_equivalents"] == per_step[name] * c["steps"] and c["steps"] == settings.max_steps
    data = next(iter(report["data"].values()))
    assert data["images"] == 6 * settings.images_per_prompt  # data.source.num_prompts=6, K images each
    assert data["forward_equivalents"] == data["images"] * settings.num_inference_steps * 2  # CFG: two rows per step
    md = markdown_table(report)
    assert "| base | " in md and "reward accuracy" in md and "Spearman" in md
    assert (tmp_path / "report_methods.png").is_file() and (tmp_path / "report_ranking.png").is_file()

    again = run_toy_bench(settings, tmp_path / "again.json", progress=False)  # stored results, the same numbers
    assert all(r["ranking"]["reused"] for r in again["methods"].values()) and again["base"]["ranking"]["reused"]
    assert {n: r["ranking"]["reward_accuracy"] for n, r in again["methods"].items()} == {
        n: r["ranking"]["reward_accuracy"] for n, r in report["methods"].items()}


def test_spearman_is_the_rank_correlation_with_ties_averaged():
    from diffalign.eval.toyranking import average_ranks, relation, spearman

    x, y = [0.1, 0.4, 0.3, 0.9, 0.5], [1.0, 3.0, 2.0, 4.0, 6.0]  # no ties: rho = 1 - 6 sum d^2 / (n (n^2 - 1))
    d = [1 - 1, 3 - 3, 2 - 2, 5 - 4, 4 - 5]
    assert spearman(x, y) == pytest.approx(1 - 6 * sum(v * v for v in d) / (5 * 24))
    assert list(average_ranks([0.2, 0.7, 0.2, 0.1])) == [2.5, 4.0, 2.5, 1.0]
    rx, ry = [2.5, 4.0, 2.5, 1.0], [1.0, 2.0, 3.0, 4.0]  # ties: Pearson's r of the average ranks, by hand
    mx, my = sum(rx) / 4, sum(ry) / 4
    r = sum((a - mx) * (b - my) for a, b in zip(rx, ry)) / (
        sum((a - mx) ** 2 for a in rx) ** 0.5 * sum((b - my) ** 2 for b in ry) ** 0.5)
    assert spearman([0.2, 0.7, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]) == pytest.approx(r)
    assert spearman([0.5, 0.5, 0.5], [1, 2, 3]) is None and spearman([1, 2], [2, 1]) is None
    points = {m: {"win_rate": w, "ranking_accuracy": a, "reward_accuracy": -a} for m, w, a in zip("abcd", [0.6, 0.7, 0.8, 0.9], [0.1, 0.2, 0.3, 0.5])}
    rel = relation(points)
    assert rel["spearman_ranking_accuracy"] == pytest.approx(1.0) and rel["spearman_reward_accuracy"] == pytest.approx(-1.0)


def test_two_fresh_runs_give_the_same_report_timings_aside(tmp_path):
    """Everything rebuilt in two cache roots (data, training, samples, ranking, compute): the reports agree exactly once
    times, reuse flags and paths are removed, and `without_timings` does remove a timing, a flag and a path."""
    first = run_toy_bench(tiny(tmp_path / "a", "work", methods=("dpo", "npo")), tmp_path / "a" / "report.json", progress=False)
    second = run_toy_bench(tiny(tmp_path / "b", "work", methods=("dpo", "npo")), tmp_path / "b" / "report.json", progress=False)
    assert not any(r["reused"] for r in second["methods"].values())  # nothing shared between the roots
    assert first != second  # times and paths differ ...
    assert toybench.without_timings(first) == toybench.without_timings(second)  # ... nothing else does
    relation = first["ranking_relation"]  # across methods; the negative model, trained to lose, also left out
    assert relation["methods"] == ["sft", "dpo", "npo"] and relation["without_negative_models"]["methods"] == ["sft", "dpo"]
    kept = toybench.without_timings(first)["methods"]["dpo"]
    assert "train_seconds" not in kept and "reused" not in kept and "run_dir" not in kept and kept["run_key"] == first["methods"]["dpo"]["run_key"]
