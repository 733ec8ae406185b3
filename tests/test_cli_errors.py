"""Bad input through the real command: one clear message naming what and where, exit status 2."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import tiny_config, write_config

from diffalign.cli import main
from diffalign.config.base import BUILTIN_MODELS, BUILTIN_TINY_SDXL
from diffalign.models.tiny import tiny_sd15_pipeline


def _run(capsys, *args):
    code = main(list(args))
    return code, capsys.readouterr().err


@pytest.fixture
def cfg_path(tmp_path, demo_parquet):
    return write_config(tmp_path / "cfg.yaml", tiny_config(tmp_path, parquet=demo_parquet))


def test_unknown_override_key(capsys, cfg_path):
    code, err = _run(capsys, "train", str(cfg_path), "train.max_stepz=3")
    assert code == 2 and "train.max_stepz: unknown key; did you mean 'max_steps'?" in err


def test_wrong_type(capsys, cfg_path):
    code, err = _run(capsys, "train", str(cfg_path), "train.max_steps=abc")
    assert code == 2 and "train.max_steps" in err and "'abc'" in err


def test_missing_config_file(capsys, tmp_path):
    code, err = _run(capsys, "train", str(tmp_path / "nope.yaml"))
    assert code == 2 and "config file not found" in err and "nope.yaml" in err


def test_missing_model_path(capsys, cfg_path, tmp_path):
    code, err = _run(capsys, "train", str(cfg_path), f"model.pretrained={tmp_path / 'no_model'}")
    assert code == 2 and "model.pretrained" in err and "no_model" in err


def test_model_dir_that_is_not_a_pipeline(capsys, cfg_path, tmp_path):
    (tmp_path / "empty_model").mkdir()
    code, err = _run(capsys, "prepare", str(cfg_path), f"model.pretrained={tmp_path / 'empty_model'}")
    assert code == 2 and "unet/config.json" in err


def test_missing_parquet(capsys, cfg_path, tmp_path):
    code, err = _run(capsys, "prepare", str(cfg_path), f"data.source.path={tmp_path / 'missing.parquet'}")
    assert code == 2 and "missing.parquet" in err


def test_dataset_of_only_ties_is_empty(capsys, tmp_path, demo_parquet):
    table = pq.read_table(demo_parquet)
    ties = table.set_column(table.schema.get_field_index("label_0"), "label_0", pa.array([0.5] * table.num_rows))
    pq.write_table(ties, tmp_path / "ties.parquet")
    cfg = write_config(tmp_path / "ties.yaml", tiny_config(tmp_path, parquet=tmp_path / "ties.parquet"))
    code, err = _run(capsys, "train", str(cfg))
    assert code == 2 and "ties" in err


def test_mismatched_cache_is_refused(capsys, cfg_path):
    assert main(["prepare", str(cfg_path)]) == 0
    capsys.readouterr()
    code, err = _run(capsys, "train", str(cfg_path), "data.resolution=16")
    assert code == 2 and "resolution" in err and "32" in err and "16" in err


def _line_naming(err: str, key: str) -> str:
    return next(line for line in err.splitlines() if key in line)


@pytest.mark.parametrize("pretrained", BUILTIN_MODELS)
def test_a_separate_vae_is_refused_with_a_builtin_model(capsys, cfg_path, tmp_path, pretrained):
    """A builtin's UNet works in its own VAE's latent space: a separate VAE is refused, not silently ignored."""
    vae = tmp_path / "no" / "such" / "vae"
    code, err = _run(capsys, "prepare", str(cfg_path), f"model.pretrained={pretrained}", f"model.vae={vae}")
    assert code == 2
    line = _line_naming(err, "model.vae")
    assert str(vae) in line and pretrained in line and "own VAE" in line


def test_a_missing_vae_directory_of_a_local_model_names_model_vae(capsys, cfg_path, tmp_path):
    tiny_sd15_pipeline().save_pretrained(tmp_path / "model")
    capsys.readouterr()
    vae = tmp_path / "no_such_vae"
    code, err = _run(capsys, "prepare", str(cfg_path), f"model.pretrained={tmp_path / 'model'}", f"model.vae={vae}")
    assert code == 2 and err.count("\n") == 1, err
    assert "model.vae" in err and str(vae) in err and "model.pretrained" not in err


def test_a_mistyped_builtin_lists_the_builtin_models(capsys, cfg_path):
    typo = BUILTIN_TINY_SDXL[:-1]
    code, err = _run(capsys, "prepare", str(cfg_path), f"model.pretrained={typo}")
    assert code == 2
    line = _line_naming(err, "model.pretrained")
    assert "unknown builtin" in line and typo in line and all(name in line for name in BUILTIN_MODELS)
