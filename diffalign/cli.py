"""The `diffalign` command.

    diffalign train [CONFIG] [section.key=value ...]     fine-tune (prepares the cache first if needed)
    diffalign prepare [CONFIG] [section.key=value ...]   build the latent-pair cache only
    diffalign configs                                    list the shipped recipes
    diffalign bench toy --methods dpo --out report.json  align the toy model, report win-rates vs. base
    diffalign demo                                       the whole loop on the embedded toy world
    diffalign generate --model M --prompts P ... --out DIR   images (+ metadata.jsonl), optionally with NPO-CFG (--npo)
    diffalign score DIR --scorers a,b                    score an image folder (CSV/jsonl + summary table)
    diffalign compare DIR_A DIR_B --scorers a,b          win-rate of A over B, images paired by prompt and seed
    diffalign scorers                                    list the scorers and what each needs
    diffalign prompts parti --out prompts.jsonl          evaluation prompt sets (PartiPrompts ships; HPDv2, DrawBench local)
    diffalign bench hpsv2 IMAGES --prompts-root DIR      the HPSv2 benchmark protocol on generated images
    diffalign toy pretrain --out DIR                     retrain the toy model from scratch (CPU)

CONFIG is a YAML path or the name of a shipped recipe (default: toy/dpo, Diffusion-DPO on the embedded toy model).
Multi-process: `accelerate launch -m diffalign train CONFIG ...`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from diffalign.config import ConfigError

DEFAULT_CONFIG = "toy/dpo"


REST_HELP = f"YAML path or shipped recipe name (default {DEFAULT_CONFIG}), then dotted overrides"


def _split(args: list[str]) -> tuple[str, list[str]]:
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return DEFAULT_CONFIG, args


def _cmd_train(args: argparse.Namespace) -> None:
    from diffalign.config import load_config

    path, overrides = _split(args.rest)
    if args.dry_run:
        from diffalign.trainers.dryrun import dry_run

        print("\n".join(dry_run(path, overrides, micro_batches=args.dry_run_batches).lines()))
        return
    from diffalign.trainers.loop import train

    train(load_config(path, overrides))


def _cmd_config_show(args: argparse.Namespace) -> None:
    from diffalign.config.loading import show_config

    path, overrides = _split(args.rest)
    print(show_config(path, overrides), end="")


def _skip_reasons(skipped: list[dict], top: int = 5) -> str:
    """'2 × truncated file; 1 × unknown format' for the most common reasons of a manifest's skipped items."""
    from collections import Counter

    counts = Counter(s["reason"] for s in skipped).most_common()
    text = "; ".join(f"{n} × {reason}" for reason, n in counts[:top])
    return text + (f"; {len(counts) - top} other reasons" if len(counts) > top else "")


def _prepare_summary(root, manifest: dict, ties_policy: str, seconds: float | None) -> list[str]:
    """What `diffalign prepare` left in the cache, from its manifest; `seconds` is None when it was already complete."""
    c = manifest["counts"]
    done = "already complete and matching the config: nothing to do" if seconds is None else f"built in {seconds:.1f}s"
    ties = "training leaves them out" if ties_policy == "drop" else "trained with label 0.5"
    return [f"cache ready: {root} ({done})",
            f"  items: {c['items']} written ({c['images']} images, {c['k']} per item; {c['captions']} captions) from "
            f"{c['source_items']} source items, in {c['shards']} shard(s)",
            f"  skipped: {c['skipped']}" + (f" ({_skip_reasons(manifest['skipped'])}; every one in manifest.json)" if c["skipped"] else ""),
            f"  ties: {c['ties']} item(s) labelled 0.5 (data.ties = {ties_policy}: {ties})"]


def _cmd_prepare(args: argparse.Namespace) -> None:
    import time
    from pathlib import Path

    from diffalign.config import load_config
    from diffalign.data import prepare_cache
    from diffalign.data.manifest import MANIFEST, read_manifest

    path, overrides = _split(args.rest)
    cfg = load_config(path, overrides)
    complete = (Path(cfg.data.cache_dir) / MANIFEST).is_file()
    start = time.perf_counter()
    out = prepare_cache(cfg)
    seconds = None if complete else time.perf_counter() - start
    print("\n".join(_prepare_summary(out, read_manifest(out), cfg.data.ties, seconds)))


def _cmd_configs(args: argparse.Namespace) -> None:
    from diffalign.config import ConfigError, shipped_config_path, shipped_configs
    from diffalign.config.loading import shipped_accelerate_configs

    if args.reference:
        from diffalign.config.reference import config_reference

        print(config_reference(), end="")
        return
    if args.path:
        path = shipped_config_path(args.path) or shipped_accelerate_configs().get(args.path.removesuffix(".yaml"))
        if path is None:
            raise ConfigError(f"no shipped config named {args.path!r}; `diffalign configs` lists them")
        print(path)
        return
    print("recipes (diffalign train NAME):")
    for name in shipped_configs():
        print(f"  {name:24s} {shipped_config_path(name)}")
    print("accelerate configs (accelerate launch --config_file PATH -m diffalign train NAME):")
    for name, path in shipped_accelerate_configs().items():
        print(f"  {name:24s} {path}")


def _cmd_toy_pretrain(args: argparse.Namespace) -> None:
    from diffalign.toy.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(seed=args.seed, vae_steps=args.vae_steps, unet_steps=args.unet_steps, batch=args.batch, threads=args.threads)
    out = pretrain(args.out, cfg)
    print(f"toy weights written to {out} (load with model.pretrained=builtin:toy after copying them to diffalign/toy/weights)")


def _bench_settings(args: argparse.Namespace):
    from pathlib import Path

    from diffalign.eval.toybench import DEMO, QUICK, BenchSettings

    settings = BenchSettings(methods=tuple(m for m in args.methods.split(",") if m), workdir=Path(args.workdir), overrides=tuple(args.set),
                             train_seeds=getattr(args, "train_seeds", 1),
                             eval_split=args.eval_split, cache_root=Path(args.cache_root) if args.cache_root else None,
                             ledger=Path(args.ledger) if args.ledger else None, fresh=args.fresh)
    if args.quick:  # the CI-size configuration: the direction, not the number
        settings = dataclasses.replace(settings, **QUICK)
    elif getattr(args, "demo", False):  # `diffalign demo`: the bench's DPO row on smaller data (minutes)
        settings = dataclasses.replace(settings, **DEMO)
    return settings


def _cmd_bench_toy(args: argparse.Namespace) -> None:
    from diffalign.eval.toybench import markdown_table, run_toy_bench

    report = run_toy_bench(_bench_settings(args), args.out)
    print(markdown_table(report))
    reuse = ", ".join(f"{name} {'reused' if r['reused'] else 'trained'} ({r['run_key']})" for name, r in report["methods"].items())
    print(f"models: {reuse}; cache {report['settings']['cache_root']}")
    print(f"report: {args.out} (+ .md, .png)")


def _scorer_options(args: argparse.Namespace) -> dict[str, dict]:
    """``--scorer-option NAME.KEY=VALUE`` into {NAME: {KEY: value}} (values parsed as YAML scalars)."""
    import yaml

    from diffalign.scorers.registry import ScorerConfigError

    options: dict[str, dict] = {}
    for item in args.scorer_option:
        key, sep, value = item.partition("=")
        name, dot, option = key.partition(".")
        if not sep or not dot or not option:
            raise ScorerConfigError(f"--scorer-option {item!r}: expected NAME.KEY=VALUE, e.g. pickscore.path=/models/PickScore_v1")
        options.setdefault(name, {})[option] = yaml.safe_load(value) if value else value
    return options


def _scorer_names(args: argparse.Namespace) -> list[str]:
    return [n for n in args.scorers.split(",") if n]


def _sidecar_prompt(image) -> str:
    sidecar = image.with_suffix(".txt")
    return sidecar.read_text(encoding="utf-8").strip() if sidecar.is_file() else ""


def _promptless_records(folder) -> list:
    """Every image of the folder, with its sidecar .txt prompt where there is one, else the empty prompt."""
    from diffalign.eval.imagefolder import ImageRecord, image_files

    return [ImageRecord(f, _sidecar_prompt(folder / f)) for f in image_files(folder)]


def _read_folder(folder, prompts, need_prompts: bool = True):
    """The folder's records; images the prompts do not cover are said (they are not scored). A folder without
    images is an error; when no scorer reads the prompt, a folder without prompts is scored with empty ones."""
    from pathlib import Path

    from diffalign.data.errors import DataError
    from diffalign.eval.imagefolder import IMAGE_SUFFIXES, METADATA, image_files, read_folder, unlisted

    folder = Path(folder)
    if folder.is_dir() and not image_files(folder):
        raise DataError(f"{folder}: no images (looked for {', '.join(IMAGE_SUFFIXES)} files, subfolders included)")
    if folder.is_dir() and not need_prompts and prompts is None and not (folder / METADATA).is_file():
        return _promptless_records(folder)
    records = read_folder(folder, prompts)
    extra = unlisted(folder, records)
    if extra:
        print(f"note: {len(extra)} image(s) in {folder} have no prompt and are not scored (e.g. {extra[0]})", file=sys.stderr)
    return records


def _load_scorers(args: argparse.Namespace) -> dict:
    from diffalign.scorers.registry import ScorerConfigError, load_scorers

    names = _scorer_names(args)
    options = _scorer_options(args)
    stray = sorted(set(options) - set(names))
    if stray:
        raise ScorerConfigError(f"--scorer-option for {', '.join(stray)}, which --scorers does not list ({', '.join(names)})")
    state = _launched_processes()
    device = args.device
    if state.num_processes > 1 and device in (None, "cuda") and state.device.type == "cuda":
        device = str(state.device)  # each process its own GPU
    return load_scorers(names, options, weights_dir=args.weights_dir, device=device, dtype=args.dtype, batch_size=args.batch_size)


def _cmd_score(args: argparse.Namespace) -> None:
    from pathlib import Path

    from diffalign.eval.folderscore import summary_table
    from diffalign.scorers.registry import uses_prompts

    records = _read_folder(args.dir, args.prompts, uses_prompts(_scorer_names(args)))
    scorers = _load_scorers(args)
    stem = Path(args.out) if args.out else Path(args.dir) / "scores"
    result = _score_folder(args, args.dir, records, scorers, stem)
    state = _launched_processes()
    if not state.is_main_process:  # a split run: the main process writes the merged tables
        return
    paths = result.write(stem)
    split = f" over {state.num_processes} processes" if state.num_processes > 1 else ""
    print(summary_table(result, f"{args.dir}: {len(result.records)} images in {result.seconds:.1f}s{split}"))
    for file, reason in result.skipped[:10]:
        print(f"skipped {file}: {reason}", file=sys.stderr)
    if len(result.skipped) > 10:
        print(f"... {len(result.skipped)} unreadable images skipped in all (listed in {paths[2]})", file=sys.stderr)
    print("wrote " + ", ".join(map(str, paths)))


def _cmd_compare(args: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    from diffalign.eval.compare import compare_scores, disagreement_grid, markdown_table, pair
    from diffalign.io import atomic_write_text
    from diffalign.scorers.registry import uses_prompts

    out = Path(args.out)
    folders = [Path(args.dir_a), Path(args.dir_b)]
    need_prompts = uses_prompts(_scorer_names(args))
    records = [_read_folder(folders[0], args.prompts_a, need_prompts), _read_folder(folders[1], args.prompts_b, need_prompts)]
    pair(*records)  # the folders must pair on (prompt, seed) before any scorer loads
    scorers = _load_scorers(args)
    results = [_score_folder(args, f, r, scorers, out / f"{label}_scores") for label, f, r in zip("ab", folders, records)]
    if not _launched_processes().is_main_process:  # a split run: the main process writes the report
        return
    for label, res in zip("ab", results):
        res.write(out / f"{label}_scores")
    report, pairing = compare_scores(*results, seed=args.seed)
    report.update({"a": str(folders[0]), "b": str(folders[1]), "skipped_a": len(results[0].skipped), "skipped_b": len(results[1].skipped)})
    atomic_write_text(out / "compare.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    table = markdown_table(report, folders[0].name, folders[1].name)
    atomic_write_text(out / "compare.md", table)
    overall = [n for n in scorers if n in results[0].scores]
    disagreement_grid(folders[0], folders[1], *results, pairing, overall, k=args.grid).save(out / "disagreements.png")
    print(table)
    print(f"wrote {out}/compare.json, compare.md, disagreements.png, a_scores.*, b_scores.*")


def _cmd_scorers(args: argparse.Namespace) -> None:
    import textwrap

    from diffalign.scorers.registry import REGISTRY

    indent = " " * 15
    for name, entry in sorted(REGISTRY.items()):
        files = ", ".join(f"{k}={v}" for k, v in entry.weights.items()) or "no weights"
        what = entry.what + ("" if entry.uses_prompt else "; the prompt is not used")
        print(textwrap.fill(what, 110, initial_indent=f"{name:14s} ", subsequent_indent=indent))
        print(f"{indent}weights: {files}")


def _cmd_prompts(args: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    from diffalign.eval.prompts import HPDV2_STYLES, drawbench, hpdv2_benchmark, parti_prompts
    from diffalign.io import atomic_write_text

    if args.set == "parti":
        rows = [{"prompt": r.prompt, "category": r.category, "challenge": r.challenge} for r in parti_prompts(args.category, args.challenge)]
    else:
        if args.root is None:
            raise ConfigError(f"diffalign prompts {args.set} needs --root DIR, a local copy of the HPDv2 benchmark prompts (zhwang/HPDv2)")
        if args.set == "drawbench":
            rows = [{"prompt": p, "set": "drawbench"} for p in drawbench(args.root)]
        else:
            styles = [args.style] if args.style else list(HPDV2_STYLES)
            rows = [{"prompt": p, "style": style} for style, ps in hpdv2_benchmark(args.root, styles).items() for p in ps]
    if args.out is None:
        print("\n".join(r["prompt"] for r in rows))
        return
    out = Path(args.out)
    text = "".join((json.dumps(r, ensure_ascii=False) if out.suffix == ".jsonl" else r["prompt"]) + "\n" for r in rows)
    atomic_write_text(out, text)
    print(f"{len(rows)} prompts written to {out}")


def _seeds(words: list[str]) -> list[int]:
    """``0 1 2`` and ranges ``0-9`` (inclusive), in the order given, each seed once."""
    seeds: list[int] = []
    for word in words:
        first, dash, last = word.partition("-")
        try:
            span = range(int(first), int(last) + 1) if dash and first else [int(word)]
        except ValueError:
            raise ConfigError(f"--seeds {word!r}: give integers or ranges like 0-9") from None
        seeds += [s for s in span if s not in seeds]
    if not seeds:
        raise ConfigError("--seeds: no seeds (an empty range?)")
    return seeds


def _generation_prompts(args: argparse.Namespace) -> list[str]:
    from diffalign.data.sources.prompts import builtin_prompt_set, read_prompt_file

    given = [x for x in (args.prompts, args.prompts_file, args.prompt_set) if x]
    if len(given) != 1:
        raise ConfigError("give exactly one of --prompts, --prompts-file, --prompt-set")
    if args.prompts:
        return list(args.prompts)
    if args.prompt_set:
        return builtin_prompt_set(args.prompt_set)
    return read_prompt_file(args.prompts_file)


def _cmd_generate(args: argparse.Namespace) -> None:
    from pathlib import Path

    from diffalign.pipelines.generate import Settings, generate_folder, load_generation_pipeline, warn_if_negative

    if args.lora and args.unet:
        raise ConfigError("give --lora or --unet, not both (one positive model)")
    prompts, seeds = _generation_prompts(args), _seeds(args.seeds)
    settings = Settings(model=args.model, model_config=args.model_config, adapter=args.lora or args.unet, adapter_scale=args.lora_scale, npo=args.npo,
                        npo_alpha=args.npo_alpha, npo_beta=args.npo_beta, steps=args.steps, guidance=args.guidance_scale,
                        scheduler=args.scheduler, negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                        dtype=args.dtype)
    state = _launched_processes()
    if state.is_main_process:
        warn_if_negative(settings.adapter, "--lora" if args.lora else "--unet")
    device = f"cuda:{state.local_process_index}" if args.device == "cuda" and state.num_processes > 1 else args.device  # a GPU each
    pipe = load_generation_pipeline(settings, lora=args.unet is None, device=device)
    counts = generate_folder(pipe, prompts, seeds, Path(args.out), settings, batch_size=args.batch_size, progress=not args.no_progress,
                             rank=state.process_index, world=state.num_processes, barrier=state.wait_for_everyone)
    if state.is_main_process:
        split = f", over {state.num_processes} processes" if state.num_processes > 1 else ""
        print(f"{counts['total']} images in {args.out} ({counts['generated']} generated, {counts['skipped']} already there{split}); "
              "metadata.jsonl and contact_sheet.png beside them")


def _launched_processes():
    """accelerate's view of the processes `accelerate launch` started (one process, rank 0, when run directly)."""
    from accelerate import PartialState

    return PartialState(cpu=os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true"))


def _cmd_bench_hpsv2(args: argparse.Namespace) -> None:
    import json

    from diffalign.eval.prompts import drawbench, hpdv2_benchmark, hpsv2_benchmark

    scorers = _load_scorers(args)
    if len(scorers) != 1:
        raise ConfigError("diffalign bench hpsv2 takes one scorer (--scorers hpsv21 for the v2.1 table)")
    styles = [s for s in args.styles.split(",") if s]
    prompts = hpdv2_benchmark(args.prompts_root, [s for s in styles if s != "drawbench"])
    if "drawbench" in styles:
        prompts["drawbench"] = drawbench(args.prompts_root)
    table = hpsv2_benchmark(args.images, prompts, next(iter(scorers.values())), batch_size=args.batch_size)
    for style, row in table.items():
        spread = f" ± {row['std']:.4f}" if "std" in row else ""
        print(f"{style:15s} {row['mean']:.2f}{spread}  ({row['images']} images)")
    if args.out:
        from diffalign.io import atomic_write_text

        atomic_write_text(args.out, json.dumps(table, indent=2) + "\n")


def _cmd_eval_ranking(args: argparse.Namespace) -> None:
    import json

    from diffalign.config import load_config
    from diffalign.eval.ranking import evaluate_ranking, markdown_table
    from diffalign.io import atomic_write_text

    path, overrides = _split(args.rest)
    for name in ("draws", "buckets", "bootstrap", "batch_size"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    result = evaluate_ranking(load_config(path, overrides), args.weights, device=args.device, progress=not args.no_progress,
                              draws=args.draws, buckets=args.buckets, seed=args.seed, n_boot=args.bootstrap, batch_size=args.batch_size)
    result.settings.update({"config": path, "overrides": overrides})
    print(markdown_table(result), end="")
    if args.out:
        atomic_write_text(args.out, json.dumps(result.as_dict(), indent=2) + "\n")
        print(f"wrote {args.out}")


def _add_scorer_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scorers", required=True, help="comma-separated registry names (diffalign scorers lists them)")
    p.add_argument("--scorer-option", action="append", default=[], metavar="NAME.KEY=VALUE",
                   help="a scorer option, e.g. pickscore.path=/models/PickScore_v1 or clipscore.convention=torchmetrics")
    p.add_argument("--weights-dir", default=None,
                   help="folder holding the official weight files under their release names (default $DIFFALIGN_WEIGHTS)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=4, help="threads decoding and preprocessing images ahead of the models")
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable image, naming it (default: skip it with the reason)")
    p.add_argument("--max-consecutive-failures", type=int, default=100, metavar="N",
                   help="stop after more than N unreadable images in a row (a wrong folder); default 100")
    p.add_argument("--no-progress", action="store_true")


def _score_folder(args: argparse.Namespace, folder, records, scorers: dict, stem):
    """Score one folder, resuming the journal a killed run of the same settings left beside ``stem``."""
    from diffalign.eval.folderscore import journal_path, score_records
    from diffalign.scorers.registry import scorer_identity

    options = _scorer_options(args)
    identity = {"scorers": [scorer_identity(n, args.weights_dir, **options.get(n, {})) for n in scorers], "dtype": args.dtype}
    state = _launched_processes()
    if state.num_processes > 1:  # each process scores its share (whole batches) and journals it; every process gets the merge
        from accelerate.utils import gather_object

        from diffalign.eval.folderscore import merge_shares, rank_share, rank_stem

        rank, world = state.process_index, state.num_processes
        share = score_records(folder, rank_share(records, args.batch_size, rank, world), scorers, batch_size=args.batch_size,
                              workers=args.workers, progress=not args.no_progress and rank == 0, strict=args.strict,
                              max_consecutive_failures=args.max_consecutive_failures, journal=journal_path(rank_stem(stem, rank)),
                              identity={**identity, "processes": world})
        return merge_shares(records, gather_object([share]))
    return score_records(folder, records, scorers, batch_size=args.batch_size, workers=args.workers, progress=not args.no_progress,
                         strict=args.strict, max_consecutive_failures=args.max_consecutive_failures,
                         journal=journal_path(stem), identity=identity)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffalign", description="Align text-to-image diffusion models with human preferences.")
    sub = parser.add_subparsers(dest="command", required=True)
    from diffalign.config import METHOD_CONFIGS

    for name, fn, text in (
        ("train", _cmd_train, f"fine-tune from a YAML config (method.name: {', '.join(METHOD_CONFIGS)})"),
        ("prepare", _cmd_prepare, "encode a preference source into the latent-pair cache"),
    ):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("rest", nargs="*", metavar="CONFIG [key=value ...]", help=REST_HELP)
        p.set_defaults(fn=fn)
        if name == "train":
            p.add_argument("--dry-run", action="store_true", help="print the resolved config with each value's source, the "
                           "effective batch and lr, the cache status, and time and memory per step measured on a few "
                           "micro-batches; train nothing")
            p.add_argument("--dry-run-batches", type=int, default=3, help="micro-batches timed by --dry-run (after one warm-up)")
    config = sub.add_parser("config", help="inspect a config").add_subparsers(dest="config_command", required=True)
    text = "print the resolved config, each value with where it came from (default, yaml, override)"
    p = config.add_parser("show", help=text, description=text)
    p.add_argument("rest", nargs="*", metavar="CONFIG [key=value ...]", help=REST_HELP)
    p.set_defaults(fn=_cmd_config_show)
    p = sub.add_parser("configs", help="list the shipped recipes and accelerate configs")
    p.add_argument("--reference", action="store_true", help="print every config key with its type, default and description (markdown)")
    p.add_argument("--path", metavar="NAME", help="print the file of one shipped recipe or accelerate config, e.g. accelerate/multi_gpu")
    p.set_defaults(fn=_cmd_configs)
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_command", required=True)
    text = "train methods on the toy world and report win-rates against the base model"
    p = bench.add_parser("toy", help=text, description=text)
    p.add_argument("--methods", default="dpo", help="comma-separated methods, or all (SFT on the winners is always added)")
    p.add_argument("--train-seeds", type=int, default=1, help="training seeds per method (train.seed + 0..N-1, the same data); "
                   "the report combines them (each (method, seed) is cached, so a long table builds across runs)")
    p.add_argument("--out", default="outputs/bench_toy/report.json", help="report JSON path (a .md table and a .png grid beside it)")
    p.add_argument("--workdir", default="outputs/bench_toy", help="where runs.json lists the run directories this report used")
    p.add_argument("--quick", action="store_true", help="a small configuration (minutes): checks the direction only")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override for every method's config; METHOD:KEY=VALUE for one method (e.g. dpo:method.beta=2000)")
    p.add_argument("--eval-split", default="held_out", choices=("held_out", "train"), help="train: tune methods without looking at held-out captions")
    p.add_argument("--cache-root", default=None, help="data and trained models reused across runs by content key "
                   "(default $XDG_CACHE_HOME/diffalign/bench or ~/.cache/diffalign/bench)")
    p.add_argument("--ledger", default=None, help="held-out runs append one JSON line here (default CACHE_ROOT/ledger.jsonl)")
    p.add_argument("--fresh", action="store_true", help="rebuild the data and retrain every method, replacing their cached entries")
    p.set_defaults(fn=_cmd_bench_toy)
    text = "the HPSv2 benchmark: images at IMAGES/<style>/<index:05d>.jpg scored as hpsv2/evaluation.py does"
    p = bench.add_parser("hpsv2", help=text, description=text)
    p.add_argument("images", help="folder with one subfolder per style")
    p.add_argument("--prompts-root", required=True, help="local copy of the HPDv2 benchmark prompts (<style>.json, drawbench.json)")
    p.add_argument("--styles", default="anime,concept-art,paintings,photo", help="comma-separated; add drawbench for DrawBench")
    p.add_argument("--out", default=None, help="JSON path for the table")
    _add_scorer_arguments(p)
    p.set_defaults(fn=_cmd_bench_hpsv2)
    p = sub.add_parser("demo", help="the whole loop on the embedded toy world: data, DPO, generation, scoring, table")
    p.add_argument("--out", default="outputs/demo/report.json")
    p.add_argument("--workdir", default="outputs/demo")
    p.add_argument("--cache-root", default=None, help="data and trained models reused across runs (default as for bench toy)")
    p.add_argument("--ledger", default=None, help="the run appends one JSON line here (default CACHE_ROOT/ledger.jsonl)")
    p.add_argument("--fresh", action="store_true", help="rebuild the data and retrain, replacing the cached entries")
    p.set_defaults(fn=_cmd_bench_toy, methods="dpo", quick=False, demo=True, set=[], eval_split="held_out")
    text = "generate images for prompts x seeds into a folder (metadata.jsonl, contact sheet), optionally with NPO weights in CFG"
    p = sub.add_parser("generate", help=text, description=text)
    p.add_argument("--model", required=True, help="base pipeline: a diffusers directory, a hub id, a single-file .safetensors "
                   "checkpoint as community models ship, or builtin:toy")
    p.add_argument("--model-config", default=None, help="for a single-file --model: the diffusers pipeline directory or hub id of "
                   "its family whose configs and tokenizers it uses (default: diffusers' reference repository, from the hub cache)")
    p.add_argument("--prompts", nargs="+", default=None, help="prompts on the command line")
    p.add_argument("--prompts-file", default=None, help=".txt (one per line), .json list, or .jsonl with a \"prompt\" field "
                   "(what `diffalign prompts` writes)")
    p.add_argument("--prompt-set", default=None, choices=("parti", "toy-train", "toy-held-out"), help="a built-in prompt set")
    p.add_argument("--seeds", nargs="+", default=["0"], help="seeds and inclusive ranges, e.g. 0 1 2 or 0-9 (each prompt gets each seed)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps")
    p.add_argument("--guidance-scale", type=float, default=5.0, help="classifier-free guidance w")
    p.add_argument("--negative-prompt", default=None, help="negative prompt (stacks with --npo, as in the official NPO code)")
    p.add_argument("--height", type=int, default=None, help="default: the model's own size")
    p.add_argument("--width", type=int, default=None, help="default: the model's own size")
    p.add_argument("--scheduler", default="ddim", choices=("ddim", "euler", "euler_a", "dpm++", "pndm", "unipc"),
                   help="ddim (η = 0, the default), euler, euler_a, dpm++, pndm, unipc: built from the model's own scheduler config")
    p.add_argument("--lora", default=None, help="positive LoRA: a .safetensors file or a directory holding one (a diffalign run's final/)")
    p.add_argument("--lora-scale", type=float, default=1.0, help="weight of the positive LoRA")
    p.add_argument("--unet", default=None, help="positive full UNet: a directory with config.json, or one whose unet/ is")
    p.add_argument("--npo", default=None, help="NPO / Self-NPO weights (LoRA or full UNet) for the negative branch of CFG")
    p.add_argument("--npo-alpha", type=float, default=1.0, help="α: share of the positive offset in the negative branch (official 1)")
    p.add_argument("--npo-beta", type=float, default=1.0, help="β: weight of the NPO offset in the negative branch (official 1)")
    p.add_argument("--batch-size", type=int, default=8, help="images per pipeline call (images do not depend on it)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (under accelerate launch, cuda is each process's own GPU)")
    p.add_argument("--out", required=True, help="output folder (rerunning skips images already there with the same settings)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=_cmd_generate)
    text = "score every image of a folder with one or more reward models"
    p = sub.add_parser("score", help=text, description=text)
    p.add_argument("dir", help="image folder (prompts from its metadata.jsonl, --prompts, or a sidecar .txt per image)")
    p.add_argument("--prompts", default=None, help="a .jsonl of file/prompt[/seed], or a .txt/.json with one prompt per image in file-name order")
    p.add_argument("--out", default=None, help="output stem (default DIR/scores: scores.csv, scores.jsonl, scores_summary.json)")
    _add_scorer_arguments(p)
    p.set_defaults(fn=_cmd_score)
    text = "win-rate of folder A over folder B per scorer, images paired by prompt and seed"
    p = sub.add_parser("compare", help=text, description=text)
    p.add_argument("dir_a")
    p.add_argument("dir_b")
    p.add_argument("--prompts-a", default=None)
    p.add_argument("--prompts-b", default=None)
    p.add_argument("--out", default="outputs/compare", help="folder for compare.json/.md, disagreements.png and both folders' scores")
    p.add_argument("--grid", type=int, default=8, help="pairs in the disagreement grid")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    _add_scorer_arguments(p)
    p.set_defaults(fn=_cmd_compare)
    p = sub.add_parser("scorers", help="list the scorers, what they compute and the weight files each needs")
    p.set_defaults(fn=_cmd_scorers)
    text = "write an evaluation prompt set (PartiPrompts ships; HPDv2 benchmark styles and DrawBench from a local copy)"
    p = sub.add_parser("prompts", help=text, description=text)
    p.add_argument("set", choices=("parti", "hpdv2", "drawbench"))
    p.add_argument("--category", default=None, help="PartiPrompts category, e.g. Animals")
    p.add_argument("--challenge", default=None, help="PartiPrompts challenge, e.g. Quantity")
    p.add_argument("--style", default=None, help="one HPDv2 style (anime, concept-art, paintings, photo); default all")
    p.add_argument("--root", default=None, help="the local HPDv2 benchmark folder (hpdv2, drawbench)")
    p.add_argument("--out", default=None, help=".jsonl (prompt and its labels) or .txt (one prompt per line); default: print")
    p.set_defaults(fn=_cmd_prompts)
    evaluate = sub.add_parser("eval", help="evaluation diagnostics").add_subparsers(dest="eval_command", required=True)
    text = ("ranking and reward accuracy (Chen et al., NeurIPS 2024) of the base model or a trained output on the preference pairs "
            "of a config's cache (built first if missing), overall and per timestep bucket, with 95%% pair-bootstrap intervals")
    p = evaluate.add_parser("ranking", help=text, description=text)
    p.add_argument("rest", nargs="*", metavar="CONFIG [key=value ...]", help=REST_HELP)
    p.add_argument("--weights", default=None, help="a training run's final/ directory (LoRA or full UNet); default: the base model (θ = ref)")
    p.add_argument("--draws", type=int, default=8, help="(t, ε) draws per pair, shared by its two images")
    p.add_argument("--buckets", type=int, default=10, help="equal timestep buckets of [0, T)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws and of the bootstrap")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples of the pairs")
    p.add_argument("--batch-size", type=int, default=32, help="pairs per forward (the numbers do not depend on it)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--out", default=None, help="JSON path for the result")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=_cmd_eval_ranking)
    toy = sub.add_parser("toy", help="the embedded toy world").add_subparsers(dest="toy_command", required=True)
    p = toy.add_parser("pretrain", help="train the toy pipeline from scratch on procedural scenes (CPU, ~40 min)")
    p.add_argument("--out", required=True, help="directory for the fp16 weights and pretrain.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=1500)
    p.add_argument("--unet-steps", type=int, default=6000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (results reproduce for the same count)")
    p.set_defaults(fn=_cmd_toy_pretrain)
    return parser


def main(argv: list[str] | None = None) -> int:
    from diffalign.errors import USER_ERRORS

    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except USER_ERRORS as e:
        print(f"diffalign {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
