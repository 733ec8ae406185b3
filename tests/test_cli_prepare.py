"""`diffalign prepare` ends with a summary of what the cache holds, read from its manifest."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
from conftest import tiny_config, write_config

from diffalign.cli import main


def _with_corrupt_images_and_a_tie(demo_parquet, path, corrupt=(1, 2), tie=3):
    """The demo pairs with the second image of rows `corrupt` truncated and row `tie` labelled 0.5."""
    table = pq.read_table(demo_parquet)
    jpg_1, label = table.column("jpg_1").to_pylist(), table.column("label_0").to_pylist()
    for row in corrupt:
        jpg_1[row] = jpg_1[row][:64]
    label[tie] = 0.5
    table = table.set_column(table.schema.get_field_index("jpg_1"), "jpg_1", pa.array(jpg_1, table.schema.field("jpg_1").type))
    table = table.set_column(table.schema.get_field_index("label_0"), "label_0", pa.array(label, table.schema.field("label_0").type))
    pq.write_table(table, path)
    return path


def test_prepare_prints_what_it_wrote_skipped_and_tied(tmp_path, capsys, demo_parquet):
    parquet = _with_corrupt_images_and_a_tie(demo_parquet, tmp_path / "pairs.parquet")
    cfg = write_config(tmp_path / "cfg.yaml", tiny_config(tmp_path, parquet=parquet))
    assert main(["prepare", str(cfg)]) == 0
    out = capsys.readouterr().out
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    counts, reasons = manifest["counts"], {s["reason"] for s in manifest["skipped"]}
    assert counts["skipped"] == 2 and counts["ties"] == 1 and len(reasons) == 1
    assert f"cache ready: {tmp_path / 'cache'} (built in " in out
    assert f"items: {counts['items']} written ({counts['images']} images" in out and f"in {counts['shards']} shard(s)" in out
    assert f"from {counts['source_items']} source items" in out
    assert f"skipped: 2 (2 × {reasons.pop()}" in out
    assert "ties: 1 item(s) labelled 0.5 (data.ties = drop" in out

    assert main(["prepare", str(cfg)]) == 0  # complete already: said, with the same numbers
    again = capsys.readouterr().out
    assert "already complete" in again and f"items: {counts['items']} written" in again
