"""One demo sweep trial, timed, for one or more checkouts of the project: before/after.

    python bench/trial_time.py --tree /path/to/old/checkout --tree . --repeats 3

Each ``--tree`` is a checkout of this project (its ``kd`` package is imported with
``PYTHONPATH=TREE``). Every repeat runs, in a fresh process per tree and alternating the
order, what one trial of the demo temperature sweep runs: ``kd.run.distill`` on the small
world, the default teacher (4x192) of 300 steps, a 2x128 student for 150 steps at kd_weight 0.5 and
T = 2, soft labels from the dense cache, the world's evaluation at the end. All trees share
one ``KD_CACHE_DIR`` (``--cache-dir``), so the teacher, its soft labels and (for trees
that compile) inductor's kernels are built once in an untimed first run per tree, as a
sweep builds them before its trials; the timed runs then see what a sweep's later trials
see. Reported per tree: the median wall time of ``distill`` (a trial without Ray's own
bookkeeping), of its training loop (``train_time_s``), and the ratio to the first tree.

``--new-temperatures`` gives every timed run a temperature no earlier run had (2.1 + 0.1 x
the repeat's index, the same for every tree), as a temperature sweep's searched trials
have: a step that compiles the temperature into its kernels compiles them again for each.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

#: The demo preset's settings and the temperature sweep's fixed ones (sweeps/temperature.py).
DEMO_TRIAL = {
    "data.world_size": "small", "teacher.steps": 300, "train.steps": 150, "train.eval_every": 50,
    "train.eval_blocks": 32, "train.warmup_steps": 15, "teacher.mode": "cache",
    "loss.kd_weight": 0.5, "loss.temperature": 2.0, "student.n_layer": 2, "student.n_embd": 128,
}

_CHILD = """
import json, sys, time
from kd.config import load_config
from kd.run import distill
cfg = load_config(overrides=json.loads(sys.argv[1]))
t = time.perf_counter()
m = distill(cfg)
print("KD_TRIAL " + json.dumps({"wall_s": time.perf_counter() - t, "train_time_s": m["train_time_s"],
                               "tokens_per_s": m["tokens_per_s"], "acc_mean": m.get("acc_mean")}))
"""


def run_trial(tree: Path, overrides: dict, cache_dir: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "KD_CACHE_DIR": cache_dir, "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    out = tempfile.mkdtemp(prefix="kd-trial-")
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps({**overrides, "output_dir": out})],
                          capture_output=True, text=True, env=env, cwd=tree, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"trial in {tree} failed: {proc.stderr.strip().splitlines()[-1:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("KD_TRIAL "))
    return json.loads(line.removeprefix("KD_TRIAL "))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tree", action="append", required=True, help="a checkout of the project (repeatable)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="train.threads of the trial")
    p.add_argument("--cache-dir", default=None, help="shared KD_CACHE_DIR (default: a new temp dir)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="change a trial setting, e.g. --set train.steps=60")
    p.add_argument("--new-temperatures", action="store_true",
                   help="each timed run at a temperature no earlier run had, as a sweep's trials")
    args = p.parse_args(argv)
    trees = [Path(t).resolve() for t in args.tree]
    overrides = {**DEMO_TRIAL, "train.threads": args.threads,
                 **dict(item.split("=", 1) for item in args.overrides)}
    cache = args.cache_dir or tempfile.mkdtemp(prefix="kd-bench-cache-")
    for tree in trees:  # untimed: teacher, soft labels, compile caches
        print(f"warm-up {tree}: {run_trial(tree, overrides, cache)}", flush=True)
    runs: dict[Path, list[dict]] = {t: [] for t in trees}
    for r in range(args.repeats):
        this = {**overrides, "loss.temperature": 2.1 + 0.1 * r} if args.new_temperatures else overrides
        for tree in (trees if r % 2 == 0 else trees[::-1]):
            runs[tree].append(run_trial(tree, this, cache))
            print(f"  repeat {r}: {tree.name}: {runs[tree][-1]}", flush=True)
    first = trees[0]
    med = {t: {k: statistics.median(x[k] for x in runs[t]) for k in ("wall_s", "train_time_s", "tokens_per_s")}
           for t in trees}
    temps = "; a new temperature per repeat (2.1, 2.2, ...)" if args.new_temperatures else ""
    print(f"\n# {len(trees)} trees, {args.repeats} repeats, {args.threads} threads, settings {overrides}{temps}")
    print("\n| tree | distill wall s (median) | runs | training loop s | tokens/s | wall vs first |")
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    for t in trees:
        walls = ", ".join(f"{x['wall_s']:.1f}" for x in runs[t])
        print(f"| {t} | {med[t]['wall_s']:.1f} | {walls} | "
              f"{med[t]['train_time_s']:.1f} | {med[t]['tokens_per_s']:.0f} | "
              f"{med[t]['wall_s'] / med[first]['wall_s']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
