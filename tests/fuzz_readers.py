"""Fuzz every reader of a file diffalign writes or takes in (reliability item 10), with Hypothesis.

Each reader gets a valid file of its kind, then random bytes and mutations of it: truncated, bytes flipped, a range
cut out or doubled, the safetensors header's length field and its JSON (dtypes, absurd shapes and offsets) rewritten.
The only exceptions allowed out are diffalign's own (`diffalign.errors.USER_ERRORS`); the score journal must not raise
at all (it starts over). Memory stays bounded by construction (header sizes and shapes are checked before anything
is allocated), and the process's address space is capped (4 GiB beyond what it maps at the start), so a reader that
trusted an absurd header would fail here with MemoryError; the run reports, per reader, how far the process's peak RSS
rose while it was fuzzed.

    python -m tests.fuzz_readers --examples 200     # the CI size (tests/test_fuzz.py runs this)
    python -m tests.fuzz_readers --examples 2000    # the full size, outside CI

Prints one JSON line: examples per reader and each reader's peak RSS growth in MiB.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import struct
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffalign.errors import USER_ERRORS


def _mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ----------------------------------------------------------------------------------------------- mutations


def _safetensors_header_edits(valid: bytes) -> st.SearchStrategy[bytes]:
    """The header JSON rewritten: a tensor's dtype, shape or offsets replaced (absurd sizes included)."""
    n = struct.unpack("<Q", valid[:8])[0]
    header = json.loads(valid[8 : 8 + n])
    names = sorted(k for k in header if k != "__metadata__")
    huge = st.one_of(st.integers(-5, 64), st.integers(0, 2**63 - 1), st.just(2**64 - 1))

    def edit(choice):
        name, field, value = choice
        h = json.loads(json.dumps(header))
        h[name][field] = value
        body = json.dumps(h).encode()
        return struct.pack("<Q", len(body)) + body + valid[8 + n :]

    values = st.one_of(
        st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F64", "XX", ""]),
        st.lists(huge, max_size=5),
        st.lists(huge, min_size=2, max_size=2),
        st.none(), st.text(max_size=5), huge,
    )
    return st.tuples(st.sampled_from(names), st.sampled_from(["dtype", "shape", "data_offsets"]), values).map(edit)


def mutations(valid: bytes, safetensors: bool = False) -> st.SearchStrategy[bytes]:
    size = len(valid)
    pos = st.integers(0, max(0, size - 1))
    flips = st.lists(st.tuples(pos, st.integers(0, 255)), min_size=1, max_size=8)

    def flip(edits):
        b = bytearray(valid)
        for i, v in edits:
            b[i] = v
        return bytes(b)

    options = [
        st.binary(max_size=600),
        pos.map(lambda i: valid[:i]),
        flips.map(flip),
        st.tuples(pos, pos).map(lambda ab: valid[: min(ab)] + valid[max(ab) :]),
        st.tuples(pos, pos).map(lambda ab: valid[: max(ab)] + valid[min(ab) :]),
    ]
    if safetensors:
        options += [st.integers(0, 2**64 - 1).map(lambda n: struct.pack("<Q", n) + valid[8:]), _safetensors_header_edits(valid)]
    return st.one_of(options)


# ----------------------------------------------------------------------------------------------- readers


class Fuzz:
    def __init__(self, root: Path, examples: int):
        self.root = root
        self.examples = examples
        self.counts: dict[str, int] = {}
        self.growth: dict[str, float] = {}
        self.settings = settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                                 suppress_health_check=list(HealthCheck))

    def run(self, name: str, valid: bytes, target: Path, read, safetensors: bool = False, allowed=USER_ERRORS) -> None:
        """Write each mutation of `valid` to `target`, call `read()`; anything but `allowed` fails."""
        self.counts[name] = 0

        @self.settings
        @given(mutations(valid, safetensors))
        def check(data: bytes) -> None:
            self.counts[name] += 1
            target.write_bytes(data)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    read()
            except allowed:
                pass

        before = _mib()
        try:
            check()
        finally:
            target.write_bytes(valid)
        self.growth[name] = round(_mib() - before, 1)  # the high-water mark's rise while fuzzing (setup excluded)


def fuzz_io(f: Fuzz) -> None:
    from diffalign.io import load_safetensors, save_safetensors, torch_load, torch_save

    st_path, pt_path = f.root / "x.safetensors", f.root / "x.pt"
    save_safetensors(st_path, {"a": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(2, dtype=torch.int64)},
                     metadata={"k": "v"})
    torch_save(pt_path, {"step": 3, "state": {"m": torch.zeros(4)}, "list": [torch.ones(2)]})
    f.run("safetensors", st_path.read_bytes(), st_path, lambda: load_safetensors(st_path), safetensors=True)
    f.run("torch_load", pt_path.read_bytes(), pt_path, lambda: torch_load(pt_path))


def fuzz_checkpoint(f: Fuzz) -> None:
    from diffalign.io import save_safetensors
    from diffalign.trainers import checkpoint as ckpt

    root = f.root / "ckpts"
    staging = ckpt.stage(root, 5)
    save_safetensors(staging / "model.safetensors", {"w": torch.zeros(8)})
    step = ckpt.commit(root, 5, staging, keep_last=2)
    marker = step / ckpt.MARKER
    f.run("checkpoint manifest", marker.read_bytes(), marker, lambda: (ckpt.verify(step), ckpt.latest(root)))
    weights = step / "model.safetensors"
    f.run("checkpoint file", weights.read_bytes(), weights, lambda: ckpt.verify(step), safetensors=True)


def fuzz_cache(f: Fuzz) -> None:
    from diffalign.config import validate_config
    from diffalign.data import LatentPairDataset, check_cache, prepare_cache
    from diffalign.data.sources import write_demo_parquet
    from diffalign.models.loading import load_components

    parquet = write_demo_parquet(f.root / "demo.parquet", num_pairs=6, image_size=32, seed=0)
    cfg = validate_config({"model": {"pretrained": "builtin:tiny-sd15"},
                           "data": {"source": {"kind": "pickapic", "path": str(parquet)}, "cache_dir": str(f.root / "cache"),
                                    "resolution": 32, "shard_size": 4, "latent_dtype": "float32", "scores": ["toy-checklist"]}})
    root = prepare_cache(cfg, progress=False)
    components = load_components(cfg.model)

    def read():
        check_cache(cfg, components)
        ds = LatentPairDataset(root, cfg.data)
        for i in range(len(ds)):
            ds[i]

    scores = [p.relative_to(root).as_posix() for p in sorted((root / "scores").rglob("*")) if p.is_file()]
    for rel in ("manifest.json", "shards/00000.parquet", "shards/00001.parquet", "shards/00000.safetensors", "text_empty.safetensors",
                *scores):
        path = root / rel
        f.run(f"cache {rel}", path.read_bytes(), path, read, safetensors=rel.endswith(".safetensors"))


def fuzz_folders(f: Fuzz) -> None:
    from diffalign.eval.folderscore import ScoreJournal
    from diffalign.eval.imagefolder import read_folder

    folder = f.root / "images"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i:05d}.png").write_bytes(b"")  # read_folder lists files; it does not decode them
    meta = folder / "metadata.jsonl"
    meta.write_text("".join(json.dumps({"file": f"{i:05d}.png", "prompt": f"p{i}", "seed": i, "model": "m"}) + "\n" for i in range(3)))
    f.run("metadata.jsonl", meta.read_bytes(), meta, lambda: read_folder(folder))

    journal = ScoreJournal(f.root / "s.partial.jsonl", {"scorers": ["x"], "records": "abc"})
    journal.start([{"files": ["a.png"], "skipped": [], "scores": {"x": [0.5]}}])
    journal.append({"files": ["b.png"], "skipped": [["b.png", "bad"]], "scores": {}})
    journal.close()
    f.run("score journal", journal.path.read_bytes(), journal.path, journal.load, allowed=())


HOSTILE_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.sampled_from([0, -1, float("nan"), float("inf"), -float("inf")]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(["", "../../../etc", "/dev/null", "~/x", "..", "nan", "1e400"]),
    st.text(max_size=12), st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


def _leaves(node: dict, prefix: tuple = ()) -> list[tuple]:
    out = []
    for k, v in node.items():
        out += _leaves(v, (*prefix, k)) if isinstance(v, dict) and v else [(*prefix, k)]
    return out


def fuzz_config(f: Fuzz) -> None:
    """Each shipped recipe with one value replaced by a hostile one, or a key added: it validates and round-trips
    dump -> load unchanged, or raises `ConfigError` naming the dotted key."""
    import yaml

    from diffalign.config import ConfigError, dump_config, load_config, shipped_configs, validate_config

    recipes = {name: yaml.safe_load(dump_config(load_config(name))) for name in shipped_configs()}
    f.counts["config"] = 0

    @f.settings
    @given(st.sampled_from(sorted(recipes)), st.data())
    def check(name, data):
        f.counts["config"] += 1
        cfg = json.loads(json.dumps(recipes[name]))
        leaves = _leaves(cfg)
        if data.draw(st.booleans(), "new key"):
            path = (*data.draw(st.sampled_from(leaves), "beside")[:-1], data.draw(st.sampled_from(["lr", "betta", "x", "__class__"]), "key"))
        else:
            path = data.draw(st.sampled_from(leaves), "leaf")
        node = cfg
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = data.draw(HOSTILE_VALUES, "value")
        try:
            valid = validate_config(cfg)
        except ConfigError as e:
            dotted = ".".join(map(str, path))
            named = [".".join(map(str, path[:i])) for i in range(len(path), 0, -1)]
            assert any(key in str(e) for key in named), f"{dotted}: the error does not name it:\n{e}"
            return
        again = validate_config(yaml.safe_load(dump_config(valid)))
        assert again.model_dump(mode="json") == valid.model_dump(mode="json"), f"{'.'.join(map(str, path))}: dump -> load changed it"

    before = _mib()
    check()
    f.growth["config"] = round(_mib() - before, 1)


READERS = {"io": fuzz_io, "checkpoint": fuzz_checkpoint, "cache": fuzz_cache, "folders": fuzz_folders, "config": fuzz_config}


def _limit_memory(headroom_gib: float) -> None:
    """Cap this process's address space at what it has mapped now plus `headroom_gib`: a reader that believed a
    header's absurd size would fail with MemoryError (not one of ours: the fuzz fails) instead of swapping the machine."""
    mapped = next(int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text().splitlines()
                  if line.startswith("VmSize:"))
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = mapped + int(headroom_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=200, help="examples per reader")
    p.add_argument("--readers", default=",".join(READERS), help=f"comma-separated: {', '.join(READERS)}")
    p.add_argument("--memory-headroom-gib", type=float, default=4.0,
                   help="address space allowed beyond what is mapped at the start (Linux; 0: no limit)")
    args = p.parse_args(argv)
    if args.memory_headroom_gib > 0 and Path("/proc/self/status").exists():
        _limit_memory(args.memory_headroom_gib)
    work = Path(tempfile.mkdtemp(prefix="diffalign-fuzz-"))
    try:
        f = Fuzz(work, args.examples)
        for name in args.readers.split(","):
            READERS[name](f)
        print(json.dumps({"examples": f.counts, "peak_rss_growth_mib": f.growth}))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
