"""Peak memory and time of the distillation loss (forward + backward), chunked vs not.

    python bench/chunked_loss.py --tokens 2048 --vocab 128256

Memory: each variant runs in a fresh subprocess; the figure is the peak resident set
(ru_maxrss) minus the resident set once the inputs exist, i.e. what the loss itself adds
(on CPU torch has no allocator statistics). Time: both variants in one process,
alternating, median of ``--repeats`` (a ratio is robust to a shared machine; absolute
times are not). Targets: the compact format (k = 64 + the tail grid), forward KL, T = 2,
kd_weight = 0.5, fp32 student logits. The figure includes the (N, V) gradient the loss
returns (it becomes ``.grad``, as after ``zero_grad(set_to_none=True)``).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch


def _inputs(n: int, vocab: int):
    """Student logits (1, N, V) and compact targets (k = 64, 9 grid points), built without
    any (N, V) temporary (the peak-memory figure would count it)."""
    from kd.compact import temperature_grid

    g = torch.Generator().manual_seed(0)
    betas = temperature_grid(0.5, 8.0, 9)
    idx = (torch.arange(64)[None] * 1999 + torch.randint(0, vocab, (n, 1), generator=g)) % vocab  # distinct ids
    values = (torch.randn(n, 64, generator=g) * 3 + 10).half()
    lse = torch.randn(n, len(betas), generator=g) + 8.0
    slope = torch.randn(n, len(betas), generator=g)
    student = torch.randn(1, n, vocab, generator=g).requires_grad_(True)
    labels = torch.randint(0, vocab, (1, n), generator=g)
    targets = dict(topk_values=values[None], topk_indices=idx[None], topk_tail_lse=lse[None],
                   topk_tail_slope=slope[None], tail_betas=betas)
    return student, labels, targets


def _step(student, labels, targets, chunk):
    from kd.losses import distillation_loss

    student.grad = None
    parts = distillation_loss(student, labels, temperature=2.0, kd_weight=0.5, chunk_tokens=chunk, **targets)
    parts.loss.backward()
    return parts.loss.item()


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def child(n: int, vocab: int, chunk: int) -> None:
    student, labels, targets = _inputs(n, vocab)
    base = _rss_mb()  # .grad is None, as after zero_grad(set_to_none=True): the loss's gradient becomes it
    _step(student, labels, targets, chunk)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"base_mb": base, "peak_mb": peak, "added_mb": peak - base}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--chunk", type=int, default=0, help="chunk rows (0 = kd.losses_chunked's automatic size)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", type=int, default=-1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    from kd.losses_chunked import auto_rows

    chunk = args.chunk or auto_rows(args.vocab)
    if args.child >= 0:
        return child(args.tokens, args.vocab, args.child)
    mem = {}
    for name, c in (("unchunked", 0), ("chunked", chunk)):
        out = subprocess.run([sys.executable, __file__, "--tokens", str(args.tokens), "--vocab", str(args.vocab),
                              "--child", str(c)], capture_output=True, text=True, check=True)
        mem[name] = json.loads(out.stdout.strip().splitlines()[-1])
    student, labels, targets = _inputs(args.tokens, args.vocab)
    times = {"unchunked": [], "chunked": []}
    values = {}
    for _ in range(args.repeats):
        for name, c in (("unchunked", 0), ("chunked", chunk)):
            t0 = time.perf_counter()
            values[name] = _step(student, labels, targets, c)
            times[name].append(time.perf_counter() - t0)
    fp32 = args.tokens * args.vocab * 4 / 2**20
    print(f"N = {args.tokens} tokens, V = {args.vocab}, chunk = {chunk} rows; one fp32 (N, V) = {fp32:.0f} MB; "
          f"loss values {values['unchunked']:.6f} / {values['chunked']:.6f}")
    print("| variant | memory added by the loss (MB) | x (N, V) fp32 | median time (s) | times (s) |")
    print("| --- | ---: | ---: | ---: | --- |")
    for name in ("unchunked", "chunked"):
        added = mem[name]["added_mb"]
        print(f"| {name} | {added:.0f} | {added / fp32:.2f} | {statistics.median(times[name]):.2f} | "
              f"{', '.join(f'{t:.2f}' for t in times[name])} |")
    ratio_m = mem["chunked"]["added_mb"] / mem["unchunked"]["added_mb"]
    ratio_t = statistics.median(times["chunked"]) / statistics.median(times["unchunked"])
    print(f"\nchunked / unchunked: memory {ratio_m:.2f}, time {ratio_t:.2f}")


if __name__ == "__main__":
    main()
