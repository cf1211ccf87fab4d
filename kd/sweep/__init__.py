"""The sweep layer: Ray Tune + Optuna over a search space, every trial an MLflow child run.

Imports go one way, and only :mod:`kd.sweep.driver` and below import Ray:

- :mod:`kd.sweep.spec`: search dimensions, :class:`SweepSpec`, presets, options, checks (no Ray);
- :mod:`kd.sweep.results`: seed statistics and the verdict (no Ray);
- :mod:`kd.sweep.cli`: the command line of ``sweeps/*.py`` (imports the driver only to run);
- :mod:`kd.sweep.driver`: :func:`~kd.sweep.driver.run_sweep`, the phases of a sweep;
- :mod:`kd.sweep.search`: Tune domains, the Optuna searcher, ASHA's rungs;
- :mod:`kd.sweep.finalists`: reading results back, the reference and seed re-runs;
- :mod:`kd.sweep.latency`: the latency pass; :mod:`kd.sweep.mlflow`: the Tune callback;
- :mod:`kd.sweep.trial`: what runs inside a trial (calls :func:`kd.run.distill`).

A sweep script needs only what this package exports.
"""

from kd.sweep.cli import main
from kd.sweep.spec import (PRESETS, Choice, IntRange, LogUniform, SweepOptions, SweepSpec, Uniform,
                           check_objectives, check_space, check_sweep)

__all__ = ["PRESETS", "Choice", "IntRange", "LogUniform", "SweepOptions", "SweepSpec", "Uniform",
           "check_objectives", "check_space", "check_sweep", "main"]
