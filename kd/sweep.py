"""Sweeps on Ray: Tune + Optuna over a search space, every trial logged to MLflow.

:func:`run_sweep` starts (or joins) Ray, builds an ``OptunaSearch`` (TPE for one
objective; TPE's multi-objective mode with ``metric``/``mode`` as lists for several), ASHA
on ``val_loss`` for single-objective sweeps only (Optuna does not prune multi-objective
studies), runs the trials of :mod:`kd.sweep_trial`, and resumes an interrupted sweep with
``Tuner.restore(..., resume_unfinished=True)``. MLflow runs are written from this driver
by :class:`MLflowTrials`, a Tune callback, so run identity stays in our hands on restore.
"""

from __future__ import annotations

import math
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# Accuracy arrives only in a trial's final result; per-evaluation results carry val_loss.
os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")

import ray  # noqa: E402
from ray import tune  # noqa: E402
from ray.tune import Callback  # noqa: E402
from ray.tune.schedulers import ASHAScheduler  # noqa: E402
from ray.tune.search.optuna import OptunaSearch  # noqa: E402

from kd import sweep_trial  # noqa: E402
from kd.config import KDConfig, apply_overrides, to_flat_dict  # noqa: E402
from kd.sweep_cli import Choice, IntRange, LogUniform, Space, Uniform, check_objectives, dump_json  # noqa: E402

META = sweep_trial.META
CHECKPOINT_PATH_KEY = "checkpoint_path"  # what TuneReportCallback puts in a Train trial's result


def to_tune(space: Space) -> dict[str, Any]:
    """kd's search dimensions as Tune domains (flat, dotted keys)."""
    out: dict[str, Any] = {}
    for key, dim in space.items():
        if isinstance(dim, LogUniform):
            out[key] = tune.loguniform(dim.low, dim.high)
        elif isinstance(dim, Uniform):
            out[key] = tune.uniform(dim.low, dim.high)
        elif isinstance(dim, IntRange):
            out[key] = tune.randint(dim.low, dim.high + 1)  # Tune's upper bound is exclusive
        elif isinstance(dim, Choice):
            out[key] = tune.choice(list(dim.values))
        else:
            raise TypeError(f"search space {key}: unknown dimension {dim!r}")
    return out


class _OptunaSearch(OptunaSearch):
    """OptunaSearch that tolerates intermediate results without the objective.

    Trials report ``val_loss`` at every evaluation but task accuracy only at the end; the
    stock searcher indexes ``result[metric]`` on every result and would raise.
    """

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if isinstance(self.metric, str) and self.metric not in result:
            return
        super().on_trial_result(trial_id, result)


def searcher(objectives: list[str], *, seed: int, budget: int, points: list[dict] | None = None) -> OptunaSearch:
    """TPE for one objective; TPE in multi-objective mode (metric and mode as lists) for several."""
    import optuna

    pairs = check_objectives(objectives)
    # A few random trials first, then the model: TPE's default of 10 would be a whole demo budget.
    startup = max(2, min(10, budget // 3))
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)
    if len(pairs) == 1:
        metric, mode = pairs[0]
    else:
        metric, mode = [m for m, _ in pairs], [d for _, d in pairs]
    return _OptunaSearch(metric=metric, mode=mode, sampler=sampler, points_to_evaluate=points or None)


def _error_line(text: str | None) -> str:
    """The exception line of a traceback (``FloatingPointError: loss is nan ...``)."""
    if not text:
        return "unknown error"
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    for line in reversed(lines):
        head = line.split(":", 1)[0]
        if head.endswith(("Error", "Exception", "Interrupt", "Exit")) and " " not in head:
            return line
    return lines[-1] if lines else "unknown error"


class MLflowTrials(Callback):
    """Writes one MLflow child run per Tune trial from the driver (see :mod:`kd.tracking`).

    Per-evaluation metrics at their ``step``, final metrics, the student as artifact
    ``student/``, the teacher's figures once on the parent. Status: FINISHED, FAILED with
    ``kd.error``, KILLED when ASHA stopped the trial early (tag ``kd.stopped``).
    """

    def __init__(self, uri: str, experiment: str, parent_id: str, sweep: str):
        self.uri, self.experiment, self.parent_id, self.sweep = uri, experiment, parent_id, sweep
        self._tracker = None
        self._runs: dict[str, str] = {}
        self._teacher_logged = False
        self.finished: set[str] = set()
        self.failed: set[str] = set()
        self.stopped: set[str] = set()

    def __getstate__(self) -> dict:  # Tune pickles callbacks with the experiment state
        return {**self.__dict__, "_tracker": None, "_runs": {}}

    @property
    def tracker(self):
        if self._tracker is None:
            from kd.tracking import Tracker

            self._tracker = Tracker(self.uri, self.experiment)
        return self._tracker

    def _run(self, trial) -> str:
        if trial.trial_id in self._runs:
            return self._runs[trial.trial_id]
        overrides = sweep_trial.trial_overrides(trial.config)
        params = to_flat_dict(apply_overrides(KDConfig(), overrides))
        params.pop("output_dir", None)
        params["num_workers"] = trial.config[META].get("num_workers", 1)
        run_id = self.tracker.child_run(self.parent_id, trial.trial_id, params, sweep=self.sweep)
        self._runs[trial.trial_id] = run_id
        return run_id

    def on_trial_start(self, iteration, trials, trial, **info):
        self._runs.pop(trial.trial_id, None)  # (re)open it as RUNNING, e.g. after a restore
        self._run(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id = self._run(trial)
        self.tracker.log_result(run_id, result)
        if not self._teacher_logged and any(k.startswith("teacher_") for k in result):
            self.tracker.log_teacher(self.parent_id, result)
            self._teacher_logged = True

    def on_trial_complete(self, iteration, trials, trial, **info):
        run_id = self._run(trial)
        result = trial.last_result or {}
        if result.get("kd_final"):
            student = self._student_path(trial, result)
            if student is not None:
                with student.as_directory() as d:
                    self.tracker.log_student(run_id, d)
            self.tracker.end_child(run_id, "FINISHED")
            self.finished.add(trial.trial_id)
        else:
            step = result.get("step", "?")
            self.tracker.end_child(run_id, "KILLED", stopped=f"early-stopped by ASHA on val_loss at step {step}")
            self.stopped.add(trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = self._run(trial)
        text = None
        try:  # the local error file is written before this callback; storage may lag behind
            local = getattr(trial, "error_file", None)
            if local and os.path.exists(local):
                text = Path(local).read_text()
            text = text or trial.get_error()
        except Exception:  # the error file may be gone on a lost node; keep the sweep going
            text = traceback.format_exc()
        self.tracker.end_child(run_id, "FAILED", error=_error_line(text))
        self.failed.add(trial.trial_id)

    @staticmethod
    def _student_path(trial, result: dict):
        if CHECKPOINT_PATH_KEY in result:  # a TorchTrainer trial: Train's own checkpoint storage
            return tune.Checkpoint(result[CHECKPOINT_PATH_KEY])
        return trial.checkpoint


@dataclass
class SweepResults:
    """What a sweep produced and where it lies."""

    name: str
    experiment: str
    output_dir: Path
    tracking_uri: str
    parent_run_id: str
    objectives: list[str]
    trials: list[dict[str, Any]] = field(default_factory=list)
    wall_time_s: float = 0.0
    interrupted: bool = False

    def best(self, metric: str | None = None) -> dict[str, Any] | None:
        """The finished trial best on ``metric`` (default: the first objective)."""
        from kd.metrics import direction

        metric = metric or self.objectives[0]
        done = [t for t in self.trials if t["status"] == "FINISHED" and isinstance(t["metrics"].get(metric), float)
                and math.isfinite(t["metrics"][metric])]
        if not done:
            return None
        sign = 1 if direction(metric) == "max" else -1
        return max(done, key=lambda t: sign * t["metrics"][metric])

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for t in self.trials:
            counts[t["status"]] = counts.get(t["status"], 0) + 1
        lines = [f"sweep {self.name}: {len(self.trials)} trials "
                 f"({', '.join(f'{v} {k.lower()}' for k, v in sorted(counts.items()))}) in {self.wall_time_s:.0f} s"]
        best = self.best()
        if best:
            params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best["params"].items())
            vals = ", ".join(f"{m}={best['metrics'].get(m, float('nan')):.4g}" for m in self.objectives)
            lines.append(f"best by {self.objectives[0]}: {vals}  ({params})")
        lines.append(f"MLflow store: {self.tracking_uri}  (experiment {self.experiment!r}, "
                     f"parent run {self.parent_run_id})")
        lines.append(f"results: {self.output_dir / 'results.json'}")
        lines.append(f"MLflow UI: mlflow ui --backend-store-uri {self.tracking_uri} --host 127.0.0.1")
        return "\n".join(lines)


def _ray_init(address: str | None, output_dir: Path) -> None:
    if ray.is_initialized():
        return
    env = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    if address:  # a cluster: "auto" on the head, or ray://..., or an explicit GCS address
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=False)
    else:  # never a bare ray.init(): it may attach to another Ray on this machine
        temp = os.environ.get("KD_RAY_TEMP_DIR")
        ray.init(address="local", include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": env}, **({"_temp_dir": temp} if temp else {}))


def _resources(num_workers: int, use_gpu: bool, force_train: bool = False) -> tuple[dict[str, float], int, int]:
    """(trial resources, threads per worker, trials that fit at once) from the cluster's size."""
    total = ray.cluster_resources()
    cpus, gpus = int(total.get("CPU", 1)), int(total.get("GPU", 0))
    if force_train and num_workers == 1 and not use_gpu:  # one Train worker with the trial's threads
        threads = cpus if cpus <= 8 else 8
        return {"cpu": 0, "memory": 64 << 20}, threads, max(1, cpus // threads)
    if num_workers == 1 and not force_train:
        # The loop runs in the trial: it holds a GPU, or all CPUs of a CPU-only machine
        # (two torch processes on 2 cores run ~10x slower each: STACK.md).
        if use_gpu:
            threads = max(1, min(8, cpus // max(gpus, 1)))
            return {"cpu": threads, "gpu": 1}, threads, max(1, gpus)
        threads = cpus if cpus <= 8 else 8
        return {"cpu": threads}, threads, max(1, cpus // threads)
    # The Tune trial only drives a TorchTrainer whose workers hold the resources;
    # {"cpu": 0} alone raises "empty head bundle" (STACK.md).
    threads = 1 if not use_gpu else max(1, cpus // max(gpus, 1))
    per_trial = gpus // num_workers if use_gpu else cpus // (num_workers * threads)
    return {"cpu": 0, "memory": 64 << 20}, threads, max(1, per_trial)


def _prepare(fixed: dict[str, Any]) -> None:
    """Build the world and train the teacher once, here, before any trial needs them."""
    from kd.config import validate

    cfg = apply_overrides(KDConfig(), fixed)
    validate(cfg)
    from kd.teacher import ensure_teacher

    ensure_teacher(cfg, progress=True)


def _prepare_soft_labels(fixed: dict[str, Any]) -> None:
    """In cache mode, the teacher's soft labels and reference metrics, once, before the trials.

    The teacher pass runs as Ray Data batch inference (``ray.init`` done), so on a cluster
    it spreads over its GPUs; the trials then only read the cache and never load the
    teacher. A trial whose config needs another cache (a searched ``loss.top_k``) builds
    its own.
    """
    cfg = apply_overrides(KDConfig(), fixed)
    if cfg.loss.teacher_mode != "cache":
        return
    from kd.data import load_blocks
    from kd.models import load_pretrained, load_tokenizer
    from kd.run import teacher_metrics
    from kd.soft_labels import ensure_soft_labels
    from kd.teacher import ensure_teacher

    source = ensure_teacher(cfg)
    trust = cfg.teacher.trust_remote_code
    tokenizer = load_tokenizer(source, trust_remote_code=trust)
    blocks = load_blocks(cfg.data, tokenizer)
    # The Ray Data actors load their own teacher; this process loads it only when the
    # reference metrics are not cached yet.
    ensure_soft_labels(cfg, source, tokenizer, blocks.train, backend="ray", progress=True)
    teacher_metrics(None, tokenizer, source, cfg, blocks.val,
                    load=lambda: load_pretrained(source, trust_remote_code=trust)[0])


def run_sweep(
    name: str,
    space: Space,
    objectives: list[str],
    budget: int,
    fixed: dict[str, Any] | None = None,
    *,
    output_dir: str | os.PathLike,
    points: list[dict[str, Any]] | None = None,
    num_workers: int = 1,
    use_gpu: bool | None = None,
    address: str | None = None,
    resume: bool = False,
    early_stop: bool = True,
    max_concurrent: int | None = None,
    max_failures: int = 1,
    experiment: str | None = None,
    seed: int = 0,
    preset: str = "",
    runner: str | None = None,
    prepare: bool = True,
    force_train: bool = False,
) -> SweepResults:
    """Run (or resume) a sweep of ``budget`` trials and record every trial in MLflow.

    Args:
        name: the sweep's name (MLflow experiment unless ``experiment`` is given).
        space: dotted config keys -> :mod:`kd.sweep_cli` dimensions.
        objectives: metric names from :mod:`kd.metrics`; one (TPE + ASHA) or several (no pruning).
        budget: number of trials.
        fixed: dotted overrides every trial shares.
        output_dir: ``mlflow.db`` (unless ``MLFLOW_TRACKING_URI``), Tune state, trials, results.
        points: configurations to evaluate first.
        num_workers: Ray Train workers per trial; 1 runs the loop in the Tune trial itself.
        address: a Ray cluster to join; ``None`` starts a local Ray.
        resume: continue the sweep recorded in ``output_dir/sweep.json``.
        runner: ``module:function`` called instead of ``kd.run:distill`` (benchmarks).
        prepare: build the world and the teacher before the trials start.
        force_train: run even one-worker trials as a ``TorchTrainer`` (bench/sweep_overhead.py
            measures what that costs against the in-trial loop).
    """
    from kd.sweep_cli import check_space
    from kd.tracking import Tracker, tracking_uri

    started = time.time()
    output_dir = Path(output_dir).expanduser().resolve()
    fixed = dict(fixed or {})
    check_space(space, fixed)
    pairs = check_objectives(objectives)
    state_file = output_dir / "sweep.json"
    storage = output_dir / "ray_results"
    uri = tracking_uri(output_dir)
    experiment = experiment or name
    tracker = Tracker(uri, experiment)

    if resume:
        import json

        state = json.loads(state_file.read_text())
        parent_id = tracker.start_sweep(name, {}, run_id=state["parent_run_id"])
    else:
        params = {**{f"fixed.{k}": v for k, v in fixed.items()}, "objectives": ",".join(objectives),
                  "budget": budget, "num_workers": num_workers, "preset": preset,
                  "space": "; ".join(f"{k}={v}" for k, v in space.items())}
        parent_id = tracker.start_sweep(name, params)
        state = {"name": name, "experiment": experiment, "parent_run_id": parent_id, "tracking_uri": uri,
                 "budget": budget, "objectives": objectives, "fixed": fixed, "preset": preset}
        dump_json(state_file, state)

    if prepare:
        _prepare(fixed)
    if address and apply_overrides(KDConfig(), fixed).loss.teacher_mode == "cache" \
            and "loss.soft_labels_dir" not in fixed:
        # A cluster's nodes do not share ~/.cache: keep the soft labels beside the sweep's
        # results, which every node reads (cluster.yaml mounts shared storage there).
        fixed["loss.soft_labels_dir"] = str(output_dir / "soft_labels")
    _ray_init(address, output_dir)
    try:
        if prepare:
            _prepare_soft_labels(fixed)
        if use_gpu is None:
            use_gpu = ray.cluster_resources().get("GPU", 0) > 0
        resources, threads, fits = _resources(num_workers, use_gpu, force_train)
        meta = {"trials_dir": str(output_dir / "trials"), "threads": threads, "num_workers": num_workers,
                "use_gpu": use_gpu, "max_failures": max_failures, "storage_path": str(storage)}
        if runner:
            meta["runner"] = runner
        if force_train:
            meta["force_train"] = True
        meta["searched"] = sorted(space)
        in_trial = num_workers == 1 and not force_train
        fn = sweep_trial.trial_in_process if in_trial else sweep_trial.trial_torch_trainer
        trainable = tune.with_resources(fn, resources)
        callback = MLflowTrials(uri, experiment, parent_id, name)
        if resume:
            tuner = tune.Tuner.restore(str(storage / name), trainable=trainable, resume_unfinished=True,
                                       resume_errored=False)
        else:
            tuner = _new_tuner(trainable, name, space, pairs, budget, fixed, meta, points, storage, callback,
                               early_stop=early_stop, seed=seed, concurrency=max_concurrent or fits)
        try:
            grid = tuner.fit()
        except BaseException:
            tracker.end_sweep(parent_id, "FAILED")
            raise
        results = _collect(grid, name, experiment, output_dir, uri, parent_id, objectives)
    finally:
        if not address:
            ray.shutdown()
    results.wall_time_s = time.time() - started
    results.interrupted = sum(t["status"] in ("FINISHED", "FAILED", "KILLED") for t in results.trials) < budget
    tracker.end_sweep(parent_id, "KILLED" if results.interrupted else "FINISHED")
    dump_json(output_dir / "results.json", {"sweep": name, "experiment": experiment, "tracking_uri": uri,
                                             "parent_run_id": parent_id, "wall_time_s": results.wall_time_s,
                                             "interrupted": results.interrupted, "trials": results.trials})
    return results


def _new_tuner(trainable, name, space, pairs, budget, fixed, meta, points, storage, callback, *, early_stop, seed,
               concurrency) -> tune.Tuner:
    from ray.tune import CheckpointConfig, RunConfig

    objectives = [m for m, _ in pairs]
    scheduler = None
    if len(pairs) == 1 and early_stop:
        steps = apply_overrides(KDConfig(), fixed).train.steps
        every = apply_overrides(KDConfig(), fixed).train.eval_every
        # Stop a trial whose val_loss is in the worse half at a rung; first rung after
        # half the steps (earlier, val_loss says little about the final student). max_t is
        # past the last step: ASHA stops a trial that reaches max_t, and the final report
        # (with the accuracies and the student) comes at step == steps.
        scheduler = ASHAScheduler(metric="val_loss", mode="min", time_attr="step", max_t=steps + 1,
                                  grace_period=max(every, steps // 2), reduction_factor=2)
    return tune.Tuner(
        trainable,
        param_space={**fixed, **to_tune(space), META: meta},
        tune_config=tune.TuneConfig(
            search_alg=searcher(objectives, seed=seed, budget=budget, points=points),
            scheduler=scheduler, num_samples=budget, max_concurrent_trials=concurrency,
            reuse_actors=meta["num_workers"] == 1 and not meta.get("force_train"),
        ),
        run_config=RunConfig(
            name=name, storage_path=str(storage), callbacks=[callback],
            checkpoint_config=CheckpointConfig(num_to_keep=2), verbose=1,
        ),
    )


def _collect(grid, name, experiment, output_dir, uri, parent_id, objectives) -> SweepResults:
    from kd.tracking import Tracker

    tracker = Tracker(uri, experiment)
    runs = {r.data.tags.get("kd.trial_id"): r for r in tracker.children(parent_id)}
    trials = []
    for trial in grid._experiment_analysis.trials:
        run = runs.get(trial.trial_id)
        status = run.info.status if run is not None else trial.status
        last = trial.last_result or {}
        if trial.status not in ("TERMINATED", "ERROR"):
            status = "INTERRUPTED"
        trials.append({
            "trial_id": trial.trial_id, "status": status, "run_id": run.info.run_id if run else None,
            "params": {k: trial.config[k] for k in trial.config.get(META, {}).get("searched", [])
                       if k in trial.config},
            "metrics": {k: float(v) for k, v in last.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)},
            "error": run.data.tags.get("kd.error") if run is not None else None,
        })
    return SweepResults(name, experiment, output_dir, uri, parent_id, objectives, trials)
