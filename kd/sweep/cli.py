"""The command line every sweep script shares: ``python sweeps/X.py [--preset ...]``.

:func:`main` parses ``--preset/--resume/--output-dir/--address/...``, checks every setting
(the whole search space's corners included) before Ray starts or a file is written, then
hands typed objects to :func:`kd.sweep.driver.run_sweep`. A resume is the sweep's own:
preset, budget, overrides, space and options come from the folder's ``sweep.json``, and a
flag that contradicts them is refused. Nothing here imports Ray at module level.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kd.config import ConfigError, KDConfig, apply_overrides, parse_overrides, validate
from kd.sweep.spec import (PRESET_REPEATS, PRESETS, SweepError, SweepOptions, SweepSpec, check_sweep,
                           space_from_json)
from kd.sweep.util import preflight


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + line
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parser(spec: SweepSpec) -> argparse.ArgumentParser:
    p = _Parser(prog=f"sweeps/{spec.name}.py", description=spec.description or f"The {spec.name} sweep.")
    p.add_argument("--preset", default=None, help=f"budget and sizes: {', '.join(PRESETS)} (default demo; "
                   f"a resume uses the sweep's own); trials: {', '.join(f'{k}={v}' for k, v in spec.budget.items())}")
    p.add_argument("--resume", action="store_true", help="continue the interrupted sweep in --output-dir "
                   f"(default: the latest one under runs/sweeps/{spec.name}/) as it was started")
    p.add_argument("--output-dir", default=None, help=f"where mlflow.db, Tune state and results go "
                   f"(default: a new runs/sweeps/{spec.name}/<date-time>/)")
    p.add_argument("--address", default=None, help="Ray cluster to join ('auto' on a cluster head; "
                   "default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--trials", type=int, default=None, help="override the preset's trial budget")
    p.add_argument("--repeats", type=int, default=None, help="seeds per finalist (the best or the front, and "
                   f"the CE-only reference); default per preset: "
                   f"{', '.join(f'{k}={spec.repeats_for(k)}' for k in PRESET_REPEATS)}")
    p.add_argument("--num-workers", type=int, default=None,
                   help="Ray Train workers per trial (default 1: the loop runs in the trial itself)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (default: use GPUs if the cluster has any)")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="trials at once (default: what the cluster's CPUs/GPUs allow)")
    p.add_argument("--max-failures", type=int, default=1, help="worker-group restarts per multi-worker trial")
    p.add_argument("--no-early-stop", action="store_true", help="no ASHA early stopping (single objective)")
    p.add_argument("--no-reference", action="store_true", help="no CE-only reference runs")
    p.add_argument("--experiment", default=None, help="MLflow experiment name (default: the sweep's name)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="fix a config value for every trial, e.g. --set train.steps=300 (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="the search's random seed (default 0)")
    p.add_argument("--no-report", action="store_true", help="skip writing the analysis report at the end")
    return p


def _output_dir(name: str, given: str | None, resume: bool) -> Path:
    """``--output-dir``, else a new dated folder (so running a sweep twice never clashes),
    else with ``--resume`` the latest folder that holds a sweep."""
    if given:
        return Path(given).expanduser().resolve()
    root = (Path("runs") / "sweeps" / name).resolve()
    if resume:
        found = sorted(p.parent for p in root.glob("*/sweep.json"))
        return found[-1] if found else root
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = root / stamp
    n = 1
    while out.exists():  # two starts in one second
        out, n = root / f"{stamp}-{n}", n + 1
    return out


@contextlib.contextmanager
def _watch_ctrl_c() -> Iterator[threading.Event]:
    """Within the block, SIGINT raises KeyboardInterrupt as usual and also sets the yielded
    flag, which the driver checks before each Tune phase: Python drops a KeyboardInterrupt
    raised inside a callback it cannot raise from (measured: in logging's fork hook while
    Ray started), and the sweep then ran to its end as if nothing had been pressed. The
    handler and ``sys.unraisablehook`` are restored when the block ends."""
    flag = threading.Event()

    def on_sigint(signum: int, frame: Any) -> None:
        flag.set()
        signal.default_int_handler(signum, frame)

    previous_hook = sys.unraisablehook

    def on_unraisable(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt) and flag.is_set():
            return  # not lost: the flag holds it (else Python prints it as a traceback)
        previous_hook(unraisable)

    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield flag  # someone else owns SIGINT (a host program): leave it to them
        return
    signal.signal(signal.SIGINT, on_sigint)
    sys.unraisablehook = on_unraisable
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.unraisablehook = previous_hook


def _remove_if_empty(path: Path) -> None:
    try:
        path.rmdir()  # only succeeds when empty
    except OSError:
        pass


def _fail(prog: str, message: str, code: int = 2) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def _resumed(spec: SweepSpec, args: argparse.Namespace, extra: dict[str, Any], state: dict[str, Any]
             ) -> tuple[SweepSpec, KDConfig, dict[str, Any]]:
    """The stored sweep, after refusing every flag that contradicts it (one line each)."""
    given = {"--preset": (args.preset, state["preset"]), "--trials": (args.trials, state["budget"]),
             "--repeats": (args.repeats, state.get("repeats")), "--num-workers": (args.num_workers,
                                                                                 state.get("num_workers")),
             "--seed": (args.seed, state.get("seed"))}
    for flag, (value, stored) in given.items():
        if value is not None and value != stored:
            raise ConfigError(f"{flag}={value} contradicts the sweep being resumed ({flag}={stored} in "
                              "sweep.json): a resume continues the sweep as it was started; drop the flag, "
                              "or start a new sweep in another --output-dir")
    if extra and extra != state.get("overrides", {}):
        raise ConfigError(f"--set {_sets(extra)} contradicts the sweep being resumed "
                          f"(--set {_sets(state.get('overrides', {})) or 'nothing'} in sweep.json): drop --set to "
                          "resume it as it was started")
    if args.no_early_stop and state.get("early_stop", True):
        raise ConfigError("--no-early-stop contradicts the sweep being resumed (it early-stops): drop the flag")
    stored = SweepSpec(name=state["name"], space=space_from_json(state["space"]), objectives=state["objectives"],
                       budget={state["preset"]: state["budget"]}, points=state.get("points", []),
                       description=spec.description)
    base = apply_overrides(KDConfig(), state["base"])
    validate(base)
    return stored, base, state


def _sets(overrides: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in overrides.items())


def main(spec: SweepSpec, argv: list[str] | None = None) -> int:
    """Run a sweep script's command line; returns the exit status (0 = done, 130 = interrupted)."""
    p = parser(spec)
    args = p.parse_args(argv)
    for flag, value in (("--trials", args.trials), ("--repeats", args.repeats), ("--num-workers", args.num_workers),
                        ("--max-concurrent", args.max_concurrent)):
        if value is not None and value < 1:
            _fail(p.prog, f"{flag}={value} is not allowed: must be >= 1")
    if args.max_failures < -1:
        _fail(p.prog, f"--max-failures={args.max_failures} is not allowed: must be >= 0, or -1 for no limit")
    output_dir = _output_dir(spec.name, args.output_dir, args.resume)
    try:
        from kd.preflight import check_output_dir

        check_output_dir(output_dir, key="--output-dir")  # a file, a read-only mount: before any work
    except ConfigError as e:
        _fail(p.prog, str(e))
    state_file = output_dir / "sweep.json"
    if args.resume and not state_file.is_file():
        _fail(p.prog, f"--resume: no sweep to resume in {output_dir} (no sweep.json); run without --resume first")
    if not args.resume and state_file.is_file():
        _fail(p.prog, f"{output_dir} already holds a sweep: pass --resume to continue it, or a new --output-dir")
    try:
        extra = parse_overrides(args.overrides)
        if args.resume:
            state = json.loads(state_file.read_text())
            run_spec, base, state = _resumed(spec, args, extra, state)
            preset, budget = state["preset"], state["budget"]
            repeats, seed = state.get("repeats", 1), state.get("seed", 0)
            num_workers, early_stop = state.get("num_workers", 1), state.get("early_stop", True)
            references = state.get("references", True)
            if state.get("phase") == "done":
                print(f"sweep {state['name']} in {output_dir} is finished ({budget} trials, preset {preset}): "
                      f"nothing to resume; results: {output_dir / 'results.json'}")
                return 0
        else:
            preset = args.preset or "demo"
            run_spec, base = spec, check_sweep(spec, preset, extra)
            budget = args.trials or spec.budget[preset]
            repeats = args.repeats or spec.repeats_for(preset)
            seed, num_workers = args.seed or 0, args.num_workers or 1
            early_stop, references = not args.no_early_stop, not args.no_reference
    except ConfigError as e:
        _fail(p.prog, str(e))
    options = SweepOptions(
        output_dir=output_dir, preset=preset, budget=budget, overrides=extra if not args.resume else state["overrides"],
        num_workers=num_workers, use_gpu=True if args.gpu else None,
        address=args.address or os.environ.get("RAY_ADDRESS"), resume=args.resume, early_stop=early_stop,
        max_concurrent=args.max_concurrent, max_failures=args.max_failures, experiment=args.experiment,
        seed=seed, repeats=repeats, references=references,
    )

    existed = output_dir.exists()
    try:
        preflight(bool(options.use_gpu), options.address)  # a dead service fails before Ray is imported
        from kd.sweep.driver import run_sweep  # imports Ray: only after every check passed

        with _watch_ctrl_c() as ctrl_c:
            results = run_sweep(run_spec, base, dataclasses.replace(options, interrupted=ctrl_c.is_set))
    except ConfigError as e:  # a value the data refuses (kd.preflight), found before Ray starts
        _fail(p.prog, str(e))
    except SweepError as e:
        _fail(p.prog, str(e), 1)
    except KeyboardInterrupt:  # Ctrl-C before Tune took over (Ray's start-up, the teacher)
        started = state_file.is_file()
        print(f"{p.prog}: interrupted" + (f"; resume with  python sweeps/{spec.name}.py --resume --output-dir "
                                          f"{output_dir}" if started else " before the sweep started: rerun "
                                          "the command to start it"), file=sys.stderr)
        return 130
    finally:
        if not existed:
            _remove_if_empty(output_dir)  # a sweep that never started leaves no empty folder behind
    print(results.text())
    if results.error:
        _fail(p.prog, results.error, 1)
    if results.interrupted:
        print(f"interrupted: resume with  python sweeps/{spec.name}.py --resume --output-dir {output_dir}")
        return 130
    if not args.no_report:
        path = write_report(results)
        if path:
            print(f"report: {path}")
    return 0


def write_report(results: Any) -> str | None:
    """Write the analysis report into the sweep's output folder; return its path."""
    from analysis.report import write_report as write  # the analysis layer, called from the top

    try:
        return str(write(results.tracking_uri, results.experiment, results.output_dir / "report",
                         parent_run_id=results.parent_run_id))
    except Exception as e:  # the sweep's results are safe in MLflow; say what went wrong
        print(f"report: not written ({type(e).__name__}: {e})", file=sys.stderr)
        return None
