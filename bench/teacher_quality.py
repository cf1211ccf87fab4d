"""The project-trained teacher on the embedded world: task accuracy by world seed and steps.

    python bench/teacher_quality.py --world-seeds 0 1 2 3 --steps 760 1000
    python bench/teacher_quality.py --quick     # the tests' tiny world and teacher (seconds)

For every (steps, world seed) it trains the default teacher (or finds it in the cache:
:func:`kd.teacher.ensure_teacher`) and scores it on the world's held-out task sets with
the figures every sweep reports for it (:func:`kd.run.teacher_metrics`). The demo's
students learn from this teacher, so how good it is on each task family bounds what the
main job can show; the printed table is what chooses ``teacher.steps``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

COLUMNS = ("val_loss", "acc_completion", "acc_choice", "em_qa", "acc_mean")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, nargs="+", default=[1000])
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any other config override for the teacher (repeatable)")
    p.add_argument("--quick", action="store_true", help="the tests' tiny world and teacher, world seed 0")
    args = p.parse_args(argv)
    if args.quick:  # the tests' tiny config (tests/conftest.py), so a test run shares its teacher
        args.world_seeds, args.steps = [0], [150]
        args.overrides = ["data.world_size=tiny", "teacher.n_layer=2", "teacher.n_embd=64", "teacher.n_head=2",
                          *args.overrides]

    import transformers

    transformers.utils.logging.disable_progress_bar()
    from kd.config import load_config, parse_overrides
    from kd.data import load_blocks
    from kd.models import load_pretrained, load_tokenizer
    from kd.run import teacher_metrics
    from kd.teacher import ensure_teacher

    extra = parse_overrides(args.overrides)
    rows: list[tuple[int, int, float, dict[str, float]]] = []
    for steps in args.steps:
        for seed in args.world_seeds:
            cfg = load_config(overrides={"teacher.steps": steps, "data.world_seed": seed, **extra})
            t0 = time.perf_counter()
            source = ensure_teacher(cfg)
            seconds = time.perf_counter() - t0
            tokenizer = load_tokenizer(source)
            blocks = load_blocks(cfg.data, tokenizer)
            m = teacher_metrics(None, tokenizer, source, cfg, blocks.val, load=lambda: load_pretrained(source)[0])
            rows.append((steps, seed, seconds, m))
            print(f"steps {steps}, world seed {seed}: teacher in {seconds:.0f} s ({source}): "
                  + ", ".join(f"{c} {m[c]:.3f}" for c in COLUMNS), flush=True)

    print(f"\n# teacher {cfg.teacher.arch} {cfg.teacher.n_layer}x{cfg.teacher.n_embd}, world {cfg.data.world_size}; "
          "training time 0 = found in the cache")
    print("| steps | world seed | train s | " + " | ".join(COLUMNS) + " |")
    print("| ---: | ---: | ---: | " + " | ".join("---:" for _ in COLUMNS) + " |")
    for steps, seed, seconds, m in rows:
        print(f"| {steps} | {seed} | {seconds:.0f} | " + " | ".join(f"{m[c]:.3f}" for c in COLUMNS) + " |")
    for steps in args.steps:
        ms = [m for s, _, _, m in rows if s == steps]
        if len(ms) > 1:
            print(f"| {steps} | mean ± std | - | " + " | ".join(
                f"{statistics.fmean(m[c] for m in ms):.3f} ± {statistics.stdev(m[c] for m in ms):.3f}"
                for c in COLUMNS) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
