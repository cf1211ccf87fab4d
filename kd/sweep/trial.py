"""One sweep trial on Ray: the worker loop around :func:`kd.run.distill` and the trial driver.

Two ways to run a trial, chosen by its number of workers:

- ``num_workers == 1``: the Tune function trainable runs the loop itself. It reports with
  ``ray.tune.report(metrics, checkpoint=...)`` and resumes from ``ray.tune.get_checkpoint()``.
- ``num_workers > 1``: the trainable is a driver that builds a ``TorchTrainer``
  (``ScalingConfig``, ``FailureConfig``, ``TuneReportCallback``, a fixed run name
  ``train-<trial_id>`` so that a rerun resumes); every worker runs :func:`worker_loop`,
  which wraps the model and loader with ``prepare_model``/``prepare_data_loader`` through
  :class:`kd.train.Hooks`, reports on every rank, checkpoints from rank 0 and resumes from
  ``ray.train.get_checkpoint()``.

Why two paths: a TorchTrainer starts a controller and a worker group per trial. Measured
here (bench/sweep_overhead.py, 2 cores) its first training step comes 12-20 s after the
trial starts, against ~3-4 s for the in-trial loop. A single worker gains nothing from
Train (no gradient sync, no group to restart: Tune retries the trial from its checkpoint
instead), so one-worker trials skip it.

Early stopping: at the rung steps the driver chose (all before the last step) the trial
evaluates the student on the task sets and reports the objective again as ``rung_<name>``
with ``rung_step``; ASHA reads only those two keys. So ASHA never sees the last step, and
a stopped trial's last result already carries its accuracies at the step it reached.

Every trial ends with a report that carries ``kd_final: 1`` and, as its checkpoint, the
student's ``save_pretrained`` directory; :mod:`kd.sweep.mlflow` logs that to MLflow from
the driver (one writer), so nothing here imports MLflow.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import ray.train
import ray.tune
from ray.tune import Checkpoint

from kd.device import use_threads
from kd.run import distill
from kd.sweep.spec import META, trial_config

Runner = Callable[..., dict[str, float]]
RUNG_STEP = "rung_step"  # ASHA's time attribute: present only in rung results


def _trial_cfg(config: dict[str, Any], trial_id: str, threads: int):
    from kd.config import validate

    cfg = trial_config(config[META]["base"], config)
    if not cfg.train.threads:  # Ray sets OMP_NUM_THREADS=1 in its workers: be explicit
        cfg.train.threads = threads
    cfg.output_dir = str(Path(config[META]["trials_dir"]) / trial_id)
    validate(cfg)
    return cfg


def _clean(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
            for k, v in metrics.items()}


def _rung(metrics: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """Add ``rung_step`` and ``rung_<metric>`` to an evaluation at one of the rung steps."""
    prune = meta.get("prune")
    step = metrics.get("step")
    if not prune or step is None or int(step) not in prune["steps"] or prune["metric"] not in metrics:
        return metrics
    return {**metrics, RUNG_STEP: float(step), f"rung_{prune['metric']}": metrics[prune["metric"]]}


def _run(runner: Runner | None, cfg, meta: dict[str, Any], **kwargs: Any) -> dict[str, float]:
    prune = meta.get("prune")
    if prune and prune.get("tasks"):  # the objective is a task metric: evaluate at the rungs
        kwargs["eval_steps"] = set(prune["steps"])
    if not meta.get("trial_latency", True):
        kwargs["latency"] = False
    return (runner or distill)(cfg, **kwargs)


def _student_checkpoint(cfg) -> Checkpoint | None:
    student = Path(cfg.output_dir) / "student"
    return Checkpoint.from_directory(str(student)) if student.is_dir() else None


# ------------------------------------------------------------ num_workers == 1


def trial_in_process(config: dict[str, Any], runner: Runner | None = None) -> None:
    """Tune function trainable: the distillation loop runs in this trial's process."""
    entered = time.time()
    meta = config[META]
    trial_id = ray.tune.get_context().get_trial_id()
    threads = int(meta.get("threads", 0)) or max(1, int(ray.get_runtime_context().get_assigned_resources()
                                                      .get("CPU", 1)))
    use_threads(threads)
    cfg = _trial_cfg(config, trial_id, threads)
    timing = {"kd_trial_entered": entered}

    resume_dir = None
    ckpt = ray.tune.get_checkpoint()
    if ckpt is not None:
        resume_dir = ckpt.to_directory(tempfile.mkdtemp(prefix="kd-resume-"))

    def report(metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        if checkpoint_dir is None:  # the final call: reported below with the student
            return
        if "kd_first_report" not in timing:
            timing["kd_first_report"] = time.time()
        ray.tune.report({**_rung(_clean(metrics), meta), **timing},
                        checkpoint=Checkpoint.from_directory(checkpoint_dir))

    final = _run(runner, cfg, meta, report=report, resume_from=resume_dir)
    final = {**_clean(final), **timing, "kd_final": 1, "kd_trial_done": time.time()}
    final.setdefault("step", cfg.train.steps)
    ray.tune.report(final, checkpoint=_student_checkpoint(cfg))
    if resume_dir:
        shutil.rmtree(resume_dir, ignore_errors=True)


# ------------------------------------------------------------ num_workers > 1


def worker_loop(config: dict[str, Any], runner: Runner | None = None) -> None:
    """Ray Train worker: distill with DDP hooks; report on every rank, checkpoint from rank 0."""
    from ray.train.torch import get_device, prepare_data_loader, prepare_model

    from kd.train import Hooks

    meta = config[META]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    threads = int(meta.get("threads", 0)) or 1
    use_threads(threads)
    cfg = _trial_cfg(config, meta["trial_id"], threads)
    if rank:  # one output dir per rank: only rank 0 writes the student, but keep them apart
        cfg.output_dir = f"{cfg.output_dir}-rank{rank}"
    hooks = Hooks(wrap_model=prepare_model, wrap_loader=prepare_data_loader, rank=rank,
                  world_size=world, device=get_device())
    timing = {"kd_trial_entered": meta["entered"]}
    pids = Path(cfg.output_dir.removesuffix(f"-rank{rank}") + "-pids")
    pids.mkdir(parents=True, exist_ok=True)  # which process is which rank (ops, and the kill test)
    (pids / f"rank{rank}.pid").write_text(str(os.getpid()))

    resume_dir = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        resume_dir = ckpt.to_directory(tempfile.mkdtemp(prefix="kd-resume-"))

    def report(metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        if rank == 0 and checkpoint_dir is None:  # rank 0's final call: reported below
            return
        if "kd_first_report" not in timing:
            timing["kd_first_report"] = time.time()
        cp = Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report({**_rung(_clean(metrics), meta), **timing}, checkpoint=cp)

    final = _run(runner, cfg, meta, report=report, resume_from=resume_dir, hooks=hooks)
    # distill's final report comes from rank 0 only; every rank must report as often.
    final = {**_clean(final), **timing, "kd_final": 1, "kd_trial_done": time.time(),
             "kd_restarts": 1 if ckpt is not None else 0}
    final.setdefault("step", cfg.train.steps)
    ray.train.report(final, checkpoint=_student_checkpoint(cfg) if rank == 0 else None)


def trial_torch_trainer(config: dict[str, Any], runner: Runner | None = None) -> None:
    """Tune function trainable that runs the trial as a ``TorchTrainer`` over several workers."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    meta = dict(config[META])
    trial_id = ray.tune.get_context().get_trial_id()
    meta.update(trial_id=trial_id, entered=time.time())
    per_worker = {"CPU": float(meta.get("threads", 1) or 1)}
    if meta.get("use_gpu"):
        per_worker["GPU"] = 1.0
    trainer = TorchTrainer(
        functools.partial(worker_loop, runner=runner) if runner else worker_loop,
        train_loop_config={**config, META: meta},
        scaling_config=ScalingConfig(num_workers=int(meta["num_workers"]), use_gpu=bool(meta.get("use_gpu")),
                                     resources_per_worker=per_worker),
        run_config=RunConfig(
            name=f"train-{trial_id}",  # fixed: a restored trial finds its Train run and checkpoints
            storage_path=meta["storage_path"],
            failure_config=FailureConfig(max_failures=int(meta.get("max_failures", 1))),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=[TuneReportCallback()],
        ),
    )
    trainer.fit()
