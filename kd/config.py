"""Typed configuration for every knob, loaded from YAML plus ``key=value`` overrides.

The dataclasses hold every default; YAML files, command-line overrides and Ray search
spaces only override fields by their dotted name (``loss.temperature=4``). Validation
runs before anything is written or Ray starts, and every error is one line that names
the key, the value and what is allowed. This module imports neither torch nor Ray.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration value that is not allowed; the message is meant for people."""


DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd")
ARCHS = ("gpt2", "llama")
INITS = ("random", "teacher")
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
COMPILE_MODES = ("auto", "true", "false")
WORLD_SIZES = ("tiny", "small", "default")
TEACHER_MODES = ("online", "cache")
SOFT_LABEL_FORMATS = ("auto", "dense", "compact", "topk")


@dataclass
class TeacherConfig:
    """Where the teacher comes from, how the project trains one on the world, and how its
    outputs (the soft labels a student learns from) are produced and stored."""

    source: str = "train"
    """``train``: the project trains a teacher on ``data.source`` (the embedded world by
    default), cached by the fingerprint of its config; anything else is a hub id or a
    local ``save_pretrained`` directory."""
    trust_remote_code: bool = False
    """Allow a hub model's own code to run; off unless asked for."""
    arch: str = "gpt2"
    """Architecture of a teacher the project trains: gpt2 or llama."""
    n_layer: int = 4
    """Transformer layers of a teacher the project trains."""
    n_embd: int = 192
    """Model width of a teacher the project trains; divisible by ``teacher.n_head``. 192
    rather than 256: 0.62x the FLOPs per token, which on a 2-core CPU without fast bf16 took
    the main job's teacher from 11.7 to 7.3 min, as good on the world's task sets (acc_mean
    0.945 against 0.94-0.95), with distillation still ahead of CE-only (BENCHMARKS.md)."""
    n_head: int = 3
    """Attention heads of a teacher the project trains (3 x 64: students keep head size 64)."""
    steps: int = 1500
    """Optimizer steps for a teacher the project trains (~5 passes over the default world).
    At 1,000 the 4x192 teacher sat at the edge of learning the held-out tasks, and which
    one it learnt was its draw: three ``teacher.seed`` values on world seed 0 gave
    completion 0.34-0.83 and QA 0.69-0.99. At 1,500 completion was 0.96-1.00 on all three,
    and in the main job distillation beat CE-only by more than the seeds' noise in 4 runs
    of 6 on 5 worlds (in the other two the CE-only students passed a teacher that drew a
    weak QA); with 1,250-step teachers in 1 run of 3 (BENCHMARKS.md)."""
    batch_size: int = 16
    """Blocks per optimizer step when the project trains the teacher."""
    lr: float = 3e-3
    """Peak learning rate when the project trains the teacher (warm-up, then cosine)."""
    seed: int = 0
    """Seed of a trained teacher's initialisation and data order (each seed is its own
    cached teacher). Teachers of one recipe differ: how much is what a second seed shows."""
    vocab_size: int = 8192
    """BPE vocabulary of the tokenizer the project trains on a user's corpus for its teacher
    (``data.source`` not ``world``: the world has its own 2,048). Above 8,192 the soft-label
    cache is compact (``teacher.soft_label_format=auto``)."""
    mode: str = "online"
    """Where a trial's teacher outputs come from. ``online``: run the teacher on every batch
    of every trial. ``cache``: read them from the soft-label cache (:mod:`kd.soft_labels`),
    built once per teacher, data and the settings below; a sweep builds it before its
    trials, which then never load the teacher."""
    top_k: int = 0
    """Teacher logits kept per token: 0 = all of them (dense), k > 0 = the top k (online: cut
    per batch; cache: the k it stores). Dense by default, also for the cache, because top-k
    with the truncated teacher of kd.losses is close to dense only near T = 1: for k = 128
    bench/topk_exactness.py measured a loss error of 3.5% at T = 1 but 1.5x at T = 2 and 20x
    at T = 4 on the world's teacher (V = 2048), worse on synthetic V = 32000 logits, while
    temperature sweeps span 0.5-20 (BENCHMARKS.md). A dense cache costs 2 bytes x V per
    token (fp16); set k for vocabularies where that does not fit, and sweep near T = 1."""
    soft_labels_dir: str = ""
    """Where soft-label caches live; empty = ``cache_dir()/soft_labels``. On a cluster, a
    directory every node reads (a sweep uses its output dir there)."""
    soft_label_format: str = "auto"
    """What the cache stores per token: ``dense`` (all V logits, 2 V bytes), ``compact``
    (top-k logits + the tail's log-partition on the temperature grid: exact on k + 1
    buckets at every T of the grid, :mod:`kd.compact`), ``topk`` (top-k renormalised:
    exact only at T = 1) or ``auto``: dense up to kd.soft_labels.AUTO_DENSE_MAX_VOCAB
    (8,192: 16 KB per token) when teacher.top_k = 0, else compact."""
    grid_min_temperature: float = 0.5
    """Lowest temperature the compact cache serves; a trial's loss.temperature must lie in
    [grid_min_temperature, grid_max_temperature] (kd.soft_labels.check_temperatures)."""
    grid_max_temperature: float = 8.0
    """Highest temperature the compact cache serves."""
    grid_points: int = 9
    """Grid points (geometric in 1/T) of the compact cache: 8 bytes per token each."""
    tail_samples: int = 64
    """Compact cache: ids drawn per token from the teacher's tail, with their logits (RS-KD,
    :func:`kd.compact.sample_tail`), so the student learns the tail's shape, not only its
    mass; 0 = the k + 1 buckets alone. With a real student on WikiText-2 the buckets alone
    gave a parameter-gradient cosine to the dense teacher's of -0.18 at T = 1 and -0.95 at
    T = 8, 64 samples (with the loss's control variate) 0.995 and 0.998 (BENCHMARKS.md).
    4 bytes per sample (6 above V = 32,768). Used by forward_kl; the other divergences use
    the buckets."""
    proposal_temperature: float = 4.0
    """Temperature the tail samples are drawn at; importance weights carry them to every
    training temperature. The weights exp((1/T - 1/T_p) z) stay bounded for T <= T_p and
    grow into the tail, where the proposal rarely draws, for T > T_p: 4 gave the best
    worst case over T in [0.5, 8] on WikiText-2 (parameter-gradient cosine of the mean of 4
    draws >= 0.986; 2: 0.979 at T = 8; measured before the loss's control variate), and
    WikiText-2 students from T_p = 2 and 4 were alike (BENCHMARKS.md)."""


@dataclass
class StudentConfig:
    """The student's shape: the teacher's config with depth and width overridden."""

    source: str = ""
    """Empty: build the student from the teacher's config (the shape below). Otherwise a
    hub id or local directory of a pretrained student, which must share the teacher's tokenizer."""
    n_layer: int = 2
    """Transformer layers of the student."""
    n_embd: int = 128
    """Model width of the student; divisible by its number of heads."""
    n_head: int = 0
    """Attention heads; 0 keeps the teacher's head size (n_embd / teacher head dim)."""
    init: str = "random"
    """``random``, or ``teacher``: copy embeddings and evenly spaced layers; a narrower student
    (at most the teacher's width, same head size) takes the leading slice of every weight."""


@dataclass
class DataConfig:
    """Training text: the embedded world, a hub dataset id, or local files."""

    source: str = "world"
    """``world``, a hub dataset id (``wikitext``), or a local .txt/.jsonl/.parquet path or directory."""
    world_size: str = "default"
    """Size of the embedded world: tiny (tests), small, default (the main job)."""
    world_seed: int = 0
    """Seed of the embedded world (and of the validation hold-out of other sources)."""
    hub_config: str = ""
    """Dataset config name for hub ids (``wikitext-2-raw-v1``)."""
    text_column: str = "text"
    """Column of the documents in a hub dataset or .jsonl/.parquet files."""
    block_size: int = 128
    """Tokens per packed training block."""
    val_fraction: float = 0.05
    """Share of blocks held out for validation when the source has no validation split."""
    max_blocks: int = 0
    """Cap on training blocks (0 = all)."""


@dataclass
class LossConfig:
    """The distillation objective: (1 - kd_weight) * CE + kd_weight * T^2 * D."""

    temperature: float = 2.0
    """Softmax temperature T applied to teacher and student logits; must be > 0."""
    kd_weight: float = 0.5
    """0 = cross-entropy only, 1 = distillation only."""
    divergence: str = "forward_kl"
    """forward_kl (Hinton), reverse_kl, jsd, skew_kl or tvd."""
    jsd_beta: float = 0.5
    """Mixture weight of JSD(beta); in (0, 1)."""
    skew_alpha: float = 0.1
    """Skew of skew KL; in [0, 1)."""


@dataclass
class TrainConfig:
    """The optimisation loop."""

    steps: int = 400
    """Optimizer steps of the student (the token budget is steps x batch_size x block_size)."""
    batch_size: int = 16
    """Blocks per optimizer step (per worker); at most the number of training blocks."""
    lr: float = 2e-3
    """Peak learning rate (AdamW; linear warm-up, then cosine decay to 10% of it)."""
    weight_decay: float = 0.1
    """AdamW weight decay (not applied to biases and norms)."""
    warmup_steps: int = 40
    """Steps of linear learning-rate warm-up."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this (0 = no clipping)."""
    eval_every: int = 100
    """Evaluate (and checkpoint) every N steps, and at the end."""
    eval_blocks: int = 64
    """Validation blocks per evaluation (0 = all)."""
    seed: int = 0
    """Seed of the student's initialisation and the data order."""
    device: str = "auto"
    """auto (cuda when visible, else cpu), cpu or cuda."""
    precision: str = "auto"
    """auto = bf16 autocast where the hardware is fast at it, else fp32."""
    threads: int = 0
    """torch intra-op threads (0 = leave torch's default)."""
    compile: str = "auto"
    """``torch.compile`` the student's forward with the loss as one graph: ``true``,
    ``false``, or ``auto`` (compile when the run has enough steps to repay the compile
    time; see :mod:`kd.step`). Falls back to eager with one warning line if it fails."""


@dataclass
class KDConfig:
    """One distillation run: teacher, student, data, loss and training."""

    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    """The teacher: a hub id or directory, or one the project trains (``teacher.*``)."""
    student: StudentConfig = field(default_factory=StudentConfig)
    """The student's shape and initialisation (``student.*``)."""
    data: DataConfig = field(default_factory=DataConfig)
    """The training text and its packing into blocks (``data.*``)."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The distillation objective (``loss.*``)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The student's optimisation loop (``train.*``)."""
    output_dir: str = "runs/distill"
    """Where the student, checkpoints and metrics.json go."""


# ---------------------------------------------------------------------------- keys


def flat_keys(cls: type = KDConfig, prefix: str = "") -> dict[str, type]:
    """Every dotted key of a config class with its declared type."""
    out: dict[str, type] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(flat_keys(tp, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = tp
    return out


def to_flat_dict(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """The config as ``{"loss.temperature": 2.0, ...}`` (what MLflow params get)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out.update(to_flat_dict(value, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = value
    return out


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstring of each field of a config dataclass (``""`` where it has none).

    Read from the source (the string literal right after a field), as litgpt and
    jsonargparse do: one text serves the code reader, ``kd --help`` and the docs.
    """
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {f.name: "" for f in dataclasses.fields(cls)}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


#: What ``validate`` allows for each key, as ``kd --help`` shows it (tests/test_config.py
#: checks that every key has an entry, so a new field cannot slip past the help).
ALLOWED: dict[str, str] = {
    "teacher.source": "train, a hub id, or an existing local save_pretrained directory",
    "teacher.trust_remote_code": "true or false",
    "teacher.arch": " | ".join(ARCHS),
    "teacher.n_layer": "integer >= 1",
    "teacher.n_embd": "integer >= 1, divisible by teacher.n_head",
    "teacher.n_head": "integer >= 1",
    "teacher.steps": "integer >= 1",
    "teacher.batch_size": "integer >= 1, at most the training blocks",
    "teacher.lr": "number > 0",
    "teacher.seed": "integer",
    "teacher.vocab_size": "integer in [512, 262144]; only with a data.source other than world",
    "teacher.mode": " | ".join(TEACHER_MODES),
    "teacher.top_k": "integer in [0, 65536]",
    "teacher.soft_labels_dir": "empty or a directory",
    "teacher.soft_label_format": " | ".join(SOFT_LABEL_FORMATS),
    "teacher.grid_min_temperature": "number > 0",
    "teacher.grid_max_temperature": "number > teacher.grid_min_temperature",
    "teacher.grid_points": "integer in [2, 64]",
    "teacher.tail_samples": "integer in [0, 4096]",
    "teacher.proposal_temperature": "number > 0",
    "student.source": "empty, a hub id, or an existing local save_pretrained directory",
    "student.n_layer": "integer >= 1",
    "student.n_embd": "integer >= 1, divisible by the student's heads",
    "student.n_head": "integer >= 0",
    "student.init": " | ".join(INITS),
    "data.source": "world, a hub dataset id, or an existing local file or directory",
    "data.world_size": " | ".join(WORLD_SIZES),
    "data.world_seed": "integer",
    "data.hub_config": "any string",
    "data.text_column": "a column name",
    "data.block_size": "integer >= 8",
    "data.val_fraction": "number in (0, 0.5)",
    "data.max_blocks": "integer >= 0",
    "loss.temperature": "number > 0",
    "loss.kd_weight": "number in [0, 1]",
    "loss.divergence": " | ".join(DIVERGENCES),
    "loss.jsd_beta": "number in (0, 1)",
    "loss.skew_alpha": "number in [0, 1)",
    "train.steps": "integer >= 1",
    "train.batch_size": "integer >= 1, at most the training blocks",
    "train.lr": "number > 0",
    "train.weight_decay": "number >= 0",
    "train.warmup_steps": "integer >= 0",
    "train.grad_clip": "number >= 0",
    "train.eval_every": "integer >= 1",
    "train.eval_blocks": "integer >= 0",
    "train.seed": "integer",
    "train.device": " | ".join(DEVICES) + " (cuda only where CUDA is visible)",
    "train.precision": " | ".join(PRECISIONS),
    "train.threads": "integer >= 0",
    "train.compile": " | ".join(COMPILE_MODES),
    "output_dir": "a directory path that can be written (not a file)",
}


def describe_keys(cls: type = KDConfig, prefix: str = "", defaults: Any = None) -> list[tuple[str, str, str, str]]:
    """``(key, default, allowed, doc)`` for every dotted key, in declaration order."""
    defaults = cls() if defaults is None else defaults
    out: list[tuple[str, str, str, str]] = []
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            out += describe_keys(type(value), f"{prefix}{f.name}.", value)
            continue
        key = f"{prefix}{f.name}"
        shown = str(value).lower() if isinstance(value, bool) else (repr(value) if value == "" else str(value))
        out.append((key, shown, ALLOWED.get(key, ""), docs[f.name]))
    return out


#: Keys that moved, old name -> new name. The soft-label settings describe the teacher's
#: outputs, not the loss computed from them (issue 14). An old name is refused in one
#: line that gives the new one (a silent alias would keep two names for one knob in
#: YAML files, sweep spaces and MLflow params).
MOVED: dict[str, str] = {
    "loss.teacher_mode": "teacher.mode",
    "loss.top_k": "teacher.top_k",
    "loss.soft_labels_dir": "teacher.soft_labels_dir",
    "loss.soft_label_format": "teacher.soft_label_format",
    "loss.grid_min_temperature": "teacher.grid_min_temperature",
    "loss.grid_max_temperature": "teacher.grid_max_temperature",
    "loss.grid_points": "teacher.grid_points",
}


def _moved_key(key: str, value: Any) -> ConfigError:
    new = MOVED[key]
    try:
        shown = _coerce(new, value, flat_keys()[new])
    except ConfigError:
        shown = value
    shown = str(shown).lower() if isinstance(shown, bool) else shown
    return ConfigError(f"{key}={shown!r} is not allowed: the key moved to {new} ({ALLOWED[new]}); "
                       f"use {new}={shown}")


def _unknown_key(key: str) -> ConfigError:
    keys = list(flat_keys())
    near = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    if not near:  # also try the leaf name alone: "temperature" -> "loss.temperature"
        leaf = key.rsplit(".", 1)[-1]
        near = [k for k in keys if k.rsplit(".", 1)[-1] == leaf] or difflib.get_close_matches(
            leaf, keys, n=1, cutoff=0.6
        )
    hint = f"; did you mean {near[0]!r}?" if near else f"; valid keys: {', '.join(keys)}"
    return ConfigError(f"unknown config key {key!r}{hint}")


def _coerce(key: str, value: Any, tp: type) -> Any:
    """Turn a YAML or command-line value into the field's type, or say why not."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}={value!r} is not allowed: expected true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} is not allowed: expected an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value))
        except ValueError:
            raise ConfigError(f"{key}={value!r} is not allowed: expected an integer") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} is not allowed: expected a number")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={value!r} is not allowed: expected a number") from None
        if not math.isfinite(number):  # float("inf") parses; no knob means anything at inf/nan
            raise ConfigError(f"{key}={value!r} is not allowed: expected a finite number")
        return number
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}={value!r} is not allowed: expected a string")
        if isinstance(value, bool):  # YAML's `compile: true` is a bool; the choice is its spelling
            return str(value).lower()
        return "" if value is None else str(value)
    return value


def apply_overrides(cfg: KDConfig, overrides: dict[str, Any]) -> KDConfig:
    """Return a copy of ``cfg`` with dotted keys replaced (types coerced, keys checked)."""
    cfg = dataclasses.replace(
        cfg, **{f.name: dataclasses.replace(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
                if dataclasses.is_dataclass(getattr(cfg, f.name))}
    )
    keys = flat_keys()
    for key, value in overrides.items():
        if key in MOVED:
            raise _moved_key(key, value)
        if key not in keys:
            raise _unknown_key(key)
        target: Any = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            target = getattr(target, p)
        value = _coerce(key, value, keys[key])
        if key in _SOURCE_KEYS:
            value = _resolve_source(value)
        setattr(target, leaf, value)
    return cfg


#: Keys that name a hub id or a local path.
_SOURCE_KEYS = ("teacher.source", "student.source", "data.source")


def _resolve_source(value: str) -> str:
    """An existing local path, made absolute; anything else unchanged.

    A path that exists is a path, with or without ``./`` (``data.source=mydata``), and it
    stays one when a sweep trial runs in another working directory. The reserved words
    (``train``, ``world``, empty) are never paths.
    """
    if value in ("", "train", "world"):
        return value
    p = Path(value).expanduser()
    return str(p.resolve()) if p.exists() else value


def _flatten_yaml(data: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten_yaml(v, key + "."))
        else:
            out[key] = v
    return out


def _yaml_error(path: Path, e: Exception) -> str:
    """One line for a YAML syntax error: file:line:column and PyYAML's reason."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    reason = " ".join(str(getattr(e, "problem", None) or e).split())
    return f"config={str(path)!r} is not allowed: YAML syntax error at {where}: {reason}"


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Parse ``["loss.temperature=4", ...]`` into a dict (values stay strings)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not allowed: expected key=value, e.g. loss.temperature=4")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | dict[str, Any] | None = None) -> KDConfig:
    """Build a validated config from defaults, an optional YAML file and overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        import yaml  # only needed when a file is given

        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config={str(path)!r} is not allowed: the file does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(_yaml_error(p, e)) from None
        if not isinstance(data, dict):
            raise ConfigError(f"config={str(path)!r} is not allowed: expected a mapping of keys at the top")
        values.update(_flatten_yaml(data))
    if overrides:
        values.update(parse_overrides(overrides) if isinstance(overrides, list) else overrides)
    cfg = apply_overrides(KDConfig(), values)
    validate(cfg)
    return cfg


# ---------------------------------------------------------------------- validation


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, key, value, f"choose one of {', '.join(choices)}")


def _is_local_path(source: str) -> bool:
    """A source that looks like a filesystem path rather than a hub id."""
    return source.startswith((".", "/", "~")) or source.endswith((".txt", ".jsonl", ".json", ".parquet")) \
        or os.sep in source and source.count("/") > 1


def validate(cfg: KDConfig) -> None:
    """Raise :class:`ConfigError` on the first value that is not allowed.

    Checks that need no model or file contents; the tokenizer match between teacher and
    student is checked in :mod:`kd.models` once both are known.
    """
    t, s, d, l, tr = cfg.teacher, cfg.student, cfg.data, cfg.loss, cfg.train
    for key, value in to_flat_dict(cfg).items():  # a search space may hand over inf or nan
        if isinstance(value, float):
            _check(math.isfinite(value), key, value, "expected a finite number")
    _check(l.temperature > 0, "loss.temperature", l.temperature, "must be > 0")
    _check(0.0 <= l.kd_weight <= 1.0, "loss.kd_weight", l.kd_weight, "must be in [0, 1]")
    _check_choice("loss.divergence", l.divergence, DIVERGENCES)
    _check(0.0 < l.jsd_beta < 1.0, "loss.jsd_beta", l.jsd_beta, "must be in (0, 1)")
    _check(0.0 <= l.skew_alpha < 1.0, "loss.skew_alpha", l.skew_alpha, "must be in [0, 1)")

    _check_choice("teacher.arch", t.arch, ARCHS)
    for key, v in (("teacher.n_layer", t.n_layer), ("teacher.n_embd", t.n_embd), ("teacher.n_head", t.n_head),
                   ("teacher.steps", t.steps), ("teacher.batch_size", t.batch_size)):
        _check(v >= 1, key, v, "must be >= 1")
    _check(t.n_embd % t.n_head == 0, "teacher.n_embd", t.n_embd,
           f"must be divisible by teacher.n_head={t.n_head}")
    _check(t.lr > 0, "teacher.lr", t.lr, "must be > 0")
    _check(512 <= t.vocab_size <= 262144, "teacher.vocab_size", t.vocab_size, "must be in [512, 262144]")
    _check(t.vocab_size == TeacherConfig.vocab_size or d.source != "world", "teacher.vocab_size",
           t.vocab_size, "applies to a tokenizer trained on your data.source; the world's tokenizer has 2,048 ids")
    _check_choice("teacher.mode", t.mode, TEACHER_MODES)
    _check(t.top_k >= 0, "teacher.top_k", t.top_k, "must be >= 0 (0 = dense online, the default k for the cache)")
    _check(t.top_k <= 65536, "teacher.top_k", t.top_k, "must be <= 65536")
    _check_choice("teacher.soft_label_format", t.soft_label_format, SOFT_LABEL_FORMATS)
    _check(t.grid_min_temperature > 0, "teacher.grid_min_temperature", t.grid_min_temperature, "must be > 0")
    _check(t.grid_max_temperature > t.grid_min_temperature, "teacher.grid_max_temperature", t.grid_max_temperature,
           f"must be > teacher.grid_min_temperature={t.grid_min_temperature}")
    _check(2 <= t.grid_points <= 64, "teacher.grid_points", t.grid_points, "must be in [2, 64]")
    _check(0 <= t.tail_samples <= 4096, "teacher.tail_samples", t.tail_samples, "must be in [0, 4096]")
    _check(t.proposal_temperature > 0, "teacher.proposal_temperature", t.proposal_temperature, "must be > 0")
    if t.mode == "cache" and t.soft_label_format == "compact":
        _check(t.grid_min_temperature <= l.temperature <= t.grid_max_temperature, "loss.temperature",
               l.temperature, f"must be in the compact cache's grid [{t.grid_min_temperature}, "
               f"{t.grid_max_temperature}] (teacher.grid_min_temperature, teacher.grid_max_temperature)")
    if t.source != "train" and _is_local_path(t.source):
        _check(Path(t.source).expanduser().exists(), "teacher.source", t.source,
               "a local path must exist (or use 'train' or a hub id)")

    if s.source and _is_local_path(s.source):
        _check(Path(s.source).expanduser().exists(), "student.source", s.source,
               "a local path must exist (or leave it empty to build the student from the teacher)")
    _check(s.n_layer >= 1, "student.n_layer", s.n_layer, "must be >= 1")
    _check(s.n_embd >= 1, "student.n_embd", s.n_embd, "must be >= 1")
    _check(s.n_head >= 0, "student.n_head", s.n_head, "must be >= 0 (0 = keep the teacher's head size)")
    if s.n_head:
        _check(s.n_embd % s.n_head == 0, "student.n_embd", s.n_embd,
               f"must be divisible by student.n_head={s.n_head}")
    elif t.source == "train":
        head_dim = t.n_embd // t.n_head
        _check(s.n_embd % head_dim == 0, "student.n_embd", s.n_embd,
               f"must be divisible by the teacher's head size {head_dim} (or set student.n_head)")
    _check_choice("student.init", s.init, INITS)
    if s.init == "teacher" and t.source == "train":
        _check(s.n_embd <= t.n_embd, "student.n_embd", s.n_embd,
               f"must be at most teacher.n_embd={t.n_embd} when student.init=teacher")
        _check(not s.n_head or s.n_embd // s.n_head == t.n_embd // t.n_head, "student.n_head", s.n_head,
               f"must keep the teacher's head size {t.n_embd // t.n_head} when student.init=teacher")

    _check_choice("data.world_size", d.world_size, WORLD_SIZES)
    _check(d.block_size >= 8, "data.block_size", d.block_size, "must be >= 8")
    _check(0.0 < d.val_fraction < 0.5, "data.val_fraction", d.val_fraction, "must be in (0, 0.5)")
    _check(d.max_blocks >= 0, "data.max_blocks", d.max_blocks, "must be >= 0 (0 = all)")
    if d.source != "world" and _is_local_path(d.source):
        _check(Path(d.source).expanduser().exists(), "data.source", d.source,
               "a local path must exist (or use 'world' or a hub dataset id)")

    for key, v in (("train.steps", tr.steps), ("train.batch_size", tr.batch_size), ("train.eval_every", tr.eval_every)):
        _check(v >= 1, key, v, "must be >= 1")
    _check(tr.lr > 0, "train.lr", tr.lr, "must be > 0")
    _check(tr.weight_decay >= 0, "train.weight_decay", tr.weight_decay, "must be >= 0")
    _check(tr.warmup_steps >= 0, "train.warmup_steps", tr.warmup_steps, "must be >= 0")
    _check(tr.grad_clip >= 0, "train.grad_clip", tr.grad_clip, "must be >= 0 (0 = no clipping)")
    _check(tr.eval_blocks >= 0, "train.eval_blocks", tr.eval_blocks, "must be >= 0 (0 = all)")
    _check(tr.threads >= 0, "train.threads", tr.threads, "must be >= 0 (0 = torch's default)")
    _check_choice("train.device", tr.device, DEVICES)
    _check_choice("train.precision", tr.precision, PRECISIONS)
    _check_choice("train.compile", tr.compile, COMPILE_MODES)

