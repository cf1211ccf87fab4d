"""Sweep analysis: MLflow -> pandas -> Pareto front, hypervolume, knee, sensitivity -> plots.

Reads only MLflow; imports neither torch nor Ray. Compute functions return frames, plot
functions draw them (see docs in each module); notebooks under ``analysis/notebooks`` only
call these.
"""

from analysis.load import Sweep, finished, learning_curves, load_runs, load_sweep
from analysis.pareto import (
    Hypervolume,
    hypervolume,
    knee,
    nondominated,
    objective_directions,
    pareto_front,
    pareto_mask,
    reference_point,
)
from analysis.plots import (
    front_frame,
    plot_front,
    plot_heatmap,
    plot_learning_curves,
    plot_sensitivity,
    run_label,
    save_plots,
)
from analysis.sensitivity import best_value, sensitivity, size_grid

__all__ = [
    "Hypervolume", "Sweep", "best_value", "finished", "front_frame", "hypervolume", "knee",
    "learning_curves", "load_runs", "load_sweep", "nondominated", "objective_directions",
    "pareto_front", "pareto_mask", "plot_front", "plot_heatmap", "plot_learning_curves",
    "plot_sensitivity", "reference_point", "run_label", "save_plots", "sensitivity",
    "size_grid",
]
