"""Distillation training throughput of ``kd.train.train`` against a plain loop, and MFU.

    python bench/train_throughput.py                  # world 'small', teacher 4x256, student 2x128
    python bench/train_throughput.py --repeats 5 --steps 40
    python bench/train_throughput.py --quick          # tiny version (< 60 s)

One teacher (trained by :func:`kd.teacher.ensure_teacher` on the embedded world with a
short schedule: its quality does not change the cost), one student shape, the same
batches (the order ``kd.train`` draws), two loops:

- ``kd.train.train`` with the online teacher (:func:`kd.train.online_teacher`), as a
  sweep trial runs it (precision ``auto``: bf16 autocast only where this CPU is fast at it);
- a reference loop written the obvious way: teacher forward under ``no_grad`` every step,
  student forward, ``F.cross_entropy`` + ``F.kl_div`` (log-space targets) times T^2, AdamW,
  gradient clipping, fp32, nothing else.

Each repeat trains a fresh student (same seed) for ``--steps`` steps with each loop, in
alternating order (kd first on even repeats, reference first on odd), after a warm-up run
of each; tokens/s is wall-clock over the whole call (``kd.train.train`` ends with one
evaluation on a single validation block). Medians over repeats; the ratio is kd / reference.

MFU: achieved FLOP/s over this machine's matmul peak, both measured in this run. Achieved
FLOPs per token = 3 x student forward (forward + backward ~ 6N) + 1 x teacher forward
(~ 2N), forward FLOPs from :func:`kd.measure.flops_per_token` (Kaplan: matmul weights,
attention over the block, the logits). Peak: the median of ``--peak-reps`` timed
``torch.matmul`` of two ``--peak-n`` square fp32 matrices (bf16 too when ``kd.train``
uses it), measured before and after the training runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

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
                   temperature: float, kd_weight: float, lr: float, weight_decay: float, grad_clip: float) -> None:
    """Distillation the obvious way: fp32, dense teacher logits, stock torch functions."""
    teacher.eval()
    student.train()
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    T = temperature
    for batch in batches:
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", default="small", help="embedded world size (tiny, small, default)")
    p.add_argument("--teacher", default="4x256", help="teacher LAYERSxWIDTH")
    p.add_argument("--teacher-steps", type=int, default=20, help="teacher training steps (cost, not quality)")
    p.add_argument("--student", default="2x128", help="student LAYERSxWIDTH")
    p.add_argument("--steps", type=int, default=20, help="training steps per timed run")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per loop (median)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--peak-n", type=int, default=2048, help="matrix size of the peak matmul")
    p.add_argument("--peak-reps", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in under a minute")
    args = p.parse_args(argv)
    if args.quick:
        args.world, args.teacher, args.teacher_steps, args.student = "tiny", "2x64", 20, "1x64"
        args.steps, args.batch_size, args.repeats, args.peak_n, args.peak_reps = 4, 8, 3, 512, 3

    import transformers

    transformers.utils.logging.disable_progress_bar()
    from kd.config import load_config
    from kd.data import load_blocks
    from kd.measure import count_params, flops_per_token
    from kd.models import build_student, load_pretrained
    from kd.teacher import ensure_teacher
    from kd.train import Hooks, _batches, _cpu_bf16_is_fast, online_teacher, train

    torch.set_num_threads(args.threads)
    (t_layers, t_embd), (s_layers, s_embd) = (map(int, s.split("x")) for s in (args.teacher, args.student))
    cfg = load_config(overrides={
        "data.world_size": args.world, "teacher.n_layer": t_layers, "teacher.n_embd": t_embd,
        "teacher.n_head": max(1, t_embd // 64), "teacher.steps": args.teacher_steps,
        "student.n_layer": s_layers, "student.n_embd": s_embd, "loss.kd_weight": 0.5, "loss.temperature": 2.0,
        "train.steps": args.steps, "train.batch_size": args.batch_size, "train.eval_every": args.steps,
        "train.warmup_steps": 1, "train.threads": args.threads, "train.device": "cpu",
    })
    t0 = time.perf_counter()
    teacher, tok = load_pretrained(ensure_teacher(cfg))
    teacher_s = time.perf_counter() - t0
    blocks = load_blocks(cfg.data, tok)
    n_vocab, device = len(tok), torch.device("cpu")
    val = blocks.val[:1]
    batches_gen = _batches(blocks.train, cfg.train, Hooks(), 0)
    batches = [next(batches_gen) for _ in range(args.steps)]  # the batches kd.train draws, in order
    tokens = sum(b["labels"].numel() for b in batches)
    teacher_fn = online_teacher(teacher, n_vocab, device, cfg.train.precision)
    bf16 = _cpu_bf16_is_fast()

    def run_kd() -> float:
        student = build_student(teacher, cfg.student, seed=0)
        t = time.perf_counter()
        train(student, blocks.train, val, n_vocab=n_vocab, loss_cfg=cfg.loss, cfg=cfg.train, teacher=teacher_fn)
        return tokens / (time.perf_counter() - t)

    def run_ref() -> float:
        student = build_student(teacher, cfg.student, seed=0)
        t = time.perf_counter()
        reference_loop(student, teacher, batches, n_vocab=n_vocab, temperature=cfg.loss.temperature,
                       kd_weight=cfg.loss.kd_weight, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                       grad_clip=cfg.train.grad_clip)
        return tokens / (time.perf_counter() - t)

    peaks = {torch.float32: [matmul_peak_flops(args.peak_n, torch.float32, args.peak_reps)]}
    if bf16:
        peaks[torch.bfloat16] = [matmul_peak_flops(args.peak_n, torch.bfloat16, args.peak_reps)]
    run_kd(), run_ref()  # warm-up (allocator, kernels)
    kd_tps, ref_tps = [], []
    for r in range(args.repeats):
        order = (("kd", run_kd), ("ref", run_ref)) if r % 2 == 0 else (("ref", run_ref), ("kd", run_kd))
        for name, fn in order:
            v = fn()
            (kd_tps if name == "kd" else ref_tps).append(v)
            print(f"  repeat {r}: {name} {v:.0f} tokens/s", flush=True)
    for dt in peaks:
        peaks[dt].append(matmul_peak_flops(args.peak_n, dt, args.peak_reps))

    student = build_student(teacher, cfg.student, seed=0)
    ctx = cfg.data.block_size - 1
    f_student, f_teacher = flops_per_token(student.config, ctx), flops_per_token(teacher.config, ctx)
    flops_tok = 3 * f_student + f_teacher
    peak32 = statistics.median(peaks[torch.float32])
    kd_med, ref_med = statistics.median(kd_tps), statistics.median(ref_tps)
    ns, nt = count_params(student)["params"], count_params(teacher)["params"]

    print(f"\n# world={args.world}, teacher {args.teacher} ({nt / 1e6:.2f}M params, {args.teacher_steps} steps, "
          f"ready in {teacher_s:.0f} s), student {args.student} ({ns / 1e6:.2f}M), vocab {n_vocab}, "
          f"batch {args.batch_size} x {ctx} tokens, {args.steps} steps per run, {args.repeats} repeats, "
          f"{args.threads} threads, kd.train precision {'bf16' if bf16 else 'fp32'} (auto), torch {torch.__version__}")
    print(f"# FLOPs/token: 3 x {f_student / 1e6:.2f}M (student fwd+bwd) + {f_teacher / 1e6:.2f}M (teacher fwd) "
          f"= {flops_tok / 1e6:.2f}M; fp32 matmul peak {args.peak_n}^3: "
          + ", ".join(f"{p / 1e9:.1f}" for p in peaks[torch.float32]) + " GFLOP/s"
          + (f"; bf16 peak {statistics.median(peaks[torch.bfloat16]) / 1e9:.1f} GFLOP/s" if bf16 else ""))
    kd_peak = statistics.median(peaks[torch.bfloat16]) if bf16 else peak32
    print("\n| loop | tokens/s (median) | runs | vs reference | GFLOP/s | MFU (fp32 peak) |"
          + (" MFU (bf16 peak) |" if bf16 else ""))
    print("| --- | ---: | --- | ---: | ---: | ---: |" + (" ---: |" if bf16 else ""))
    for name, med, runs, peak in (("kd.train.train", kd_med, kd_tps, kd_peak), ("reference loop", ref_med, ref_tps, peak32)):
        extra = f" {100 * med * flops_tok / kd_peak:.1f}% |" if bf16 else ""
        print(f"| {name} | {med:.0f} | {', '.join(f'{v:.0f}' for v in runs)} | {med / ref_med:.2f}x | "
              f"{med * flops_tok / 1e9:.1f} | {100 * med * flops_tok / peak32:.1f}% |" + extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
