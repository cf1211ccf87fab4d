"""Sweep overhead: wall time of a temperature sweep against the training time of its trials.

    python bench/sweep_overhead.py                          # 4 trials, demo settings, 3 ways
    python bench/sweep_overhead.py --trials 4 --steps 60    # shorter trials
    python bench/sweep_overhead.py --quick                  # tiny version (< 60 s, no TorchTrainer)

The same trials (the temperature sweep's: ``loss.kd_weight=0.5``, student 2x128, the
temperatures ``--temperatures`` given as Optuna's first points, so every way runs the same
configurations; no ASHA, so every trial runs every step) run three ways, one after the
other in this process:

- ``tune-in-trial``: :func:`kd.sweep.driver.run_sweep` with one-worker trials and its
  default concurrency (on a CPU-only machine ``cpus // CPU_THREAD_SHARE`` threads per trial,
  as many trials at once as fit): the Tune function trainable runs :func:`kd.run.distill`;
- ``tune-one-at-a-time``: the same sweep, one trial at a time holding every core
  (``--max-concurrent 1`` with all threads): the layout the default replaced;
- ``tune-torchtrainer``: the same sweep with ``force_train=True``: every trial launches a
  one-worker ``TorchTrainer`` (what a multi-worker trial pays, with one worker);
- ``plain-loop``: no Ray, no MLflow: :func:`kd.run.distill` for each configuration in a loop.

Per trial: ``train_time_s`` (the training steps alone, as :func:`kd.train.train` times
them), the trial's time from entering the trial function to its end (``kd_trial_entered``
to ``kd_trial_done``: teacher and data loading, training, evaluations, the world tasks,
saving the student), the time from entering to the first report, and the start-up before
the first training step (first report minus the training time and evaluation in it).

Normalisation: one at a time, the sum of the trials' training times is the least wall time
the sweep could take (target: wall / sum(train_time_s) <= 1.3). With c trials at once
each trial's ``train_time_s`` is measured while it shares the machine, so the figure that
compares layouts is the sweep's total training tokens per second of the trials' span
(every trial's steps x batch x block, over first trial entered to last trial done: the
sweep's fixed costs, such as the first way's soft-label build, stay out of it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

MODES = ("tune-in-trial", "tune-one-at-a-time", "tune-torchtrainer", "plain-loop")


def _fixed(args) -> dict:
    from kd.sweep import PRESETS

    preset = "smoke" if args.quick else "demo"
    fixed = {**PRESETS[preset], "loss.kd_weight": 0.5, "student.n_layer": 2, "student.n_embd": 128,
             "train.threads": args.threads}
    if args.quick:
        fixed.update({"student.n_layer": 1, "student.n_embd": 32})
    if args.steps:
        fixed.update({"train.steps": args.steps, "train.eval_every": max(1, args.steps // 3),
                      "train.warmup_steps": max(1, args.steps // 10)})
    from kd.config import parse_overrides

    fixed.update(parse_overrides(args.overrides))
    return fixed


def _reports_from_tune(output_dir: Path, name: str) -> dict[str, list[dict]]:
    """Every result each trial reported, from Tune's per-trial ``result.json``."""
    out: dict[str, list[dict]] = {}
    for path in sorted((output_dir / "ray_results" / name).glob("*/result.json")):
        for line in path.read_text().splitlines():
            r = json.loads(line)
            if "kd_trial_entered" in r:
                out.setdefault(r["trial_id"], []).append(r)
    return out


def _row(reports: list[dict]) -> dict[str, float]:
    first = reports[0]
    last = next((r for r in reports if r.get("kd_final")), reports[-1])
    entered = first["kd_trial_entered"]
    to_first = first["kd_first_report"] - entered
    return {"T": last.get("loss.temperature", first.get("config", {}).get("loss.temperature", float("nan"))),
            "entered": entered, "done": last["kd_trial_done"], "train_s": last["train_time_s"],
            "to_first": to_first, "startup": to_first - first["train_time_s"]}


def run_tune(mode: str, fixed: dict, temps: list[float], out: Path, run: int = 0) -> tuple[float, list[dict]]:
    from kd.config import KDConfig, apply_overrides
    from kd.sweep import LogUniform, SweepOptions, SweepSpec, driver
    from kd.sweep.driver import run_sweep

    name = f"overhead-{mode}"
    spec = SweepSpec(name, {"loss.temperature": LogUniform(0.5, 20.0)}, ["acc_mean"], budget={"demo": len(temps)},
                     points=[{"loss.temperature": t} for t in temps])
    # Only the searched trials are timed: no early stopping, no reference, no repeats.
    one = mode == "tune-one-at-a-time"
    options = SweepOptions(output_dir=out / f"{mode}-{run}", budget=len(temps), early_stop=False, references=False,
                           repeats=1, force_train=mode == "tune-torchtrainer", seed=0,
                           max_concurrent=1 if one else None)
    share = driver.CPU_THREAD_SHARE
    driver.CPU_THREAD_SHARE = 1 if one else share  # one trial holds every core
    t0 = time.time()
    try:
        # train.threads = 0: each trial takes the threads the driver gives it (its CPU share).
        res = run_sweep(spec, apply_overrides(KDConfig(), {**fixed, "train.threads": 0}), options)
    finally:
        driver.CPU_THREAD_SHARE = share
    wall = time.time() - t0
    bad = [t for t in res.trials if t["status"] != "FINISHED"]
    if bad:
        raise RuntimeError(f"{mode}: {len(bad)} trials did not finish: {[t.get('error') for t in bad]}")
    reports = _reports_from_tune(out / f"{mode}-{run}", name)
    temps_by_id = {t["trial_id"]: t["params"].get("loss.temperature") for t in res.trials}
    rows = []
    for tid, reps in reports.items():
        row = _row(reps)
        row["T"] = temps_by_id.get(tid, row["T"])
        rows.append(row)
    return wall, sorted(rows, key=lambda r: r["entered"]) + [{"t0": t0}]


def run_plain(fixed: dict, temps: list[float], out: Path) -> tuple[float, list[dict]]:
    from kd.config import KDConfig, apply_overrides, validate
    from kd.run import distill
    from kd.teacher import ensure_teacher

    t0 = time.time()
    ensure_teacher(apply_overrides(KDConfig(), fixed))  # what run_sweep's prepare step does
    rows = []
    for i, temp in enumerate(temps):
        cfg = apply_overrides(KDConfig(), {**fixed, "loss.temperature": temp, "output_dir": str(out / "plain" / str(i))})
        validate(cfg)
        first: dict = {}
        entered = time.time()

        def report(m: dict, _ckpt, first=first) -> None:
            if not first and _ckpt is not None:
                first.update(m, at=time.time())

        final = distill(cfg, report=report)
        to_first = first["at"] - entered
        rows.append({"T": temp, "entered": entered, "done": time.time(), "train_s": final["train_time_s"],
                     "to_first": to_first, "startup": to_first - first["train_time_s"]})
    return time.time() - t0, rows + [{"t0": t0}]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--temperatures", default="2,1,4,8", help="the trials' temperatures (comma-separated)")
    p.add_argument("--trials", type=int, default=0, help="use the first N temperatures (0 = all)")
    p.add_argument("--steps", type=int, default=0, help="train.steps per trial (0 = the demo preset's)")
    p.add_argument("--modes", default="", help=f"which ways to run, of {', '.join(MODES)} (default: all; "
                   "--quick: the first and the last)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="another fixed setting for every trial, e.g. --set data.world_size=small (repeatable)")
    p.add_argument("--output-dir", default="", help="sweep outputs (default: a temp dir, removed after)")
    p.add_argument("--quick", action="store_true", help="smoke preset, 2 trials, no TorchTrainer: under a minute")
    args = p.parse_args(argv)
    if args.quick:
        args.trials = args.trials or 2
        args.modes = args.modes or "tune-in-trial,tune-one-at-a-time,plain-loop"
    temps = [float(t) for t in args.temperatures.split(",")][: args.trials or None]
    modes = [m.strip() for m in (args.modes or ",".join(MODES)).split(",") if m.strip()]
    unknown = set(modes) - set(MODES)
    if unknown:
        p.error(f"--modes: unknown {sorted(unknown)}; choose from {', '.join(MODES)}")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("KD_RAY_TEMP_DIR", tempfile.mkdtemp(prefix="kdray-", dir="/tmp"))  # our own Ray

    import transformers

    transformers.utils.logging.disable_progress_bar()
    root = Path(args.output_dir or tempfile.mkdtemp(prefix="kd-sweep-overhead-")).resolve()
    out = root / time.strftime("%Y%m%d-%H%M%S")
    fixed = _fixed(args)
    from kd.config import KDConfig, apply_overrides
    from kd.teacher import ensure_teacher

    t = time.time()
    ensure_teacher(apply_overrides(KDConfig(), fixed), progress=True)  # train it outside every timing
    print(f"# teacher ready in {time.time() - t:.0f} s; fixed: {fixed}", flush=True)

    runs: list[tuple[str, tuple[float, list[dict]]]] = []  # a way may run more than once (--modes a,b,a,b)
    for i, mode in enumerate(modes):
        print(f"running {mode}: {len(temps)} trials ...", flush=True)
        runs.append((mode, run_plain(fixed, temps, out / str(i)) if mode == "plain-loop"
                     else run_tune(mode, fixed, temps, out, i)))
        print(f"  {mode}: wall {runs[-1][1][0]:.1f} s", flush=True)

    cfg = apply_overrides(KDConfig(), fixed)
    print(f"# load average (1 min) at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs "
          "(other processes on the machine slow every timing here)")
    print(f"\n# {len(temps)} trials (T = {', '.join(f'{t:g}' for t in temps)}), world={cfg.data.world_size}, "
          f"teacher {cfg.teacher.n_layer}x{cfg.teacher.n_embd}, student {cfg.student.n_layer}x{cfg.student.n_embd}, "
          f"{cfg.train.steps} steps x batch {cfg.train.batch_size}, eval every {cfg.train.eval_every} "
          f"({cfg.train.eval_blocks} blocks), plain loop {args.threads} threads")
    tokens = len(temps) * cfg.train.steps * cfg.train.batch_size * cfg.data.block_size
    print("\n| way | most trials at once | sweep wall s | trials' span s | training tokens / s of the span "
          "| sum train_time_s "
          "| wall / sum train | sum trial s (entered->done) | wall / sum trial | median to first report s "
          "| median start-up s | median gap between trials s | wall vs plain loop |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    plain_wall = next((r[0] for m, r in runs if m == "plain-loop"), float("nan"))
    for mode, (wall, rows) in runs:
        rows = rows[:-1]
        train = sum(r["train_s"] for r in rows)
        trial = sum(r["done"] - r["entered"] for r in rows)
        gaps = [b["entered"] - a["done"] for a, b in zip(rows, rows[1:])] or [float("nan")]
        at_once = max(sum(1 for o in rows if o["entered"] <= r["entered"] < o["done"]) for r in rows)
        span = max(r["done"] for r in rows) - min(r["entered"] for r in rows)  # the trials' phase
        print(f"| {mode} | {at_once} | {wall:.1f} | {span:.1f} | {tokens / span:,.0f} | {train:.1f} | "
              f"{wall / train:.2f}x | "
              f"{trial:.1f} | {wall / trial:.2f}x | "
              f"{statistics.median(r['to_first'] for r in rows):.1f} | "
              f"{statistics.median(r['startup'] for r in rows):.1f} | {statistics.median(gaps):.1f} | "
              f"{wall / plain_wall:.2f}x |")
    print("\n| way | T | trial start after sweep start s | entered -> first report s | start-up s "
          "| train_time_s | trial s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for mode, (wall, rows) in runs:
        t0 = rows[-1]["t0"]
        for r in rows[:-1]:
            print(f"| {mode} | {r['T']:.3g} | {r['entered'] - t0:.1f} | {r['to_first']:.1f} | {r['startup']:.1f} | "
                  f"{r['train_s']:.1f} | {r['done'] - r['entered']:.1f} |")
    if not args.output_dir:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
