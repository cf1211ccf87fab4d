"""Distillation training throughput of ``kd.train.train`` against a plain loop, and MFU.

    python bench/train_throughput.py                      # world 'small', teacher 4x256, student 2x128
    python bench/train_throughput.py --repeats 5 --json out.json
    python bench/train_throughput.py --quick              # tiny version (< 60 s)

One teacher (trained by :func:`kd.teacher.ensure_teacher` on the embedded world with a
short schedule: its quality does not change the cost), one student shape, the same
batches (the order ``kd.train`` draws), and these loops, timed in one run:

- ``kd.train (cache)``: ``kd.train.train`` reading the teacher's dense soft labels from
  the cache (:mod:`kd.soft_labels`, exact: every fp16 logit), as a demo sweep trial runs;
- ``kd.train (online)``: the same with the teacher run on every batch
  (:func:`kd.train.online_teacher`);
- ``reference loop``: distillation written the obvious way, unchanged: teacher forward
  under ``no_grad`` every step, student forward, ``F.cross_entropy`` + ``F.kl_div``
  (log-space targets) times T^2, AdamW, gradient clipping, fp32, nothing else;
- ``kd.train (teacher shape, CE)``: the teacher's own training step (``kd_weight=0``) on
  the teacher's shape, for its MFU.

``kd.train`` runs as configured (``--compile``, default ``true`` as ``train.compile=auto``
gives a demo trial of 150 steps; ``precision=auto``). Each repeat trains a fresh model
(same seed) for ``--warmup-steps`` + ``--steps`` steps; tokens/s counts the last
``--steps`` only (steady state, after compilation), timed between the loop's report at
the end of the warm-up and its report at the end. The loops alternate order per repeat,
after one untimed run of each. Medians over repeats; ratios are against the reference.
``compile_s`` is what the warm-up steps took beyond steady-state steps (the compile).

MFU: achieved FLOP/s over this machine's matmul peak, both measured in this run. FLOPs per
token = 3 x student forward (forward + backward ~ 6N) + 1 x teacher forward (~ 2N) when
the teacher runs (online, reference), 3 x student forward with the cache; forward FLOPs
from :func:`kd.measure.flops_per_token` (Kaplan: matmul weights, attention over the
block, the logits). Peak: the median of ``--peak-reps`` timed ``torch.matmul`` of two
``--peak-n`` square fp32 matrices (bf16 too when ``kd.train`` uses it), measured before
and after the training runs.

``--json PATH`` writes ``kd_tokens_per_s``, ``reference_tokens_per_s``, ``ratio``, ``mfu``
and ``peak_gflops`` for the cache mode, the same keys under ``online`` and the teacher
shape's under ``teacher_shape``, and the machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def matmul_peak_flops(n: int, dtype: torch.dtype, reps: int) -> float:
    """Median FLOP/s of an (n, n) @ (n, n) matmul after one warm-up."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times)


def reference_loop(student: torch.nn.Module, teacher: torch.nn.Module, batches: list[dict], *, n_vocab: int,
                   temperature: float, kd_weight: float, lr: float, weight_decay: float, grad_clip: float,
                   marks: list[float] | None = None, mark_at: int = 0) -> None:
    """Distillation the obvious way: fp32, dense teacher logits, stock torch functions.

    ``marks`` gets the time before batch ``mark_at`` and after the last one (the timer).
    """
    teacher.eval()
    student.train()
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    T = temperature
    for i, batch in enumerate(batches):
        if marks is not None and i == mark_at:
            marks.append(time.perf_counter())
        x, y = batch["input_ids"], batch["labels"]  # (B, L-1) each
        with torch.no_grad():
            t_logits = teacher(input_ids=x).logits[..., :n_vocab]
        s_logits = student(input_ids=x).logits[..., :n_vocab]
        ce = F.cross_entropy(s_logits.flatten(0, 1), y.flatten())
        kl = F.kl_div(F.log_softmax(s_logits.flatten(0, 1) / T, dim=-1),
                      F.log_softmax(t_logits.flatten(0, 1) / T, dim=-1),
                      reduction="batchmean", log_target=True) * T * T
        loss = (1 - kd_weight) * ce + kd_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), grad_clip)
        opt.step()
    if marks is not None:
        marks.append(time.perf_counter())


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", default="small", help="embedded world size (tiny, small, default)")
    p.add_argument("--teacher", default="4x256", help="teacher LAYERSxWIDTH")
    p.add_argument("--teacher-steps", type=int, default=20, help="teacher training steps (cost, not quality)")
    p.add_argument("--student", default="2x128", help="student LAYERSxWIDTH")
    p.add_argument("--steps", type=int, default=30, help="timed steps per run (after the warm-up steps)")
    p.add_argument("--warmup-steps", type=int, default=5, help="untimed steps at the start of each run")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per loop (median)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", default="true", choices=("auto", "true", "false"), help="kd.train's train.compile")
    p.add_argument("--peak-n", type=int, default=2048, help="matrix size of the peak matmul")
    p.add_argument("--peak-reps", type=int, default=5)
    p.add_argument("--json", default=None, metavar="PATH", help="also write the figures as JSON")
    p.add_argument("--quick", action="store_true", help="tiny sizes, eager: a smoke run in under a minute")
    args = p.parse_args(argv)
    if args.quick:
        args.world, args.teacher, args.teacher_steps, args.student = "tiny", "2x64", 20, "1x64"
        args.steps, args.warmup_steps, args.batch_size, args.repeats = 4, 1, 8, 3
        args.peak_n, args.peak_reps, args.compile = 512, 3, "false"

    import tempfile

    import transformers

    transformers.utils.logging.disable_progress_bar()
    from kd.config import load_config
    from kd.data import load_blocks
    from kd.device import cpu_bf16_is_fast, use_threads
    from kd.measure import count_params, flops_per_token
    from kd.models import build_student, load_pretrained, load_tokenizer
    from kd.soft_labels import ensure_soft_labels
    from kd.teacher import ensure_teacher
    from kd.train import Hooks, _batches, online_teacher, train

    use_threads(args.threads)
    (t_layers, t_embd), (s_layers, s_embd) = (map(int, s.split("x")) for s in (args.teacher, args.student))
    total_steps = args.warmup_steps + args.steps
    cfg = load_config(overrides={
        "data.world_size": args.world, "teacher.n_layer": t_layers, "teacher.n_embd": t_embd,
        "teacher.n_head": max(1, t_embd // 64), "teacher.steps": args.teacher_steps,
        "student.n_layer": s_layers, "student.n_embd": s_embd, "loss.kd_weight": 0.5, "loss.temperature": 2.0,
        "train.steps": total_steps, "train.batch_size": args.batch_size, "train.eval_every": args.warmup_steps,
        "train.warmup_steps": 1, "train.threads": args.threads, "train.device": "cpu",
        "train.compile": args.compile, "teacher.mode": "cache",
        "teacher.soft_labels_dir": tempfile.mkdtemp(prefix="kd-bench-soft-labels-"),
    })
    t0 = time.perf_counter()
    source = ensure_teacher(cfg)
    teacher, tok = load_pretrained(source)
    teacher_s = time.perf_counter() - t0
    blocks = load_blocks(cfg.data, tok)
    n_vocab, device = len(tok), torch.device("cpu")
    val = blocks.val[:1]
    batches_gen = _batches(blocks.train, cfg.train, Hooks(), 0)
    batches = [next(batches_gen) for _ in range(total_steps)]  # the batches kd.train draws, in order
    tokens = sum(b["labels"].numel() for b in batches[args.warmup_steps:])
    step_tokens = batches[0]["labels"].numel()
    online = online_teacher(teacher, n_vocab, device, cfg.train.precision)
    cached = ensure_soft_labels(cfg, source, load_tokenizer(source), blocks.train).teacher_fn(device)
    bf16 = cpu_bf16_is_fast()

    def run_kd(teacher_fn, model: torch.nn.Module | None = None, loss_cfg=None) -> tuple[float, float]:
        """(steady-state tokens/s, seconds of the warm-up steps)."""
        model = model if model is not None else build_student(teacher, cfg.student, seed=0)
        marks = [time.perf_counter()]
        train(model, blocks.train, val, n_vocab=n_vocab, loss_cfg=loss_cfg or cfg.loss, cfg=cfg.train,
              teacher=teacher_fn, report=lambda m, c: marks.append(time.perf_counter()))
        return tokens / (marks[-1] - marks[1]), marks[1] - marks[0]

    def run_ref() -> tuple[float, float]:
        student = build_student(teacher, cfg.student, seed=0)
        marks = []
        reference_loop(student, teacher, batches, n_vocab=n_vocab, temperature=cfg.loss.temperature,
                       kd_weight=cfg.loss.kd_weight, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                       grad_clip=cfg.train.grad_clip, marks=marks, mark_at=args.warmup_steps)
        return tokens / (marks[1] - marks[0]), 0.0

    def run_teacher_shape() -> tuple[float, float]:
        from dataclasses import replace

        model = build_student(teacher, replace(cfg.student, n_layer=t_layers, n_embd=t_embd), seed=0)
        return run_kd(None, model, replace(cfg.loss, kd_weight=0.0))

    loops = {"kd.train (cache)": lambda: run_kd(cached), "kd.train (online)": lambda: run_kd(online),
             "reference loop": run_ref, "kd.train (teacher shape, CE)": run_teacher_shape}
    peaks = {torch.float32: [matmul_peak_flops(args.peak_n, torch.float32, args.peak_reps)]}
    if bf16:
        peaks[torch.bfloat16] = [matmul_peak_flops(args.peak_n, torch.bfloat16, args.peak_reps)]
    warm = {name: fn()[1] for name, fn in loops.items()}  # untimed: allocator, kernels, first compile
    tps: dict[str, list[float]] = {name: [] for name in loops}
    compile_s: dict[str, list[float]] = {name: [] for name in loops}
    names = list(loops)
    for r in range(args.repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            v, w = loops[name]()
            tps[name].append(v)
            compile_s[name].append(max(0.0, w - args.warmup_steps * step_tokens / v))
            print(f"  repeat {r}: {name} {v:.0f} tokens/s", flush=True)
    for dt in peaks:
        peaks[dt].append(matmul_peak_flops(args.peak_n, dt, args.peak_reps))

    student = build_student(teacher, cfg.student, seed=0)
    ctx = cfg.data.block_size - 1
    f_student, f_teacher = flops_per_token(student.config, ctx), flops_per_token(teacher.config, ctx)
    flops = {"kd.train (cache)": 3 * f_student, "kd.train (online)": 3 * f_student + f_teacher,
             "reference loop": 3 * f_student + f_teacher, "kd.train (teacher shape, CE)": 3 * f_teacher}
    peak32 = statistics.median(peaks[torch.float32])
    kd_peak = statistics.median(peaks[torch.bfloat16]) if bf16 else peak32
    med = {name: statistics.median(v) for name, v in tps.items()}
    ref = med["reference loop"]
    ns, nt = count_params(student)["params"], count_params(teacher)["params"]

    print(f"\n# {_cpu_name()}, {args.threads} threads, torch {torch.__version__}; world={args.world}, "
          f"teacher {args.teacher} ({nt / 1e6:.2f}M params, {args.teacher_steps} steps, ready in {teacher_s:.0f} s), "
          f"student {args.student} ({ns / 1e6:.2f}M), vocab {n_vocab}, batch {args.batch_size} x {ctx} tokens, "
          f"{args.warmup_steps} + {args.steps} steps per run, {args.repeats} repeats, "
          f"kd.train precision {'bf16' if bf16 else 'fp32'} (auto), compile {args.compile}")
    print(f"# FLOPs/token: student fwd {f_student / 1e6:.2f}M, teacher fwd {f_teacher / 1e6:.2f}M; "
          f"fp32 matmul peak {args.peak_n}^3: " + ", ".join(f"{p / 1e9:.1f}" for p in peaks[torch.float32])
          + " GFLOP/s" + (f"; bf16 peak {statistics.median(peaks[torch.bfloat16]) / 1e9:.1f} GFLOP/s" if bf16 else ""))
    print("\n| loop | tokens/s (median) | runs | vs reference | GFLOP/s | MFU (fp32 peak) | compile_s (first) |"
          + (" MFU (bf16 peak) |" if bf16 else ""))
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: |" + (" ---: |" if bf16 else ""))
    rows = {}
    for name in loops:
        peak = peak32 if name == "reference loop" else kd_peak
        mfu = med[name] * flops[name] / peak
        rows[name] = {"tokens_per_s": med[name], "ratio": med[name] / ref, "mfu": mfu,
                      "compile_s": statistics.median(compile_s[name]),
                      "first_compile_s": max(0.0, warm[name] - args.warmup_steps * step_tokens / med[name])}
        extra = f" {100 * mfu:.1f}% |" if bf16 else ""
        print(f"| {name} | {med[name]:.0f} | {', '.join(f'{v:.0f}' for v in tps[name])} | {med[name] / ref:.2f}x | "
              f"{med[name] * flops[name] / 1e9:.1f} | {100 * med[name] * flops[name] / peak32:.1f}% | "
              f"{rows[name]['compile_s']:.1f} ({rows[name]['first_compile_s']:.1f}) |" + extra)
    if args.json:
        def keys(name: str) -> dict:
            return {"kd_tokens_per_s": med[name], "reference_tokens_per_s": ref, "ratio": med[name] / ref,
                    "mfu": rows[name]["mfu"], "peak_gflops": kd_peak / 1e9, "compile_s": rows[name]["compile_s"],
                    "first_compile_s": rows[name]["first_compile_s"], "runs": tps[name]}
        out = {**keys("kd.train (cache)"), "online": keys("kd.train (online)"),
               "teacher_shape": {"tokens_per_s": med["kd.train (teacher shape, CE)"],
                                 "mfu": rows["kd.train (teacher shape, CE)"]["mfu"], "peak_gflops": kd_peak / 1e9,
                                 "shape": args.teacher},
               "reference_runs": tps["reference loop"], "machine": _cpu_name(), "threads": args.threads,
               "torch": torch.__version__, "compile": args.compile, "precision": "bf16" if bf16 else "fp32",
               "student": args.student, "teacher": args.teacher, "steps": args.steps, "repeats": args.repeats}
        Path(args.json).write_text(json.dumps(out, indent=1))
        print(f"\njson: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
