"""MLflow: one parent run per sweep, one child run per trial (kd/CONTRACTS.md).

The only module in ``kd`` that imports MLflow. It is called from the sweep driver only
(:mod:`kd.sweep.mlflow` feeds it Tune's results), so a sweep has a single MLflow writer: a
sqlite store never sees two processes writing at once, and trial processes do not pay
for importing MLflow. Run identity is ours, not Ray's: a child run is found again by its
``kd.trial_id`` tag under its parent, so a resumed trial keeps its run (Ray's
``MLflowLoggerCallback`` opens a second run on restore and leaves the first RUNNING).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import unquote, urlsplit

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from kd.metrics import METRICS  # noqa: E402
from kd.sweep.util import without_credentials  # noqa: E402,F401  (re-exported)

PARENT_TAG = "mlflow.parentRunId"
RUNNING, FINISHED, FAILED, KILLED = "RUNNING", "FINISHED", "FAILED", "KILLED"


def env_tracking_uri() -> str | None:
    """``$MLFLOW_TRACKING_URI`` with its credentials moved to MLflow's username/password
    variables (and the variable itself rewritten, so child processes inherit the clean one)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if not env:
        return None
    parts = urlsplit(env)
    if parts.username is not None or parts.password is not None:
        os.environ.setdefault("MLFLOW_TRACKING_USERNAME", unquote(parts.username or ""))
        os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", unquote(parts.password or ""))
        env = without_credentials(env)
        os.environ["MLFLOW_TRACKING_URI"] = env
    return env


def tracking_uri(output_dir: str | os.PathLike, create: bool = True) -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else a sqlite store in the sweep's output dir
    (created unless ``create=False``: a sweep makes its folder once it can start).

    Credentials in the URI (``http://user:password@host``) move to MLflow's own
    ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` and the URI is returned
    without them, so no print, ``sweep.json``, Tune state or report ever holds a secret.
    """
    env = env_tracking_uri()
    if env:
        return env
    path = Path(output_dir).expanduser().resolve()
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / 'mlflow.db'}"


def is_metric(name: str) -> bool:
    """Whether a result key is one of the project's metrics (``teacher_`` prefix allowed)."""
    return name in METRICS or (name.startswith("teacher_") and name.removeprefix("teacher_") in METRICS)


def _finite_numbers(values: dict[str, Any], keys: Iterable[str]) -> dict[str, float]:
    out = {}
    for k in keys:
        v = values.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = float(v)
    return out


def _param_str(value: Any) -> str:
    return str(value)[:6000]  # MLflow's limit on a param value


def artifact_location(uri: str) -> str | None:
    """Where a new experiment's artifacts go: beside a sqlite store, else the server's default.

    MLflow's default for a database store is ``./mlruns`` in the *current directory*,
    which scatters students over wherever a driver or worker happened to start; keeping
    them next to ``mlflow.db`` makes the output folder the whole record of a sweep.
    """
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        return (db.parent / "artifacts").resolve().as_uri()
    return None


class Tracker:
    """Writes a sweep's parent and child runs to one MLflow store.

    Args:
        uri: tracking URI (see :func:`tracking_uri`).
        experiment: experiment name (the sweep's name unless given).
    """

    def __init__(self, uri: str, experiment: str):
        self.uri = uri
        self.experiment = experiment
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(experiment)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(
            experiment, artifact_location=artifact_location(uri)
        )
        self._children: dict[str, str] = {}

    # ----------------------------------------------------------------- parent

    def start_sweep(self, sweep: str, params: dict[str, Any], run_id: str | None = None) -> str:
        """Create the sweep's parent run, or reopen ``run_id`` (a resumed sweep)."""
        if run_id is not None:
            self.client.update_run(run_id, status=RUNNING)
            return run_id
        run = self.client.create_run(
            self.experiment_id, run_name=sweep, tags={"kd.role": "sweep", "kd.sweep": sweep}
        )
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def log_teacher(self, parent_id: str, metrics: dict[str, Any]) -> None:
        """The teacher's reference metrics on the parent run, prefixed ``teacher_``."""
        keys = [k for k in metrics if k.startswith("teacher_") and is_metric(k)]
        self.log_metrics(parent_id, _finite_numbers(metrics, keys))

    def teacher_metrics(self, parent_id: str) -> dict[str, float]:
        """The teacher's metrics logged on the parent, without the ``teacher_`` prefix."""
        metrics = self.client.get_run(parent_id).data.metrics
        return {k.removeprefix("teacher_"): v for k, v in metrics.items() if k.startswith("teacher_")}

    def log_summary(self, parent_id: str, summary: dict[str, Any], run_ids: dict[str, str] | None = None) -> None:
        """A sweep's seed statistics and verdict (see :func:`kd.sweep.results.summarize`).

        On the parent: ``<entry>_<metric>_mean`` / ``_std`` and ``<entry>_n_seeds`` for the
        reference, the best, the best's repeats alone (``best_fresh``) and the runner-up (or
        ``front<i>_...``), the best region's size and margin (``best_region_near``,
        ``_behind``, ``_margin``) and, over one knob, its ends (``best_region_low`` / ``_high``,
        tag ``kd.best_region_knob``), tag ``kd.verdict``, and the whole
        summary as artifact ``summary.json``. On each run of a configuration with several
        seeds: ``<metric>_seed_mean``, ``<metric>_seed_std`` and ``n_seeds``.
        """
        import json
        import tempfile

        named = [(k, summary[k]) for k in ("reference", "best", "best_fresh", "runner_up") if summary.get(k)]
        named += [(f"front{i}", e) for i, e in enumerate(summary.get("front") or [])]
        flat: dict[str, float] = {}
        for name, e in named:
            flat[f"{name}_n_seeds"] = e["n_seeds"]
            flat.update({f"{name}_{m}_mean": v for m, v in e["mean"].items()})
            flat.update({f"{name}_{m}_std": v for m, v in e["std"].items()})
        near = summary.get("best_region")
        if near:
            flat.update(best_region_near=len(near["near"]), best_region_behind=len(near["behind"]),
                        best_region_margin=near["margin"])
            if "knob" in near:  # what the report's knob plot shades
                flat.update(best_region_low=near["low"], best_region_high=near["high"])
                self.client.set_tag(parent_id, "kd.best_region_knob", near["knob"])
        self.log_metrics(parent_id, flat)
        if summary.get("verdict"):
            self.client.set_tag(parent_id, "kd.verdict", summary["verdict"][:5000])
        for e in summary.get("configs") or []:
            if e["n_seeds"] < 2:
                continue
            values = {"n_seeds": e["n_seeds"], **{f"{m}_seed_mean": v for m, v in e["mean"].items()},
                      **{f"{m}_seed_std": v for m, v in e["std"].items()}}
            for tid in e.get("trial_ids", []):
                run_id = (run_ids or {}).get(tid) or self.find_child(parent_id, tid)
                if run_id:
                    self.log_metrics(run_id, values)
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "summary.json"
            path.write_text(json.dumps(summary, indent=1, sort_keys=True, default=str))
            self.client.log_artifact(parent_id, str(path))

    def end_sweep(self, parent_id: str, status: str = FINISHED) -> None:
        """Close the parent; children still RUNNING are closed as ``KILLED``."""
        for run in self.children(parent_id):
            if run.info.status == RUNNING:
                self.client.set_terminated(run.info.run_id, status=KILLED)
        self.client.set_terminated(parent_id, status=status)

    # ---------------------------------------------------------------- children

    def children(self, parent_id: str) -> list:
        """All child runs of a sweep (any status)."""
        return self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'", max_results=50000
        )

    def find_child(self, parent_id: str, trial_id: str) -> str | None:
        """The run id of a trial's child run, if it was created before (e.g. before a restore)."""
        if trial_id in self._children:
            return self._children[trial_id]
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}' and tags.`kd.trial_id` = '{trial_id}'",
            max_results=1,
        )
        if runs:
            self._children[trial_id] = runs[0].info.run_id
            return runs[0].info.run_id
        return None

    def child_run(self, parent_id: str, trial_id: str, params: dict[str, Any], sweep: str = "",
                  role: str = "trial", **extra: str) -> str:
        """Get or create the child run of a trial and mark it RUNNING (idempotent).

        ``role`` is ``trial`` (searched), ``reference`` (the CE-only student) or ``repeat``
        (a finalist re-run with another seed); ``extra`` become ``kd.<name>`` tags.
        """
        run_id = self.find_child(parent_id, trial_id)
        if run_id is None:
            tags = {PARENT_TAG: parent_id, "kd.role": role, "kd.trial_id": trial_id,
                    **{f"kd.{k}": str(v) for k, v in extra.items()}}
            if sweep:
                tags["kd.sweep"] = sweep
            run = self.client.create_run(self.experiment_id, run_name=trial_id, tags=tags)
            run_id = run.info.run_id
            self._children[trial_id] = run_id
            self.log_params(run_id, params)
        else:
            self.client.update_run(run_id, status=RUNNING)
        return run_id

    def end_child(self, run_id: str, status: str, error: str | None = None, **tags: str) -> None:
        """Close a child run; a failed one carries its reason in tag ``kd.error``."""
        batch = [RunTag(f"kd.{k}", str(v)) for k, v in tags.items()]
        if error:
            batch.append(RunTag("kd.error", error[:5000]))
        if batch:
            self.client.log_batch(run_id, tags=batch)
        self.client.set_terminated(run_id, status=status)

    # -------------------------------------------------------------- values

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        """Log params (values as strings, as MLflow stores them); same values may be re-logged."""
        items = [Param(k, _param_str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
        """Log numeric metrics at ``step``; non-finite values are skipped (MLflow's UI hides them)."""
        ts = int(time.time() * 1000)
        batch = [
            Metric(k, v, ts, int(step or 0))
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and math.isfinite(v)
        ]
        for i in range(0, len(batch), 500):
            self.client.log_batch(run_id, metrics=batch[i : i + 500])

    def log_result(self, run_id: str, result: dict[str, Any]) -> None:
        """Log the project's metrics found in one Tune result, at its ``step``."""
        keys = [k for k in result if is_metric(k) and not k.startswith("teacher_")]
        step = result.get("step")
        self.log_metrics(run_id, _finite_numbers(result, keys), step=int(step) if step is not None else None)

    def log_student(self, run_id: str, student_dir: str | os.PathLike) -> None:
        """The student's ``save_pretrained`` directory as artifact ``student/``."""
        self.client.log_artifacts(run_id, str(student_dir), artifact_path="student")
