"""The sweep's MLflow writer: a Tune callback that keeps run identity in our hands.

One child run per trial, found again by its ``kd.trial_id`` tag under its parent
(:class:`kd.tracking.Tracker`), so a restored trial keeps its run (Ray's
``MLflowLoggerCallback`` opens a second run on restore and leaves the first RUNNING).
Everything is written from the driver: a sqlite store never sees two writers.
"""

from __future__ import annotations

import os
import traceback
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune import Callback

from kd.config import to_flat_dict
from kd.sweep.spec import META, VARIANT, trial_config

CHECKPOINT_PATH_KEY = "checkpoint_path"  # what TuneReportCallback puts in a Train trial's result


def error_line(text: str | None) -> str:
    """The exception line of a traceback (``FloatingPointError: loss is nan ...``)."""
    if not text:
        return "unknown error"
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    for line in reversed(lines):
        head = line.split(":", 1)[0]
        if head.endswith(("Error", "Exception", "Interrupt", "Exit")) and " " not in head:
            return line
    return lines[-1] if lines else "unknown error"


def trial_params(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's MLflow params: its whole flattened config (base + sampled + variant)."""
    params = to_flat_dict(trial_config(config[META]["base"], config))
    params.pop("output_dir", None)
    params["num_workers"] = config[META].get("num_workers", 1)
    return params


class MLflowTrials(Callback):
    """Writes one MLflow child run per Tune trial from the driver (see :mod:`kd.tracking`).

    Per-evaluation metrics at their ``step``, final metrics, the student as artifact
    ``student/``, the teacher's figures once on the parent. Status: FINISHED, FAILED with
    ``kd.error``, KILLED when ASHA stopped the trial early (tags ``kd.stopped`` and
    ``kd.stopped_step``; its accuracies at that step are logged like any evaluation).
    Tag ``kd.checkpoint_step``: the step an interrupted sweep resumes the trial from, set
    once Tune has registered that checkpoint (a checkpoint on disk that Tune has not yet
    registered is not resumed: the trial restarts).
    Tag ``kd.role``: ``trial`` (searched), ``reference`` (CE-only) or ``repeat`` (a
    finalist's extra seed, with ``kd.repeat_of`` naming the trial it repeats).
    """

    def __init__(self, uri: str, experiment: str, parent_id: str, sweep: str, prune_metric: str | None = None):
        self.uri, self.experiment, self.parent_id, self.sweep = uri, experiment, parent_id, sweep
        self.prune_metric = prune_metric
        self._tracker = None
        self._runs: dict[str, str] = {}
        self._teacher_logged = False

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
        variant = trial.config.get(VARIANT) or {}
        tags = {"role": variant.get("role", "trial")}
        if variant.get("of"):
            tags["repeat_of"] = variant["of"]
        run_id = self.tracker.child_run(self.parent_id, trial.trial_id, trial_params(trial.config),
                                        sweep=self.sweep, **tags)
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

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        last = trial.last_result or {}
        if last.get("step") is not None and not last.get("kd_final"):
            self.tracker.client.set_tag(self._run(trial), "kd.checkpoint_step", str(int(last["step"])))

    def on_trial_complete(self, iteration, trials, trial, **info):
        run_id = self._run(trial)
        result = trial.last_result or {}
        if result.get("kd_final"):
            student = self._student_path(trial, result)
            if student is not None:
                with student.as_directory() as d:
                    self.tracker.log_student(run_id, d)
            self.tracker.end_child(run_id, "FINISHED")
        else:
            step = int(result.get("step", 0) or 0)
            on = f"rung_{self.prune_metric}" if self.prune_metric else "its rung metric"
            self.tracker.end_child(run_id, "KILLED", stopped=f"early-stopped by ASHA on {on} at step {step}",
                                   stopped_step=str(step))

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
        self.tracker.end_child(run_id, "FAILED", error=error_line(text))

    @staticmethod
    def _student_path(trial, result: dict):
        if CHECKPOINT_PATH_KEY in result:  # a TorchTrainer trial: Train's own checkpoint storage
            return tune.Checkpoint(result[CHECKPOINT_PATH_KEY])
        return trial.checkpoint
