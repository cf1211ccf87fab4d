"""Student-size sweep: how much accuracy does each layer and each width buy?

Depth (n_layer) and width (n_embd, in multiples of the teacher's head size so heads keep
their size) are searched with the loss fixed at the combined objective. Every student
trains on the same token budget (at equal wall time small students simply take
more steps), so the trade-off read from the runs is accuracy against size, not speed.
Trials record params, size_mb, flops_per_token and latency_ms_per_token next to accuracy.
Demo and full students start from the teacher (its first heads and channels, evenly
spaced layers); the demo searches 1-3 layers (4 at full width would be the teacher).

Run it here (the embedded default world; trains the teacher on first use):

    python sweeps/student_size.py --preset demo

On a Ray cluster whose head has the project installed (see cluster.yaml):

    ray submit cluster.yaml sweeps/student_size.py --preset full
"""

import sys

from kd.sweep import Choice, SweepSpec, main

SPACE = {
    "student.n_layer": Choice([1, 2, 3, 4]),
    "student.n_embd": Choice([64, 128, 192]),  # the default teacher (4x192): head size 64
}

SPEC = SweepSpec(
    name="student_size",
    description=__doc__.split("\n\n")[0],
    space=SPACE,
    objectives=["acc_mean"],
    budget={"smoke": 2, "demo": 8, "full": 16},
    # T = 1: the temperature measured best of those tried on the embedded world and on
    # WikiText-2 (BENCHMARKS.md); sizes are compared under a loss that helps them.
    fixed={"loss.temperature": 1.0, "loss.kd_weight": 0.5},
    preset_fixed={"smoke": {"student.n_layer": 1, "student.n_embd": 32}},
    points=[{"student.n_layer": 2, "student.n_embd": 128}],
    # The smoke preset's tiny teacher has a head size of 32: widths in its multiples.
    preset_space={"smoke": {"student.n_layer": Choice([1, 2]), "student.n_embd": Choice([32, 64])},
                  "demo": {**SPACE, "student.n_layer": Choice([1, 2, 3])}},
    preset_points={"smoke": [{"student.n_layer": 1, "student.n_embd": 32}]},
    # The verdict tests the best's repeats alone (the searched run was picked for scoring
    # high): 3 seeds give it 2, the fewest with a spread.
    repeats={"demo": 3},
)

if __name__ == "__main__":
    sys.exit(main(SPEC))
