"""The ``kd`` command: world, teacher, distill, eval, report, ui.

Each subcommand validates its whole configuration before it writes anything; a bad value
ends the command with one line that names the key, the value and what is allowed, and
exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from kd.config import ConfigError, flat_keys, load_config

_CONFIG_HELP = (
    "key=value overrides of the config, by dotted name, e.g. loss.temperature=4 "
    "loss.kd_weight=0.5 student.n_layer=2 student.n_embd=128 train.steps=400. "
    "Keys: " + ", ".join(flat_keys())
)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="a YAML file of config values (nested or dotted keys)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=_CONFIG_HELP)


def _cmd_world(args: argparse.Namespace) -> int:
    from kd.config import WORLD_SIZES
    from kd.world import ensure_world

    if args.size not in WORLD_SIZES:
        raise ConfigError(f"--size={args.size!r} is not allowed: choose one of {', '.join(WORLD_SIZES)}")
    path = ensure_world(args.size, args.seed)
    print(path)
    print((path / "world.json").read_text())
    return 0


def _cmd_teacher(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)  # before torch loads: bad input fails at once
    from kd.teacher import ensure_teacher

    print(ensure_teacher(cfg, progress=True))
    return 0


def _cmd_distill(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)  # before torch loads: bad input fails at once
    from kd.run import distill

    metrics = distill(cfg, progress=True, evaluate=not args.no_eval)
    shown = ["val_loss", "teacher_val_loss", "acc_completion", "acc_choice", "em_qa", "f1_qa", "acc_mean",
             "teacher_acc_mean", "retention", "params", "latency_ms_per_token", "tokens_per_s"]
    print(json.dumps({k: metrics[k] for k in shown if k in metrics}, indent=1))
    print(f"student: {cfg.output_dir}/student\nmetrics: {cfg.output_dir}/metrics.json")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kd", description="Knowledge distillation of causal LMs, run as sweeps on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("world", help="generate the embedded world (corpus, eval sets, tokenizer) and print its path")
    p.add_argument("--size", default="default", help="tiny (tests), small, or default (the main job)")
    p.add_argument("--seed", type=int, default=0, help="the world's random seed")
    p.set_defaults(func=_cmd_world)

    p = sub.add_parser("teacher", help="train (or find cached) the teacher for a config and print its path")
    _add_config_args(p)
    p.set_defaults(func=_cmd_teacher)

    p = sub.add_parser("distill", help="distill one student: teacher + data + student spec -> student/ + metrics.json")
    _add_config_args(p)
    p.add_argument("--no-eval", action="store_true", help="skip task evaluation and latency measurement")
    p.set_defaults(func=_cmd_distill)

    # Sub-commands that live beside the modules they drive.
    from analysis import commands as report  # kd report / kd ui: the analysis layer, from the top
    from kd import cli_eval

    cli_eval.add_parser(sub)
    report.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"kd: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
