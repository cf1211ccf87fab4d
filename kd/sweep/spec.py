"""What a sweep is, without Ray: search dimensions, the declaration, presets, options, checks.

A sweep script (``sweeps/*.py``) declares a :class:`SweepSpec`; the command line
(:mod:`kd.sweep.cli`) turns it and its flags into a validated base :class:`KDConfig` and
:class:`SweepOptions`, and :func:`kd.sweep.driver.run_sweep` runs them. Everything here is
checked before Ray starts or a file is written, so a bad preset or override fails in well
under a second with one line. Dotted keys (``loss.temperature``) appear only where a
trial's sampled values meet the config (:func:`trial_config`), the Tune boundary.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Union

from kd.config import ConfigError, KDConfig, apply_overrides, to_flat_dict, validate
from kd.metrics import METRICS, direction

class SweepError(RuntimeError):
    """A sweep that cannot run here (no GPU, no cluster, no tracking server): one line for people."""


META = "kd"  # the key of the sweep's own settings inside a trial's Tune config
VARIANT = "kd_variant"  # a finalist's fixed overrides and role (reference, repeat)

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
_DIMS = {cls.__name__: cls for cls in (LogUniform, Uniform, IntRange, Choice)}


def space_to_json(space: Space) -> dict[str, dict[str, Any]]:
    """A search space as plain data (what ``sweep.json`` stores, so a resume searches the same)."""
    out = {}
    for key, dim in space.items():
        body = {"values": list(dim.values)} if isinstance(dim, Choice) else {"low": dim.low, "high": dim.high}
        out[key] = {"type": type(dim).__name__, **body}
    return out


def space_from_json(data: dict[str, dict[str, Any]]) -> Space:
    """The inverse of :func:`space_to_json`."""
    out: Space = {}
    for key, body in data.items():
        body = dict(body)
        cls = _DIMS[body.pop("type")]
        out[key] = cls(body["values"]) if cls is Choice else cls(**body)
    return out


def check_space(space: Space, base: KDConfig) -> None:
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
    for cfg in corner_configs(space, [], base):
        validate(cfg)


def corner_configs(space: Space, points: list[dict[str, Any]], base: KDConfig) -> list[KDConfig]:
    """``base`` at every corner of ``space`` (see :func:`check_space`) and at every point."""
    keys = list(space)
    corners = [apply_overrides(base, dict(zip(keys, combo)))
               for combo in itertools.product(*(space[k].corners() for k in keys))]
    return corners + [apply_overrides(base, point) for point in points]


def check_cache_serves(configs: list[KDConfig], n_vocab: int) -> None:
    """Refuse, in one line, a sweep whose temperatures its soft-label cache cannot serve.

    The compact cache is exact only on its temperature grid, and ``auto`` picks it for a
    large vocabulary: known once the tokenizer is, so this runs before Ray with it
    (:mod:`kd.soft_labels`, check_temperatures), not in the first trial at T = 20.
    """
    from kd.soft_labels import check_temperatures  # torch: only on the sweep's preparing path

    temps = [c.loss.temperature for c in configs]
    for cfg in configs:
        check_temperatures(cfg, min(temps), max(temps), n_vocab)


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


def trial_config(base: dict[str, Any], sampled: dict[str, Any]) -> KDConfig:
    """A trial's config: the sweep's base (flat, as it travels in the Tune config) plus the
    values the searcher sampled for it. The one place dotted keys meet the dataclasses."""
    variant = (sampled.get(VARIANT) or {}).get("overrides", {})
    own = {k: v for k, v in sampled.items() if k not in (META, VARIANT)}
    return apply_overrides(KDConfig(), {**base, **own, **variant})


# ---------------------------------------------------------------------- presets

#: Settings each preset fixes for every sweep; a sweep script's ``fixed`` and ``--set`` win.
#: smoke: the tiny world, a tiny teacher and student, seconds per trial (tests, CI).
#: demo:  the default world and the default teacher (kd/config.py: 4x192, 1,500 steps),
#:        students started from the teacher (evenly spaced layers as DistilBERT and DistilGPT2
#:        were, the leading slice of each weight when narrower: kd.models.build_student) so
#:        that they learn inside the main job's budget: the whole temperature sweep, teacher
#:        training on first use included, took 7-8 minutes on 2 Xeon cores with AMX (bf16)
#:        and 18.4 on 2 AVX2 cores, where everything runs in fp32 (7.3 of them the teacher,
#:        9.5 the 16 student runs; BENCHMARKS.md).
#: full:  the default world with the teacher trained twice as long; students at the
#:        teacher's token budget (students compare fairly only at equal token budgets).
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
        # Randomly initialised 2x128 students learnt no fact in 150 or 300 steps here
        # (acc_mean 0.12, chance level); started from the teacher's first heads and
        # channels, the same student reached 0.62 (CE only) in 150 steps (BENCHMARKS.md).
        "student.init": "teacher",
        "train.steps": 150, "train.eval_every": 50, "train.eval_blocks": 32, "train.warmup_steps": 15,
        # Soft labels from a dense cache built once per sweep (exact: all V fp16 logits);
        # trials ran 1.6x faster on an idle machine here (bench/results/soft_label_speed.md).
        "teacher.mode": "cache",
    },
    "full": {
        "student.init": "teacher",
        "teacher.steps": 2000, "train.steps": 1000, "train.eval_every": 125, "train.warmup_steps": 50,
        "teacher.mode": "cache",
    },
}

#: Seeds per finalist configuration (the first run counts): one seed says nothing about
#: spread, so demo and full re-run the best and the reference once more at least.
PRESET_REPEATS = {"smoke": 1, "demo": 2, "full": 3}


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
    repeats: dict[str, int] = field(default_factory=dict)
    """Seeds per finalist for a preset, where this sweep needs other than PRESET_REPEATS."""

    def repeats_for(self, preset: str) -> int:
        """Seeds per finalist configuration (``--repeats`` overrides it)."""
        return self.repeats.get(preset, PRESET_REPEATS[preset])

    def for_preset(self, preset: str) -> tuple[Space, list[dict[str, Any]]]:
        """The search space and first points of a preset."""
        return self.preset_space.get(preset, self.space), self.preset_points.get(preset, self.points)


@dataclass
class SweepOptions:
    """How to run a sweep: everything the command line decides besides the config."""

    output_dir: Path
    preset: str = "demo"
    budget: int = 1
    """Searched trials (the references and finalist repeats come on top)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """The ``--set`` values, kept as given so a resume can tell a contradicting flag."""
    num_workers: int = 1
    use_gpu: bool | None = None
    address: str | None = None
    resume: bool = False
    early_stop: bool = True
    max_concurrent: int | None = None
    max_failures: int = 1
    experiment: str | None = None
    seed: int = 0
    repeats: int = 1
    """Seeds per finalist (best or front, and the CE-only reference); 1 = no re-runs."""
    references: bool = True
    """Run the CE-only reference (``loss.kd_weight=0``) besides the searched trials."""
    runner: Callable[..., dict[str, float]] | None = None
    """Called instead of :func:`kd.run.distill` in each trial (benchmarks' stand-in loops)."""
    prepare: bool = True
    """Build the world and the teacher before the trials start."""
    force_train: bool = False
    """Run one-worker trials as a ``TorchTrainer`` too (bench/sweep_overhead.py measures it)."""
    interrupted: Callable[[], bool] | None = None
    """Whether Ctrl-C came (the command line's flag): checked before Tune starts, since a
    KeyboardInterrupt raised where Python cannot raise it (a fork hook of Ray's start-up)
    is printed as "Exception ignored" and lost."""


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


def check_sweep(spec: SweepSpec, preset: str, extra: dict[str, Any] | None = None) -> KDConfig:
    """Validate everything a sweep needs before Ray starts; return its base config."""
    base = apply_overrides(KDConfig(), fixed_overrides(spec, preset, extra))
    validate(base)
    space, points = spec.for_preset(preset)
    check_space(space, base)
    check_objectives(spec.objectives)
    for point in points:
        unknown = set(point) - set(space)
        if unknown:
            raise ConfigError(f"points: {sorted(unknown)} are not in the search space {sorted(space)}")
        validate(apply_overrides(base, point))
    if spec.budget.get(preset, 0) < 1:
        raise ConfigError(f"budget[{preset!r}]={spec.budget.get(preset)!r} is not allowed: must be >= 1 trial")
    return base


def base_dict(base: KDConfig) -> dict[str, Any]:
    """The base config as the flat dict that travels in every trial's Tune config."""
    flat = to_flat_dict(base)
    flat.pop("output_dir", None)  # each trial has its own
    return flat


def is_close(a: dict[str, Any], b: dict[str, Any], space: Space, tol: float = 0.02) -> bool:
    """Whether two points lie within ``tol`` of each other on every searched dimension:
    relative to the range (in log space for log dimensions); a choice must be equal."""
    for key, dim in space.items():
        x, y = a.get(key), b.get(key)
        if x is None or y is None:
            return False
        if isinstance(dim, Choice) or isinstance(dim, IntRange):
            if x != y:
                return False
            continue
        lo, hi = dim.low, dim.high
        if isinstance(dim, LogUniform):
            x, y, lo, hi = math.log(x), math.log(y), math.log(lo), math.log(hi)
        if abs(x - y) > tol * (hi - lo):
            return False
    return True
