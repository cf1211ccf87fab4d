"""The embedded world: a combined-loss student against a CE-only student of the same size.

    python bench/world_students.py                 # default world, default teacher, student 2x128
    python bench/world_students.py --steps 760     # at the teacher's token budget
    python bench/world_students.py --quick         # tiny version (< 60 s)

Both students have the default shape (``student.n_layer=2, n_embd=128``) and the default
schedule (``train.*``), the same seed and batches; one learns from the labels alone
(``loss.kd_weight=0``), the other from the combined loss (``kd_weight=0.5``, ``T=2``,
forward KL, the teacher run online). The teacher is the default one (``kd/config.py``),
trained by :func:`kd.teacher.ensure_teacher` on first use (minutes) and cached. Figures
are what :func:`kd.run.distill` returns (names of :mod:`kd.metrics`): validation loss on
fresh renderings of the world, completion accuracy (LAMBADA-style), 4-way multiple choice
(HellaSwag-style), closed-book QA exact match and F1 about held-out people (NQ-style),
their mean and the student's retention of the teacher's mean.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

COLUMNS = ("val_loss", "acc_completion", "acc_choice", "em_qa", "f1_qa", "acc_mean")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", default="default", help="embedded world size (tiny, small, default)")
    p.add_argument("--steps", type=int, default=0, help="student train.steps (0 = the default)")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--kd-weight", type=float, default=0.5, help="the combined student's kd_weight")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output-dir", default="runs/bench/world_students", help="students and checkpoints")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any other config override for teacher and students (repeatable)")
    p.add_argument("--quick", action="store_true", help="tiny world, teacher and students: under a minute")
    args = p.parse_args(argv)

    import transformers

    transformers.utils.logging.disable_progress_bar()
    from kd.config import load_config, parse_overrides
    from kd.run import distill
    from kd.teacher import ensure_teacher

    base: dict = {"data.world_size": args.world, "train.threads": args.threads, "loss.temperature": args.temperature}
    if args.quick:  # the tests' tiny config (tests/conftest.py), so a test run shares its teacher
        base.update({"data.world_size": "tiny", "teacher.n_layer": 2, "teacher.n_embd": 64, "teacher.n_head": 2,
                     "teacher.steps": 150, "student.n_layer": 1, "student.n_embd": 32, "train.steps": 20,
                     "train.eval_every": 10, "train.eval_blocks": 8, "train.batch_size": 8,
                     "train.warmup_steps": 2})
    if args.steps:
        base["train.steps"] = args.steps
    base.update(parse_overrides(args.overrides))
    t0 = time.perf_counter()
    cfg = load_config(overrides=base)
    print(f"# teacher {cfg.teacher.arch} {cfg.teacher.n_layer}x{cfg.teacher.n_embd}, {cfg.teacher.steps} steps, "
          f"world={cfg.data.world_size} ...", flush=True)
    ensure_teacher(cfg, progress=True)
    print(f"# teacher ready after {time.perf_counter() - t0:.0f} s", flush=True)

    results = []
    for name, kd in (("CE only", 0.0), (f"combined (kd_weight={args.kd_weight:g}, T={args.temperature:g})",
                                         args.kd_weight)):
        out = Path(args.output_dir) / f"kd{kd:g}"
        scfg = load_config(overrides={**base, "loss.kd_weight": kd, "output_dir": str(out)})
        t = time.perf_counter()
        print(f"student {scfg.student.n_layer}x{scfg.student.n_embd}, {name}: {scfg.train.steps} steps ...", flush=True)
        m = distill(scfg)
        print(f"  done in {time.perf_counter() - t:.0f} s: " + ", ".join(f"{k} {m[k]:.3f}" for k in COLUMNS),
              flush=True)
        results.append((name, kd, m))

    print(f"# load average (1 min) at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs "
          "(other processes on the machine slow every timing here)")
    m0 = results[0][2]
    print(f"\n# world={cfg.data.world_size}, teacher {cfg.teacher.n_layer}x{cfg.teacher.n_embd} "
          f"({m0['teacher_params'] / 1e6:.2f}M params, {cfg.teacher.steps} steps), students "
          f"{cfg.student.n_layer}x{cfg.student.n_embd} ({m0['params'] / 1e6:.2f}M params), {cfg.train.steps} steps "
          f"x batch {cfg.train.batch_size} x {cfg.data.block_size - 1} tokens, seed {cfg.train.seed}; "
          f"total {time.perf_counter() - t0:.0f} s")
    print("| model | kd_weight | T | " + " | ".join(COLUMNS) + " | retention |")
    print("| --- | ---: | ---: | " + " | ".join("---:" for _ in COLUMNS) + " | ---: |")
    print("| teacher | - | - | " + " | ".join(f"{m0['teacher_' + c]:.3f}" for c in COLUMNS) + " | 1.000 |")
    for name, kd, m in results:
        temp = f"{args.temperature:g}" if kd else "-"
        print(f"| student, {name} | {kd:g} | {temp} | " + " | ".join(f"{m[c]:.3f}" for c in COLUMNS)
              + f" | {m.get('retention', float('nan')):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
