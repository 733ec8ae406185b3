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
