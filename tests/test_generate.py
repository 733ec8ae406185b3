"""`diffalign generate`: folders `score` and `compare` read, seeds and ranges, resuming, positive and negative weights,
and the README's generate → score → compare example run exactly as written (in a fresh directory)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from PIL import Image

from diffalign.cli import _seeds, main
from diffalign.config import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")
README = Path(__file__).resolve().parents[1] / "README.md"
PROMPTS = ["a red circle on a white background", "a small blue square on a black background"]


def _generate(out, *extra):
    return main(["generate", "--model", "builtin:toy", "--prompts", *PROMPTS, "--seeds", "0-1", "--steps", "4",
                 "--guidance-scale", "3", "--out", str(out), "--no-progress", *extra])


def _lines(folder) -> list[dict]:
    return [json.loads(line) for line in (Path(folder) / "metadata.jsonl").read_text().splitlines()]


def test_seeds_and_ranges():
    assert _seeds(["0", "1", "2"]) == [0, 1, 2]
    assert _seeds(["3-5", "0", "4"]) == [3, 4, 5, 0]
    for bad in (["a"], ["5-2"], ["1-x"]):
        with pytest.raises(ConfigError):
            _seeds(bad)


def test_generate_writes_what_score_reads_and_resumes(tmp_path, capsys):
    out = tmp_path / "base"
    assert _generate(out) == 0
    lines = _lines(out)
    assert [(r["prompt"], r["seed"]) for r in lines] == [(p, s) for p in PROMPTS for s in (0, 1)]
    assert all(r["model"] == "builtin:toy" and r["steps"] == 4 and r["guidance"] == 3.0 and r["scheduler"] == "ddim" for r in lines)
    assert (out / "contact_sheet.png").is_file()
    first = {r["file"]: (out / r["file"]).read_bytes() for r in lines}

    (out / lines[1]["file"]).unlink()  # a lost image is made again, the same bytes (its own seed)
    capsys.readouterr()
    assert _generate(out) == 0
    assert "(1 generated, 3 already there)" in capsys.readouterr().out
    assert {r["file"]: (out / r["file"]).read_bytes() for r in _lines(out)} == first

    assert _generate(out, "--guidance-scale", "5") == 0  # other settings: every image is made again
    assert "(4 generated, 0 already there)" in capsys.readouterr().out
    assert all(r["guidance"] == 5.0 for r in _lines(out))

    assert main(["score", str(out), "--scorers", "toy-checklist", "--out", str(tmp_path / "scores")]) == 0
    assert (tmp_path / "scores.csv").is_file()


def test_images_do_not_depend_on_the_batch(tmp_path):
    _generate(tmp_path / "a", "--batch-size", "1")
    _generate(tmp_path / "b", "--batch-size", "4")
    for r in _lines(tmp_path / "a"):
        a = torch.tensor(list(Image.open(tmp_path / "a" / r["file"]).getdata()), dtype=torch.float32)
        b = torch.tensor(list(Image.open(tmp_path / "b" / r["file"]).getdata()), dtype=torch.float32)
        assert (a - b).abs().max() <= 1  # float rounding of batched matmuls may move a pixel value by one


def test_prompt_sources_and_refusals(tmp_path, capsys):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("".join(json.dumps({"prompt": p, "category": "x"}) + "\n" for p in PROMPTS))
    assert main(["generate", "--model", "builtin:toy", "--prompts-file", str(jsonl), "--steps", "2", "--out", str(tmp_path / "j"),
                 "--no-progress"]) == 0
    assert [r["prompt"] for r in _lines(tmp_path / "j")] == PROMPTS
    cases = [
        (["--prompts", "x", "--prompt-set", "parti"], "exactly one of"),
        (["--prompts", "x", "--lora", str(tmp_path), "--unet", str(tmp_path)], "not both"),
        (["--prompts", "x", "--npo", str(tmp_path / "missing")], "no such file"),
        (["--prompts-file", str(tmp_path / "none.txt")], "not found"),
    ]
    for args, message in cases:
        capsys.readouterr()
        assert main(["generate", "--model", "builtin:toy", "--out", str(tmp_path / "bad"), *args]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):  # an unknown scheduler is refused before any model loads
        main(["generate", "--model", "builtin:toy", "--prompts", "x", "--scheduler", "heun2", "--out", str(tmp_path / "bad")])
    assert "invalid choice: 'heun2'" in capsys.readouterr().err


def test_a_negative_model_passed_as_the_positive_one_warns(tmp_path, capsys):
    import yaml

    from diffalign.config import LoraConfig, ModelConfig
    from diffalign.models.loading import load_components
    from diffalign.models.lora import attach_lora, save_lora

    components = load_components(ModelConfig(pretrained="builtin:toy"))
    attach_lora(components.unet, LoraConfig(rank=2, alpha=2, init="gaussian"))
    with torch.no_grad():  # a LoRA that changes the model (peft starts lora_B at zero)
        for name, p in components.unet.named_parameters():
            if ".lora_B" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    final = tmp_path / "run" / "final"
    final.mkdir(parents=True)
    save_lora(components.unet, final, components.family)
    (final / "config.yaml").write_text(yaml.safe_dump({"model": {"pretrained": "builtin:toy"}, "method": {"name": "npo"}}))

    def pixels(folder):
        return [torch.tensor(list(Image.open(folder / r["file"]).getdata()), dtype=torch.float32) for r in _lines(folder)]

    assert _generate(tmp_path / "base") == 0
    assert _generate(tmp_path / "as_lora", "--lora", str(final)) == 0
    assert "trained as a negative model" in capsys.readouterr().err
    assert _lines(tmp_path / "as_lora")[0]["adapter"] == str(final)
    assert _generate(tmp_path / "as_npo", "--npo", str(final), "--npo-beta", "0.5") == 0
    assert "negative model" not in capsys.readouterr().err
    assert _lines(tmp_path / "as_npo")[0]["npo_beta"] == 0.5
    assert _generate(tmp_path / "npo_off", "--npo", str(final), "--npo-beta", "0") == 0
    base = pixels(tmp_path / "base")
    for folder, same in (("as_lora", False), ("as_npo", False), ("npo_off", True)):  # β = 0: the NPO offset is not applied
        diffs = [float((a - b).abs().max()) for a, b in zip(pixels(tmp_path / folder), base)]
        assert (max(diffs) <= 1) if same else (max(diffs) > 8), (folder, diffs)


def _readme_example(name: str) -> list[list[str]]:
    block = re.search(rf"<!-- readme-example: {name} -->\n```bash\n(.*?)```", README.read_text(), re.S).group(1)
    return [shlex.split(line) for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def test_the_readme_generate_example_runs_as_written(tmp_path, monkeypatch):
    """Every line of README.md's generate example, as a newcomer types it, in an empty directory."""
    monkeypatch.chdir(tmp_path)
    commands = _readme_example("generate")
    assert [c[:2] for c in commands] == [["diffalign", "train"], ["diffalign", "generate"], ["diffalign", "generate"],
                                         ["diffalign", "score"], ["diffalign", "compare"]]
    for words in commands:
        assert main(words[1:]) == 0, " ".join(words)
    assert len(_lines("samples/npo")) == len(_lines("samples/base")) == 62  # the held-out captions, one seed
    report = json.loads(Path("outputs/compare_npo/compare.json").read_text())
    assert "toy-checklist" in json.dumps(report)

    # docs/pipelines.md's Python example, on the NPO weights the README example trained
    docs = (README.parent / "docs" / "pipelines.md").read_text()
    code = re.search(r"<!-- docs-example: pipelines -->\n```python\n(.*?)```", docs, re.S).group(1)
    exec(compile(code, "docs/pipelines.md", "exec"), {})
    assert Image.open("npo_cfg.png").size == (32, 32)


def test_two_processes_write_the_folder_one_process_writes(tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo), the shipped multi_gpu config: batches alternate between the ranks,
    each image is computed in the batch one process computes it in, so the folder is the same file for file, byte for
    byte, metadata.jsonl and contact sheet included; a resumed 2-process run makes only what is missing; `score` split
    over 2 processes writes the tables one process writes."""
    import os
    import socket
    import subprocess
    import sys

    from diffalign.config.loading import shipped_accelerate_configs

    args = ["--model", "builtin:toy", "--prompts", *PROMPTS, "a large green triangle on a gray background", "--seeds", "0-2", "--steps", "3",
            "--guidance-scale", "3", "--batch-size", "2", "--no-progress"]
    assert main(["generate", *args, "--out", str(tmp_path / "one")]) == 0

    def launch(*command: str) -> subprocess.CompletedProcess:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(shipped_accelerate_configs()["accelerate/multi_gpu"]),
               "--num_processes", "2", "--main_process_port", str(port), "-m", "diffalign",
               *(command or ("generate", *args, "--out", str(tmp_path / "two")))]
        env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)

    two = launch()
    assert two.returncode == 0, two.stderr[-3000:]
    assert "9 images in" in two.stdout and "(9 generated, 0 already there, over 2 processes)" in two.stdout
    files = lambda d: {p.name: p.read_bytes() for p in sorted(d.iterdir())}  # noqa: E731
    assert files(tmp_path / "two") == files(tmp_path / "one")  # images, metadata.jsonl, contact sheet; no part left behind

    for line in _lines(tmp_path / "two")[2:5]:
        (tmp_path / "two" / line["file"]).unlink()
    again = launch()
    assert again.returncode == 0, again.stderr[-3000:]
    assert "(3 generated, 6 already there, over 2 processes)" in again.stdout
    assert files(tmp_path / "two") == files(tmp_path / "one")

    # scoring split the same way (batches alternate, each rank journals its share, the main process writes the merge)
    score = ["--scorers", "toy-checklist", "--batch-size", "2", "--no-progress"]
    assert main(["score", str(tmp_path / "one"), *score, "--out", str(tmp_path / "one_scores")]) == 0
    split = launch("score", str(tmp_path / "two"), *score, "--out", str(tmp_path / "two_scores"))
    assert split.returncode == 0, split.stderr[-3000:]
    assert re.search(r"9 images\s+in [\d.]+s\s+over 2\s+processes", split.stdout), split.stdout
    for suffix in (".csv", ".jsonl"):
        assert (tmp_path / f"two_scores{suffix}").read_bytes() == (tmp_path / f"one_scores{suffix}").read_bytes()
    assert not list(tmp_path.glob("*.partial.jsonl"))  # the ranks' journals are gone with the tables written


def test_a_killed_multi_process_run_keeps_its_committed_parts(tmp_path, capsys):
    """A rank's metadata part (what a run killed before the merge leaves) counts as committed: the next run skips those
    images and merges the part into metadata.jsonl."""
    out = tmp_path / "base"
    assert _generate(out) == 0
    lines = _lines(out)
    (out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines[:1]))
    (out / "metadata.part-1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines[1:3]))
    capsys.readouterr()
    assert _generate(out) == 0
    assert "(1 generated, 3 already there)" in capsys.readouterr().out
    assert _lines(out) == lines and not list(out.glob("metadata.part-*"))
