"""Crash-safe checkpoints (diffalign.trainers.checkpoint) and safe tensor I/O (diffalign.io).

Covers reliability.md "Tests diffalign should have" items 2 (SIGKILL at every commit point),
3 (retention never deletes first), 7 (damaged files) and 9 (no unpickling anywhere).
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from diffalign.io import (
    SafeLoadError,
    atomic_write_bytes,
    atomic_write_text,
    load_safetensors,
    save_safetensors,
    torch_load,
    torch_save,
)
from diffalign.trainers.checkpoint import (
    MARKER,
    CheckpointError,
    commit,
    fault_point,
    is_committed,
    latest,
    list_committed,
    stage,
    staging_path,
    step_path,
    verify,
)

REPO = Path(__file__).resolve().parents[1]


def _save(root: Path, step: int, payload: dict, keep_last: int = 3, **kw) -> Path:
    d = stage(root, step)
    save_safetensors(d / "model.safetensors", {"w": torch.arange(64, dtype=torch.float32) + step})
    (d / "sub").mkdir()
    atomic_write_text(d / "sub" / "state.json", json.dumps(payload))
    return commit(root, step, d, keep_last=keep_last, **kw)


def _listing(root: Path) -> list[str]:
    return sorted(os.listdir(root))


# --------------------------------------------------------------------------- round trip / retention


def test_round_trip(tmp_path):
    root = tmp_path / "ckpt"
    assert latest(root) is None and list_committed(root) == []
    d = stage(root, 10)
    assert d == staging_path(root, 10) and d.is_dir() and not any(d.iterdir())
    save_safetensors(d / "model.safetensors", {"w": torch.ones(3, 4).t()}, metadata={"k": "v"})  # non-contiguous
    torch_save(d / "optimizer.pt", {"state": {0: {"exp_avg": torch.zeros(2)}}, "lr": 1e-4})
    atomic_write_bytes(d / "rng-rank0.bin", b"\x00\x01")
    final = commit(root, 10, d, keep_last=2)
    assert final == step_path(root, 10) and is_committed(final) and not d.exists()
    record = verify(final)
    assert record["step"] == 10 and record["version"] == 1 and "created" in record
    assert {f["path"] for f in record["files"]} == {"model.safetensors", "optimizer.pt", "rng-rank0.bin"}
    assert all(len(f["sha256"]) == 64 and f["size"] > 0 for f in record["files"])
    assert latest(root) == final
    assert torch.equal(load_safetensors(final / "model.safetensors")["w"], torch.ones(4, 3))
    assert torch_load(final / "optimizer.pt")["lr"] == 1e-4
    assert _listing(root) == ["step-00000010"]


def test_retention_keeps_newest_and_protected(tmp_path):
    root = tmp_path / "ckpt"
    for s in (1, 2, 3, 4):
        _save(root, s, {"s": s}, keep_last=2)
    assert [p.name for p in list_committed(root)] == ["step-00000003", "step-00000004"]
    _save(root, 5, {"s": 5}, keep_last=1, protect=[step_path(root, 3)])  # e.g. the dir this run resumed from
    assert [p.name for p in list_committed(root)] == ["step-00000003", "step-00000005"]


def test_recommit_same_step_replaces_after_new_is_in_place(tmp_path):
    root = tmp_path / "ckpt"
    _save(root, 2, {"v": "old"})
    _save(root, 3, {"v": "old"})
    final = _save(root, 3, {"v": "new"})  # resumed from an older step and re-reached step 3
    assert json.loads((final / "sub/state.json").read_text())["v"] == "new"
    assert _listing(root) == ["step-00000002", "step-00000003"] and latest(root) == final


def test_stage_removes_stale_staging_and_bad_commits_are_refused(tmp_path):
    root = tmp_path / "ckpt"
    d = stage(root, 7)
    (d / "junk").write_bytes(b"x")
    d = stage(root, 7)
    assert not any(d.iterdir())
    with pytest.raises(CheckpointError, match="keep_last"):
        commit(root, 7, d, keep_last=0)
    with pytest.raises(CheckpointError, match="staging dir missing"):
        commit(root, 8, tmp_path / "elsewhere", keep_last=1)
    (d / MARKER).write_text("{}")
    with pytest.raises(CheckpointError, match="already holds a commit marker"):
        commit(root, 7, d, keep_last=1)


def test_fault_point_spec(monkeypatch):
    monkeypatch.setenv("DIFFALIGN_FAULT", "nonsense")
    with pytest.raises(ValueError, match="DIFFALIGN_FAULT"):
        fault_point("checkpoint.write")
    monkeypatch.setenv("DIFFALIGN_FAULT", "other.point:1")
    fault_point("checkpoint.write")  # not named: no kill


# --------------------------------------------------------------------------- SIGKILL at every point

CHILD = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from diffalign.io import atomic_write_bytes, atomic_write_text
    from diffalign.trainers.checkpoint import commit, fault_point, stage
    root = Path(sys.argv[1])
    for i, step in enumerate([1, 2, 3, 3]):  # the last save re-reaches step 3, as after a resume
        print(f"save {i} {step}", flush=True)
        d = stage(root, step)
        atomic_write_bytes(d / "model.bin", bytes([i]) * 4096)
        fault_point("checkpoint.write")
        (d / "sub").mkdir()
        atomic_write_text(d / "sub" / "state.json", json.dumps({"save": i, "step": step}))
        commit(root, step, d, keep_last=1)
    print("done", flush=True)
    """
)
STEPS = [1, 2, 3, 3]
# Hits of each point in one run of CHILD: 4 saves; move-aside only on the re-commit; prune deletes
# step 1 (save 1), step 2 (save 2) and the moved-aside old step 3 (save 3).
HITS = {
    "checkpoint.write": 4,
    "checkpoint.after_files": 4,
    "checkpoint.before_rename": 4,
    "checkpoint.after_move_aside": 1,
    "checkpoint.after_rename": 4,
    "checkpoint.prune": 3,
}


def _run_child(tmp_path: Path, fault: str) -> tuple[subprocess.CompletedProcess, Path]:
    root = tmp_path / "ckpt"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "DIFFALIGN_FAULT": fault, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), str(root)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    return proc, root


def test_fault_table_is_complete(tmp_path):
    """One hit past each count never fires, so HITS lists every hit of every point."""
    proc, root = _run_child(tmp_path, ",".join(f"{p}:{n + 1}" for p, n in HITS.items()))
    assert proc.returncode == 0, proc.stderr
    assert _listing(root) == ["step-00000003"]


@pytest.mark.parametrize("point,n", [(p, n) for p, hits in HITS.items() for n in range(1, hits + 1)])
def test_sigkill_at_every_point(tmp_path, point, n):
    proc, root = _run_child(tmp_path, f"{point}:{n}")
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr)
    i = int(proc.stdout.strip().splitlines()[-1].split()[1])  # the save that was killed
    assert not any(root.glob("step-*")) or all(is_committed(p) for p in root.glob("step-*"))
    found = latest(root)  # verifies the newest; raises if it is damaged
    if i == 0:
        assert found is None or found == step_path(root, 1)
    else:  # retention never deleted first: previous or new checkpoint, never none, never partial
        assert found is not None and found.name in {f"step-{STEPS[i - 1]:08d}", f"step-{STEPS[i]:08d}"}
        assert json.loads((found / "sub/state.json").read_text())["save"] in {i - 1, i}
    for p in list_committed(root):
        verify(p)
    _save(root, 10, {"after": "crash"}, keep_last=1)  # the next save cleans every leftover
    assert _listing(root) == ["step-00000010"]


# --------------------------------------------------------------------------- damaged files

FILES = ["model.safetensors", "sub/state.json"]


def _damage(f: Path, how: str) -> None:
    data = f.read_bytes()
    if how == "delete":
        f.unlink()
        return
    if how.startswith("flip"):
        i = 0 if how == "flip_first" else len(data) - 1
        data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]
    else:
        data = data[: {"trunc0": 0, "half": len(data) // 2, "minus1": len(data) - 1}[how]]
    f.write_bytes(data)


@pytest.mark.parametrize("how", ["trunc0", "half", "minus1", "flip_first", "flip_last", "delete"])
@pytest.mark.parametrize("name", FILES)
def test_damaged_file_is_named(tmp_path, name, how):
    root = tmp_path / "ckpt"
    _save(root, 1, {"a": 1})
    final = _save(root, 2, {"a": 2})
    _damage(final / name, how)
    with pytest.raises(CheckpointError, match=re.escape(name)):
        verify(final)
    with pytest.raises(CheckpointError, match=re.escape(name)):
        latest(root)  # loud: never silently falls back to step 1
    verify(step_path(root, 1))


def test_missing_marker_means_not_committed(tmp_path):
    root = tmp_path / "ckpt"
    first = _save(root, 1, {"a": 1})
    final = _save(root, 2, {"a": 2})
    (final / MARKER).unlink()
    assert not is_committed(final)
    with pytest.raises(CheckpointError, match=MARKER):
        verify(final)
    assert latest(root) == first and list_committed(root) == [first]


def test_corrupt_marker_and_ignored_dirs(tmp_path):
    root = tmp_path / "ckpt"
    first = _save(root, 1, {"a": 1})
    (root / "step-00000005").mkdir()  # unmarked: ignored
    (root / ".staging-step-00000006").mkdir()
    (root / ".staging-step-00000006" / "model.safetensors").write_bytes(b"partial")
    assert latest(root) == first
    (first / MARKER).write_text("{not json")
    with pytest.raises(CheckpointError, match=MARKER):
        latest(root)


# --------------------------------------------------------------------------- no unpickling


class _Evil:
    def __init__(self, canary: str):
        self.canary = canary

    def __reduce__(self):
        return (open, (self.canary, "w"))


@pytest.mark.parametrize("force_no_weights_only", [False, True])
@pytest.mark.parametrize("kind", ["torch_zip", "raw_pickle"])
def test_torch_load_refuses_crafted_pickle(tmp_path, monkeypatch, kind, force_no_weights_only):
    canary = tmp_path / "canary"
    f = tmp_path / "evil.pt"
    if kind == "torch_zip":
        torch.save({"w": torch.zeros(2), "x": _Evil(str(canary))}, f)
        unsafe = lambda: torch.load(f, weights_only=False)  # noqa: E731
    else:
        f.write_bytes(pickle.dumps(_Evil(str(canary))))
        unsafe = lambda: pickle.loads(f.read_bytes())  # noqa: E731
    unsafe()  # control: the payload is live
    assert canary.exists()
    canary.unlink()
    if force_no_weights_only:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(SafeLoadError, match=re.escape(str(f))):
        torch_load(f)
    assert not canary.exists()


def test_loaders_name_the_file_on_garbage(tmp_path):
    for name, loader in [("bad.pt", torch_load), ("bad.safetensors", load_safetensors)]:
        f = tmp_path / name
        f.write_bytes(b"\x00garbage" * 10)
        with pytest.raises(SafeLoadError, match=re.escape(name)):
            loader(f)
    with pytest.raises(SafeLoadError, match="missing.pt"):
        torch_load(tmp_path / "missing.pt")


PICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib"}


def _unsafe_calls(source: str, filename: str) -> list[str]:
    bad = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLERS:
            bad += [f"{where} from {node.module} import {a.name}" for a in node.names
                    if a.name in {"load", "loads", "Unpickler", "*"}]
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        attr, owner = node.func.attr, node.func.value
        owner = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", "")
        kw = {k.arg: k.value for k in node.keywords}
        safe_torch = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
        pickle_np = "allow_pickle" in kw and not (
            isinstance(kw["allow_pickle"], ast.Constant) and kw["allow_pickle"].value is False)
        if (owner in PICKLERS and attr in {"load", "loads", "Unpickler"}
                or owner == "torch" and attr == "load" and not safe_torch
                or owner == "yaml" and attr in {"load", "load_all", "unsafe_load", "full_load", "unsafe_load_all"}
                or owner in {"np", "numpy"} and attr == "load" and pickle_np
                or attr == "read_pickle"):
            bad.append(f"{where} {owner}.{attr}(...)")
    return bad


def test_ast_scanner_catches_unsafe_calls():
    src = textwrap.dedent(
        """
        import pickle, torch, yaml, numpy as np
        pickle.loads(b""); pickle.load(f); torch.load(p); torch.load(p, weights_only=flag)
        yaml.load(s, Loader=yaml.SafeLoader); np.load(p, allow_pickle=True)
        from pickle import loads
        torch.load(p, weights_only=True); yaml.safe_load(s); np.load(p); np.load(p, allow_pickle=False)
        """
    )
    assert len(_unsafe_calls(src, "x.py")) == 7


def test_package_never_unpickles():
    roots = [REPO / "diffalign", REPO / "pipelines", REPO / "eval"]  # pyproject maps all three into the package
    files = [f for r in roots if r.is_dir() for f in r.rglob("*.py")]
    assert REPO / "diffalign" / "io.py" in files
    bad = [hit for f in files for hit in _unsafe_calls(f.read_text("utf-8"), str(f.relative_to(REPO)))]
    assert bad == [], "unsafe deserialisation:\n" + "\n".join(bad)
