"""The embedded world: CE-only, distillation-only and combined-loss students, over seeds.

    python bench/world_students.py --seeds 3       # the demo's student (2x128 from the teacher)
    python bench/world_students.py --seeds 3 --set student.init=random --steps 400
    python bench/world_students.py --quick         # tiny version (< 60 s)

Three students of one shape and schedule learn from the same batches (one data order per
seed): from the labels alone (``loss.kd_weight=0``), from the teacher alone (``1``) and
from both (``--kd-weight``, 0.5), at temperature ``--temperature`` with forward KL and the
teacher's dense soft-label cache. Default: the demo preset's setting (the default world,
the default teacher, students 2x128 started from the teacher, 150 steps). The teacher is
trained by :func:`kd.teacher.ensure_teacher` on first use and cached. Every cell is the
mean over ``--seeds`` seeds (``train.seed`` = 0, 1, ...) with its standard deviation;
figures are what :func:`kd.run.distill` returns (names of :mod:`kd.metrics`).
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
    p.add_argument("--steps", type=int, default=150, help="student train.steps")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--kd-weight", type=float, default=0.5, help="the combined student's kd_weight")
    p.add_argument("--seeds", type=int, default=1, help="seeds per student (train.seed = 0, 1, ...)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output-dir", default="runs/bench/world_students", help="students and checkpoints")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any other config override for teacher and students (repeatable)")
    p.add_argument("--quick", action="store_true", help="tiny world, teacher and students: under a minute")
    args = p.parse_args(argv)

    import statistics

    import transformers

    transformers.utils.logging.disable_progress_bar()
    from kd.config import load_config, parse_overrides
    from kd.run import distill
    from kd.teacher import ensure_teacher

    base: dict = {"data.world_size": args.world, "train.threads": args.threads, "loss.temperature": args.temperature,
                  "student.n_layer": 2, "student.n_embd": 128, "student.init": "teacher", "train.steps": args.steps,
                  "train.eval_every": max(1, args.steps // 3), "train.warmup_steps": max(1, args.steps // 10),
                  "train.eval_blocks": 32, "teacher.mode": "cache"}
    if args.quick:  # the tests' tiny config (tests/conftest.py), so a test run shares its teacher
        base.update({"data.world_size": "tiny", "teacher.n_layer": 2, "teacher.n_embd": 64, "teacher.n_head": 2,
                     "teacher.steps": 150, "student.n_layer": 1, "student.n_embd": 32, "student.init": "random",
                     "train.steps": 20, "train.eval_every": 10, "train.eval_blocks": 8, "train.batch_size": 8,
                     "train.warmup_steps": 2, "teacher.mode": "online"})
    base.update(parse_overrides(args.overrides))
    t0 = time.perf_counter()
    cfg = load_config(overrides=base)
    print(f"# teacher {cfg.teacher.arch} {cfg.teacher.n_layer}x{cfg.teacher.n_embd}, {cfg.teacher.steps} steps, "
          f"world={cfg.data.world_size} ...", flush=True)
    ensure_teacher(cfg, progress=True)
    print(f"# teacher ready after {time.perf_counter() - t0:.0f} s", flush=True)

    variants = (("CE only", 0.0), ("distillation only", 1.0), (f"combined ({args.kd_weight:g})", args.kd_weight))
    results: list[tuple[str, float, list[dict]]] = []
    for name, kd in variants:
        runs = []
        for seed in range(args.seeds):
            out = Path(args.output_dir) / f"kd{kd:g}-seed{seed}"
            scfg = load_config(overrides={**base, "loss.kd_weight": kd, "train.seed": seed, "output_dir": str(out)})
            t = time.perf_counter()
            m = distill(scfg)
            print(f"student {scfg.student.n_layer}x{scfg.student.n_embd} ({scfg.student.init} init), {name}, "
                  f"seed {seed}: {time.perf_counter() - t:.0f} s: " + ", ".join(f"{k} {m[k]:.3f}" for k in COLUMNS),
                  flush=True)
            runs.append(m)
        results.append((name, kd, runs))

    def cell(runs: list[dict], key: str) -> str:
        values = [r[key] for r in runs]
        return f"{values[0]:.3f}" if len(values) == 1 else f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"

    print(f"# load average (1 min) at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs "
          "(other processes on the machine slow every timing here)")
    m0 = results[0][2][0]
    print(f"\n# world={cfg.data.world_size} seed {cfg.data.world_seed}, teacher {cfg.teacher.n_layer}x"
          f"{cfg.teacher.n_embd} ({m0['teacher_params'] / 1e6:.2f}M params, {cfg.teacher.steps} steps), students "
          f"{cfg.student.n_layer}x{cfg.student.n_embd} ({m0['params'] / 1e6:.2f}M params, {cfg.student.init} init), "
          f"{cfg.train.steps} steps x batch {cfg.train.batch_size} x {cfg.data.block_size - 1} tokens, "
          f"{args.seeds} seed(s) each (mean ± std); total {time.perf_counter() - t0:.0f} s")
    print("| model | kd_weight | T | " + " | ".join(COLUMNS) + " | retention |")
    print("| --- | ---: | ---: | " + " | ".join("---:" for _ in COLUMNS) + " | ---: |")
    print("| teacher | - | - | " + " | ".join(f"{m0['teacher_' + c]:.3f}" for c in COLUMNS) + " | 1.000 |")
    for name, kd, runs in results:
        temp = f"{args.temperature:g}" if kd else "-"
        print(f"| student, {name} | {kd:g} | {temp} | " + " | ".join(cell(runs, c) for c in COLUMNS)
              + f" | {cell(runs, 'retention')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
