"""Temperature sweep: which softmax temperature distills the best student?

The student's shape and the loss weight stay fixed; the temperature T that softens both
the teacher's and the student's distributions is searched on a log scale over [0.5, 20]
(Hinton et al. found the useful range to depend on the student's size). TPE proposes
temperatures, ASHA stops trials whose accuracy at a rung is clearly in the worse half, the
CE-only reference and the best temperature are re-run with more seeds, and every run is
an MLflow child run under one parent.

Run it here (the embedded default world; trains the teacher on first use):

    python sweeps/temperature.py --preset demo

On a Ray cluster whose head has the project installed (see cluster.yaml):

    ray submit cluster.yaml sweeps/temperature.py --preset full

Resume an interrupted sweep with ``--resume`` (same ``--output-dir``); ``--help`` lists
the other options.
"""

import sys

from kd.sweep import LogUniform, SweepSpec, main

SPEC = SweepSpec(
    name="temperature",
    description=__doc__.split("\n\n")[0],
    space={"loss.temperature": LogUniform(0.5, 20.0)},
    objectives=["acc_mean"],
    budget={"smoke": 2, "demo": 8, "full": 32},
    fixed={"loss.kd_weight": 0.5, "student.n_layer": 2, "student.n_embd": 128},
    preset_fixed={"smoke": {"student.n_layer": 1, "student.n_embd": 32}},
    # Hinton's classic setting first, so the search starts from a known-good point.
    points=[{"loss.temperature": 2.0}],
    # The main job's answer is "does the best T beat CE-only by more than the seed spread":
    # the best T runs 4 more seeds after the search picked it and the reference runs the same
    # 4 (kd.sweep.finalists.reference_seeds), so the paired test has 4 pairs (it needs 3 or
    # more, kd.sweep.results.MIN_PAIRS). With 3 pairs the same +0.02 gap fell just short in
    # two runs of three (t = 2.46 and 2.88 where 2.92 is needed; 4 pairs need 2.35); the 8
    # finalist runs take the 4 waves of 2 trials that the earlier 7 took.
    repeats={"demo": 5},
)

if __name__ == "__main__":
    sys.exit(main(SPEC))
