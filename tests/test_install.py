"""`pipelines/`, `eval/` and `configs/` install as `diffalign.pipelines`, `diffalign.eval`, `diffalign.configs`,
in regular and editable installs alike (pyproject's package-dir mapping)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# source folder -> its package folder in an install (pyproject's `[tool.setuptools] package-dir`)
INSTALLED_AS = {"diffalign": Path("diffalign"), "pipelines": Path("diffalign/pipelines"), "eval": Path("diffalign/eval"),
                "configs": Path("diffalign/configs")}
PROBE = """
import site, sys
site.addsitedir(sys.argv[1])
import diffalign, diffalign.pipelines, diffalign.eval, diffalign.configs
from importlib import resources
names = sorted(p.name for p in resources.files("diffalign.configs").iterdir() if p.name.endswith(".yaml"))
print(diffalign.__file__); print(diffalign.pipelines.__file__); print(diffalign.eval.__file__); print(",".join(names))
from pathlib import Path
root, evaluation = Path(diffalign.__file__).parent, Path(diffalign.eval.__file__).parent
data = [root / "scorers/data/visionreward/weight_select.json", root / "scorers/data/visionreward/LICENSE",
        evaluation / "data/parti/PartiPrompts.tsv", evaluation / "data/parti/LICENSE"]
print(",".join(str(f.is_file()) for f in data))
"""


def _source_files(src: Path) -> list[Path]:
    """Every .py and .yaml under the package folders, relative to the project root."""
    return sorted(f.relative_to(src) for folder in INSTALLED_AS for f in (src / folder).rglob("*")
                  if f.suffix in (".py", ".yaml") and "__pycache__" not in f.parts)


def _installed_path(source_file: Path) -> Path:
    return INSTALLED_AS[source_file.parts[0]] / Path(*source_file.parts[1:])


def _copy_project(dst: Path) -> Path:
    dst.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, dst / name)
    for name in INSTALLED_AS:
        shutil.copytree(REPO / name, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def _install_and_probe(tmp_path: Path, editable: bool) -> list[str]:
    src = _copy_project(tmp_path / "src")
    target = tmp_path / "site"
    # never touch the running install
    args = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", "--ignore-installed"]
    if editable:
        args += ["-e", str(src), "--prefix", str(tmp_path / "prefix")]
    else:
        args += [str(src), "--target", str(target)]
    subprocess.run(args, check=True, capture_output=True, text=True, cwd=tmp_path)
    site_dir = next((tmp_path / "prefix").glob("lib/python*/site-packages")) if editable else target
    # -S: no site-packages of the test environment, only the fresh install is importable
    out = subprocess.run([sys.executable, "-S", "-c", PROBE, str(site_dir)], check=True, capture_output=True, text=True, cwd=tmp_path)
    return out.stdout.split()


@pytest.mark.parametrize("editable", [False, True], ids=["regular", "editable"])
def test_namespace_mapping_installs(tmp_path, editable):
    root, pipelines, evaluation, configs, data = _install_and_probe(tmp_path, editable)
    assert data == "True,True,True,True"  # package data: the VisionReward preset and PartiPrompts, with their licences
    home = tmp_path / "src" if editable else tmp_path / "site"
    assert Path(root).is_relative_to(home)
    want_pipelines = home / ("pipelines" if editable else "diffalign/pipelines") / "__init__.py"
    want_eval = home / ("eval" if editable else "diffalign/eval") / "__init__.py"
    assert Path(pipelines) == want_pipelines and Path(evaluation) == want_eval
    assert {"sd15_dpo.yaml", "sdxl_dpo.yaml", "sdxl_dpo_lora.yaml", "tiny_sdxl_dpo.yaml"} <= set(configs.split(","))
    if not editable:  # every module and recipe of the source tree made it into the wheel (pyproject lists packages by hand)
        files = _source_files(tmp_path / "src")
        assert {f.parts[0] for f in files} == set(INSTALLED_AS)
        missing = [str(f) for f in files if not (home / _installed_path(f)).is_file()]
        assert not missing, f"in the source tree but not in the wheel: {', '.join(missing)}"
