"""Pareto sweep: the best student for its size and speed.

Temperature, kd_weight, depth and width are searched together with three objectives:
acc_mean (max), params (min) and latency_ms_per_token (min). Optuna's multi-objective TPE
proposes trials (metric and mode are lists); nothing is early-stopped, since one student
can lose on accuracy and still sit on the front by being small. The front, its
hypervolume and the plots come from ``analysis/`` reading the MLflow runs. Demo and full
students start from the teacher; the demo searches 1-3 layers (4 at full width is the teacher).

Run it here (the embedded default world; trains the teacher on first use):

    python sweeps/pareto.py --preset demo

On a Ray cluster whose head has the project installed (see cluster.yaml):

    ray submit cluster.yaml sweeps/pareto.py --preset full
"""

import sys

from kd.sweep import Choice, LogUniform, SweepSpec, Uniform, main

SPACE = {
    "loss.temperature": LogUniform(0.5, 20.0),
    "loss.kd_weight": Uniform(0.0, 1.0),
    "student.n_layer": Choice([1, 2, 3, 4]),
    "student.n_embd": Choice([64, 128, 192]),  # multiples of the teacher's head size (64), to its width
}

SPEC = SweepSpec(
    name="pareto",
    description=__doc__.split("\n\n")[0],
    space=SPACE,
    objectives=["acc_mean", "params", "latency_ms_per_token"],
    budget={"smoke": 3, "demo": 10, "full": 64},
    # The first point: the measured best temperature region (BENCHMARKS.md), the demo student.
    points=[{"loss.temperature": 1.0, "loss.kd_weight": 0.5, "student.n_layer": 2, "student.n_embd": 128}],
    # The smoke preset's tiny teacher has a head size of 32.
    preset_space={"demo": {**SPACE, "student.n_layer": Choice([1, 2, 3])}, "smoke": {
        "loss.temperature": LogUniform(0.5, 20.0),
        "loss.kd_weight": Uniform(0.0, 1.0),
        "student.n_layer": Choice([1, 2]),
        "student.n_embd": Choice([32, 64]),
    }},
    preset_points={"smoke": [{"loss.temperature": 1.0, "loss.kd_weight": 0.5, "student.n_layer": 1,
                              "student.n_embd": 32}]},
)

if __name__ == "__main__":
    sys.exit(main(SPEC))
