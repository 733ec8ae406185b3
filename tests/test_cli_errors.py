"""Bad input through the real command: one clear message naming what and where, exit status 2."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import tiny_config, write_config

from diffalign.cli import main


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
