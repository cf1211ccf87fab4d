"""Sweep wall time with the soft-label cache against the online teacher, in one run.

The demo temperature sweep, reduced to a few fixed temperatures (the same trials in both
modes, no early stopping), run twice through :func:`kd.sweep.driver.run_sweep`: once with
``teacher.mode=online`` (every trial loads the teacher and runs it on every batch)
and once with ``teacher.mode=cache`` (the sweep builds the top-k cache once with Ray
Data before the trials, into a fresh directory so the build is timed; the trials read
it). Per-trial settings are ``kd.sweep.PRESETS["demo"]`` plus the temperature sweep's
fixed settings. Each trial reports its own peak memory (``ru_maxrss`` of the trial
process, and its ``VmHWM`` reset at trial start, since Tune reuses the process).

    python bench/soft_label_speed.py                      # 3 temperatures, ~10 min on 2 cores
    python bench/soft_label_speed.py --temperatures 1,2,4,8 --out bench/results/soft_label_speed.md

The teacher is trained first if it is not cached (not timed), and its reference metrics
are computed before either sweep so that neither pays for them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# ------------------------------------------------------------- the trial runner


def _vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def distill_measured(cfg, **kw):
    """``kd.run.distill`` plus this process's peak memory and the run's wall time."""
    from kd.run import distill

    try:  # reset the peak RSS (VmHWM): Tune reuses one process for consecutive trials
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    t0 = time.perf_counter()
    metrics = distill(cfg, **kw)
    metrics["bench_distill_s"] = time.perf_counter() - t0
    metrics["bench_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    metrics["bench_trial_peak_mb"] = _vm_hwm_mb()
    return metrics


# ------------------------------------------------------------------- the sweeps


EXTRA: dict = {}  # --set overrides (a reduced run), applied in both modes


def _fixed(mode: str, k: int, soft_dir: str) -> dict:
    from kd.sweep import PRESETS

    fixed = {**PRESETS["demo"], "loss.kd_weight": 0.5, "student.n_layer": 2, "student.n_embd": 128,
             **EXTRA, "teacher.mode": mode}
    if mode == "cache":
        fixed.update({"teacher.top_k": k, "teacher.soft_labels_dir": soft_dir})
    return fixed


def _prepare_teacher(k: int) -> dict:
    """Train the teacher if needed and cache its reference metrics (neither is timed)."""
    from kd.config import apply_overrides, KDConfig
    from kd.data import load_blocks
    from kd.models import load_pretrained
    from kd.run import teacher_metrics
    from kd.teacher import ensure_teacher

    cfg = apply_overrides(KDConfig(), _fixed("online", k, ""))
    source = ensure_teacher(cfg, progress=True)
    teacher, tok = load_pretrained(source)
    blocks = load_blocks(cfg.data, tok)
    teacher_metrics(teacher, tok, source, cfg, blocks.val)
    return {"source": source, "train_blocks": list(blocks.train.shape), "vocab": len(tok), "world": cfg.data.world_size,
            "teacher_params": sum(p.numel() for p in teacher.parameters())}


def _sweep(mode: str, temperatures: list[float], k: int, work: Path) -> dict:
    from kd.config import KDConfig, apply_overrides
    from kd.sweep import LogUniform, SweepOptions, SweepSpec
    from kd.sweep.driver import run_sweep

    soft_dir = work / "soft_labels"
    out = work / mode
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(soft_dir, ignore_errors=True)
    points = [{"loss.temperature": t} for t in temperatures]
    t0 = time.time()
    spec = SweepSpec(f"soft-label-speed-{mode}", {"loss.temperature": LogUniform(0.5, 20.0)}, ["acc_mean"],
                     budget={"demo": len(points)}, points=points)
    # The same trials in both modes, nothing else: no early stopping, reference or repeats.
    options = SweepOptions(output_dir=out, budget=len(points), early_stop=False, references=False, repeats=1,
                           runner=distill_measured)
    res = run_sweep(spec, apply_overrides(KDConfig(), _fixed(mode, k, str(soft_dir))), options)
    wall = time.time() - t0
    trials = []
    for t in res.trials:
        m = t["metrics"]
        trials.append({"T": t["params"].get("loss.temperature"), "status": t["status"],
                       "trial_s": m.get("kd_trial_done", 0) - m.get("kd_trial_entered", 0),
                       "distill_s": m.get("bench_distill_s"), "train_time_s": m.get("train_time_s"),
                       "tokens_per_s": m.get("tokens_per_s"), "maxrss_mb": m.get("bench_maxrss_mb"),
                       "peak_mb": m.get("bench_trial_peak_mb"), "acc_mean": m.get("acc_mean"),
                       "val_loss": m.get("val_loss"), "kd_loss": m.get("kd_loss")})
    build = None
    manifests = list(soft_dir.glob("*/manifest.json"))
    if manifests:
        man = json.loads(manifests[0].read_text())
        build = {"build_s": man["build_s"], "backend": man["backend"], "shape": man["shape"],
                 "bytes": sum(s["bytes"] for s in man["shards"])}
    return {"mode": mode, "wall_s": wall, "trials": trials, "build": build}


# --------------------------------------------------------------- exactness


def _exactness(source: str, k: int, temperatures: list[float]) -> list[dict]:
    """Top-k vs dense loss/gradient on the demo teacher's real logits (bench/topk_exactness.py)."""
    import torch

    from topk_exactness import perturbed_student, run
    from kd.config import apply_overrides, KDConfig
    from kd.data import load_blocks
    from kd.models import load_pretrained, logits_for

    cfg = apply_overrides(KDConfig(), _fixed("online", k, ""))
    teacher, tok = load_pretrained(source)
    blocks = load_blocks(cfg.data, tok)
    with torch.no_grad():
        logits = logits_for(teacher.eval(), blocks.val[:4, :-1], len(tok)).reshape(-1, len(tok)).float()
    student = perturbed_student(logits, torch.Generator().manual_seed(0))
    return run(logits, student, temperatures, sorted({k or len(tok), 32, 128, len(tok)}), ["forward_kl"])


# ------------------------------------------------------------------- report


def _med(xs):
    xs = [x for x in xs if isinstance(x, (int, float))]
    return statistics.median(xs) if xs else float("nan")


def _machine() -> str:
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    load = os.getloadavg()
    return (f"{os.cpu_count()} CPU cores ({cpu}), {mem:.0f} GiB RAM, no GPU, Python {platform.python_version()}; "
            f"load average at the end {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} (shared machine)")


def report(runs: dict, info: dict, exact: list[dict], k: int, command: str) -> str:
    on, ca = runs["online"], runs["cache"]
    trial_ratio = _med([t["trial_s"] for t in on["trials"]]) / _med([t["trial_s"] for t in ca["trials"]])
    lines = [
        "# Soft-label cache vs online teacher: demo temperature sweep",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {_machine()}.",
        "",
        f"Setting: `PRESETS['demo']` (150 steps, batch 16 x 128 tokens) + the temperature sweep's fixed "
        f"settings (kd_weight 0.5, student 2 x 128), {info['world']} world, "
        f"teacher {info['teacher_params'] / 1e6:.1f}M params, "
        f"vocabulary {info['vocab']}, {info['train_blocks'][0]} training blocks; "
        f"{len(on['trials'])} trials per mode at T = {', '.join(str(t['T']) for t in on['trials'])}, "
        f"one at a time, no early stopping; cache: {f'top-{k}' if k else 'dense (all V logits, fp16)'}"
        f"{'; overrides: ' + ', '.join(f'{a}={b}' for a, b in EXTRA.items()) if EXTRA else ''}.",
        "",
        "| | online teacher | soft-label cache | online / cache |",
        "| --- | ---: | ---: | ---: |",
        f"| sweep wall time (s), incl. the cache build | {on['wall_s']:.0f} | {ca['wall_s']:.0f} | "
        f"**{on['wall_s'] / ca['wall_s']:.2f}x** |",
        f"| median trial wall time (s) | {_med([t['trial_s'] for t in on['trials']]):.1f} | "
        f"{_med([t['trial_s'] for t in ca['trials']]):.1f} | **{trial_ratio:.2f}x** |",
        f"| median training loop time (s) | {_med([t['train_time_s'] for t in on['trials']]):.1f} | "
        f"{_med([t['train_time_s'] for t in ca['trials']]):.1f} | "
        f"{_med([t['train_time_s'] for t in on['trials']]) / _med([t['train_time_s'] for t in ca['trials']]):.2f}x |",
        f"| median training tokens/s | {_med([t['tokens_per_s'] for t in on['trials']]):.0f} | "
        f"{_med([t['tokens_per_s'] for t in ca['trials']]):.0f} | |",
        f"| peak memory per trial, VmHWM (MiB) | {_med([t['peak_mb'] for t in on['trials']]):.0f} | "
        f"{_med([t['peak_mb'] for t in ca['trials']]):.0f} | |",
        f"| trial process ru_maxrss (MiB, max) | {max(t['maxrss_mb'] or 0 for t in on['trials']):.0f} | "
        f"{max(t['maxrss_mb'] or 0 for t in ca['trials']):.0f} | |",
    ]
    if ca["build"]:
        b = ca["build"]
        lines.append(f"| one-off cache build ({b['backend']}, {b['shape'][0]} x {b['shape'][1]} x {b['shape'][2]}, "
                     f"{b['bytes'] / 2**20:.1f} MiB) (s) | | {b['build_s']:.1f} | |")
    lines += ["", "Per trial:", "",
              "| mode | T | trial s | distill s | train loop s | tokens/s | VmHWM MiB | ru_maxrss MiB | val_loss | acc_mean |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for run in (on, ca):
        for t in run["trials"]:
            lines.append(f"| {run['mode']} | {t['T']:g} | {t['trial_s']:.1f} | {t['distill_s'] or 0:.1f} | "
                         f"{t['train_time_s'] or 0:.1f} | {t['tokens_per_s'] or 0:.0f} | {t['peak_mb'] or 0:.0f} | "
                         f"{t['maxrss_mb'] or 0:.0f} | {t['val_loss'] or 0:.4f} | {t['acc_mean'] or 0:.3f} |")
    if exact:
        lines += ["", "Exactness of top-k against dense on this teacher's logits (forward KL, kd_weight 1, "
                  "512 validation tokens, student = perturbed teacher; bench/topk_exactness.py's `run`):", "",
                  "| T | k | teacher mass in top-k | loss rel. err | grad cosine |", "| ---: | ---: | ---: | ---: | ---: |"]
        for r in exact:
            lines.append(f"| {r['temperature']:g} | {r['k']} | {r['teacher_mass_topk']:.4f} | {r['loss_rel_err']:.2e} | "
                         f"{r['grad_cosine']:.5f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--temperatures", default="1,2,4", help="one trial per temperature, in both modes")
    ap.add_argument("--k", type=int, default=0, help="cache k (default 0: dense, all V logits)")
    ap.add_argument("--work-dir", default=None, help="sweep outputs (default: a temp dir, removed)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "soft_label_speed.md"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a setting in both modes (a reduced run: say so in the results)")
    args = ap.parse_args(argv)
    from kd.config import parse_overrides

    EXTRA.update(parse_overrides(args.overrides))
    k = args.k
    temperatures = [float(t) for t in args.temperatures.split(",")]
    # The trials get distill_measured by value (cloudpickle), and _exactness imports
    # topk_exactness from bench/: Ray's workers inherit the environment of this process.
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "bench"), str(ROOT), os.environ.get("PYTHONPATH", "")])
    sys.path.insert(0, str(ROOT / "bench"))
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="kd-slspeed-"))
    info = _prepare_teacher(k)
    runs = {}
    for mode in ("online", "cache"):
        print(f"--- {mode} sweep", flush=True)
        runs[mode] = _sweep(mode, temperatures, k, work)
    exact = _exactness(info["source"], k, sorted({1.0, 2.0, 4.0, 8.0, 20.0}))
    command = "python bench/soft_label_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = report(runs, info, exact, k, command.strip())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    (work / "soft_label_speed.json").write_text(json.dumps({"runs": runs, "info": info, "exact": exact}, indent=1))
    print(text)
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
