"""One demo sweep trial, timed, for one or more checkouts of the project: before/after.

    python bench/trial_time.py --tree /path/to/old/checkout --tree . --repeats 3
    python bench/trial_time.py --tree OLD --layout 1x2 --tree . --layout 2x1 --new-temperatures

Each ``--tree`` is a checkout of this project (its ``kd`` package is imported with
``PYTHONPATH=TREE``). Every repeat runs, in a fresh process per tree and alternating the
order, what one trial of the demo temperature sweep runs: ``kd.run.distill`` on the small
world, the default teacher (4x192) of 300 steps, a 2x128 student for 150 steps at kd_weight 0.5 and
T = 2, soft labels from the dense cache, the world's evaluation at the end. All trees share
one ``KD_CACHE_DIR`` (``--cache-dir``), so the teacher, its soft labels and (for trees
that compile) inductor's kernels are built once in an untimed first run per tree, as a
sweep builds them before its trials; the timed runs then see what a sweep's later trials
see. Reported per tree: the median time per trial, of ``distill`` (a trial without Ray's
own bookkeeping) and of its training loop (``train_time_s``), and the ratio to the first tree.

``--layout KxT`` (one per ``--tree``) runs K trials at once with T threads each, as a
sweep runs them: a tree's time per trial is then the K trials' wall time / K, so a
checkout whose sweep ran one trial on both cores compares with one that runs two on one
core each. ``--new-temperatures`` gives every timed trial a temperature no earlier one had
(2.1, 2.2, ... in order, the same for every tree), as a temperature sweep's searched
trials have: a step that compiles the temperature into its kernels compiles them again.

A tree from before the soft-label keys moved (``loss.teacher_mode`` where today has
``teacher.mode``) gets its own spelling of the same settings.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: The demo preset's settings and the temperature sweep's fixed ones (sweeps/temperature.py).
DEMO_TRIAL = {
    "data.world_size": "small", "teacher.steps": 300, "train.steps": 150, "train.eval_every": 50,
    "train.eval_blocks": 32, "train.warmup_steps": 15, "teacher.mode": "cache",
    "loss.kd_weight": 0.5, "loss.temperature": 2.0, "student.n_layer": 2, "student.n_embd": 128,
}

_CHILD = """
import json, sys, time
from kd import config
from kd.config import load_config
from kd.run import distill
overrides = json.loads(sys.argv[1])
# A checkout from before the soft-label keys moved to ``teacher.*`` spells them ``loss.*``:
# give it the spelling it knows, so one command line times old and new trees alike.
moved = getattr(config, "MOVED", {"loss.teacher_mode": "teacher.mode"})
if not hasattr(config.TeacherConfig, "mode"):
    overrides = {next((o for o, n in moved.items() if n == k), k): v for k, v in overrides.items()}
cfg = load_config(overrides=overrides)
t = time.perf_counter()
m = distill(cfg)
print("KD_TRIAL " + json.dumps({"wall_s": time.perf_counter() - t, "train_time_s": m["train_time_s"],
                               "tokens_per_s": m["tokens_per_s"], "acc_mean": m.get("acc_mean")}))
"""


def run_trials(tree: Path, overrides: list[dict], cache_dir: str) -> tuple[float, list[dict]]:
    """Run one trial per entry of ``overrides`` at once (separate processes, as a sweep's
    concurrent trials); return the wall time until the last finished, and each trial's figures."""
    env = {**os.environ, "PYTHONPATH": str(tree), "KD_CACHE_DIR": cache_dir, "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    start = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD,
                               json.dumps({**o, "output_dir": tempfile.mkdtemp(prefix="kd-trial-")})],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tree)
             for o in overrides]
    outs = [proc.communicate(timeout=3600) for proc in procs]
    wall = time.perf_counter() - start
    results = []
    for proc, (stdout, stderr) in zip(procs, outs):
        if proc.returncode != 0:
            raise SystemExit(f"trial in {tree} failed: {stderr.strip().splitlines()[-1:]}")
        line = next(ln for ln in stdout.splitlines() if ln.startswith("KD_TRIAL "))
        results.append(json.loads(line.removeprefix("KD_TRIAL ")))
    return wall, results


def parse_layout(text: str) -> tuple[int, int]:
    """``KxT``: K trials at once, T threads each."""
    try:
        k, t = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--layout: {text!r} is not KxT (trials at once x threads each), e.g. 2x1") from None
    if k < 1 or t < 1:
        raise SystemExit(f"--layout: {text!r} needs K >= 1 and T >= 1")
    return k, t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tree", action="append", required=True, help="a checkout of the project (repeatable)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="train.threads of the trial (layout 1xTHREADS)")
    p.add_argument("--layout", action="append", default=[], metavar="KxT",
                   help="per --tree, in order: K trials at once with T threads each, as a sweep runs "
                        "them (default 1xTHREADS); its time per trial is the K trials' wall / K")
    p.add_argument("--cache-dir", default=None, help="shared KD_CACHE_DIR (default: a new temp dir)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="change a trial setting, e.g. --set train.steps=60")
    p.add_argument("--new-temperatures", action="store_true",
                   help="each timed run at a temperature no earlier run had, as a sweep's trials")
    args = p.parse_args(argv)
    trees = [Path(t).resolve() for t in args.tree]
    if len(args.layout) not in (0, len(trees)):
        raise SystemExit(f"--layout: give one per --tree ({len(trees)}), or none")
    layouts = dict(zip(trees, [parse_layout(x) for x in args.layout] or [(1, args.threads)] * len(trees)))
    overrides = {**DEMO_TRIAL, **dict(item.split("=", 1) for item in args.overrides)}
    cache = args.cache_dir or tempfile.mkdtemp(prefix="kd-bench-cache-")
    for tree in trees:  # untimed: teacher, soft labels, compile caches
        print(f"warm-up {tree}: {run_trials(tree, [{**overrides, 'train.threads': layouts[tree][1]}], cache)}",
              flush=True)
    runs: dict[Path, list[dict]] = {t: [] for t in trees}
    per_trial: dict[Path, list[float]] = {t: [] for t in trees}
    for r in range(args.repeats):
        for tree in (trees if r % 2 == 0 else trees[::-1]):
            k, threads = layouts[tree]
            # A sweep's concurrent trials run different temperatures; every tree gets the same ones.
            batch = [{**overrides, "train.threads": threads,
                      **({"loss.temperature": round(2.1 + 0.1 * (r * k + i), 3)} if args.new_temperatures else {})}
                     for i in range(k)]
            wall, results = run_trials(tree, batch, cache)
            runs[tree] += results
            per_trial[tree].append(wall / k)
            print(f"  repeat {r}: {tree.name} {k}x{threads}: {wall:.1f} s for {k}: {results}", flush=True)
    first = trees[0]
    med = {t: {key: statistics.median(x[key] for x in runs[t]) for key in ("wall_s", "train_time_s", "tokens_per_s")}
           for t in trees}
    temps = "; a new temperature per trial (2.1, 2.2, ...)" if args.new_temperatures else ""
    print(f"\n# {len(trees)} trees, {args.repeats} repeats, settings {overrides}{temps}")
    print("\n| tree | layout (trials x threads) | time per trial s (median) | per repeat | distill wall s | "
          "training loop s | tokens/s per trial | per trial vs first |")
    print("| --- | --- | ---: | --- | ---: | ---: | ---: | ---: |")
    base = statistics.median(per_trial[first])
    for t in trees:
        k, threads = layouts[t]
        each = statistics.median(per_trial[t])
        print(f"| {t} | {k}x{threads} | {each:.1f} | {', '.join(f'{x:.1f}' for x in per_trial[t])} | "
              f"{med[t]['wall_s']:.1f} | {med[t]['train_time_s']:.1f} | {med[t]['tokens_per_s']:.0f} | "
              f"{each / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
