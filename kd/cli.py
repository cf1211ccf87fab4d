"""The ``kd`` command: world, teacher, distill, eval, report, ui.

Each subcommand validates its whole configuration before it writes anything; a bad value
(or flag) ends the command with one line that names the key, the value and what is
allowed, and exit status 2. Ctrl-C ends it with one line and status 130; ``kd distill``
resumes from its checkpoint when the same command runs again.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import textwrap
from collections.abc import Sequence
from typing import NoReturn

from kd.config import WORLD_SIZES, ConfigError, describe_keys, load_config

_CONFIG_HELP = (
    "key=value overrides of the config, by dotted name, e.g. loss.temperature=4 "
    "loss.kd_weight=0.5 student.n_layer=2 student.n_embd=128 train.steps=400 "
    "(every key, its default and what it allows: below)"
)


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error: a usage block on stderr buries the one line that matters."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's layout and appends each option's default where it has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.option_strings and action.default not in (None, False, argparse.SUPPRESS)
                and "%(default)" not in text):
            text += " (default: %(default)s)"
        return text


def _first_sentence(doc: str) -> str:
    text = " ".join(doc.replace("``", "").split())
    end = text.find(". ")
    return text if end < 0 else text[: end + 1]


def config_epilog() -> str:
    """Every config key with its default, what it allows and what it does (``--help``)."""
    lines = ["config keys, as key=default [allowed] and what each does:"]
    for key, default, allowed, doc in describe_keys():
        lines.append(f"  {key}={default}  [{allowed}]")
        lines += textwrap.wrap(_first_sentence(doc), width=96, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="a YAML file of config values (nested or dotted keys)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=_CONFIG_HELP)
    p.epilog = config_epilog()


def _cmd_world(args: argparse.Namespace) -> int:
    from kd.world import ensure_world

    path = ensure_world(args.size, args.seed)
    print(path)
    print((path / "world.json").read_text())
    return 0


def _cmd_teacher(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)  # before torch loads: bad input fails at once
    from kd.preflight import check_device, check_training

    check_device("train.device", cfg.train.device)  # before kd.teacher's imports
    from kd.teacher import ensure_teacher

    if cfg.teacher.source == "train":
        check_training(cfg, student=False)  # device and teacher.batch_size, before the teacher trains
    print(ensure_teacher(cfg, progress=True))
    return 0


def _cmd_distill(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)  # before torch loads: bad input fails at once
    from kd.preflight import check_device, check_output_dir

    # The quick checks before kd.run's imports (seconds of torch and transformers); the
    # rest of the preflight (the data) runs in distill().
    check_output_dir(cfg.output_dir)
    check_device("train.device", cfg.train.device)
    from kd import resume
    from kd.run import distill

    checkpoint = resume.plan(cfg, resume=args.resume, fresh=args.fresh)
    if checkpoint is not None:
        print(f"resuming from step {resume.step_of(checkpoint)}: {checkpoint}", flush=True)
    try:
        metrics = distill(cfg, progress=True, evaluate=not args.no_eval, resume_from=checkpoint,
                          report=lambda _m, ckpt: resume.mark(cfg) if ckpt else None)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(resume.interrupted(cfg)) from None
    shown = ["val_loss", "teacher_val_loss", "acc_completion", "acc_choice", "em_qa", "f1_qa", "acc_mean",
             "teacher_acc_mean", "retention", "params", "latency_ms_per_token", "tokens_per_s"]
    print(json.dumps({k: metrics[k] for k in shown if k in metrics}, indent=1))
    print(f"student: {cfg.output_dir}/student\nmetrics: {cfg.output_dir}/metrics.json")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kd", description="Knowledge distillation of causal LMs, run as sweeps on Ray.",
                     formatter_class=_HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("world", help="generate the embedded world (corpus, eval sets, tokenizer) and print its path")
    p.add_argument("--size", default="default", choices=WORLD_SIZES, help="tiny (tests), small, or default (the main job)")
    p.add_argument("--seed", type=int, default=0, help="the world's random seed (default: %(default)s)")
    p.set_defaults(func=_cmd_world)

    p = sub.add_parser("teacher", help="train (or find cached) the teacher for a config and print its path")
    _add_config_args(p)
    p.set_defaults(func=_cmd_teacher)

    p = sub.add_parser("distill", help="distill one student: teacher + data + student spec -> student/ + metrics.json",
                       description="Distill one student. Rerunning the same command continues from the checkpoint "
                                   "in output_dir (Ctrl-C leaves one).")
    _add_config_args(p)
    p.add_argument("--no-eval", action="store_true", help="skip task evaluation and latency measurement")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue from output_dir's checkpoint, which must "
                       "exist (a rerun without flags also continues from it when there is one)")
    again.add_argument("--fresh", action="store_true", help="start at step 0, discarding output_dir's checkpoint")
    p.set_defaults(func=_cmd_distill)

    # Sub-commands that live beside the modules they drive.
    from analysis import commands as report  # kd report / kd ui: the analysis layer, from the top
    from kd import cli_eval

    cli_eval.add_parser(sub)
    report.add_parser(sub)
    for p in sub.choices.values():  # also the subcommands registered by other modules
        p.formatter_class = _HelpFormatter
        for action in p._actions:  # an option without help text still shows its default
            if action.help is None and action.option_strings and action.default not in (None, False):
                action.help = "(default: %(default)s)"
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops collecting key=value after an option (`kd distill a=1 --no-eval b=2`):
    # what is left over and has the shape of an override is one.
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*(args.overrides or []), *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    # SIGTERM (a scheduler, `kill`, a closing terminal) ends a run as Ctrl-C does: between two
    # steps, with a checkpoint and one line, not silently mid-step.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"kd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C: one line that says what is left, not a traceback
        _close_progress_bars()
        print(f"kd: interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 130


def _close_progress_bars() -> None:
    """End an interrupted run's progress bars with their newline, so that the last line is ours
    (an open bar would also redraw itself after it as the process exits)."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()


if __name__ == "__main__":
    sys.exit(main())
