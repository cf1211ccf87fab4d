"""What a sweep script declares, and the command line every sweep script shares.

A sweep script (``sweeps/*.py``) is a declaration: a search space built from the
dimensions below, objectives named in :mod:`kd.metrics`, a trial budget per preset and
fixed settings. :func:`main` parses ``--preset/--resume/--output-dir/--address/...``,
checks every setting (the whole search space's corners included) before Ray starts or a
file is written, then hands over to :func:`kd.sweep.run_sweep`. Nothing here imports Ray,
so a bad preset or override fails in well under a second with one line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from kd.config import ConfigError, KDConfig, apply_overrides, parse_overrides, validate
from kd.metrics import METRICS, direction

# ------------------------------------------------------------------------ space


@dataclass(frozen=True)
class LogUniform:
    """A float sampled on a log scale in [low, high]."""

    low: float
    high: float

    def corners(self) -> list[float]:
        return [self.low, self.high]


@dataclass(frozen=True)
class Uniform:
    """A float sampled uniformly in [low, high]."""

    low: float
    high: float

    def corners(self) -> list[float]:
        return [self.low, self.high]


@dataclass(frozen=True)
class IntRange:
    """An integer sampled uniformly in [low, high] (both included)."""

    low: int
    high: int

    def corners(self) -> list[int]:
        return [self.low, self.high]


@dataclass(frozen=True)
class Choice:
    """One of a few values."""

    values: tuple

    def __init__(self, values: list | tuple):
        object.__setattr__(self, "values", tuple(values))

    def corners(self) -> list:
        return list(self.values)


Dim = Union[LogUniform, Uniform, IntRange, Choice]
Space = dict[str, Dim]


def check_space(space: Space, base: dict[str, Any]) -> None:
    """Every key of ``space`` is a config key, and every corner of it validates with ``base``.

    Corners are the bounds of ranges and every value of a choice; their product is small
    for the spaces we ship (the pareto space has 2 * 2 * 4 * 4 corners).
    """
    for key, dim in space.items():
        if isinstance(dim, (LogUniform, Uniform, IntRange)) and not dim.low < dim.high:
            raise ConfigError(f"search space {key}: low={dim.low!r} must be below high={dim.high!r}")
        if isinstance(dim, LogUniform) and dim.low <= 0:
            raise ConfigError(f"search space {key}: a log scale needs low > 0, got {dim.low!r}")
        if isinstance(dim, Choice) and not dim.values:
            raise ConfigError(f"search space {key}: a choice needs at least one value")
    keys = list(space)
    for combo in itertools.product(*(space[k].corners() for k in keys)):
        validate(apply_overrides(KDConfig(), {**base, **dict(zip(keys, combo))}))


def check_objectives(objectives: list[str]) -> list[tuple[str, str]]:
    """``[(metric, "max"|"min"), ...]`` for objective names from :mod:`kd.metrics`."""
    if not objectives:
        raise ConfigError("objectives=[] is not allowed: name at least one metric from kd.metrics")
    out = []
    for name in objectives:
        if name not in METRICS:
            raise ConfigError(f"objective {name!r} is not allowed: choose from {', '.join(METRICS)}")
        out.append((name, direction(name)))
    return out


# ---------------------------------------------------------------------- presets

#: Settings each preset fixes for every sweep; a sweep script's ``fixed`` and ``--set`` win.
#: smoke: the tiny world, a tiny teacher and student, seconds per trial (tests, CI).
#: demo:  the embedded world at its small size and a shorter-trained teacher; sized so that
#:        the temperature sweep (8 trials) plus training the teacher on first use fit in
#:        10 minutes on 2 cores (BENCHMARKS.md has the measured time).
#: full:  the default world with the teacher trained twice as long; students at the
#:        teacher's token budget (STACK.md: compare students at equal token budgets).
PRESETS: dict[str, dict[str, Any]] = {
    # smoke keeps the online teacher: its sweeps last seconds and the e2e tests run it.
    "smoke": {  # the tests' tiny config (tests/conftest.py), so they share its teacher
        "data.world_size": "tiny",
        "teacher.n_layer": 2, "teacher.n_embd": 64, "teacher.n_head": 2, "teacher.steps": 150,
        "student.n_layer": 1, "student.n_embd": 32,
        "train.steps": 20, "train.batch_size": 8, "train.eval_every": 10, "train.eval_blocks": 8,
        "train.warmup_steps": 2,
    },
    "demo": {
        # The small world (100 people): the 4x256 teacher learns it in 300 steps (~3 min
        # here); the default world needs 760 (~7 min) and is the full preset's.
        "data.world_size": "small", "teacher.steps": 300,
        "train.steps": 150, "train.eval_every": 50, "train.eval_blocks": 32, "train.warmup_steps": 15,
        # Soft labels from a dense cache built once per sweep (exact: all V fp16 logits);
        # trials ran 1.6x faster on an idle machine here (bench/results/soft_label_speed.md).
        "loss.teacher_mode": "cache",
    },
    "full": {
        "teacher.steps": 1520, "train.steps": 760, "train.eval_every": 95, "train.warmup_steps": 40,
        "loss.teacher_mode": "cache",
    },
}


@dataclass
class SweepSpec:
    """A sweep script's declaration (see ``sweeps/temperature.py``)."""

    name: str
    space: Space
    objectives: list[str]
    budget: dict[str, int]
    """Trials per preset."""
    fixed: dict[str, Any] = field(default_factory=dict)
    """Settings every trial shares (override the preset)."""
    preset_fixed: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Extra fixed settings for one preset only (win over ``fixed``)."""
    points: list[dict[str, Any]] = field(default_factory=list)
    """Configurations to try first (e.g. the CE-only baseline ``loss.kd_weight=0``)."""
    description: str = ""
    preset_space: dict[str, Space] = field(default_factory=dict)
    """A different search space for one preset (e.g. widths that fit smoke's tiny teacher)."""
    preset_points: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def for_preset(self, preset: str) -> tuple[Space, list[dict[str, Any]]]:
        """The search space and first points of a preset."""
        return self.preset_space.get(preset, self.space), self.preset_points.get(preset, self.points)


def fixed_overrides(spec: SweepSpec, preset: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Preset settings, then the script's fixed ones, then per-preset ones, then ``--set``."""
    if preset not in PRESETS:
        raise ConfigError(f"--preset={preset!r} is not allowed: choose one of {', '.join(PRESETS)}")
    space = spec.for_preset(preset)[0]
    for key in extra or {}:
        if key in space:
            raise ConfigError(f"--set {key}=... is not allowed: {key} is what this sweep searches "
                              f"({space[key]})")
    out = {**PRESETS[preset], **spec.fixed, **spec.preset_fixed.get(preset, {}), **(extra or {})}
    for key in space:
        out.pop(key, None)  # searched keys are not fixed (a preset may fix them for other sweeps)
    return out


def check_sweep(spec: SweepSpec, preset: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Validate everything a sweep needs before Ray starts; return its fixed overrides."""
    fixed = fixed_overrides(spec, preset, extra)
    space, points = spec.for_preset(preset)
    validate(apply_overrides(KDConfig(), fixed))
    check_space(space, fixed)
    check_objectives(spec.objectives)
    for point in points:
        unknown = set(point) - set(space)
        if unknown:
            raise ConfigError(f"points: {sorted(unknown)} are not in the search space {sorted(space)}")
        validate(apply_overrides(KDConfig(), {**fixed, **point}))
    if spec.budget.get(preset, 0) < 1:
        raise ConfigError(f"budget[{preset!r}]={spec.budget.get(preset)!r} is not allowed: must be >= 1 trial")
    return fixed


# ---------------------------------------------------------------------- command line


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + line
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parser(spec: SweepSpec) -> argparse.ArgumentParser:
    p = _Parser(prog=f"sweeps/{spec.name}.py", description=spec.description or f"The {spec.name} sweep.")
    p.add_argument("--preset", default="demo", help=f"budget and sizes: {', '.join(PRESETS)} (default demo); "
                   f"trials: {', '.join(f'{k}={v}' for k, v in spec.budget.items())}")
    p.add_argument("--resume", action="store_true", help="continue the interrupted sweep in --output-dir "
                   f"(default: the latest one under runs/sweeps/{spec.name}/)")
    p.add_argument("--output-dir", default=None, help=f"where mlflow.db, Tune state and results go "
                   f"(default: a new runs/sweeps/{spec.name}/<date-time>/)")
    p.add_argument("--address", default=None, help="Ray cluster to join ('auto' on a cluster head; "
                   "default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--trials", type=int, default=None, help="override the preset's trial budget")
    p.add_argument("--num-workers", type=int, default=1,
                   help="Ray Train workers per trial (1 runs the loop in the trial itself)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (default: use GPUs if the cluster has any)")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="trials at once (default: what the cluster's CPUs/GPUs allow)")
    p.add_argument("--max-failures", type=int, default=1, help="worker-group restarts per multi-worker trial")
    p.add_argument("--no-early-stop", action="store_true", help="no ASHA early stopping (single objective)")
    p.add_argument("--experiment", default=None, help="MLflow experiment name (default: the sweep's name)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="fix a config value for every trial, e.g. --set train.steps=300 (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="the search's random seed")
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


def _fail(prog: str, message: str, code: int = 2) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def main(spec: SweepSpec, argv: list[str] | None = None) -> int:
    """Run a sweep script's command line; returns the exit status (0 = done, 130 = interrupted)."""
    p = parser(spec)
    args = p.parse_args(argv)
    if args.trials is not None and args.trials < 1:
        _fail(p.prog, f"--trials={args.trials} is not allowed: must be >= 1")
    output_dir = _output_dir(spec.name, args.output_dir, args.resume)
    try:
        extra = parse_overrides(args.overrides)
        fixed = check_sweep(spec, args.preset, extra)
    except ConfigError as e:
        _fail(p.prog, str(e))
    if args.resume and not (output_dir / "sweep.json").is_file():
        _fail(p.prog, f"--resume: no sweep to resume in {output_dir} (no sweep.json); run without --resume first")
    if not args.resume and (output_dir / "sweep.json").is_file():
        _fail(p.prog, f"{output_dir} already holds a sweep: pass --resume to continue it, "
                      f"or a new --output-dir")
    budget = args.trials or spec.budget[args.preset]
    space, points = spec.for_preset(args.preset)

    from kd import sweep  # imports Ray: only after every check passed

    results = sweep.run_sweep(
        spec.name, space, spec.objectives, budget, fixed,
        output_dir=output_dir, points=points, num_workers=args.num_workers,
        use_gpu=True if args.gpu else None, address=args.address or os.environ.get("RAY_ADDRESS"),
        resume=args.resume, early_stop=not args.no_early_stop, max_concurrent=args.max_concurrent,
        max_failures=args.max_failures, experiment=args.experiment, seed=args.seed,
        preset=args.preset,
    )
    print(results.summary())
    if results.interrupted:
        print(f"interrupted: resume with  python sweeps/{spec.name}.py --resume --output-dir {output_dir}"
              f" --preset {args.preset}")
        return 130
    if not args.no_report:
        path = write_report(results)
        if path:
            print(f"report: {path}")
    return 0


def write_report(results: Any) -> str | None:
    """Write the analysis report into the sweep's output folder; return its path."""
    from kd import report

    try:
        return str(report.write_report(results.tracking_uri, results.experiment, results.output_dir / "report",
                                       parent_run_id=results.parent_run_id))
    except Exception as e:  # the sweep's results are safe in MLflow; say what went wrong
        print(f"report: not written ({type(e).__name__}: {e})", file=sys.stderr)
        return None


def dump_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=_json_default))
    os.replace(tmp, path)


def _json_default(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return str(v)
