"""`diffalign bench toy`: does a method move the toy model toward the preference? Measured like a paper's table.

1. Data: one synthetic preference cache (RankDPO's Syn-Pic recipe): K images per training caption sampled
   from the base toy model, ranked by the toy checklist (φ = averaged pairwise win-rate).
2. Train: SFT on the winners (always, the baseline to beat) and each requested method, from its shipped
   config `configs/toy/<method>.yaml`.
3. Evaluate: the same held-out captions and seeds for the base and every aligned model; score with the
   toy checklist; win-rate of aligned over base (ties ½, 95% bootstrap interval clustered by prompt) and
   mean score change per dimension; when DPO is among the methods, each other method's win-rate over DPO
   (``vs_dpo``, paired the same way).
4. Guidance baseline: the base model at its best guidance scale, chosen on TRAINING captions (their own seeds)
   from `BenchSettings.guidance_grid` by mean checklist score, then sampled on the evaluation set and reported
   like a method (``best_guidance``); each method's win-rate over it (``vs_best_guidance``) shows whether a gain
   is more than what higher guidance alone gives.
5. Negative-preference CFG: for each negative model among the methods (``npo``, ``self_npo``), its weights in the
   negative branch of CFG (`diffalign.pipelines`, α = β = 1) with the base model as the positive one, with DPO when it
   ran, and a control with a random LoRA of the same dense norm as δ; each row (``npo_cfg``) is a win-rate over plain
   CFG with the same positive model, prompts and seeds. The negative model's own row (its weights as the positive
   model) is the control that must lose to the base.
6. Beside each row: ranking and reward accuracy on an evaluation-only preference cache of the evaluation captions
   (`diffalign.eval.toyranking`), its training compute counted in UNet forward-equivalents (`diffalign.eval.compute`),
   and, across methods, Spearman's ρ of each accuracy with the win-rate; two plots (`diffalign.eval.toyplots`).

The report records the hashes of the base weights, the scorer configuration and the held-out split, which
are frozen before any method is tuned.

Reuse (every method issue runs the bench many times): the synthetic cache and each trained model are stored
under a content key in `cache_root` (default ``$XDG_CACHE_HOME/diffalign/bench``), so a second run, from any
work directory, trains only the methods whose resolved config, data or package source code changed:

- ``<cache_root>/data/<data key>``: the latent-pair cache; the key digests the method config's data section
  (minus ``cache_dir``), the model fields that load and encode the base model, and the identity the cache's
  manifest records (weights and source digests). The manifest check still refuses a mismatched reuse.
- ``<cache_root>/runs/<run key>``: one `diffalign.trainers.loop.train` output directory; the key digests the
  resolved method config (minus ``train.output_dir`` and ``data.cache_dir``), the data key, the package's
  source code (`source_digest`: ANY change to a ``.py`` file of the package retrains) and `numerics()`
  (library versions, device, CPU threads). A run directory is reused only when its ``done.json`` marker
  (written last, atomically) exists.
- ``<cache_root>/samples/<sample key>``: the evaluation images of the base model and of each trained model
  (lossless PNG), keyed by the model (base weights digest, or run key), prompts, seeds, sampler settings,
  source digest and `numerics()`; a model retrained in this run is always sampled again. The base model's
  samples on the guidance-choice captions, one entry per guidance scale, are stored the same way.
- ``<cache_root>/ledger.jsonl``: one line per held-out run (date, git commit, run keys, win-rates,
  settings), so every reported number can be traced and the number of held-out looks per method counted.

Concurrent benches on one cache root wait for each other per key (a file lock where the OS offers
``fcntl``), so an entry is built once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffalign.config import BUILTIN_TOY, Config, ModelConfig, apply_overrides, read_yaml, shipped_config_path, validate_config
from diffalign.config.methods import NEGATIVE_METHODS
from diffalign.data import prepare_cache
from diffalign.data.identity import weights_digest
from diffalign.eval import compute, ranking, toyranking
from diffalign.eval.imagefolder import write_folder
from diffalign.eval.toyranking import over_seeds as ranking_over_seeds
from diffalign.eval.toyranking import relation
from diffalign.eval.winrate import win_rate
from diffalign.imagegrid import paint_grid
from diffalign.io import atomic_write_text
from diffalign.models.loading import load_components
from diffalign.models.sampling import load_trained_unet, sample_images
from diffalign.scorers import load_scorer
from diffalign.scorers.registry import scorer_identity
from diffalign.toy.checklist import TOY_CHECKLIST
from diffalign.toy.scenes import HELD_OUT, TRAIN

SCORER = "toy-checklist"
# `--methods all`: every trainer with a toy recipe (configs/toy/<method>.yaml), offline then online
ALL_METHODS = ("sft", "dpo", "inpo", "smpo", "rankdpo", "dense", "npo", "self_npo", "dense_online", "tailorpo", "pref_grpo", "grpo")
BEST_GUIDANCE = "base-best-guidance"  # the samples folder (beside the report) of the base model at its best guidance scale


@dataclass
class BenchSettings:
    methods: tuple[str, ...] = ("dpo",)
    model: str = BUILTIN_TOY
    workdir: Path = Path("outputs/bench_toy")
    train_rounds: int = 16  # synthetic ranked lists per training caption (each of K images, its own seeds): 1,600 lists
    images_per_prompt: int = 4  # K (Syn-Pic: 4)
    eval_split: str = "held_out"  # "held_out" for reported numbers; "train" (other seeds) to tune methods without touching held-out
    eval_prompts: int | None = None  # captions to evaluate (None: all of the split)
    eval_seeds: int = 4  # samples per held-out caption
    num_inference_steps: int = 20
    guidance_scale: float = 3.0
    max_steps: int | None = None  # cap every method's training steps (quick runs)
    overrides: tuple[str, ...] = ()  # dotted overrides: "key=value" for every method's config, "dpo:key=value" for one
    seed: int = 0
    cache_root: Path | None = None  # content-keyed data and trained models shared by runs (None: `default_cache_root()`)
    ledger: Path | None = None  # held-out runs append a line here (None: <cache_root>/ledger.jsonl)
    fresh: bool = False  # rebuild the data and retrain every method, replacing their cached entries
    # The base model at its best guidance scale, a baseline for every method: chosen from this grid by the mean checklist
    # score on training captions (never held-out ones; `guidance_set`), then evaluated like a method. () leaves it out.
    guidance_grid: tuple[float, ...] = (1.5, 2.0, 3.0, 4.0, 5.0, 7.5)
    guidance_prompts: int | None = None  # training captions to choose on, spread over the split (None: all 100)
    guidance_seeds: int = 2  # samples per training caption and scale (seeds unlike the evaluation's and the data's)
    # Training seeds per method: seed s trains with train.seed = the recipe's + s on the same data and is evaluated on the
    # same samples' prompts and seeds; its row is "<method> (seed s)" (s = 0: "<method>", the cell earlier runs cached).
    # With more than one, the report's ``seeds`` section combines them (`diffalign.eval.winrate.win_rate_over_seeds`).
    train_seeds: int = 1
    # Ranking diagnostics (`diffalign.eval.toyranking`): ranked lists per evaluation caption in an evaluation-only preference
    # cache of the base model's samples (pairs: best vs worst, as training), and (t, ε) draws per pair; 0 rounds: none.
    ranking_rounds: int = 4  # 248 pairs on the 62 held-out captions: about 80 s to build on one thread
    ranking_draws: int = 8  # about 16 s per model on one thread


# The CI-size configuration (`diffalign bench toy --quick`, tests/test_toybench.py): one ranked list per training
# caption, 10 DDIM steps, 100 training steps, 2 seeds per held-out caption, guidance chosen from 3 scales on 50
# training captions × 1 seed. It shows the direction, not the number.
QUICK = dict(train_rounds=1, eval_seeds=2, num_inference_steps=10, max_steps=100, guidance_grid=(2.0, 3.0, 5.0), guidance_prompts=50,
             guidance_seeds=1, ranking_rounds=0)

# `diffalign demo`: the bench's DPO row in under 5 minutes on 2 CPU cores: 6 synthetic ranked lists per training caption
# (600 lists, 2,400 images; the bench's 16 give 1,600) and the guidance scale chosen on half the training captions;
# training and evaluation as the bench's (every held-out caption × 4 seeds, 20 DDIM steps). Measured at 4 min 25 s with
# the bench's conclusions (DPO 0.677 [0.613, 0.742] against the bench's 0.681; README "Start here").
DEMO = dict(train_rounds=6, guidance_prompts=50, ranking_rounds=0)


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def frozen_hashes(model: str) -> dict[str, str]:
    """What must not change while methods are tuned: base weights, scorer, held-out split."""
    return {
        "base_weights": _digest(weights_digest(ModelConfig(pretrained=model))),
        "scorer_config": _digest(scorer_identity(SCORER)),
        "held_out_split": _digest([s.caption for s in HELD_OUT]),
    }


def default_cache_root() -> Path:
    """``$XDG_CACHE_HOME/diffalign/bench``, or ``~/.cache/diffalign/bench`` when XDG_CACHE_HOME is unset."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "diffalign" / "bench"


def resolve_cache_root(settings: BenchSettings) -> Path:
    return Path(settings.cache_root) if settings.cache_root is not None else default_cache_root()


def source_digest() -> str:
    """sha256 over every ``*.py`` file under the `diffalign` package directory (relative path and bytes, sorted by path).

    Part of every run key: any change to the package's code, even a comment, retrains (cheap to be sure; the
    toy runs take seconds to minutes).
    """
    import diffalign

    root = Path(diffalign.__file__).parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        rel = path.relative_to(root).as_posix().encode()
        body = path.read_bytes()
        h.update(b"%d:%s%d:" % (len(rel), rel, len(body)) + body)
    return h.hexdigest()


# Model fields that change how the model trains, not which model loads or how it encodes: not part of the data key.
_TRAINING_ONLY_MODEL_FIELDS = ("finetune", "lora", "reference_offload", "gradient_checkpointing", "attention", "sdpa_backend",
                               "channels_last", "compile")


def data_key(cfg: Config) -> str:
    """Key of the latent-pair cache a method config produces: its data section minus ``cache_dir``, the model fields
    that load and encode the base model, the VAE's encode dtype, and the identity the cache's manifest must have
    (`expected_identity` without components: format version, weights digests, the source's digest, which the
    synthetic source derives from its settings, prompts, scorers and generating weights). Opening the source loads
    no model, so the key is cheap; a change the manifest would refuse gives a new key (a new build), not an error."""
    from diffalign.data.manifest import expected_identity
    from diffalign.models.loading import vae_encode_dtype

    dumped = cfg.model_dump(mode="json")
    data = {k: v for k, v in dumped["data"].items() if k != "cache_dir"}
    model = {k: v for k, v in dumped["model"].items() if k not in _TRAINING_ONLY_MODEL_FIELDS}
    if is_online(cfg):  # no cache: the prompts and the model that samples them
        from diffalign.data.identity import weights_digest
        from diffalign.data.sources.prompts import training_prompts

        return _digest({"data": data, "model": model, "prompts": training_prompts(cfg.data.source),
                        "weights": weights_digest(cfg.model, generation=True)})
    return _digest({"data": data, "model": model, "encode_dtype": str(vae_encode_dtype(cfg.model, cfg.train.mixed_precision)),
                    "identity": expected_identity(cfg, None)})


def is_online(cfg: Config) -> bool:
    """An online method's config: it samples its own images for a prompt list (no latent cache to build)."""
    return cfg.data.source.kind == "prompts"


def numerics() -> dict[str, str | int | None]:
    """What else decides a trained model's exact floats: library versions and the device (on CPU, the thread count)."""
    import accelerate
    import diffusers
    import peft
    import transformers

    versions = {m.__name__: m.__version__ for m in (torch, diffusers, peft, transformers, accelerate)}
    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {**versions, "cuda": cuda, "threads": torch.get_num_threads()}


def run_key(cfg: Config, code: str, data: str | None = None) -> str:
    """Key of a trained model: the resolved config minus its two paths, the data key (`data`, computed when not
    given), the source digest `code` and `numerics()` (so a reused model is the one this machine would train, bit
    for bit)."""
    dumped = cfg.model_dump(mode="json")
    dumped["train"].pop("output_dir", None)
    dumped["data"].pop("cache_dir", None)
    return _digest({"config": dumped, "data": data_key(cfg) if data is None else data, "code": code, "numerics": numerics()})


def folder_name(row: str) -> str:
    """The samples folder of a report row: runs of other characters than letters, digits, '.', '+' and '-' become one '_'
    ("dpo (seed 1)" -> "dpo_seed_1", "base + NPO-CFG (npo)" -> "base_+_NPO-CFG_npo")."""
    return re.sub(r"[^\w.+-]+", "_", row).strip("_")


def cell_name(method: str, train_seed: int) -> str:
    """The report's row of one (method, training seed): the method's name for seed 0, else "<method> (seed s)"."""
    return method if train_seed == 0 else f"{method} (seed {train_seed})"


def method_config(name: str, settings: BenchSettings, code: str | None = None, train_seed: int = 0) -> Config:
    """The method's shipped toy config, pointed at the bench's model, with its data and output under content keys.

    ``data.cache_dir`` becomes ``<cache_root>/data/<data_key(cfg)>`` and ``train.output_dir``
    ``<cache_root>/runs/<run_key(cfg, code)>`` (the bench owns both paths: overrides of them are replaced).
    `code` is `source_digest()` (computed when not given). `train_seed` s adds s to ``train.seed`` (after the overrides):
    the same data, another training run.
    """
    path = shipped_config_path(f"toy/{name}")
    if path is None:
        raise ValueError(f"no toy config for method {name!r} (configs/toy/{name}.yaml)")
    raw = read_yaml(path)
    raw.setdefault("model", {})["pretrained"] = settings.model
    data = raw.setdefault("data", {})
    source = data.setdefault("source", {"kind": "synthetic"})
    if source.get("kind", "synthetic") == "synthetic":  # the bench's preference data (a method on other data keeps its own)
        source.update(prompts=[s.caption for s in TRAIN] * settings.train_rounds, images_per_prompt=settings.images_per_prompt,
                      scorers=[SCORER], num_inference_steps=settings.num_inference_steps, guidance_scale=settings.guidance_scale,
                      seed=settings.seed)
    raw.setdefault("train", {})
    if settings.max_steps is not None:
        raw["train"]["max_steps"] = settings.max_steps
    raw = apply_overrides(raw, method_overrides(name, settings.overrides))
    if train_seed:
        raw["train"]["seed"] = raw["train"].get("seed", 0) + train_seed
    origin = f"{path} (bench toy)"
    cfg = validate_config(raw, origin=origin)
    root = resolve_cache_root(settings)
    data = data_key(cfg)  # hashes the model and source weights: once per method config
    raw["data"]["cache_dir"] = str(root / "data" / data)
    raw["train"]["output_dir"] = str(root / "runs" / run_key(cfg, source_digest() if code is None else code, data))
    return validate_config(raw, origin=origin)


def method_overrides(name: str, overrides: tuple[str, ...]) -> list[str]:
    """The overrides for method `name`: unscoped ones ("optim.lr=1e-4") and those scoped to it ("dpo:method.beta=2000")."""
    out = []
    for o in overrides:
        scope, sep, rest = o.partition(":")
        if not sep or "=" in scope:  # no scope (a value may contain ':')
            out.append(o)
        elif scope == name:
            out.append(rest)
    return out


@contextlib.contextmanager
def _locked(path: Path):
    """Hold an exclusive lock on `path` (created if needed): concurrent benches build one cache entry once.

    A no-op where the OS has no ``fcntl`` (Windows): there, run one bench per cache root at a time.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_data(cfg: Config, fresh: bool = False, progress: bool = True) -> bool:
    """Build the config's latent-pair cache unless a complete one is there; True when it was reused.

    `prepare_cache` resumes an unfinished build and refuses a cache whose manifest differs from the config.
    `fresh` deletes the cached entry first.
    """
    root = Path(cfg.data.cache_dir)
    with _locked(root.with_name(root.name + ".lock")):
        if fresh and root.exists():
            shutil.rmtree(root)
        reused = (root / "manifest.json").is_file()
        prepare_cache(cfg, progress=progress)
    return reused


DONE = "done.json"  # the marker of a complete run directory, written last


def run_is_complete(run_dir: Path) -> bool:
    """A run directory is reused only when training finished: exported config, summary and the marker all exist."""
    return all((run_dir / f).is_file() for f in (DONE, "summary.json", "final/config.yaml"))


def ensure_run(cfg: Config, fresh: bool = False) -> tuple[dict, bool]:
    """Train `cfg` into its keyed ``train.output_dir`` unless a complete run is there; (done.json record, reused).

    Training is `diffalign.trainers.loop.train`, the entry point of `diffalign train`. An incomplete directory
    (a crash mid-training) is deleted and trained afresh, as is a complete one when `fresh`.
    """
    run_dir = Path(cfg.train.output_dir)
    with _locked(run_dir.with_name(run_dir.name + ".lock")):
        if run_is_complete(run_dir) and not fresh:
            return json.loads((run_dir / DONE).read_text()), True
        if run_dir.exists():
            shutil.rmtree(run_dir)
        from diffalign.trainers import loop

        started = time.perf_counter()
        result = loop.train(cfg)
        record = {"run_key": run_dir.name, "data_key": Path(cfg.data.cache_dir).name, "method": cfg.method.name,
                  "final_dir": Path(result.final_dir).relative_to(run_dir).as_posix(), "steps": result.steps,
                  "train_seconds": time.perf_counter() - started, "loop_seconds": result.seconds, "metrics": result.metrics,
                  "finished": _utc_now()}
        atomic_write_text(run_dir / DONE, json.dumps(record, indent=2) + "\n")
    return record, False


def cached_json(path: Path, make, fresh: bool = False) -> tuple[dict, bool]:
    """The JSON record stored at `path`, or `make()`'s, stored there atomically; (record, reused)."""
    with _locked(path.with_suffix(".lock")):
        if path.is_file() and not fresh:
            return json.loads(path.read_text()), True
        record = make()
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    return record, False


def _module_source(*modules) -> str:
    return hashlib.sha256(b"".join(Path(m.__file__).read_bytes() for m in modules)).hexdigest()


RANKING_CONFIG = "toy_eval_heldout"  # the shipped evaluation-cache recipe the ranking cache starts from


def ranking_config(settings: BenchSettings, captions: list[str], root: Path) -> Config:
    """The ranking diagnostics' evaluation-only preference cache: `captions` × ``settings.ranking_rounds`` ranked lists of
    the base model's samples (the bench's K, sampler and checklist; image seeds of their own: the synthetic seed is the
    bench's + 1), stored at ``<root>/data/<data key>``. No trainer may read it (``evaluation_only``)."""
    path = shipped_config_path(RANKING_CONFIG)
    raw = read_yaml(path)
    raw["model"]["pretrained"] = settings.model
    raw["data"]["source"].update(prompts=list(captions) * settings.ranking_rounds, images_per_prompt=settings.images_per_prompt,
                                 scorers=[SCORER], num_inference_steps=settings.num_inference_steps,
                                 guidance_scale=settings.guidance_scale, seed=settings.seed + 1, evaluation_only=True)
    origin = f"{path} (bench toy ranking)"
    raw["data"]["cache_dir"] = str(root / "data" / data_key(validate_config(raw, origin=origin)))
    return validate_config(raw, origin=origin)


def cell_ranking(cfg: Config, components, model: str, weights: Path | None, settings: BenchSettings, root: Path, code: str) -> dict:
    """`toyranking.ranking_record` of one model (`weights`: a run's ``final/``; None: the base) on the ranking cache `cfg`,
    stored under ``<root>/ranking/<key>``; the key digests the model's name in the cache (a run key, or "base"), the
    cache's data key, draws, seed, the source digest `code`, `numerics()` and the measuring modules' source."""
    key = _digest({"model": model, "data": Path(cfg.data.cache_dir).name, "draws": settings.ranking_draws, "seed": settings.seed,
                   "code": code, "numerics": numerics(), "source": _module_source(ranking, toyranking)})
    record, reused = cached_json(root / "ranking" / f"{key}.json",
                                 lambda: toyranking.ranking_record(cfg, components, weights, settings.ranking_draws, settings.seed),
                                 settings.fresh)
    return {**record, "key": key, "reused": reused}


def cell_compute(cfg: Config, steps: int, train_seconds: float, root: Path, code: str) -> dict:
    """`compute.totals` of a cell: the probe's per-step counts (stored under ``<root>/compute/<key>``, keyed by the config
    without its paths and training seed, which do not change the count) times the cell's `steps`."""
    dumped = cfg.model_dump(mode="json")
    dumped["train"] = {k: v for k, v in dumped["train"].items() if k not in ("output_dir", "seed")}
    dumped["data"].pop("cache_dir", None)
    key = _digest({"config": dumped, "code": code, "numerics": numerics(), "source": _module_source(compute)})
    per_step, _ = cached_json(root / "compute" / f"{key}.json", lambda: compute.probe(cfg))
    return compute.totals(per_step, steps, train_seconds)


def sample_key(model: dict | str, prompts: list[str], seeds: list[int], sampler: dict, code: str) -> str:
    """Key of a model's samples: the model (the base's ref and weights digest, or a run key), the (prompt, seed)
    list, the sampler settings, the source digest and `numerics()`."""
    return _digest({"model": model, "prompts": prompts, "seeds": seeds, "sampler": sampler, "code": code, "numerics": numerics()})


def cached_samples(folder: Path, make, fresh: bool = False) -> tuple[list[Image.Image], bool]:
    """The images stored in `folder` (lossless PNG, with a ``done.json`` marker written last), or `make()`'s, stored
    there; (images, reused). Scoring a reloaded PNG gives the scores of the image it saved, bit for bit."""
    with _locked(folder.with_name(folder.name + ".lock")):
        if (folder / DONE).is_file() and not fresh:
            count = json.loads((folder / DONE).read_text())["count"]
            return [_load_rgb(folder / f"{i:05d}.png") for i in range(count)], True
        if folder.exists():
            shutil.rmtree(folder)
        images = make()
        folder.mkdir(parents=True)
        for i, image in enumerate(images):
            image.save(folder / f"{i:05d}.png")
        atomic_write_text(folder / DONE, json.dumps({"count": len(images)}) + "\n")
    return images, False


def _load_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def git_commit() -> str | None:
    """HEAD of the git checkout holding the `diffalign` package, with ``-dirty`` when ``git status`` lists anything;
    None when the package is not tracked by a git checkout (an installed wheel) or git is missing."""
    import diffalign

    here = Path(diffalign.__file__).parent

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "--no-optional-locks", "-C", str(here), *args], capture_output=True, text=True, timeout=30)

    try:
        if git("ls-files", "--error-unmatch", "__init__.py").returncode != 0:  # e.g. a site-packages copy inside another repo
            return None
        head = git("rev-parse", "HEAD")
        status = git("status", "--porcelain")
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("-dirty" if status.returncode != 0 or status.stdout.strip() else "")


def append_ledger(path: Path, entry: dict) -> None:
    """Append `entry` as one JSON line with a single ``write`` on an ``O_APPEND`` descriptor, so concurrent benches
    never interleave or tear lines, then fsync."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(entry, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if os.write(fd, line) != len(line):
            raise OSError(f"{path}: short write appending the ledger line")
        os.fsync(fd)
    finally:
        os.close(fd)


def ledger_entry(report: dict, out: Path) -> dict:
    """The ledger's line for a held-out report: when, which code, which trained models, what they scored."""
    keys = ("win_rate", "ci_low", "ci_high", "n")
    methods = {name: {"run_key": r["run_key"], "reused": r["reused"], **{k: r[k] for k in keys},
                      **{vs: {k: r[vs][k] for k in keys} for vs in ("vs_dpo", "vs_best_guidance") if vs in r}}
               for name, r in report["methods"].items()}
    entry = {"date": _utc_now(), "commit": git_commit(), "report": str(out.resolve()), "hashes": report["hashes"],
             "methods": methods, "settings": report["settings"]}
    if "best_guidance" in report:
        best = report["best_guidance"]
        entry["best_guidance"] = {"guidance_scale": best["guidance_scale"], **{k: best[k] for k in keys},
                                  **({"vs_dpo": {k: best["vs_dpo"][k] for k in keys}} if "vs_dpo" in best else {})}
    if "seeds" in report:
        keep = ("win_rate", "ci_low", "ci_high", "per_seed", "call")
        entry["seeds"] = {m: {vs: {k: r[vs][k] for k in keep} for vs in r if vs.startswith("vs_")} for m, r in report["seeds"].items()}
    for name, r in report["methods"].items():  # the diagnostics beside each win-rate
        if "ranking" in r:
            methods[name]["ranking"] = {k: r["ranking"][k]["value"] for k in ("ranking_accuracy", "reward_accuracy")}
        if "compute" in r:
            methods[name]["forward_equivalents"] = r["compute"]["forward_equivalents"]
    if "npo_cfg" in report:
        entry["npo_cfg"] = {label: {"positive": r["positive"], **{k: r[k] for k in keys}} for label, r in report["npo_cfg"].items()}
    if "npo_cfg_seeds" in report:
        entry["npo_cfg_seeds"] = {c: {k: r[k] for k in ("win_rate", "ci_low", "ci_high", "per_seed", "call")}
                                  for c, r in report["npo_cfg_seeds"].items()}
    return entry


def _scores(scorer, images, prompts) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in scorer.score(images, prompts).items()}


def _interval(r: dict | None) -> str:
    return "—" if r is None else f"{r['win_rate']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"


def markdown_table(report: dict) -> str:
    """One row per method and one for the base model at its best guidance scale; a vs-DPO column when DPO ran, a
    vs-best-guidance column when the guidance baseline ran ("—": the row's own model)."""
    dims = [d for d in TOY_CHECKLIST.dimensions]
    best = report.get("best_guidance")
    with_dpo = "dpo" in report["methods"]
    versus = ["vs DPO [95% CI]"] * with_dpo + ([f"vs base at guidance {best['guidance_scale']:g} [95% CI]"] if best is not None else [])
    lines = [
        "| method | win-rate vs base [95% CI] | " + "".join(f"{v} | " for v in versus) + "n (prompts) | "
        + " | ".join(f"Δ{d}" for d in dims) + " | Δoverall | train s | eval s |",
        "|---|---|" + "---|" * len(versus) + "---|" + "---:|" * (len(dims) + 3),
    ]

    def row(label: str, r: dict, train_seconds: str) -> str:
        cells = [_interval(r)] + [_interval(r.get("vs_dpo"))] * with_dpo + [_interval(r.get("vs_best_guidance"))] * (best is not None)
        cells += [f"{r['n']} ({r['prompts']})"] + [f"{r['dims'][d]:+.3f}" for d in dims]
        cells += [f"{r['dims']['overall']:+.3f}", train_seconds, f"{r['eval_seconds']:.0f}"]
        return f"| {label} | " + " | ".join(cells) + " |"

    for name, r in report["methods"].items():
        lines.append(row(name, r, f"{r['train_seconds']:.0f}"))
    if best is not None:
        lines.append(row(f"base, guidance {best['guidance_scale']:g} (best on training captions)", best, "—"))
    base = report["base"]["scores"]
    lines.append("")
    lines.append(f"Base model (guidance {report['settings']['guidance_scale']:g}) on the same samples: "
                 + ", ".join(f"{k} {v:+.3f}" for k, v in base.items()))
    if best is not None:
        choice = best["choice"]
        scales = ", ".join(("**{:g}: {:.3f}**" if g["guidance_scale"] == best["guidance_scale"] else "{:g}: {:.3f}").format(
            g["guidance_scale"], g["scores"]["overall"]) for g in choice["grid"])
        seeds = choice["seeds_per_caption"]
        lines.append(f"Guidance chosen on {choice['captions']} training captions × {seeds} seed{'s' * (seeds != 1)} "
                     f"(mean overall checklist score per scale): {scales}")
    if report.get("seeds"):
        columns = [k for k in ("vs_base", "vs_dpo", "vs_best_guidance") if any(k in r for r in report["seeds"].values())]
        title = {"vs_base": "vs base", "vs_dpo": "vs DPO (seed by seed)", "vs_best_guidance": "vs base at best guidance"}
        seeds = next(iter(report["seeds"].values()))["vs_base"]["seeds"]
        lines += ["", f"Across {seeds} training seeds: the seeds' mean win-rate [95% interval of the evaluation, one prompt bootstrap "
                  "shared by the seeds] (seed min–max; the call: better/worse only when the interval and every seed agree):", "",
                  "| method | " + " | ".join(title[c] for c in columns) + " | " + " | ".join(f"Δ{d}" for d in dims)
                  + " | Δoverall |", "|---|" + "---|" * len(columns) + "---:|" * (len(dims) + 1)]

        def cell(r: dict | None) -> str:
            if r is None:
                return "—"
            return f"{_interval(r)} ({r['seed_min']:.3f}–{r['seed_max']:.3f}; {r['call']})"

        for name, r in report["seeds"].items():
            lines.append(f"| {name} | " + " | ".join(cell(r.get(c)) for c in columns) + " | "
                         + " | ".join(f"{r['dims'][d]:+.3f}" for d in [*dims, "overall"]) + " |")
    lines += _ranking_and_compute_lines(report)
    if report.get("npo_cfg"):
        lines += ["", "Negative-preference CFG (α = β = 1), each against plain CFG with the same positive model, prompts and seeds:", "",
                  "| sampler | positive model | win-rate vs plain CFG [95% CI] | " + " | ".join(f"Δ{d}" for d in dims) + " | Δoverall |",
                  "|---|---|---|" + "---:|" * (len(dims) + 1)]
        for label, r in report["npo_cfg"].items():
            lines.append(f"| {label} | {r['positive']} | {_interval(r)} | " + " | ".join(f"{r['dims'][d]:+.3f}" for d in dims)
                         + f" | {r['dims']['overall']:+.3f} |")
    if report.get("npo_cfg_seeds"):
        lines += ["", "Negative-preference CFG across training seeds (the seeds' mean win-rate over plain CFG [95% interval] "
                  "(seed min–max; the call)):", "", "| sampler | win-rate vs plain CFG |", "|---|---|"]
        lines += [f"| {c} | {_interval(r)} ({r['seed_min']:.3f}–{r['seed_max']:.3f}; {r['call']}) |" for c, r in report["npo_cfg_seeds"].items()]
    return "\n".join(lines) + "\n"


def _estimate(e: dict) -> str:
    return "n/a" if e["value"] is None else f"{e['value']:.3f} [{e['ci_low']:.3f}, {e['ci_high']:.3f}]"


def _ranking_and_compute_lines(report: dict) -> list[str]:
    """Each row's ranking and reward accuracy on the held-out preference pairs and its training compute; their relation
    to the win-rate across methods."""
    rows = report["methods"]
    if not any("compute" in r for r in rows.values()):
        return []
    ranked = "ranking" in report.get("base", {})
    lines = ["", "Training compute (UNet forward-equivalents: rows without gradient + 3 × rows with gradient; images the "
             "trainer sampled; offline methods also share the synthetic data's images, below)"
             + (" and ranking diagnostics on the held-out preference pairs (Chen et al. 2024; 95% pair-bootstrap interval)" if ranked else "")
             + ":", "",
             "| method | " + ("ranking accuracy | reward accuracy | " if ranked else "") + "forward-equivalents | images sampled | train s |",
             "|---|" + "---|---|" * ranked + "---:|---:|---:|"]
    if ranked:
        b = report["base"]["ranking"]
        lines.append(f"| base | {_estimate(b['ranking_accuracy'])} | 0.500 (θ = ref) | — | — | — |")
    for name, r in rows.items():
        c = r["compute"]
        accuracies = f"{_estimate(r['ranking']['ranking_accuracy'])} | {_estimate(r['ranking']['reward_accuracy'])} | " if ranked else ""
        lines.append(f"| {name} | {accuracies}{c['forward_equivalents']:,.0f} | {c['images_sampled']:,.0f} | {c['train_seconds']:.0f} |")
    for d in report.get("data", {}).values():
        if "images" in d:
            lines.append(f"\nThe synthetic data ({', '.join(sorted({m.split(' (')[0] for m in d['methods']}))}): {d['images']:,} images, "
                         f"{d['forward_equivalents']:,} forward-equivalents to sample, once.")
    rel = report.get("ranking_relation")
    if rel:
        def rho(v):
            return "n/a" if v is None else f"{v:+.2f}"

        aligned = rel["without_negative_models"]
        lines.append(f"\nAcross {len(rel['methods'])} methods, Spearman's ρ with the win-rate against the base: ranking accuracy "
                     f"{rho(rel['spearman_ranking_accuracy'])}, reward accuracy {rho(rel['spearman_reward_accuracy'])}; without the "
                     f"negative models ({len(aligned['methods'])} methods): ranking accuracy {rho(aligned['spearman_ranking_accuracy'])}, "
                     f"reward accuracy {rho(aligned['spearman_reward_accuracy'])}.")
    return lines


def _eval_set(settings: BenchSettings) -> tuple[list, list[str], list[int]]:
    """The evaluation captions (specs), and one (prompt, seed) per image: the same for the base and every method."""
    if settings.eval_split not in ("held_out", "train"):
        raise ValueError(f"eval_split must be 'held_out' or 'train', got {settings.eval_split!r}")
    split = HELD_OUT if settings.eval_split == "held_out" else TRAIN
    held = split[: settings.eval_prompts] if settings.eval_prompts else split
    prompts = [s.caption for s in held for _ in range(settings.eval_seeds)]
    seeds = [10_000 + settings.seed * 1_000 + j for _ in held for j in range(settings.eval_seeds)]  # unlike any synthetic-data seed
    return held, prompts, seeds


def _settings_record(settings: BenchSettings, cache_root: Path, ledger: Path) -> dict:
    """The settings as JSON, with the resolved cache root and ledger."""
    return {**dataclasses.asdict(settings), "workdir": str(settings.workdir), "cache_root": str(cache_root), "ledger": str(ledger)}


def _prepare_data(configs: dict[str, Config], settings: BenchSettings, progress: bool) -> dict[str, dict]:
    """Each distinct data cache of the methods (one, unless overrides change a method's data), built or reused."""
    data: dict[str, dict] = {}
    for name, cfg in configs.items():
        key = Path(cfg.data.cache_dir).name
        if key not in data:
            reused = None if is_online(cfg) else ensure_data(cfg, settings.fresh, progress)  # online: prompts only, nothing to build
            data[key] = {"dir": cfg.data.cache_dir, "reused": reused, "methods": []}
            if cfg.data.source.kind == "synthetic":  # the images sampled to build it, and their UNet rows (CFG: 2 per image and step)
                from diffalign.data.sources.synthetic import resolve_prompts

                source = cfg.data.source
                images = len(resolve_prompts(source)) * source.images_per_prompt
                data[key].update(images=images, forward_equivalents=images * source.num_inference_steps * (2 if source.guidance_scale > 1 else 1))
        data[key]["methods"].append(name)
    return data


def guidance_set(settings: BenchSettings) -> tuple[list[str], list[int]]:
    """The (prompt, seed) list the base model's best guidance scale is chosen on: TRAINING captions only (never held-out,
    whatever `eval_split` is), `guidance_prompts` of them spread evenly over the split, with seeds unlike the evaluation's
    (10,000 + ...) and the synthetic data's."""
    count = min(settings.guidance_prompts or len(TRAIN), len(TRAIN))
    specs = [TRAIN[i * len(TRAIN) // count] for i in range(count)]
    prompts = [s.caption for s in specs for _ in range(settings.guidance_seeds)]
    seeds = [20_000 + settings.seed * 1_000 + j for _ in specs for j in range(settings.guidance_seeds)]
    return prompts, seeds


def choose_guidance(settings: BenchSettings, sample, scorer) -> dict:
    """Sample the base model on `guidance_set` at every scale of `guidance_grid` (`sample(prompts, seeds, scale)` returns
    (images, reused)) and pick the scale with the highest mean overall checklist score (the first in grid order on a tie).

    Returns the choice record: the chosen ``guidance_scale``, each scale's mean scores (``grid``), the captions chosen on,
    and whether every scale's samples were reused."""
    if not settings.guidance_grid:
        raise ValueError("guidance_grid is empty: nothing to choose from")
    prompts, seeds = guidance_set(settings)
    grid, reused = [], []
    for scale in settings.guidance_grid:
        images, was_reused = sample(prompts, seeds, float(scale))
        scores = _scores(scorer, images, prompts)
        grid.append({"guidance_scale": float(scale), "scores": {k: float(scores[k].mean()) for k in ("overall", *TOY_CHECKLIST.dimensions)}})
        reused.append(was_reused)
    best = max(grid, key=lambda g: g["scores"]["overall"])  # max keeps the first of equal keys
    return {"guidance_scale": best["guidance_scale"], "grid": grid, "split": "train", "prompts": list(dict.fromkeys(prompts)),
            "captions": len(set(prompts)), "seeds_per_caption": settings.guidance_seeds, "n": len(prompts), "seeds": seeds,
            "samples_reused": all(reused)}


def _versus(scores: dict[str, torch.Tensor], other: dict[str, torch.Tensor], prompts: list[str], seed: int) -> dict:
    """Win-rate of one model's samples over another's on the same (prompt, seed) list (ties ½, bootstrap clustered by prompt)."""
    return win_rate(scores["overall"].tolist(), other["overall"].tolist(), prompts, seed=seed).as_dict()


def _compare(scores: dict[str, torch.Tensor], prompts, base: dict[str, torch.Tensor], seed: int) -> dict:
    """Win-rate over the base (ties ½, bootstrap clustered by prompt), mean score change per dimension, yes-rate changes."""
    wr = win_rate(scores["overall"].tolist(), base["overall"].tolist(), prompts, seed=seed)
    dims = {d: float((scores[d] - base[d]).mean()) for d in ("overall", *TOY_CHECKLIST.dimensions)}
    questions = {q.key: float(((scores[q.key] > 0).float() - (base[q.key] > 0).float()).mean()) for q in TOY_CHECKLIST.questions}
    return {**wr.as_dict(), "dims": dims, "yes_rate_change": questions}


def run_toy_bench(settings: BenchSettings, out: str | Path, progress: bool = True) -> dict:
    """Run the bench; write `out` (JSON), a markdown table, a base-vs-aligned grid and each model's samples
(``samples/<model>/`` with ``metadata.jsonl``) beside it, and ``runs.json`` (each method's run directory) in the workdir.

    Data and trained models come from `cache_root` when their keys match (see the module docstring); each method's
    report says whether it was ``reused`` and its ``run_key``. `train_seconds` is the training time of the model
    (recorded when it was trained), `total_seconds` this call's wall time. A held-out run appends a ledger line.

    With a `guidance_grid`, ``best_guidance`` is the base model at the scale `choose_guidance` picks on training
    captions, evaluated like a method (samples in ``samples/base-best-guidance/``), and every method carries
    ``vs_best_guidance``; with DPO among the methods, every other row carries ``vs_dpo``.
    """
    from tqdm.auto import tqdm

    wall = time.perf_counter()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    held, prompts, seeds = _eval_set(settings)
    root = resolve_cache_root(settings)
    ledger = Path(settings.ledger) if settings.ledger is not None else root / "ledger.jsonl"
    code = source_digest()
    chosen = ALL_METHODS if "all" in settings.methods else settings.methods
    unknown = sorted(set(chosen) - set(ALL_METHODS))
    if unknown:
        raise ValueError(f"--methods: no toy recipe for {', '.join(unknown)}; the methods: {', '.join(ALL_METHODS)} (or all)")
    if settings.train_seeds < 1:
        raise ValueError(f"train_seeds must be at least 1, got {settings.train_seeds}")
    base_methods = ["sft", *dict.fromkeys(m for m in chosen if m != "sft")]
    cells = {cell_name(m, s): (m, s) for m in base_methods for s in range(settings.train_seeds)}  # row -> (method, training seed)
    methods = list(cells)
    configs = {name: method_config(m, settings, code, s) for name, (m, s) in cells.items()}
    scorer = load_scorer(SCORER)
    sample_kw = dict(num_inference_steps=settings.num_inference_steps, guidance_scale=settings.guidance_scale, resolution=32)
    report = {"settings": _settings_record(settings, root, ledger), "hashes": frozen_hashes(settings.model), "code_digest": code,
              "methods": {}}

    # 1. data: the shared synthetic cache, sampled from the base model and ranked by the checklist
    started = time.perf_counter()
    report["data"] = _prepare_data(configs, settings, progress)
    report["data_seconds"] = time.perf_counter() - started

    # 2. the base model's samples, once (or reused from an earlier run)
    started = time.perf_counter()
    components = load_components(ModelConfig(pretrained=settings.model))  # the base; trained weights go on copies of its UNet
    base_model = {"pretrained": settings.model, "weights": weights_digest(ModelConfig(pretrained=settings.model), generation=True)}
    base_images, reused = cached_samples(root / "samples" / sample_key(base_model, prompts, seeds, sample_kw, code),
                                         lambda: sample_images(components, prompts, seeds, **sample_kw), settings.fresh)
    base = _scores(scorer, base_images, prompts)
    report["base"] = {"scores": {k: float(base[k].mean()) for k in ("overall", *TOY_CHECKLIST.dimensions)},
                      "colour_accuracy": float((base["colour"] > 0).float().mean()), "eval_seconds": time.perf_counter() - started,
                      "samples_reused": reused}
    columns = {"base": base_images}
    ranking_cfg = None
    if settings.ranking_rounds:  # the evaluation-only preference cache the ranking diagnostics read; the base model's own
        ranking_cfg = ranking_config(settings, [s.caption for s in held], root)
        report["ranking_data"] = {"dir": str(ranking_cfg.data.cache_dir), "captions": len(held), "rounds": settings.ranking_rounds,
                                  "reused": ensure_data(ranking_cfg, settings.fresh, progress)}
        report["base"]["ranking"] = cell_ranking(ranking_cfg, components, "base", None, settings, root, code)
    samples = out.parent / "samples"  # each model's images with metadata.jsonl: `diffalign compare` re-derives the table from them
    write_folder(samples / "base", base_images, prompts, seeds, model=settings.model, steps=settings.num_inference_steps,
                 guidance=settings.guidance_scale)

    # 3. the guidance baseline: the base model at the scale that scores best on training captions, on the evaluation set
    best_scores = None
    if settings.guidance_grid:
        started = time.perf_counter()

        def sample_base(ps: list[str], ss: list[int], scale: float) -> tuple[list[Image.Image], bool]:
            kw = {**sample_kw, "guidance_scale": scale}
            return cached_samples(root / "samples" / sample_key(base_model, ps, ss, kw, code),
                                  lambda: sample_images(components, ps, ss, **kw), settings.fresh)

        choice = choose_guidance(settings, sample_base, scorer)
        choice["seconds"] = time.perf_counter() - started
        scale = choice["guidance_scale"]
        started = time.perf_counter()
        if scale == settings.guidance_scale:  # the bench's own scale: the base samples themselves (the same key)
            best_images, best_reused = base_images, report["base"]["samples_reused"]
        else:
            best_images, best_reused = sample_base(prompts, seeds, scale)
        best_scores = _scores(scorer, best_images, prompts)
        result = _compare(best_scores, prompts, base, settings.seed)
        report["best_guidance"] = {"guidance_scale": scale, **{k: v for k, v in result.items() if k not in ("dims", "yes_rate_change")},
                                   "eval_seconds": time.perf_counter() - started, "dims": result["dims"],
                                   "yes_rate_change": result["yes_rate_change"], "samples_reused": best_reused, "choice": choice}
        columns[f"base g{scale:g}"] = best_images
        write_folder(samples / BEST_GUIDANCE, best_images, prompts, seeds, model=settings.model, steps=settings.num_inference_steps,
                     guidance=scale)

    # 4. each method: train (or reuse), sample the same prompts and seeds, compare
    scored: dict[str, dict[str, torch.Tensor]] = {}
    for name in tqdm(methods, desc="bench toy", disable=not progress):
        cfg = configs[name]
        record, reused = ensure_run(cfg, settings.fresh)
        run_dir = Path(cfg.train.output_dir)
        final_dir = run_dir / record["final_dir"]
        started = time.perf_counter()
        images, samples_reused = cached_samples(
            root / "samples" / sample_key(run_dir.name, prompts, seeds, sample_kw, code),
            lambda: sample_images(components, prompts, seeds, unet=load_trained_unet(components, final_dir), **sample_kw),
            settings.fresh or not reused)
        scored[name] = _scores(scorer, images, prompts)
        result = _compare(scored[name], prompts, base, settings.seed)
        report["methods"][name] = {**{k: v for k, v in result.items() if k not in ("dims", "yes_rate_change")},
                                   "train_seconds": record["train_seconds"], "eval_seconds": time.perf_counter() - started,
                                   "dims": result["dims"], "yes_rate_change": result["yes_rate_change"],
                                   "reused": reused, "run_key": run_dir.name, "run_dir": str(run_dir), "samples_reused": samples_reused}
        report["methods"][name]["compute"] = cell_compute(cfg, record["steps"], record["train_seconds"], root, code)
        if ranking_cfg is not None:
            report["methods"][name]["ranking"] = cell_ranking(ranking_cfg, components, run_dir.name, final_dir, settings, root, code)
        columns[name] = images
        write_folder(samples / folder_name(name), images, prompts, seeds, model=settings.model, adapter=str(final_dir),
                     steps=settings.num_inference_steps, guidance=settings.guidance_scale)

    # 5. paired comparisons on the same samples: each method against DPO (of the same training seed) and against the
    #    guidance baseline; across training seeds, each method's combined rows
    for name, row in report["methods"].items():
        dpo = cell_name("dpo", cells[name][1]) if cell_name("dpo", cells[name][1]) in scored else "dpo"
        if dpo in scored and cells[name][0] != "dpo":
            row["vs_dpo"] = _versus(scored[name], scored[dpo], prompts, settings.seed)
        if best_scores is not None:
            row["vs_best_guidance"] = _versus(scored[name], best_scores, prompts, settings.seed)
    if best_scores is not None and "dpo" in scored:
        report["best_guidance"]["vs_dpo"] = _versus(best_scores, scored["dpo"], prompts, settings.seed)
    if settings.train_seeds > 1:
        report["seeds"] = _across_seeds(base_methods, settings, scored, base, best_scores, prompts, report["methods"])

    # 6. negative-preference CFG: each trained negative model (npo, self_npo; every training seed) in the negative branch
    #    of CFG, on the base and on DPO of the same seed; across seeds, each combination's combined row
    runs = {name: Path(report["methods"][name]["run_dir"]) for name in methods}
    npo_scores: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # combination -> per seed: (its scores, plain CFG's)
    for negative in (m for m in methods if cells[m][0] in NEGATIVE_METHODS):
        dpo = cell_name("dpo", cells[negative][1])
        dpo = dpo if dpo in runs else None
        retrained = not report["methods"][negative]["reused"] or (dpo is not None and not report["methods"][dpo]["reused"])
        for label, images, row in _npo_cfg_rows(negative, cells[negative], runs, dpo, components, prompts, seeds, sample_kw, root, code,
                                                settings, retrained):
            row_scores = _scores(scorer, images, prompts)
            plain = base if row["positive"] == "base" else scored[row["positive"]]
            result = _compare(row_scores, prompts, plain, settings.seed)
            report.setdefault("npo_cfg", {})[label] = {**row, **{k: v for k, v in result.items() if k != "yes_rate_change"}}
            npo_scores.setdefault(row["combination"], []).append((row_scores["overall"], plain["overall"]))
            columns[label] = images
            write_folder(samples / folder_name(label), images, prompts, seeds, model=settings.model, steps=settings.num_inference_steps,
                         guidance=settings.guidance_scale, **{k: row[k] for k in ("positive", "npo", "npo_alpha", "npo_beta")})
    if settings.train_seeds > 1 and npo_scores:
        from diffalign.eval.winrate import win_rate_over_seeds

        report["npo_cfg_seeds"] = {c: win_rate_over_seeds([a.tolist() for a, _ in pairs], [b.tolist() for _, b in pairs], prompts,
                                                           seed=settings.seed) for c, pairs in npo_scores.items()}

    if ranking_cfg is not None:
        points = method_points(report)  # every point has its accuracies; negative models are trained to lose, so also without them
        report["ranking_relation"] = {**relation(points),
                                      "without_negative_models": relation({m: p for m, p in points.items() if m not in NEGATIVE_METHODS})}
    report["total_seconds"] = time.perf_counter() - wall
    _write_outputs(report, out, columns, len(held), settings)
    if settings.eval_split == "held_out":
        append_ledger(ledger, ledger_entry(report, out))
    return report


def method_points(report: dict) -> dict[str, dict]:
    """Per method (its seeds' means when the report has seeds, else per row): win-rate against the base with its interval
    and seeds, and, when measured, ranking and reward accuracy; what the report's plots and relation are drawn from."""
    points = {}
    combined = report.get("seeds") or {}
    for m, r in (combined or report["methods"]).items():
        vs = r["vs_base"] if combined else r
        point = {"win_rate": vs["win_rate"], "per_seed": vs.get("per_seed", [vs["win_rate"]]), "ci": (vs["ci_low"], vs["ci_high"])}
        if "ranking" in r:
            point.update({k: r["ranking"][k]["mean" if combined else "value"] for k in ("ranking_accuracy", "reward_accuracy")})
        points[m] = point
    return points


_VOLATILE = {"reused", "samples_reused", "run_dir", "dir", "cache_root", "ledger", "workdir", "npo"}  # flags and paths


def without_timings(report):
    """The report with what may differ between two runs of the same bench removed: times, reuse flags and paths (a
    `*seconds` key, ``reused``, ``samples_reused`` and the path fields); what remains is a function of the settings,
    the code and the machine's numerics, so two runs must agree on it exactly (`benchmarks/bench_reproducibility.py`)."""
    if isinstance(report, dict):
        return {k: without_timings(v) for k, v in report.items() if k not in _VOLATILE and not k.endswith("seconds")}
    if isinstance(report, list):
        return [without_timings(v) for v in report]
    return report


def _across_seeds(methods: list[str], settings: BenchSettings, scored: dict, base: dict, best: dict | None, prompts: list[str],
                  rows: dict[str, dict]) -> dict:
    """Per method, its training seeds combined (`win_rate_over_seeds`): against the base, DPO (seed by seed) and the base
    at its best guidance scale; the seeds' ranking and reward accuracies, and their mean compute (`rows`: the cells)."""
    from diffalign.eval.winrate import win_rate_over_seeds

    seeds = range(settings.train_seeds)
    out = {}
    for m in methods:
        mine = [scored[cell_name(m, s)]["overall"].tolist() for s in seeds]
        row = {"vs_base": win_rate_over_seeds(mine, [base["overall"].tolist()] * len(mine), prompts, seed=settings.seed)}
        if "dpo" in methods and m != "dpo":
            dpo = [scored[cell_name("dpo", s)]["overall"].tolist() for s in seeds]
            row["vs_dpo"] = win_rate_over_seeds(mine, dpo, prompts, seed=settings.seed)
        if best is not None:
            row["vs_best_guidance"] = win_rate_over_seeds(mine, [best["overall"].tolist()] * len(mine), prompts, seed=settings.seed)
        cells = [rows[cell_name(m, s)] for s in seeds]
        if all("ranking" in r for r in cells):
            row["ranking"] = ranking_over_seeds([r["ranking"] for r in cells])
        row["dims"] = {d: float(np.mean([r["dims"][d] for r in cells])) for d in cells[0]["dims"]}  # Δ per dimension, the seeds' mean
        row["compute"] = {k: float(np.mean([r["compute"][k] for r in cells])) for k in ("forward_equivalents", "images_sampled", "train_seconds")}
        out[m] = row
    return out


def _npo_cfg_rows(negative: str, cell: tuple[str, int], runs: dict[str, Path], dpo: str | None, components, prompts, seeds, sample_kw,
                  root: Path, code: str, settings: BenchSettings, retrained: bool):
    """(label, images, record) of NPO-CFG with the weights of `negative` (the cell (method, training seed) `cell`): on the
    base model, on `dpo` (DPO of the same seed, when it ran), and the control with a random offset of the same norm on
    the base model. Each is compared with plain CFG of the same positive model. A record's ``combination`` names the row
    without its seed ("base + NPO-CFG (npo)"), the key its seeds are combined under."""
    from diffalign.models.lora import LORA_WEIGHT_NAME
    from diffalign.models.sampling import sample_with
    from diffalign.pipelines.generate import npo_cfg_pipeline
    from diffalign.pipelines.weights import find_weights, random_lora_like

    method, seed = cell
    delta = runs[negative] / "final"
    cases = [(f"base + NPO-CFG ({method})", "base", delta)]
    if dpo is not None:
        cases.append((f"dpo + NPO-CFG ({method})", dpo, delta))
    if find_weights(delta).kind == "lora":  # the control: a random LoRA with δ's shapes and dense norm
        control = runs[negative] / "random_offset" / LORA_WEIGHT_NAME
        if not control.is_file():
            random_lora_like(find_weights(delta), control, seed=settings.seed)
        cases.append((f"base + random offset (norm of {method})", "base", control))
    kw = {k: v for k, v in sample_kw.items() if k != "resolution"}
    for combination, positive, npo in cases:
        label = combination if seed == 0 else f"{combination} (seed {seed})"
        started = time.perf_counter()
        positive_dir = None if positive == "base" else runs[positive] / "final"
        key = sample_key(f"npo-cfg/{label}/{runs[negative].name}/{runs[positive].name if positive != 'base' else 'base'}", prompts, seeds,
                         sample_kw, code)

        def sample(npo=npo, positive_dir=positive_dir):
            pipe = npo_cfg_pipeline(components, npo, positive=positive_dir)
            return sample_with(pipe, prompts, seeds, height=sample_kw["resolution"], width=sample_kw["resolution"], **kw)

        images, reused = cached_samples(root / "samples" / key, sample, settings.fresh or retrained)  # a retrained model samples anew
        yield label, images, {"positive": positive, "negative": negative, "combination": combination, "train_seed": seed,
                              "npo": str(npo), "npo_alpha": 1.0, "npo_beta": 1.0, "samples_reused": reused,
                              "eval_seconds": time.perf_counter() - started}


def _write_outputs(report: dict, out: Path, columns: dict[str, list[Image.Image]], captions: int, settings: BenchSettings) -> None:
    """The report JSON, its markdown table, the sample grid, and the workdir's index of run directories."""
    out.write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown_table(report))
    rows = min(8, captions)
    shown = [i * captions // rows * settings.eval_seeds for i in range(rows)]  # the first seed of captions spread over the split
    names = [name for name in columns if "(seed " not in name]  # one column per method: its first training seed
    paint_grid([[columns[name][j] for name in names] for j in shown], scale=3, column_labels=names).save(out.with_suffix(".png"))
    points = method_points(report)
    if points:  # the plots beside the table: out_methods.png, out_ranking.png
        from diffalign.eval.toyplots import plot_ranking_relation, plot_win_rates

        seeds = report["settings"]["train_seeds"]
        plot_win_rates(points, out.with_name(out.stem + "_methods.png"),
                       f"toy world, {report['settings']['eval_split']} captions: win-rate vs base, 95% interval"
                       + (f", {seeds} training seeds" if seeds > 1 else ""))
        if "ranking_relation" in report:
            plot_ranking_relation(points, report["ranking_relation"], out.with_name(out.stem + "_ranking.png"))
    workdir = Path(settings.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    runs = {name: {k: r[k] for k in ("run_key", "run_dir", "reused")} for name, r in report["methods"].items()}
    atomic_write_text(workdir / "runs.json", json.dumps({"report": str(out), "data": report["data"], "methods": runs}, indent=2) + "\n")
