"""Sweep analysis: MLflow -> pandas -> Pareto front, hypervolume, knee, sensitivity -> plots.

Reads only MLflow; imports neither torch nor Ray. Compute functions return frames, plot
functions draw them (see docs in each module); notebooks under ``analysis/notebooks`` only
call these. Names load on first use (PEP 562), so ``kd --help`` registering ``kd report``
does not pay for pandas and matplotlib.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "analysis.load": ("Sweep", "evaluated", "finished", "learning_curves", "load_runs", "load_sweep",
                      "searched"),
    "analysis.pareto": ("Hypervolume", "hypervolume", "knee", "nondominated", "objective_directions",
                        "pareto_front", "pareto_mask", "reference_point"),
    "analysis.plots": ("front_frame", "plot_front", "plot_heatmap", "plot_knob", "plot_learning_curves",
                       "plot_sensitivity", "run_label", "save_plots"),
    "analysis.knobs": ("best_value", "knob_frame", "sensitivity", "size_grid"),
    "analysis.report": ("write_report",),
    "analysis.commands": ("resolve_store",),
}
_MODULE = {name: module for module, names in _WHERE.items() for name in names}
__all__ = sorted(_MODULE)


def __getattr__(name: str) -> Any:
    if name not in _MODULE:
        raise AttributeError(f"module 'analysis' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
