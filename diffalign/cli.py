"""The `diffalign` command.

    diffalign train [CONFIG] [section.key=value ...]     fine-tune (prepares the cache first if needed)
    diffalign prepare [CONFIG] [section.key=value ...]   build the latent-pair cache only
    diffalign configs                                    list the shipped recipes
    diffalign bench toy --methods dpo --out report.json  align the toy model, report win-rates vs. base
    diffalign demo                                       the whole loop on the embedded toy world
    diffalign toy pretrain --out DIR                     retrain the toy model from scratch (CPU)

CONFIG is a YAML path or the name of a shipped recipe (default: toy/dpo, Diffusion-DPO on the embedded toy model).
Multi-process: `accelerate launch -m diffalign train CONFIG ...`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

DEFAULT_CONFIG = "toy/dpo"


def _split(args: list[str]) -> tuple[str, list[str]]:
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return DEFAULT_CONFIG, args


def _cmd_train(args: argparse.Namespace) -> None:
    from diffalign.config import load_config
    from diffalign.trainers.loop import train

    path, overrides = _split(args.rest)
    train(load_config(path, overrides))


def _cmd_prepare(args: argparse.Namespace) -> None:
    from diffalign.config import load_config
    from diffalign.data import prepare_cache

    path, overrides = _split(args.rest)
    out = prepare_cache(load_config(path, overrides))
    print(f"cache ready: {out}")


def _cmd_configs(args: argparse.Namespace) -> None:
    from diffalign.config import shipped_config_path, shipped_configs

    for name in shipped_configs():
        print(f"{name:24s} {shipped_config_path(name)}")


def _cmd_toy_pretrain(args: argparse.Namespace) -> None:
    from diffalign.toy.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(seed=args.seed, vae_steps=args.vae_steps, unet_steps=args.unet_steps, batch=args.batch, threads=args.threads)
    out = pretrain(args.out, cfg)
    print(f"toy weights written to {out} (load with model.pretrained=builtin:toy after copying them to diffalign/toy/weights)")


def _bench_settings(args: argparse.Namespace):
    from pathlib import Path

    from diffalign.eval.toybench import QUICK, BenchSettings

    settings = BenchSettings(methods=tuple(m for m in args.methods.split(",") if m), workdir=Path(args.workdir), overrides=tuple(args.set),
                             eval_split=args.eval_split)
    if args.quick:  # the CI-size configuration: the direction, not the number
        settings = dataclasses.replace(settings, **QUICK)
    return settings


def _cmd_bench_toy(args: argparse.Namespace) -> None:
    from diffalign.eval.toybench import markdown_table, run_toy_bench

    report = run_toy_bench(_bench_settings(args), args.out)
    print(markdown_table(report))
    print(f"report: {args.out} (+ .md, .png)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffalign", description="Align text-to-image diffusion models with human preferences.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, text in (
        ("train", _cmd_train, "fine-tune from a YAML config (Diffusion-DPO, SFT)"),
        ("prepare", _cmd_prepare, "encode a preference source into the latent-pair cache"),
    ):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("rest", nargs="*", metavar="CONFIG [key=value ...]", help=f"YAML path or shipped recipe name (default {DEFAULT_CONFIG}), then dotted overrides")
        p.set_defaults(fn=fn)
    p = sub.add_parser("configs", help="list the shipped recipes")
    p.set_defaults(fn=_cmd_configs)
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_command", required=True)
    text = "train methods on the toy world and report win-rates against the base model"
    p = bench.add_parser("toy", help=text, description=text)
    p.add_argument("--methods", default="dpo", help="comma-separated methods (SFT on the winners is always added)")
    p.add_argument("--out", default="outputs/bench_toy/report.json", help="report JSON path (a .md table and a .png grid beside it)")
    p.add_argument("--workdir", default="outputs/bench_toy", help="cache and per-method outputs")
    p.add_argument("--quick", action="store_true", help="a small configuration (minutes): checks the direction only")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every method's config; METHOD:KEY=VALUE for one method (e.g. dpo:method.beta=2000)")
    p.add_argument("--eval-split", default="held_out", choices=("held_out", "train"), help="train: tune methods without looking at held-out captions")
    p.set_defaults(fn=_cmd_bench_toy)
    p = sub.add_parser("demo", help="the whole loop on the embedded toy world: data, DPO, generation, scoring, table")
    p.add_argument("--out", default="outputs/demo/report.json")
    p.add_argument("--workdir", default="outputs/demo")
    p.set_defaults(fn=_cmd_bench_toy, methods="dpo", quick=False, set=[], eval_split="held_out")
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
